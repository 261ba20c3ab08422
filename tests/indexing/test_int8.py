"""The PLAID engine's int8 products (indexing.int8) and their compiled stages: quantisation,
the exact int32 product, what ``products`` resolves to, and that int8 searches return float32
MaxSim scores and the float32 engine's documents."""

from __future__ import annotations

import math

import numpy as np
import pytest

from embedding.codec import ResidualCodec
from indexing import int8, kernels
from indexing.plaid import CentroidIndex, SearchParams

needs_int8 = pytest.mark.skipif(not (kernels.ENABLED and int8.installed()), reason="int8 needs numba and torch")
DIM = 40  # not a multiple of 8: a 1-bit residual's last byte holds values past the vector


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


# -- quantisation and the product -----------------------------------------------------------


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
def test_quantized_rows_are_within_half_a_step_and_zero_rows_stay_zero(compiled, monkeypatch):
    if compiled and not kernels.ENABLED:
        pytest.skip("numba not importable")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 33)).astype(np.float32) * rng.uniform(0.01, 10, (50, 1)).astype(np.float32)
    x[7] = 0.0
    x[9, :4] = [1.0, -1.0, 3.0, 254.0]  # on a scale of 2: halves, rounded to even (0.5 -> 0, 1.5 -> 2)
    monkeypatch.setattr(kernels, "ENABLED", compiled)
    q, scale = int8.quantize_rows(x)
    if compiled:  # numpy's values exactly
        monkeypatch.setattr(kernels, "ENABLED", False)
        want = int8.quantize_rows(x)
        np.testing.assert_array_equal(q, want[0])
        np.testing.assert_array_equal(scale, want[1])
        assert int8.quantize_rows(x[:0])[0].shape == (0, 33)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and q.shape == x.shape
    assert np.abs(q).max() <= 127 and scale[7] == 0 and not q[7].any()
    step = np.abs(x).max(axis=1) / 127
    assert np.all(np.abs(q * scale[:, None] - x) <= step[:, None] / 2 * (1 + 1e-5))
    assert (np.abs(q).max(axis=1)[np.arange(50) != 7] == 127).all()  # each row uses its whole range


def test_a_quantized_byte_table_is_within_half_a_step():
    weights = np.array([[-0.03, -0.01, 0.01, 0.03]], np.float32).repeat(4, axis=0)
    q, scale = int8.quantize_table(weights)
    assert q.dtype == np.int8 and np.abs(q).max() == 127
    assert np.all(np.abs(q * scale - weights) <= scale / 2 * (1 + 1e-5))
    zeros, one = int8.quantize_table(np.zeros((3, 2), np.float32))
    assert one == 1 and not zeros.any()


@needs_int8
@pytest.mark.parametrize("shape", [(1, 8, 1), (5, 33, 7), (64, 384, 32), (300, 40, 19), (0, 16, 4), (4, 16, 0)])
def test_int_mm_is_the_exact_int32_product(shape):
    n, k, m = shape
    rng = np.random.default_rng(1)
    a = rng.integers(-127, 128, (n, k)).astype(np.int8)
    b = rng.integers(-127, 128, (m, k)).astype(np.int8).T  # a transposed view, as the engine passes
    got = int8.int_mm(a, b)
    assert got.dtype == np.int32 and got.shape == (n, m)
    np.testing.assert_array_equal(got, a.astype(np.int32) @ b.astype(np.int32))
    out = np.full((n + 3, m), 7, np.int32)  # written into the first n rows of a longer array
    np.testing.assert_array_equal(int8.int_mm(a, b, out=out[1:]), got)
    np.testing.assert_array_equal(out[1:n + 1], got)
    assert (out[0] == 7).all() and (out[n + 1:] == 7).all()
    with pytest.raises(ValueError, match="out must be C-contiguous int32"):
        int8.int_mm(a, b, out=np.zeros((n, m), np.int64))


@needs_int8
@pytest.mark.parametrize("shape", [(5, 33, 7), (300, 384, 14), (4, 16, 0)])
def test_products_into_writes_each_prefixs_product_at_its_rows(shape):
    """products_into is int_mm of a buffer's first n rows into rows [row, row + n) of an output,
    through views made once: a loop of products of one buffer, each where its documents go."""
    n, k, m = shape
    rng = np.random.default_rng(2)
    buffer = rng.integers(-127, 128, (n, k)).astype(np.int8)
    b = rng.integers(-127, 128, (m, k)).astype(np.int8).T
    out = np.full((2 * n + 1, m), 7, np.int32)
    into = int8.products_into(buffer, b, out)
    into(n, 1)
    into(n // 2, n + 1)
    into(0, 0)  # nothing
    want = buffer.astype(np.int32) @ b.astype(np.int32)
    np.testing.assert_array_equal(out[1:n + 1], want)
    np.testing.assert_array_equal(out[n + 1:n + 1 + n // 2], want[:n // 2])
    assert (out[0] == 7).all() and (out[n + 1 + n // 2:] == 7).all()
    with pytest.raises(ValueError, match="products_into"):
        int8.products_into(buffer, b, out.astype(np.int64))
    with pytest.raises(ValueError, match="products_into"):
        int8.products_into(np.asfortranarray(buffer) if n > 1 and k > 1 else buffer.astype(np.int16), b, out)


# -- what ``products`` means ------------------------------------------------------------------


def test_products_resolve_to_what_the_process_can_run(monkeypatch):
    monkeypatch.delenv(int8.ENV, raising=False)
    monkeypatch.setattr(int8, "installed", lambda: True)
    assert int8.resolve("float32", True) == "float32" and int8.resolve("int8", True) == "int8"
    monkeypatch.setattr(int8, "_cpu_flags", lambda: frozenset({"avx512f", "amx_int8"}))
    assert int8.resolve("auto", True) == int8.resolve(None, True) == "int8"
    assert int8.resolve("auto", False) == "float32"  # numba's stages off: numpy's float32 ones
    monkeypatch.setattr(int8, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_vnni"}))  # not measured
    assert int8.resolve("auto", True) == "float32"
    monkeypatch.setattr(int8, "_cpu_flags", lambda: None)  # flags unknown (not Linux)
    assert int8.resolve("auto", True) == "float32"
    monkeypatch.setenv(int8.ENV, "int8")
    assert int8.resolve(None, True) == "int8" and int8.resolve("float32", True) == "float32"
    monkeypatch.setenv(int8.ENV, "fp8")
    with pytest.raises(ValueError, match="TESSERA_PLAID_PRODUCTS must be one of auto, float32, int8, got 'fp8'"):
        int8.resolve(None, True)
    with pytest.raises(ValueError, match="products must be one of"):
        int8.resolve("bf16", True)
    with pytest.raises(ValueError, match="needs the compiled stages"):
        int8.resolve("int8", False)
    monkeypatch.setattr(int8, "installed", lambda: False)
    with pytest.raises(ValueError, match="needs torch, which is not installed"):
        int8.resolve("int8", True)
    monkeypatch.setattr(int8, "_cpu_flags", lambda: frozenset({"amx_int8"}))
    assert int8.resolve("auto", True) == "float32"
    with pytest.raises(ValueError, match="products must be one of auto, float32, int8 or None, got 'int4'"):
        SearchParams(products="int4")


@needs_int8
def test_torch_threads_puts_torchs_thread_count_back():
    torch = int8.torch_module()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with int8.torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="inside"):
            with int8.torch_threads(1):
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        with int8.torch_threads(2):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# -- the compiled stages ----------------------------------------------------------------------


@pytest.fixture(scope="module", params=[1, 2, 4], ids=["nbits1", "nbits2", "nbits4"])
def small(request) -> dict:
    rng = np.random.default_rng(request.param)
    topics = _unit(rng.standard_normal((12, DIM)))
    docs = [_unit(topics[rng.integers(0, 12, int(n))] + 0.3 * rng.standard_normal((int(n), DIM)))
            for n in rng.integers(1, 30, 150)]
    codec = ResidualCodec.fit(np.concatenate(docs), request.param, 32, seed=3)
    pairs = [codec.compress(d) for d in docs]
    index = CentroidIndex.build(codec, [c for c, _ in pairs], [r for _, r in pairs])
    queries = np.zeros((10, 16, DIM), np.float32)
    for i in range(10):
        n = int(rng.integers(3, 17))
        queries[i, :n] = _unit(docs[i * 7][rng.integers(0, len(docs[i * 7]), n)] + 0.2 * rng.standard_normal((n, DIM)))
    return {"index": index, "codec": codec, "queries": queries}


@needs_int8
def test_decoded_int8_residuals_are_the_quantized_table_rows(small):
    index, codec = small["index"], small["codec"]
    table, _ = int8.quantize_table(codec.byte_weights)
    tokens = np.array([5, 0, 17, index.n_tokens - 1, 5], np.int64)
    out = np.full((len(tokens), index.residuals.shape[1] * table.shape[1]), 99, np.int8)
    assert kernels.decode_words(kernels.int8_words(table), index.residuals, tokens, out) is out
    np.testing.assert_array_equal(out, table[index.residuals[tokens]].reshape(len(tokens), -1))


def _rescore_case(small, seed: int) -> dict:
    """A rescoring's inputs on the small index: 7 documents (one of them twice), their int32
    residual products (random) at scattered rows of a wider array, 5 query rows longer than 1, a
    random score table wider than the rows."""
    index, codec = small["index"], small["codec"]
    rng = np.random.default_rng(seed)
    docs = np.array([3, 0, 77, index.n_docs - 1, 40, 3, 101])
    first = index.doc_offsets[docs]
    lengths = index.doc_offsets[docs + 1] - first
    rows = np.cumsum(np.concatenate([[2], lengths[:-1] + 3]))  # gaps between documents' rows
    rows[5] = rows[0]  # the repeated document reads the same products
    q = _unit(rng.standard_normal((5, DIM))) * np.float32(1.5)  # (a merged row is longer than 1)
    products = rng.integers(-3000, 3000, (int(rows[-1] + lengths[-1] + 2), 7)).astype(np.int32)
    row_scales = rng.uniform(1e-4, 2e-4, 5).astype(np.float32)
    table = rng.standard_normal((len(codec.centroids), 6)).astype(np.float32)
    return {"index": index, "codec": codec, "docs": docs, "first": first, "lengths": lengths, "rows": rows, "q": q,
            "products": products, "row_scales": row_scales, "table": table}


def _rescored(case: dict, margin: float) -> np.ndarray:
    index, codec = case["index"], case["codec"]
    return kernels.rescore_int8(case["products"], case["row_scales"], case["table"], index.codes,
                                index.token_inv_norms, codec.centroids, kernels.float_words(codec.byte_weights),
                                index.residuals, case["q"], margin, case["first"], case["rows"], case["lengths"])


@needs_int8
@pytest.mark.parametrize("margin", [0.0, 0.03, math.inf])
def test_the_rescoring_takes_each_rows_float32_maximum_over_its_int8_candidates(small, margin):
    """A row's maximum is the float32 score (centroid + residual, times the inverse norm) of the
    tokens whose int8 score (``token_maxsum_int8``'s formula) is within the margin times the
    row's norm of the row's best; with an infinite margin, of every token: the document's
    float32 MaxSim."""
    case = _rescore_case(small, 7)
    index, codec, q = case["index"], case["codec"], case["q"]
    got = _rescored(case, margin)
    assert got.dtype == np.float32 and got.shape == (len(case["docs"]),)
    want = []
    for first, n, row in zip(case["first"], case["lengths"], case["rows"]):
        tokens = np.arange(first, first + n)
        inv = index.token_inv_norms[tokens][:, None]
        int8_scores = (case["products"][row:row + n, :len(q)].astype(np.float32) * case["row_scales"]
                       + case["table"][index.codes[tokens], :len(q)]) * inv
        vectors = codec.decompress(index.codes[tokens], index.residuals[tokens], normalize=False)
        float_scores = (vectors.astype(np.float64) @ q.T.astype(np.float64)) * inv
        tolerance = np.float32(margin) * np.linalg.norm(q, axis=1)  # (the rows' norms are 1.5)
        candidates = int8_scores >= int8_scores.max(axis=0) - tolerance
        want.append(np.where(candidates, float_scores, -np.inf).max(axis=0).sum())
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    assert got[0] == got[5]  # the same document and products twice
    if margin == math.inf:  # every token: the engine's float32 MaxSim of the decompressed vectors
        scores, ids = index.exact_maxsim(q[None], index.n_docs)
        by_doc = dict(zip(ids[0].tolist(), scores[0].tolist()))
        np.testing.assert_allclose(got, [by_doc[d] for d in case["docs"].tolist()], rtol=2e-6, atol=2e-6)


@needs_int8
@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("refine_margin", [0.0, 0.05, math.inf])
def test_refine_rescores_the_best_int8_scores_then_those_within_the_margin(small, k, refine_margin):
    """refine_int8 is the int8 exact stage's end: the k best int8 scores rescored in float32, then
    every other document whose int8 score plus the margin times its magnitude reaches the k-th
    best float32 score, and the best k of the rescored by score, then id."""
    case = _rescore_case(small, 9)
    index, codec = case["index"], case["codec"]
    keep = [0, 1, 2, 3, 4, 6]  # (not the repeated document)
    ids, rows = case["docs"][keep], case["rows"][keep]
    rng = np.random.default_rng(k)
    scores = np.round(rng.normal(size=len(ids)), 1).astype(np.float32)  # ties among the int8 scores
    magnitudes = rng.uniform(0.5, 3.0, len(ids)).astype(np.float32)
    words = kernels.float_words(codec.byte_weights)

    def rescore(which):
        first = index.doc_offsets[ids[which]]
        return kernels.rescore_int8(case["products"], case["row_scales"], case["table"], index.codes,
                                    index.token_inv_norms, codec.centroids, words, index.residuals, case["q"],
                                    int8.PAIR_MARGIN, first, rows[which], index.doc_offsets[ids[which] + 1] - first)

    exact = np.full(len(ids), -np.inf, np.float32)
    top = np.argsort(-scores, kind="stable")[:k]  # (equal int8 scores: the earlier document)
    exact[top] = rescore(top)
    refined = np.isin(np.arange(len(ids)), top)
    more = np.flatnonzero(~refined & (scores + np.float32(refine_margin) * magnitudes >= exact[top].min()))
    exact[more] = rescore(more)
    refined[more] = True
    order = np.lexsort((ids[refined], -exact[refined]))[:k]  # score descending, then id ascending
    want = exact[refined][order], ids[refined][order]
    got = kernels.refine_int8(case["products"], case["row_scales"], case["table"], index.codes, index.token_inv_norms,
                              codec.centroids, words, index.residuals, case["q"], int8.PAIR_MARGIN, refine_margin,
                              index.doc_offsets, ids, scores, magnitudes, rows, k)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    assert got[2] == refined.sum() and (got[2] == len(ids) if refine_margin == math.inf else got[2] >= k)


@needs_int8
def test_the_rescoring_of_no_documents_or_no_rows():
    empty = np.zeros(0, np.int64)
    args = (np.zeros((4, 3), np.int32), np.ones(3, np.float32), np.zeros((2, 3), np.float32),
            np.zeros(4, np.uint16), np.ones(4, np.float32), np.zeros((2, 8), np.float32),
            kernels.float_words(np.zeros((256, 4), np.float32)), np.zeros((4, 2), np.uint8))
    assert kernels.rescore_int8(*args, np.ones((3, 8), np.float32), 0.01, empty, empty, empty).shape == (0,)
    two = np.array([0, 2])
    assert kernels.rescore_int8(*args, np.ones((0, 8), np.float32), 0.01, two, two,
                                np.array([2, 2])).tolist() == [0.0, 0.0]


@needs_int8
def test_a_dequantized_product_is_its_numpy_formula():
    rng = np.random.default_rng(4)
    products = rng.integers(-30000, 30000, (9, 5)).astype(np.int32)
    rows, cols = rng.uniform(0, 0.01, 9).astype(np.float32), rng.uniform(0, 0.01, 5).astype(np.float32)
    want = (products.astype(np.float32) * rows[:, None]) * cols[None, :]
    np.testing.assert_array_equal(kernels.dequantize(products, rows, cols), want)


@needs_int8
def test_the_int8_exact_stage_reduces_as_its_formula_says():
    rng = np.random.default_rng(5)
    n_tokens, rows = 30, 6
    products = rng.integers(-5000, 5000, (n_tokens, rows + 2)).astype(np.int32)  # wider than the rows read
    row_scales = rng.uniform(1e-5, 2e-5, rows).astype(np.float32)
    table = rng.standard_normal((7, rows)).astype(np.float32)
    codes = rng.integers(0, 7, 100).astype(np.uint16)
    inv = rng.uniform(0.9, 1.2, 100).astype(np.float32)
    tokens = rng.choice(100, n_tokens, replace=False)
    lengths = np.array([4, 1, 10, 15])
    out, magnitudes = np.empty(4, np.float32), np.empty(4, np.float32)
    kernels.token_maxsum_int8(products, row_scales, table, codes, inv, tokens, lengths, out, magnitudes)
    token_scores = (products[:, :rows].astype(np.float32) * row_scales + table[codes[tokens]]) * inv[tokens, None]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    best = np.maximum.reduceat(token_scores, starts, axis=0)
    np.testing.assert_allclose(out, best.sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(magnitudes, np.abs(best).sum(axis=1), rtol=1e-5)


# -- searches ---------------------------------------------------------------------------------


@needs_int8
def test_int8_searches_return_float32_maxsim_of_the_float32_engines_documents(small):
    index, queries = small["index"], small["queries"]
    f32, i8 = SearchParams(products="float32"), SearchParams(products="int8")
    for params in ({}, {"ncells": 32, "centroid_score_threshold": -math.inf, "ndocs": 600, "exact_margin": math.inf},
                   {"dim": 16}):  # a prefix: int8 centroid scores, the float32 exact stage
        want = index.search(queries, 5, SearchParams(**params, products="float32"))
        got = index.search(queries, 5, SearchParams(**params, products="int8"))
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    exact_scores, exact_ids = index.exact_maxsim(queries, 5)  # every document's decompressed MaxSim
    got_scores, got_ids = index.search(queries, 5, i8)
    for q in range(len(queries)):
        reference = dict(zip(exact_ids[q].tolist(), exact_scores[q].tolist()))
        for doc, score in zip(got_ids[q].tolist(), got_scores[q].tolist()):
            if doc in reference:
                assert score == pytest.approx(reference[doc], abs=1e-5)
    allowed = np.arange(0, index.n_docs, 4)
    np.testing.assert_array_equal(index.search(queries, 5, i8, allowed=allowed)[1],
                                  index.search(queries, 5, f32, allowed=allowed)[1])
    batched = index.search(queries, 5, i8, threads=2)
    single = [index.search(q[None], 5, i8, threads=2) for q in queries]
    np.testing.assert_array_equal(batched[1], np.concatenate([s[1] for s in single]))
    padding = index.search(np.zeros((1, 4, DIM), np.float32), 3, i8)
    assert (padding[0] == 0).all() and (padding[1] >= 0).all()


@needs_int8
def test_documents_the_int8_scores_rank_low_are_rescored_within_the_margin(small, monkeypatch):
    """With no margin only the int8 top k are rescored; the margin rescored every document
    that could still reach the top k, so a huge one changes nothing."""
    index, queries = small["index"], small["queries"]
    params = SearchParams(products="int8", ndocs=600, exact_tokens=5000)
    default = index.search(queries, 5, params)
    monkeypatch.setattr(int8, "REFINE_MARGIN", 1e9)
    everything = index.search(queries, 5, params)
    np.testing.assert_array_equal(default[1], everything[1])
    np.testing.assert_allclose(default[0], everything[0], rtol=1e-6)  # (rescored in other blocks: an ulp apart)
    monkeypatch.setattr(int8, "REFINE_MARGIN", 0.0)
    tight = index.search(queries, 5, params)
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(tight[1].tolist(), default[1].tolist())]) >= 0.9


@needs_int8
def test_the_rescorings_token_margin_leaves_the_results_of_scoring_every_token(small, monkeypatch):
    """With an infinite pair margin every token of a rescored document is scored in float32:
    the default margin gives the same documents and scores (to the dot products' order)."""
    index, queries = small["index"], small["queries"]
    params = SearchParams(products="int8", ndocs=600, exact_tokens=5000)
    default = index.search(queries, 5, params)
    monkeypatch.setattr(int8, "PAIR_MARGIN", math.inf)
    every = index.search(queries, 5, params)
    np.testing.assert_array_equal(default[1], every[1])
    np.testing.assert_allclose(default[0], every[0], rtol=1e-6, atol=1e-6)


@needs_int8
def test_a_single_query_at_two_threads_runs_torchs_products_on_both(small, monkeypatch):
    """threads=2 on one query: its int8 products at two torch threads, the same results as at
    one (int32 sums are exact in any order); a batch keeps torch at one thread a query, and so
    does a search without ``threads``."""
    index, queries = small["index"], small["queries"]
    params = SearchParams(products="int8")
    torch = int8.torch_module()
    seen = []
    original = int8.int_mm

    def spy(a, b, out=None):
        seen.append(torch.get_num_threads())
        return original(a, b, out=out)

    monkeypatch.setattr(int8, "int_mm", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for q in queries:
            one = index.search(q[None], 5, params, threads=1)
            seen.clear()
            two = index.search(q[None], 5, params, threads=2)
            assert set(seen) == {2}
            np.testing.assert_array_equal(two[1], one[1])
            np.testing.assert_array_equal(two[0], one[0])
        seen.clear()
        index.search(queries, 5, params, threads=2)
        index.search(queries[:1], 5, params)
        assert set(seen) == {1}
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _threads_in_child(conn) -> None:
    with int8.torch_threads(2):
        conn.send(int8.torch_module().get_num_threads())
    conn.close()


@needs_int8
def test_a_forked_child_runs_torchs_products_at_one_thread():
    """GNU OpenMP's pool is not fork-safe (a parallel region in the child of a parent whose pool
    ran hangs): a child forked after torch was imported keeps its products at one thread."""
    import multiprocessing

    with int8.torch_threads(2):  # the parent's pool runs
        assert int8.torch_module().get_num_threads() == 2
        int8.int_mm(np.ones((512, 64), np.int8), np.ones((64, 16), np.int8))
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_threads_in_child, args=(child,))
    proc.start()
    try:
        assert parent.poll(60), "the child hung"
        assert parent.recv() == 1
        proc.join(10)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
