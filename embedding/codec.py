"""PLAID-style residual codec for ColBERT token vectors.

A token vector is stored as the id of its nearest centroid plus its residual
(vector minus centroid), quantised to ``nbits`` per dimension and bit-packed
(ColBERTv2 / PLAID residual compression). The residual buckets come from the
quantiles of the residuals of a held-out part of the fit sample, so every bucket
is used about equally often.

Bit layout of one packed token: dimension-major, most significant bit first, so
the first ``d`` dimensions occupy the first ``d * nbits`` bits. A Matryoshka
prefix of the dimensions is therefore a prefix of the bytes whenever
``d * nbits`` is a multiple of 8.
"""

from __future__ import annotations

import io
import logging
import math
import sys
import warnings
import zipfile
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator, Sequence

import numpy as np

from embedding.faiss_import import import_faiss

logger = logging.getLogger(__name__)

SUPPORTED_NBITS = (1, 2, 4)
_PACKABLE_NBITS = (1, 2, 4, 8)
FORMAT_VERSION = 1
# Rows per batch are chosen so that one (rows, n_centroids) float32 score matrix
# stays around 64 MiB.
_SCORE_BUDGET = 1 << 24
_ROW_BATCH = 1 << 16
#: rows per block of a whole-array pass that needs a temporary (under glibc's 32 MiB mmap
#: threshold at 384 float32 dims, so every block reuses the same pages)
_BLOCK_ROWS = 1 << 13
_FLOAT_KEYS = ("centroids", "bucket_cutoffs", "bucket_weights")
_REQUIRED_KEYS = frozenset(_FLOAT_KEYS + ("nbits", "avg_residual", "format_version"))


def content_keys(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    """A pseudo-random ``uint64`` per row that depends only on the row's content and ``seed``.

    Everything in a codec fit that would otherwise draw rows at random (the held-out
    split, the k-means start, subsampling) takes rows in this order instead, so two
    fits on nearly the same tokens (a snapshot with 1% of its documents changed) give
    nearly the same codec: a nightly full rebuild then differs from the incrementally
    updated index by the changed documents, not by a reshuffled k-means.
    Rows are hashed as float16, so float noise below that precision does not matter.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"expected (n, dim) vectors, got shape {vectors.shape}")
    return _hashed_rows(vectors, seed)


#: rows per block of :func:`_hashed_rows`: its ``(rows, dim / 4)`` uint64 temporaries stay
#: in a core's L2 cache (8,192-row blocks: 0.89 s against 0.73 for 507k x 384 tokens without torch)
_HASH_ROWS = 512
#: splitmix64's finalizer constants (:func:`_mix64`) and the hash's domain in its seed sequence
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))
_HASH_DOMAIN = 0xC0DEC5EED


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, in place on a ``uint64`` array: every output bit depends on
    every input bit."""
    h ^= h >> np.uint64(30)
    h *= _MIX[0]
    h ^= h >> np.uint64(27)
    h *= _MIX[1]
    h ^= h >> np.uint64(31)
    return h


def _hashed_rows(vectors: np.ndarray, seed: int, scale: "np.ndarray | None" = None) -> np.ndarray:
    """:func:`content_keys` of ``vectors``, or of ``vectors / scale`` (float32, ``scale``
    ``(n, 1)``) without that quotient's full-size array (:func:`_split_heldout`).

    Each row cast to float16 and zero-padded to whole 64-bit words; each word ``w`` (four
    float16 lanes) becomes ``g(w) = p ^ (p >> 32)`` with ``p = w * m`` (mod 2**64, ``m`` an
    odd multiplier per word position drawn from ``seed``): a bijection of the word, so two
    rows that differ in one word never collide. The key is splitmix64's finalizer of the
    words' sum mod 2**64 xor a word of the seed. Vectorised over a block of rows: the
    keys of a fit's 507k x 384 normalised tokens in 0.28 s on 2 cores, 1.52 s with a
    blake2b digest a row (until the thirty-first session). A fit's order and split are as
    pseudo-random as before but not the same draw: a codec fitted before differs from one
    fitted now in which rows start k-means and which are held out."""
    n, dim = vectors.shape
    words = -(-dim // 4)
    seed64 = int(seed) % 2**64
    rng = np.random.default_rng(np.random.SeedSequence([_HASH_DOMAIN, seed64]))
    mult = rng.integers(0, 2**63, size=words, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    start = _mix64(np.array([seed64], dtype=np.uint64))[0]
    buf = np.zeros((min(_HASH_ROWS, n), 4 * words), dtype=np.float16)
    out = np.empty(n, dtype=np.uint64)
    torch = sys.modules.get("torch") if scale is not None else None
    for block in _row_batches(n, _HASH_ROWS):
        lanes = buf[:block.stop - block.start]
        if torch is not None:  # the quotient and its float16 rounding as numpy's, ~3x faster
            rows = _tensor_to_read(torch, np.ascontiguousarray(vectors[block])).float()
            torch.from_numpy(lanes)[:, :dim].copy_(torch.div(rows, torch.from_numpy(scale[block])))
        else:
            lanes[:, :dim] = vectors[block] if scale is None else _float32(vectors[block]) / scale[block]
        p = lanes.view(np.uint64) * mult
        p ^= p >> np.uint64(32)
        h = p.sum(axis=1, dtype=np.uint64)
        h ^= start
        out[block] = _mix64(h)
    return out


def content_order(vectors: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(order, sorted keys)``: rows sorted by :func:`content_keys`."""
    return _key_order(content_keys(vectors, seed))


def _key_order(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(order, keys[order])``: the rows sorted by their content keys (stable)."""
    order = np.argsort(keys, kind="stable")
    return order, keys[order]


def default_n_centroids(n_tokens: int) -> int:
    """Number of centroids PLAID uses for ``n_tokens`` token vectors.

    Parameters
    ----------
    n_tokens : int
        Number of token vectors in the collection, at least 1.

    Returns
    -------
    int
        ``2 ** floor(log2(16 * sqrt(n_tokens)))``, computed exactly in integers.
    """
    if isinstance(n_tokens, bool) or int(n_tokens) != n_tokens or n_tokens < 1:
        raise ValueError(f"n_tokens must be an integer >= 1, got {n_tokens!r}")
    # floor(log2(16 * sqrt(n))) == floor(floor(log2(256 * n)) / 2); integer math
    # avoids floating point trouble at exact powers of two.
    exponent = ((256 * int(n_tokens)).bit_length() - 1) // 2
    return max(1, 1 << exponent)


def code_dtype(n_centroids: int) -> np.dtype:
    """Smallest unsigned integer dtype that holds every centroid id.

    Parameters
    ----------
    n_centroids : int
        Number of centroids, at least 1; ids run from 0 to ``n_centroids - 1``.

    Returns
    -------
    numpy.dtype
        ``uint8``, ``uint16`` or ``uint32``.
    """
    if n_centroids < 1:
        raise ValueError(f"n_centroids must be >= 1, got {n_centroids}")
    for dtype in (np.uint8, np.uint16, np.uint32):
        if n_centroids - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"n_centroids={n_centroids} does not fit in uint32 codes")


def _check_nbits_dim(nbits: int, dim: int) -> None:
    if isinstance(nbits, bool) or nbits not in _PACKABLE_NBITS:
        raise ValueError(f"nbits must be one of {_PACKABLE_NBITS}, got {nbits!r}")
    if (dim * nbits) % 8:
        raise ValueError(
            f"dim * nbits must be a multiple of 8 to pack whole bytes, "
            f"got dim={dim}, nbits={nbits}"
        )


def _shifts(nbits: int) -> np.ndarray:
    """Left shift of each of the ``8 // nbits`` values sharing a byte, first value highest."""
    return (nbits * np.arange(8 // nbits - 1, -1, -1)).astype(np.uint8)


def pack_bits(buckets: np.ndarray, nbits: int) -> np.ndarray:
    """Bit-pack per-dimension bucket ids, ``nbits`` bits each.

    Parameters
    ----------
    buckets : numpy.ndarray
        ``(n, dim)`` integer array (normally ``uint8``) with values in
        ``[0, 2**nbits)``; ``dim * nbits`` must be a multiple of 8.
    nbits : int
        Bits per value: 1, 2, 4 or 8.

    Returns
    -------
    numpy.ndarray
        ``(n, dim * nbits // 8)`` ``uint8``. Dimension-major, most significant
        bit first: dimension ``j`` occupies bits ``j*nbits .. (j+1)*nbits - 1``.
    """
    buckets = np.asarray(buckets)
    if buckets.ndim != 2 or not np.issubdtype(buckets.dtype, np.integer):
        raise ValueError(
            f"buckets must be a 2-D integer array, got shape {buckets.shape} "
            f"dtype {buckets.dtype}"
        )
    n, dim = buckets.shape
    _check_nbits_dim(nbits, dim)
    if buckets.size and (buckets.min() < 0 or buckets.max() >= 1 << nbits):
        raise ValueError(f"bucket ids must lie in [0, {1 << nbits}) for nbits={nbits}")
    groups = buckets.astype(np.uint8).reshape(n, dim * nbits // 8, 8 // nbits)
    packed = np.zeros(groups.shape[:2], dtype=np.uint8)
    # One pass per slot inside a byte (at most 8), each vectorised over all tokens.
    for slot, shift in enumerate(_shifts(nbits)):
        packed |= groups[:, :, slot] << shift
    return packed


def unpack_bits(packed: np.ndarray, nbits: int, dim: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`.

    Parameters
    ----------
    packed : numpy.ndarray
        ``(n, dim * nbits // 8)`` ``uint8``.
    nbits : int
        Bits per value: 1, 2, 4 or 8.
    dim : int
        Number of values per row.

    Returns
    -------
    numpy.ndarray
        ``(n, dim)`` ``uint8`` bucket ids.
    """
    packed = np.asarray(packed)
    _check_nbits_dim(nbits, dim)
    if packed.ndim != 2 or packed.dtype != np.uint8:
        raise ValueError(
            f"packed must be a 2-D uint8 array, got shape {packed.shape} "
            f"dtype {packed.dtype}"
        )
    if packed.shape[1] != dim * nbits // 8:
        raise ValueError(
            f"packed has {packed.shape[1]} bytes per row, expected "
            f"{dim * nbits // 8} for dim={dim}, nbits={nbits}"
        )
    mask = np.uint8((1 << nbits) - 1)
    values = (packed[:, :, None] >> _shifts(nbits)) & mask
    return values.reshape(len(packed), dim)


def _row_batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _float32(a: np.ndarray) -> np.ndarray:
    """``a`` as float32 (itself when it already is). float16 goes through torch when the
    process has imported it (a fit on bfloat16 products, an encoder's compression): the
    same values (the conversion is exact), ~6x faster than numpy's on an 8,192 x 384 block
    (0.41 against 2.7 ms on 2 AMX cores; a 507k-token fit converts its sample ~4 times)."""
    torch = sys.modules.get("torch")
    if torch is not None and a.dtype == np.float16 and a.ndim == 2:
        return _tensor_to_read(torch, np.ascontiguousarray(a)).float().numpy()
    return np.asarray(a, np.float32)


def _tensor_to_read(torch, a: np.ndarray):
    """``torch.from_numpy(a)`` for a tensor that is only read, without torch's warning
    where ``a`` is read-only (pass 2's memory-mapped sample cache: the warning reached the
    job's console)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def _row_norms(x: np.ndarray) -> np.ndarray:
    """``(n, 1)`` float32 L2 norms of the rows, each block of rows cast to float32 first:
    ``np.linalg.norm``'s values without its full-size temporary of squares (fresh pages:
    ~2 s at 507k x 384 on 2 CPUs) nor a float32 copy of a float16 ``x``."""
    norms = np.empty((len(x), 1), dtype=np.float32)
    for block in _row_batches(len(x), _BLOCK_ROWS):
        norms[block] = np.linalg.norm(_float32(x[block]), axis=1, keepdims=True)
    return norms


def _row_blocks(parts: "Sequence[np.ndarray]", size: int) -> Iterator[tuple[slice, np.ndarray]]:
    """The rows of ``parts`` taken in order, as consecutive blocks of at most ``size`` rows:
    ``(the block's rows in the whole, the block as float32)``. A block is a view of one
    part, or the concatenation of the few pieces it spans: never the whole."""
    start, pending, count = 0, [], 0
    for part in parts:
        pos = 0
        while pos < len(part):
            take = min(size - count, len(part) - pos)
            pending.append(part[pos:pos + take])
            count += take
            pos += take
            if count == size:
                yield slice(start, start + count), _joined(pending)
                start, pending, count = start + count, [], 0
    if count:
        yield slice(start, start + count), _joined(pending)


def _joined(pieces: list) -> np.ndarray:
    with np.errstate(over="ignore"):  # a float64 value past float32's range: inf, rejected by the caller
        if len(pieces) == 1:
            return _float32(pieces[0])
        return np.concatenate(pieces, dtype=np.float32)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation of a ``(n, d)`` float32 array; zero rows stay zero."""
    return x / np.maximum(_row_norms(x), np.finfo(np.float32).tiny)


def _as_vectors(vectors: np.ndarray, dim: int | None, name: str) -> np.ndarray:
    """Check a ``(n, dim)`` finite float array and return it as float32."""
    return np.ascontiguousarray(_checked_vectors(vectors, dim, name), dtype=np.float32)


def _checked_vectors(vectors: np.ndarray, dim: int | None, name: str, finite: bool = True) -> np.ndarray:
    """Check a ``(n, dim)`` float array, finite as float32 (unless not ``finite``: the
    caller checks its blocks), and return it as it is (a float16 sample is converted a
    block at a time where it is used, not copied whole)."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
        raise ValueError(
            f"{name} must be a 2-D float array, got shape {vectors.shape} "
            f"dtype {vectors.dtype}"
        )
    if dim is not None and vectors.shape[1] != dim:
        raise ValueError(f"{name} has dim {vectors.shape[1]}, codec dim is {dim}")
    if not finite:
        return vectors
    if vectors.dtype == np.float16:  # finite as float16 is finite as float32: no conversion
        ok = all(_finite_half(vectors[block]) for block in _row_batches(len(vectors), _BLOCK_ROWS))
    else:
        with np.errstate(over="ignore"):  # a float64 value past float32's range is not finite as float32
            ok = all(np.isfinite(np.asarray(vectors[block], np.float32)).all()
                     for block in _row_batches(len(vectors), _BLOCK_ROWS))
    if not ok:
        raise ValueError(f"{name} contains NaN or infinite values")
    return vectors


def _finite_half(x: np.ndarray) -> bool:
    """Whether every value of a float16 array is finite: its bits without the sign stay
    below 0x7C00 (an all-ones exponent is an infinity or a NaN). ~3x faster than
    ``np.isfinite``, which converts each half to float (507k x 384 tokens: 0.07 s against 0.23)."""
    return not x.size or int(np.bitwise_and(x.view(np.uint16), np.uint16(0x7FFF)).max()) < 0x7C00


def _bucketize(values: np.ndarray, cutoffs: np.ndarray) -> np.ndarray:
    """``np.searchsorted(cutoffs, values)`` (side left) as uint8: the number of cutoffs
    below each value, counted one cutoff at a time. With 1-15 sorted cutoffs that is
    3-8x faster than the binary search per value (4.7M values at 4 bits: 115 ms -> ~20 ms)."""
    out = np.zeros(values.shape, np.uint8)
    above = np.empty(values.shape, bool)
    for c in cutoffs:
        np.greater(values, c, out=above)
        out += above
    return out


def _nearest_centroids(centroids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Index of the max-inner-product centroid for each row, as ``(n,)`` int64."""
    out = np.empty(len(vectors), dtype=np.int64)
    batch = max(1, _SCORE_BUDGET // len(centroids))
    for rows in _row_batches(len(vectors), batch):
        out[rows] = np.argmax(vectors[rows] @ centroids.T, axis=1)
    return out


def _exact_nearest(centroids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """:func:`_nearest_centroids`' answer, through :class:`_Bf16Search` where
    :func:`use_bf16_search` says it pays (the fit's held-out rows: 25k x 8,192 centroids
    in 0.3 s instead of 0.6 on 2 AMX cores, the same codes)."""
    if use_bf16_search(len(vectors), len(centroids), centroids.shape[1]):
        return _Bf16Search(centroids).nearest(vectors)
    return _nearest_centroids(centroids, vectors)


def _train_centroids(
    train: np.ndarray, n_centroids: int, seed: int, niter: int, kmeans: str = "flat",
    device: "str | None" = None,
) -> np.ndarray:
    """The codec's centroids: :func:`_flat_centroids`, :func:`_two_level_centroids` or, for
    ``flat-bf16``, :func:`_torch_kmeans` in bfloat16 (``auto`` resolved by :func:`resolve_kmeans`)."""
    flops = kmeans_flops(len(train), n_centroids, train.shape[1], niter)
    kmeans = resolve_kmeans(kmeans, device, flops)
    if kmeans == "two-level" and n_centroids >= TWO_LEVEL_MIN_CENTROIDS:
        return _two_level_centroids(train, n_centroids, seed, niter, device)
    if kmeans == "flat-bf16":
        return _torch_kmeans(train, n_centroids, seed, niter, device or "cpu", bf16=True)
    if kmeans == "progressive":
        return _progressive_centroids(train, n_centroids, seed, niter, device,
                                      bf16=bf16_products(kmeans, device, flops))
    return _flat_centroids(train, n_centroids, seed, niter, device)


#: ``progressive`` k-means: the warm-up iterations see ``1 / PROGRESSIVE_SHARE`` of the rows...
PROGRESSIVE_SHARE = 4
#: ... but at least this many rows per centroid (or every row)
PROGRESSIVE_MIN_ROWS_PER_CENTROID = 16


def progressive_rows(n_train: int, n_centroids: int) -> int:
    """Rows the warm-up iterations of ``progressive`` k-means see: the first
    ``max(n / PROGRESSIVE_SHARE, PROGRESSIVE_MIN_ROWS_PER_CENTROID * k)`` (at most ``n``)."""
    return min(n_train, max(n_train // PROGRESSIVE_SHARE, PROGRESSIVE_MIN_ROWS_PER_CENTROID * n_centroids))


def _progressive_centroids(train: np.ndarray, n_centroids: int, seed: int, niter: int,
                           device: "str | None", bf16: bool) -> np.ndarray:
    """Flat spherical k-means whose first ``niter - 1`` iterations run on the first
    :func:`progressive_rows` rows (content-key order: a uniform sample that moves little
    when the input moves little) and whose last iteration, from those centroids, on every
    row. The products run where ``flat`` or ``flat-bf16`` would (``bf16``: torch's
    bfloat16 products on this CPU). With ``niter`` 1, or too few rows to leave any out,
    it is that flat fit."""
    def flat(rows: np.ndarray, iters: int, init: "np.ndarray | None" = None) -> np.ndarray:
        if bf16:
            return _torch_kmeans(rows, n_centroids, seed, iters, "cpu", bf16=True, init=init)
        return _flat_centroids(rows, n_centroids, seed, iters, device, init=init)

    n_warm = progressive_rows(len(train), n_centroids)
    if niter <= 1 or n_warm >= len(train):
        return flat(train, niter)
    return flat(train, 1, init=flat(train[:n_warm], niter - 1))


def _flat_centroids(
    train: np.ndarray, n_centroids: int, seed: int, niter: int, device: "str | None" = None,
    init: "np.ndarray | None" = None,
) -> np.ndarray:
    """Spherical k-means from the first ``n_centroids`` rows (or ``init``, ``(n_centroids,
    dim)`` unit rows); returns float32 unit rows.

    ``train`` comes in content-key order (see :func:`content_keys`), so its first rows
    are a uniform random sample that moves little when the input moves little. faiss
    subsamples nothing (that draw would depend on row positions). With a torch
    ``device`` the same algorithm runs in torch there (:func:`_torch_kmeans`).
    """
    if device is not None:
        return _torch_kmeans(train, n_centroids, seed, niter, device, init=init)
    faiss = import_faiss()  # here, not at import: a process that only decodes (a searcher) never loads it
    use_gpu = faiss.get_num_gpus() > 0
    kmeans = faiss.Kmeans(
        train.shape[1],
        n_centroids,
        niter=niter,
        seed=seed,
        spherical=True,
        gpu=use_gpu,
        verbose=False,
        max_points_per_centroid=max(256, -(-len(train) // n_centroids) + 1),
        # n_centroids is ours (default_n_centroids, capped to the sample): faiss's advice to
        # train on 39 points per centroid would be printed on every small fit. The setting
        # only gates that warning; the clustering is the same.
        min_points_per_centroid=1,
    )
    start = train[:n_centroids] if init is None else init
    kmeans.train(train, init_centroids=np.ascontiguousarray(start, dtype=np.float32))
    return _l2_normalize(np.asarray(kmeans.centroids, dtype=np.float32))


#: faiss's perturbation when it splits a cluster to refill an empty one (``EPS`` in Clustering.cpp)
_SPLIT_EPS = 1.0 / 1024.0
#: score elements (rows x centroids) per block of :func:`_torch_kmeans` on a GPU
_TORCH_SCORE_BUDGET = 1 << 27


def _torch_nearest_centroids(centroids, vectors, budget: int):
    """:func:`_nearest_centroids` on torch tensors: ``(n,)`` int64 on their device, scored
    in blocks of at most ``budget`` rows x centroids (in the centroids' dtype: a bfloat16
    product gives the nearest centroid up to bfloat16 rounding)."""
    import torch

    out = torch.empty(len(vectors), dtype=torch.long, device=vectors.device)
    step = max(1, budget // len(centroids))
    # transposed once into a contiguous tensor: 3% off a bfloat16 k-means on 2 CPUs (5.48 s
    # against 5.64, 132k tokens, k=4,096), the same centroids
    centroids_t = centroids.T.contiguous()
    # one product buffer for every block: no fresh pages per block
    scores = torch.empty((min(step, len(vectors)), len(centroids)), dtype=centroids.dtype, device=vectors.device)
    for start in range(0, len(vectors), step):
        # each block cast to the centroids' dtype on its own (bfloat16 k-means): no bfloat16
        # copy of the whole sample (its fresh pages cost ~2.5 s at 507k x 384 on 2 CPUs)
        block = vectors[start:start + step].to(centroids_t.dtype)
        out[start:start + len(block)] = block_argmax(torch.matmul(block, centroids_t, out=scores[:len(block)]))
    return out


#: columns per group of :func:`block_argmax` and :func:`grouped_top2`
ARGMAX_GROUP = 256


def _column_groups(k: int) -> bool:
    """Whether ``k`` columns split into at least 4 whole groups of :data:`ARGMAX_GROUP`, where
    :func:`block_argmax` and :class:`_Bf16Search` reduce by groups."""
    return k % ARGMAX_GROUP == 0 and k >= 4 * ARGMAX_GROUP


#: the integer type of a float type's bits, for :func:`_bit_maxima` (torch dtype names)
_BITS_DTYPES = {"bfloat16": "int16", "float16": "int16", "float32": "int32"}


def _bits_of(scores):
    """``scores`` (a CPU float tensor) viewed as signed integers of its width, or None where
    there is no such view (float64, a GPU). A non-negative float's bits order as its value,
    and every negative one's (sign bit set) are below them all: the integer reductions that
    follow run ~4.5x faster than torch's bfloat16 ones (which convert element by element)."""
    import torch

    name = str(scores.dtype).removeprefix("torch.")
    if scores.device.type != "cpu" or name not in _BITS_DTYPES:
        return None
    return scores.view(getattr(torch, _BITS_DTYPES[name]))


def _bit_maxima(bits, dim: int, dtype):
    """The maxima along ``dim`` of the floats of ``dtype`` whose bits are ``bits``
    (:func:`_bits_of`), as floats of that dtype: the largest bits where those are a
    non-negative float (>= +0), else (every value negative, or -0) the smallest bits, the
    negative value closest to 0. The same values as ``amax`` (+0 and -0 compare equal)."""
    import torch

    high = bits.amax(dim=dim)
    negative = high < 0
    if bool(negative.any()):
        high = torch.where(negative, bits.amin(dim=dim), high)
    return high.view(dtype)


def _first_equal(row_bits, row_values, best):
    """The first column of each row of ``row_values`` (``(m, n)`` floats, ``row_bits`` their
    :func:`_bits_of`) whose value equals ``best`` (``(m,)``, the row's maximum): equal bits,
    but for a maximum of zero, which +0 and -0 both hold (the values compared there)."""
    import torch

    bits = best.view(row_bits.dtype)
    col = (row_bits == bits.unsqueeze(1)).max(dim=1).indices
    zero = (bits == 0) | (bits == torch.iinfo(row_bits.dtype).min)  # +0, -0
    if bool(zero.any()):
        col[zero] = row_values[zero].max(dim=1).indices
    return col


def block_argmax(scores):
    """The first column of each row's maximum of a torch ``(rows, k)`` block, as
    ``argmax(dim=1)`` gives it.

    On CPU with ``k`` a multiple of :data:`ARGMAX_GROUP` (and at least 4 groups): the
    maxima of groups of that many columns (one vectorised pass), the first group holding
    the row's maximum, then the first column of it inside that group: torch's reduction
    with indices runs a row element by element, and where the product is cheap (AMX:
    2,048 x 8,192 bfloat16 scores of 384-dimensional rows in ~4 ms on 2 cores) it cost
    more than the product itself. The groups' maxima are those of the scores' bits
    (:func:`_bits_of`), which order as the scores where the row's maximum is positive;
    a row whose maximum is not (no score above 0) takes ``max``. Elsewhere
    ``max(dim=1).indices`` (the same first maximum, 1.7x (float32) to 4x (bfloat16)
    faster than ``argmax`` on CPU)."""
    import torch

    m, k = scores.shape
    bits = _bits_of(scores)
    if bits is None or not _column_groups(k) or not m:
        return scores.max(dim=1).indices
    groups = bits.view(m, k // ARGMAX_GROUP, ARGMAX_GROUP)
    # a group's largest bits: its maximum where that is above 0, and below the best
    # group's where the group holds no score as large (negative bits are below them all)
    high = groups.amax(dim=2)
    first = high.argmax(dim=1)
    rows = torch.arange(m)
    best = high[rows, first]
    # bits above 0 are one value each: the first equal bits are the first maximum
    col = (groups[rows, first] == best.unsqueeze(1)).max(dim=1).indices
    out = first * ARGMAX_GROUP + col
    odd = torch.nonzero(best <= 0).flatten()  # no score above +0: bits do not order the values
    if len(odd):
        out[odd] = scores[odd].max(dim=1).indices
    return out


def _torch_kmeans(train: np.ndarray, n_centroids: int, seed: int, niter: int, device: str,
                  bf16: bool = False, init: "np.ndarray | None" = None) -> np.ndarray:
    """faiss's spherical k-means (``faiss.Kmeans(spherical=True)``), in torch on ``device``.

    For a GPU worker when faiss has no GPU (faiss-cpu, the default extra): the same steps
    as faiss's Clustering, from the same start (the first ``n_centroids`` rows), each
    iteration: every row to its max-inner-product centroid, each centroid the mean of its
    rows, an empty centroid refilled by splitting a cluster drawn in proportion to its
    size beyond one (faiss's ``split_clusters``; the draw seeded by ``seed``), all
    centroids renormalised. The centroids differ from faiss's only by float summation
    order and the empty-cluster draws; equal inputs on one device give equal centroids.
    With ``bf16`` the assignment products run in bfloat16 (the means stay float32): a
    row whose two best centroids score within bfloat16 rounding (~4e-3) of each other
    may join the other one (kind ``flat-bf16``, see :data:`KMEANS_KINDS`). ``init``
    (``(n_centroids, dim)``) replaces the start (``progressive``'s last iteration).
    Returns ``(n_centroids, dim)`` float32 unit rows.
    """
    import torch

    k = n_centroids
    rng = np.random.default_rng(seed)
    if torch.device(device).type == "cuda":
        budget = _TORCH_SCORE_BUDGET
    else:
        budget = _BF16_KMEANS_BUDGET if bf16 else _SCORE_BUDGET
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(train, dtype=np.float32)).to(device)
        start = x[:k].clone() if init is None else torch.from_numpy(np.array(init, dtype=np.float32)).to(device)
        c = torch.nn.functional.normalize(start, dim=1)
        sign = torch.ones(x.shape[1], device=device)
        sign[1::2] = -1.0
        dtype = torch.bfloat16 if bf16 else x.dtype
        for _ in range(niter):
            assign = _torch_nearest_centroids(c.to(dtype), x, budget)
            counts = torch.bincount(assign, minlength=k)
            sums = torch.zeros_like(c).index_add_(0, assign, x)
            c = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
            empty = torch.nonzero(counts == 0).flatten().cpu().numpy()
            if len(empty):
                sizes = counts.cpu().numpy().astype(np.int64)
                for j in empty:
                    spare = np.maximum(sizes - 1, 0).astype(np.float64)
                    m = int(rng.choice(k, p=spare / spare.sum()))
                    c[j] = c[m] * (1 + _SPLIT_EPS * sign)
                    c[m] = c[m] * (1 - _SPLIT_EPS * sign)
                    sizes[j] = sizes[m] // 2
                    sizes[m] -= sizes[j]
            c = torch.nn.functional.normalize(c, dim=1)
        return c.cpu().numpy().astype(np.float32)


#: k-means kinds of :meth:`ResidualCodec.fit`: ``flat`` is PLAID's (every sample vector
#: against every centroid, each iteration); ``two-level`` clusters into ~sqrt(k) coarse
#: cells first and then each cell into its share of the k centroids (faiss's
#: ``two_level_clustering`` scheme, spherical and content-ordered here); ``flat-bf16`` is
#: ``flat`` with the assignment products in bfloat16 through torch (1.6-1.7x faster than
#: faiss's float32 fit on 2 AVX-512 BF16 cores, slower on a CPU without them; a row
#: nearly equidistant from two centroids may join either; compression is float32 whatever
#: the kind).
#: ``progressive`` runs flat's first ``niter - 1`` iterations on a quarter of the rows
#: (:func:`progressive_rows`) and the last on all of them, in bfloat16 where ``auto`` would be
#: ``flat-bf16`` (on 12,837 XQuAD sentences, 507k tokens, 8,192 centroids: the fit 2.1x faster
#: than ``flat-bf16``'s, residuals 0.6% larger; on XQuAD paragraphs 2-bit top-10 agreement
#: with float MaxSim one point lower; see the README).
KMEANS_KINDS = ("flat", "two-level", "flat-bf16", "progressive")
#: what a job's ``kmeans`` setting may say: a kind, or ``auto`` (:func:`resolve_kmeans`)
KMEANS_CHOICES = ("auto",) + KMEANS_KINDS


#: CPU flags (Linux /proc/cpuinfo) of the bfloat16 products torch's oneDNN uses
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags() -> "frozenset[str] | None":
    """The first CPU's flags from /proc/cpuinfo; None where it cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        return None
    return None


#: this CPU has AMX tiles for bfloat16 (Sapphire Rapids and later Xeons), where torch's
#: bfloat16 products run several times faster than with AVX-512 BF16 alone
AMX = "amx_bf16" in (cpu_flags() or ())


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), so that torch's
    bfloat16 product is ~2x its float32 one; without it torch emulates bfloat16, slower
    than float32. False when torch is not installed. On Linux the CPU's flags answer
    first, so a CPU without them does not pay torch's import (~1.3 s) to learn it."""
    flags = cpu_flags()
    if flags is not None and not flags & BF16_FLAGS:
        return False
    try:
        import torch
    except ImportError:
        return False
    cpu = torch.cpu
    return any(bool(getattr(cpu, name, lambda: False)()) for name in ("_is_avx512_bf16_supported",
                                                                      "_is_amx_tile_supported"))


#: multiply-adds x 2 of a k-means below which ``auto`` stays ``flat`` on CPU: bfloat16 saves
#: ~2.8 s per 1e12 (float32 ~190, bfloat16 ~400 GFLOP/s on 2 AVX-512 BF16 cores), and the
#: fit task's process pays ~1.3 s to import torch first (faiss's flat k-means needs none)
AUTO_BF16_MIN_FLOPS = 5e11


def kmeans_flops(n_train: int, n_centroids: int, dim: int, niter: int) -> float:
    """Floating-point operations of flat k-means' assignment products."""
    return 2.0 * n_train * n_centroids * dim * niter


def resolve_kmeans(kind: str, device: "str | None" = None, flops: "float | None" = None) -> str:
    """The k-means kind ``auto`` stands for where the fit runs: ``flat-bf16`` on a CPU that
    multiplies bfloat16 natively (:func:`native_bf16`) when the products (``flops``,
    :func:`kmeans_flops`; None: any size) reach :data:`AUTO_BF16_MIN_FLOPS`, else ``flat``
    (on a GPU, or faiss's own GPUs, flat k-means takes well under a second at PLAID's
    sample sizes). Any other kind is returned as it is. The answer depends on the sizes and
    the machine, never on what the process imported before, so equal fits stay equal."""
    if kind != "auto":
        if kind not in KMEANS_KINDS:
            raise ValueError(f"kmeans must be one of {', '.join(KMEANS_CHOICES)}, got {kind!r}")
        return kind
    return "flat-bf16" if _cpu_bf16_pays(device, flops) else "flat"


def _cpu_bf16_pays(device: "str | None", flops: "float | None") -> bool:
    """A fit on this CPU (no torch ``device``, no faiss GPU) that multiplies bfloat16 natively,
    whose products (``flops``; None: any size) reach :data:`AUTO_BF16_MIN_FLOPS`."""
    if device is not None or import_faiss().get_num_gpus() > 0:
        return False
    if flops is not None and flops < AUTO_BF16_MIN_FLOPS:
        return False
    return native_bf16()


def bf16_products(kind: str, device: "str | None" = None, flops: "float | None" = None) -> bool:
    """Whether a fit of ``kind`` runs its k-means products in bfloat16 through torch:
    ``flat-bf16`` always, ``progressive`` where ``auto`` would be ``flat-bf16`` (see
    :func:`resolve_kmeans`). A fit task on CPU gives torch its threads when this says so."""
    kind = resolve_kmeans(kind, device, flops)
    return kind == "flat-bf16" or (kind == "progressive" and _cpu_bf16_pays(device, flops))


#: bfloat16's unit roundoff: a value rounds to within this fraction of itself (8 significant bits)
_BF16_U = 2.0 ** -8
#: subtracted from every score inside :class:`_Bf16Search`'s product (exact in bfloat16):
#: a token's best scores sit near it, where bfloat16's steps are 8-32x finer than near 1
_BF16_OFFSET = 0.875
#: ambiguous rows with more candidates than this are scored against every centroid
_BF16_MAX_CANDIDATES = 32
#: most centroids :class:`_Bf16Search` takes (a centroid's number fills a key's low 16 bits)
_BF16_MAX_CENTROIDS = 1 << 16
#: rows per product block of :class:`_Bf16Search`: 256 (8,192 scores a row: 4 MiB) with
#: AVX-512 BF16 alone; with AMX 1,024 (the compression of 507k XQuAD tokens at 8,192
#: centroids on one Xeon core 6.3-6.4 s against 7.0 at 256, the same codes)
_BF16_ROWS = 1024 if AMX else 256
#: scores per block of a bfloat16 k-means on CPU. With AVX-512 BF16 alone, blocks of ~1k
#: rows at k=4,096 stay in cache: 20% faster than 4k-row blocks (2 AMD cores). With AMX the
#: product is so fast that larger blocks win: 2,048 rows at k=8,192 fitted 507k XQuAD
#: tokens in 9.4-9.7 s against 10.6-12.7 s at 512 rows (2 Xeon cores; the same centroids:
#: a row's assignment does not depend on its block)
_BF16_KMEANS_BUDGET = _SCORE_BUDGET if AMX else _SCORE_BUDGET >> 2
#: multiply-adds x 2 below which a nearest-centroid search stays in numpy (float32)
BF16_SEARCH_MIN_FLOPS = 1e9


def _sortable_top2(scores, keys, halves, reverse):
    """The two best scores of each row of a CPU bfloat16 ``(rows, k)`` block, as float32
    ``(rows, 2)``, and the first column holding the best, in two ``amax`` reductions.

    Each score's 16 bits become an integer that orders like the score (negative ones
    with their magnitude bits flipped), shifted above ``k - 1 - column`` (``reverse``):
    a row's largest key is its best score at its first column. That column's key is
    then lowered and the next largest is the second best. 0.57 ms a 256 x 8,192 block
    on 2 AVX-512 cores, against 1.26 for ``topk(2)`` and 0.90 for ``max`` alone.
    ``keys`` (int32) and ``halves`` (int16) are buffers of the block's shape."""
    import torch

    bits = scores.view(torch.int16)
    torch.bitwise_right_shift(bits, 15, out=halves)
    halves.bitwise_and_(0x7FFF).bitwise_xor_(bits)  # negative: magnitude bits flipped
    keys.copy_(halves)
    keys.mul_(_BF16_MAX_CENTROIDS).add_(reverse)
    first = keys.amax(dim=1)
    best = (scores.shape[1] - 1) - (first & (_BF16_MAX_CENTROIDS - 1)).long()
    keys.scatter_(1, best.unsqueeze(1), torch.iinfo(torch.int32).min)
    second = keys.amax(dim=1)

    def value(key):
        half = (key >> 16).to(torch.int16)
        return (half ^ ((half >> 15) & 0x7FFF)).view(torch.bfloat16).float()

    return torch.stack([value(first), value(second)], dim=1), best


def grouped_top2(scores):
    """:func:`_sortable_top2`'s answer (the two best scores of each row of a CPU bfloat16
    ``(rows, k)`` block as float32 ``(rows, 2)``, and the first column holding the best)
    for a block whose ``k`` suits :func:`block_argmax`: the maxima of column groups, the
    best group's own two best, and the best of the other groups' maxima. The maxima are
    those of the scores' bits (:func:`_bit_maxima`: two integer passes, ~2.3x faster than
    torch's bfloat16 ``amax``), the first best column that of the first equal bits
    (:func:`_first_equal`). On 2 AMX cores the sortable keys' six passes over the block
    took 2.3x as long as the same steps with bfloat16 ``amax``. Also returns the groups'
    maxima ``(rows, k / ARGMAX_GROUP)`` (bfloat16), from which the rescoring finds its
    candidates."""
    import torch

    m, k = scores.shape
    groups = scores.view(m, k // ARGMAX_GROUP, ARGMAX_GROUP)
    group_bits = _bits_of(scores).view(m, k // ARGMAX_GROUP, ARGMAX_GROUP)
    maxima = _bit_maxima(group_bits, 2, scores.dtype)
    first = maxima.argmax(dim=1)
    rows = torch.arange(m)
    inside = groups[rows, first]  # a copy: (rows, ARGMAX_GROUP)
    best = maxima[rows, first]
    col = _first_equal(inside.view(group_bits.dtype), inside, best)
    inside[rows, col] = -float("inf")
    others = maxima.clone()
    others[rows, first] = _bit_maxima(inside.view(group_bits.dtype), 1, scores.dtype)
    return torch.stack([best.float(), others.amax(dim=1).float()], dim=1), first * ARGMAX_GROUP + col, maxima


class _Bf16Search:
    """Nearest centroid (max inner product) of float32 rows with bfloat16 products, giving
    float32's answer: ``argmax(x @ centroids.T)``, the first of equal best scores.

    The product runs in bfloat16 (~2x float32's speed on a CPU with AVX-512 BF16 or
    AMX), with one more column that subtracts :data:`_BF16_OFFSET` from every score so
    that the best scores round finely. A row's bfloat16 scores are within a bound of
    the exact ones: the inputs' rounding (``|x_r| * max|c| + |x_b| * max|c_r|``, the
    rounding residuals' norms, by Cauchy-Schwarz), float32 accumulation, and the
    output's rounding (``2^-8`` of the score). When the second best score is more than
    twice that bound below the best, the best is float32's answer; otherwise (~15% of
    multilingual-e5-small's tokens at 8,192 centroids) every centroid scoring within
    that margin is rescored in float32 and the best taken. So the codes equal numpy's
    float32 search but for scores equal up to float32 rounding. A row with more than
    :data:`_BF16_MAX_CANDIDATES` candidates (a zero vector scores 0 everywhere) is
    scored against every centroid in float32.
    """

    def __init__(self, centroids: np.ndarray) -> None:
        import torch

        c = torch.from_numpy(np.array(centroids, dtype=np.float32))  # a writable copy
        k, d = c.shape
        if k > _BF16_MAX_CENTROIDS:
            raise ValueError(f"bfloat16 search takes at most {_BF16_MAX_CENTROIDS} centroids, got {k}")
        rounded = c.bfloat16()
        self.k, self.d = k, d
        self.centroids = c
        # 0.1% over the float32 norms covers their own rounding
        self.centroid_norm = float(c.norm(dim=1).max()) * 1.001
        self.centroid_rounding = float((c - rounded.float()).norm(dim=1).max()) * 1.001
        ext = torch.empty((d + 1, k), dtype=torch.bfloat16)
        ext[:d] = rounded.T
        ext[d] = -1.0
        self.product = ext
        self.reverse = torch.arange(k - 1, -1, -1, dtype=torch.int32)
        self.grouped = _column_groups(k)
        # float32 accumulation of d + 1 exact bfloat16 products: at most (d + 1) * 2^-24
        # of the sum of their magnitudes (<= |x| * max|c| + offset); doubled for safety
        self.accumulation = 2.0 * (d + 1) * 2.0 ** -24

    def nearest(self, x: np.ndarray) -> np.ndarray:
        """``(n,)`` int64 nearest centroids of ``(n, d)`` float32 rows."""
        import torch

        n = len(x)
        out = np.empty(n, dtype=np.int64)
        if not n:
            return out
        rows = min(_BF16_ROWS, n)
        ext = torch.empty((rows, self.d + 1), dtype=torch.bfloat16)
        ext[:, self.d] = _BF16_OFFSET
        if not self.grouped:
            keys = torch.empty((rows, self.k), dtype=torch.int32)
            halves = torch.empty((rows, self.k), dtype=torch.int16)
        product = torch.empty((rows, self.k), dtype=torch.bfloat16)
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        with torch.inference_mode():
            for start in range(0, n, rows):
                block = xt[start:start + rows]
                m = len(block)
                rounded = block.bfloat16()
                ext[:m, :self.d] = rounded
                scores = torch.matmul(ext[:m], self.product, out=product[:m])
                maxima = None
                if self.grouped:
                    top, best, maxima = grouped_top2(scores)
                else:
                    top, best = _sortable_top2(scores, keys[:m], halves[:m], self.reverse)
                rounded_f = rounded.float()
                norm = rounded_f.norm(dim=1)
                bound = ((block - rounded_f).norm(dim=1) * self.centroid_norm + norm * self.centroid_rounding
                         + self.accumulation * (norm * (self.centroid_norm + self.centroid_rounding)
                                                + _BF16_OFFSET))
                # Both compared scores carry the bound and their output rounding, at most
                # 2^-8 of a magnitude <= |best| + margin for any score within the margin:
                # margin = 2 bound + 2u (|best| + margin), solved for the margin, plus 0.1%
                # for the float32 rounding of the margin and the threshold themselves.
                margin = (2.0 * bound + 2.0 * _BF16_U * top[:, 0].abs()) * (1.001 / (1.0 - 2.0 * _BF16_U))
                odd = torch.nonzero(top[:, 0] - top[:, 1] <= margin).flatten()
                if len(odd):
                    self._rescore(block, scores, top[:, 0], margin, best, odd, maxima)
                out[start:start + m] = best.numpy()
        return out

    def _rescore(self, block, scores, first, margin, best, odd, maxima=None) -> None:
        """Set ``best`` of the ambiguous rows ``odd`` by float32 scores of their candidates:
        the centroids whose bfloat16 score is within ``margin`` of the row's best. With the
        column groups' ``maxima`` (:func:`grouped_top2`) only the groups whose maximum
        reaches that floor are read (a few of 32 at 8,192 centroids), not every column: the
        same candidates (the compression of 507k XQuAD-sentence tokens 6.2 -> 5.7 s on 2 AMX
        cores, 9.7 -> 8.2 s on one)."""
        import torch

        floor = first[odd] - margin[odd]
        if maxima is None:
            pos, col = torch.nonzero(scores[odd].float() >= floor.unsqueeze(1), as_tuple=True)
        else:
            groups = scores.view(len(scores), self.k // ARGMAX_GROUP, ARGMAX_GROUP)
            hit, group = torch.nonzero(maxima[odd].float() >= floor.unsqueeze(1), as_tuple=True)
            at, inside = torch.nonzero(groups[odd[hit], group].float() >= floor[hit].unsqueeze(1), as_tuple=True)
            pos, col = hit[at], group[at] * ARGMAX_GROUP + inside
        # (pos, col) in row-major order: a row's candidates in ascending column order
        few = torch.bincount(pos, minlength=len(odd)) <= _BF16_MAX_CANDIDATES
        some, many = odd[few], odd[~few]
        if len(some):
            kept = few[pos]
            row, col = (torch.cumsum(few, 0) - 1)[pos[kept]], col[kept]   # row: its position in ``some``
            exact = (block[some[row]] * self.centroids[col]).sum(dim=1)
            top = torch.full((len(some),), -float("inf")).scatter_reduce_(0, row, exact, "amax")
            win = torch.nonzero(exact == top[row]).flatten()
            first_win = torch.ones(len(win), dtype=torch.bool)
            first_win[1:] = row[win[1:]] != row[win[:-1]]
            best[some[row[win[first_win]]]] = col[win[first_win]]
        if len(many):
            best[many] = (block[many] @ self.centroids.T).max(dim=1).indices


def use_bf16_search(n_rows: int, n_centroids: int, dim: int) -> bool:
    """Whether a nearest-centroid search of this size runs in :class:`_Bf16Search`: on a
    CPU that multiplies bfloat16 natively (:func:`native_bf16`), with torch already
    imported by the process (an encoder actor has it; this never imports it: 1.3 s),
    at most :data:`_BF16_MAX_CENTROIDS` centroids, and at least
    :data:`BF16_SEARCH_MIN_FLOPS` of products. The codes are float32's either way."""
    import sys

    if "torch" not in sys.modules or n_centroids > _BF16_MAX_CENTROIDS:
        return False
    return 2.0 * n_rows * n_centroids * dim >= BF16_SEARCH_MIN_FLOPS and native_bf16()


#: centroids from which :func:`ready_bf16_search` imports torch into a process without it:
#: ~1.3 s, repaid from 8,192 (a corpus of >= 262k tokens, whose float32 search takes ~12 s
#: on 2 CPUs and the bfloat16 one ~3 s less)
TORCH_SEARCH_MIN_CENTROIDS = 8192


def ready_bf16_search(n_centroids: int, threads: int) -> None:
    """Ready a process (a Ray task's: torch not imported, one thread) for
    :func:`use_bf16_search`: on a CPU that multiplies bfloat16 natively, import torch
    where it pays (:data:`TORCH_SEARCH_MIN_CENTROIDS`, or already imported) and run it on
    ``threads`` threads."""
    import sys

    if not native_bf16():
        return
    if "torch" not in sys.modules and n_centroids < TORCH_SEARCH_MIN_CENTROIDS:
        return
    import torch

    torch.set_num_threads(threads)


#: below this many centroids two-level k-means falls back to flat (it saves little there)
TWO_LEVEL_MIN_CENTROIDS = 256


def _share_centroids(counts: np.ndarray, k: int) -> np.ndarray:
    """Centroids per coarse cell: proportional to its vectors (largest remainders), at
    most its vector count, summing to ``k``; a non-empty cell gets at least one unless
    there are more non-empty cells than ``k`` allows (then the smallest go without)."""
    counts = counts.astype(np.int64)
    exact = counts * k / counts.sum()
    share = np.minimum(np.maximum(np.floor(exact).astype(np.int64), (counts > 0).astype(np.int64)), counts)
    while share.sum() > k:  # the "at least one" floors overshot: take from the largest shares
        share[np.argmax(share - exact)] -= 1
    room = counts - share
    order = np.argsort(-(exact - share), kind="stable")
    i = 0
    while share.sum() < k:  # largest remainders first, wrapping round the cells with room
        c = order[i % len(order)]
        if room[c] > 0:
            share[c] += 1
            room[c] -= 1
        i += 1
    return share


def _two_level_centroids(train: np.ndarray, n_centroids: int, seed: int, niter: int,
                         device: "str | None" = None) -> np.ndarray:
    """Two-level spherical k-means: ~sqrt(k) coarse cells, then each cell's vectors into
    its share of the ``n_centroids`` (:func:`_share_centroids`).

    Each vector meets ~2·sqrt(k) centroids per iteration instead of k (at k = 2,048 on
    28k tokens, 12x fewer multiply-adds). Compression still assigns every token to its
    nearest centroid among all k, so a vector near a cell border loses nothing there.
    Rows stay in content-key order inside every cell, so the starts are content-defined.
    """
    k1 = max(2, math.isqrt(n_centroids))
    coarse = _flat_centroids(train, k1, seed, max(niter, 10), device)  # cheap: k1 centroids
    cells = _nearest_centroids(coarse, train)
    share = _share_centroids(np.bincount(cells, minlength=k1), n_centroids)
    out = []
    for c in np.flatnonzero(share):
        rows = train[cells == c]
        k2 = int(share[c])
        out.append(rows[:k2] if k2 == len(rows) else _flat_centroids(rows, k2, seed, niter, device))
    return _l2_normalize(np.concatenate(out).astype(np.float32))


def _split_heldout(
    sample: np.ndarray, heldout_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split into L2-normalised float32 (train, heldout) by content key; a tiny sample reuses
    train rows.

    Both parts come out in content-key order (the keys of the normalised rows). The
    held-out rows are those whose key falls in the lowest ``heldout_fraction`` of the key
    range, so a row's side of the split does not depend on the other rows. ``sample``
    (any float dtype, checked finite) is neither changed nor copied whole: each part is
    gathered, converted and normalised a block at a time into its own array, the only
    sample-sized arrays of the split (before, a normalised copy of the sample came first:
    at 507k x 384 tokens its fresh pages cost ~5 s on 2 CPUs).
    """
    n = len(sample)
    scale = np.maximum(_row_norms(sample), np.finfo(np.float32).tiny)
    order, keys = _key_order(_hashed_rows(sample, seed, scale))
    if n < 2 or heldout_fraction <= 0:
        ordered = _normalized_rows(sample, order, scale)
        return ordered, ordered
    held = keys < np.uint64(min(int(heldout_fraction * 2.0**64), 2**64 - 1))
    n_held = int(held.sum())
    if n_held < 1 or n_held > n - 1:  # tiny samples: fall back to a count, still in key order
        n_held = min(max(1, math.ceil(n * heldout_fraction)), n - 1)
        held = np.zeros(n, bool)
        held[:n_held] = True
    return _normalized_rows(sample, order[~held], scale), _normalized_rows(sample, order[held], scale)


def _normalized_rows(x: np.ndarray, rows: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``x[rows] / scale[rows]`` as one float32 array (``scale`` ``(n, 1)`` float32), gathered
    a block at a time: :func:`_l2_normalize`'s values for ``scale`` the clamped norms."""
    out = np.empty((len(rows), x.shape[1]), dtype=np.float32)
    torch = sys.modules.get("torch")
    if torch is not None and x.dtype in (np.float16, np.float32) and all(st > 0 for st in x.strides):
        # the same quotients through torch where the process has it (a bfloat16 fit): its row
        # gather and conversion 2x faster (a 507k-token fit's two parts: 0.28 s against 0.6)
        xt, st, ot = _tensor_to_read(torch, x), torch.from_numpy(scale), torch.from_numpy(out)
        at = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        for block in _row_batches(len(rows), _BLOCK_ROWS):
            idx = at[block]
            torch.div(xt.index_select(0, idx).float(), st.index_select(0, idx), out=ot[block])
        return out
    for block in _row_batches(len(rows), _BLOCK_ROWS):
        idx = rows[block]
        np.divide(_float32(x[idx]), scale[idx], out=out[block])
    return out


def _bucket_stats(residuals: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """Bucket cutoffs and weights: quantiles of all residual values.

    Both sets from one ``np.quantile`` call (one partition of the values, the same
    quantiles: 0.40 -> 0.24 s for 25k held-out tokens of 384 dimensions)."""
    values = residuals.astype(np.float64).ravel()
    n_buckets = 1 << nbits
    quantiles = np.quantile(values, np.concatenate([np.arange(1, n_buckets) / n_buckets,
                                                    (np.arange(n_buckets) + 0.5) / n_buckets]))
    cutoffs, weights = quantiles[:n_buckets - 1], quantiles[n_buckets - 1:]
    return cutoffs.astype(np.float32), weights.astype(np.float32)


def _frozen_float_array(value: np.ndarray, name: str, ndim: int) -> np.ndarray:
    array = np.array(value, dtype=np.float32, copy=True)
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    array.setflags(write=False)
    return array


def _check_fit_args(sample: np.ndarray, nbits: int, heldout_fraction: float) -> None:
    if isinstance(nbits, bool) or nbits not in SUPPORTED_NBITS:
        raise ValueError(f"nbits must be one of {SUPPORTED_NBITS}, got {nbits!r}")
    shape = np.shape(sample)
    if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"sample must be a non-empty (n, dim) array, got shape {shape}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")


def _read_archive(data: bytes) -> dict[str, np.ndarray]:
    """Arrays of a codec ``.npz`` archive; ValueError when corrupt or incomplete."""
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"corrupt codec archive: {err}") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError("corrupt codec archive: not an .npz archive")
    with archive:
        missing = _REQUIRED_KEYS - set(archive.files)
        if missing:
            raise ValueError(f"codec archive misses keys {sorted(missing)}")
        try:
            return {key: archive[key] for key in _REQUIRED_KEYS}
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
            raise ValueError(f"corrupt codec archive: {err}") from err


@dataclass(frozen=True, eq=False, repr=False)
class ResidualCodec:
    """Centroid + quantised-residual codec for ``dim``-dimensional token vectors.

    Attributes
    ----------
    centroids : numpy.ndarray
        ``(k, dim)`` float32, rows L2-normalised. Read-only copy.
    nbits : int
        Bits per residual dimension: 1, 2 or 4.
    bucket_cutoffs : numpy.ndarray
        ``(2**nbits - 1,)`` float32, non-decreasing. A residual value ``r`` falls
        in bucket ``i`` when ``cutoffs[i-1] < r <= cutoffs[i]``.
    bucket_weights : numpy.ndarray
        ``(2**nbits,)`` float32, the value a residual in bucket ``i`` decodes to.
    avg_residual : float
        Mean ``|residual|`` over the held-out fit sample, the reference a later
        re-index compares against to detect drift.
    """

    centroids: np.ndarray
    nbits: int
    bucket_cutoffs: np.ndarray
    bucket_weights: np.ndarray
    avg_residual: float

    def __post_init__(self) -> None:
        if isinstance(self.nbits, bool) or self.nbits not in SUPPORTED_NBITS:
            raise ValueError(f"nbits must be one of {SUPPORTED_NBITS}, got {self.nbits!r}")
        object.__setattr__(self, "nbits", int(self.nbits))
        for name in _FLOAT_KEYS:
            ndim = 2 if name == "centroids" else 1
            object.__setattr__(self, name, _frozen_float_array(getattr(self, name), name, ndim))
        self._check_centroids()
        self._check_buckets()
        if not math.isfinite(self.avg_residual) or self.avg_residual < 0:
            raise ValueError(f"avg_residual must be finite and >= 0, got {self.avg_residual}")
        object.__setattr__(self, "avg_residual", float(self.avg_residual))

    def _check_centroids(self) -> None:
        k, dim = self.centroids.shape
        if k < 1 or dim < 1:
            raise ValueError(f"centroids must be non-empty, got shape {self.centroids.shape}")
        _check_nbits_dim(self.nbits, dim)
        code_dtype(k)
        norms = np.linalg.norm(self.centroids, axis=1)
        if np.abs(norms - 1.0).max() > 1e-3:
            raise ValueError("centroids rows must be L2-normalised")

    def _check_buckets(self) -> None:
        n_buckets = 1 << self.nbits
        if self.bucket_cutoffs.shape != (n_buckets - 1,):
            raise ValueError(
                f"bucket_cutoffs must have shape ({n_buckets - 1},) for nbits="
                f"{self.nbits}, got {self.bucket_cutoffs.shape}"
            )
        if self.bucket_weights.shape != (n_buckets,):
            raise ValueError(
                f"bucket_weights must have shape ({n_buckets},) for nbits="
                f"{self.nbits}, got {self.bucket_weights.shape}"
            )
        if np.any(np.diff(self.bucket_cutoffs) < 0):
            raise ValueError("bucket_cutoffs must be non-decreasing")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ResidualCodec):
            return NotImplemented
        return (
            self.nbits == other.nbits
            and self.avg_residual == other.avg_residual
            and all(np.array_equal(getattr(self, k), getattr(other, k)) for k in _FLOAT_KEYS)
        )

    __hash__ = None  # arrays make the codec unhashable, like numpy arrays

    def __repr__(self) -> str:
        return (
            f"ResidualCodec(dim={self.dim}, n_centroids={self.n_centroids}, "
            f"nbits={self.nbits}, avg_residual={self.avg_residual:.6g})"
        )

    @property
    def dim(self) -> int:
        """Full vector dimension."""
        return int(self.centroids.shape[1])

    @property
    def n_centroids(self) -> int:
        """Number of centroids ``k``."""
        return int(self.centroids.shape[0])

    @property
    def code_dtype(self) -> np.dtype:
        """Dtype of the centroid codes (uint8, uint16 or uint32)."""
        return code_dtype(self.n_centroids)

    @property
    def residual_bytes(self) -> int:
        """Packed residual bytes per token, ``dim * nbits // 8``."""
        return self.dim * self.nbits // 8

    def bytes_per_token(self) -> int:
        """Stored bytes per token: one code plus its packed residual."""
        return self.code_dtype.itemsize + self.residual_bytes

    @cached_property
    def byte_weights(self) -> np.ndarray:
        """``(256, 8 // nbits)`` float32 (read-only): the decoded residual values of every
        packed byte, its dimensions in order (:meth:`residual_vectors` of a residual is the
        concatenation of its bytes' rows).

        Decompression gathers one row per stored byte instead of unpacking bits and
        then gathering one weight per dimension (same values, about 1.5x faster at
        nbits 4).
        """
        per_byte = 8 // self.nbits
        buckets = unpack_bits(np.arange(256, dtype=np.uint8)[:, None], self.nbits, per_byte)
        table = np.ascontiguousarray(self.bucket_weights[buckets], dtype=np.float32)
        table.setflags(write=False)
        return table

    @classmethod
    def fit(
        cls,
        sample: np.ndarray,
        nbits: int,
        n_centroids: int | None = None,
        *,
        seed: int = 0,
        niter: int = 20,
        heldout_fraction: float = 0.05,
        kmeans: str = "flat",
        device: "str | None" = None,
    ) -> "ResidualCodec":
        """Train centroids and residual buckets on a sample of token vectors.

        Parameters
        ----------
        sample : numpy.ndarray
            ``(n, dim)`` float token vectors; they are L2-normalised first.
        nbits : int
            Bits per residual dimension: 1, 2 or 4; ``dim * nbits`` must be a
            multiple of 8.
        n_centroids : int, optional
            Number of centroids; default ``default_n_centroids(n)`` capped to the
            number of training rows.
        seed : int
            Salt of the content keys that order the sample for the held-out split
            and the k-means start; equal seeds and samples give equal codecs, and
            the codec depends on the sample's rows, not on their order.
        niter : int
            k-means iterations.
        heldout_fraction : float
            Fraction of the sample, in ``[0, 1)``, kept out of k-means and used to
            estimate the residual distribution. With 0 (or a one-row sample) the
            training rows are used.
        kmeans : str
            ``flat``, ``two-level``, ``flat-bf16`` (see :data:`KMEANS_KINDS`) or ``auto``
            (:func:`resolve_kmeans`).
        device : str, optional
            A torch device ("cuda") to run k-means on (:func:`_torch_kmeans`); default
            None: faiss (on its GPUs when it has any).

        Returns
        -------
        ResidualCodec
        """
        _check_fit_args(sample, nbits, heldout_fraction)
        sample = _checked_vectors(sample, None, "sample")  # normalised in the split, not copied here
        _check_nbits_dim(nbits, sample.shape[1])
        train, heldout = _split_heldout(sample, heldout_fraction, seed)
        k = cls._choose_k(n_centroids, len(sample), len(train))
        centroids = _train_centroids(train, k, seed, niter, kmeans, device)
        residuals = heldout - centroids[_exact_nearest(centroids, heldout)]
        cutoffs, weights = _bucket_stats(residuals, nbits)
        avg_residual = float(np.abs(residuals).mean(dtype=np.float64))
        logger.info(
            "fitted residual codec: %d sample rows, %d centroids, dim %d, nbits %d, "
            "avg |residual| %.4f",
            len(sample), k, sample.shape[1], nbits, avg_residual,
        )
        return cls(centroids, nbits, cutoffs, weights, avg_residual)

    def with_nbits(self, nbits: int, sample: np.ndarray) -> "ResidualCodec":
        """The same centroids with buckets for another ``nbits``, from ``sample``'s residuals.

        Centroids don't depend on ``nbits``, so 1/2/4-bit variants of one codec can be
        compared without re-running k-means.

        Parameters
        ----------
        sample : (n, dim) float token vectors (normalised here).
        """
        _check_nbits_dim(nbits, self.dim)
        sample = _l2_normalize(_as_vectors(sample, self.dim, "sample"))
        residuals = sample - self.centroids[self.assign(sample)]
        cutoffs, weights = _bucket_stats(residuals, nbits)
        return ResidualCodec(self.centroids, nbits, cutoffs, weights,
                             float(np.abs(residuals).mean(dtype=np.float64)))

    @staticmethod
    def _choose_k(n_centroids: int | None, n_sample: int, n_train: int) -> int:
        if n_centroids is None:
            return min(default_n_centroids(n_sample), n_train)
        if n_centroids < 1 or n_centroids > n_train:
            raise ValueError(
                f"n_centroids must be in 1..{n_train} (training rows), got {n_centroids}"
            )
        return int(n_centroids)

    def assign(self, vectors: np.ndarray) -> np.ndarray:
        """Nearest centroid (max inner product) of each vector.

        Parameters
        ----------
        vectors : numpy.ndarray
            ``(n, dim)`` float.

        Returns
        -------
        numpy.ndarray
            ``(n,)`` codes of dtype :attr:`code_dtype`.
        """
        vectors = _as_vectors(vectors, self.dim, "vectors")
        if use_bf16_search(len(vectors), self.n_centroids, self.dim):
            return self._bf16_search.nearest(vectors).astype(self.code_dtype)
        return _nearest_centroids(self.centroids, vectors).astype(self.code_dtype)

    def compress(self, vectors: "np.ndarray | Sequence[np.ndarray]",
                 device: "str | None" = None) -> tuple[np.ndarray, np.ndarray]:
        """Encode vectors as centroid codes plus bit-packed residual buckets.

        Parameters
        ----------
        vectors : numpy.ndarray
            ``(n, dim)`` float (float16 is converted a batch at a time); L2-normalised
            first, as in :meth:`fit`. Or a sequence of ``(t_i, dim)`` arrays, encoded as
            their concatenation without building it.
        device : a torch device ("cuda", "cpu") for the nearest-centroid search and the
            bucketing, or None for numpy. On a GPU encoder the search (``n × k × dim``
            multiply-adds, the costly part) then runs where the vectors were made instead
            of on the actor's CPU threads; the results equal numpy's up to ties. With
            None the search runs as a bfloat16 product with float32 rescoring of near ties
            where :func:`use_bf16_search` says so (the same codes up to float32 ties).

        Returns
        -------
        codes : numpy.ndarray
            ``(n,)`` :attr:`code_dtype`.
        residuals : numpy.ndarray
            ``(n, dim * nbits // 8)`` ``uint8``, see :func:`pack_bits`.
        """
        codes, packed, _ = self.compress_with_residual_sum(vectors, device)
        return codes, packed

    def compress_with_residual_sum(
        self, vectors: "np.ndarray | Sequence[np.ndarray]", device: "str | None" = None
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """:meth:`compress`, and the sum of ``|residual|`` over every value of the
        normalised vectors (float64): the statistic a re-index compares, divided by
        ``n * dim``, with :attr:`avg_residual` to tell whether the centroids still fit.
        Summed batch by batch while each batch's residuals are at hand (a second pass
        over the vectors and their centroids cost ~9% of a compression on 2 CPUs).

        ``vectors`` may also be a sequence of ``(t_i, dim)`` arrays (a shard's documents),
        compressed as their concatenation without building it: each batch gathers only
        its own rows (a float32 copy of a 127k-token shard is ~0.2 GB of fresh memory)."""
        # shapes checked here, finiteness a batch at a time below (no pass of its own)
        if isinstance(vectors, np.ndarray):
            parts = [_checked_vectors(vectors, self.dim, "vectors", finite=False)]
        else:
            parts = [_checked_vectors(v, self.dim, f"vectors[{i}]", finite=False) for i, v in enumerate(vectors)]
        n = sum(len(p) for p in parts)
        codes = np.empty(n, dtype=self.code_dtype)
        packed = np.empty((n, self.residual_bytes), dtype=np.uint8)
        abs_sum = 0.0
        bf16 = device is None and use_bf16_search(n, self.n_centroids, self.dim)
        # On CPU a batch's temporaries stay under glibc's mmap threshold, so every batch reuses
        # the same heap pages: with 64k-row batches (~100 MB each) a 127k-token shard (float16
        # in) took 5.8 s on 2 CPUs, with 8k-row ones 3.6 s, the same codes.
        for rows, block in _row_blocks(parts, _ROW_BATCH if device is not None else _BLOCK_ROWS):
            if not np.isfinite(block).all():
                raise ValueError("vectors contains NaN or infinite values")
            if device is None:
                batch = _l2_normalize(block)
                batch_codes = (self._bf16_search.nearest(batch) if bf16 else
                               _nearest_centroids(self.centroids, batch))
                residual = batch - self.centroids[batch_codes]
                buckets = _bucketize(residual, self.bucket_cutoffs)
                np.abs(residual, out=residual)
                abs_sum += float(residual.sum(dtype=np.float64))
            else:
                batch_codes, buckets, batch_sum = self._codes_and_buckets_torch(block, device)
                abs_sum += batch_sum
            codes[rows] = batch_codes
            packed[rows] = pack_bits(buckets, self.nbits)
        return codes, packed, abs_sum

    def _codes_and_buckets_torch(self, vectors: np.ndarray, device: str) -> tuple[np.ndarray, np.ndarray, float]:
        """:meth:`compress`'s search and bucketing on a torch device: ``(n,)`` int64 codes,
        ``(n, dim)`` uint8 buckets (``torch.bucketize`` = ``np.searchsorted``, side left)
        and the sum of ``|residual|``."""
        import torch

        cached = self._torch_arrays.get(device)
        if cached is None:
            cached = (torch.from_numpy(np.array(self.centroids, np.float32)).to(device),  # a writable copy
                      torch.from_numpy(np.array(self.bucket_cutoffs, np.float32)).to(device))
            self._torch_arrays[device] = cached
        centroids, cutoffs = cached
        with torch.inference_mode():
            x = _tensor_to_read(torch, np.ascontiguousarray(vectors, dtype=np.float32)).to(device)
            x = x / x.norm(dim=1, keepdim=True).clamp_min(np.finfo(np.float32).tiny)
            codes = _torch_nearest_centroids(centroids, x, _SCORE_BUDGET)
            residual = x - centroids[codes]
            buckets = torch.bucketize(residual, cutoffs).to(torch.uint8)
            abs_sum = float(residual.abs().sum(dtype=torch.float64))
            return codes.cpu().numpy(), buckets.cpu().numpy(), abs_sum

    @cached_property
    def _bf16_search(self) -> _Bf16Search:
        """The centroids in :class:`_Bf16Search`'s form, built on first use."""
        return _Bf16Search(self.centroids)

    @cached_property
    def _torch_arrays(self) -> dict:
        """{device: (centroids, bucket cutoffs) as torch tensors on it}, filled on first use."""
        return {}

    def decompress(
        self,
        codes: np.ndarray,
        residuals: np.ndarray,
        dim: int | None = None,
        normalize: bool = True,
    ) -> np.ndarray:
        """Reconstruct vectors, optionally only a prefix of their dimensions.

        Parameters
        ----------
        codes : numpy.ndarray
            ``(n,)`` integer centroid codes.
        residuals : numpy.ndarray
            ``(n, dim * nbits // 8)`` ``uint8`` as returned by :meth:`compress`.
        dim : int, optional
            Keep the first ``dim`` dimensions (1..self.dim); default all.
        normalize : bool
            L2-normalise each row after taking the prefix (Matryoshka prefix
            re-normalised). With False the result is exactly
            ``centroids[codes, :dim] + bucket_weights[buckets][:, :dim]``.

        Returns
        -------
        numpy.ndarray
            ``(n, dim)`` float32.
        """
        d = self._check_prefix_dim(dim)
        codes, residuals = self._check_encoded(codes, residuals)
        out = np.empty((len(codes), d), dtype=np.float32)
        for rows in _row_batches(len(codes), _ROW_BATCH):
            out[rows] = self.residual_vectors(residuals[rows], d)
            out[rows] += np.take(self.centroids[:, :d], codes[rows], axis=0)
        return _l2_normalize(out) if normalize else out

    def residual_vectors(
        self, residuals: np.ndarray, dim: int | None = None, *, small_table: bool = False
    ) -> np.ndarray:
        """Decoded residuals, without their centroids and without normalising.

        Parameters
        ----------
        residuals : numpy.ndarray
            ``(n, residual_bytes)`` uint8 as returned by :meth:`compress`.
        dim : int, optional
            Keep the first ``dim`` dimensions; default all.
        small_table : bool
            Always gather from the 256-row byte table, never the 1 MiB byte-pair table:
            for a few rows at a time between other work (a search's exact stage), where
            the large table would be read from memory again each call.

        Returns
        -------
        numpy.ndarray
            ``(n, dim)`` float32 ``bucket_weights[buckets]``.

        Notes
        -----
        One decoded row per stored byte, gathered with ``np.take`` (about 10x faster
        than fancy indexing for these small rows); only the bytes covering the
        first ``dim`` dimensions are read.
        """
        d = self._check_prefix_dim(dim)
        residuals = np.asarray(residuals)
        n_bytes = math.ceil(d * self.nbits / 8)
        if self.nbits == 4 and n_bytes % 2 == 0 and not small_table:
            # Two dimensions a byte: gather one decoded row per byte pair instead (a
            # 1 MiB table; half the gathers, ~1.5x faster; no gain at 2 bits).
            pairs = np.ascontiguousarray(residuals[:, :n_bytes]).view("<u2")
            table = self._pair_weights
            values = np.take(table, pairs, axis=0).reshape(len(residuals), (n_bytes // 2) * table.shape[1])
        else:
            table = self.byte_weights
            values = np.take(table, residuals[:, :n_bytes], axis=0)
            values = values.reshape(len(residuals), n_bytes * table.shape[1])
        return values if values.shape[1] == d else np.ascontiguousarray(values[:, :d])

    @cached_property
    def _pair_weights(self) -> np.ndarray:
        """``(65536, 2 * (8 // nbits))`` float32: decoded values of every little-endian byte pair."""
        pair = np.arange(1 << 16)
        table = self.byte_weights
        out = np.ascontiguousarray(np.concatenate([table[pair & 0xFF], table[pair >> 8]], axis=1))
        out.setflags(write=False)
        return out

    def _check_prefix_dim(self, dim: int | None) -> int:
        if dim is None:
            return self.dim
        if isinstance(dim, bool) or int(dim) != dim or not 1 <= dim <= self.dim:
            raise ValueError(f"dim must be an integer in 1..{self.dim}, got {dim!r}")
        return int(dim)

    def _check_encoded(
        self, codes: np.ndarray, residuals: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        codes = np.asarray(codes)
        residuals = np.asarray(residuals)
        if codes.ndim != 1 or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(
                f"codes must be a 1-D integer array, got shape {codes.shape} "
                f"dtype {codes.dtype}"
            )
        if residuals.shape != (len(codes), self.residual_bytes) or residuals.dtype != np.uint8:
            raise ValueError(
                f"residuals must be uint8 of shape ({len(codes)}, {self.residual_bytes}), "
                f"got {residuals.dtype} {residuals.shape}"
            )
        if codes.size and (codes.min() < 0 or codes.max() >= self.n_centroids):
            raise ValueError(f"codes must lie in [0, {self.n_centroids})")
        return codes, residuals

    def to_bytes(self) -> bytes:
        """Serialise as an ``.npz`` archive (no pickle).

        Returns
        -------
        bytes
        """
        buffer = io.BytesIO()
        np.savez(
            buffer,
            format_version=np.int64(FORMAT_VERSION),
            centroids=self.centroids,
            nbits=np.int64(self.nbits),
            bucket_cutoffs=self.bucket_cutoffs,
            bucket_weights=self.bucket_weights,
            avg_residual=np.float64(self.avg_residual),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ResidualCodec":
        """Load a codec written by :meth:`to_bytes`.

        Parameters
        ----------
        data : bytes
            The ``.npz`` archive.

        Returns
        -------
        ResidualCodec

        Raises
        ------
        ValueError
            If the archive is corrupt, misses keys or holds invalid values.
        """
        fields = _read_archive(data)
        try:
            version = int(fields["format_version"])
            nbits = int(fields["nbits"])
            avg_residual = float(fields["avg_residual"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"corrupt codec archive: bad scalar field: {err}") from err
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported codec format_version {version}")
        return cls(
            centroids=fields["centroids"],
            nbits=nbits,
            bucket_cutoffs=fields["bucket_cutoffs"],
            bucket_weights=fields["bucket_weights"],
            avg_residual=avg_residual,
        )

    def params(self) -> dict:
        """JSON-able summary for manifests.

        Returns
        -------
        dict
            ``nbits``, ``n_centroids``, ``dim``, ``code_dtype``,
            ``bytes_per_token``, ``avg_residual``, ``bucket_cutoffs`` and
            ``bucket_weights`` (lists of floats).
        """
        return {
            "nbits": self.nbits,
            "n_centroids": self.n_centroids,
            "dim": self.dim,
            "code_dtype": self.code_dtype.name,
            "bytes_per_token": self.bytes_per_token(),
            "avg_residual": self.avg_residual,
            "bucket_cutoffs": self.bucket_cutoffs.tolist(),
            "bucket_weights": self.bucket_weights.tolist(),
        }
