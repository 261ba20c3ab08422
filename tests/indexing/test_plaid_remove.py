"""Tests for CentroidIndex.remove: stable positions, removed documents never searchable.

The reference is :meth:`CentroidIndex.build` over the same document list with the
removed documents given zero tokens (and any new documents appended).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedding.codec import ResidualCodec
from indexing.plaid import ARRAY_KEYS, DERIVED_KEYS, CentroidIndex, SearchParams

DIM = 32
N_DOCS = 120
N_NEW = 15
N_TOPICS = 16
N_CENTROIDS = 32
N_QUERIES = 8
LQ = 16
NO_PRUNING = SearchParams(
    ncells=N_CENTROIDS, centroid_score_threshold=-math.inf, ndocs=4 * (N_DOCS + N_NEW), exact_margin=math.inf
)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus() -> dict:
    """Documents of 3-20 tokens around 1-2 topics (a few empty), new documents, queries."""
    rng = np.random.default_rng(21)
    topics = _unit(rng.normal(size=(N_TOPICS, DIM)))

    def doc(n: int) -> np.ndarray:
        centre = topics[rng.choice(rng.choice(N_TOPICS, size=2, replace=False), size=n)]
        return _unit(centre + 0.5 * rng.normal(size=(n, DIM)) / math.sqrt(DIM) * 4)

    docs = [doc(int(rng.integers(3, 21))) for _ in range(N_DOCS + N_NEW)]
    queries = np.zeros((N_QUERIES, LQ, DIM), dtype=np.float32)
    for i, source in enumerate(rng.choice(N_DOCS, size=N_QUERIES, replace=False)):
        n = int(rng.integers(4, LQ + 1))  # the rest stays zero padding
        rows = docs[source][rng.integers(0, len(docs[source]), n)]
        queries[i, :n] = _unit(rows + 0.2 * rng.normal(size=rows.shape) / math.sqrt(DIM) * 4)
    return {"docs": docs[:N_DOCS], "new": docs[N_DOCS:], "queries": queries}


@pytest.fixture(scope="module")
def codec(corpus) -> ResidualCodec:
    return ResidualCodec.fit(np.concatenate(corpus["docs"]), 2, N_CENTROIDS, seed=5)


def _empty(codec: ResidualCodec) -> tuple[np.ndarray, np.ndarray]:
    return np.empty(0, codec.code_dtype), np.empty((0, codec.residual_bytes), np.uint8)


@pytest.fixture(scope="module")
def encoded(codec, corpus) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-document (codes, residuals); documents 3 and 50 are empty from the start."""
    pairs = [codec.compress(d) for d in corpus["docs"]]
    pairs[3] = pairs[50] = _empty(codec)
    return [c for c, _ in pairs], [r for _, r in pairs]


@pytest.fixture(scope="module")
def new_encoded(codec, corpus) -> tuple[list[np.ndarray], list[np.ndarray]]:
    pairs = [codec.compress(d) for d in corpus["new"]]
    return [c for c, _ in pairs], [r for _, r in pairs]


@pytest.fixture(scope="module")
def index(codec, encoded) -> CentroidIndex:
    return CentroidIndex.build(codec, *encoded)


@pytest.fixture(scope="module")
def removed() -> np.ndarray:
    """Positions to remove: first, last, an already-empty one, duplicates, unsorted."""
    rng = np.random.default_rng(4)
    picked = rng.choice(np.arange(1, N_DOCS - 1), size=30, replace=False)
    return np.concatenate([[N_DOCS - 1, 0, 3], picked, picked[:5]]).astype(np.int64)


def _zeroed(codec, encoded, positions) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The document list with the documents at ``positions`` given zero tokens."""
    codes, residuals = list(encoded[0]), list(encoded[1])
    for p in set(int(p) for p in positions):
        codes[p], residuals[p] = _empty(codec)
    return codes, residuals


def _assert_same_index(a: CentroidIndex, b: CentroidIndex) -> None:
    assert a.codec == b.codec
    for key in ARRAY_KEYS + DERIVED_KEYS:
        x, y = getattr(a, key), getattr(b, key)
        assert x.dtype == y.dtype, key
        np.testing.assert_array_equal(x, y, err_msg=key)


def _assert_same_results(a, b) -> None:
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


def _assert_same_searches(a: CentroidIndex, b: CentroidIndex, queries: np.ndarray) -> None:
    for k in (5, 40):
        _assert_same_results(a.search(queries, k), b.search(queries, k))
        _assert_same_results(a.search(queries, k, NO_PRUNING), b.search(queries, k, NO_PRUNING))
        _assert_same_results(a.exact_maxsim(queries, k), b.exact_maxsim(queries, k))


def test_remove_equals_build_with_empty_documents(index, codec, encoded, removed, corpus):
    before = {key: array.copy() for key, array in index.to_arrays().items()}
    smaller = index.remove(removed)
    reference = CentroidIndex.build(codec, *_zeroed(codec, encoded, removed))
    _assert_same_index(smaller, reference)
    _assert_same_searches(smaller, reference, corpus["queries"])
    # Positions are stable; only the removed documents lost their tokens.
    assert smaller.n_docs == index.n_docs == N_DOCS
    dropped = np.isin(np.arange(N_DOCS), removed)
    assert (smaller.doc_lengths[dropped] == 0).all()
    np.testing.assert_array_equal(smaller.doc_lengths[~dropped], index.doc_lengths[~dropped])
    assert not np.isin(smaller.ivf_docs, removed).any()
    # The original index is untouched.
    for key, array in before.items():
        np.testing.assert_array_equal(getattr(index, key), array, err_msg=key)


def test_remove_then_append_equals_build(index, codec, encoded, new_encoded, removed, corpus):
    updated = index.remove(removed).append(*new_encoded)
    zc, zr = _zeroed(codec, encoded, removed)
    reference = CentroidIndex.build(codec, zc + new_encoded[0], zr + new_encoded[1])
    _assert_same_index(updated, reference)
    assert updated.n_docs == N_DOCS + N_NEW
    _assert_same_searches(updated, reference, corpus["queries"])
    # A query made of a new document's own tokens finds it at its new position.
    new_doc = corpus["new"][0][None, :LQ]
    assert updated.search(new_doc, 1, NO_PRUNING)[1][0, 0] == N_DOCS


def test_removed_documents_are_never_searchable(index, removed, corpus):
    smaller = index.remove(removed)
    queries = corpus["queries"]
    survivors = np.setdiff1d(np.flatnonzero(index.doc_lengths > 0), removed)
    for scores, ids in (
        smaller.search(queries, N_DOCS),
        smaller.search(queries, N_DOCS, NO_PRUNING),
        smaller.search(queries, 5, SearchParams(ncells=1)),
        smaller.exact_maxsim(queries, N_DOCS),
    ):
        assert not np.isin(ids, removed).any()
        assert np.isin(ids[ids >= 0], survivors).all()
        assert np.isneginf(scores[ids < 0]).all()
    # Exhaustive searches return every survivor, then padding.
    for _, ids in (smaller.search(queries, N_DOCS, NO_PRUNING), smaller.exact_maxsim(queries, N_DOCS)):
        for row in ids:
            np.testing.assert_array_equal(np.sort(row[: len(survivors)]), survivors)
            assert (row[len(survivors):] == -1).all()


def test_allowed_cannot_bring_back_removed_documents(index, removed, corpus):
    smaller = index.remove(removed)
    queries = corpus["queries"]
    mixed = np.concatenate([removed[:10], [1, 2, 4, 5, 6, 7, 8]])
    allowed_survivors = np.setdiff1d(mixed, removed)
    for params in (None, NO_PRUNING, SearchParams(ncells=1, centroid_score_threshold=0.5, ndocs=256)):
        _, ids = smaller.search(queries, 10, params, allowed=mixed)
        assert set(ids[ids >= 0].tolist()) <= set(allowed_survivors.tolist())
    _, ids = smaller.exact_maxsim(queries, 10, allowed=mixed)
    assert set(ids[ids >= 0].tolist()) == set(allowed_survivors.tolist())
    # Only removed documents allowed: nothing to return (and the widening probe ends).
    for scores, ids in (
        smaller.search(queries, 5, SearchParams(ncells=1), allowed=removed),
        smaller.exact_maxsim(queries, 5, allowed=removed),
    ):
        assert (ids == -1).all() and np.isneginf(scores).all()


def test_all_padding_query_skips_removed_documents(index, removed):
    smaller = index.remove(removed)
    zero = np.zeros((1, LQ, DIM), dtype=np.float32)
    survivors = np.setdiff1d(np.flatnonzero(index.doc_lengths > 0), removed)
    for scores, ids in (smaller.search(zero, 6), smaller.exact_maxsim(zero, 6)):
        np.testing.assert_array_equal(ids[0], survivors[:6])
        assert (scores[0] == 0).all()
    allowed = np.concatenate([removed[:4], survivors[-2:]])
    for _scores, ids in (smaller.search(zero, 4, allowed=allowed), smaller.exact_maxsim(zero, 4, allowed=allowed)):
        assert ids[0].tolist() == survivors[-2:].tolist() + [-1, -1]


def test_remove_nothing_gives_an_equal_index(index, corpus):
    for empty in (np.empty(0, dtype=np.int64), [], np.array([])):
        same = index.remove(empty)
        assert same is not index
        _assert_same_index(same, index)
    # Removing documents that have no tokens changes nothing either.
    _assert_same_index(index.remove(np.array([3, 50, 3])), index)


def test_remove_everything(index, codec, corpus):
    gone = index.remove(np.arange(N_DOCS))
    assert gone.n_docs == N_DOCS and gone.n_tokens == 0 and len(gone.ivf_docs) == 0
    np.testing.assert_array_equal(gone.ivf_offsets, np.zeros(N_CENTROIDS + 1))
    for scores, ids in (gone.search(corpus["queries"], 3), gone.exact_maxsim(corpus["queries"], 3)):
        assert (ids == -1).all() and np.isneginf(scores).all()
    empty = CentroidIndex.build(codec, [], [])
    _assert_same_index(empty.remove([]), empty)


def test_removed_index_round_trips_through_arrays(index, codec, removed, corpus):
    smaller = index.remove(removed)
    arrays = {key: np.array(value) for key, value in smaller.to_arrays().items()}
    loaded = CentroidIndex.from_arrays(ResidualCodec.from_bytes(codec.to_bytes()), arrays)
    _assert_same_index(loaded, smaller)
    _assert_same_results(loaded.search(corpus["queries"], 10), smaller.search(corpus["queries"], 10))


@pytest.mark.parametrize("bad, match", [
    (np.array([0, N_DOCS]), r"\[0, 120\)"),
    (np.array([-1]), r"\[0, 120\)"),
    (np.array([1.0, 2.0]), "positions must be a 1-D integer array"),
    (np.array([[1, 2]]), "positions must be a 1-D integer array"),
    (np.array([True]), "positions must be a 1-D integer array"),
])
def test_remove_validation(index, bad, match):
    with pytest.raises(ValueError, match=match):
        index.remove(bad)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 5), min_size=0, max_size=12),
    new_lengths=st.lists(st.integers(0, 5), min_size=0, max_size=4),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_remove_then_append_property(codec, lengths, new_lengths, data, seed):
    """remove(P).append(new) == build(documents with P emptied + new), array for array."""
    rng = np.random.default_rng(seed)

    def docs(ns):
        codes = [rng.integers(0, codec.n_centroids, n).astype(codec.code_dtype) for n in ns]
        res = [rng.integers(0, 256, (n, codec.residual_bytes)).astype(np.uint8) for n in ns]
        return codes, res

    old, new = docs(lengths), docs(new_lengths)
    positions = data.draw(st.lists(st.integers(0, max(len(lengths) - 1, 0)), max_size=8)
                          if lengths else st.just([]))
    updated = CentroidIndex.build(codec, *old).remove(np.array(positions, dtype=np.int64)).append(*new)
    zc, zr = _zeroed(codec, old, positions)
    _assert_same_index(updated, CentroidIndex.build(codec, zc + new[0], zr + new[1]))
