"""Exactness, quality, merge and round-trip tests for the PLAID-style centroid index."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import re
import threading
from typing import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedding.codec import ResidualCodec
from indexing import int8, kernels, plaid
from indexing.plaid import (
    ARRAY_KEYS,
    DERIVED_KEYS,
    EXACT_GAP_QUANTILE,
    EXACT_MARGIN,
    MERGE_TOKENS,
    CentroidIndex,
    SearchParams,
    best_cells,
    build_ivf,
    maxsim,
    plaid_defaults,
)

DIM = 32
N_DOCS = 300
N_TOPICS = 40
N_CENTROIDS = 64
N_QUERIES = 12
LQ = 32
NO_PRUNING = SearchParams(ncells=N_CENTROIDS, centroid_score_threshold=-math.inf, ndocs=4 * N_DOCS,
                          exact_margin=math.inf)


@pytest.fixture(scope="module", autouse=True, params=["float32", "int8"])
def products(request) -> Iterator[str]:
    """Every test runs with each of the engine's products (``TESSERA_PLAID_PRODUCTS``: what
    ``SearchParams()`` means): numpy's float32 BLAS, and int8 through torch (where numba and
    torch are installed: int8 runs on any CPU, ``auto`` picks it only with AMX)."""
    if request.param == "int8" and not (kernels.ENABLED and int8.installed()):
        pytest.skip("int8 products need numba and torch")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(int8.ENV, request.param)
        yield request.param


@pytest.fixture
def float32_only(products) -> None:
    """A test of the float32 engine's own stages (bit-for-bit numpy answers, a query split
    over threads): int8 products neither split a query nor run numpy's stages."""
    if products != "float32":
        pytest.skip("a property of the float32 products' stages")


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus() -> dict:
    """Clustered documents (5-40 tokens around 1-3 topics each) and queries drawn from them."""
    rng = np.random.default_rng(11)
    topics = _unit(rng.normal(size=(N_TOPICS, DIM)))
    docs = []
    for _ in range(N_DOCS):
        n = int(rng.integers(5, 41))
        doc_topics = rng.choice(N_TOPICS, size=int(rng.integers(1, 4)), replace=False)
        centre = topics[rng.choice(doc_topics, size=n)]
        docs.append(_unit(centre + 0.35 * rng.normal(size=(n, DIM)) / math.sqrt(DIM) * 4))
    queries = np.zeros((N_QUERIES, LQ, DIM), dtype=np.float32)
    for i, source in enumerate(rng.choice(N_DOCS, size=N_QUERIES, replace=False)):
        n = int(rng.integers(8, LQ + 1))  # the rest stays zero padding
        rows = docs[source][rng.integers(0, len(docs[source]), n)]
        queries[i, :n] = _unit(rows + 0.2 * rng.normal(size=rows.shape) / math.sqrt(DIM) * 4)
    return {"docs": docs, "queries": queries}


@pytest.fixture(scope="module", params=[2, 4], ids=["nbits2", "nbits4"])
def codec(request, corpus) -> ResidualCodec:
    return ResidualCodec.fit(np.concatenate(corpus["docs"]), request.param, N_CENTROIDS, seed=5)


@pytest.fixture(scope="module")
def encoded(codec, corpus) -> tuple[list[np.ndarray], list[np.ndarray]]:
    pairs = [codec.compress(doc) for doc in corpus["docs"]]
    return [c for c, _ in pairs], [r for _, r in pairs]


@pytest.fixture(scope="module")
def index(codec, encoded) -> CentroidIndex:
    return CentroidIndex.build(codec, *encoded)


def _reference(codec, encoded, queries, k, dim=None, allowed=None):
    """Top-k by a plain loop over documents with :func:`maxsim`."""
    codes, residuals = encoded
    d = dim or codec.dim
    out_scores, out_ids = [], []
    for q in queries:
        q = q[:, :d]
        if d < codec.dim:
            q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)
        rows = []
        for pos, (c, r) in enumerate(zip(codes, residuals)):
            if len(c) and (allowed is None or pos in allowed):
                rows.append((-maxsim(q, codec.decompress(c, r, dim=d)), pos))
        rows.sort()
        rows = rows[:k] + [(math.inf, -1)] * (k - len(rows[:k]))
        out_scores.append([-s for s, _ in rows])
        out_ids.append([p for _, p in rows])
    return np.array(out_scores), np.array(out_ids)


def _assert_same_results(a, b):
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)


def _assert_same_index(a: CentroidIndex, b: CentroidIndex):
    for key in ARRAY_KEYS + DERIVED_KEYS:
        x, y = getattr(a, key), getattr(b, key)
        assert x.dtype == y.dtype, key
        np.testing.assert_array_equal(x, y, err_msg=key)


# -- definitions and defaults ------------------------------------------------


def test_maxsim_definition():
    Q = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    D = np.array([[0.5, 0.1], [0.2, 0.9], [-1.0, 0.0]])
    assert maxsim(Q, D) == pytest.approx(0.5 + 0.9 + 0.0)
    with pytest.raises(ValueError, match="at least one row"):
        maxsim(Q, np.zeros((0, 2)))
    with pytest.raises(ValueError, match="equal dims"):
        maxsim(Q, np.zeros((2, 3)))


@pytest.mark.parametrize(
    "k, expected",
    [
        (1, (4, 0.5, 256)),
        (10, (4, 0.5, 256)),
        (11, (4, 0.45, 1024)),
        (100, (4, 0.45, 1024)),
        (101, (4, 0.4, 4096)),
        (1024, (4, 0.4, 4096)),
        (2000, (4, 0.4, 8000)),
    ],
)
def test_plaid_defaults(k, expected):
    defaults = plaid_defaults(k)
    keys = ("ncells", "centroid_score_threshold", "ndocs")
    assert tuple(defaults[key] for key in keys) == expected
    resolved = SearchParams().resolved(k)
    assert (resolved.ncells, resolved.centroid_score_threshold, resolved.ndocs) == expected
    assert resolved.dim is None


def test_resolved_keeps_explicit_values(products):
    params = SearchParams(ncells=3, dim=16).resolved(5)
    assert params == SearchParams(ncells=3, centroid_score_threshold=0.5, ndocs=256, dim=16, exact_tokens=8192,
                                  exact_margin=EXACT_MARGIN, merge_tokens=MERGE_TOKENS,
                                  exact_gap_quantile=EXACT_GAP_QUANTILE, products=products)
    assert SearchParams(products="float32").resolved(5).products == "float32"


# -- exactness ---------------------------------------------------------------


def test_exact_maxsim_matches_loop(index, codec, encoded, corpus):
    queries = corpus["queries"][:5]
    _assert_same_results(index.exact_maxsim(queries, 10), _reference(codec, encoded, queries, 10))


def test_search_without_pruning_equals_exact(index, corpus):
    queries = corpus["queries"]
    for k in (1, 10, 50):
        _assert_same_results(index.search(queries, k, NO_PRUNING), index.exact_maxsim(queries, k))


def test_search_pads_beyond_the_collection(index, corpus):
    k = N_DOCS + 7
    scores, ids = index.search(corpus["queries"][:2], k, NO_PRUNING)
    _assert_same_results((scores, ids), index.exact_maxsim(corpus["queries"][:2], k))
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert (ids[:, N_DOCS:] == -1).all() and np.isneginf(scores[:, N_DOCS:]).all()
    assert sorted(ids[0, :N_DOCS]) == list(range(N_DOCS))


def test_default_search_recall(index, corpus):
    queries = corpus["queries"]
    _, exact = index.exact_maxsim(queries, 10)
    _, found = index.search(queries, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, found)])
    assert overlap >= 0.8, overlap


def test_default_search_scores_are_exact_maxsim(index, codec, encoded, corpus):
    """Whatever PLAID returns is scored by exact MaxSim of the decompressed document."""
    codes, residuals = encoded
    q = corpus["queries"][:3]
    scores, ids = index.search(q, 5)
    for row in range(len(q)):
        for score, pos in zip(scores[row], ids[row]):
            ref = maxsim(q[row], codec.decompress(codes[pos], residuals[pos]))
            assert score == pytest.approx(ref, abs=1e-5)
        assert np.all(np.diff(scores[row]) <= 0)


@pytest.mark.parametrize("dim", [8, 16])
def test_matryoshka_prefix_equals_exact(index, codec, encoded, corpus, dim):
    queries = corpus["queries"]
    params = dataclasses.replace(NO_PRUNING, dim=dim)
    exact = index.exact_maxsim(queries, 10, dim=dim)
    _assert_same_results(index.search(queries, 10, params), exact)
    _assert_same_results(
        index.exact_maxsim(queries[:3], 10, dim=dim),
        _reference(codec, encoded, queries[:3], 10, dim=dim),
    )
    # Queries may also arrive already truncated to the prefix.
    _assert_same_results(index.search(queries[:, :, :dim], 10, params), exact)


def test_full_dim_prefix_is_the_default(index, corpus):
    queries = corpus["queries"][:4]
    full = index.search(queries, 10, SearchParams(dim=DIM))
    _assert_same_results(full, index.search(queries, 10))


# -- the approximate stages, against plain loops ------------------------------------


def _loop_candidates(index, scores, ncells):
    cells = {int(c) for row in scores for c in np.argsort(-row, kind="stable")[:ncells]}
    docs = set()
    for c in cells:
        docs |= set(index.ivf_docs[index.ivf_offsets[c] : index.ivf_offsets[c + 1]].tolist())
    return sorted(docs)


def _loop_centroid_score(index, scores, doc, kept):
    tokens = index.codes[index.doc_offsets[doc] : index.doc_offsets[doc + 1]]
    codes = [c for c in tokens if kept[c]]
    if not codes:
        return -math.inf
    return float(sum(max(scores[i, c] for c in codes) for i in range(scores.shape[0])))


@pytest.mark.parametrize("ncells, threshold", [(1, 0.5), (2, 0.45), (4, 0.3)])
@pytest.mark.parametrize("block_cells", [None, plaid.INTERACTION_CELLS, 7], ids=["compiled", "numpy", "numpy-7"])
def test_approximate_stages_match_loops(index, corpus, ncells, threshold, block_cells, monkeypatch):
    # None: the compiled stages (indexing.kernels) where numba is there; else numpy's, in
    # blocks of block_cells (7: many blocks, and documents wider than a block, a block of one)
    if block_cells is None and not kernels.ENABLED:
        pytest.skip("numba not importable")
    if block_cells is not None:
        monkeypatch.setattr(kernels, "ENABLED", False)
        monkeypatch.setattr(plaid, "INTERACTION_CELLS", block_cells)
    q = corpus["queries"][3]
    q = q[np.any(q != 0, axis=1)]
    scores = q @ index.codec.centroids.T  # (Lq, n_centroids)
    docs = index.candidates(scores, ncells, None)
    assert docs.tolist() == _loop_candidates(index, scores, ncells)
    kept = scores.max(axis=0) >= threshold
    for mask in (kept, np.ones_like(kept)):
        expected = sorted(docs, key=lambda d: -_loop_centroid_score(index, scores, d, mask))[:20]
        found = index.centroid_filter(docs, scores, mask if mask is kept else None, 20)
        assert sorted(found.tolist()) == sorted(expected)


# -- filtering -----------------------------------------------------------------


def test_allowed_restricts_results(index, codec, encoded, corpus):
    rng = np.random.default_rng(0)
    allowed = np.sort(rng.choice(N_DOCS, size=60, replace=False))
    queries = corpus["queries"]
    exact = index.exact_maxsim(queries, 10, allowed=allowed)
    assert np.isin(exact[1], allowed).all()
    _assert_same_results(
        index.exact_maxsim(queries[:2], 10, allowed=allowed),
        _reference(codec, encoded, queries[:2], 10, allowed=set(allowed.tolist())),
    )
    _assert_same_results(index.search(queries, 10, NO_PRUNING, allowed=allowed), exact)
    _, ids = index.search(queries, 10, allowed=allowed)
    assert np.isin(ids[ids >= 0], allowed).all()


def test_allowed_empty_and_tiny(index, corpus):
    queries = corpus["queries"][:2]
    scores, ids = index.search(queries, 5, allowed=np.array([], dtype=np.int64))
    assert (ids == -1).all() and np.isneginf(scores).all()
    _, ids = index.search(queries, 5, NO_PRUNING, allowed=np.array([7, 3]))
    assert sorted(ids[0, :2]) == [3, 7] and (ids[:, 2:] == -1).all()


# -- construction ------------------------------------------------------------


def test_ivf_lists_are_documents_per_centroid(index, encoded):
    codes, _ = encoded
    for cell in range(N_CENTROIDS):
        expected = [pos for pos, c in enumerate(codes) if np.any(c == cell)]
        listed = index.ivf_docs[index.ivf_offsets[cell] : index.ivf_offsets[cell + 1]]
        assert listed.tolist() == expected
    assert index.ivf_docs.dtype == np.int32 and index.ivf_offsets.dtype == np.int64
    assert index.doc_offsets.dtype == np.int64 and index.codes.dtype == index.codec.code_dtype


def test_sizes(index, encoded):
    codes, residuals = encoded
    assert index.n_docs == N_DOCS
    assert index.n_tokens == sum(len(c) for c in codes)
    assert index.nbytes() == sum(a.nbytes for a in index.to_arrays().values())
    assert index.nbytes() >= index.n_tokens * index.codec.bytes_per_token()


def test_from_parts_equals_build(index, codec, encoded, corpus):
    codes, residuals = encoded
    cuts = [0, 97, 97, 210, N_DOCS]  # one empty part on purpose
    parts = [
        CentroidIndex.build(codec, codes[a:b], residuals[a:b]) for a, b in zip(cuts, cuts[1:])
    ]
    merged = CentroidIndex.from_parts(codec, parts)
    _assert_same_index(merged, index)
    queries = corpus["queries"][:4]
    _assert_same_results(merged.search(queries, 10), index.search(queries, 10))


def test_from_flat_equals_build(index, codec, encoded):
    codes, residuals = encoded
    flat = CentroidIndex.from_flat(
        codec, np.concatenate(codes), np.concatenate(residuals), [len(c) for c in codes]
    )
    _assert_same_index(flat, index)


def test_append_equals_build(index, codec, encoded, corpus):
    codes, residuals = encoded
    first = CentroidIndex.build(codec, codes[:180], residuals[:180])
    grown = first.append(codes[180:], residuals[180:])
    assert first.n_docs == 180  # unchanged
    _assert_same_index(grown, index)
    queries = corpus["queries"]
    _assert_same_results(grown.search(queries, 10), index.search(queries, 10))
    _assert_same_results(grown.exact_maxsim(queries, 10), index.exact_maxsim(queries, 10))


def test_arrays_round_trip(index, codec, corpus, tmp_path):
    for key, array in index.to_arrays().items():
        np.save(tmp_path / f"{key}.npy", array, allow_pickle=False)
    arrays = {key: np.load(tmp_path / f"{key}.npy", allow_pickle=False) for key in ARRAY_KEYS}
    loaded = CentroidIndex.from_arrays(ResidualCodec.from_bytes(codec.to_bytes()), arrays)
    _assert_same_index(loaded, index)
    queries = corpus["queries"][:4]
    _assert_same_results(loaded.search(queries, 10), index.search(queries, 10))


def test_from_arrays_rejects_bad_arrays(index, codec):
    arrays = index.to_arrays()
    with pytest.raises(ValueError, match="missing"):
        CentroidIndex.from_arrays(codec, {k: v for k, v in arrays.items() if k != "codes"})
    bad = dict(arrays, ivf_docs=np.where(arrays["ivf_docs"] == 0, N_DOCS, arrays["ivf_docs"]))
    with pytest.raises(ValueError, match="ivf_docs"):
        CentroidIndex.from_arrays(codec, bad)
    unsorted = dict(arrays, ivf_docs=arrays["ivf_docs"][::-1].copy())
    with pytest.raises(ValueError, match="sorted"):
        CentroidIndex.from_arrays(codec, unsorted)
    with pytest.raises(ValueError, match="doc_offsets"):
        CentroidIndex.from_arrays(codec, dict(arrays, doc_offsets=arrays["doc_offsets"][:-1]))
    with pytest.raises(ValueError, match="residuals"):
        CentroidIndex.from_arrays(codec, dict(arrays, residuals=arrays["residuals"][:, :-1]))


def test_arrays_are_read_only(index):
    with pytest.raises(ValueError):
        index.codes[0] = 1


# -- empty documents -----------------------------------------------------------


def test_documents_without_tokens(codec, encoded, corpus):
    codes, residuals = encoded
    empty_c = np.empty(0, dtype=codec.code_dtype)
    empty_r = np.empty((0, codec.residual_bytes), dtype=np.uint8)
    c = [empty_c, codes[0], empty_c, codes[1], codes[2], empty_c]
    r = [empty_r, residuals[0], empty_r, residuals[1], residuals[2], empty_r]
    small = CentroidIndex.build(codec, c, r)
    assert small.n_docs == 6 and small.doc_lengths[[0, 2, 5]].tolist() == [0, 0, 0]
    queries = corpus["queries"][:3]
    # Default parameters may find fewer candidates, never an empty document.
    assert set(small.search(queries, 5)[1].ravel()) <= {1, 3, 4, -1}
    for scores, ids in (small.search(queries, 5, NO_PRUNING), small.exact_maxsim(queries, 5)):
        assert set(ids[:, :3].ravel()) <= {1, 3, 4}
        assert (ids[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    _assert_same_results(small.search(queries, 5, NO_PRUNING), small.exact_maxsim(queries, 5))
    # An all-padding query scores 0 everywhere; still no empty document.
    zero = np.zeros((1, LQ, DIM), dtype=np.float32)
    for scores, ids in (small.search(zero, 4), small.exact_maxsim(zero, 4)):
        assert ids[0].tolist() == [1, 3, 4, -1] and scores[0, :3].tolist() == [0, 0, 0]
    # Only empty documents, and no documents at all.
    only_empty_docs = CentroidIndex.build(codec, [empty_c], [empty_r])
    for only_empty in (only_empty_docs, CentroidIndex.build(codec, [], [])):
        scores, ids = only_empty.search(queries, 3)
        assert (ids == -1).all() and np.isneginf(scores).all()
        assert (only_empty.exact_maxsim(queries, 3)[1] == -1).all()


def test_no_queries(index):
    scores, ids = index.search(np.zeros((0, LQ, DIM), dtype=np.float32), 4)
    assert scores.shape == (0, 4) and ids.shape == (0, 4)


# -- validation -------------------------------------------------------------------


def test_validation_errors(index, codec, encoded, corpus):
    queries = corpus["queries"][:2]
    with pytest.raises(ValueError, match="dim must be an integer in 1..32"):
        index.search(queries, 10, SearchParams(dim=DIM + 1))
    with pytest.raises(ValueError, match="dim must be an integer in 1..32"):
        index.exact_maxsim(queries, 10, dim=DIM + 1)
    for k in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="k must be"):
            index.search(queries, k)
        with pytest.raises(ValueError, match="k must be"):
            index.exact_maxsim(queries, k)
    with pytest.raises(ValueError, match="Q has dim 31"):
        index.search(queries[:, :, :31], 10)
    with pytest.raises(ValueError, match="Q has dim 16"):
        index.exact_maxsim(queries[:, :, :16], 10, dim=8)
    with pytest.raises(ValueError, match="3-D"):
        index.search(queries[0], 10)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full_like(queries, np.nan), 10)
    with pytest.raises(ValueError, match="allowed"):
        index.search(queries, 10, allowed=np.array([N_DOCS]))
    with pytest.raises(ValueError, match="allowed"):
        index.search(queries, 10, allowed=np.array([0.5]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ncells": 0}, "ncells"),
        ({"ndocs": -1}, "ndocs"),
        ({"dim": 0}, "dim"),
        ({"ncells": 1.5}, "ncells"),
        ({"centroid_score_threshold": float("nan")}, "centroid_score_threshold"),
        ({"centroid_score_threshold": "high"}, "centroid_score_threshold"),
        ({"exact_margin": -0.1}, "exact_margin"),
        ({"exact_margin": float("nan")}, "exact_margin"),
        ({"exact_margin": True}, "exact_margin"),
        ({"exact_gap_quantile": 0}, "exact_gap_quantile"),
        ({"exact_gap_quantile": 1.01}, "exact_gap_quantile"),
        ({"exact_gap_quantile": float("nan")}, "exact_gap_quantile"),
        ({"exact_gap_quantile": True}, "exact_gap_quantile"),
        ({"merge_tokens": float("nan")}, "merge_tokens"),
        ({"merge_tokens": "0.99"}, "merge_tokens"),
    ],
)
def test_search_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SearchParams(**kwargs)


def test_build_validation(codec, encoded):
    codes, residuals = encoded
    with pytest.raises(ValueError, match="one entry per document"):
        CentroidIndex.build(codec, codes[:3], residuals[:2])
    with pytest.raises(ValueError, match=r"residuals\[1\]"):
        CentroidIndex.build(codec, codes[:2], [residuals[0], residuals[1][:, :-1]])
    with pytest.raises(ValueError, match=r"codes\[0\] must lie"):
        CentroidIndex.build(codec, [np.array([N_CENTROIDS])], [residuals[0][:1]])
    with pytest.raises(ValueError, match="doc_lengths sum"):
        CentroidIndex.from_flat(codec, codes[0], residuals[0], [len(codes[0]) + 1])
    other = ResidualCodec(
        codec.centroids[::-1].copy(), codec.nbits, codec.bucket_cutoffs, codec.bucket_weights,
        codec.avg_residual,
    )
    part = CentroidIndex.build(codec, codes[:2], residuals[:2])
    with pytest.raises(ValueError, match="different codec"):
        CentroidIndex.from_parts(other, [part])


# -- properties of the inverted file ---------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 6), min_size=0, max_size=12),
    n_centroids=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_build_ivf_invariants(lengths, n_centroids, seed):
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    codes = rng.integers(0, n_centroids, offsets[-1]).astype(np.uint8)
    ivf_offsets, ivf_docs = build_ivf(codes, offsets, n_centroids)
    assert ivf_offsets.shape == (n_centroids + 1,) and ivf_offsets[-1] == len(ivf_docs)
    for cell in range(n_centroids):
        listed = ivf_docs[ivf_offsets[cell] : ivf_offsets[cell + 1]].tolist()
        expected = [
            d for d in range(len(lengths)) if np.any(codes[offsets[d] : offsets[d + 1]] == cell)
        ]
        assert listed == expected


def test_a_narrow_filter_still_returns_k_results(index, corpus):
    """With ncells=1 the best cells may hold no allowed document: the probe widens instead."""
    queries = corpus["queries"][:4]
    allowed = np.array([11, 42, 97, 150, 201, 260], dtype=np.int64)
    _, ids = index.search(queries, 5, SearchParams(ncells=1, centroid_score_threshold=0.5, ndocs=256),
                          allowed=allowed)
    assert (ids >= 0).all() and np.isin(ids, allowed).all()


def test_a_filter_widens_the_probe_to_the_exact_stage_size(index, corpus, monkeypatch, float32_only):
    """Under a filter the probe widens until it holds ``max(k, ndocs // 4)`` allowed documents
    (or all of them): the exact stage then sees the allowed documents nearest each query."""
    queries = corpus["queries"]
    allowed = np.arange(0, N_DOCS, 5, dtype=np.int64)  # 60 documents
    params = SearchParams(ncells=1, centroid_score_threshold=0.5, ndocs=128)
    compiled = index.search(queries, 5, params, allowed=allowed)  # indexing.kernels' first probe, where enabled
    seen = []
    original = CentroidIndex.candidates

    def spy(self, scores, ncells, mask):
        docs = original(self, scores, ncells, mask)
        seen.append((ncells, len(docs)))
        return docs

    monkeypatch.setattr(kernels, "ENABLED", False)  # numpy's stages: every probe through candidates
    monkeypatch.setattr(CentroidIndex, "candidates", spy)
    scores, ids = index.search(queries, 5, params, allowed=allowed)
    monkeypatch.undo()
    np.testing.assert_array_equal(compiled[1], ids)
    np.testing.assert_array_equal(compiled[0], scores)
    assert np.isin(ids, allowed).all()
    finals, n, prev = [], 0, None
    for ncells, got in seen:  # one probe series per query: ncells restarts at 1
        if ncells == 1 and n:
            finals.append(prev)
        prev, n = (ncells, got), n + 1
    finals.append(prev)
    assert len(finals) == len(queries)
    assert all(got >= 32 or ncells >= N_CENTROIDS for ncells, got in finals)
    assert any(ncells > 1 for ncells, _ in finals)
    _, ref_ids = index.exact_maxsim(queries, 5, allowed=allowed)
    agreement = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids.tolist(), ref_ids.tolist())])
    assert agreement >= 0.9, agreement


# -- derived arrays, trusted loading, threads -------------------------------------------


def test_derived_arrays_match_their_definitions(index):
    for doc in range(0, index.n_docs, 7):
        tokens = index.codes[index.doc_offsets[doc] : index.doc_offsets[doc + 1]]
        cells = index.doc_cells[index.doc_cell_offsets[doc] : index.doc_cell_offsets[doc + 1]]
        assert cells.tolist() == sorted(set(tokens.tolist()))
    vectors = index.codec.decompress(index.codes, index.residuals, normalize=False)
    np.testing.assert_allclose(index.token_inv_norms, 1 / np.linalg.norm(vectors, axis=1), rtol=1e-6)


def test_arrays_without_derived_keys_load_to_the_same_index(index, corpus):
    primary = {key: np.array(index.to_arrays()[key]) for key in ARRAY_KEYS}
    loaded = CentroidIndex.from_arrays(index.codec, primary)
    for key in ARRAY_KEYS + DERIVED_KEYS:
        np.testing.assert_array_equal(getattr(loaded, key), getattr(index, key))
    queries = corpus["queries"][:4]
    _assert_same_results(loaded.search(queries, 10), index.search(queries, 10))


def test_trusted_load_checks_shapes_and_checked_load_checks_contents(index):
    arrays = {key: np.array(value) for key, value in index.to_arrays().items()}
    trusted = CentroidIndex.from_arrays(index.codec, arrays, check=False)
    assert trusted.n_tokens == index.n_tokens
    with pytest.raises(ValueError, match="token_inv_norms"):
        CentroidIndex.from_arrays(index.codec, dict(arrays, token_inv_norms=arrays["token_inv_norms"][:-1]),
                                  check=False)
    with pytest.raises(ValueError, match="residuals"):
        CentroidIndex.from_arrays(index.codec, dict(arrays, residuals=arrays["residuals"][:, :-1]), check=False)
    shuffled = arrays["doc_cells"].copy()
    shuffled[:2] = shuffled[1::-1]
    with pytest.raises(ValueError, match="do not match the inverted file"):
        CentroidIndex.from_arrays(index.codec, dict(arrays, doc_cells=shuffled))
    with pytest.raises(ValueError, match="do not match the codes"):
        CentroidIndex.from_arrays(index.codec, dict(arrays, token_inv_norms=arrays["token_inv_norms"] * 2))


def test_memory_mapped_arrays_search_like_in_memory_ones(index, corpus, tmp_path):
    for key, array in index.to_arrays().items():
        np.save(tmp_path / f"{key}.npy", array, allow_pickle=False)
    arrays = {key: np.load(tmp_path / f"{key}.npy", mmap_mode="r") for key in ARRAY_KEYS + DERIVED_KEYS}
    mapped = CentroidIndex.from_arrays(index.codec, arrays, check=False)
    assert isinstance(mapped.residuals.base, np.memmap) or isinstance(mapped.residuals, np.memmap)
    queries = corpus["queries"]
    _assert_same_results(mapped.search(queries, 10), index.search(queries, 10))


@pytest.mark.skipif(not kernels.ENABLED, reason="numba not importable")
@pytest.mark.parametrize("params", [SearchParams(), NO_PRUNING,
                                    SearchParams(ncells=2, centroid_score_threshold=0.6, ndocs=40, exact_tokens=100)],
                         ids=["defaults", "no-pruning", "centroid-stages"])
def test_compiled_stages_give_numpy_results_bit_for_bit(index, corpus, params, monkeypatch, float32_only):
    queries = corpus["queries"]
    allowed = np.arange(0, N_DOCS, 3)
    calls = {"cell_maxsum_docs": 0, "token_maxsum": 0, "probe_documents": 0}

    def counted(name):
        original = getattr(kernels, name)

        def run(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return run

    for name in calls:
        monkeypatch.setattr(kernels, name, counted(name))

    def searches():
        return [index.search(queries, 10, params), index.search(queries[:4], 10, params, threads=2),
                index.search(queries[4:8], 10, params, allowed=allowed),
                index.search(queries[8:], 10, dataclasses.replace(params, dim=16))]  # a Matryoshka prefix

    compiled = searches()
    assert calls["token_maxsum"] > 0
    assert (calls["probe_documents"] > 0) == (params.resolved(10).ncells < N_CENTROIDS)  # every cell probed: numpy's
    if params.exact_tokens == 100:  # this index's candidates outnumber the exact stage's only here
        assert calls["cell_maxsum_docs"] > 0
    monkeypatch.setattr(kernels, "ENABLED", False)
    for name in calls:
        calls[name] = 0
    for (scores, ids), (want_scores, want_ids) in zip(compiled, searches()):
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(scores, want_scores)  # the same floats, not close ones
    assert calls == {"cell_maxsum_docs": 0, "token_maxsum": 0, "probe_documents": 0}  # numpy's stages ran


def test_batched_threaded_and_single_searches_agree(index, corpus):
    queries = corpus["queries"]
    single = [index.search(q[None], 10) for q in queries]
    expected = (np.concatenate([s for s, _ in single]), np.concatenate([i for _, i in single]))
    _assert_same_results(index.search(queries, 10), expected)
    _assert_same_results(index.search(queries, 10, threads=2), expected)
    _assert_same_results(index.search(queries, 10, threads=1), expected)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            index.search(queries, 10, threads=bad)


@pytest.fixture
def split_small(monkeypatch):
    """Split thresholds low enough that the test index's single queries do split, and the
    names of the threads that ran each split stage."""
    monkeypatch.setattr(plaid, "SPLIT_MIN_TOKENS", 16)
    monkeypatch.setattr(plaid, "INTERACTION_CELLS", 32)  # several blocks of the centroid stages
    seen: dict[str, set] = {}

    def spy(name):
        original = vars(CentroidIndex)[name]

        def run(self, *args):
            seen.setdefault(name, set()).add(threading.current_thread().name.split("-")[0].split("_")[0])
            return original(self, *args)
        return run

    for name in ("_exact_block", "_interaction_scores"):
        monkeypatch.setattr(CentroidIndex, name, spy(name))
    return seen


@pytest.mark.parametrize("params", [SearchParams(), SearchParams(ndocs=40, exact_tokens=100, ncells=2,
                                                                 centroid_score_threshold=0.6)],
                         ids=["defaults", "centroid-stages"])
def test_a_single_query_split_over_threads_gives_the_one_thread_results(index, corpus, split_small, params,
                                                                       float32_only):
    queries = corpus["queries"]
    expected = [index.search(q[None], 10, params, threads=1) for q in queries]
    split_small.clear()
    for q, (scores, ids) in zip(queries, expected):
        got_scores, got_ids = index.search(q[None], 10, params, threads=2)
        # the same blocks in each thread: bit for bit the one-thread scores
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_scores, scores)
    if params.ndocs is None:  # every document reaches the exact stage: it ran in both threads
        assert split_small["_exact_block"] == {"MainThread", "plaid"}
    else:  # the centroid stages (several blocks) ran whole in this thread
        assert split_small["_interaction_scores"] == {"MainThread"}
    # a batch still goes query by query over the threads, each query whole
    split_small.clear()
    _assert_same_results(index.search(queries, 10, params, threads=2),
                         (np.concatenate([s for s, _ in expected]), np.concatenate([i for _, i in expected])))


def test_a_split_centroid_product_scores_as_the_whole(index, corpus, monkeypatch, float32_only):
    # parts of 8 of the 64 centroids (real parts are >= 1,024 rows, whose products are bit
    # for bit the whole one's; parts this small may take another BLAS kernel and round apart)
    monkeypatch.setattr(plaid, "SPLIT_MIN_CENTROIDS", 8)
    for q in corpus["queries"]:
        _assert_same_results(index.search(q[None], 10, threads=2), index.search(q[None], 10, threads=1))


def test_a_failing_part_of_a_split_query_fails_the_search(index, corpus, split_small, monkeypatch, float32_only):
    original = vars(CentroidIndex)["_exact_block"]

    def fail_in_pool(self, *args):
        if threading.current_thread().name.startswith("plaid"):
            raise MemoryError("part failed")
        return original(self, *args)

    monkeypatch.setattr(CentroidIndex, "_exact_block", fail_in_pool)
    with pytest.raises(MemoryError, match="part failed"):
        index.search(corpus["queries"][:1], 10, threads=2)
    # nothing of the failed query still runs: the next search is whole
    monkeypatch.undo()
    np.testing.assert_array_equal(index.search(corpus["queries"][:1], 10, threads=2)[1],
                                  index.search(corpus["queries"][:1], 10, threads=1)[1])


def _search_in_child(index, q, conn):
    conn.send(index.search(q, 10, threads=2)[1])
    conn.close()


def test_a_forked_child_splits_queries_with_pools_of_its_own(index, corpus):
    import multiprocessing

    q = corpus["queries"][:1]
    expected = index.search(q, 10, threads=2)[1]  # the parent's pool exists now
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_search_in_child, args=(index, q, child))
    proc.start()
    try:
        assert parent.poll(60), "the child's split search hung"
        np.testing.assert_array_equal(parent.recv(), expected)
        proc.join(10)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()


def test_best_cells_equal_a_full_partition(index, corpus):
    for q in corpus["queries"]:
        scores = q @ index.codec.centroids.T
        for ncells in (1, 2, 4, 16, N_CENTROIDS - 1):
            got = np.sort(best_cells(scores, ncells), axis=1)
            full = np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :ncells], axis=1)
            # equal score sets (ties may pick other cells of the same score)
            np.testing.assert_array_equal(np.take_along_axis(scores, got, 1).round(6),
                                          np.take_along_axis(scores, full, 1).round(6))


def test_one_stage_when_pruning_drops_nothing_gives_the_two_stage_result(index, corpus, monkeypatch):
    queries = corpus["queries"]
    params = SearchParams(ncells=2, centroid_score_threshold=-1.0, ndocs=64, exact_tokens=1)
    one_stage = index.search(queries, 10, params)
    calls = []
    monkeypatch.setattr(CentroidIndex, "_prunes_nothing",
                        lambda self, docs, kept, n_kept=None: calls.append(1) and False)
    _assert_same_results(index.search(queries, 10, params), one_stage)
    assert len(calls) == len(queries)


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.9])
def test_full_stage_rescores_only_documents_that_lost_a_cell(index, corpus, monkeypatch, quantile):
    """After the pruned stage, a document none of whose cells was pruned keeps its score (it is
    already the full interaction): the results equal those of rescoring every document."""
    queries = corpus["queries"]
    maxes = np.concatenate([(q[np.any(q != 0, axis=1)] @ index.codec.centroids.T).max(axis=0) for q in queries])
    params = SearchParams(ncells=4, centroid_score_threshold=float(np.quantile(maxes, quantile)), ndocs=48,
                          exact_tokens=1, exact_margin=0.0)
    reused = index.search(queries, 5, params)
    seen = []

    def by_loop(self, docs, kept):  # the definition: a token of the document has a pruned centroid
        flags = [not all(kept[c] for c in self.codes[self.doc_offsets[d]:self.doc_offsets[d + 1]]) for d in docs]
        seen.append((sum(flags), len(docs)))
        return np.array(flags, dtype=bool)

    monkeypatch.setattr(CentroidIndex, "_pruned_any", by_loop)
    _assert_same_results(index.search(queries, 5, params), reused)
    assert seen and sum(n for _, n in seen) > sum(r for r, _ in seen) > 0, seen  # some reused, some rescored
    monkeypatch.setattr(CentroidIndex, "_full_stage", lambda self, docs, pruned, scores, kept, n, table=None:
                        self._filter_scored(docs, scores, None, n, table))
    _assert_same_results(index.search(queries, 5, params), reused)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_streamed_parts_write_the_same_files_as_from_parts(index, codec, encoded, tmp_path, monkeypatch,
                                                            request, where):
    """write_plaid_parts streams shards into the version files without a merged array:
    the files must hold exactly the arrays (and bytes) np.save writes for from_parts."""
    from indexing import index_files
    from storage.fs import Location

    codes, residuals = encoded
    cuts = [0, 97, 97, 210, N_DOCS]  # one empty part on purpose
    parts = [CentroidIndex.build(codec, codes[a:b], residuals[a:b]).to_arrays() for a, b in zip(cuts, cuts[1:])]
    # tiny blocks and chunks: every part and the inverted lists are written in many pieces
    monkeypatch.setattr(index_files, "_IVF_BLOCK", 7)
    monkeypatch.setattr(index_files, "_CHUNK_BYTES", 100)
    base = Location(request.getfixturevalue("s3_bucket") + "/v1") if where == "s3" else Location(str(tmp_path))
    entries = index_files.write_plaid_parts(parts, base)
    expected = index.to_arrays()
    assert sorted(e["path"] for e in entries) == sorted(f"plaid/{k}.npy" for k in expected)
    for e in entries:
        key = e["path"].removeprefix("plaid/").removesuffix(".npy")
        data = base.join(e["path"]).read_bytes()
        buf = io.BytesIO()
        np.save(buf, expected[key], allow_pickle=False)
        assert data == buf.getvalue(), key
        assert e["bytes"] == len(data) and e["rows"] == len(expected[key])
        assert e["sha256"] == hashlib.sha256(data).hexdigest()


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def plaid_messages(monkeypatch) -> Iterator[_Messages]:
    """The plaid logger's debug lines, read by a handler of its own (in the full suite
    something earlier leaves that logger disabled, which caplog does not undo)."""
    plaid_logger = logging.getLogger("indexing.plaid")
    monkeypatch.setattr(plaid_logger, "disabled", False)
    monkeypatch.setattr(logging.root.manager, "disable", logging.NOTSET)
    handler = _Messages()
    monkeypatch.setattr(plaid_logger, "handlers", [*plaid_logger.handlers, handler])  # put back after the test
    level = plaid_logger.level
    plaid_logger.setLevel(logging.DEBUG)  # setLevel also clears the loggers' isEnabledFor caches
    try:
        yield handler
    finally:
        plaid_logger.setLevel(level)


def test_early_termination_scores_fewer_documents_for_the_same_top_k(index, corpus, plaid_messages):
    """The exact stage stops early where the best centroid-scored documents already hold a top-k
    no later one is likely to reach; exact_margin=inf scores every one of them."""
    def search_counting(params):
        plaid_messages.messages.clear()
        out = index.search(corpus["queries"], 5, params)
        counts = [re.search(r"exact stage(?: \(int8\))?: (\d+) of (\d+) documents scored", m)
                  for m in plaid_messages.messages]
        counts = [tuple(map(int, m.groups())) for m in counts if m]
        assert len(counts) == N_QUERIES
        return out, sum(c[0] for c in counts), sum(c[1] for c in counts)

    wide = {"ncells": 8, "ndocs": 256, "exact_tokens": 1}   # 64 exact documents a query: room to stop early
    early, n_early, n_candidates = search_counting(SearchParams(**wide, exact_margin=0.0))   # the tightest bound
    full, n_full, _ = search_counting(SearchParams(**wide, exact_margin=math.inf))
    assert n_full == n_candidates == N_QUERIES * 64
    assert n_early < n_full, (n_early, n_full)
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(early[1], full[1])])
    assert overlap >= 0.98, overlap
    # A margin too wide to stop anywhere scores everything: the same results as inf.
    _assert_same_results(search_counting(SearchParams(**wide, exact_margin=1e9))[0], full)
    # exact_gap_quantile: 1 is the largest gap (the default's results, the same documents
    # scored); lower quantiles allow the later documents less, so fewer are scored, and the
    # smallest gap scores the fewest; whatever is scored still ranks by exact MaxSim
    largest, n_largest, _ = search_counting(SearchParams(**wide, exact_margin=0.0, exact_gap_quantile=1))
    _assert_same_results(largest, early)
    assert n_largest == n_early
    counts = [search_counting(SearchParams(**wide, exact_margin=0.0, exact_gap_quantile=g))[1] for g in (0.5, 0.01)]
    assert n_early >= counts[0] >= counts[1], (n_early, counts)
    assert counts[1] < n_early, (n_early, counts)
    smallest, _, _ = search_counting(SearchParams(**wide, exact_margin=0.0, exact_gap_quantile=0.01))
    exact = index.exact_maxsim(corpus["queries"], 5)
    for q, (scores, ids) in enumerate(zip(*smallest)):
        row = {int(i): float(s) for i, s in zip(exact[1][q], exact[0][q])}
        hits = [(int(i), float(s)) for i, s in zip(ids, scores) if int(i) in row]
        assert all(s == pytest.approx(row[i], abs=1e-5) for i, s in hits)


# -- merged query tokens ---------------------------------------------------------


def test_merge_tokens_drops_padding_and_weights_near_copies():
    from indexing.plaid import merge_query_tokens

    a, b = _unit(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    near_a = _unit(np.array([1.0, 0.01, 0.0]))                     # cosine 0.99995 with a
    q = np.stack([a, np.zeros(3, np.float32), b, near_a, a, np.zeros(3, np.float32)])
    np.testing.assert_array_equal(merge_query_tokens(q, math.inf), np.stack([a, b, near_a, a]))  # padding only
    np.testing.assert_allclose(merge_query_tokens(q, 0.9999), np.stack([2 * a + near_a, b]))  # the group's sum
    np.testing.assert_array_equal(merge_query_tokens(q, 1.0), np.stack([2 * a, b, near_a]))  # exact copies only
    np.testing.assert_array_equal(merge_query_tokens(np.stack([near_a, b]), 1.5), np.stack([near_a, b]))  # none
    assert merge_query_tokens(np.zeros((4, 3), np.float32), 0.9).shape == (0, 3)   # all padding: no row
    # a group is the rows close to its first row, not a chain: c is near b, not near a
    c = _unit(np.array([1.0, 0.3, 0.0]))
    b2 = _unit(np.array([1.0, 0.15, 0.0]))
    merged = merge_query_tokens(np.stack([a, b2, c]), 0.985)             # a.b2 0.989, b2.c 0.989, a.c 0.958
    np.testing.assert_allclose(merged, np.stack([a + b2, c]))


def test_merged_duplicate_tokens_give_the_unmerged_results(index, corpus):
    """A query token repeated is one row, its double: the same MaxSim, the same ranking."""
    queries = corpus["queries"].copy()
    n = int(np.count_nonzero(np.any(queries[0] != 0, axis=1)))
    doubled = np.zeros((len(queries), 2 * LQ, DIM), np.float32)
    doubled[:, :LQ] = queries
    doubled[:, LQ:] = queries                                   # every token twice
    plain = index.search(doubled, 10, dataclasses.replace(NO_PRUNING, merge_tokens=math.inf))
    merged = index.search(doubled, 10, dataclasses.replace(NO_PRUNING, merge_tokens=0.9999))
    np.testing.assert_array_equal(plain[1], merged[1])
    np.testing.assert_allclose(plain[0], merged[0], rtol=1e-5)
    np.testing.assert_allclose(plain[0][:, 0], 2 * index.search(queries, 10, NO_PRUNING)[0][:, 0], rtol=1e-5)
    assert n >= 8


def test_merged_tokens_approximate_maxsim_at_the_defaults(index, corpus):
    """Merging near copies (cosine >= 0.95 here, far looser than the default) keeps the
    ranking close to exact MaxSim's over all the tokens."""
    queries = corpus["queries"]
    exact = index.exact_maxsim(queries, 10)[1]
    merged = index.search(queries, 10, SearchParams(merge_tokens=0.95))[1]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, merged)])
    assert overlap >= 0.9


# -- query rows padded for BLAS --------------------------------------------------


def test_padded_rows_rounds_the_remainder_up_to_a_power_of_two():
    from indexing.plaid import padded_rows

    assert [padded_rows(n, 16) for n in range(0, 18)] == [0, 1, 2, 4, 4, 8, 8, 8, 8] + [16] * 8 + [17]
    assert [padded_rows(n, 16) for n in (18, 19, 21, 24, 25, 31, 32, 35)] == [18, 20, 24, 24, 32, 32, 32, 36]
    assert [padded_rows(n, 8) for n in (3, 5, 8, 9, 11, 13)] == [4, 8, 8, 9, 12, 16]


@pytest.mark.parametrize("threads", [None, 2])
def test_zero_rows_padded_for_blas_change_no_result(index, corpus, monkeypatch, plaid_messages, threads, products):
    """The engine pads every query's rows with zero rows up to a width BLAS multiplies
    fastest: the same candidates and stages, the same documents in the same order with
    the same scores as unpadded, whatever the number of live rows (a batch and single
    queries)."""
    import indexing.plaid as plaid

    queries = np.repeat(corpus["queries"][:4], 8, axis=0)
    for i in range(len(queries)):
        queries[i, 1 + 3 * i % LQ :] = 0              # 1 to 32 live rows (at most the query's own)

    def search(params):
        plaid_messages.messages.clear()
        out = index.search(queries, 10, params, threads=threads)
        return out, sorted(plaid_messages.messages)  # candidates, stages, documents scored

    wide = dataclasses.replace(NO_PRUNING, merge_tokens=math.inf, ndocs=32)
    for params in (SearchParams(ncells=1, ndocs=16, exact_tokens=1), wide):
        (padded, padded_log), singles = search(params), [index.search(q[None], 10, params) for q in queries]
        with monkeypatch.context() as patch:
            patch.setattr(plaid, "padded_rows", lambda n, block=16: n)
            plain, plain_log = search(params)
        # (two lines a query, candidates and the exact stage; int8's a third, the documents rescored)
        assert padded_log == plain_log and len(plain_log) == (2 if products == "float32" else 3) * len(queries)
        np.testing.assert_array_equal(padded[1], plain[1])
        np.testing.assert_allclose(padded[0], plain[0], rtol=1e-6)
        np.testing.assert_array_equal(np.concatenate([s[1] for s in singles]), plain[1])


def test_centroid_pruning_compares_a_merged_rows_cosine(index, corpus, plaid_messages):
    """Centroid pruning keeps a centroid whose cosine with some query row reaches the
    threshold. A merged row is its group's sum: its scores are compared with the threshold
    times its norm, so a query whose every token is doubled keeps the centroids the plain query keeps (not
    every centroid its doubled scores would pass)."""
    queries = corpus["queries"].copy()
    doubled = np.concatenate([queries, queries], axis=1)        # every token twice: merged into one row each

    def kept(q, merge):
        plaid_messages.messages.clear()
        index.search(q, 10, SearchParams(centroid_score_threshold=0.4, merge_tokens=merge))
        found = [re.search(r"(\d+)/(\d+) centroids kept", m) for m in plaid_messages.messages]
        return [int(m.group(1)) for m in found if m]

    plain = kept(queries, math.inf)
    assert kept(doubled, 0.9999) == plain and len(plain) == N_QUERIES
    assert sum(plain) > 0 and max(plain) < N_CENTROIDS          # the threshold prunes something here


def test_the_centroid_stage_ranks_a_document_without_tokens_last(codec, encoded, corpus):
    codes, residuals = encoded
    empty_codes, empty_residuals = codes[0][:0], residuals[0][:0]
    index = CentroidIndex.build(codec, [empty_codes, *codes[:5], empty_codes],
                                [empty_residuals, *residuals[:5], empty_residuals])
    q = corpus["queries"][0]
    scores = q[np.any(q != 0, axis=1)] @ codec.centroids.T
    for kept in (None, scores.max(axis=0) >= -1.0):
        assert sorted(index.centroid_filter(np.arange(7), scores, kept, 5).tolist()) == [1, 2, 3, 4, 5]


@pytest.mark.skipif(not kernels.ENABLED, reason="numba not importable")
def test_warm_loads_every_stage_a_search_then_uses(index, corpus, products):
    # warm() searches twice (padded rows and not); later queries of any width, batched, split
    # over threads or filtered, need no other compiled variant (none loaded or compiled then)
    assert index.warm() > 0
    loaded = kernels.loaded_variants()
    used = {"probe_documents", "cell_maxsum", "merge_rows", "cell_documents", "token_maxsum", "top_k"} | (
        # (float32 decodes: one word a byte at 4 bits, else a byte's words copied)
        {"ranges", "decode_words" if index.codec.nbits == 4 else "decode"} if products == "float32"
        else {"decode_words", "exact_layout", "early_rest", "refine_int8"})
    assert {name for name, n in loaded.items() if n} >= used
    queries = corpus["queries"]
    widths = [1, 2, 3, 5, 13, 16, 17, 19, 24, 32]
    for width in widths:
        index.search(queries[:1, :width], 10)
        index.search(np.repeat(queries[2:3, :1], width, axis=1), 10)  # every row merged into one
        index.search(queries[1:2, :width], 10, SearchParams(ncells=2, centroid_score_threshold=0.6, ndocs=40,
                                                            exact_tokens=100))
    index.search(queries, 10, threads=2)
    index.search(queries[:1], 10, threads=2)
    index.search(queries[:3], 10, allowed=np.arange(0, N_DOCS, 3))
    assert kernels.loaded_variants() == loaded


_FRESH_WARM = """
import json, sys
import numpy as np
from embedding.codec import ResidualCodec
from indexing import kernels
from indexing.plaid import CentroidIndex
folder = sys.argv[1]
codec = ResidualCodec.from_bytes(open(folder + "/codec.bin", "rb").read())
arrays = dict(np.load(folder + "/arrays.npz"))
index = CentroidIndex.from_arrays(codec, arrays)
queries = np.load(folder + "/queries.npy")
index.warm()
loaded = kernels.loaded_variants()
index.search(queries, 10)
index.search(queries[:1], 10)
index.search(queries[:3, :5], 10)
print(json.dumps({"warm": loaded, "after": kernels.loaded_variants()}))
"""


@pytest.mark.skipif(not kernels.ENABLED, reason="numba not importable")
def test_warm_in_a_fresh_process_loads_what_batches_then_use(index, corpus, products, tmp_path):
    # In this process other tests have searched already; a fresh one shows what warm() alone
    # loads: a batch's queries read strided columns of the block's product (int8: the probe
    # scales them), another compiled variant, which warm() must load too.
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "codec.bin").write_bytes(index.codec.to_bytes())
    np.savez(tmp_path / "arrays.npz", **index.to_arrays())
    np.save(tmp_path / "queries.npy", corpus["queries"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", _FRESH_WARM, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["after"] == seen["warm"]
    assert seen["warm"]["probe_documents"] >= 1


def test_warm_is_nothing_to_do_for_the_numpy_stages_or_an_empty_index(index, monkeypatch):
    empty = CentroidIndex.build(index.codec, [], [])
    assert empty.warm() == 0.0
    monkeypatch.setattr(kernels, "ENABLED", False)
    assert index.warm() == 0.0
