"""Compiled loops of the PLAID engine's probe, centroid and exact stages (numba), numpy's answers.

Four steps of :class:`indexing.plaid.CentroidIndex.search` are a gather, a maximum and a
sum per document (or a scan per centroid), which numpy can only run as separate passes over
materialised temporaries: the probe (each query row's best cells by repeated ``argmax`` over
a transposed copy of the centroid scores, and the centroids whose cosine reaches the
threshold), the centroid interaction (score rows gathered into a padded block and reduced),
the exact stage's decode (the tokens' residual bytes gathered, then the byte table) and its
segment maxima (the tokens' centroid scores added, scaled by the inverse norms, reduced by
``ufunc.reduceat``, which holds the GIL). Here each is one loop, compiled by numba
(``nogil``: the threads of a split query run them at once), reading the index's arrays in
place: :func:`probe_documents`, :func:`cell_maxsum_docs`, :func:`decode_residuals`, :func:`token_maxsum`.

The results are numpy's bit for bit: maxima do not depend on order, ties go where numpy
sends them, every sum is taken in the order numpy takes it (the exact stage's over query
rows one after another, as ``sum(axis=0)`` of a ``(rows, documents)`` array; the centroid
stage returns its maxima and numpy sums them, as before), and the arithmetic is the same
float32 operations in the same order (no fused multiply-add: numba's default keeps IEEE
order).

The query rows' merge (``indexing.plaid.merge_query_tokens``, ~0.15 ms of a query as a
Python loop) runs here too (:func:`merge_rows`), its sums numpy's floats, and so do two index
lookups numpy ran as several passes over temporaries: the candidates of the probed cells'
inverted lists (:func:`cell_documents`) and the exact stage's token positions (:func:`ranges`).

With int8 products (:mod:`indexing.int8`) the exact stage runs these loops otherwise: the
decode into int8 words (:func:`decode_words`), the scaling of an int32 product back to scores
(:func:`dequantize`), the int8 scores' segment maxima (:func:`token_maxsum_int8`, the float32
stage's loop with scaled products), and the float32 rescoring of the best documents
(:func:`rescore_int8`: each row's few candidate tokens by their int8 scores, decoded and
multiplied in float32). They have no numpy twin: int8 products need these stages
(``products="auto"`` is float32 without them), and their float32 scores equal the float32
engine's to ~1e-6 (other sums, other order), not bit for bit.

A search's bookkeeping between those stages runs here too, each step one call where numpy took
several small ones (a query's ~650 Python and numpy calls cost ~0.8 ms of a ~1.9 ms Tatoeba
query): the probe and the documents of its cells (:func:`probe_documents`), the best k of a stage
by score then id (:func:`top_k`, numpy's order), the exact stage's token layout
(:func:`exact_layout`), its second pass (:func:`early_rest`) and, with int8 products, its
rescoring and final selection (:func:`refine_int8`). Their results are the numpy steps' (the
rescoring's first documents are the k best int8 scores with equal ones taken in order, where
``argpartition`` took any).

numba is a dependency; where it is not installed or cannot be imported, or with
``TESSERA_KERNELS=numpy`` in the environment at import, :data:`ENABLED` is False and the
engine runs its numpy stages (the same results). numba is imported on a process's first search
(:func:`ready`), not with this module: an index build or an embed job that imports the engine
never loads it. The kernels compile on their first call (~2 s for the four after an install,
then cached on disk beside this file or in numba's user cache, ~0.2 s to load; without a
writable place, per process); :meth:`indexing.plaid.CentroidIndex.warm` does that ahead of a
first query.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import threading

import numpy as np

logger = logging.getLogger(__name__)

#: environment variable that chooses the stages' implementation: ``numba`` (default) or ``numpy``
ENV = "TESSERA_KERNELS"
_CHOICES = ("numba", "numpy")


def _numba_wanted() -> bool:
    """Whether the compiled stages are to run: not switched off by :data:`ENV` and numba
    installed (found without importing it: a process that never searches, an index build,
    does not pay numba's import, ~0.3 s and ~60 MB)."""
    choice = os.environ.get(ENV, "numba").strip().lower() or "numba"
    if choice not in _CHOICES:
        raise ValueError(f"{ENV} must be one of {', '.join(_CHOICES)}, got {os.environ.get(ENV)!r}")
    return choice == "numba" and importlib.util.find_spec("numba") is not None


#: whether the compiled stages run (numba installed and not switched off by :data:`ENV`; set
#: to False by :func:`ready` where numba is installed but cannot be imported)
ENABLED = _numba_wanted()
_numba = None
_lock = threading.RLock()


def ready() -> bool:
    """Import numba for the kernels (once, on a process's first search); returns
    :data:`ENABLED`, which turns False where the import fails (a platform without numba's
    wheels, a numba too old for this numpy): the engine then runs its numpy stages."""
    global ENABLED, _numba
    if not ENABLED or _numba is not None:
        return ENABLED
    with _lock:
        if ENABLED and _numba is None:
            try:
                import numba
            except ImportError as err:
                logger.info("numba not importable (%s): the PLAID engine runs its numpy stages", err)
                ENABLED = False
            else:
                global _prefetch_row, _prefetch_at, _dot, _copy_byte_words
                global _rescore_doc, _rescore_buffers, _select_top, _probe_pass, _mark_documents
                _prefetch_row, _prefetch_at = _prefetch_helpers()
                _dot = _dot_helper(numba)
                _copy_byte_words = numba.njit(inline="always", nogil=True, boundscheck=False)(_byte_words_copy)
                helper = numba.njit(nogil=True, boundscheck=False)
                _rescore_doc = helper(_rescore_one)
                _rescore_buffers = helper(_rescore_scratch)
                _select_top = helper(_top_keys)
                _probe_pass = helper(_probe_scan)
                _mark_documents = helper(_documents_of)
                _numba = numba
    return ENABLED


#: the kernels' software prefetch of an array's row, and of a 1-D array's element (:func:`_prefetch_helpers`),
#: defined once numba is imported
_prefetch_row = None
_prefetch_at = None

#: how many tokens ahead the decodes ask for a token's residual row: a query's
#: exact stage reads ~7,000 rows scattered over tens of MB, and with the caches cold (another
#: process's work between two queries) each row's miss came one after another; 8 rows ahead,
#: XQuAD-sentence tokens decoded in 84 ns each instead of 407 after a 64 MB sweep (35 instead
#: of 43 warm); 16 ahead no faster. Not worth it where measured: the score rows token_maxsum
#: reads (the query's table, in L2 from the probe: 4% slower with) and the centroid rows of the
#: (thirty-sixth session's) rescoring (24 lines a token: 3-6% slower with). The centroid stage's
#: documents' cell offsets and cells, the exact stage's layout's document offsets and its tokens'
#: codes and inverse norms (one line a document or so, each a miss with the caches cold) are asked
#: for as far ahead (thirty-ninth session: Tatoeba 2.34 -> 2.14 ms a query after a 64 MB sweep,
#: medians of 5 runs alternating; 1.84 -> 1.79 warm)
PREFETCH_AHEAD = 8


def _prefetch_helpers():
    """``_prefetch_row(array, i)``, for the kernels: LLVM's ``prefetch`` of every cache line of
    row ``i`` of a 2-D array (for reading, kept in every cache level). A hint: no fault for any
    address, no result; the kernels issue it some rows ahead of the row they read."""
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic, register_jitable

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        data = context.make_array(array_type)(context, builder, args[0])
        index = [context.cast(builder, value, kind, types.intp)
                 for value, kind in zip(args[1:], signature.args[1:])]
        pointer = cgutils.get_item_pointer(context, builder, array_type, data, index, wraparound=False)
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]), "llvm.prefetch.p0i8")
        # read (0), highest locality (3), data cache (1)
        builder.call(function, [builder.bitcast(pointer, byte_pointer), ir.Constant(i32, 0), ir.Constant(i32, 3),
                                ir.Constant(i32, 1)])
        return context.get_dummy_value()

    @intrinsic
    def prefetch(typingctx, array, i, j):
        if not isinstance(array, types.Array) or array.ndim != 2:
            return None
        return types.void(array, i, j), codegen

    @intrinsic
    def prefetch_at(typingctx, array, i):
        if not isinstance(array, types.Array) or array.ndim != 1:
            return None
        return types.void(array, i), codegen

    @register_jitable
    def prefetch_row(array, i):
        last = array.shape[1] - 1
        for j in range(0, last, max(1, 64 // array.itemsize)):
            prefetch(array, i, j)
        prefetch(array, i, last)

    return prefetch_row, prefetch_at


#: the rescoring's float32 dot product of two rows (:func:`_dot_helper`), defined once numba is imported
_dot = None

#: :func:`_byte_words_copy` compiled (inlined into the kernels that call it) once numba is imported
_copy_byte_words = None

#: :func:`_rescore_one`, :func:`_rescore_scratch`, :func:`_top_keys`, :func:`_probe_scan` and
#: :func:`_documents_of` compiled (called by the kernels that use them) once numba is imported
_rescore_doc = None
_rescore_buffers = None
_select_top = None
_probe_pass = None
_mark_documents = None


def _byte_words_copy(byte_words, words, n_bytes, packed, row):  # pragma: no cover (compiled)
    # Each of the n_bytes stored bytes of packed as its row of byte_words ((256, words): its decoded
    # values as 8-byte words, or one value a word), written one after another to row. A byte's
    # words are loaded before any is stored: with a store between two loads LLVM must assume the
    # store may change the table (it cannot tell the arrays apart) and copies word by word; this
    # way 2.3x faster at 2 bits (1,024 tokens: 60 us, not 139).
    if words == 2:  # float32 at nbits 2
        for b in range(n_bytes):
            values = byte_words[packed[b]]
            v0 = values[0]
            v1 = values[1]
            row[2 * b] = v0
            row[2 * b + 1] = v1
    elif words == 4:  # float32 at nbits 1
        for b in range(n_bytes):
            values = byte_words[packed[b]]
            v0 = values[0]
            v1 = values[1]
            v2 = values[2]
            v3 = values[3]
            row[4 * b] = v0
            row[4 * b + 1] = v1
            row[4 * b + 2] = v2
            row[4 * b + 3] = v3
    else:  # one word a byte (nbits 4), or float32 values one by one
        for b in range(n_bytes):
            values = byte_words[packed[b]]
            for w in range(words):
                row[b * words + w] = values[w]


def _dot_helper(numba):
    """``_dot(a, b)``, for the kernels: the float32 dot product of two 1-D float32 arrays, its sum
    reassociated (``fastmath={"reassoc"}`` on this function only) so that LLVM sums it in vector
    lanes: 384 products in ~30 ns instead of a chain of 384 dependent additions (~600 ns). The
    sum's order is LLVM's lanes', not numpy's or BLAS's: the last bits may differ from theirs."""

    @numba.njit(nogil=True, boundscheck=False, fastmath={"reassoc"})
    def dot(a, b):
        total = np.float32(0.0)
        for e in range(a.shape[0]):
            total += a[e] * b[e]
        return total

    return dot


def loaded() -> bool:
    """Whether numba is imported and the compiled stages run (:func:`ready` was called and
    succeeded): the search path's helpers ask this, never importing numba themselves."""
    return ENABLED and _numba is not None


class _Kernel:
    """A loop compiled by numba on its first call (nogil, no bounds checks, cached on disk
    where numba finds a writable place: beside this file, else its user cache)."""

    def __init__(self, fn) -> None:
        self.py_func = fn
        self._compiled = None

    def __call__(self, *args):
        compiled = self._compiled
        if compiled is None:
            compiled = self._compile()
        return compiled(*args)

    def _compile(self):
        with _lock:
            if self._compiled is None:
                if not ready():
                    raise RuntimeError(f"{self.py_func.__name__}: numba is not importable ({ENV}, ENABLED)")
                try:
                    self._compiled = _numba.njit(nogil=True, cache=True, boundscheck=False)(self.py_func)
                except RuntimeError as err:  # "cannot cache function ...: no locator available"
                    logger.info("numba cannot cache %s (%s): it compiles in each process", self.py_func.__name__, err)
                    self._compiled = _numba.njit(nogil=True, boundscheck=False)(self.py_func)
            return self._compiled


_KERNELS: "list[_Kernel]" = []


def _jit(fn) -> _Kernel:
    kernel = _Kernel(fn)
    _KERNELS.append(kernel)
    return kernel


def loaded_variants() -> dict[str, int]:
    """Each kernel's compiled variants (one per combination of argument types: array
    layouts, read-only or not) loaded or compiled in this process so far, by the kernel's
    name; 0 for a kernel not yet called. What :meth:`indexing.plaid.CentroidIndex.warm`
    loads, and whether a later search needed another."""
    return {k.py_func.__name__.lstrip("_"): len(k._compiled.signatures) if k._compiled is not None else 0
            for k in _KERNELS}


_NO_MASK = np.ones(1, dtype=bool)


#: most query rows whose sum :func:`cell_maxsum_docs` takes in its loop (numpy's pairwise sum sums up to
#: 128 values in one block; beyond it halves them, and the maxima are summed by numpy)
_PAIRWISE_BLOCK = 128


@_jit
def _cell_maxsum(table, doc_cells, offsets, docs, kept, use_kept, maxima, out):  # pragma: no cover (compiled)
    # document d's cells are doc_cells[offsets[docs[d]] : offsets[docs[d] + 1]]
    n_rows = table.shape[1]
    inline = n_rows <= _PAIRWISE_BLOCK
    best = np.empty(n_rows, dtype=np.float32)
    for d in range(len(docs)):
        best[:] = -np.inf
        # the offsets two steps ahead, then the cells one step ahead (their offsets asked for before)
        if d + 2 * PREFETCH_AHEAD < len(docs):
            _prefetch_at(offsets, docs[d + 2 * PREFETCH_AHEAD])
        if d + PREFETCH_AHEAD < len(docs):
            _prefetch_at(doc_cells, offsets[docs[d + PREFETCH_AHEAD]])
        for i in range(offsets[docs[d]], offsets[docs[d] + 1]):
            c = doc_cells[i]
            if use_kept and not kept[c]:
                continue
            row = table[c]
            for j in range(n_rows):
                best[j] = max(best[j], row[j])
        if not inline:
            maxima[d] = best
            continue
        # numpy's float32 sum of a row of at most 128 values (its pairwise_sum): in order under
        # 8, else eight running sums over blocks of 8, combined pairwise, then the rest in order
        if n_rows < 8:
            total = np.float32(0.0)
            for j in range(n_rows):
                total += best[j]
        else:
            r0 = best[0]
            r1 = best[1]
            r2 = best[2]
            r3 = best[3]
            r4 = best[4]
            r5 = best[5]
            r6 = best[6]
            r7 = best[7]
            j = 8
            while j < n_rows - n_rows % 8:
                r0 += best[j]
                r1 += best[j + 1]
                r2 += best[j + 2]
                r3 += best[j + 3]
                r4 += best[j + 4]
                r5 += best[j + 5]
                r6 += best[j + 6]
                r7 += best[j + 7]
                j += 8
            total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
            while j < n_rows:
                total += best[j]
                j += 1
        out[d] = total


def cell_maxsum_docs(table: np.ndarray, doc_cells: np.ndarray, doc_cell_offsets: np.ndarray, docs: np.ndarray,
                     kept: "np.ndarray | None" = None) -> np.ndarray:
    """``(len(docs),)`` float32 centroid interaction of documents ``docs`` (positions): for each
    one, the maximum over its cells of each query row's centroid score (``table[cell, row]``,
    ``table`` ``(n_centroids, rows)``, any row stride; only cells where ``kept`` is True when
    given; ``-inf`` for a document left without cells), summed over the rows as numpy's
    ``sum(axis=1, dtype=float32)`` sums such a ``(n, rows)`` array (the same floats), without
    building it: numpy's sum over the short rows took ~40 us of a query's ~1,400 candidates.

    Document ``d``'s cells are ``doc_cells[doc_cell_offsets[d] : doc_cell_offsets[d + 1]]``, the
    index's arrays read in place."""
    n = len(docs)
    out = np.empty(n, dtype=np.float32)
    if not n:
        return out
    use_kept = kept is not None
    inline = table.shape[1] <= _PAIRWISE_BLOCK
    maxima = np.empty((1, 1) if inline else (n, table.shape[1]), dtype=np.float32)
    _cell_maxsum(table, doc_cells, doc_cell_offsets, docs, kept if use_kept else _NO_MASK, use_kept, maxima, out)
    return out if inline else maxima.sum(axis=1, dtype=np.float32)


@_jit
def _token_maxsum(products, row_scales, scores_t, codes, inv_norms, tokens, lengths, out,
                  magnitudes):  # pragma: no cover (compiled)
    n_rows = row_scales.shape[0]
    best = np.empty(n_rows, dtype=np.float32)
    n_tokens = len(tokens)
    t = 0
    for d in range(len(lengths)):
        best[:] = -np.inf
        for _ in range(lengths[d]):
            if t + 2 * PREFETCH_AHEAD < n_tokens:  # the code and inverse norm of a token ahead
                ahead = tokens[t + 2 * PREFETCH_AHEAD]
                _prefetch_at(codes, ahead)
                _prefetch_at(inv_norms, ahead)
            token = tokens[t]
            row = scores_t[codes[token]]
            s = inv_norms[token]
            for j in range(n_rows):
                # (float32 products come with scales of 1: x * 1 is x, numpy's floats)
                best[j] = max(best[j], (np.float32(products[t, j]) * row_scales[j] + row[j]) * s)
            t += 1
        total = best[0]
        size = abs(best[0])
        for j in range(1, n_rows):
            total += best[j]
            size += abs(best[j])
        out[d] = total
        magnitudes[d] = size


def token_maxsum(products: np.ndarray, scores_t: np.ndarray, codes: np.ndarray, inv_norms: np.ndarray,
                 tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``(n,)`` float32 exact MaxSim of documents whose tokens are ``tokens`` (positions in
    ``codes`` and ``inv_norms``, the index's arrays; consecutive documents of ``lengths`` tokens,
    each >= 1), from the tokens' residual products ``products`` ``(len(tokens), rows)``: token
    ``t`` scores ``(products[i] + scores_t[codes[t]]) * inv_norms[t]`` per query row, a document
    the sum over rows of its tokens' maxima. The same floats as numpy's ``products +
    take(scores_t, codes)``, ``*= inv_norms``, segment maxima and ``sum(axis=0)`` over the rows."""
    out = np.empty(len(lengths), dtype=np.float32)
    if len(lengths) and products.shape[1]:
        _token_maxsum(products, np.ones(products.shape[1], dtype=np.float32), scores_t, codes, inv_norms, tokens,
                      lengths, out, np.empty(len(lengths), dtype=np.float32))
    elif len(lengths):
        out[:] = 0.0
    return out


@_jit
def _decode(byte_words, residuals, tokens, out):  # pragma: no cover (compiled)
    words = byte_words.shape[1]  # 8-byte words of one byte's decoded values, or the values
    n_bytes = residuals.shape[1]
    n = len(tokens)
    for i in range(n):
        if i + PREFETCH_AHEAD < n:
            _prefetch_row(residuals, tokens[i + PREFETCH_AHEAD])
        _copy_byte_words(byte_words, words, n_bytes, residuals[tokens[i]], out[i])


@_jit
def _decode_words(words, residuals, tokens, out):  # pragma: no cover (compiled)
    # One word a byte (a 1-D table): LLVM turns the inner loop into vector gathers, 2.2-2.3x
    # faster than the same copies unrolled by hand (1,024 XQuAD-sentence tokens: int8 at 2 bits
    # 50 -> 22 us, at 4 bits 91 -> 39; float32 at 4 bits 137 -> 59).
    n = len(tokens)
    for i in range(n):
        if i + PREFETCH_AHEAD < n:
            _prefetch_row(residuals, tokens[i + PREFETCH_AHEAD])
        packed = residuals[tokens[i]]
        row = out[i]
        for b in range(packed.shape[0]):
            row[b] = words[packed[b]]


def decode_residuals(byte_weights: np.ndarray, residuals: np.ndarray, tokens: np.ndarray,
                     out: np.ndarray) -> np.ndarray:
    """The decoded residuals of ``tokens`` (positions in ``residuals``, the index's ``(N, bytes)``
    uint8 array), written to ``out`` ``(len(tokens), bytes * per_byte)`` float32 and returned:
    each stored byte's row of ``byte_weights`` (``ResidualCodec.byte_weights``), read straight
    from the index's array (no gathered copy of the tokens' bytes). The values of
    ``ResidualCodec.residual_vectors(residuals[tokens])``."""
    if len(tokens):
        # a byte's values copied as whole 8-byte words where they fill them (nbits 1, 2, 4: 8, 4,
        # 2 float32s; at 4 bits one word a byte, gathered); the bits are the floats'
        if byte_weights.shape[1] == 2 and out.shape[1] % 2 == 0 and out.flags.c_contiguous:
            _decode_words(np.ascontiguousarray(byte_weights).view(np.uint64).reshape(-1), residuals, tokens,
                          out.view(np.uint64))
        elif byte_weights.shape[1] % 2 == 0 and out.shape[1] % 2 == 0 and out.flags.c_contiguous:
            _decode(byte_weights.view(np.uint64), residuals, tokens, out.view(np.uint64))
        else:
            _decode(byte_weights, residuals, tokens, out)
    return out


def _probe_scan(table, products, c_scales, q_scales, dequantize, bounds, best_val, best_idx,
                kept):  # pragma: no cover (compiled)
    # (table written only when dequantize; it is one array either way: a second one to write
    # through made LLVM assume the rows could overlap, and the probe took 390 us, not 172)
    n_rows, ncells = best_val.shape
    floor = np.full(n_rows, -np.inf, dtype=np.float32)  # each row's smallest value among its best
    for c in range(table.shape[0]):
        row = table[c]
        if dequantize:  # the row's scores from the int8 product first, as _dequantize writes them
            source = products[c]
            scale = c_scales[c]
            for j in range(n_rows):
                row[j] = np.float32(source[j]) * scale * q_scales[j]
        # First whether the centroid is kept and whether any row takes it, in one loop of
        # compares that LLVM vectorises; a row taking it is the rare case (a few dozen times a
        # row in 8,192 centroids): 3.5x faster than deciding both element by element in one loop
        keep = False
        hit = False
        for j in range(n_rows):
            v = row[j]
            keep |= v >= bounds[j]
            hit |= v > floor[j]
        kept[c] = keep
        if not hit:
            continue
        for j in range(n_rows):
            v = row[j]
            if v > floor[j]:  # an equal score ranks below the earlier centroid's: not taken
                # out goes the smallest, the latest centroid of equal smallest ones
                slot = 0
                for s in range(1, ncells):
                    if best_val[j, s] < best_val[j, slot] or (
                            best_val[j, s] == best_val[j, slot] and best_idx[j, s] > best_idx[j, slot]):
                        slot = s
                best_val[j, slot] = v
                best_idx[j, slot] = c
                low = best_val[j, 0]
                for s in range(1, ncells):
                    low = min(low, best_val[j, s])
                floor[j] = low


@_jit
def _probe_documents(table, products, c_scales, q_scales, dequantize, bounds, ncells, ivf_offsets, ivf_docs, n_docs,
                     mask, use_mask):  # pragma: no cover (compiled)
    n_centroids = table.shape[0]
    best_val = np.full((len(bounds), ncells), -np.inf, dtype=np.float32)
    best_idx = np.full((len(bounds), ncells), -1, dtype=np.int64)
    kept = np.empty(n_centroids, dtype=np.bool_)
    _probe_pass(table, products, c_scales, q_scales, dequantize, bounds, best_val, best_idx, kept)
    n_kept = 0
    for c in range(n_centroids):
        n_kept += kept[c]
    # the distinct cells, ascending (-1: a slot no score filled, a NaN row's), and their lists' length
    taken = np.zeros(n_centroids, dtype=np.bool_)
    n_cells = 0
    entries = 0
    for i in range(best_idx.shape[0]):
        for j in range(ncells):
            c = best_idx[i, j]
            if c >= 0 and not taken[c]:
                taken[c] = True
                n_cells += 1
                entries += ivf_offsets[c + 1] - ivf_offsets[c]
    cells = np.empty(n_cells, dtype=np.int64)
    n_cells = 0
    for c in range(n_centroids):
        if taken[c]:
            cells[n_cells] = c
            n_cells += 1
    hit = np.zeros(n_docs, dtype=np.bool_)
    out = np.empty(min(n_docs, entries), dtype=np.int64)
    n = _mark_documents(ivf_offsets, ivf_docs, cells, mask, use_mask, hit, out)
    return out[:n], kept, n_kept


def probe_documents(table: np.ndarray, bounds: np.ndarray, ncells: int, ivf_offsets: np.ndarray,
                    ivf_docs: np.ndarray, n_docs: int, mask: "np.ndarray | None" = None,
                    products: "tuple[np.ndarray, np.ndarray, np.ndarray] | None" = None
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """Candidate documents and kept centroids of one query in one pass over its centroid scores.

    ``table``: ``(n_centroids, rows)`` float32 scores (any row stride), ``bounds`` each row's
    float32 score to reach (``indexing.plaid``: the threshold times the row's norm),
    ``1 <= ncells < n_centroids``. The probed cells are the distinct centroids among each row's
    ``ncells`` best (equal scores: the lower centroid first, as repeated ``argmax`` takes them);
    returns ``(docs, kept, n_kept)``: the sorted distinct documents of their inverted lists
    (``ivf_docs[ivf_offsets[c] : ivf_offsets[c + 1]]``; ``mask``'s only, :func:`cell_documents`'
    answer), ``(n_centroids,)`` bool whether some row's score reaches its bound (as numpy's
    ``(table >= bounds).any(axis=1)``) and how many do.

    With ``products``, ``(int32 (n_centroids, >= rows) any strides, c_scales, q_scales)`` of an
    int8 centroid product, the scores are that product's (:func:`dequantize`'s floats), written to
    ``table`` (``(n_centroids, rows)`` float32) as the pass goes: one pass instead of two over the
    scores (8,192 centroids x 19 rows in 173 us instead of 240). Without, ``table`` is only read
    (a read-only one is copied first)."""
    use_mask = mask is not None
    bounds = np.ascontiguousarray(bounds, dtype=np.float32)
    if products is None:
        if not table.flags.writeable:  # (the loop compiles a write for the int8 scores, never taken here)
            table = np.array(table)
        products, c_scales, q_scales, dequantize = _NO_PRODUCTS, _NO_SCALES, _NO_SCALES, False
    else:
        products, c_scales, q_scales = products
        c_scales = np.ascontiguousarray(c_scales, dtype=np.float32)
        q_scales = np.ascontiguousarray(q_scales, dtype=np.float32)
        dequantize = True
    docs, kept, n_kept = _probe_documents(table, products, c_scales, q_scales, dequantize, bounds, int(ncells),
                                          ivf_offsets, ivf_docs, int(n_docs), mask if use_mask else _NO_MASK,
                                          use_mask)
    return docs, kept, int(n_kept)


_NO_PRODUCTS = np.zeros((1, 1), dtype=np.int32)
_NO_SCALES = np.zeros(1, dtype=np.float32)


# ---- the int8 products' stages (indexing.int8) -------------------------------------------


@_jit
def _dequantize(products, row_scales, col_scales, out):  # pragma: no cover (compiled)
    for i in range(products.shape[0]):
        r = row_scales[i]
        for j in range(products.shape[1]):
            out[i, j] = np.float32(products[i, j]) * r * col_scales[j]


def dequantize(products: np.ndarray, row_scales: np.ndarray, col_scales: np.ndarray) -> np.ndarray:
    """``(n, m)`` float32 ``products[i, j] * row_scales[i] * col_scales[j]`` (float32 arithmetic in
    that order) of an int32 product of row-scaled int8 matrices: the scores it stands for."""
    out = np.empty(products.shape, dtype=np.float32)
    if out.size:
        _dequantize(products, row_scales, col_scales, out)
    return out


def int8_words(table: np.ndarray) -> np.ndarray:
    """An int8 byte table ``(256, per_byte)`` (:func:`indexing.int8.quantize_table` of the codec's
    byte table) as one 1-D array of 1-, 2-, 4- or 8-byte words, a stored byte's values one word
    (what :func:`decode_words` copies)."""
    words = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[table.shape[1]]
    return np.ascontiguousarray(table, dtype=np.int8).view(words).reshape(-1)


def decode_words(words: np.ndarray, residuals: np.ndarray, tokens: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The int8 decoded residuals of ``tokens`` (positions in ``residuals``), written to ``out``
    ``(len(tokens), bytes * per_byte)`` int8 and returned: each stored byte's word of ``words``
    (:func:`int8_words`)."""
    if len(tokens):
        _decode_words(words, residuals, tokens, out.view(words.dtype))
    return out


def token_maxsum_int8(products: np.ndarray, row_scales: np.ndarray, scores_t: np.ndarray, codes: np.ndarray,
                      inv_norms: np.ndarray, tokens: np.ndarray, lengths: np.ndarray, out: np.ndarray,
                      magnitudes: np.ndarray) -> None:
    """The exact stage's approximate MaxSim from an int8 residual product: token ``t`` scores
    ``(products[t, j] * row_scales[j] + scores_t[codes[tokens[t]], j]) * inv_norms[tokens[t]]``
    against query row ``j < len(row_scales)`` (``products`` ``(len(tokens), >= rows)`` int32).
    Writes each document's sum over rows of its tokens' maxima to ``out`` and the sum of those
    maxima's absolute values to ``magnitudes``."""
    if len(lengths) and len(row_scales):  # the float32 stage's loop, its int32 products scaled
        _token_maxsum(products, row_scales, scores_t, codes, inv_norms, tokens, lengths, out, magnitudes)
    elif len(lengths):
        out[:] = 0.0
        magnitudes[:] = 0.0


def _rescore_one(products, row_scales, scores_t, codes, inv_norms, centroids, byte_words, residuals, q, first, rows,
                 n, tolerances, scores, vector_words, floor, best):  # pragma: no cover (compiled)
    # One document's float32 MaxSim for rescore_int8: its n tokens from index position first on,
    # their int32 products from row rows on; scores (>= n rows), vector_words, floor and best scratch.
    n_rows = q.shape[0]
    dim = q.shape[1]
    words = byte_words.shape[1]
    n_bytes = residuals.shape[1]
    vector = vector_words.view(np.float32)
    # the int8 scores of the document's tokens (token_maxsum_int8's) and each row's best
    floor[:] = -np.inf
    for t in range(n):
        token = first + t
        centroid_scores = scores_t[codes[token]]
        s = inv_norms[token]
        product = products[rows + t]
        token_scores = scores[t]
        for j in range(n_rows):
            v = (np.float32(product[j]) * row_scales[j] + centroid_scores[j]) * s
            token_scores[j] = v
            floor[j] = max(floor[j], v)
    for j in range(n_rows):
        floor[j] -= tolerances[j]
        best[j] = -np.inf
    # float32 scores of the tokens within the tolerance of a row's best, each token decoded once
    for t in range(n):
        token_scores = scores[t]
        wanted = False
        for j in range(n_rows):
            wanted |= token_scores[j] >= floor[j]
        if not wanted:
            continue
        token = first + t
        # the residual (and a last byte's padding past dim)
        _copy_byte_words(byte_words, words, n_bytes, residuals[token], vector_words)
        centroid = centroids[codes[token]]
        for e in range(dim):
            vector[e] += centroid[e]
        s = inv_norms[token]
        for j in range(n_rows):
            if token_scores[j] >= floor[j]:
                best[j] = max(best[j], _dot(q[j], vector[:dim]) * s)
    total = best[0]
    for j in range(1, n_rows):
        total += best[j]
    return total


def _rescore_scratch(q, byte_words, residuals, margin, max_tokens):  # pragma: no cover (compiled)
    # _rescore_one's scratch arrays and each row's tolerance, margin x the row's norm
    n_rows = q.shape[0]
    tolerances = np.empty(n_rows, dtype=np.float32)
    for j in range(n_rows):
        tolerances[j] = np.float32(margin) * np.float32(np.sqrt(_dot(q[j], q[j])))
    return (tolerances, np.empty((max(max_tokens, 1), n_rows), dtype=np.float32),
            np.empty(residuals.shape[1] * byte_words.shape[1], dtype=np.uint64), np.empty(n_rows, dtype=np.float32),
            np.empty(n_rows, dtype=np.float32))


@_jit
def _rescore_int8(products, row_scales, scores_t, codes, inv_norms, centroids, byte_words, residuals, q, margin,
                  first_tokens, product_rows, lengths, out):  # pragma: no cover (compiled)
    tolerances, scores, vector_words, floor, best = _rescore_buffers(q, byte_words, residuals, margin, lengths.max())
    for d in range(len(lengths)):
        out[d] = _rescore_doc(products, row_scales, scores_t, codes, inv_norms, centroids, byte_words, residuals, q,
                              first_tokens[d], product_rows[d], lengths[d], tolerances, scores, vector_words, floor,
                              best)


def float_words(byte_weights: np.ndarray) -> np.ndarray:
    """The codec's float32 byte table ``(256, per_byte)`` (``ResidualCodec.byte_weights``) as
    ``(256, per_byte / 2)`` 8-byte words (nbits 4, 2, 1: 1, 2 or 4 words a byte), what
    :func:`rescore_int8` copies a byte's values as."""
    return np.ascontiguousarray(byte_weights, dtype=np.float32).view(np.uint64)


def rescore_int8(products: np.ndarray, row_scales: np.ndarray, scores_t: np.ndarray, codes: np.ndarray,
                 inv_norms: np.ndarray, centroids: np.ndarray, byte_words: np.ndarray, residuals: np.ndarray,
                 q: np.ndarray, margin: float, first_tokens: np.ndarray, product_rows: np.ndarray,
                 lengths: np.ndarray) -> np.ndarray:
    """``(len(lengths),)`` float32 MaxSim of documents against the query rows ``q`` ``(rows, dim)``,
    each row's maximum taken over the tokens its int8 score puts within ``margin`` times the
    row's norm of the row's best int8 score: those tokens' float32 scores, ``(q[j] . (centroid +
    residual)) * inv_norm`` (``ResidualCodec.decompress(..., normalize=False)``'s vectors, each
    decoded once a document; ``byte_words``: :func:`float_words` of the codec's byte table).
    Document ``d`` has ``lengths[d]`` (>= 1) tokens from index position ``first_tokens[d]`` on,
    and its int32 residual products are rows ``product_rows[d]`` on of ``products`` (the int8
    exact stage's, :func:`token_maxsum_int8`'s scores: ``(products[t, j] * row_scales[j] +
    scores_t[code, j]) * inv_norm``). Where every row's best float32 token is within the
    margin this is the document's float32 MaxSim over every token (up to the order of the dot
    products' sums: LLVM's vector lanes)."""
    out = np.empty(len(lengths), dtype=np.float32)
    if len(lengths) and len(q):
        _rescore_int8(products, row_scales, scores_t, codes, inv_norms, centroids, byte_words, residuals, q,
                      float(margin), first_tokens, product_rows, lengths, out)
    elif len(lengths):
        out[:] = 0.0
    return out


@_jit
def _merge_rows(q, close, out):  # pragma: no cover (compiled)
    n = q.shape[0]
    taken = np.zeros(n, dtype=np.bool_)
    groups = 0
    for i in range(n):
        if taken[i]:
            continue
        row = out[groups]
        row[:] = q[i]
        taken[i] = True
        for j in range(i + 1, n):
            if close[i, j] and not taken[j]:
                taken[j] = True
                for e in range(q.shape[1]):
                    row[e] += q[j, e]
        groups += 1
    return groups


def merge_rows(q: np.ndarray, close: np.ndarray) -> np.ndarray:
    """``(groups, dim)`` float32: each row of ``q`` not yet taken, in order, summed with every
    later untaken row ``close`` to it (``close[i, j]``), row after row -- the floats of
    ``indexing.plaid.merge_query_tokens``'s numpy loop (``q[group].sum(axis=0)`` adds a group's
    rows one after another in float32)."""
    out = np.empty(q.shape, dtype=np.float32)
    return out[: _merge_rows(q, close, out)]


@_jit
def _quantize_rows(x, out, scales):  # pragma: no cover (compiled)
    for i in range(x.shape[0]):
        row = x[i]
        top = np.float32(0.0)
        for e in range(x.shape[1]):
            top = max(top, abs(row[e]))
        scale = top / np.float32(127)
        scales[i] = scale
        inv = np.float32(1) / scale if scale > 0 else np.float32(0)
        for e in range(x.shape[1]):
            out[i, e] = np.int8(min(max(np.rint(row[e] * inv), np.float32(-127)), np.float32(127)))


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`indexing.int8.quantize_rows` in one pass a row (the same int8 values and scales)."""
    out = np.empty(x.shape, dtype=np.int8)
    scales = np.empty(x.shape[0], dtype=np.float32)
    if x.size:
        _quantize_rows(x, out, scales)
    else:
        scales[:] = 0
    return out, scales


# ---- the search path's index lookups ------------------------------------------------------


@_jit
def _ranges(starts, lengths, out):  # pragma: no cover (compiled)
    t = 0
    for i in range(len(starts)):
        s = starts[i]
        for j in range(lengths[i]):
            out[t] = s + j
            t += 1


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for every (start, length) (lengths >= 0), as
    int64: ``indexing.plaid._ranges`` in one pass (a query's ~9,000 token positions in ~5 us,
    numpy's repeat and cumsum ~25)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    out = np.empty(int(lengths.sum()), dtype=np.int64)
    if len(out):
        _ranges(np.asarray(starts, dtype=np.int64), lengths, out)
    return out


def _documents_of(ivf_offsets, ivf_docs, cells, mask, use_mask, hit, out):  # pragma: no cover (compiled)
    for c in cells:
        for i in range(ivf_offsets[c], ivf_offsets[c + 1]):
            hit[ivf_docs[i]] = True
    n = 0
    for d in range(len(hit)):
        if hit[d] and (not use_mask or mask[d]):
            out[n] = d
            n += 1
    return n


@_jit
def _cell_documents(ivf_offsets, ivf_docs, cells, mask, use_mask, hit, out):  # pragma: no cover (compiled)
    return _mark_documents(ivf_offsets, ivf_docs, cells, mask, use_mask, hit, out)


def cell_documents(ivf_offsets: np.ndarray, ivf_docs: np.ndarray, cells: np.ndarray, n_docs: int,
                   mask: "np.ndarray | None" = None) -> np.ndarray:
    """``(m,)`` int64 sorted distinct documents in the inverted lists of ``cells``
    (``ivf_docs[ivf_offsets[c] : ivf_offsets[c + 1]]``), only those where ``mask`` is True
    when given: a mark per document, then the marked ones in order."""
    cells = np.asarray(cells, dtype=np.int64)
    hit = np.zeros(n_docs, dtype=np.bool_)
    # at most one entry a list entry (a large index's lists hold a small share of its documents)
    out = np.empty(min(n_docs, int((ivf_offsets[cells + 1] - ivf_offsets[cells]).sum())), dtype=np.int64)
    use_mask = mask is not None
    n = _cell_documents(ivf_offsets, ivf_docs, cells, mask if use_mask else _NO_MASK, use_mask, hit, out)
    return out[:n]


# ---- selections: the best k of a stage, the exact stage's layout and its early end ----------


def _top_keys(scores, ids, k, out_scores, out_ids):  # pragma: no cover (compiled)
    # Each (score, id) as one uint64 key whose ascending order is descending score, then ascending
    # id: the high half the score's float32 bits made monotone and reversed (-0.0 as 0.0, as numpy
    # compares them), the low half the id (0 <= id < 2**32); one partition and one sort of k keys.
    # Writes the best min(k, n) to out_scores and out_ids; returns how many.
    n = len(scores)
    keys = np.empty(n, dtype=np.uint64)
    bits = scores.view(np.uint32)
    for i in range(n):
        u = bits[i]
        if u == np.uint32(0x80000000):  # -0.0
            u = np.uint32(0)
        ordered = ~u if u & np.uint32(0x80000000) else u | np.uint32(0x80000000)  # ascending as the floats
        keys[i] = (np.uint64(~ordered) << np.uint64(32)) | np.uint64(ids[i])
    best = np.partition(keys, k - 1)[:k] if n > k else keys
    best.sort()
    for j in range(len(best)):
        key = best[j]
        out_ids[j] = np.int64(key & np.uint64(0xFFFFFFFF))
        ordered = ~np.uint32(key >> np.uint64(32))
        out_scores.view(np.uint32)[j] = ordered & np.uint32(0x7FFFFFFF) if ordered & np.uint32(0x80000000) else ~ordered
    return len(best)


@_jit
def _top_k(scores, ids, k, out_scores, out_ids):  # pragma: no cover (compiled)
    return _select_top(scores, ids, k, out_scores, out_ids)


def top_k(scores: np.ndarray, ids: np.ndarray, k: int, checked: bool = False
          ) -> "tuple[np.ndarray, np.ndarray] | None":
    """The best ``k`` (float32 score, int64 id) pairs, by score descending then id ascending
    (``indexing.plaid._top_k``'s order; a score of -0.0 comes back as 0.0, which numpy ranks
    equal to it), or None where an id is outside ``[0, 2**32)`` or a score is NaN (numpy's
    answer is then the caller's; ``checked``: the caller knows neither happens, the search's
    document positions and scores): one pass building sort keys, one partition, one sort of the
    ``k`` kept (a filter's 756 of 1,000 candidates in ~10 us, numpy's 8 calls ~22)."""
    n = len(scores)
    if n and not checked and (int(ids.min()) < 0 or int(ids.max()) > 0xFFFFFFFF or np.isnan(scores).any()):
        return None
    m = min(k, n)
    out_scores = np.empty(m, dtype=np.float32)
    out_ids = np.empty(m, dtype=np.int64)
    if m:
        _top_k(np.ascontiguousarray(scores, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64), k,
               out_scores, out_ids)
    return out_scores, out_ids


@_jit
def _exact_layout(doc_offsets, docs, n_docs, max_tokens):  # pragma: no cover (compiled)
    total = 0  # every document's tokens, those laid out and the others
    for d in range(len(docs)):
        if d + PREFETCH_AHEAD < len(docs):
            _prefetch_at(doc_offsets, docs[d + PREFETCH_AHEAD])
        total += doc_offsets[docs[d] + 1] - doc_offsets[docs[d]]
    laid = 0
    for d in range(n_docs):
        laid += doc_offsets[docs[d] + 1] - doc_offsets[docs[d]]
    tokens = np.empty(laid, dtype=np.int64)
    lengths = np.empty(n_docs, dtype=np.int64)
    offsets = np.empty(n_docs + 1, dtype=np.int64)
    chunks = np.empty(n_docs + 1, dtype=np.int64)
    n_chunks = 0
    chunks[0] = 0
    t = 0
    base = 0  # the current chunk's first token
    for d in range(n_docs):
        lo = doc_offsets[docs[d]]
        n = doc_offsets[docs[d] + 1] - lo
        # a document ending past max_tokens from the chunk's start opens the next chunk (never the first)
        if d > chunks[n_chunks] and t + n - base > max_tokens:
            n_chunks += 1
            chunks[n_chunks] = d
            base = t
        offsets[d] = t
        lengths[d] = n
        for i in range(n):
            tokens[t + i] = lo + i
        t += n
    offsets[n_docs] = t
    if n_docs:
        n_chunks += 1
        chunks[n_chunks] = n_docs
    return tokens, lengths, offsets, chunks[: n_chunks + 1], total


def exact_layout(doc_offsets: np.ndarray, docs: np.ndarray, max_tokens: int, n: "int | None" = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The exact stage's view of the first ``n`` (None: all) of ``docs`` (positions; document
    ``d``'s tokens are ``doc_offsets[d] : doc_offsets[d + 1]``) in one pass: ``(tokens, lengths,
    offsets, chunks, total)``, their token positions one document after another, each one's token
    count, where each one's tokens start in ``tokens`` (``n + 1`` entries, their total last), the
    document boundaries of consecutive blocks of at most ``max_tokens`` tokens (a longer document
    alone: ``indexing.plaid._doc_chunks``' slices as ``chunks[i] : chunks[i + 1]``) and the token
    count of all of ``docs``."""
    docs = np.ascontiguousarray(docs, dtype=np.int64)
    n = len(docs) if n is None else min(int(n), len(docs))
    tokens, lengths, offsets, chunks, total = _exact_layout(doc_offsets, docs, n, int(max_tokens))
    return tokens, lengths, offsets, chunks, int(total)


@_jit
def _early_rest(scores, approx, docs, first, k, margin, gap, out):  # pragma: no cover (compiled)
    n = len(scores)
    kth = np.partition(scores, n - k)[n - k]
    if np.isnan(gap):  # the largest gap, as np.max of the float32 differences
        top = scores[0] - approx[0]
        for i in range(1, n):
            top = max(top, scores[i] - approx[i])
        gap = np.float64(top)
    # numpy's float32 sums of approx with the Python floats gap and margin * |kth| (each cast)
    lift = np.float32(gap)
    slack = np.float32(margin * abs(np.float64(kth)))
    m = 0
    for i in range(first, len(docs)):
        if (approx[i] + lift) + slack >= kth:
            out[m] = docs[i]
            m += 1
    return m


def early_rest(scores: np.ndarray, approx: np.ndarray, docs: np.ndarray, first: int, k: int, margin: float,
               gap: "float | None" = None) -> np.ndarray:
    """The exact stage's second pass (``indexing.plaid._early_ended``): of ``docs[first:]`` (best
    ``approx`` first), those whose ``approx`` plus ``gap`` (None: the largest of the first
    ``first`` documents' ``scores - approx``) plus ``margin`` times the absolute k-th best of
    ``scores`` (the first ``first`` documents' exact-stage scores, at least ``k`` of them)
    reaches that k-th best score, in their order. numpy's floats: float32 sums of float32
    ``approx`` with ``gap`` and ``margin * |kth|`` cast to float32."""
    out = np.empty(len(docs) - first, dtype=np.int64)
    n = _early_rest(scores, approx, np.ascontiguousarray(docs, dtype=np.int64), int(first), int(k), float(margin),
                    math.nan if gap is None else float(gap), out)
    return out[:n]


@_jit
def _refine_int8(products, row_scales, scores_t, codes, inv_norms, centroids, byte_words, residuals, q, pair_margin,
                 refine_margin, doc_offsets, ids, scores, magnitudes, rows, k, out_scores,
                 out_ids):  # pragma: no cover (compiled)
    n = len(ids)
    exact = np.empty(n, dtype=np.float32)
    refined = np.zeros(n, dtype=np.bool_)
    longest = 0
    for i in range(n):
        longest = max(longest, doc_offsets[ids[i] + 1] - doc_offsets[ids[i]])
    tolerances, token_scores, vector_words, floor, best = _rescore_buffers(q, byte_words, residuals, pair_margin,
                                                                           longest)
    # the best min(k, n) int8 scores first (equal ones: the earlier document)
    n_top = min(k, n)
    cut = np.partition(scores, n - n_top)[n - n_top]
    taken = 0
    for tie in range(2):
        for i in range(n):
            if taken < n_top and not refined[i] and (scores[i] > cut if tie == 0 else scores[i] == cut):
                refined[i] = True
                taken += 1
    kth = np.float32(np.inf)
    for i in range(n):
        if refined[i]:
            first = doc_offsets[ids[i]]
            exact[i] = _rescore_doc(products, row_scales, scores_t, codes, inv_norms, centroids, byte_words,
                                    residuals, q, first, rows[i], doc_offsets[ids[i] + 1] - first, tolerances,
                                    token_scores, vector_words, floor, best)
            kth = min(kth, exact[i])
    # then every other document whose int8 score plus its margin reaches the k-th best float32 score
    margin = np.float32(refine_margin)
    m = 0
    for i in range(n):
        if not refined[i] and scores[i] + margin * magnitudes[i] >= kth:
            first = doc_offsets[ids[i]]
            exact[i] = _rescore_doc(products, row_scales, scores_t, codes, inv_norms, centroids, byte_words,
                                    residuals, q, first, rows[i], doc_offsets[ids[i] + 1] - first, tolerances,
                                    token_scores, vector_words, floor, best)
            refined[i] = True
    kept_ids = np.empty(n, dtype=np.int64)
    for i in range(n):
        if refined[i]:  # (exact compacted in place: m <= i)
            exact[m] = exact[i]
            kept_ids[m] = ids[i]
            m += 1
    return _select_top(exact[:m], kept_ids[:m], k, out_scores, out_ids), m


def refine_int8(products: np.ndarray, row_scales: np.ndarray, scores_t: np.ndarray, codes: np.ndarray,
                inv_norms: np.ndarray, centroids: np.ndarray, byte_words: np.ndarray, residuals: np.ndarray,
                q: np.ndarray, pair_margin: float, refine_margin: float, doc_offsets: np.ndarray, ids: np.ndarray,
                scores: np.ndarray, magnitudes: np.ndarray, rows: np.ndarray, k: int
                ) -> tuple[np.ndarray, np.ndarray, int]:
    """The int8 exact stage's end in one loop (``indexing.plaid.CentroidIndex._int8_exact_top_k``):
    of documents ``ids`` with int8 scores ``scores`` and ``magnitudes`` (:func:`token_maxsum_int8`'s)
    and their products from rows ``rows`` of ``products`` on, the best ``min(k, n)`` by int8 score
    (equal scores: the earlier document) rescored in float32 (:func:`rescore_int8`, ``pair_margin``),
    then every other one whose int8 score plus ``refine_margin`` times its magnitude reaches the
    k-th best float32 score so far; returns the best ``k`` rescored ``(float32 scores, ids)`` by
    score, then id (:func:`top_k`), and how many were rescored. ``q``: the query's live rows (at
    least one)."""
    m = min(k, len(ids))
    out_scores = np.empty(m, dtype=np.float32)
    out_ids = np.empty(m, dtype=np.int64)
    rescored = 0
    if m:
        m, rescored = _refine_int8(products, row_scales, scores_t, codes, inv_norms, centroids, byte_words, residuals,
                                   q, float(pair_margin), float(refine_margin), doc_offsets, ids, scores, magnitudes,
                                   rows, int(k), out_scores, out_ids)
    return out_scores[:m], out_ids[:m], int(rescored)
