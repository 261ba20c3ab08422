"""PLAID-style centroid index for late-interaction (ColBERT) retrieval.

Documents are stored as the residual-codec encoding of their token vectors
(:class:`embedding.codec.ResidualCodec`): one centroid code and one packed
residual per token, concatenated over documents in positional order. An inverted
file maps every centroid to the sorted positions of the documents that have at
least one token assigned to it; its transpose (every document's distinct
centroids) and every token's inverse reconstruction norm are stored beside it.

Search follows PLAID (Santhanam et al., 2022):

1. candidate generation: the ``ncells`` best centroids of every query token,
   and the union of their inverted lists;
2. approximate centroid interaction with centroid pruning: a document token
   stands for its centroid; tokens whose centroid scores below
   ``centroid_score_threshold`` against every query token are dropped; keep the
   best ``ndocs`` documents;
3. full centroid interaction (no pruning); keep the best ``max(k, ndocs // 4)``
   (only documents that lost a cell to pruning are scored again: the others
   already hold their full score);
4. exact MaxSim over those documents' decompressed tokens.

How it is fast: the centroid scores of a batch of queries are one BLAS product;
stages 2-3 score each document's distinct centroids (a token's centroid score does
not depend on which of the document's tokens carries it); stage 4 never rebuilds a
vector: a token scores ``(q . c + q . r) * inv_norm``, with ``q . c`` taken from the
centroid scores, ``q . r`` one BLAS product with the decoded residuals, and the
stored inverse norm. The gathers and maxima of stages 2-4 run as loops compiled by
numba (:mod:`indexing.kernels`: one pass per stage, without the GIL), or where numba
is not available in numpy (documents sorted by their number of cells and padded to a
block's widest, one gather of score rows and one maximum a block; segment maxima by
``reduceat``), the same floats either way. A query's rows (near copies merged,
:func:`merge_query_tokens`) are padded with zero rows to a width BLAS multiplies
fastest (:func:`padded_rows`). Index arrays may be
memory-mapped (:mod:`indexing.index_files`); a search touches only the inverted lists and
the tokens of its final candidates.

A Matryoshka prefix ``dim`` truncates queries, centroids and decompressed
vectors to their first ``dim`` dimensions and re-normalises them.

Positional document ids are the only ids here; their mapping to the user's ids
lives next to the index files (``ids.parquet``, :mod:`indexing.index_files`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import InitVar, dataclass, replace
from typing import Iterator, NamedTuple

import numpy as np

from embedding.codec import ResidualCodec, cpu_flags
from indexing import int8, kernels
from indexing.threads import check_threads, controller  # noqa: F401  (check_threads: re-exported)

logger = logging.getLogger(__name__)

ARRAY_KEYS = ("doc_offsets", "codes", "residuals", "ivf_offsets", "ivf_docs")
#: Arrays derived from the others and stored beside them, so that a loaded index
#: is memory-mapped and never rebuilt: every document's sorted distinct centroids
#: (the inverted file transposed) and every token's inverse reconstruction norm.
#: Older index files lack them; they are then computed at load.
DERIVED_KEYS = ("doc_cell_offsets", "doc_cells", "token_inv_norms")
# Tokens decompressed at once by the brute-force scorer, and float32 entries of
# one (tokens, query vectors) score block (64 MiB).
_TOKEN_BATCH = 1 << 16
_SCORE_BUDGET = 1 << 24
# The same for search: float32 centroid scores of the queries of a batch multiplied at
# once (4 MiB): large enough for BLAS to run at full speed, small enough that a serving
# process's temporaries stay a few MiB instead of the index's own size. (The centroid
# stages go in blocks of INTERACTION_CELLS cells, the exact stage in blocks of
# _EXACT_TOKENS tokens.)
_STAGE_BUDGET = 1 << 20
#: cells (documents sorted by cell count, padded to a block's widest) per block of the
#: centroid stages: 4,096 beat 1,024 and 16,384 on XQuAD-sentence queries (~20 cells a
#: document, 22 query rows: a block's gathered scores ~360 KB, in L2); with the gather's
#: maximum over the first axis (twenty-sixth session) 1,024-16,384 were within noise
INTERACTION_CELLS = 4096
# Tokens of an exact-stage block: 1,024 decode 1.5 MiB of residuals (dim 384) that the
# product then reads back from the core's cache: ~15% faster per query than 4,096 (XQuAD,
# 2 and 4 bits, interleaved; 512 and 2,048 were slower).
_EXACT_TOKENS = 1024
# The same with int8 products (indexing.int8): 2,048 tokens decode 768 KiB of int8 residuals,
# which stay in a core's 2 MiB L2 for the product. Back to back, 1,024 to 16,384 were within 3%
# of each other (1 thread, medians of 3 passes: XQuAD sentences 2.68-2.73 ms a query,
# paragraphs 3.85-3.99, Tatoeba 2.09-2.15); after another process's work has swept the caches
# (128 MB read and written between queries, as colbert-ai's queries do in bench_vs_colbert's
# query-by-query turns) 2,048 was the fastest: XQuAD sentences 5.44 ms a query against 5.82
# at 4,096 and 5.67 at 1,024, Tatoeba 4.19 against 4.33 and 4.39 (back to back within 0.1 ms).
_INT8_EXACT_TOKENS = 2048
#: A single query searched with ``threads >= 2`` splits its centroid product and exact stage
#: over the threads (:class:`_Split`), in parts of at least this much work each (a part
#: handed to another thread costs ~30-60 us): centroid rows of the product, tokens of the
#: exact stage. The centroid stages run whole in the calling thread: since their gathers
#: take the maximum over the first axis (:meth:`CentroidIndex._centroid_interaction`), a
#: split cost more than it saved (250 XQuAD-sentence queries at 2 threads: 5.5 ms split,
#: 5.1 whole; at ncells=16, 6.6 and 6.2).
SPLIT_MIN_CENTROIDS = 1024
SPLIT_MIN_TOKENS = 512
_MAX_DOCS = np.iinfo(np.int32).max
# Up to this many cells per query token, best_cells scans with argmax.
_ARGMAX_CELLS = 8
# Centroid pruning that would drop less than this share of the centroids is skipped (the
# full centroid stage alone, as with no pruning): on XQuAD (me5-small, 4,096 centroids,
# ~6 of them below 0.5) the pruned stage and the full stage's second pass were 4% of a
# query, for the same results.
_PRUNE_MIN = 0.01
#: The default ``exact_margin`` (see :class:`SearchParams`). Top-10 overlap with exact
#: MaxSim and ms a query against ``inf`` (no early termination), 1 thread, interleaved:
#: XQuAD 2-bit (1,200 paragraphs, 300 queries) 0.983 at 9.9 ms vs 0.983 at 10.5 ms;
#: Tatoeba 10k 4-bit (short sentences, 200 queries) 0.962 at 13.4 ms vs 0.965 at 14.2 ms.
#: 0.005 was faster still (9.3 ms on XQuAD, no loss there) but cost Tatoeba 0.010.
EXACT_MARGIN = 0.01
#: The default ``exact_gap_quantile`` (see :class:`SearchParams`): the largest gap, a rule
#: that on XQuAD-sentence queries (2 bits, k=10) ends no exact stage early in the median
#: query (207 of 207 documents scored). Lower quantiles (1 thread, 250 queries, top-10
#: overlap with exact MaxSim): XQuAD sentences 0.99 scored 151 documents (5.37 -> 5.02 ms,
#: 0.982 -> 0.981), 0.95 the first 77 (4.42 ms, 0.974); XQuAD paragraphs 0.95 the same
#: 0.974-0.975 at 10.1 -> 9.9 ms, 0.9 0.972 at 9.0; but 11,548 Tatoeba sentences 0.99 lost
#: 0.966 -> 0.952 (5.25 -> 3.98 ms) and 0.95 fell to 0.914: short near-duplicate documents
#: have gaps the median document does not show. So the default stays the largest gap.
EXACT_GAP_QUANTILE = 1.0
#: The default ``merge_tokens`` (see :class:`SearchParams`). Top-10 overlap with exact MaxSim
#: over all 32 query tokens and ms a query against ``inf`` (no merging), 1 thread, 300
#: queries, interleaved: XQuAD 2-bit 0.980 at 6.5 ms vs 0.983 at 7.9 ms; Tatoeba 12k 2-bit
#: 0.976 at 5.0 ms vs 0.977 at 7.1 ms. 0.98: XQuAD 0.976 (2-bit) and 0.970 (4-bit) at 0.80 of
#: the time, Tatoeba 0.974 and 0.957 (against 0.959 unmerged) at 0.70-0.74; 0.95 lost 0.02.
MERGE_TOKENS = 0.99
#: Query rows of a product are padded (zero rows) to a multiple of this many (see
#: :func:`padded_rows`): 16 where the CPU has AVX-512 (measured with numpy's OpenBLAS, whose
#: SkylakeX kernels run there), else 8 (not measured: the AVX2 kernels' narrower block).
ROW_BLOCK = 16 if "avx512f" in (cpu_flags() or ()) else 8


# ---------------------------------------------------------------------------
# Definitions and parameters
# ---------------------------------------------------------------------------


def maxsim(Q: np.ndarray, D: np.ndarray) -> float:
    """Late-interaction score: sum over query rows of the best dot product.

    Parameters
    ----------
    Q : numpy.ndarray
        ``(Lq, dim)`` float query token vectors.
    D : numpy.ndarray
        ``(Ld, dim)`` float document token vectors, ``Ld >= 1``.

    Returns
    -------
    float
        ``sum_i max_j <Q[i], D[j]>``, accumulated in float64.
    """
    Q = np.asarray(Q, dtype=np.float64)
    D = np.asarray(D, dtype=np.float64)
    if Q.ndim != 2 or D.ndim != 2 or Q.shape[1] != D.shape[1]:
        raise ValueError(
            f"Q and D must be 2-D with equal dims, got shapes {Q.shape} and {D.shape}"
        )
    if len(D) == 0:
        raise ValueError("D must have at least one row: MaxSim over no tokens is undefined")
    return float((Q @ D.T).max(axis=1).sum())


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def plaid_defaults(k: int) -> dict:
    """Search parameters for a result depth ``k``.

    Parameters
    ----------
    k : int
        Number of results, at least 1.

    Returns
    -------
    dict
        ``ncells``, ``centroid_score_threshold``, ``ndocs`` and ``exact_tokens``:
        (4, 0.5, 256, 8192) for ``k <= 10``, (4, 0.45, 1024, 32768) for ``k <= 100``,
        else (4, 0.4, ``max(4 * k, 4096)``, 65536).

    Notes
    -----
    PLAID's own defaults probe one cell per query token at ``k <= 10`` (two at
    ``k <= 100``). They were tuned on MS MARCO, where ``16 * sqrt(n_tokens)``
    centroids leave thousands of tokens in each cell. A cell's share of the tokens
    shrinks as ``1 / sqrt(n_tokens)``, so on smaller indexes one cell reaches far
    fewer documents: on 1,209 XQuAD paragraphs (207k tokens, 4,096 centroids) the
    top-10 agreed with exact MaxSim over the same vectors at 0.925 with
    ``ncells=1``, 0.964 with 2 and 0.988 with 4, in the same 70 ms a query. The
    later stages, bounded by ``ndocs``, hold the extra candidates' cost in check.

    ``exact_tokens`` sizes the exact stage in tokens as well as documents: it scores
    at least ``exact_tokens / mean document length`` documents. On paragraphs (170
    tokens each) ``ndocs // 4`` already covers it; on 12,000 Tatoeba sentences (11
    tokens each) the centroid stages cannot tell near-duplicate short documents apart,
    and 64 exact documents agreed with exact MaxSim at 0.74, 256 at 0.92 and 1,024 at
    0.98; 8,192 tokens (~740 sentences) cost about what 64 paragraphs do.

    ``exact_margin`` (:data:`EXACT_MARGIN` at every ``k``) and ``exact_gap_quantile``
    (:data:`EXACT_GAP_QUANTILE`) end the exact stage early: see :class:`SearchParams`.
    """
    k = _check_k(k)
    if k <= 10:
        out = {"ncells": 4, "centroid_score_threshold": 0.5, "ndocs": 256, "exact_tokens": 8192}
    elif k <= 100:
        out = {"ncells": 4, "centroid_score_threshold": 0.45, "ndocs": 1024, "exact_tokens": 32768}
    else:
        out = {"ncells": 4, "centroid_score_threshold": 0.4, "ndocs": max(4 * k, 4096), "exact_tokens": 65536}
    return {**out, "exact_margin": EXACT_MARGIN, "exact_gap_quantile": EXACT_GAP_QUANTILE,
            "merge_tokens": MERGE_TOKENS}


def _is_number(value: object) -> bool:
    """An int or float (numpy's too), not a bool, not NaN (infinities are numbers)."""
    is_real = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    return is_real and not math.isnan(value)


def _check_positive_int(value: int | None, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")


@dataclass(frozen=True)
class SearchParams:
    """Knobs of :meth:`CentroidIndex.search`; ``None`` takes PLAID's default for ``k``.

    Attributes
    ----------
    ncells : int, optional
        Centroids probed per query token in candidate generation.
    centroid_score_threshold : float, optional
        Centroid pruning threshold of the approximate stage, a cosine (a merged query
        row's scores are compared with the threshold times its norm); ``-inf`` disables it.
    ndocs : int, optional
        Documents kept after the approximate stage; ``ndocs // 4`` (at least
        ``k``) are kept after the full centroid stage.
    exact_tokens : int, optional
        The exact stage scores at least ``exact_tokens / mean document length``
        documents (and the earlier stages keep at least as many).
    dim : int, optional
        Matryoshka prefix of the token vectors (``<= codec.dim``); None = full.
    exact_margin : float, optional
        Early termination of the exact stage. Its documents are scored best centroid
        score first: the first ``max(2k, 3/8 of them)`` always, each later one only if
        its centroid score, plus the largest (exact - centroid) score gap of the
        documents already scored (``exact_gap_quantile``), plus ``exact_margin *
        |k-th best exact score|``, reaches that k-th best score. ``inf`` scores every
        one (no early termination).
    exact_gap_quantile : float, optional
        In ``(0, 1]``: which quantile of the already-scored documents' (exact - centroid)
        gaps the later ones are allowed; 1 (the default) the largest. Below 1 the exact
        stage ends sooner and may miss a document the largest gap would have scored: a
        speed knob to measure on one's own corpus (:data:`EXACT_GAP_QUANTILE`: on
        Tatoeba 0.99 already cost 0.014 of top-10 overlap, on XQuAD sentences 0.001).
    merge_tokens : float, optional
        Query tokens whose cosine with an earlier kept token of the same query reaches
        this are merged with it into one row, the sum of the group's vectors: against any
        document token it scores the sum of theirs, and its best document token scores
        about the sum of each one's best, so every stage's sum of per-token maxima stays
        close while every stage multiplies fewer rows. A query's padding expansions are
        near copies of each other (me5-small: of 32 tokens ~19 are distinct at cosine 0.99
        on XQuAD questions, ~14 on Tatoeba sentences). An approximation of MaxSim
        (:data:`MERGE_TOKENS` says what it costs); ``inf`` merges nothing.
    products : str, optional
        How the two large products (query rows by every centroid, by the exact stage's
        residuals) are computed: ``float32`` (numpy's BLAS), ``int8`` (torch's ``_int_mm``,
        AMX: :mod:`indexing.int8`; the exact stage's results are rescored in float32), or
        ``auto``: int8 where the compiled stages run, torch is installed and the CPU has AMX
        int8, else float32. None: ``TESSERA_PLAID_PRODUCTS`` where set, else ``auto``. int8
        imports torch into the process.
    """

    ncells: int | None = None
    centroid_score_threshold: float | None = None
    ndocs: int | None = None
    dim: int | None = None
    exact_tokens: int | None = None
    exact_margin: float | None = None
    merge_tokens: float | None = None
    exact_gap_quantile: float | None = None
    products: str | None = None

    def __post_init__(self) -> None:
        if self.products is not None and self.products not in int8.CHOICES:
            raise ValueError(f"products must be one of {', '.join(int8.CHOICES)} or None, got {self.products!r}")
        _check_positive_int(self.ncells, "ncells")
        _check_positive_int(self.ndocs, "ndocs")
        _check_positive_int(self.exact_tokens, "exact_tokens")
        _check_positive_int(self.dim, "dim")
        margin = self.exact_margin
        if margin is not None and not (_is_number(margin) and margin >= 0):
            raise ValueError(f"exact_margin must be a number >= 0 (inf: no early termination) or None, got {margin!r}")
        quantile = self.exact_gap_quantile
        if quantile is not None and not (_is_number(quantile) and 0 < quantile <= 1):
            raise ValueError(f"exact_gap_quantile must be a number in (0, 1] or None, got {quantile!r}")
        merge = self.merge_tokens
        if merge is not None and not _is_number(merge):
            raise ValueError(f"merge_tokens must be a number (a cosine; inf: no merging) or None, got {merge!r}")
        threshold = self.centroid_score_threshold
        if threshold is not None and not _is_number(threshold):
            raise ValueError(
                f"centroid_score_threshold must be a number (not NaN) or None, got {threshold!r}"
            )

    def resolved(self, k: int) -> "SearchParams":
        """Copy with every ``None`` search knob replaced by ``plaid_defaults(k)``.

        ``dim`` stays as given (None means the full dimension); ``products`` becomes
        ``float32`` or ``int8``, what this process runs (:func:`indexing.int8.resolve`).
        """
        # ``products`` as this process runs it: float32 or int8 (``auto`` resolved here)
        products = int8.resolve(self.products, kernels.ENABLED)
        key = (self, k, products)
        done = _RESOLVED.get(key)  # (a search resolves its parameters: ~6 us, a lookup ~1)
        if done is None:
            defaults = plaid_defaults(k)
            filled = {
                name: value if getattr(self, name) is None else getattr(self, name)
                for name, value in defaults.items()
            }
            done = replace(self, **filled, products=products)
            if len(_RESOLVED) >= 256:  # (a process searches with a few parameter sets)
                _RESOLVED.clear()
            _RESOLVED[key] = done
        return done


#: :meth:`SearchParams.resolved`'s answers, by (parameters, k, products as resolved)
_RESOLVED: dict = {}


# ---------------------------------------------------------------------------
# Vectorised helpers
# ---------------------------------------------------------------------------


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for every (start, length), as int64."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


def _segment_starts(lengths: np.ndarray) -> np.ndarray:
    """Exclusive cumulative sum: where each segment starts."""
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def _segment_maxsum(token_scores: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sum over query tokens of the max over each segment of document tokens.

    Parameters
    ----------
    token_scores : numpy.ndarray
        ``(Lq, T)`` float32 scores of the query tokens against consecutive
        document tokens (tokens on the last axis: reduceat is much faster there).
    lengths : numpy.ndarray
        ``(n,)`` segment lengths, each ``>= 1``, summing to ``T``.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` float32 MaxSim of each segment.
    """
    if len(lengths) == 0:
        return np.empty(0, dtype=np.float32)
    best = np.maximum.reduceat(token_scores, _segment_starts(lengths), axis=1)
    return best.sum(axis=0, dtype=np.float32)


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int, positions: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` (score, id) pairs, by score descending then id ascending. ``positions``: the
    ids are document positions and the scores a search's (no NaN), which the compiled selection
    (:func:`indexing.kernels.top_k`) takes unchecked where numba runs."""
    if positions and kernels.loaded():
        return kernels.top_k(scores, ids, k, checked=True)
    if len(scores) > k:
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        above = np.flatnonzero(scores > kth)
        ties = np.flatnonzero(scores == kth)
        ties = ties[np.argsort(ids[ties], kind="stable")[: k - len(above)]]
        keep = np.concatenate([above, ties])
        scores, ids = scores[keep], ids[keep]
    order = np.lexsort((ids, -scores))
    return scores[order], ids[order]


def _stack_padded(
    results: list[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-query results into ``(nq, k)`` arrays, padded with -inf / -1."""
    scores = np.full((len(results), k), -np.inf, dtype=np.float32)
    ids = np.full((len(results), k), -1, dtype=np.int64)
    for row, (row_scores, row_ids) in enumerate(results):
        scores[row, : len(row_scores)] = row_scores
        ids[row, : len(row_ids)] = row_ids
    return scores, ids


class _Int8Columns(NamedTuple):
    """One query's columns of a block's int8 centroid product (``CentroidIndex._int8_centroid_products``):
    ``(n_centroids, rows)`` int32 and the scales that make them scores, and the query's rows as
    int8 (``indexing.int8.quantize_rows``' rows of the block: each row on its own scale, so the
    exact stage's quantized query rows too)."""

    products: np.ndarray
    c_scales: np.ndarray
    q_scales: np.ndarray
    q8: np.ndarray


def _query_columns(scores_t: np.ndarray, start: int, end: int) -> np.ndarray:
    """``(n_centroids, end - start)`` contiguous centroid scores of the query whose rows
    are columns ``[start, end)`` of a block's product."""
    if start == 0 and end == scores_t.shape[1]:
        return scores_t
    return np.ascontiguousarray(scores_t[:, start:end])


def padded_rows(n: int, block: int = ROW_BLOCK) -> int:
    """How many rows ``n`` query rows are padded to before a product with them.

    BLAS computes its output in blocks of ``block`` columns (the query's rows) and, as
    measured here, the remainder in narrower passes costing about as much as a full
    block each: a remainder past 2 is padded to the next power of two (``n % block`` of
    3 to 4, 5-7 to 8, 9-15 to 16). On 2 AVX-512 cores (numpy's OpenBLAS, one thread), ``(4096,
    384) @ (384, n)`` took 0.90 ms at n = 14 and 0.65 ms at 16, 1.07 at 15, 1.61 at 31
    and 1.17 at 32; a 1,024-token exact-stage block 0.22 ms at 14 and 0.16 at 16.
    Zero rows score 0 against everything, so a sum of per-row maxima is unchanged.
    """
    rest = n % block
    if rest <= 2:
        return n
    return n - rest + (1 << (rest - 1).bit_length())


def _pad_rows(q: np.ndarray, n: int) -> np.ndarray:
    """``q`` with zero rows appended up to ``n`` rows."""
    if len(q) == n:
        return q
    out = np.zeros((n, q.shape[1]), dtype=q.dtype)
    out[: len(q)] = q
    return out


def merge_query_tokens(q: np.ndarray, threshold: float) -> np.ndarray:
    """One query's ``(Lq, dim)`` rows without padding (zero rows), each group of rows whose
    cosine with the group's first row reaches ``threshold`` summed into one row, in the
    order of the first rows (see ``SearchParams.merge_tokens``); no row when the query is
    all padding."""
    live = np.any(q != 0, axis=1)
    if not live.all():
        q = q[live]
    if not threshold <= 1.0 or len(q) <= 1:
        return q
    close = (q @ q.T) >= threshold
    np.fill_diagonal(close, True)  # a row's own cosine may round below 1
    if close.sum() == len(q):  # only each row with itself
        return q
    if kernels.ready():  # the loop below, compiled (~0.1 ms a query less)
        return kernels.merge_rows(np.ascontiguousarray(q, dtype=np.float32), close)
    out = []
    taken = np.zeros(len(q), dtype=bool)
    for i in range(len(q)):
        if not taken[i]:
            group = close[i] & ~taken
            taken |= group
            # the group's sum: its score against a document token is the sum of the rows'
            out.append(q[i] if group.sum() == 1 else q[group].sum(axis=0))
    return np.stack(out).astype(np.float32, copy=False)


def _doc_chunks(lengths: np.ndarray, max_tokens: int) -> Iterator[slice]:
    """Consecutive slices of documents holding about ``max_tokens`` tokens each."""
    ends = np.cumsum(lengths)
    start = 0
    while start < len(lengths):
        base = ends[start - 1] if start else 0
        stop = int(np.searchsorted(ends, base + max_tokens, side="right"))
        stop = max(stop, start + 1)
        yield slice(start, stop)
        start = stop


def _balanced_parts(weights: np.ndarray, n: int, min_weight: int) -> list[slice]:
    """At most ``n`` consecutive slices of ``weights`` with about equal sums, each part
    worth at least ``min_weight`` on average (one slice when the whole is worth less)."""
    total = float(np.sum(weights)) if len(weights) else 0.0
    n = min(n, len(weights), int(total // max(1, min_weight)))
    if n <= 1:
        return [slice(0, len(weights))]
    ends = np.cumsum(weights)
    cuts = np.searchsorted(ends, np.arange(1, n) * (total / n), side="left") + 1
    edges = [0, *np.unique(np.clip(cuts, 1, len(weights) - 1)).tolist(), len(weights)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


class _Split:
    """One query's stages spread over a thread pool: :meth:`map` runs the first part in the
    calling thread and the others in the pool, and returns the results in order. numpy
    releases the GIL in BLAS products, gathers and reductions, not in ``ufunc.reduceat``
    (the exact stage's segment maxima), which bounds the gain (see the README's "Single
    queries over threads")."""

    def __init__(self, pool: ThreadPoolExecutor, threads: int) -> None:
        self.pool = pool
        self.threads = threads

    def parts(self, weights: np.ndarray, min_weight: int) -> list[slice]:
        return _balanced_parts(weights, self.threads, min_weight)

    def map(self, fn, parts: list) -> list:
        if len(parts) <= 1:
            return [fn(p) for p in parts]
        futures = [self.pool.submit(fn, p) for p in parts[1:]]
        try:
            first = fn(parts[0])
        finally:  # nothing of this query outlives the call, even when a part fails
            wait(futures)
        return [first] + [f.result() for f in futures]


def _centroid_product(centroids: np.ndarray, rows_t: np.ndarray, split: "_Split | None") -> np.ndarray:
    """``(n_centroids, n)`` float32 ``centroids @ rows_t``, in parts of the centroids'
    rows over ``split``'s threads (each part's rows are computed as the whole product's)."""
    parts = split.parts(np.ones(len(centroids)), SPLIT_MIN_CENTROIDS) if split is not None else []
    if len(parts) <= 1:
        return centroids @ rows_t
    out = np.empty((len(centroids), rows_t.shape[1]), dtype=np.result_type(centroids, rows_t))
    split.map(lambda rows: np.matmul(centroids[rows], rows_t, out=out[rows]), parts)
    return out


def _kept_bounds(rows: np.ndarray, threshold: float) -> np.ndarray:
    """``(len(rows),)`` float32: the centroid score each query row must reach for a centroid to
    be kept, ``threshold * ||row||`` in float32 (-inf: every centroid; +inf: none)."""
    limit = _LIMITS.get(threshold)
    if limit is None:
        with np.errstate(over="ignore"):  # a threshold past float32's range is +-inf, as it compares
            limit = np.float32(threshold)
        if len(_LIMITS) < 64:  # (a process searches at a few thresholds)
            _LIMITS[threshold] = limit
    # np.linalg.norm's float32 sums (its formula, without its checks)
    return limit * np.sqrt(np.add.reduce(rows * rows, axis=1))


_LIMITS: dict = {}


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise the last axis; zero rows stay zero."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, np.finfo(np.float32).tiny)).astype(np.float32)


def _prefix(x: np.ndarray, dim: int) -> np.ndarray:
    """First ``dim`` columns, re-normalised when that drops any (Matryoshka)."""
    if dim == x.shape[-1]:
        return np.ascontiguousarray(x, dtype=np.float32)
    return np.ascontiguousarray(_normalize_rows(x[..., :dim]))


def _prepare_queries(Q: np.ndarray, full_dim: int, dim: int) -> np.ndarray:
    """Check ``(nq, Lq, full_dim or dim)`` queries; return ``(nq, Lq, dim)`` float32."""
    Q = np.asarray(Q)
    if Q.ndim != 3 or not np.issubdtype(Q.dtype, np.floating):
        raise ValueError(
            f"Q must be a 3-D float array (nq, Lq, dim), got shape {Q.shape} dtype {Q.dtype}"
        )
    if Q.shape[2] not in (full_dim, dim):
        raise ValueError(
            f"Q has dim {Q.shape[2]}, expected the codec dim {full_dim} or the "
            f"search prefix dim {dim}"
        )
    if Q.shape[1] < 1:
        raise ValueError(f"Q must have at least one token per query, got shape {Q.shape}")
    if not np.isfinite(Q).all():
        raise ValueError("Q contains NaN or infinite values")
    if Q.shape[2] == dim and dim < full_dim:
        return np.ascontiguousarray(_normalize_rows(Q))
    return _prefix(Q, dim)


# ---------------------------------------------------------------------------
# Array checks and construction
# ---------------------------------------------------------------------------


def _frozen(x: np.ndarray) -> np.ndarray:
    """A read-only plain ndarray view of ``x``. A memory-mapped array stays mapped (the
    view's base is the ``np.memmap``) without the subclass: every slice and gather of a
    ``np.memmap`` runs its Python ``__array_finalize__``, 0.2-0.4 ms of a 10 ms query."""
    view = x.view(np.ndarray)
    view.setflags(write=False)
    return view


def _int_array(x: np.ndarray, name: str, ndim: int = 1) -> np.ndarray:
    x = np.asarray(x)
    if x.size == 0 and x.ndim == ndim:
        return x.astype(np.int64)  # an empty list arrives as float64
    if x.ndim != ndim or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(
            f"{name} must be a {ndim}-D integer array, got shape {x.shape} dtype {x.dtype}"
        )
    return x


def _check_offsets(offsets: np.ndarray, total: int, name: str) -> np.ndarray:
    offsets = _int_array(offsets, name).astype(np.int64, copy=False)
    if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != total:
        raise ValueError(f"{name} must start at 0 and end at {total}")
    if np.any(np.diff(offsets) < 0):
        raise ValueError(f"{name} must be non-decreasing")
    return offsets


def _check_codes(codes: np.ndarray, codec: ResidualCodec, name: str = "codes") -> np.ndarray:
    codes = _int_array(codes, name)
    if codes.size and (codes.min() < 0 or codes.max() >= codec.n_centroids):
        raise ValueError(f"{name} must lie in [0, {codec.n_centroids}) for this codec")
    return codes.astype(codec.code_dtype, copy=False)


def _check_residuals(residuals: np.ndarray, n: int, codec: ResidualCodec, name: str) -> np.ndarray:
    residuals = np.asarray(residuals)
    if n == 0 and residuals.size == 0:
        return np.empty((0, codec.residual_bytes), dtype=np.uint8)
    if residuals.dtype != np.uint8 or residuals.shape != (n, codec.residual_bytes):
        raise ValueError(
            f"{name} must be uint8 of shape ({n}, {codec.residual_bytes}), "
            f"got {residuals.dtype} {residuals.shape}"
        )
    return residuals


def _check_ivf_docs(ivf_docs: np.ndarray, ivf_offsets: np.ndarray, n_docs: int) -> np.ndarray:
    ivf_docs = _int_array(ivf_docs, "ivf_docs")
    if ivf_docs.size and (ivf_docs.min() < 0 or ivf_docs.max() >= n_docs):
        raise ValueError(f"ivf_docs must lie in [0, {n_docs})")
    # Strictly increasing inside every list; list boundaries may step down.
    increasing = np.diff(ivf_docs.astype(np.int64)) > 0
    boundary = np.zeros(len(increasing), dtype=bool)
    inner = ivf_offsets[1:-1]
    boundary[inner[(inner > 0) & (inner < len(ivf_docs))] - 1] = True
    if not np.all(increasing | boundary):
        raise ValueError("every inverted list in ivf_docs must be sorted and unique")
    return ivf_docs.astype(np.int32, copy=False)


def build_ivf(
    codes: np.ndarray, doc_offsets: np.ndarray, n_centroids: int
) -> tuple[np.ndarray, np.ndarray]:
    """Inverted lists: for each centroid, the sorted documents with a token on it.

    Returns
    -------
    ivf_offsets : numpy.ndarray
        ``(n_centroids + 1,)`` int64.
    ivf_docs : numpy.ndarray
        ``(nnz,)`` int32.
    """
    n_docs = len(doc_offsets) - 1
    doc_of_token = np.repeat(np.arange(n_docs, dtype=np.int64), np.diff(doc_offsets))
    keys = np.unique(codes.astype(np.int64) * max(n_docs, 1) + doc_of_token)
    cells, docs = np.divmod(keys, max(n_docs, 1))
    counts = np.bincount(cells, minlength=n_centroids)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), docs.astype(np.int32)


def _concat_documents(
    codec: ResidualCodec, codes: list[np.ndarray], residuals: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check per-document arrays; return (doc_offsets, flat codes, flat residuals)."""
    if len(codes) != len(residuals):
        raise ValueError(
            f"codes and residuals must have one entry per document, got "
            f"{len(codes)} and {len(residuals)}"
        )
    doc_codes = [_check_codes(c, codec, f"codes[{i}]") for i, c in enumerate(codes)]
    doc_residuals = [
        _check_residuals(r, len(c), codec, f"residuals[{i}]")
        for i, (c, r) in enumerate(zip(doc_codes, residuals))
    ]
    lengths = np.array([len(c) for c in doc_codes], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat_codes = np.concatenate(doc_codes) if doc_codes else np.empty(0, codec.code_dtype)
    flat_residuals = (
        np.concatenate(doc_residuals)
        if doc_residuals
        else np.empty((0, codec.residual_bytes), dtype=np.uint8)
    )
    return offsets, flat_codes.astype(codec.code_dtype, copy=False), flat_residuals


# ---------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CentroidIndex:
    """Residual-compressed ColBERT documents with a centroid inverted file.

    Build it with :meth:`build`, :meth:`from_flat`, :meth:`from_parts` or
    :meth:`from_arrays`; the constructor checks the arrays and stores read-only
    views of them.

    Attributes
    ----------
    codec : ResidualCodec
        The codec every document was compressed with.
    doc_offsets : numpy.ndarray
        ``(n_docs + 1,)`` int64; document ``i`` owns tokens
        ``doc_offsets[i]:doc_offsets[i + 1]``.
    codes : numpy.ndarray
        ``(n_tokens,)`` ``codec.code_dtype`` centroid codes.
    residuals : numpy.ndarray
        ``(n_tokens, codec.residual_bytes)`` uint8 packed residuals.
    ivf_offsets : numpy.ndarray
        ``(n_centroids + 1,)`` int64; centroid ``c`` owns
        ``ivf_docs[ivf_offsets[c]:ivf_offsets[c + 1]]``.
    ivf_docs : numpy.ndarray
        ``(nnz,)`` int32 sorted unique positions of the documents having a token
        assigned to each centroid.
    doc_cell_offsets : numpy.ndarray
        ``(n_docs + 1,)`` int64; document ``i`` has its distinct centroids in
        ``doc_cells[doc_cell_offsets[i]:doc_cell_offsets[i + 1]]``. Derived from
        the inverted file when not given.
    doc_cells : numpy.ndarray
        ``(nnz,)`` ``codec.code_dtype`` sorted distinct centroids of every document.
        The centroid stages of search read these instead of the tokens' codes: a
        document's centroid-interaction score depends only on its set of centroids.
    token_inv_norms : numpy.ndarray
        ``(n_tokens,)`` float32 ``1 / ||centroid + residual||`` of every token, so
        that the exact stage scores ``(q . centroid + q . residual) / norm`` from the
        centroid scores it already has, without rebuilding the vectors.
    check : bool
        Check the arrays' contents (ranges, order). False checks only shapes and
        dtypes: for arrays read back from files whose sha256 the manifest vouches
        for, so that memory-mapped arrays are not read whole at load.
    """

    codec: ResidualCodec
    doc_offsets: np.ndarray
    codes: np.ndarray
    residuals: np.ndarray
    ivf_offsets: np.ndarray
    ivf_docs: np.ndarray
    doc_cell_offsets: "np.ndarray | None" = None
    doc_cells: "np.ndarray | None" = None
    token_inv_norms: "np.ndarray | None" = None
    check: InitVar[bool] = True

    def __post_init__(self, check: bool) -> None:
        if not isinstance(self.codec, ResidualCodec):
            raise ValueError(f"codec must be a ResidualCodec, got {type(self.codec).__name__}")
        if not check:
            self._adopt_trusted()
            return
        codes = _check_codes(self.codes, self.codec)
        doc_offsets = _check_offsets(self.doc_offsets, len(codes), "doc_offsets")
        if len(doc_offsets) - 1 > _MAX_DOCS:
            raise ValueError(
                f"at most {_MAX_DOCS} documents per index, got {len(doc_offsets) - 1}"
            )
        residuals = _check_residuals(self.residuals, len(codes), self.codec, "residuals")
        ivf_docs = _int_array(self.ivf_docs, "ivf_docs")
        ivf_offsets = _check_offsets(self.ivf_offsets, len(ivf_docs), "ivf_offsets")
        if len(ivf_offsets) != self.codec.n_centroids + 1:
            raise ValueError(
                f"ivf_offsets must have {self.codec.n_centroids + 1} entries, "
                f"got {len(ivf_offsets)}"
            )
        ivf_docs = _check_ivf_docs(ivf_docs, ivf_offsets, len(doc_offsets) - 1)
        checked = {
            "codes": codes, "doc_offsets": doc_offsets, "residuals": residuals,
            "ivf_offsets": ivf_offsets, "ivf_docs": ivf_docs,
        }
        for name, array in checked.items():
            object.__setattr__(self, name, _frozen(array))
        self._set_doc_cells(check=True)
        self._set_inv_norms(check=True)
        object.__setattr__(self, "_cache", {})

    def _adopt_trusted(self) -> None:
        """Store the arrays as given after shape and dtype checks only (no scan)."""
        n_docs = len(self.doc_offsets) - 1
        rb = self.codec.residual_bytes
        problems = [
            (self.doc_offsets.ndim == 1 and n_docs >= 0, "doc_offsets must be 1-D"),
            (self.codes.ndim == 1 and self.codes.dtype == self.codec.code_dtype,
             f"codes must be 1-D {self.codec.code_dtype}"),
            (self.residuals.dtype == np.uint8 and self.residuals.shape == (len(self.codes), rb),
             f"residuals must be uint8 of shape ({len(self.codes)}, {rb})"),
            (len(self.ivf_offsets) == self.codec.n_centroids + 1,
             f"ivf_offsets must have {self.codec.n_centroids + 1} entries"),
            (self.ivf_docs.ndim == 1 and self.ivf_docs.dtype == np.int32, "ivf_docs must be 1-D int32"),
        ]
        for ok, message in problems:
            if not ok:
                raise ValueError(message)
        if int(self.doc_offsets[-1]) != len(self.codes) or int(self.ivf_offsets[-1]) != len(self.ivf_docs):
            raise ValueError("doc_offsets / ivf_offsets do not end at the number of codes / entries")
        for name in ARRAY_KEYS:
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        self._set_doc_cells(check=False)
        self._set_inv_norms(check=False)
        object.__setattr__(self, "_cache", {})

    def _set_doc_cells(self, check: bool) -> None:
        """Adopt the given ``doc_cells`` arrays (shape-checked) or derive them."""
        n_docs = len(self.doc_offsets) - 1
        offsets, cells = self.doc_cell_offsets, self.doc_cells
        if offsets is None or cells is None:
            offsets, cells = _transpose_ivf(self.ivf_offsets, self.ivf_docs, n_docs, self.codec.code_dtype)
        else:
            offsets, cells = np.asanyarray(offsets), np.asanyarray(cells)
            if (offsets.shape != (n_docs + 1,) or cells.shape != self.ivf_docs.shape
                    or cells.dtype != self.codec.code_dtype or not np.issubdtype(offsets.dtype, np.integer)
                    or int(offsets[-1]) != len(cells)):
                raise ValueError(
                    f"doc_cell_offsets / doc_cells must have shapes ({n_docs + 1},) / "
                    f"{self.ivf_docs.shape} and doc_cells dtype {self.codec.code_dtype}"
                )
            if check:
                expected = _transpose_ivf(self.ivf_offsets, self.ivf_docs, n_docs, self.codec.code_dtype)
                if not (np.array_equal(offsets, expected[0]) and np.array_equal(cells, expected[1])):
                    raise ValueError("doc_cell_offsets / doc_cells do not match the inverted file")
        object.__setattr__(self, "doc_cell_offsets", _frozen(offsets))
        object.__setattr__(self, "doc_cells", _frozen(cells))

    def _set_inv_norms(self, check: bool) -> None:
        """Adopt the given ``token_inv_norms`` (shape-checked) or compute them."""
        given = self.token_inv_norms
        if given is None:
            norms = _inv_norms(self.codec, self.codes, self.residuals)
        else:
            norms = np.asanyarray(given)
            if norms.shape != (self.n_tokens,) or norms.dtype != np.float32:
                raise ValueError(f"token_inv_norms must be float32 of shape ({self.n_tokens},), "
                                 f"got {norms.dtype} {norms.shape}")
            if check and not np.allclose(norms, _inv_norms(self.codec, self.codes, self.residuals),
                                         rtol=1e-5, atol=0):
                raise ValueError("token_inv_norms do not match the codes and residuals")
        object.__setattr__(self, "token_inv_norms", _frozen(norms))

    # -- construction -------------------------------------------------------

    @classmethod
    def build(
        cls, codec: ResidualCodec, codes: list[np.ndarray], residuals: list[np.ndarray]
    ) -> "CentroidIndex":
        """Index documents given one (codes, residuals) pair per document.

        Parameters
        ----------
        codec : ResidualCodec
            The codec that produced the codes and residuals.
        codes : list of numpy.ndarray
            ``(n_i,)`` integer centroid codes of document ``i``; ``n_i`` may be 0.
        residuals : list of numpy.ndarray
            ``(n_i, codec.residual_bytes)`` uint8 packed residuals of document ``i``.

        Returns
        -------
        CentroidIndex
            Documents take positions ``0..len(codes) - 1`` in list order.
        """
        offsets, flat_codes, flat_residuals = _concat_documents(codec, codes, residuals)
        return cls.from_flat(codec, flat_codes, flat_residuals, np.diff(offsets))

    @classmethod
    def from_flat(
        cls,
        codec: ResidualCodec,
        codes: np.ndarray,
        residuals: np.ndarray,
        doc_lengths: np.ndarray,
    ) -> "CentroidIndex":
        """Index documents stored as concatenated tokens plus per-document lengths.

        Parameters
        ----------
        codec : ResidualCodec
            The codec that produced the codes and residuals.
        codes : numpy.ndarray
            ``(n_tokens,)`` integer centroid codes of all documents, in order.
        residuals : numpy.ndarray
            ``(n_tokens, codec.residual_bytes)`` uint8.
        doc_lengths : numpy.ndarray
            ``(n_docs,)`` non-negative integers summing to ``n_tokens``.

        Returns
        -------
        CentroidIndex
        """
        codes = _check_codes(codes, codec)
        lengths = _int_array(doc_lengths, "doc_lengths")
        if lengths.size and lengths.min() < 0:
            raise ValueError("doc_lengths must be >= 0")
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        if offsets[-1] != len(codes):
            raise ValueError(f"doc_lengths sum to {offsets[-1]}, but there are {len(codes)} codes")
        ivf_offsets, ivf_docs = build_ivf(codes, offsets, codec.n_centroids)
        index = cls(codec, offsets, codes, residuals, ivf_offsets, ivf_docs)
        logger.info(
            "built centroid index: %d documents, %d tokens, %d inverted entries, %.1f MiB",
            index.n_docs, index.n_tokens, len(ivf_docs), index.nbytes() / 2**20,
        )
        return index

    @classmethod
    def from_parts(cls, codec: ResidualCodec, parts: list["CentroidIndex"]) -> "CentroidIndex":
        """Concatenate indexes built with the same codec (e.g. one per shard).

        Parameters
        ----------
        codec : ResidualCodec
            Must equal every part's codec.
        parts : list of CentroidIndex
            Document positions continue in part order.

        Returns
        -------
        CentroidIndex
            Equal, array for array, to :meth:`build` over all documents in order.
        """
        for i, part in enumerate(parts):
            if not isinstance(part, CentroidIndex):
                raise ValueError(f"parts[{i}] is a {type(part).__name__}, not a CentroidIndex")
            if part.codec != codec:
                raise ValueError(f"parts[{i}] was built with a different codec than {codec!r}")
        token_shift = np.cumsum([0] + [p.n_tokens for p in parts], dtype=np.int64)
        doc_shift = np.cumsum([0] + [p.n_docs for p in parts], dtype=np.int64)
        if doc_shift[-1] > _MAX_DOCS:
            raise ValueError(f"at most {_MAX_DOCS} documents per index, got {doc_shift[-1]}")
        offsets = np.concatenate(
            [[0]] + [p.doc_offsets[1:] + s for p, s in zip(parts, token_shift)]
        ).astype(np.int64)
        codes = np.concatenate([np.empty(0, codec.code_dtype)] + [p.codes for p in parts])
        residuals = np.concatenate(
            [np.empty((0, codec.residual_bytes), np.uint8)] + [p.residuals for p in parts]
        )
        ivf_offsets, ivf_docs = _merge_ivfs(parts, doc_shift, codec.n_centroids)
        norms = np.concatenate([np.empty(0, np.float32)] + [p.token_inv_norms for p in parts])
        # Parts are checked indexes and the merge keeps their invariants: no rescan.
        return cls(codec, offsets, codes, residuals, ivf_offsets, ivf_docs, token_inv_norms=norms, check=False)

    def append(self, codes: list[np.ndarray], residuals: list[np.ndarray]) -> "CentroidIndex":
        """New index with more documents on the same centroids.

        Parameters
        ----------
        codes, residuals : list of numpy.ndarray
            Per-document arrays as in :meth:`build`, compressed with this
            index's codec (existing centroids; nothing is re-trained).

        Returns
        -------
        CentroidIndex
            New documents take positions ``n_docs, n_docs + 1, ...``; this
            index is unchanged.
        """
        part = CentroidIndex.build(self.codec, codes, residuals)
        return CentroidIndex.from_parts(self.codec, [self, part])

    def remove(self, positions: np.ndarray) -> "CentroidIndex":
        """New index in which the documents at ``positions`` own no tokens.

        Positions are stable: ``n_docs`` is unchanged and every other document
        keeps its position, tokens and inverted-list entries, so the positional
        id mapping stays valid. A removed document is never returned by
        :meth:`search` or :meth:`exact_maxsim` (no tokens, no list entry); new
        documents go after it with :meth:`append`.

        Parameters
        ----------
        positions : numpy.ndarray
            ``(m,)`` integer document positions in ``[0, n_docs)``; may be
            empty, hold duplicates or documents that already have no tokens.

        Returns
        -------
        CentroidIndex
            Equal, array for array, to :meth:`build` over the same documents
            with those at ``positions`` given zero tokens; this index is unchanged.
        """
        positions = _int_array(positions, "positions")
        if positions.size and (positions.min() < 0 or positions.max() >= self.n_docs):
            raise ValueError(f"positions must lie in [0, {self.n_docs})")
        dropped = np.zeros(self.n_docs, dtype=bool)
        dropped[positions.astype(np.int64)] = True
        lengths = np.where(dropped, 0, self.doc_lengths)
        kept_tokens = np.repeat(~dropped, self.doc_lengths)
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        # Dropping entries keeps every list sorted; a list's new end is the number
        # of entries kept before its old end.
        kept_entries = ~dropped[self.ivf_docs]
        kept_before = np.concatenate([[0], np.cumsum(kept_entries, dtype=np.int64)])
        index = CentroidIndex(
            self.codec, offsets, self.codes[kept_tokens], self.residuals[kept_tokens],
            kept_before[self.ivf_offsets], self.ivf_docs[kept_entries],
            token_inv_norms=self.token_inv_norms[kept_tokens], check=False,
        )
        logger.info(
            "removed %d documents (%d tokens) from a centroid index of %d documents",
            int(np.count_nonzero(dropped & (self.doc_lengths > 0))),
            self.n_tokens - index.n_tokens, self.n_docs,
        )
        return index

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The index arrays, keyed by :data:`ARRAY_KEYS` and :data:`DERIVED_KEYS`,
        for ``.npy`` storage.

        The codec is stored separately (:meth:`ResidualCodec.to_bytes`).
        """
        return {key: getattr(self, key) for key in ARRAY_KEYS + DERIVED_KEYS}

    @classmethod
    def from_arrays(
        cls, codec: ResidualCodec, arrays: dict[str, np.ndarray], *, check: bool = True
    ) -> "CentroidIndex":
        """Inverse of :meth:`to_arrays`.

        Parameters
        ----------
        codec : ResidualCodec
        arrays : dict
            The :data:`ARRAY_KEYS` arrays, and optionally the :data:`DERIVED_KEYS`
            ones (derived when absent). Arrays may be memory-mapped (``np.load(...,
            mmap_mode="r")``); they are used as they are, not copied.
        check : bool
            Check every array's contents (default). False checks shapes and dtypes
            only, for files verified against their manifest's sha256.

        Raises
        ------
        ValueError
            On missing or unknown keys, or inconsistent arrays.
        """
        missing = set(ARRAY_KEYS) - set(arrays)
        unknown = set(arrays) - set(ARRAY_KEYS + DERIVED_KEYS)
        if missing or unknown:
            raise ValueError(
                f"index arrays must have keys {list(ARRAY_KEYS)} (and optionally "
                f"{list(DERIVED_KEYS)}); missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        given = {key: arrays[key] for key in ARRAY_KEYS + DERIVED_KEYS if key in arrays}
        return cls(codec, **given, check=check)

    # -- sizes ---------------------------------------------------------------

    @property
    def n_docs(self) -> int:
        """Number of documents, including those with no tokens."""
        return len(self.doc_offsets) - 1

    @property
    def n_tokens(self) -> int:
        """Number of stored token vectors."""
        return len(self.codes)

    @property
    def doc_lengths(self) -> np.ndarray:
        """``(n_docs,)`` int64 tokens per document."""
        return np.diff(self.doc_offsets)

    def nbytes(self) -> int:
        """Total bytes of the index arrays (the codec not included)."""
        return int(sum(getattr(self, key).nbytes for key in ARRAY_KEYS + DERIVED_KEYS))

    def __repr__(self) -> str:
        return (
            f"CentroidIndex(n_docs={self.n_docs}, n_tokens={self.n_tokens}, "
            f"codec={self.codec!r})"
        )

    # -- search ---------------------------------------------------------------

    def search(
        self,
        Q: np.ndarray,
        k: int,
        params: SearchParams | None = None,
        *,
        allowed: np.ndarray | None = None,
        threads: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """PLAID search: candidate generation, two centroid stages, exact MaxSim.

        Parameters
        ----------
        Q : numpy.ndarray
            ``(nq, Lq, dim)`` float query token vectors, rows unit or zero (zero
            rows are padding and are ignored). ``dim`` is the codec dim or the
            prefix ``params.dim``; a prefix is re-normalised.
        k : int
            Results per query, at least 1.
        params : SearchParams, optional
            None fields take :func:`plaid_defaults` for ``k``.
        allowed : numpy.ndarray, optional
            ``(m,)`` integer document positions; only these can be returned.
        threads : int, optional
            CPU threads for this call: as many queries of a batch searched at once,
            each with one BLAS thread; a single query splits its centroid product and
            its exact stage over them instead (the same results: each part is computed
            as the whole would be). None leaves the process's BLAS setting
            as it is and searches one query at a time. With int8 products
            (``params.products``) a single query's stages are not split: its torch
            products run at ``threads`` threads instead (at one in a batch, or with None;
            torch's setting is put back after the call).

        Returns
        -------
        scores : numpy.ndarray
            ``(nq, k)`` float32 MaxSim of the decompressed documents (against the
            merged query rows, ``params.merge_tokens``), best first; ``-inf`` where
            fewer than ``k`` documents were found.
        ids : numpy.ndarray
            ``(nq, k)`` int64 document positions, ``-1`` padded. Documents with
            no tokens are never returned. Equal scores rank the lower position first.
        """
        k = _check_k(k)
        threads = check_threads(threads)
        kernels.ready()  # numba imported on a process's first search (else the numpy stages)
        params = (params or SearchParams()).resolved(k)
        dim = self._prefix_dim(params.dim)
        queries = _prepare_queries(Q, self.codec.dim, dim)
        mask = self._allowed_mask(allowed)
        n_searchable = self._n_searchable(mask)
        n_exact = self._n_exact(params, k)
        centroids = self._centroids(dim) if params.products == "float32" else self.codec.centroids
        nq, lq = queries.shape[:2]
        results: list[tuple[np.ndarray, np.ndarray]] = []
        # torch's products at the search's threads for a single query, else at one (int8.torch_threads)
        products = (int8.torch_threads(_single_query_threads(threads, nq)) if params.products == "int8"
                    else contextlib.nullcontext())
        with _thread_limit(threads), products, _query_pool(threads, nq) as pool:
            # A batch goes over the threads query by query; a single query splits its own
            # stages over them -- with float32 products only: with int8 ones a split query
            # took longer than a whole one (XQuAD sentences, 2 threads: 2.9-3.0 ms against
            # 2.7 at one thread), its products now ~0.1-0.3 ms, near what handing a part to
            # another thread costs.
            split = _split(threads, nq) if params.products == "float32" else None
            # Centroid scores for a block of queries in one matrix product (BLAS
            # is most efficient on many rows); the later stages go query by query.
            block = max(1, _STAGE_BUDGET // max(1, lq * len(centroids)))
            for begin in range(0, nq, block):
                # each query's live rows (padding dropped, near copies merged), then zero rows
                # up to a width BLAS multiplies fastest (padded_rows), all in one product
                merged = [merge_query_tokens(q, params.merge_tokens) for q in queries[begin : begin + block]]
                part = [_pad_rows(q, padded_rows(len(q))) for q in merged]
                ends = np.cumsum([len(q) for q in part])
                if params.products == "int8":
                    # the int32 product and its scales: each query's stages scale their columns
                    products, c_scales, q_scales, q8 = self._int8_centroid_products(
                        dim, part[0] if len(part) == 1 else np.concatenate(part))
                    columns = [_Int8Columns(products[:, int(end) - len(q):int(end)], c_scales,
                                            q_scales[int(end) - len(q):int(end)], q8[int(end) - len(q):int(end)])
                               for q, end in zip(part, ends)]
                else:
                    scores_t = _centroid_product(centroids, np.concatenate(part).T, split)
                    columns = [_query_columns(scores_t, int(end) - len(q), int(end)) for q, end in zip(part, ends)]
                args = [
                    (q, len(m), scores, params, k, dim, mask, n_searchable, n_exact, split)
                    for q, m, scores in zip(part, merged, columns)
                ]
                if pool is None:
                    results += [self._search_one(*a) for a in args]
                else:
                    results += list(pool.map(lambda a: self._search_one(*a), args))
        return _stack_padded(results, k)

    def warm(self, dim: int | None = None) -> float:
        """Load the compiled stages (:mod:`indexing.kernels`) before a first query: numba's
        import and its cached kernels (~0.2 s; ~2 s to compile them after an install), and
        where ``SearchParams()`` means int8 products torch's import (~1.3 s) and the index's
        int8 centroids, which a process's first search otherwise waits for. Two searches of
        queries made of the first centroids, one thread, prefix ``dim``, with an exact stage
        of 10 documents so that the centroid stages run even on a small index: a query whose
        rows are padded and one whose are not, the two array layouts the stages see, each with
        two equal rows to merge, then the two as one batch (whose queries' columns of the int8
        centroid product are strided, another compiled variant of the probe), and one at k=1 whose
        exact stage ends early. Returns the seconds it took (0 where the numpy stages run or nothing is searchable).
        """
        start = time.perf_counter()
        if not kernels.ready() or self.n_docs == 0 or not np.any(self.doc_lengths):
            return 0.0
        centroids = self.codec.centroids
        params = SearchParams(dim=dim, ndocs=4, exact_tokens=1)
        width = min(ROW_BLOCK, len(centroids))
        batch = np.zeros((2, width, centroids.shape[1]), dtype=np.float32)
        for i, rows in enumerate((min(3, width), width)):
            q = batch[i, :rows]
            q[:] = centroids[:rows]
            q[-1] = q[0]  # a near copy: the merge's loop too (a query's padding tokens are)
            self.search(q[None], 10, params, threads=1)
        # the two as one batch: each query's columns of the block's int8 product are strided
        self.search(batch, 10, params, threads=1)
        # and a query whose exact stage ends early (3 documents, 2 first; where the index has more than 3)
        self.search(batch[1:], 1, replace(params, ndocs=12), threads=1)
        # the inverted lists of more cells than the probe takes (a filtered query's widened probe)
        self._cell_documents(np.zeros(1, dtype=np.int64), None)
        return time.perf_counter() - start

    def exact_maxsim(
        self,
        Q: np.ndarray,
        k: int,
        *,
        dim: int | None = None,
        allowed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force MaxSim against every decompressed document (the reference).

        Parameters and returns are those of :meth:`search`, with ``dim`` the
        Matryoshka prefix (None = full).
        """
        k = _check_k(k)
        dim = self._prefix_dim(dim)
        queries = _prepare_queries(Q, self.codec.dim, dim)
        docs = self._searchable_docs(self._allowed_mask(allowed))
        lengths = self.doc_lengths[docs]
        empty = (np.empty(0, np.float32), np.empty(0, np.int64))
        best = [empty] * len(queries)
        for chunk in _doc_chunks(lengths, _TOKEN_BATCH):
            vectors = self._decompress(docs[chunk], dim)
            scores = _batched_maxsim(queries, vectors, lengths[chunk])
            for row, (top_scores, top_ids) in enumerate(best):
                best[row] = _top_k(
                    np.concatenate([top_scores, scores[row]]),
                    np.concatenate([top_ids, docs[chunk]]),
                    k,
                )
        return _stack_padded(best, k)

    # -- search internals -----------------------------------------------------

    def _prefix_dim(self, dim: int | None) -> int:
        if dim is None:
            return self.codec.dim
        is_int = isinstance(dim, (int, np.integer)) and not isinstance(dim, bool)
        if not is_int or not 1 <= dim <= self.codec.dim:
            raise ValueError(
                f"dim must be an integer in 1..{self.codec.dim} (codec dim), got {dim!r}"
            )
        return int(dim)

    def _allowed_mask(self, allowed: np.ndarray | None) -> np.ndarray | None:
        """``(n_docs,)`` bool mask of the allowed positions, or None for all."""
        if allowed is None:
            return None
        allowed = np.asarray(allowed)
        is_int = np.issubdtype(allowed.dtype, np.integer) or allowed.size == 0
        if allowed.ndim != 1 or not is_int:
            raise ValueError(
                f"allowed must be a 1-D integer array of document positions, got "
                f"shape {allowed.shape} dtype {allowed.dtype}"
            )
        if allowed.size and (allowed.min() < 0 or allowed.max() >= self.n_docs):
            raise ValueError(f"allowed positions must lie in [0, {self.n_docs})")
        mask = np.zeros(self.n_docs, dtype=bool)
        mask[allowed.astype(np.int64)] = True
        return mask

    def _searchable_docs(self, mask: np.ndarray | None) -> np.ndarray:
        """``(m,)`` int64 sorted positions of allowed documents with tokens."""
        keep = self.doc_lengths > 0
        if mask is not None:
            keep &= mask
        return np.flatnonzero(keep).astype(np.int64)

    def _n_searchable(self, mask: np.ndarray | None) -> int:
        """How many documents :meth:`_searchable_docs` holds (without a mask: counted once)."""
        if mask is not None:
            return len(self._searchable_docs(mask))
        count = self._cache.get("n_searchable")
        if count is None:  # the index is immutable
            count = self._cache["n_searchable"] = len(self._searchable_docs(None))
        return count

    def _token_ids(self, docs: np.ndarray) -> np.ndarray:
        """Token positions of ``docs``, document after document."""
        return self._tokens_and_lengths(docs)[0]

    def _tokens_and_lengths(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_token_ids` and :meth:`_lengths` of ``docs`` from one lookup of their offsets."""
        starts = self.doc_offsets[docs]
        lengths = self.doc_offsets[docs + 1] - starts
        return (kernels.ranges(starts, lengths) if kernels.loaded() else _ranges(starts, lengths)), lengths

    def _decompress(self, docs: np.ndarray, dim: int) -> np.ndarray:
        """``(T, dim)`` float32 unit token vectors of ``docs``, concatenated."""
        tokens = self._token_ids(docs)
        return self.codec.decompress(self.codes[tokens], self.residuals[tokens], dim=dim)

    def _n_exact(self, params: SearchParams, k: int) -> int:
        """Documents scored exactly: ``max(k, ndocs // 4, exact_tokens / mean length)``."""
        mean_length = self._cache.get("mean_length")
        if mean_length is None:  # the index is immutable: one pass over the offsets, once
            mean_length = self.n_tokens / max(1, int(np.count_nonzero(self.doc_lengths)))
            self._cache["mean_length"] = mean_length
        by_tokens = int(params.exact_tokens / mean_length) if mean_length > 0 else 0
        return max(k, params.ndocs // 4, by_tokens)

    def _lengths(self, docs: np.ndarray) -> np.ndarray:
        """``(len(docs),)`` int64 tokens of ``docs`` (not the whole ``doc_lengths``)."""
        return self.doc_offsets[docs + 1] - self.doc_offsets[docs]

    def _centroids(self, dim: int) -> np.ndarray:
        """``(n_centroids, dim)`` float32 contiguous centroids of the prefix ``dim`` (cached)."""
        cached = self._cache.get(("centroids", dim))
        if cached is None:
            cached = _frozen(_prefix(self.codec.centroids, dim))
            self._cache[("centroids", dim)] = cached
        return cached

    def _search_one(
        self,
        q: np.ndarray,
        n_live: int,
        scores_t: np.ndarray,
        params: SearchParams,
        k: int,
        dim: int,
        mask: np.ndarray | None,
        n_searchable: int,
        n_exact: int,
        split: "_Split | None" = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` (scores, positions) of one ``(Lq, dim)`` query: its first ``n_live``
        rows as :func:`merge_query_tokens` leaves them (none for a query that is all
        padding), then zero rows (:func:`padded_rows`), which the exact stage multiplies
        (each adds exactly 0 to a document's score) and the centroid stages leave out.

        ``scores_t`` is ``(n_centroids, Lq)`` ``centroids @ q.T``, the layout the
        exact stage gathers rows from, or with int8 products the query's columns of the int8
        centroid product (:class:`_Int8Columns`), scaled to scores here (by the probe where it
        runs: :func:`indexing.kernels.probe_documents`); ``n_searchable`` counts the allowed documents
        with tokens; ``n_exact`` documents reach the exact stage; ``split`` spreads the
        exact stage over threads.
        """
        if n_live == 0:
            # Every document scores 0 against an all-padding query.
            docs = self._searchable_docs(mask)[:k]
            return np.zeros(len(docs), dtype=np.float32), docs
        n_centroids = len(self.codec.centroids)
        # A centroid stays when its cosine with some query row reaches the threshold: a
        # merged row is its group's sum, so its scores are measured against the threshold
        # times its norm (without, a group of n rows would keep every centroid scoring
        # threshold / n). (Compared as score >= threshold * norm, in float32, not score / norm
        # >= threshold: one multiplication a row instead of a division a score, the probe's
        # largest cost; the same centroids on the XQuAD-sentence queries measured.)
        bounds = _kept_bounds(q[:n_live], params.centroid_score_threshold)
        ncells = params.ncells
        probed = kernels.ENABLED and ncells <= _ARGMAX_CELLS and ncells < n_centroids
        n_kept = quantized = None
        if isinstance(scores_t, _Int8Columns):
            quantized = (scores_t.q8[:n_live], scores_t.q_scales[:n_live])  # the live rows' int8 values
            columns = scores_t[:3]  # the int32 product and its scales
            if probed:  # the int8 product's scores written by the probe's pass over them
                table = np.empty((n_centroids, n_live), dtype=np.float32)
                docs, kept, n_kept = kernels.probe_documents(table, bounds, ncells, self.ivf_offsets, self.ivf_docs,
                                                             self.n_docs, mask, products=columns)
                scores_t = table
            else:
                scores_t = kernels.dequantize(*columns)
        elif probed:
            docs, kept, n_kept = kernels.probe_documents(scores_t[:, :n_live], bounds, ncells, self.ivf_offsets,
                                                         self.ivf_docs, self.n_docs, mask)
        table = scores_t[:, :n_live]  # (n_centroids, n_live): a cell's scores are one row of it
        if probed:
            # the best cells, the kept centroids and the cells' documents in one compiled pass
            centroid_scores = None  # the (n_live, n_centroids) layout, built only to widen the probe past 8 cells
        else:
            # (n_live, n_centroids): the layout numpy's centroid stages reduce over centroids
            # in; transposing this way round is ~3x cheaper than the other
            centroid_scores = np.ascontiguousarray(table.T)
            docs = self.candidates(centroid_scores, ncells, mask)
            kept = (centroid_scores >= bounds[:, None]).any(axis=0)
        # The exact stage scores max(k, ndocs // 4) documents. A filter (or a small index)
        # can leave the probed cells with fewer allowed candidates than that, and then the
        # best cells of the allowed documents were never looked at: widen the probe until
        # it reaches that many (or every allowed document). A language filter on 1/12 of
        # XQuAD lifted top-10 agreement with exact MaxSim from 0.91 to 0.98 at ncells=4
        # (from 0.67 to 0.98 at ncells=1).
        want = min(n_exact, n_searchable)
        while len(docs) < want and ncells < n_centroids:
            ncells *= 2
            if probed and ncells <= _ARGMAX_CELLS and ncells < n_centroids:  # the probe again, wider
                docs = kernels.probe_documents(table, bounds, ncells, self.ivf_offsets, self.ivf_docs, self.n_docs,
                                               mask)[0]
                continue
            if centroid_scores is None:
                centroid_scores = np.ascontiguousarray(table.T)
            docs = self.candidates(centroid_scores, ncells, mask)
        n_candidates = len(docs)
        pruned = None
        if not self._prunes_nothing(docs, kept, n_kept):
            docs, pruned = self._filter_scored(docs, centroid_scores, kept, max(params.ndocs, n_exact), table)
        # (Pruning that would keep every candidate's every centroid, common with vectors
        # whose centroid scores are all high -- on me5-small 4,090 of 4,096 centroids pass
        # 0.5 -- would score every candidate as the full stage does: one stage is enough.
        # So does pruning that drops under _PRUNE_MIN of the centroids: its stage would
        # cost as much as the full one and the full stage would then score again every
        # document that lost a cell.)
        if pruned is None or len(docs) <= n_exact:
            docs, approx = self._filter_scored(docs, centroid_scores, None, n_exact, table)
        else:
            docs, approx = self._full_stage(docs, pruned, centroid_scores, kept, n_exact, table)
        if logger.isEnabledFor(logging.DEBUG):  # (the counts cost a pass over kept: only when logged)
            logger.debug("plaid query: %d candidates, %d after centroid stages, %d/%d centroids kept",
                         n_candidates, len(docs), int(kept.sum()), len(kept))
        if params.products == "int8" and dim == self.codec.dim:
            return self._int8_exact_top_k(q[:n_live], scores_t, docs, approx, k, params.exact_margin,
                                          params.exact_gap_quantile, quantized)
        return self._exact_top_k(q, scores_t, docs, approx, dim, k, params.exact_margin, split,
                                 params.exact_gap_quantile)

    def _exact_top_k(
        self,
        q: np.ndarray,
        scores_t: np.ndarray,
        docs: np.ndarray,
        approx: "np.ndarray | None",
        dim: int,
        k: int,
        margin: float,
        split: "_Split | None" = None,
        gap_quantile: float = EXACT_GAP_QUANTILE,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The exact stage: top ``k`` of ``docs`` (best ``approx`` first) by exact MaxSim,
        ended early by ``margin`` and ``gap_quantile`` (see :class:`SearchParams`)."""
        passes = _early_ended(docs, approx, k, margin, gap_quantile,
                              lambda part: (self._exact_scores(q, scores_t, part, dim, split),))
        ids = np.concatenate([part for part, _ in passes])
        logger.debug("plaid exact stage: %d of %d documents scored", len(ids), len(docs))
        return _top_k(np.concatenate([scored[0] for _, scored in passes]), ids, k, positions=True)

    # -- the int8 products (indexing.int8) --------------------------------------

    def _int8_centroids(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """The prefix-``dim`` centroids as int8 rows and their float32 scales (cached)."""
        cached = self._cache.get(("int8-centroids", dim))
        if cached is None:
            cached = int8.quantize_rows(_prefix(self.codec.centroids, dim))
            self._cache[("int8-centroids", dim)] = cached
        return cached

    def _int8_table(self) -> tuple[np.ndarray, np.float32]:
        """The codec's residual byte table as int8 and its scale (cached)."""
        cached = self._cache.get("int8-table")
        if cached is None:
            cached = self._cache["int8-table"] = int8.quantize_table(self.codec.byte_weights)
        return cached

    def _int8_words(self) -> np.ndarray:
        """:meth:`_int8_table`'s rows as one 1-D array of 2-, 4- or 8-byte words (cached): what
        :func:`indexing.kernels.decode_words` copies a byte's int8 values as."""
        cached = self._cache.get("int8-words")
        if cached is None:
            cached = self._cache["int8-words"] = kernels.int8_words(self._int8_table()[0])
        return cached

    def _int8_centroid_products(self, dim: int, rows: np.ndarray
                                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The int8 centroid product of query ``rows``: ``(n_centroids, len(rows))`` int32 and the
        centroids' and the rows' scales (each centroid and each row on its own scale), the scores
        ``products * c_scales[:, None] * q_scales`` (:func:`indexing.kernels.dequantize`), and the
        rows as int8."""
        c8, c_scales = self._int8_centroids(dim)
        q8, q_scales = int8.quantize_rows(rows)
        return int8.int_mm(c8, q8.T), c_scales, q_scales, q8

    def _int8_pass(self, q8_t: np.ndarray, row_scales: np.ndarray, scores_t: np.ndarray,
                   layout: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], products: np.ndarray,
                   out: np.ndarray, magnitudes: np.ndarray) -> None:
        """The exact stage's int8 scores of documents laid out as ``layout`` says (the first four
        arrays of :func:`indexing.kernels.exact_layout`: tokens, lengths, offsets, blocks of
        :data:`_INT8_EXACT_TOKENS` tokens) and their magnitudes (the sums of the rows' absolute
        maxima; :func:`indexing.kernels.token_maxsum_int8`), written to ``out`` and ``magnitudes``:
        block by block, the tokens decoded to int8, multiplied by ``q8_t`` (``(width, rows)`` int8)
        into int32 rows of ``products`` (the documents' tokens one after another from its first
        row on; the rescoring reads them again), reduced."""
        tokens, lengths, offsets, chunks = layout
        if len(lengths) == 0:
            return
        words = self._int8_words()
        edges = chunks.tolist()
        starts = offsets[chunks].tolist()
        buffer = np.empty((max(b - a for a, b in zip(starts, starts[1:])), q8_t.shape[0]), dtype=np.int8)
        # the products of the buffer's rows by the query's, its view made once (int8.products_into)
        into = int8.products_into(buffer, q8_t, products)
        for first, stop, lo, hi in zip(edges, edges[1:], starts, starts[1:]):
            kernels.decode_words(words, self.residuals, tokens[lo:hi], buffer[: hi - lo])
            into(hi - lo, lo)
            kernels.token_maxsum_int8(products[lo:hi], row_scales, scores_t, self.codes, self.token_inv_norms,
                                      tokens[lo:hi], lengths[first:stop], out[first:stop], magnitudes[first:stop])

    def _int8_exact_top_k(
        self,
        q: np.ndarray,
        scores_t: np.ndarray,
        docs: np.ndarray,
        approx: "np.ndarray | None",
        k: int,
        margin: float,
        gap_quantile: float = EXACT_GAP_QUANTILE,
        quantized: "tuple[np.ndarray, np.ndarray] | None" = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_exact_top_k` with int8 products: the documents' exact-stage scores from int8
        residual products (with the int8 centroid scores of ``scores_t``), the same early end
        (on those scores: :func:`_early_ended`'s passes), then the top ``k`` of them rescored in
        float32 (:func:`indexing.kernels.rescore_int8`'s rule: each row's maximum over the tokens whose int8 score is
        within :data:`indexing.int8.PAIR_MARGIN` of the row's norm of its best), and every other
        document whose int8 score plus :data:`indexing.int8.REFINE_MARGIN` of its magnitude
        reaches the k-th best float32 score: the results' scores are float32 MaxSim
        (:func:`indexing.kernels.refine_int8`). ``q`` holds the query's live rows only (no
        padding). Each pass's layout, the second pass's documents and the rescoring are one
        compiled call each (:func:`indexing.kernels.exact_layout`, :func:`indexing.kernels.early_rest`).
        ``quantized``: ``q`` as :func:`indexing.int8.quantize_rows` quantizes it, where the centroid
        product did already."""
        if len(docs) == 0:
            return np.empty(0, dtype=np.float32), docs
        table, table_scale = self._int8_table()
        q8, q_scales = int8.quantize_rows(q) if quantized is None else quantized
        width = self.residuals.shape[1] * table.shape[1]
        if width != q8.shape[1]:  # the last byte's unused values multiply zero columns
            q8 = np.pad(q8, ((0, 0), (0, width - q8.shape[1])))
        q8_t = q8.T
        row_scales = (q_scales * table_scale).astype(np.float32)
        n = len(docs)
        first = max(2 * k, n * 3 // 8)  # (_early_ended's passes)
        early = approx is not None and math.isfinite(margin) and n > first
        head = docs[:first] if early else docs
        *layout, total = kernels.exact_layout(self.doc_offsets, docs, _INT8_EXACT_TOKENS, len(head))
        # the passes' int32 products, one after another (at most every document's tokens), and
        # each scored document's int8 score, magnitude and first product row, in the same order
        products = np.empty((total, q8_t.shape[1]), dtype=np.int32)
        scores = np.empty(n, dtype=np.float32)
        magnitudes = np.empty(n, dtype=np.float32)
        rows = np.empty(n, dtype=np.int64)
        self._int8_pass(q8_t, row_scales, scores_t, layout, products, scores, magnitudes)
        rows[: len(head)] = layout[2][:-1]
        ids, m = head, len(head)
        if early:
            gap = None  # the largest gap, taken by early_rest
            if gap_quantile < 1:
                gaps = scores[:first] - approx[:first]
                gap = float(np.max(gaps))
                if math.isfinite(gap):  # (an infinite gap, a document without cells: score all)
                    gap = float(np.quantile(gaps, gap_quantile))
            rest = kernels.early_rest(scores[:first], approx, docs, first, k, margin, gap)
            if len(rest):
                used = int(layout[2][-1])
                *layout, _ = kernels.exact_layout(self.doc_offsets, rest, _INT8_EXACT_TOKENS)
                self._int8_pass(q8_t, row_scales, scores_t, layout, products[used:], scores[first:],
                                magnitudes[first:])
                rows[first: first + len(rest)] = layout[2][:-1] + used
                ids, m = np.concatenate([head, rest]), first + len(rest)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("plaid exact stage (int8): %d of %d documents scored", m, n)
        words = self._cache.get("float32-words")
        if words is None:
            words = self._cache["float32-words"] = kernels.float_words(self.codec.byte_weights)
        best, best_ids, rescored = kernels.refine_int8(
            products, row_scales, scores_t, self.codes, self.token_inv_norms, self.codec.centroids, words,
            self.residuals, q, int8.PAIR_MARGIN, int8.REFINE_MARGIN, self.doc_offsets, ids, scores[:m], magnitudes[:m],
            rows[:m], k)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("plaid exact stage (int8): %d documents rescored in float32", rescored)
        return best, best_ids

    def _exact_scores(
        self, q: np.ndarray, scores_t: np.ndarray, docs: np.ndarray, dim: int, split: "_Split | None" = None
    ) -> np.ndarray:
        """``(len(docs),)`` float32 MaxSim of ``q`` against the decompressed ``docs``.

        At the full dimension a token's score is ``(q . c + q . r) / ||c + r||``:
        ``q . c`` is a row of ``scores_t`` (``(n_centroids, Lq)``), ``q . r`` one
        product with the decoded residuals, and the inverse norm is stored, so no
        vector is rebuilt or normalised. A Matryoshka prefix re-normalises the
        prefix, and decompresses. With ``split`` consecutive groups of the blocks below go to
        its threads (the same blocks, so the same scores).
        """
        lengths = self._lengths(docs)
        if dim != self.codec.dim:
            return _segment_maxsum(q @ self._decompress(docs, dim).T, lengths)
        out = np.empty(len(docs), dtype=np.float32)
        if len(docs) == 0:
            return out
        # Scored in blocks of ~_EXACT_TOKENS tokens whose decoded residuals stay in cache.
        chunks = list(_doc_chunks(lengths, _EXACT_TOKENS))
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = self._token_ids(docs)

        def score(group: slice) -> None:
            blocks = chunks[group]
            lo, hi = int(offsets[blocks[0].start]), int(offsets[blocks[-1].stop])
            if kernels.ENABLED:  # the compiled stages read the tokens in place; one decode buffer a group
                gathered = None
                widest = max(int(offsets[c.stop] - offsets[c.start]) for c in blocks)
                buffer = np.empty((widest, self.codec.dim), dtype=np.float32)
            else:  # numpy's: a group's tokens gathered at once (one pass over the index's arrays)
                gathered = (np.take(self.residuals, tokens[lo:hi], axis=0), np.take(self.codes, tokens[lo:hi]),
                            np.take(self.token_inv_norms, tokens[lo:hi]))
                buffer = None
            for chunk in blocks:
                rows = slice(int(offsets[chunk.start]) - lo, int(offsets[chunk.stop]) - lo)
                part = None if gathered is None else tuple(a[rows] for a in gathered)
                out[chunk] = self._exact_block(q, scores_t, tokens[lo:hi][rows], lengths[chunk], part, buffer)

        if split is None:
            score(slice(None))
        else:
            starts = np.array([c.start for c in chunks] + [len(docs)])
            split.map(score, split.parts(np.diff(offsets[starts]), SPLIT_MIN_TOKENS))
        return out

    def _exact_block(
        self,
        q: np.ndarray,
        scores_t: np.ndarray,
        tokens: np.ndarray,
        lengths: np.ndarray,
        gathered: "tuple[np.ndarray, np.ndarray, np.ndarray] | None" = None,
        buffer: "np.ndarray | None" = None,
    ) -> np.ndarray:
        """Exact MaxSim of a few consecutive documents' ``tokens`` at the full dimension
        (``scores_t``: (C, Lq)). ``gathered``: the tokens' residuals, codes and inverse norms
        gathered for numpy's stage; None: the compiled stage (:mod:`indexing.kernels`), which
        reads them from the index's arrays and decodes into ``buffer`` (at least
        ``(len(tokens), dim)`` float32). The same floats either way."""
        # (T, Lq) layout: the product with the residuals as the left operand is ~1.5x
        # faster in BLAS.
        if gathered is None:
            decoded = kernels.decode_residuals(self.codec.byte_weights, self.residuals, tokens,
                                               buffer[:len(tokens)])
            return kernels.token_maxsum(decoded @ q.T, scores_t, self.codes, self.token_inv_norms, tokens, lengths)
        residuals, codes, inv_norms = gathered
        token_scores = self.codec.residual_vectors(residuals, small_table=True) @ q.T
        token_scores += np.take(scores_t, codes, axis=0)
        token_scores *= inv_norms[:, None]
        return _segment_maxsum(token_scores.T, lengths)

    def _full_stage(
        self,
        docs: np.ndarray,
        pruned: np.ndarray,
        centroid_scores: np.ndarray,
        kept: np.ndarray,
        n_keep: int,
        table: "np.ndarray | None" = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The full centroid interaction of the pruned stage's ``docs`` (scores
        ``pruned``): the best ``n_keep``, best first, with their scores (``table``: see
        :meth:`_interaction_scores`).

        A document none of whose cells was pruned already has its full score (the same
        cells, summed the same way): only the others are scored again. On XQuAD
        (me5-small, 4,096 centroids, ~6 of them pruned) that is a few of the 256.
        """
        scores = np.array(pruned, dtype=np.float32, copy=True)
        redo = np.flatnonzero(self._pruned_any(docs, kept))
        if len(redo):
            scores[redo] = self._interaction_scores(docs[redo], centroid_scores, None, table)
        best, ids = _top_k(scores, docs, n_keep, positions=True)
        return ids, best

    def _pruned_any(self, docs: np.ndarray, kept: np.ndarray) -> np.ndarray:
        """``(len(docs),)`` bool: the document has a cell outside ``kept`` (or no cell)."""
        starts = self.doc_cell_offsets[docs]
        lengths = self.doc_cell_offsets[docs + 1] - starts
        out = lengths == 0
        has = np.flatnonzero(~out)
        if len(has):
            dropped = ~kept[self.doc_cells[_ranges(starts[has], lengths[has])]]
            out[has] = np.logical_or.reduceat(dropped, _segment_starts(lengths[has]))
        return out

    def _prunes_nothing(self, docs: np.ndarray, kept: np.ndarray, n_kept: "int | None" = None) -> bool:
        """True when pruning is not worth its stage: every centroid of every one of ``docs``
        is in ``kept``, or ``kept`` leaves out under :data:`_PRUNE_MIN` of all centroids
        (``n_kept``: how many ``kept`` holds, where known)."""
        if n_kept is None:
            n_kept = int(np.count_nonzero(kept))
        if n_kept / len(kept) >= 1.0 - _PRUNE_MIN:
            return True
        starts = self.doc_cell_offsets[docs]
        return bool(kept[self.doc_cells[_ranges(starts, self.doc_cell_offsets[docs + 1] - starts)]].all())

    def candidates(
        self, centroid_scores: np.ndarray, ncells: int, mask: np.ndarray | None
    ) -> np.ndarray:
        """Sorted documents in the inverted lists of each query token's best cells."""
        n_centroids = centroid_scores.shape[1]
        if ncells >= n_centroids:
            cells = np.arange(n_centroids)
        else:
            cells = np.unique(best_cells(centroid_scores, ncells))
        return self._cell_documents(cells, mask)

    def _cell_documents(self, cells: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        """Sorted documents in the inverted lists of ``cells`` (distinct), ``mask``'s only."""
        if kernels.loaded():
            return kernels.cell_documents(self.ivf_offsets, self.ivf_docs, cells, self.n_docs, mask)
        starts = self.ivf_offsets[cells]
        entries = self.ivf_docs[_ranges(starts, self.ivf_offsets[cells + 1] - starts)]
        # A mark per document instead of a sort of the (overlapping) lists.
        hit = np.zeros(self.n_docs, dtype=bool)
        hit[entries] = True
        if mask is not None:
            hit &= mask
        return np.flatnonzero(hit)

    def centroid_filter(
        self,
        docs: np.ndarray,
        centroid_scores: np.ndarray,
        kept: np.ndarray | None,
        n_keep: int,
    ) -> np.ndarray:
        """The ``n_keep`` best ``docs`` by centroid interaction (pruned when ``kept`` is given)."""
        return self._filter_scored(docs, centroid_scores, kept, n_keep)[0]

    def _filter_scored(
        self,
        docs: np.ndarray,
        centroid_scores: np.ndarray,
        kept: np.ndarray | None,
        n_keep: int,
        table: "np.ndarray | None" = None,
    ) -> tuple[np.ndarray, "np.ndarray | None"]:
        """:meth:`centroid_filter`, best first, with the scores (None: ``docs`` kept unscored;
        ``table``: see :meth:`_interaction_scores`)."""
        if len(docs) <= n_keep:
            return docs, None
        best, ids = _top_k(self._interaction_scores(docs, centroid_scores, kept, table), docs, n_keep, positions=True)
        return ids, best

    def _interaction_scores(
        self, docs: np.ndarray, centroid_scores: np.ndarray, kept: np.ndarray | None,
        table: "np.ndarray | None" = None,
    ) -> np.ndarray:
        """``(len(docs),)`` float32 centroid interaction of ``docs``: MaxSim with every token
        replaced by its centroid, over each document's distinct cells (a token's score is
        its centroid's, so repeated centroids add nothing).

        ``centroid_scores``: ``(Lq, n_centroids)`` float32. ``kept``: ``(n_centroids,)`` bool,
        only these cells count (centroid pruning); a document left with none scores
        ``-inf`` (ranked last), as does one without cells.

        With the compiled stages (:data:`indexing.kernels.ENABLED`) one loop over the
        documents takes each one's maxima from ``table``, the same scores in the product's
        ``(n_centroids, Lq)`` layout (any row stride; built from ``centroid_scores`` when
        None), and sums them as numpy does below (:func:`indexing.kernels.cell_maxsum_docs`).
        Otherwise the documents go in order of their number of cells, in blocks of about
        :data:`INTERACTION_CELLS` cells (:meth:`_centroid_interaction`). The same floats.
        """
        if kernels.ready():  # (centroid_filter's callers may not have searched yet)
            if table is None:
                table = np.ascontiguousarray(centroid_scores.T)
            return kernels.cell_maxsum_docs(table, self.doc_cells, self.doc_cell_offsets, docs, kept)
        starts = self.doc_cell_offsets[docs]
        lengths = self.doc_cell_offsets[docs + 1] - starts
        # (n_centroids, Lq): a cell's scores are one contiguous row; pruned cells score -inf
        table = (np.where(kept[:, None], centroid_scores.T, np.float32(-np.inf)) if kept is not None
                 else np.ascontiguousarray(centroid_scores.T))
        order = np.argsort(lengths, kind="stable")
        sorted_lengths = lengths[order]
        out = np.empty(len(docs), dtype=np.float32)
        first = int(np.searchsorted(sorted_lengths, 1))  # documents without cells come first
        out[order[:first]] = -np.inf
        for chunk in _doc_chunks(sorted_lengths[first:], INTERACTION_CELLS):
            rows = order[first + chunk.start : first + chunk.stop]
            out[rows] = self._centroid_interaction(starts[rows], lengths[rows], table)
        return out

    def _centroid_interaction(self, starts: np.ndarray, lengths: np.ndarray, table: np.ndarray) -> np.ndarray:
        """The centroid interaction of a block of documents (:meth:`_interaction_scores`).

        Parameters
        ----------
        starts, lengths : numpy.ndarray
            ``(n,)`` where each document's cells start in :attr:`doc_cells`, and how
            many there are (each >= 1).
        table : numpy.ndarray
            ``(n_centroids, Lq)`` float32 centroid scores, ``-inf`` rows for pruned cells.

        Returns
        -------
        numpy.ndarray
            ``(n,)`` float32.

        Each document's cells padded to the block's widest (its last cell repeated: a
        maximum is unchanged by repeats), then one gather of score rows and one maximum
        over the padded axis, where ``np.maximum.reduceat`` over the ragged cells was
        slower (1.9 -> 1.8 ms a stage call on XQuAD-sentence queries).

        The padded axis comes first, ``(width, n, Lq)``: the maximum over it is an
        elementwise maximum of contiguous ``(n, Lq)`` slabs, ~3x faster than numpy's
        reduction over the middle axis of ``(n, width, Lq)`` (0.67 -> 0.23 ms for 812
        documents, 32 query rows), with the same floats; ``np.take`` gathers ~1.5x faster
        than fancy indexing.
        """
        width = int(lengths.max())
        cells = self.doc_cells[starts + np.minimum(np.arange(width)[:, None], lengths - 1)]
        return np.take(table, cells, axis=0).max(axis=0).sum(axis=1, dtype=np.float32)


def _early_ended(docs: np.ndarray, approx: "np.ndarray | None", k: int, margin: float, gap_quantile: float,
                 score) -> list[tuple[np.ndarray, tuple]]:
    """The exact stage's passes over ``docs`` (best ``approx`` first), ended early by ``margin``
    and ``gap_quantile`` (see :class:`SearchParams`): ``(part, score(part))`` for the first
    ``max(2k, 3/8)`` of them, then (if any) for each later one whose ``approx`` plus the largest
    (quantile of the) scored ones' (score - approx) gap plus ``margin * |k-th best score|``
    reaches that k-th best score. ``score(part)`` returns a tuple whose first item is the
    part's exact-stage scores (float32's, or int8's before their rescoring)."""
    first = max(2 * k, len(docs) * 3 // 8)
    if approx is None or not math.isfinite(margin) or len(docs) <= first:
        return [(docs, score(docs))]
    head = score(docs[:first])
    scores = head[0]
    kth = np.partition(scores, len(scores) - k)[len(scores) - k]
    gaps = scores - approx[:first]
    gap = float(np.max(gaps))
    if gap_quantile < 1 and math.isfinite(gap):  # (an infinite gap, a document without cells: score all)
        gap = float(np.quantile(gaps, gap_quantile))
    reach = approx[first:] + gap + margin * abs(float(kth))
    rest = docs[first:][reach >= kth]
    return [(docs[:first], head)] + ([(rest, score(rest))] if len(rest) else [])


def _transpose_ivf(
    ivf_offsets: np.ndarray, ivf_docs: np.ndarray, n_docs: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Every document's sorted distinct centroids from the inverted lists.

    Returns
    -------
    doc_cell_offsets : numpy.ndarray
        ``(n_docs + 1,)`` int64.
    doc_cells : numpy.ndarray
        ``(nnz,)`` ``dtype``.
    """
    n_centroids = len(ivf_offsets) - 1
    cells = np.repeat(np.arange(n_centroids, dtype=dtype), np.diff(ivf_offsets))
    # A stable sort by document keeps each document's cells in increasing order.
    order = np.argsort(ivf_docs, kind="stable")
    counts = np.bincount(ivf_docs, minlength=n_docs) if len(ivf_docs) else np.zeros(n_docs, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return offsets, cells[order]


def _inv_norms(codec: ResidualCodec, codes: np.ndarray, residuals: np.ndarray) -> np.ndarray:
    """``(n,)`` float32 inverse norms of the reconstructed tokens (0 for a zero vector)."""
    out = np.empty(len(codes), dtype=np.float32)
    for begin in range(0, len(codes), _TOKEN_BATCH):
        rows = slice(begin, begin + _TOKEN_BATCH)
        vectors = codec.decompress(codes[rows], residuals[rows], normalize=False)
        norms = np.linalg.norm(vectors, axis=1)
        out[rows] = np.where(norms > 0, 1.0 / np.maximum(norms, np.finfo(np.float32).tiny), 0.0)
    return out


def best_cells(centroid_scores: np.ndarray, ncells: int) -> np.ndarray:
    """``(Lq, ncells)`` the best centroids of every query token (any order within a row).

    For a few cells, repeated row-wise ``argmax`` (a vectorised scan) beats a
    partition of every row by about 4x on 4,096 centroids; for many, partition.
    """
    n_centroids = centroid_scores.shape[1]
    if ncells > _ARGMAX_CELLS:
        return np.argpartition(centroid_scores, n_centroids - ncells, axis=1)[:, n_centroids - ncells :]
    scores = np.array(centroid_scores, dtype=np.float32, copy=True)
    rows = np.arange(len(scores))
    best = np.empty((len(scores), ncells), dtype=np.int64)
    for j in range(ncells):
        best[:, j] = scores.argmax(axis=1)
        scores[rows, best[:, j]] = -np.inf
    return best


@contextlib.contextmanager
def _thread_limit(threads: int | None) -> Iterator[None]:
    """BLAS at one thread for the duration (None: as it is).

    The products of one query are small, and numpy's OpenBLAS workers busy-wait about
    0.1 s after each call they serve, competing with whatever runs next (the query
    pool's other searches, the query encoder): a batch is spread over queries instead.
    """
    if threads is None:
        yield
        return
    with controller().limit(limits=1, user_api="blas"):
        yield


@contextlib.contextmanager
def _query_pool(threads: int | None, nq: int) -> Iterator["ThreadPoolExecutor | None"]:
    """A pool searching ``threads`` queries at once (numpy releases the GIL), or None."""
    if threads is None or threads < 2 or nq < 2:
        yield None
        return
    with ThreadPoolExecutor(max_workers=min(threads, nq), thread_name_prefix="plaid") as pool:
        yield pool


# The pools that split single queries, one per thread count, kept for the process: a search
# of one query takes a few ms, and starting a thread for each would cost ~0.1 ms of it.
_SPLIT_POOLS: dict[int, ThreadPoolExecutor] = {}
_SPLIT_LOCK = threading.Lock()


def _forget_split_pools() -> None:
    """In a forked child: none of the parent's pool threads exist there, and the lock may
    have been held by one of the parent's other threads at the fork."""
    global _SPLIT_LOCK
    _SPLIT_POOLS.clear()
    _SPLIT_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_split_pools)


def _single_query_threads(threads: int | None, nq: int) -> int:
    """The threads one query's own work may use in a search of ``nq`` queries at ``threads``:
    all of them for a single query at two or more, else one (a batch goes query by query,
    :func:`_query_pool`)."""
    return threads if threads is not None and threads >= 2 and nq == 1 else 1


def _split(threads: int | None, nq: int) -> "_Split | None":
    """How a search of ``nq`` queries at ``threads`` threads splits a single query's stages
    over the threads (None: it does not; see :func:`_single_query_threads`)."""
    threads = _single_query_threads(threads, nq)
    if threads == 1:
        return None
    with _SPLIT_LOCK:
        pool = _SPLIT_POOLS.get(threads)
        if pool is None:  # the calling thread runs a part too
            pool = _SPLIT_POOLS[threads] = ThreadPoolExecutor(threads - 1, thread_name_prefix="plaid-split")
    return _Split(pool, threads)


def _merge_ivfs(
    parts: list[CentroidIndex], doc_shift: np.ndarray, n_centroids: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge the inverted lists of consecutive parts, shifting document positions."""
    cells = [np.repeat(np.arange(n_centroids), np.diff(p.ivf_offsets)) for p in parts]
    docs = [p.ivf_docs.astype(np.int64) + s for p, s in zip(parts, doc_shift)]
    if not parts:
        return np.zeros(n_centroids + 1, dtype=np.int64), np.empty(0, dtype=np.int32)
    cells, docs = np.concatenate(cells), np.concatenate(docs)
    # Parts hold increasing position ranges, so a stable sort by cell keeps
    # every merged list sorted.
    order = np.argsort(cells, kind="stable")
    counts = np.bincount(cells, minlength=n_centroids)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return offsets, docs[order].astype(np.int32)


def _batched_maxsim(queries: np.ndarray, vectors: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """MaxSim of every query against consecutive documents.

    Parameters
    ----------
    queries : numpy.ndarray
        ``(nq, Lq, dim)`` float32.
    vectors : numpy.ndarray
        ``(T, dim)`` float32 tokens of the documents, concatenated.
    lengths : numpy.ndarray
        ``(n,)`` tokens per document, each ``>= 1``.

    Returns
    -------
    numpy.ndarray
        ``(nq, n)`` float32.
    """
    nq, lq, dim = queries.shape
    starts = _segment_starts(lengths)
    batch = max(1, _SCORE_BUDGET // max(1, len(vectors) * lq))
    out = np.empty((nq, len(lengths)), dtype=np.float32)
    for begin in range(0, nq, batch):
        block = queries[begin : begin + batch]
        token_scores = block.reshape(-1, dim) @ vectors.T  # (b * Lq, T)
        best = np.maximum.reduceat(token_scores, starts, axis=1)
        out[begin : begin + len(block)] = best.reshape(len(block), lq, len(lengths)).sum(
            axis=1, dtype=np.float32
        )
    return out
