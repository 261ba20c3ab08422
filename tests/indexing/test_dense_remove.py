"""Tests for incremental dense index updates: remove labels, list labels, add after holes.

The reference for every removal is an index built from scratch over the survivors
with their original labels (added run by run with ``dense.add``): removal must
neither renumber the remaining labels nor leave a removed one searchable.
"""

from __future__ import annotations

import numpy as np
import pytest

from indexing import dense
from indexing.dense import DenseIndexParams

DIM = 32
N = 2000
NLIST = 16
N_NEW = 150
N_QUERIES = 20
K = 10
PARAMS = {
    "flat": DenseIndexParams("flat", DIM),
    "ivf": DenseIndexParams("ivf", DIM, nlist=NLIST, nprobe=NLIST),
    "ivfpq": DenseIndexParams("ivfpq", DIM, nlist=NLIST, pq_m=8, nprobe=NLIST),
    "hnsw": DenseIndexParams("hnsw", DIM, hnsw_m=16, ef_construction=40, ef_search=64),
    "int8": DenseIndexParams("int8", DIM),
    "binary": DenseIndexParams("binary", DIM),
}
# Storage is compacted in order, so these equal a from-scratch build byte for byte.
ORDER_PRESERVING = ("flat", "int8", "binary")


def _unit_rows(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return _unit_rows(N, seed=0)


@pytest.fixture(scope="module")
def new_vectors() -> np.ndarray:
    return _unit_rows(N_NEW, seed=1)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return _unit_rows(N_QUERIES, seed=2)


@pytest.fixture(scope="module")
def removed() -> np.ndarray:
    """Sorted labels to remove: a quarter, with the first and the last (the old max)."""
    rng = np.random.default_rng(3)
    picked = rng.choice(np.arange(1, N - 1), size=N // 4 - 2, replace=False)
    return np.sort(np.concatenate([[0, N - 1], picked])).astype(np.int64)


@pytest.fixture(scope="module")
def survivors(removed) -> np.ndarray:
    return np.setdiff1d(np.arange(N, dtype=np.int64), removed)


@pytest.fixture(scope="module")
def trained(vectors) -> dict[str, bytes]:
    return {kind: dense.to_bytes(dense.train(p, vectors)) for kind, p in PARAMS.items()}


def _build(kind: str, trained: dict, rows: np.ndarray, ids: np.ndarray):
    """Index of ``kind`` holding ``rows[i]`` under label ``ids[i]`` (ids increasing)."""
    index = dense.from_bytes(trained[kind], kind)
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    for run_rows, run_ids in zip(np.split(rows, breaks), np.split(ids, breaks)):
        if len(run_ids):
            dense.add(index, run_rows, int(run_ids[0]))
    return index


def _full(kind: str, trained: dict, vectors: np.ndarray):
    return _build(kind, trained, vectors, np.arange(N, dtype=np.int64))


def _scores_by_id(index, kind: str, queries: np.ndarray, k: int) -> list[dict[int, float]]:
    """Per query, every returned label with its score (k covers the whole index)."""
    scores, ids = dense.search(index, PARAMS[kind], queries, k)
    return [{int(i): float(s) for s, i in zip(row_s, row_i) if i >= 0} for row_s, row_i in zip(scores, ids)]


def _assert_same_search(a, b, kind: str, queries: np.ndarray, **kwargs) -> None:
    sa, ia = dense.search(a, PARAMS[kind], queries, K, **kwargs)
    sb, ib = dense.search(b, PARAMS[kind], queries, K, **kwargs)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(sa, sb)


def test_supports_remove_is_every_kind_but_hnsw():
    assert set(dense.SUPPORTS_REMOVE) == set(dense.KINDS) - {"hnsw"}


@pytest.mark.parametrize("kind", dense.KINDS)
def test_labels_of_a_fresh_index(kind, trained, vectors):
    assert dense.labels(dense.from_bytes(trained[kind], kind)).dtype == np.int64
    assert dense.labels(dense.from_bytes(trained[kind], kind)).size == 0
    index = _build(kind, trained, vectors[:300], np.r_[10:110, 500:700].astype(np.int64))
    np.testing.assert_array_equal(dense.labels(index), np.r_[10:110, 500:700])


@pytest.mark.parametrize("kind", dense.SUPPORTS_REMOVE)
def test_remove_leaves_holes_and_equals_a_fresh_build(kind, trained, vectors, queries, removed, survivors):
    index = _full(kind, trained, vectors)
    assert dense.remove(index, removed) == len(removed)
    assert index.ntotal == len(survivors)
    np.testing.assert_array_equal(dense.labels(index), survivors)

    # With k above ntotal (and every IVF list probed) each survivor comes back once,
    # under its original label, and no removed label ever does.
    scores, ids = dense.search(index, PARAMS[kind], queries, N)
    for row in ids:
        np.testing.assert_array_equal(np.sort(row[: len(survivors)]), survivors)
        assert (row[len(survivors):] == -1).all()
    assert np.isneginf(scores[:, len(survivors):]).all()

    # Same label -> same score as an index built over the survivors alone.
    fresh = _build(kind, trained, vectors[survivors], survivors)
    ours, theirs = _scores_by_id(index, kind, queries, N), _scores_by_id(fresh, kind, queries, N)
    for got, want in zip(ours, theirs):
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[i] for i in want], list(want.values()), rtol=0, atol=1e-5)
    top_ours = dense.search(index, PARAMS[kind], queries, K)
    top_fresh = dense.search(fresh, PARAMS[kind], queries, K)
    np.testing.assert_allclose(top_ours[0], top_fresh[0], rtol=0, atol=1e-5)
    if kind in ("flat", "ivf", *ORDER_PRESERVING):
        np.testing.assert_array_equal(top_ours[1], top_fresh[1])
    else:  # ivfpq: PQ scores can tie, so compare the top-k as sets
        assert [set(r) for r in top_ours[1]] == [set(r) for r in top_fresh[1]]
    if kind in dense.RESCORED_KINDS:
        _assert_same_search(index, fresh, kind, queries, vectors=vectors)
    if kind in ORDER_PRESERVING:
        assert dense.to_bytes(index) == dense.to_bytes(fresh)


@pytest.mark.parametrize("kind", dense.SUPPORTS_REMOVE)
def test_allowed_cannot_bring_back_removed_labels(kind, trained, vectors, queries, removed):
    index = _full(kind, trained, vectors)
    dense.remove(index, removed)
    _, ids = dense.search(index, PARAMS[kind], queries, 50, allowed=np.arange(N, dtype=np.int64))
    assert (ids >= 0).all() and not np.isin(ids, removed).any()
    _, ids = dense.search(index, PARAMS[kind], queries, 5, allowed=removed)
    assert (ids == -1).all()


@pytest.mark.parametrize("kind", dense.SUPPORTS_REMOVE)
def test_new_documents_get_labels_after_the_old_max(kind, trained, vectors, new_vectors, removed, survivors):
    index = _full(kind, trained, vectors)
    old_max = int(dense.labels(index)[-1])
    dense.remove(index, removed)  # removes old_max too: labels()[-1] + 1 would reuse it
    assert dense.labels(index)[-1] < old_max
    new_ids = np.arange(old_max + 1, old_max + 1 + N_NEW, dtype=np.int64)
    dense.add(index, new_vectors, old_max + 1)
    kept = np.concatenate([survivors, new_ids])
    np.testing.assert_array_equal(dense.labels(index), kept)

    # Every new document is its own nearest neighbour (rescored where quantised).
    by_label = np.concatenate([vectors, new_vectors])
    _, top = dense.search(index, PARAMS[kind], new_vectors, 1, vectors=by_label)
    np.testing.assert_array_equal(top[:, 0], new_ids)
    _, ids = dense.search(index, PARAMS[kind], new_vectors, N + N_NEW)
    for row in ids:
        np.testing.assert_array_equal(np.sort(row[: len(kept)]), kept)

    fresh = _build(kind, trained, by_label[kept], kept)
    _assert_same_search(index, fresh, kind, new_vectors, vectors=by_label)
    if kind in ORDER_PRESERVING:
        assert dense.to_bytes(index) == dense.to_bytes(fresh)


@pytest.mark.parametrize("kind", dense.SUPPORTS_REMOVE)
def test_bytes_round_trip_after_remove(kind, trained, vectors, queries, removed, survivors):
    index = _full(kind, trained, vectors)
    dense.remove(index, removed)
    again = dense.from_bytes(dense.to_bytes(index), kind)
    assert again.ntotal == len(survivors)
    np.testing.assert_array_equal(dense.labels(again), survivors)
    _assert_same_search(index, again, kind, queries)
    # A reloaded index can be updated again.
    more = survivors[::7]
    assert dense.remove(again, more) == len(more)
    np.testing.assert_array_equal(dense.labels(again), np.setdiff1d(survivors, more))
    _, ids = dense.search(again, PARAMS[kind], queries, N)
    assert not np.isin(ids, np.concatenate([removed, more])).any()


@pytest.mark.parametrize("kind", dense.SUPPORTS_REMOVE)
def test_remove_counts_only_stored_labels(kind, trained, vectors):
    index = _full(kind, trained, vectors)
    before = dense.to_bytes(index)
    assert dense.remove(index, np.empty(0, dtype=np.int64)) == 0
    assert dense.remove(index, np.array([])) == 0  # an empty list arrives as float64
    assert dense.remove(index, [N + 5, 10**12]) == 0  # never stored
    assert dense.to_bytes(index) == before
    assert dense.remove(index, np.array([7, 7, 8, N + 1], dtype=np.int32)) == 2
    assert dense.remove(index, np.array([7, 8])) == 0  # already gone
    assert index.ntotal == N - 2
    np.testing.assert_array_equal(dense.labels(index), np.setdiff1d(np.arange(N), [7, 8]))
    assert dense.remove(index, dense.labels(index)) == N - 2
    assert index.ntotal == 0 and dense.labels(index).size == 0


@pytest.mark.parametrize("bad, match", [
    (np.array([1.0, 2.0]), "1-d array"),
    (np.array([[1, 2]]), "1-d array"),
    (np.array([True, False]), "1-d array"),
    (np.array([3, -1]), ">= 0"),
])
def test_remove_rejects_bad_ids(bad, match, trained, vectors):
    index = _build("flat", trained, vectors[:10], np.arange(10, dtype=np.int64))
    with pytest.raises(ValueError, match=match):
        dense.remove(index, bad)
    assert index.ntotal == 10


def test_hnsw_remove_raises(trained, vectors):
    index = _build("hnsw", trained, vectors[:200], np.arange(200, dtype=np.int64))
    with pytest.raises(ValueError, match="HNSW graphs don't support removal: rebuild the index"):
        dense.remove(index, np.array([1, 2], dtype=np.int64))
    with pytest.raises(ValueError, match="HNSW"):
        dense.remove(index, np.empty(0, dtype=np.int64))
    assert index.ntotal == 200
    np.testing.assert_array_equal(dense.labels(index), np.arange(200))


@pytest.mark.parametrize("kind", dense.IVF_KINDS)
def test_remove_refuses_lists_on_disk(kind, trained, vectors, tmp_path):
    path = tmp_path / "part.faiss"
    path.write_bytes(dense.to_bytes(_full(kind, trained, vectors)))
    on_disk = dense.merge_ondisk(dense.from_bytes(trained[kind], kind), [path], tmp_path / "m.ivfdata")
    before = (tmp_path / "m.ivfdata").read_bytes()
    with pytest.raises(ValueError, match="merge_ondisk"):
        dense.remove(on_disk, np.array([1, 2], dtype=np.int64))
    assert (tmp_path / "m.ivfdata").read_bytes() == before
    np.testing.assert_array_equal(dense.labels(on_disk), np.arange(N))


def test_remove_uses_ids_not_positions_in_storage(trained, vectors):
    """Ids added out of storage order: removal goes by label, never by row."""
    index = dense.from_bytes(trained["flat"], "flat")
    dense.add(index, vectors[:5], 100)
    dense.add(index, vectors[5:10], 0)
    assert dense.remove(index, np.array([0, 101], dtype=np.int64)) == 2
    np.testing.assert_array_equal(dense.labels(index), [1, 2, 3, 4, 100, 102, 103, 104])
    _, ids = dense.search(index, PARAMS["flat"], vectors[[6, 2, 5, 1]], 1)
    assert ids[:2, 0].tolist() == [1, 102]  # survivors keep their labels
    assert not np.isin(ids[2:, 0], [0, 101]).any()  # removed rows are gone
