"""The PLAID engine's two large products in int8, through torch (AMX).

A search multiplies its query rows twice: by every centroid (``centroids @ q.T``, ~20 merged
rows x 8,192 centroids x 384 on XQuAD sentences) and by the decoded residuals of the exact
stage's tokens (~9,000). In float32 numpy's OpenBLAS runs both near one core's AVX-512 peak,
and they were ~2.7 ms of a 4.3 ms query. On a CPU with AMX, ``torch._int_mm`` multiplies
int8 matrices into int32 ~5x faster (32 rows by 8,192 centroids: 0.33 ms against 1.8), and
its int32 sums are exact: only the inputs are rounded. Each centroid and each query row is
scaled by its own largest coordinate (:func:`quantize_rows`), the residuals by the codec's
largest bucket weight (:func:`quantize_table`). bfloat16, as fast through AMX, rounds its
*outputs* to 8 bits: its centroid scores changed 1.3% of the top-10 documents on Tatoeba,
int8's 0.1% (README, "int8 products").

The int8 scores serve what is approximate anyway (the probe, the centroid stages, the order
and early end of the exact stage); the results are float32 again: the exact stage's top
``k`` documents by their int8 scores are rescored in float32 (their decompressed tokens
times the query rows), and so is every other document whose int8 score is within
:data:`REFINE_MARGIN` of reaching them (``CentroidIndex._int8_exact_top_k``). A rescored
document's row maximum is taken over the few tokens whose int8 score is within
:data:`PAIR_MARGIN` of the row's best (``kernels.rescore_int8``, reading the exact stage's
int32 products again), not over all of them.

torch is imported on the first search that uses these products (``SearchParams.products``;
``auto`` picks int8 on a CPU with AMX int8 where torch and numba are installed): ~1.3 s and
~190 MB that a process serving pre-encoded queries would not otherwise hold
(``TESSERA_PLAID_PRODUCTS=float32`` keeps it out). A process that encodes its queries has
torch already.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
from typing import Iterator

import numpy as np

#: CPU flags (Linux /proc/cpuinfo) under which ``products="auto"`` picks int8: AMX's int8
#: tiles (Sapphire Rapids and later Xeons), where it was measured. AVX-512 VNNI alone (Ice
#: Lake, Zen 4) also multiplies int8 natively but was not measured here: ``auto`` stays
#: float32 there, ``products="int8"`` may be asked for.
AUTO_FLAGS = frozenset({"amx_int8"})
#: what ``SearchParams.products`` may say
CHOICES = ("auto", "float32", "int8")
#: environment variable saying what ``SearchParams.products=None`` means in a process (one of
#: :data:`CHOICES`; default ``auto``): a deployment that wants no torch in its searchers sets
#: ``float32``
ENV = "TESSERA_PLAID_PRODUCTS"
#: Rescoring margin: a document whose int8 exact-stage score plus this share of its
#: magnitude (the sum of its rows' absolute maxima) reaches the k-th best float32 score is
#: rescored in float32 too. An empirical bound, not a proof: over the exact stage's documents
#: of 250 XQuAD-sentence, 300 Tatoeba and 300 XQuAD-paragraph queries (2 bits, k=10) the int8
#: score was off by at most 3.1e-3 of the magnitude (99th percentile 1.1e-3, median 2.5e-4);
#: 2**-7 is 7.8e-3. A query rescored a median of 13 of 207 documents (XQuAD sentences), 21 of
#: 624 (Tatoeba), 14 of 64 (paragraphs), and its top 10 were those of rescoring every
#: document in all 850 queries but one, where two duplicate Tatoeba sentences' float32
#: scores differ in the last bit (summed in different blocks) and trade the 10th place.
REFINE_MARGIN = 2.0 ** -7

#: Rescoring tolerance of a query row: a document's row maximum is taken in float32 over the
#: tokens whose int8 score is within this share of the row's norm of the row's best int8 score
#: (``kernels.rescore_int8``), not over every token. An empirical bound, as REFINE_MARGIN is:
#: over the first 40 exact-stage documents of the four benchmark sets' queries (2 bits: 250
#: XQuAD-sentence, 300 Tatoeba, 300 XQuAD-paragraph; 4 bits: the XQuAD sentences; 775k
#: document-row pairs) the best float32 token's int8 score was at most 2.25e-3 of the row's
#: norm below the row's best int8 score (0 in 98-99% of the pairs); 2**-7 is 7.8e-3, and leaves
#: 1.5 (Tatoeba), 2.2 (XQuAD sentences) and 3.0 (paragraphs) tokens a pair to score in float32:
#: 6 of a document's 11 tokens to decode, 17 of 48, 30 of 189.
PAIR_MARGIN = 2.0 ** -7

_torch = None
_lock = threading.Lock()
_UNKNOWN = object()
# what _cpu_flags and installed found, asked once a process: every search with the default
# products resolves ``auto`` (:func:`resolve`), and reading /proc/cpuinfo and looking for torch
# took ~65 us of each (~2% of a Tatoeba query)
_flags = _UNKNOWN
_found = None


def _cpu_flags() -> "frozenset[str] | None":
    """This CPU's flags (``embedding.codec.cpu_flags``), read once a process."""
    global _flags
    if _flags is _UNKNOWN:
        from embedding.codec import cpu_flags

        _flags = cpu_flags()
    return _flags


def installed() -> bool:
    """torch is installed (found without importing it; looked for once a process)."""
    global _found
    if _found is None:
        _found = _torch is not None or importlib.util.find_spec("torch") is not None
    return _found


def default() -> str:
    """What ``products=None`` asks for: :data:`ENV` where set, else ``auto``."""
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV} must be one of {', '.join(CHOICES)}, got {os.environ.get(ENV)!r}")
    return value


def resolve(products: "str | None", kernels_enabled: bool) -> str:
    """``float32`` or ``int8``: what ``products`` (:data:`CHOICES`; None: :func:`default`)
    means in this process.

    ``auto`` is int8 where the compiled stages run (``kernels_enabled``), torch is installed
    and the CPU has :data:`AUTO_FLAGS`; else float32. ``int8`` asked for where it cannot run
    raises ValueError saying what is missing."""
    if products is None:
        products = default()
    if products not in CHOICES:
        raise ValueError(f"products must be one of {', '.join(CHOICES)}, got {products!r}")
    if products == "float32":
        return products
    if products == "int8":
        if not kernels_enabled:
            raise ValueError("products='int8' needs the compiled stages (numba; TESSERA_KERNELS=numpy turns them off)")
        if not installed():
            raise ValueError("products='int8' needs torch, which is not installed")
        return products
    flags = _cpu_flags() or frozenset()
    return "int8" if kernels_enabled and flags & AUTO_FLAGS and installed() else "float32"


def torch_module():
    """torch, imported once (the first int8 search of a process)."""
    global _torch
    if _torch is None:
        with _lock:
            if _torch is None:
                import torch

                _torch = torch
    return _torch


#: set in a process forked from one that had imported torch: GNU OpenMP's pool (torch's intra-op
#: threads) is not fork-safe, and a parallel region in the child of a parent whose pool had run
#: hangs, so such a child runs torch's products at one thread (:func:`torch_threads`)
_forked_with_torch = False


def _after_fork_in_child() -> None:
    global _forked_with_torch
    if "torch" in sys.modules:
        _forked_with_torch = True


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """torch's intra-op pool at ``n`` threads for the duration, put back after. A search's
    products take ~0.1-0.4 ms each: a batch spreads its queries over the engine's own threads
    and keeps torch at one (left at two on these 2 cores, a query took 2.6 ms with both cores
    busy, or 15 ms where numpy's OpenBLAS also ran two), while a single query searched at
    ``threads`` >= 2 runs its products on that many (XQuAD sentences, 2 threads: 2.21 -> 1.96 ms a
    query; the 8,192-centroid product 287 -> 112 us). Between two products torch's workers
    busy-wait a little (OpenMP's spin), on the threads the caller gave the search. One thread in
    a process forked after torch was imported (``_forked_with_torch``)."""
    if _forked_with_torch:
        n = 1
    torch = torch_module()
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(int8 (n, d), float32 (n,))``: each row of float ``x`` divided by its scale (its
    largest absolute coordinate / 127) and rounded; ``q[i] * scale[i]`` is row ``i`` within
    half a step. A zero row has scale 0 and stays zero. Compiled where numba runs (the same
    values: ~10 us a query's rows instead of ~45)."""
    x = np.asarray(x, dtype=np.float32)
    from indexing import kernels

    if kernels.ready():
        return kernels.quantize_rows(x)
    scale = np.abs(x).max(axis=1) / np.float32(127) if x.shape[1] else np.zeros(len(x), np.float32)
    scale = scale.astype(np.float32)
    inv = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale > 0)
    out = np.rint(x * inv[:, None])
    np.clip(out, -127, 127, out=out)
    return out.astype(np.int8), scale


def quantize_table(values: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """``(int8 values.shape, float32 scale)``: a residual byte table (``ResidualCodec.byte_weights``)
    on one scale, its largest absolute value / 127 (1 where all are 0)."""
    values = np.asarray(values, dtype=np.float32)
    top = float(np.abs(values).max()) if values.size else 0.0
    scale = np.float32(top / 127 if top > 0 else 1.0)
    out = np.clip(np.rint(values / scale), -127, 127).astype(np.int8)
    return np.ascontiguousarray(out), scale


def products_into(a: np.ndarray, b: np.ndarray, out: np.ndarray):
    """``into(n, row)``: writes the exact int32 product of ``a``'s first ``n`` rows (int8 ``(m, k)``,
    C-contiguous) by ``b`` (int8 ``(k, j)``, any strides) to rows ``row : row + n`` of ``out``
    (C-contiguous int32, ``j`` columns), through ``torch._int_mm``, ``b``'s view made once: for a
    loop of products of one buffer by the same rows. (torch's views of numpy slices, ~0.6 us
    each, cost less than slices of torch views, ~1 us.)"""
    if a.dtype != np.int8 or b.dtype != np.int8 or out.dtype != np.int32 or not (
            a.flags.c_contiguous and out.flags.c_contiguous) or a.shape[1] != b.shape[0] or out.shape[1] != b.shape[1]:
        raise ValueError(f"products_into: int8 (m, k) C-contiguous, int8 (k, j) and C-contiguous int32 (n, j) "
                         f"arrays, got {a.dtype} {a.shape}, {b.dtype} {b.shape}, {out.dtype} {out.shape}")
    torch = torch_module()
    tb = torch.from_numpy(b)
    empty = b.shape[1] == 0 or b.shape[0] == 0

    def into(n: int, row: int) -> None:
        if n == 0:
            return
        if empty:
            out[row: row + n] = 0
        else:
            torch._int_mm(torch.from_numpy(a[:n]), tb, out=torch.from_numpy(out[row: row + n]))

    return into


def int_mm(a: np.ndarray, b: np.ndarray, out: "np.ndarray | None" = None) -> np.ndarray:
    """``(n, m)`` int32 ``a @ b`` of int8 ``a`` ``(n, k)`` and ``b`` ``(k, m)`` (any strides),
    exact, through ``torch._int_mm``; the result shares memory with nothing else, or is the
    first ``n`` rows of ``out`` (C-contiguous int32, ``m`` columns), written."""
    torch = torch_module()
    if out is not None:
        out = out[: a.shape[0]]
        if out.shape != (a.shape[0], b.shape[1]) or out.dtype != np.int32 or not out.flags.c_contiguous:
            raise ValueError(f"int_mm: out must be C-contiguous int32 with {b.shape[1]} columns and at least "
                             f"{a.shape[0]} rows, got {out.dtype} {out.shape}")
    if a.shape[0] == 0 or b.shape[1] == 0 or a.shape[1] == 0:
        if out is None:
            return np.zeros((a.shape[0], b.shape[1]), dtype=np.int32)
        out[:] = 0
        return out
    if out is None:
        return torch._int_mm(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    torch._int_mm(torch.from_numpy(a), torch.from_numpy(b), out=torch.from_numpy(out))
    return out
