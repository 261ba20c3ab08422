"""The PLAID engine's compiled stages (indexing.kernels) against plain numpy, and their switch."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedding.codec import ResidualCodec
from indexing import kernels

REPO = Path(__file__).resolve().parents[2]
needs_numba = pytest.mark.skipif(not kernels.ENABLED, reason="numba not importable")


def _cell_maxsum(table, doc_cells, starts, lengths, kept=None):
    """cell_maxsum_docs of documents whose cells lie one after another (starts the exclusive
    cumulative sum of lengths), all of them in order."""
    offsets = np.append(np.asarray(starts, np.int64), int(np.sum(lengths)))
    return kernels.cell_maxsum_docs(table, doc_cells, offsets, np.arange(len(starts), dtype=np.int64), kept)


def _probe(table, bounds, ncells, products=None):
    """probe_documents with one list a cell holding that cell as its document: its documents are
    the probed cells; (cells, kept), and the table first where an int8 product is given."""
    n_centroids = table.shape[0]
    lists = np.arange(n_centroids + 1, dtype=np.int64)
    cells, kept, n_kept = kernels.probe_documents(table, bounds, ncells, lists, lists[:-1].astype(np.int32),
                                                  n_centroids, products=products)
    assert n_kept == int(kept.sum())
    return (table, cells, kept) if products is not None else (cells, kept)


def _cells(rng, n_docs, n_centroids, widths=(0, 1, 2, 9)):
    lengths = rng.choice(widths, size=n_docs).astype(np.int64)
    starts = np.zeros(n_docs, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    doc_cells = rng.integers(0, n_centroids, size=int(lengths.sum())).astype(np.uint16)
    return doc_cells, starts, lengths


@needs_numba
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided-rows"])
@pytest.mark.parametrize("rows", [1, 7, 8, 14, 16, 29, 130, 300])
def test_cell_maxsum_sums_each_documents_kept_cells_maxima_as_numpy_does(strided, rows):
    rng = np.random.default_rng(3)
    n_centroids = 50
    # magnitudes over many octaves: a sum taken in another order than numpy's differs
    product = (rng.normal(size=(n_centroids, rows + 3)) * np.exp(3 * rng.normal(size=(n_centroids, rows + 3))))
    product = product.astype(np.float32)
    table = product[:, :rows] if strided else np.ascontiguousarray(product[:, :rows])
    doc_cells, starts, lengths = _cells(rng, 40, n_centroids)
    kept = rng.random(n_centroids) < 0.5
    for mask in (None, kept, np.zeros(n_centroids, bool)):
        got = _cell_maxsum(table, doc_cells, starts, lengths, mask)
        assert got.shape == (40,) and got.dtype == np.float32
        maxima = np.full((40, rows), -np.inf, np.float32)  # no cell (none, or all pruned): -inf
        for d in range(40):
            cells = doc_cells[starts[d]:starts[d] + lengths[d]]
            if mask is not None:
                cells = cells[mask[cells]]
            if len(cells):
                maxima[d] = table[cells].max(axis=0)
        np.testing.assert_array_equal(got, maxima.sum(axis=1, dtype=np.float32))  # the same floats
    assert _cell_maxsum(table, doc_cells, starts[:0], lengths[:0]).shape == (0,)


@needs_numba
def test_ranges_concatenate_each_starts_run_of_positions():
    rng = np.random.default_rng(7)
    starts = rng.integers(0, 1000, size=30)
    lengths = rng.choice([0, 1, 5, 40], size=30)
    got = kernels.ranges(starts, lengths)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)]))
    assert kernels.ranges(starts[:0], lengths[:0]).shape == (0,)
    assert kernels.ranges(starts[:3], np.zeros(3, np.int64)).shape == (0,)


@needs_numba
def test_cell_documents_are_the_sorted_distinct_documents_of_the_cells_lists():
    rng = np.random.default_rng(8)
    n_docs, n_centroids = 60, 20
    sizes = rng.choice([0, 1, 3, 12], size=n_centroids)
    ivf_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    ivf_docs = rng.integers(0, n_docs, size=int(sizes.sum())).astype(np.int32)
    mask = rng.random(n_docs) < 0.5
    for cells in (np.array([0, 3, 7, 19]), np.arange(n_centroids), np.array([], dtype=np.int64)):
        lists = [ivf_docs[ivf_offsets[c]:ivf_offsets[c + 1]] for c in cells]
        everything = np.unique(np.concatenate(lists)) if lists else np.empty(0, np.int64)
        got = kernels.cell_documents(ivf_offsets, ivf_docs, cells, n_docs)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, everything)
        np.testing.assert_array_equal(kernels.cell_documents(ivf_offsets, ivf_docs, cells, n_docs, mask),
                                      everything[mask[everything]])


@needs_numba
def test_token_maxsum_is_numpys_segment_maxsum_bit_for_bit():
    rng = np.random.default_rng(4)
    n_centroids, rows = 30, 13
    lengths = rng.integers(1, 12, size=25).astype(np.int64)
    n = int(lengths.sum())
    products = rng.normal(size=(n, rows)).astype(np.float32)
    scores_t = rng.normal(size=(n_centroids, rows)).astype(np.float32)
    # the index's arrays, of which the documents' tokens are some positions, in any order
    codes = rng.integers(0, n_centroids, size=3 * n).astype(np.uint16)
    inv_norms = rng.uniform(0.8, 1.3, size=3 * n).astype(np.float32)
    tokens = rng.permutation(3 * n)[:n]
    got = kernels.token_maxsum(products, scores_t, codes, inv_norms, tokens, lengths)
    # numpy's exact stage, as indexing.plaid runs it without numba
    token_scores = products + np.take(scores_t, codes[tokens], axis=0)
    token_scores *= inv_norms[tokens][:, None]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    want = np.maximum.reduceat(token_scores.T, starts, axis=1).sum(axis=0, dtype=np.float32)
    np.testing.assert_array_equal(got, want)
    # no query rows: every document scores 0, as numpy's empty sum
    np.testing.assert_array_equal(
        kernels.token_maxsum(products[:, :0], scores_t[:, :0], codes, inv_norms, tokens, lengths),
        np.zeros(len(lengths), np.float32))
    assert kernels.token_maxsum(products[:0], scores_t, codes, inv_norms, tokens[:0], lengths[:0]).shape == (0,)


@needs_numba
@pytest.mark.parametrize("nbits,dim", [(1, 16), (2, 16), (4, 16), (1, 24), (2, 20), (4, 20), (4, 12)])
def test_decode_residuals_reads_the_tokens_residuals_as_the_codec_decodes_them(nbits, dim):
    # (bytes a token at 4 bits: 8, 10 and 6, the last ones past the kernel's four-byte steps)
    rng = np.random.default_rng(nbits)
    codec = ResidualCodec.fit(_unit(rng.normal(size=(400, dim))), nbits, 8, seed=1)
    codes, residuals = codec.compress(_unit(rng.normal(size=(50, dim))))
    tokens = np.array([7, 0, 49, 7, 23], dtype=np.int64)
    out = np.full((len(tokens) + 2, dim), np.nan, dtype=np.float32)  # a larger buffer: its first rows
    got = kernels.decode_residuals(codec.byte_weights, residuals, tokens, out[: len(tokens)])
    np.testing.assert_array_equal(got, codec.residual_vectors(residuals[tokens]))
    assert np.isnan(out[len(tokens):]).all()
    assert kernels.decode_residuals(codec.byte_weights, residuals, tokens[:0], out[:0]).shape == (0, dim)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@needs_numba
def test_merged_query_rows_are_numpys_floats(monkeypatch):
    """merge_query_tokens compiled: the same groups and the same float32 sums as its numpy loop."""
    from indexing.plaid import merge_query_tokens

    rng = np.random.default_rng(8)
    base = rng.normal(size=(6, 24)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    for trial in range(20):
        rows = base[rng.integers(0, 6, 20)] + rng.normal(scale=0.02 * (trial % 3), size=(20, 24)).astype(np.float32)
        q = np.zeros((24, 24), np.float32)
        q[:20] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        for threshold in (0.9, 0.99, 1.0, 2.0):
            got = merge_query_tokens(q, threshold)
            with monkeypatch.context() as patch:
                patch.setattr(kernels, "ENABLED", False)
                want = merge_query_tokens(q, threshold)
            assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
            if threshold == 0.9:
                assert len(got) < 20  # something was merged


@needs_numba
@pytest.mark.parametrize("ncells", [1, 2, 4, 8])
def test_probe_takes_each_rows_best_cells_as_argmax_does_and_the_kept_centroids(ncells):
    rng = np.random.default_rng(ncells)
    n_centroids, rows = 40, 6
    # coarse scores: many ties, which repeated argmax breaks toward the lower centroid
    product = np.round(rng.normal(size=(n_centroids, rows + 2)), 1).astype(np.float32)
    table = product[:, :rows]  # rows of a wider product, as the search passes them
    norms = rng.uniform(0.5, 2.0, size=rows).astype(np.float32)
    for threshold in (0.45, 0.5, -np.inf, 10.0):
        bounds = np.float32(threshold) * norms
        cells, kept = _probe(table, bounds, ncells)
        scores = np.ascontiguousarray(table.T).copy()
        want = set()
        for _ in range(ncells):  # repeated argmax: the first best, then the next
            best = scores.argmax(axis=1)
            want |= set(best.tolist())
            scores[np.arange(rows), best] = -np.inf
        assert cells.tolist() == sorted(want)
        np.testing.assert_array_equal(kept, (table >= bounds).any(axis=1))
        assert kept.all() if threshold == -np.inf else not kept.all() if threshold == 10.0 else True
        frozen = table.copy()
        frozen.setflags(write=False)  # a read-only table (a memory-mapped product, say) is read, not written
        got = _probe(frozen, bounds, ncells)
        assert got[0].tolist() == cells.tolist() and (got[1] == kept).all()


@needs_numba
@pytest.mark.parametrize("ncells", [1, 4])
def test_the_int8_probe_writes_the_dequantized_scores_and_probes_them(ncells):
    rng = np.random.default_rng(7 + ncells)
    n_centroids, rows = 50, 5
    block = rng.integers(-3000, 3000, (n_centroids, 2 * rows + 3)).astype(np.int32)
    products = block[:, rows + 1: 2 * rows + 3]  # one query's strided columns of a block's product
    c_scales = rng.uniform(1e-4, 2e-4, n_centroids).astype(np.float32)
    q_scales = rng.uniform(1e-4, 2e-4, products.shape[1]).astype(np.float32)
    want = kernels.dequantize(np.ascontiguousarray(products), c_scales, q_scales)[:, :rows]
    bounds = np.quantile(want, 0.97, axis=0).astype(np.float32)  # a few centroids kept per row
    table, cells, kept = _probe(np.empty((n_centroids, rows), np.float32), bounds, ncells,
                                (products, c_scales, q_scales))
    assert table.shape == (n_centroids, rows)
    np.testing.assert_array_equal(table, want)  # dequantize's floats, bit for bit
    want_cells, want_kept = _probe(want, bounds, ncells)
    assert cells.tolist() == want_cells.tolist() and (kept == want_kept).all()
    assert 0 < kept.sum() < n_centroids


@needs_numba
@pytest.mark.parametrize("ncells", [1, 4])
def test_probe_documents_are_the_probed_cells_lists_documents_with_the_kept_centroids(ncells):
    """probe_documents' documents are cell_documents of the probed cells (the cells as _probe finds them)."""
    rng = np.random.default_rng(11 + ncells)
    n_centroids, rows, n_docs = 40, 6, 300
    product = np.round(rng.normal(size=(n_centroids, rows + 2)), 1).astype(np.float32)
    table = product[:, :rows]
    bounds = (np.float32(0.5) * rng.uniform(0.5, 2.0, size=rows)).astype(np.float32)
    lists = rng.integers(0, 12, n_centroids)
    ivf_offsets = np.concatenate([[0], np.cumsum(lists)]).astype(np.int64)
    ivf_docs = rng.integers(0, n_docs, int(lists.sum())).astype(np.int32)
    mask = rng.random(n_docs) < 0.4
    cells, kept = _probe(table, bounds, ncells)
    for m in (None, mask):
        docs, got_kept, n_kept = kernels.probe_documents(table, bounds, ncells, ivf_offsets, ivf_docs, n_docs, m)
        want = kernels.cell_documents(ivf_offsets, ivf_docs, cells, n_docs, m)
        assert docs.tolist() == want.tolist() and len(docs) > 0
        assert (got_kept == kept).all() and n_kept == int(kept.sum())
    frozen = table.copy()
    frozen.setflags(write=False)  # read, not written (copied first)
    assert kernels.probe_documents(frozen, bounds, ncells, ivf_offsets, ivf_docs, n_docs)[0].tolist() == \
        kernels.cell_documents(ivf_offsets, ivf_docs, cells, n_docs).tolist()
    # an int8 product: the table written with dequantize's floats, then probed
    block = rng.integers(-3000, 3000, (n_centroids, 2 * rows + 3)).astype(np.int32)
    products = block[:, rows + 1: 2 * rows + 3]
    c_scales = rng.uniform(1e-4, 2e-4, n_centroids).astype(np.float32)
    q_scales = rng.uniform(1e-4, 2e-4, products.shape[1]).astype(np.float32)
    want_table, want_cells, want_kept = _probe(np.empty((n_centroids, rows), np.float32), bounds * 1e-3, ncells,
                                               (products, c_scales, q_scales))
    out = np.empty((n_centroids, rows), np.float32)
    docs, got_kept, n_kept = kernels.probe_documents(out, bounds * 1e-3, ncells, ivf_offsets, ivf_docs, n_docs,
                                                     products=(products, c_scales, q_scales))
    np.testing.assert_array_equal(out, want_table)
    assert docs.tolist() == kernels.cell_documents(ivf_offsets, ivf_docs, want_cells, n_docs).tolist()
    assert (got_kept == want_kept).all() and n_kept == int(want_kept.sum())


@needs_numba
def test_top_k_ranks_as_numpy_by_score_then_id():
    def _top_k(scores, ids, k):  # numpy's order: score descending, then id ascending
        order = np.lexsort((ids, -scores))[:k]
        return scores[order], ids[order]

    rng = np.random.default_rng(5)
    coarse = np.array([-np.inf, -1.5, -0.0, 0.0, 0.25, 1.0, 3.0, np.inf], np.float32)  # ties, both zeros
    for trial in range(400):
        n, k = int(rng.integers(0, 60)), int(rng.integers(1, 70))
        scores = rng.choice(coarse, n) if trial % 2 else rng.standard_normal(n).astype(np.float32)
        ids = rng.choice(2 ** 32, n, replace=False).astype(np.int64)  # (up to 2**32 - 1)
        want = _top_k(scores, ids, k)
        got = kernels.top_k(scores, ids, k)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])  # (-0.0 comes back as 0.0: equal)
    assert kernels.top_k(np.ones(2, np.float32), np.array([-1, 3]), 1) is None  # numpy's answer then
    assert kernels.top_k(np.array([np.nan, 1], np.float32), np.array([1, 3]), 1) is None


@needs_numba
def test_exact_layout_is_the_documents_tokens_and_blocks():
    def blocks(lengths, max_tokens):  # consecutive documents up to max_tokens tokens, a longer one alone
        ends, start = [0], 0
        while start < len(lengths):
            stop, total = start + 1, lengths[start]
            while stop < len(lengths) and total + lengths[stop] <= max_tokens:
                total += lengths[stop]
                stop += 1
            ends.append(stop)
            start = stop
        return ends

    rng = np.random.default_rng(6)
    for _ in range(300):
        lengths = rng.integers(0, 30, int(rng.integers(1, 40)))
        doc_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        docs = rng.choice(len(lengths), int(rng.integers(0, len(lengths) + 1)), replace=False)
        n, max_tokens = int(rng.integers(0, len(docs) + 1)), int(rng.integers(1, 80))
        tokens, got_lengths, offsets, chunks, total = kernels.exact_layout(doc_offsets, docs, max_tokens, n)
        starts, want_lengths = doc_offsets[docs[:n]], lengths[docs[:n]]
        assert total == lengths[docs].sum()  # every document's tokens, laid out or not
        np.testing.assert_array_equal(tokens, np.concatenate([np.arange(a, a + n) for a, n in zip(starts, want_lengths)]
                                                             + [np.zeros(0, np.int64)]))
        np.testing.assert_array_equal(got_lengths, want_lengths)
        np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(want_lengths)]))
        assert chunks.tolist() == blocks(want_lengths.tolist(), max_tokens)


@needs_numba
@pytest.mark.parametrize("gap", [None, 0.05, math.inf])
def test_early_rest_is_the_exact_stages_second_pass(gap):
    """The later documents whose approx + gap (the first ones' largest exact - approx, or the
    caller's) + margin x |k-th best| reaches the k-th best of the first ones' scores."""
    rng = np.random.default_rng(8)
    for _ in range(200):
        n, k = int(rng.integers(25, 80)), int(rng.integers(1, 10))
        first = max(2 * k, n * 3 // 8)
        approx = np.sort(rng.normal(size=n).astype(np.float32))[::-1].copy()
        docs = rng.choice(10_000, n, replace=False).astype(np.int64)
        exact = (approx + rng.normal(scale=0.3, size=n)).astype(np.float32)
        margin = float(rng.choice([0.0, 0.01, 0.5]))
        kth = np.sort(exact[:first])[::-1][k - 1]
        lift = float(np.max(exact[:first] - approx[:first])) if gap is None else gap
        want = docs[first:][approx[first:] + lift + margin * abs(float(kth)) >= kth]  # (numpy's float32 sums)
        got = kernels.early_rest(exact[:first], approx, docs, first, k, margin, gap)
        assert got.tolist() == want.tolist()


def _enabled_with(value: "str | None") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != kernels.ENV}
    if value is not None:
        env[kernels.ENV] = value
    return subprocess.run([sys.executable, "-c", "from indexing import kernels; print(kernels.ENABLED)"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_the_environment_switches_the_compiled_stages_off_and_names_a_bad_value():
    off = _enabled_with("numpy")
    assert off.returncode == 0 and off.stdout.strip() == "False"
    default = _enabled_with(None)
    assert default.returncode == 0
    try:
        import numba  # noqa: F401
        assert default.stdout.strip() == "True"
    except ImportError:
        assert default.stdout.strip() == "False"
    bad = _enabled_with("fortran")
    assert bad.returncode != 0
    assert "TESSERA_KERNELS must be one of numba, numpy, got 'fortran'" in bad.stderr


@needs_numba
def test_without_a_writable_cache_the_kernels_compile_in_the_process():
    # a read-only install with no writable user cache: numba finds no cache locator (simulated
    # by removing them all); the kernels still compile, for the process alone
    code = """
import numpy as np
from numba.core import caching
caching.CacheImpl._locator_classes = []
from indexing import kernels
got = kernels.cell_maxsum_docs(np.arange(6, dtype=np.float32).reshape(3, 2), np.array([0, 2], np.uint16),
                               np.array([0, 2]), np.array([0]))
print(kernels.ENABLED, got.tolist())
"""
    from numba.core import caching
    if not hasattr(caching, "CacheImpl") or not hasattr(caching.CacheImpl, "_locator_classes"):
        pytest.skip("this numba keeps its cache locators elsewhere")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True [9.0]"


_FIRST_SEARCH = """
import sys
import numpy as np
from embedding.codec import ResidualCodec
from indexing import kernels
from indexing.plaid import CentroidIndex
rng = np.random.default_rng(0)
x = rng.normal(size=(300, 16)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
codec = ResidualCodec.fit(x, 2, 8, seed=1)
codes, residuals = codec.compress(x)
index = CentroidIndex.build(codec, [codes[i:i + 10] for i in range(0, 300, 10)],
                            [residuals[i:i + 10] for i in range(0, 300, 10)])
print("numba" in sys.modules)
index.search(x[None, :4], 3)
print("numba" in sys.modules, kernels.ENABLED)
"""


def test_the_engine_imports_numba_at_its_first_search_not_with_the_module():
    # an index build or an embed job imports indexing.plaid and never searches: no numba for them
    done = subprocess.run([sys.executable, "-c", _FIRST_SEARCH], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    before, after = done.stdout.split("\n")[:2]
    assert before == "False"
    assert after == ("True True" if kernels.ENABLED else "False False")


@needs_numba
def test_a_numba_that_cannot_be_imported_leaves_the_numpy_stages():
    # installed (found) but failing at import, as a numba built for another numpy does
    code = "import builtins\n" + """
real = builtins.__import__
def refuse(name, *args, **kwargs):
    if name == "numba" or name.startswith("numba."):
        raise ImportError("numba built for another numpy")
    return real(name, *args, **kwargs)
builtins.__import__ = refuse
""" + _FIRST_SEARCH
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["False", "False False"]  # searched with numpy's stages
