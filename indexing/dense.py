"""FAISS indexes over dense (Matryoshka) vectors: train, add shards, merge, search.

Every index uses the inner-product metric: the vectors are unit rows (already
truncated to the index dimension and re-normalised by ``embedding.mrl.truncate``),
so inner product equals cosine similarity.

The build is split the way ``jobs/build_index`` runs it:

1. ``train(params, sample)`` returns an *empty* trained index; it travels to the
   workers as ``to_bytes(index)``.
2. Each worker calls ``add(from_bytes(data, kind), shard_vectors, start_id)``; the
   rows get the explicit positional ids ``start_id .. start_id + n - 1``.
3. ``merge(parts)`` (or ``merge_ondisk`` for IVF indexes larger than memory) joins
   the parts. Given the parts in shard order, the merged index stores exactly what
   one index fed every shard in one go would store, so searches return identical
   ids and scores.

Index layout per kind (all float kinds use ``METRIC_INNER_PRODUCT``):

========  ==============================================  ==========================
kind      FAISS index                                     ids / merge
========  ==============================================  ==========================
flat      ``IndexIDMap(IndexFlatIP)``                     id map, ``merge_from``
ivf       ``IndexIVFFlat(IndexFlatIP)``                   native, ``merge_from``
ivfpq     ``IndexIVFPQ(IndexFlatIP)``                     native, ``merge_from``
hnsw      ``IndexIDMap(IndexHNSWFlat)``                   id map, no merge (below)
int8      ``IndexIDMap(IndexScalarQuantizer(QT_8bit))``   id map, ``merge_from``
binary    ``IndexBinaryIDMap(IndexBinaryFlat)``           id map, codes re-added
========  ==============================================  ==========================

An HNSW graph cannot be merged: build it by adding every shard into one index in
shard order. Even then the graph differs from a one-call build (FAISS inserts a
batch level by level, on several threads), so only the stored vectors and ids are
reproducible, not the graph; ``merge`` accepts a single HNSW part only.

``int8`` and ``binary`` are quantised flat indexes: ``search`` can rescore their
first-stage candidates with the float vectors (``vectors=``), and so can ``ivfpq``.

Incremental updates (the nightly re-index) keep positional ids stable: ``remove``
drops labels and leaves holes (the other labels are never renumbered), and new
documents are added after the largest label ever given out (the length of the id
mapping), so a hole is never reused. Every kind but ``hnsw`` supports removal
(``SUPPORTS_REMOVE``); an HNSW graph is rebuilt.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from embedding.faiss_import import import_faiss
from embedding.mrl import truncate
from indexing.kinds import DENSE_KINDS, IVF_KINDS, RESCORED_KINDS, SUPPORTS_REMOVE  # noqa: F401 - re-exported

faiss = import_faiss()  # a missing faiss names the extras that install it
logger = logging.getLogger(__name__)

KINDS = DENSE_KINDS
_TRAINED_KINDS = ("ivf", "ivfpq", "int8")
# FAISS warns below 39 training points per centroid; the defaults respect it.
MIN_POINTS_PER_LIST = 39
_MAX_PQ_NBITS = 16
# Rows per add() call into FAISS, so long adds log progress.
_ADD_BATCH = 1 << 16
# (query, candidate) pairs rescored at once: bounds the gathered float rows.
_RESCORE_PAIRS = 1 << 16
# Unit rows are checked loosely: float16 storage rounds norms by ~1e-3.
_NORM_TOLERANCE = 1e-2


def _check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class DenseIndexParams:
    """What to build, and how to search it.

    Parameters
    ----------
    kind : str
        One of ``KINDS``.
    dim : int
        Vector dimension (the Matryoshka prefix the index is built at).
    nlist : int or None
        IVF lists (``ivf``, ``ivfpq``); None until ``resolved(n)`` picks one.
    pq_m : int or None
        PQ sub-quantisers (``ivfpq``), a divisor of ``dim``; None until
        ``resolved`` picks ``default_pq_m(dim)``.
    pq_nbits : int
        Bits per PQ sub-quantiser code, 1..16.
    hnsw_m : int
        HNSW neighbours per node, at least 2.
    ef_construction, ef_search : int
        HNSW beam widths when adding and searching.
    nprobe : int
        IVF lists visited per query.
    rescore : int
        With float rescoring, the first stage fetches ``k * rescore`` candidates.
    """

    kind: str
    dim: int
    nlist: int | None = None
    pq_m: int | None = None
    pq_nbits: int = 8
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    nprobe: int = 16
    rescore: int = 10

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        _check_int("dim", self.dim, 1)
        for name in ("nlist", "pq_m"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if self.pq_m is not None and self.dim % self.pq_m:
            raise ValueError(f"PQ m={self.pq_m} does not divide dim {self.dim}")
        if _check_int("pq_nbits", self.pq_nbits, 1) > _MAX_PQ_NBITS:
            raise ValueError(f"pq_nbits must be at most {_MAX_PQ_NBITS}, got {self.pq_nbits}")
        _check_int("hnsw_m", self.hnsw_m, 2)
        for name in ("ef_construction", "ef_search", "nprobe", "rescore"):
            _check_int(name, getattr(self, name), 1)
        if self.kind == "binary" and self.dim % 8:
            raise ValueError(f"a binary index needs dim divisible by 8, got dim {self.dim}")

    def resolved(self, n_vectors: int, *, n_train: int | None = None) -> "DenseIndexParams":
        """These parameters with the size-dependent defaults filled in.

        Parameters
        ----------
        n_vectors : int
            Number of vectors the index will hold, at least 1.
        n_train : int or None
            Size of the training sample (default ``n_vectors``): the default
            ``nlist`` is capped so that each list gets at least
            ``MIN_POINTS_PER_LIST`` training points where that is possible.

        Returns
        -------
        DenseIndexParams
            A copy; explicitly given values are kept.
        """
        n = _check_int("n_vectors", n_vectors, 1)
        n_fit = n if n_train is None else _check_int("n_train", n_train, 1)
        changes: dict[str, int] = {}
        if self.kind in IVF_KINDS and self.nlist is None:
            changes["nlist"] = capped_nlist(n, n_fit)
        if self.kind == "ivfpq" and self.pq_m is None:
            changes["pq_m"] = default_pq_m(self.dim)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready dict of every field (for manifests)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DenseIndexParams":
        """Inverse of ``to_dict``; ValueError on unknown or missing keys."""
        if not isinstance(data, dict):
            raise ValueError(f"index params must be a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown index params {unknown}; expected some of {sorted(names)}")
        missing = [name for name in ("kind", "dim") if name not in data]
        if missing:
            raise ValueError(f"index params lack {missing}")
        return cls(**data)


def _floor_pow2(n: int) -> int:
    """Largest power of two <= n (n >= 1)."""
    return 1 << (int(n).bit_length() - 1)


def default_nlist(n: int) -> int:
    """IVF list count for ``n`` vectors: the power of two nearest ``4 * sqrt(n)``.

    Parameters
    ----------
    n : int
        Number of indexed vectors, at least 1.

    Returns
    -------
    int
        A power of two in ``1..n`` (nearest on a log scale, then halved while > n).
    """
    n = _check_int("n", n, 1)
    nlist = 1 << max(0, round(math.log2(4.0 * math.sqrt(n))))
    return min(nlist, _floor_pow2(n))


def capped_nlist(n: int, n_train: int) -> int:
    """``default_nlist(n)``, halved until ``n_train`` gives each list 39 points.

    Parameters
    ----------
    n, n_train : int
        Indexed vectors and training sample size, both at least 1.

    Returns
    -------
    int
        A power of two; 1 when ``n_train < 39`` (the most points per list).
    """
    limit = max(1, _check_int("n_train", n_train, 1) // MIN_POINTS_PER_LIST)
    return min(default_nlist(n), _floor_pow2(limit))


def default_pq_m(dim: int) -> int:
    """PQ sub-quantiser count for ``dim``: the largest divisor of ``dim`` <= ``dim // 8``.

    With 8-bit codes that is about one byte per 8 dimensions (384 -> 48).
    """
    dim = _check_int("dim", dim, 1)
    target = max(1, dim // 8)
    return max(m for m in range(1, target + 1) if dim % m == 0)


# ---------------------------------------------------------------------------
# Array checks
# ---------------------------------------------------------------------------


def _as_unit_rows(x: np.ndarray, dim: int, what: str) -> np.ndarray:
    """``x`` as C-contiguous (n, dim) float32 after checking shape and unit norms."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} must have shape (n, {dim}), got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{what} must be floating point, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    # Zero rows (empty documents) are allowed; mrl.truncate leaves them zero.
    bad = np.flatnonzero((np.abs(norms - 1.0) > _NORM_TOLERANCE) & (norms > 0))
    if bad.size:
        raise ValueError(
            f"{what} row {bad[0]} has norm {norms[bad[0]]:.4f}; rows must be unit length "
            f"(truncate and re-normalise with embedding.mrl.truncate first)"
        )
    return x


def _binary_codes(x: np.ndarray) -> np.ndarray:
    """(n, dim) float32 -> (n, dim // 8) uint8 sign bits, most significant bit first."""
    return np.packbits(x > 0, axis=1)


# ---------------------------------------------------------------------------
# Introspection
# ---------------------------------------------------------------------------


def _float_kind(index: faiss.Index) -> str | None:
    """Kind of a float index by its FAISS structure, None if it is none of ours."""
    if isinstance(index, faiss.IndexIVFPQ):
        return "ivfpq"
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivf"
    if isinstance(index, faiss.IndexIDMap):
        inner = faiss.downcast_index(index.index)
        for cls, kind in ((faiss.IndexFlat, "flat"), (faiss.IndexScalarQuantizer, "int8"),
                          (faiss.IndexHNSWFlat, "hnsw")):
            if isinstance(inner, cls):
                return kind
    return None


def kind_of(index: "faiss.Index | faiss.IndexBinary") -> str:
    """The ``KINDS`` entry an index built by this module has.

    Raises
    ------
    ValueError
        For an index this module did not build (other type or metric).
    """
    if isinstance(index, faiss.IndexBinaryIDMap):
        if isinstance(faiss.downcast_IndexBinary(index.index), faiss.IndexBinaryFlat):
            return "binary"
    elif isinstance(index, faiss.Index):
        kind = _float_kind(index)
        if kind is not None and index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"the {kind} index uses metric {index.metric_type}, not inner product")
        if kind is not None:
            return kind
    raise ValueError(f"unsupported index type {type(index).__name__}; build indexes with train()")


def _index_dim(index: "faiss.Index | faiss.IndexBinary") -> int:
    """Vector dimension (bits for binary indexes, which is the float dimension)."""
    return int(index.d)


def _check_params_match(index: "faiss.Index | faiss.IndexBinary", params: DenseIndexParams) -> None:
    kind = kind_of(index)
    if kind != params.kind or _index_dim(index) != params.dim:
        raise ValueError(
            f"params describe a {params.kind} index of dim {params.dim}, "
            f"but the index is {kind} of dim {_index_dim(index)}"
        )


# ---------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------


def _empty_index(params: DenseIndexParams) -> "faiss.Index | faiss.IndexBinary":
    """Untrained index of ``params.kind`` with the ``params`` it needs baked in."""
    d, ip = params.dim, faiss.METRIC_INNER_PRODUCT
    if params.kind == "flat":
        return faiss.IndexIDMap(faiss.IndexFlatIP(d))
    if params.kind == "int8":
        return faiss.IndexIDMap(faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, ip))
    if params.kind == "binary":
        return faiss.IndexBinaryIDMap(faiss.IndexBinaryFlat(d))
    if params.kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(d, params.hnsw_m, ip)
        hnsw.hnsw.efConstruction = params.ef_construction
        hnsw.hnsw.efSearch = params.ef_search
        return faiss.IndexIDMap(hnsw)
    if params.kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, params.nlist, ip)
    else:
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, params.nlist, params.pq_m, params.pq_nbits, ip)
    index.nprobe = params.nprobe
    return index


def _check_trainable(params: DenseIndexParams, n: int) -> None:
    """ValueError when unresolved params or too small a sample would fail in FAISS."""
    if params.kind in IVF_KINDS and params.nlist is None:
        raise ValueError(f"{params.kind} params have nlist=None; call params.resolved(n_vectors) first")
    if params.kind == "ivfpq" and params.pq_m is None:
        raise ValueError("ivfpq params have pq_m=None; call params.resolved(n_vectors) first")
    if params.kind in IVF_KINDS and n < params.nlist:
        raise ValueError(f"a training sample of {n} vectors is smaller than nlist={params.nlist}")
    if params.kind == "ivfpq" and n < 2**params.pq_nbits:
        raise ValueError(f"a training sample of {n} vectors is smaller than 2**pq_nbits={2**params.pq_nbits}")
    if params.kind == "int8" and n < 1:
        raise ValueError("an int8 index needs a non-empty training sample for its value ranges")
    if params.kind in IVF_KINDS and n < MIN_POINTS_PER_LIST * params.nlist:
        logger.warning("training %d lists on %d vectors (< %d per list)", params.nlist, n, MIN_POINTS_PER_LIST)


def _fit(index: faiss.Index, x: np.ndarray, kind: str) -> None:
    """Train ``index`` on ``x``; IVF k-means assignment runs on the GPUs when faiss has any.

    On GPU only the coarse k-means (the dominant cost) moves: a GPU flat index of the
    same metric does its assignments, the usual FAISS idiom, and the index itself
    stays on the CPU. That works for every IVF variant, with none of the GPU IVF-PQ
    limits on sub-quantiser sizes. PQ codebooks and int8 value ranges are cheap and
    train on the CPU.
    """
    if kind not in IVF_KINDS or faiss.get_num_gpus() == 0:
        index.train(x)
        return
    ivf = faiss.extract_index_ivf(index)
    gpu_flat = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))
    ivf.clustering_index = gpu_flat
    try:
        index.train(x)
    finally:
        ivf.clustering_index = None  # never keep a pointer to a GPU index
    logger.info("trained the IVF coarse quantizer on %d GPU(s)", faiss.get_num_gpus())


def train(params: DenseIndexParams, sample: np.ndarray) -> "faiss.Index | faiss.IndexBinary":
    """An empty, trained index of ``params.kind``.

    Parameters
    ----------
    params : DenseIndexParams
        Resolved parameters (``params.resolved(n_vectors)``) for IVF kinds.
    sample : (n, dim) float32
        Unit rows to train on. flat, hnsw and binary need no training and only
        check its shape (any n, including 0).

    Returns
    -------
    faiss.Index or faiss.IndexBinary
        Trained and empty (``ntotal == 0``); send it to workers as ``to_bytes``.
    """
    x = _as_unit_rows(sample, params.dim, "training sample")
    if params.kind in _TRAINED_KINDS:
        _check_trainable(params, len(x))
    index = _empty_index(params)
    if params.kind in _TRAINED_KINDS:
        started = time.perf_counter()
        _fit(index, x, params.kind)
        logger.info("trained %s index (dim %d) on %d vectors in %.2f s",
                    params.kind, params.dim, len(x), time.perf_counter() - started)
    return index


# ---------------------------------------------------------------------------
# Add and merge
# ---------------------------------------------------------------------------


def add(index: "faiss.Index | faiss.IndexBinary", vectors: np.ndarray, start_id: int) -> None:
    """Add one shard with positional ids ``start_id .. start_id + n - 1``.

    Parameters
    ----------
    index : faiss.Index or faiss.IndexBinary
        From ``train`` (or ``from_bytes`` of it), trained; extended in place.
    vectors : (n, dim) float32
        Unit rows; row i gets the int64 id ``start_id + i``. n may be 0.
    start_id : int
        Positional id of the shard's first row, >= 0.
    """
    kind = kind_of(index)
    x = _as_unit_rows(vectors, _index_dim(index), "vectors")
    start = _check_int("start_id", start_id, 0)
    if not index.is_trained:
        raise ValueError(f"the {kind} index is not trained; build it with train()")
    if len(x) == 0:
        logger.debug("empty shard at id %d: nothing to add", start)
        return
    started = time.perf_counter()
    for lo in range(0, len(x), _ADD_BATCH):
        chunk = x[lo:lo + _ADD_BATCH]
        ids = np.arange(start + lo, start + lo + len(chunk), dtype=np.int64)
        index.add_with_ids(_binary_codes(chunk) if kind == "binary" else chunk, ids)
        logger.debug("added rows %d..%d of %d", lo, lo + len(chunk), len(x))
    elapsed = time.perf_counter() - started
    logger.info("added %d vectors (ids %d..%d) to a %s index in %.2f s (%.0f rows/s)", len(x),
                start, start + len(x) - 1, kind, elapsed, len(x) / max(elapsed, 1e-9))


def _trained_state(index: "faiss.Index | faiss.IndexBinary", kind: str) -> list[np.ndarray]:
    """Arrays that training produced (coarse centroids, PQ codebooks, SQ ranges)."""
    if kind in IVF_KINDS:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        state = [ivf.quantizer.reconstruct_n(0, ivf.nlist)]
        if kind == "ivfpq":
            state.append(faiss.vector_to_array(ivf.pq.centroids))
        return state
    if kind == "int8":
        return [faiss.vector_to_array(faiss.downcast_index(index.index).sq.trained)]
    return []


def _check_same_training(reference: object, parts: list, kind: str) -> None:
    """ValueError unless every part has the kind, dim and trained state of ``reference``."""
    ref_state = _trained_state(reference, kind)
    for i, part in enumerate(parts):
        if kind_of(part) != kind or _index_dim(part) != _index_dim(reference):
            raise ValueError(f"part {i} is a {kind_of(part)} index of dim {_index_dim(part)}, "
                             f"expected {kind} of dim {_index_dim(reference)}")
        state = _trained_state(part, kind)
        if not all(np.array_equal(a, b) for a, b in zip(ref_state, state)):
            raise ValueError(f"part {i} was trained differently; every part must come from "
                             f"the same trained empty index")


def _move_binary(target: faiss.IndexBinaryIDMap, part: faiss.IndexBinaryIDMap) -> None:
    """Append ``part``'s codes and ids to ``target`` (IndexBinaryFlat has no merge_from)."""
    if part.ntotal:
        codes = faiss.downcast_IndexBinary(part.index).reconstruct_n(0, part.ntotal)
        target.add_with_ids(codes, faiss.vector_to_array(part.id_map))
    part.reset()


def merge(parts: list) -> "faiss.Index | faiss.IndexBinary":
    """Join per-shard parts into one index, exactly.

    Parameters
    ----------
    parts : list of faiss.Index or faiss.IndexBinary
        Parts from ``add`` on copies of one trained empty index, in shard order
        (the order decides only how exact score ties are broken, as in one index
        fed the shards in that order). HNSW: a single part only.

    Returns
    -------
    faiss.Index or faiss.IndexBinary
        ``parts[0]``, now holding every part's vectors with their original ids.
        The parts are consumed: ``parts[1:]`` are left empty (FAISS moves, it does
        not copy, so peak memory stays near the total size).
    """
    if not parts:
        raise ValueError("merge needs at least one part")
    kind = kind_of(parts[0])
    if kind == "hnsw" and len(parts) > 1:
        raise ValueError(f"HNSW graphs cannot be merged ({len(parts)} parts given); "
                         f"add every shard into one index in shard order instead")
    if len({id(p) for p in parts}) != len(parts):
        raise ValueError("the same index object appears twice in parts")
    _check_same_training(parts[0], parts, kind)
    target = parts[0]
    for part in parts[1:]:
        if kind == "binary":
            _move_binary(target, part)
        else:
            target.merge_from(part, 0)  # add_id=0: keep the positional ids as they are
    logger.info("merged %d %s parts into %d vectors", len(parts), kind, target.ntotal)
    return target


def merge_ondisk(trained_empty: faiss.Index, part_paths: list, ivfdata_path: "str | os.PathLike") -> faiss.Index:
    """Merge IVF parts stored as files into an index whose lists live on disk.

    For IVF indexes larger than memory: the parts are memory-mapped and their lists
    written to ``ivfdata_path`` (``faiss.contrib.ondisk.merge_ondisk``). Given the
    same parts in the same order, searches equal those of ``merge``.

    Parameters
    ----------
    trained_empty : faiss.Index
        The trained empty ivf/ivfpq index the parts were built from (not modified).
    part_paths : list of str or os.PathLike
        Local files holding the parts (``to_bytes(part)`` written to disk), in shard order.
    ivfdata_path : str or os.PathLike
        Local file the merged inverted lists are written to.

    Returns
    -------
    faiss.Index
        A copy of ``trained_empty`` holding everything; it reads its lists from
        ``ivfdata_path`` (memory-mapped). ``to_bytes`` of it stores that path, not
        the lists, so the ``.ivfdata`` file must stay where it is.
    """
    from faiss.contrib.ondisk import merge_ondisk as _contrib_merge_ondisk

    kind = kind_of(trained_empty)
    if kind not in IVF_KINDS:
        raise ValueError(f"merge_ondisk supports {IVF_KINDS} indexes, got a {kind} index")
    if trained_empty.ntotal or not trained_empty.is_trained:
        raise ValueError(f"trained_empty must be trained and empty, it holds {trained_empty.ntotal} vectors")
    if not part_paths:
        raise ValueError("merge_ondisk needs at least one part file")
    paths = [os.fspath(p) for p in part_paths]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"part file {path!r} does not exist")
    # Headers only: the lists of a memory-mapped part are not read here.
    _check_same_training(trained_empty, [faiss.read_index(p, faiss.IO_FLAG_MMAP) for p in paths], kind)
    merged = faiss.clone_index(trained_empty)
    _contrib_merge_ondisk(merged, paths, os.fspath(ivfdata_path))
    logger.info("merged %d %s part files into %d vectors at %s", len(paths), kind,
                merged.ntotal, os.fspath(ivfdata_path))
    return merged


# ---------------------------------------------------------------------------
# Incremental updates: remove labels, list labels
# ---------------------------------------------------------------------------


def _check_labels(ids: np.ndarray) -> np.ndarray:
    """``ids`` as a C-contiguous 1-d int64 array of labels >= 0; ValueError otherwise."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"ids must be a 1-d array of int64 positional ids, got shape "
                         f"{arr.shape} dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"ids must be >= 0 (positional ids), got {arr.min()}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _on_disk_lists(index: faiss.Index) -> bool:
    """True when an IVF index reads its inverted lists from a file (``merge_ondisk``)."""
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    return isinstance(invlists, faiss.OnDiskInvertedLists)


def remove(index: "faiss.Index | faiss.IndexBinary", ids: np.ndarray) -> int:
    """Remove the vectors stored under ``ids``, in place; other labels are unchanged.

    Removed labels leave holes: nothing is renumbered, so the positional ids (and
    their Parquet mapping to the user's ids) of every other document stay valid.
    Add new documents after the largest label ever given out (the length of the
    id mapping), not after ``labels(index)[-1]``: that would hand a removed last
    document's label to a new one.

    Parameters
    ----------
    index : faiss.Index or faiss.IndexBinary
        Built by this module, of a kind in ``SUPPORTS_REMOVE``; modified in place.
    ids : (m,) int64
        Labels to remove; may be empty, hold duplicates or labels the index does
        not store (those are ignored).

    Returns
    -------
    int
        How many stored vectors were removed (0 for an empty ``ids``).

    Raises
    ------
    ValueError
        For an HNSW index (its graph cannot drop nodes: rebuild it), an IVF index
        whose lists live in a ``.ivfdata`` file (``merge_ondisk``: removing would
        rewrite that file in place under every other reader of it), or ``ids`` that
        are not a 1-d array of non-negative integers.
    """
    kind = kind_of(index)
    if kind not in SUPPORTS_REMOVE:
        raise ValueError("HNSW graphs don't support removal: rebuild the index "
                         f"(removal works for {', '.join(SUPPORTS_REMOVE)})")
    if kind in IVF_KINDS and _on_disk_lists(index):
        raise ValueError(f"the {kind} index reads its inverted lists from a file (merge_ondisk); "
                         f"removing would rewrite that shared file in place: rebuild or merge "
                         f"in memory instead")
    labels_to_drop = _check_labels(ids)
    if labels_to_drop.size == 0:
        return 0
    started = time.perf_counter()
    # IDSelectorBatch: a hash set (plus a Bloom pre-filter), O(1) per stored vector;
    # IDSelectorArray would scan all of ``ids`` for each one. The id maps translate
    # it to their inner index and compact id_map in order; IVF lists drop in place.
    removed = int(index.remove_ids(faiss.IDSelectorBatch(labels_to_drop)))
    logger.info("removed %d of %d requested ids from a %s index in %.2f s (%d vectors left)",
                removed, labels_to_drop.size, kind, time.perf_counter() - started, index.ntotal)
    return removed


def _ivf_labels(index: faiss.Index) -> np.ndarray:
    """Labels of every inverted list of an IVF index, list after list."""
    invlists = faiss.extract_index_ivf(index).invlists
    chunks = [np.empty(0, dtype=np.int64)]
    for list_no in range(invlists.nlist):
        size = invlists.list_size(list_no)
        if size == 0:
            continue
        ptr = invlists.get_ids(list_no)
        try:
            chunks.append(faiss.rev_swig_ptr(ptr, size).copy())  # copy: ptr is released below
        finally:
            invlists.release_ids(list_no, ptr)
    return np.concatenate(chunks)


def labels(index: "faiss.Index | faiss.IndexBinary") -> np.ndarray:
    """Sorted positional ids the index stores now.

    Parameters
    ----------
    index : faiss.Index or faiss.IndexBinary
        Built by this module, any kind.

    Returns
    -------
    (ntotal,) int64
        Ascending (a label added twice appears twice). After ``remove`` the
        removed labels are missing and the rest are as they were added.
    """
    kind = kind_of(index)
    if kind in IVF_KINDS:
        found = _ivf_labels(index)
    else:
        found = faiss.vector_to_array(index.id_map)
    return np.sort(found.astype(np.int64, copy=False))


# ---------------------------------------------------------------------------
# Serialisation
# ---------------------------------------------------------------------------


def to_bytes(index: "faiss.Index | faiss.IndexBinary") -> bytes:
    """FAISS serialisation of ``index`` as python bytes (no pickle)."""
    kind_of(index)  # refuse indexes this module did not build
    if isinstance(index, faiss.IndexBinary):
        return faiss.serialize_index_binary(index).tobytes()
    return faiss.serialize_index(index).tobytes()


def from_bytes(data: bytes, kind: str) -> "faiss.Index | faiss.IndexBinary":
    """Inverse of ``to_bytes``.

    Raises
    ------
    ValueError
        If ``kind`` is unknown, ``data`` is not a FAISS index, or it holds another kind.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"index data must be bytes, got {type(data).__name__}")
    buf = np.frombuffer(data, dtype=np.uint8)
    read = faiss.deserialize_index_binary if kind == "binary" else faiss.deserialize_index
    try:
        index = read(buf)
    except RuntimeError as err:
        raise ValueError(f"cannot read a {kind} index from {len(buf)} bytes: corrupt or "
                         f"not a FAISS index ({str(err).splitlines()[0]})") from err
    actual = kind_of(index)
    if actual != kind:
        raise ValueError(f"the bytes hold a {actual} index, not {kind}")
    return index


def index_bytes(index: "faiss.Index | faiss.IndexBinary") -> int:
    """Serialised size of ``index`` in bytes."""
    return len(to_bytes(index))


# ---------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------


def _search_parameters(params: DenseIndexParams, sel: "faiss.IDSelector | None") -> "faiss.SearchParameters | None":
    """Per-call FAISS search parameters (the index itself is never mutated)."""
    extra = {} if sel is None else {"sel": sel}
    if params.kind in IVF_KINDS:
        return faiss.SearchParametersIVF(nprobe=params.nprobe, **extra)
    if params.kind == "hnsw":
        # The id map forwards these to the HNSW index (translating the selector).
        return faiss.SearchParametersHNSW(efSearch=params.ef_search, **extra)
    return faiss.SearchParameters(**extra) if extra else None


def _allowed_selector(allowed: "np.ndarray | None") -> "faiss.IDSelector | None":
    if allowed is None:
        return None
    ids = np.asarray(allowed)
    if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"allowed must be a 1-d array of int64 positional ids, got shape "
                         f"{ids.shape} dtype {ids.dtype}")
    return faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))


def _rescore(queries: np.ndarray, cand: np.ndarray, vectors: np.ndarray, dim: int) -> np.ndarray:
    """Float inner products of each query with its candidates.

    Parameters
    ----------
    queries : (q, dim) float32
    cand : (q, c) int64, -1 for no candidate.
    vectors : (n, D) float16/float32, D >= dim; row i is positional id i. Gathered
        rows are truncated to ``dim`` and re-normalised (``embedding.mrl.truncate``).

    Returns
    -------
    (q, c) float32, -inf where ``cand`` is -1.
    """
    scores = np.full(cand.shape, -np.inf, dtype=np.float32)
    per_batch = max(1, _RESCORE_PAIRS // max(1, cand.shape[1]))
    for lo in range(0, len(cand), per_batch):
        block = cand[lo:lo + per_batch]
        rows, cols = np.nonzero(block >= 0)
        uniq, inverse = np.unique(block[rows, cols], return_inverse=True)
        if uniq.size == 0:
            continue
        if uniq[-1] >= len(vectors):
            raise ValueError(f"candidate id {uniq[-1]} is out of range for {len(vectors)} rescoring vectors")
        found = truncate(vectors[uniq], dim)
        scores[lo + rows, cols] = np.einsum("ij,ij->i", queries[lo + rows], found[inverse])
    return scores


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` per row, descending; ties keep first-stage order; padded with -1/-inf."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(scores, order, axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    return _pad(scores, ids, k)


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(q, k) float32 scores and int64 ids; -inf score wherever the id is -1."""
    q, have = ids.shape
    out_s = np.full((q, k), -np.inf, dtype=np.float32)
    out_i = np.full((q, k), -1, dtype=np.int64)
    out_s[:, :have], out_i[:, :have] = scores[:, :k], ids[:, :k]
    out_s[out_i < 0] = -np.inf
    return out_s, out_i


def search(
    index: "faiss.Index | faiss.IndexBinary",
    params: DenseIndexParams,
    queries: np.ndarray,
    k: int,
    *,
    vectors: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` positional ids by inner product.

    Parameters
    ----------
    index : faiss.Index or faiss.IndexBinary
        Built by this module, of ``params.kind`` and ``params.dim``.
    params : DenseIndexParams
        Supplies ``nprobe`` (IVF), ``ef_search`` (HNSW) and ``rescore``.
    queries : (q, dim) float32
        Unit rows.
    k : int
        Results per query, >= 1.
    vectors : (n, D) float16/float32 or None
        Float vectors by positional id (row i = id i, D >= dim; rows are truncated
        and re-normalised as gathered, so the stored full-dim matrix, even a memmap,
        can be passed). For ``RESCORED_KINDS`` (ivfpq, int8, binary) the first stage
        fetches ``k * params.rescore`` candidates and the top ``k`` by exact float
        inner product are returned. Ignored by flat, ivf and hnsw, whose scores
        already are exact float inner products.
    allowed : (m,) int64 or None
        Restrict results to these positional ids (a ``faiss.IDSelectorBatch``
        applied inside the search, for every kind). Exact for flat, int8 and binary;
        IVF only finds allowed ids in the ``nprobe`` lists it visits and HNSW may
        return fewer than ``k`` when few ids are allowed.

    Returns
    -------
    scores : (q, k) float32
        Descending. Inner products; for binary without ``vectors``, minus the Hamming
        distance between sign-bit codes. -inf where there is no result.
    ids : (q, k) int64
        Positional ids, -1 where there is no result.
    """
    _check_params_match(index, params)
    x = _as_unit_rows(queries, params.dim, "queries")
    k = _check_int("k", k, 1)
    rescoring = vectors is not None and params.kind in RESCORED_KINDS
    if rescoring and (np.ndim(vectors) != 2 or np.shape(vectors)[1] < params.dim):
        raise ValueError(f"vectors must have shape (n, D) with D >= {params.dim}, got {np.shape(vectors)}")
    # Never ask FAISS for more than it holds: it would allocate (q, k) for padding.
    first_k = max(1, min(k * params.rescore if rescoring else k, index.ntotal))
    sel = _allowed_selector(allowed)  # kept alive here until FAISS returns
    sp = _search_parameters(params, sel)
    if params.kind == "binary":
        dist, ids = index.search(_binary_codes(x), first_k, params=sp)
        scores = -dist.astype(np.float32)
    else:
        scores, ids = index.search(x, first_k, params=sp)
    if rescoring:
        return _top_k(_rescore(x, ids, vectors, params.dim), ids, k)
    return _pad(scores, ids, k)
