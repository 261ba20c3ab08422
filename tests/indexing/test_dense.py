"""Tests for indexing.dense: train, shard-add, merge, serialise and search FAISS indexes."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedding.mrl import truncate
from indexing import dense
from indexing.dense import DenseIndexParams

FULL_DIM = 64  # stored (Matryoshka) dimension
DIM = 32  # prefix the indexes are built at
N = 3000
N_QUERIES = 200
K = 10
SHARDS = (700, 0, 1100, 1200)  # uneven, one empty; sums to N
MERGEABLE = ("flat", "ivf", "ivfpq", "int8", "binary")
PARAMS = {
    "flat": DenseIndexParams("flat", DIM),
    "ivf": DenseIndexParams("ivf", DIM).resolved(N),
    "ivfpq": DenseIndexParams("ivfpq", DIM, pq_m=8).resolved(N),
    "hnsw": DenseIndexParams("hnsw", DIM, hnsw_m=16, ef_construction=40, ef_search=64),
    "int8": DenseIndexParams("int8", DIM),
    "binary": DenseIndexParams("binary", DIM),
}
assert sum(SHARDS) == N


def _clustered(n: int, dim: int, seed: int, n_clusters: int = 64, noise: float = 0.4) -> np.ndarray:
    """(n, dim) float32 unit rows around shared random centres (same centres for any seed)."""
    centres = np.random.default_rng(1234).standard_normal((n_clusters, dim))
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, n_clusters, n)] + noise * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found, truth)]))


@pytest.fixture(scope="module")
def stored() -> np.ndarray:
    """(N, FULL_DIM) float16, as an embedding set stores them."""
    return _clustered(N, FULL_DIM, seed=0).astype(np.float16)


@pytest.fixture(scope="module")
def vectors(stored) -> np.ndarray:
    """(N, DIM) float32 unit rows: the Matryoshka prefix the indexes see."""
    return truncate(stored, DIM)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return truncate(_clustered(N_QUERIES, FULL_DIM, seed=1), DIM)


@pytest.fixture(scope="module")
def trained(vectors) -> dict[str, bytes]:
    """Trained empty index per kind, as the bytes the workers receive."""
    return {kind: dense.to_bytes(dense.train(p, vectors)) for kind, p in PARAMS.items()}


@pytest.fixture(scope="module")
def one_piece(trained, vectors) -> dict:
    """Each kind fed every vector in one add() call."""
    built = {}
    for kind, data in trained.items():
        built[kind] = dense.from_bytes(data, kind)
        dense.add(built[kind], vectors, 0)
    return built


@pytest.fixture(scope="module")
def truth(vectors, queries) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-K (scores, ids) in numpy."""
    scores = queries @ vectors.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    return np.take_along_axis(scores, ids, axis=1), ids


def _sharded_parts(kind: str, trained: dict, vectors: np.ndarray) -> list:
    parts, start = [], 0
    for size in SHARDS:
        part = dense.from_bytes(trained[kind], kind)
        dense.add(part, vectors[start:start + size], start)
        parts.append(part)
        start += size
    return parts


def _assert_same_search(a, b, params, queries, **kwargs) -> None:
    sa, ia = dense.search(a, params, queries, K, **kwargs)
    sb, ib = dense.search(b, params, queries, K, **kwargs)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(sa, sb)


# --------------------------------------------------------------------------- build


@pytest.mark.parametrize("kind", dense.KINDS)
def test_train_returns_empty_trained_index(kind, trained):
    index = dense.from_bytes(trained[kind], kind)
    assert index.ntotal == 0 and index.is_trained
    assert dense.kind_of(index) == kind


@pytest.mark.parametrize("kind", dense.KINDS)
def test_add_and_bytes_round_trip(kind, one_piece, queries, vectors):
    index = one_piece[kind]
    assert index.ntotal == N
    data = dense.to_bytes(index)
    assert isinstance(data, bytes) and dense.index_bytes(index) == len(data)
    again = dense.from_bytes(data, kind)
    _assert_same_search(index, again, PARAMS[kind], queries)
    _assert_same_search(index, again, PARAMS[kind], queries, vectors=vectors)


@pytest.mark.parametrize("kind", MERGEABLE)
def test_sharded_merge_equals_one_piece(kind, trained, one_piece, vectors, queries):
    merged = dense.merge(_sharded_parts(kind, trained, vectors))
    assert merged.ntotal == N
    params = PARAMS[kind]
    _assert_same_search(merged, one_piece[kind], params, queries)
    _assert_same_search(merged, one_piece[kind], params, queries, vectors=vectors)
    allowed = np.arange(0, N, 3, dtype=np.int64)
    _assert_same_search(merged, one_piece[kind], params, queries, allowed=allowed)
    assert dense.to_bytes(merged) == dense.to_bytes(one_piece[kind])


def test_merge_consumes_parts(trained, vectors):
    parts = _sharded_parts("ivf", trained, vectors)
    merged = dense.merge(parts)
    assert merged is parts[0]
    assert all(p.ntotal == 0 for p in parts[1:])


def test_hnsw_sequential_shards_match_one_piece(trained, one_piece, vectors, queries, truth):
    # An HNSW graph is not reproducible across batchings (FAISS inserts a batch level by
    # level, multi-threaded), so compare what is: stored vectors, ids and quality.
    index, start = dense.from_bytes(trained["hnsw"], "hnsw"), 0
    for size in SHARDS:
        dense.add(index, vectors[start:start + size], start)
        start += size
    ref = one_piece["hnsw"]
    np.testing.assert_array_equal(faiss.vector_to_array(index.id_map), faiss.vector_to_array(ref.id_map))
    storage = [faiss.downcast_index(i.index).storage.reconstruct_n(0, N) for i in (index, ref)]
    np.testing.assert_array_equal(*storage)
    recalls = [_recall(dense.search(i, PARAMS["hnsw"], queries, K)[1], truth[1]) for i in (index, ref)]
    assert min(recalls) > 0.9 and abs(recalls[0] - recalls[1]) < 0.05


def test_merge_rejects_hnsw_parts(trained, vectors):
    parts = [dense.from_bytes(trained["hnsw"], "hnsw") for _ in range(2)]
    with pytest.raises(ValueError, match="HNSW"):
        dense.merge(parts)
    assert dense.merge(parts[:1]) is parts[0]


def test_merge_rejects_mismatched_parts(trained, vectors):
    other = dense.train(PARAMS["ivf"], vectors[::-1].copy())
    with pytest.raises(ValueError, match="trained differently"):
        dense.merge([dense.from_bytes(trained["ivf"], "ivf"), other])
    with pytest.raises(ValueError, match="part 1"):
        dense.merge([dense.from_bytes(trained["flat"], "flat"), dense.from_bytes(trained["int8"], "int8")])
    part = dense.from_bytes(trained["flat"], "flat")
    with pytest.raises(ValueError, match="twice"):
        dense.merge([part, part])
    with pytest.raises(ValueError, match="at least one"):
        dense.merge([])


@pytest.mark.parametrize("kind", dense.IVF_KINDS)
def test_merge_ondisk_equals_in_memory_merge(kind, trained, vectors, queries, tmp_path):
    paths = []
    for i, part in enumerate(_sharded_parts(kind, trained, vectors)):
        paths.append(tmp_path / f"part{i}.faiss")
        paths[-1].write_bytes(dense.to_bytes(part))
    empty = dense.from_bytes(trained[kind], kind)
    on_disk = dense.merge_ondisk(empty, paths, tmp_path / "merged.ivfdata")
    assert empty.ntotal == 0 and on_disk.ntotal == N
    in_memory = dense.merge(_sharded_parts(kind, trained, vectors))
    _assert_same_search(on_disk, in_memory, PARAMS[kind], queries)
    # Its bytes reference the .ivfdata file, which stays in place.
    _assert_same_search(dense.from_bytes(dense.to_bytes(on_disk), kind), in_memory, PARAMS[kind], queries)


def test_merge_ondisk_rejects_bad_input(trained, tmp_path):
    with pytest.raises(ValueError, match="supports"):
        dense.merge_ondisk(dense.from_bytes(trained["flat"], "flat"), [], tmp_path / "x.ivfdata")
    with pytest.raises(FileNotFoundError, match="missing"):
        dense.merge_ondisk(dense.from_bytes(trained["ivf"], "ivf"), [tmp_path / "missing"], tmp_path / "x")


def test_train_on_gpu_path_uses_a_clustering_index(monkeypatch, vectors):
    # faiss-cpu has no GPU: stand the GPU clone in with the CPU index it was made from.
    cloned = []

    def fake_to_gpus(index):
        cloned.append(index)
        return index

    cpu = dense.train(PARAMS["ivf"], vectors)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", fake_to_gpus)
    gpu = dense.train(PARAMS["ivf"], vectors)
    assert len(cloned) == 1 and cloned[0].metric_type == faiss.METRIC_INNER_PRODUCT
    assert gpu.clustering_index is None
    np.testing.assert_allclose(gpu.quantizer.reconstruct_n(0, gpu.nlist),
                               cpu.quantizer.reconstruct_n(0, cpu.nlist), atol=1e-5)


# --------------------------------------------------------------------------- search quality


def test_flat_equals_brute_force(one_piece, queries, truth):
    scores, ids = dense.search(one_piece["flat"], PARAMS["flat"], queries, K)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (N_QUERIES, K)
    np.testing.assert_array_equal(ids, truth[1])
    np.testing.assert_allclose(scores, truth[0], atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "plain", "rescored"),
    [("ivf", 0.95, 0.95), ("ivfpq", 0.6, 0.95), ("hnsw", 0.9, 0.9), ("int8", 0.95, 0.98)],
)
def test_recall_against_flat(kind, plain, rescored, one_piece, queries, vectors, truth):
    _, ids = dense.search(one_piece[kind], PARAMS[kind], queries, K)
    assert _recall(ids, truth[1]) > plain
    _, ids = dense.search(one_piece[kind], PARAMS[kind], queries, K, vectors=vectors)
    assert _recall(ids, truth[1]) > rescored


def test_binary_rescoring_beats_binary_alone(one_piece, queries, vectors, truth):
    index, params = one_piece["binary"], PARAMS["binary"]
    scores, ids = dense.search(index, params, queries, K)
    # Without vectors the score is minus the Hamming distance of the sign bits.
    codes = np.unpackbits(np.packbits(vectors > 0, axis=1), axis=1)
    q_codes = np.unpackbits(np.packbits(queries > 0, axis=1), axis=1)
    expected = -(codes[ids[0]] != q_codes[0]).sum(axis=1)
    np.testing.assert_array_equal(scores[0], expected)
    _, rescored = dense.search(index, params, queries, K, vectors=vectors)
    assert _recall(rescored, truth[1]) > _recall(ids, truth[1]) + 0.2


def test_rescoring_accepts_full_dim_float16(one_piece, queries, stored, vectors):
    # Full-dimension float16 rows are truncated and re-normalised as they are gathered.
    index, params = one_piece["int8"], PARAMS["int8"]
    from_stored = dense.search(index, params, queries, K, vectors=stored)
    from_prefix = dense.search(index, params, queries, K, vectors=vectors)
    np.testing.assert_array_equal(from_stored[1], from_prefix[1])
    np.testing.assert_allclose(from_stored[0], from_prefix[0], atol=1e-6)
    np.testing.assert_allclose(from_stored[0], np.sort(from_stored[0], axis=1)[:, ::-1])


@pytest.mark.parametrize("kind", dense.KINDS)
def test_allowed_restricts_results(kind, one_piece, queries, vectors):
    allowed = np.sort(np.random.default_rng(7).choice(N, 300, replace=False)).astype(np.int64)
    for kwargs in ({}, {"vectors": vectors}):
        _, ids = dense.search(one_piece[kind], PARAMS[kind], queries, K, allowed=allowed, **kwargs)
        assert np.isin(ids[ids >= 0], allowed).all()
        assert (ids >= 0).mean() > 0.9


def test_flat_allowed_equals_restricted_brute_force(one_piece, queries, vectors):
    allowed = np.sort(np.random.default_rng(8).choice(N, 250, replace=False)).astype(np.int64)
    _, ids = dense.search(one_piece["flat"], PARAMS["flat"], queries, K, allowed=allowed)
    scores = queries @ vectors[allowed].T
    expected = allowed[np.argsort(-scores, axis=1, kind="stable")[:, :K]]
    np.testing.assert_array_equal(ids, expected)


@pytest.mark.parametrize("kind", dense.KINDS)
def test_fewer_results_than_k_are_padded(kind, trained, one_piece, queries, vectors):
    allowed = np.array([5, 17, 2999], dtype=np.int64)
    index, params = one_piece[kind], PARAMS[kind]
    for kwargs in ({}, {"vectors": vectors}):
        scores, ids = dense.search(index, params, queries[:4], K, allowed=allowed, **kwargs)
        assert ids.shape == scores.shape == (4, K)
        assert (ids[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    empty = dense.from_bytes(trained[kind], kind)
    scores, ids = dense.search(empty, params, queries[:2], K)
    assert (ids == -1).all() and np.isneginf(scores).all()


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "ivfpq", "dim": 384, "pq_m": 7}, "PQ m=7 does not divide dim 384"),
        ({"kind": "annoy", "dim": 32}, "unknown index kind 'annoy'.*flat, ivf"),
        ({"kind": "binary", "dim": 12}, "divisible by 8.*12"),
        ({"kind": "flat", "dim": 0}, "dim"),
        ({"kind": "ivf", "dim": 32, "nlist": 0}, "nlist"),
        ({"kind": "hnsw", "dim": 32, "hnsw_m": 1}, "hnsw_m"),
        ({"kind": "ivf", "dim": 32, "nprobe": -1}, "nprobe"),
        ({"kind": "int8", "dim": 32, "rescore": 0}, "rescore"),
        ({"kind": "ivfpq", "dim": 32, "pq_nbits": 17}, "pq_nbits"),
        ({"kind": "flat", "dim": True}, "dim"),
        ({"kind": "hnsw", "dim": 32, "ef_search": 2.5}, "ef_search"),
    ],
)
def test_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DenseIndexParams(**kwargs)


def test_params_dict_round_trip():
    params = DenseIndexParams("ivfpq", 384, nprobe=8).resolved(1_000_000, n_train=100_000)
    assert params.pq_m == 48 and params.nlist == 2048
    assert DenseIndexParams.from_dict(params.to_dict()) == params
    with pytest.raises(ValueError, match="unknown index params"):
        DenseIndexParams.from_dict({**params.to_dict(), "metric": "l2"})
    with pytest.raises(ValueError, match="lack"):
        DenseIndexParams.from_dict({"kind": "flat"})


def test_resolved_keeps_explicit_values_and_other_kinds():
    assert DenseIndexParams("ivf", 32, nlist=7).resolved(10**6).nlist == 7
    assert DenseIndexParams("flat", 32).resolved(10**6).nlist is None
    assert DenseIndexParams("ivf", 32).resolved(10).nlist == 1
    assert DenseIndexParams("ivfpq", 12).resolved(1000).pq_m == 1


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 10**12), n_train=st.integers(1, 10**9))
def test_nlist_invariants(n, n_train):
    nlist = dense.default_nlist(n)
    assert 1 <= nlist <= n and nlist & (nlist - 1) == 0
    # Nearest power of two to 4 * sqrt(n) on a log scale, unless n itself is smaller.
    target = 4.0 * np.sqrt(n)
    largest_below_n = 1 << (n.bit_length() - 1)
    assert nlist == largest_below_n or target / np.sqrt(2) <= nlist * (1 + 1e-9) <= target * np.sqrt(2) * (1 + 1e-9)
    capped = dense.capped_nlist(n, n_train)
    assert capped <= nlist and capped & (capped - 1) == 0
    assert n_train < 39 or capped * 39 <= n_train


@given(dim=st.integers(1, 4096))
def test_default_pq_m_divides_dim(dim):
    m = dense.default_pq_m(dim)
    assert dim % m == 0 and 1 <= m <= max(1, dim // 8)


def test_from_bytes_errors(trained):
    with pytest.raises(ValueError, match="corrupt"):
        dense.from_bytes(b"not a faiss index at all", "flat")
    with pytest.raises(ValueError, match="corrupt"):
        dense.from_bytes(trained["ivf"][:200], "ivf")
    with pytest.raises(ValueError, match="hold a ivf index, not flat"):
        dense.from_bytes(trained["ivf"], "flat")
    with pytest.raises(ValueError, match="corrupt"):
        dense.from_bytes(trained["ivf"], "binary")
    with pytest.raises(ValueError, match="unknown index kind"):
        dense.from_bytes(trained["ivf"], "IVF")


def test_input_errors(trained, one_piece, vectors, queries):
    with pytest.raises(ValueError, match="nlist=None"):
        dense.train(DenseIndexParams("ivf", DIM), vectors)
    with pytest.raises(ValueError, match="smaller than nlist"):
        dense.train(DenseIndexParams("ivf", DIM, nlist=64), vectors[:10])
    with pytest.raises(ValueError, match=r"shape \(n, 32\)"):
        dense.train(PARAMS["flat"], np.zeros((3, 64), np.float32))
    with pytest.raises(ValueError, match="unit length"):
        dense.add(dense.from_bytes(trained["flat"], "flat"), 2 * vectors[:5], 0)
    with pytest.raises(ValueError, match="start_id"):
        dense.add(dense.from_bytes(trained["flat"], "flat"), vectors[:5], -1)
    with pytest.raises(ValueError, match="params describe a ivf index"):
        dense.search(one_piece["flat"], PARAMS["ivf"], queries, K)
    with pytest.raises(ValueError, match="k must be"):
        dense.search(one_piece["flat"], PARAMS["flat"], queries, 0)
    with pytest.raises(ValueError, match="out of range"):
        dense.search(one_piece["int8"], PARAMS["int8"], queries, K, vectors=vectors[:100])
    with pytest.raises(ValueError, match="allowed"):
        dense.search(one_piece["flat"], PARAMS["flat"], queries, K, allowed=np.ones((2, 2), np.int64))
    with pytest.raises(ValueError, match="unsupported index type"):
        dense.kind_of(faiss.IndexFlatIP(DIM))
    with pytest.raises(ValueError, match="not inner product"):
        dense.kind_of(faiss.IndexIDMap(faiss.IndexFlatL2(DIM)))
