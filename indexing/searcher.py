"""Search a committed index version by text: the main Python API of Tessera.

::

    from indexing.searcher import Searcher

    searcher = Searcher.open("./tessera-data", "xq-flat")
    hits = searcher.search(["where is the station?"], k=10, lang="de", where="year > 2005")
    # [[("doc-17", 0.83), ("doc-4", 0.79), ...]]

:meth:`Searcher.open` reads an index version written by ``jobs/build_index``::

    <root>/indexes/<name>/vNNNNNN/manifest.json   index_kind, source {set, version, fingerprint, dir},
                                                  dim, params, n_docs, files
    <root>/indexes/<name>/vNNNNNN/index.faiss     dense kinds (flat, ivf, ivfpq, hnsw, int8, binary)
    <root>/indexes/<name>/vNNNNNN/plaid/<key>.npy plaid: one array per CentroidIndex.to_arrays() key
    <root>/indexes/<name>/vNNNNNN/ids.parquet     pos (int64) -> id (string)
    <root>/indexes/<name>/vNNNNNN/ids/*.npy       the same ids as arrays (index_files.read_doc_ids)

The codec of a plaid index is the source set's ``codec.npz``; ``int8``, ``binary``
and ``ivfpq`` rescore their candidates with the set's float16 dense vectors (its
xQG-augmented ones for an index built with ``vectors="augmented"``).

X-MOD query encoders (language adapters) encode each query with its language's
adapter: ``search(..., langs=[...])``, else the ``detector`` given to :meth:`Searcher.open`
(``"script"``, ``"module:function"``), else the set's fallback adapter.

Vectors are immutable, so the query encoder must be the one the documents were
encoded with (same fingerprint), or a query encoder registered as compatible with
the set (``<root>/encoders/<name>/vN/manifest.json`` with ``fingerprint`` and
``compatible_with.fingerprint``). Anything else is refused with
:class:`IncompatibleEncoderError`.

A registered query encoder (written by ``jobs/retune``) can be named instead of
given as a folder: ``query_encoder="NAME"`` (its published version),
``"NAME@v3"`` or ``"NAME:v000003"``. Its files are downloaded once, checked
against their sha256, to ``$TESSERA_CACHE_DIR/encoders/<fingerprint>/``
(default ``~/.cache/tessera``); an existing local folder of that name wins.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedding.encoder import Encoder
from embedding.languages import make_detector
from embedding.model import (
    EncoderSettings,
    ModelError,
    cache_root,
    check_model_dir,
    fingerprint,
    load_model,
    read_settings,
)
from embedding.mrl import truncate
from indexing import dense, index_files
from indexing.index_files import PLAID, DocIds, load_centroid_index, read_doc_ids, read_ids
from indexing.plaid import CentroidIndex, SearchParams
from indexing.threads import ThreadBudget
from storage import layout
from storage.fs import Location
from storage.manifest import Artifact
from storage.vectors import read_dense

logger = logging.getLogger(__name__)

#: Search parameters a caller may override per call, by index family.
DENSE_OVERRIDES = ("nprobe", "ef_search", "rescore")
PLAID_OVERRIDES = ("ncells", "centroid_score_threshold", "ndocs", "exact_tokens", "exact_margin", "exact_gap_quantile",
                   "merge_tokens", "products")
#: Searcher.search encodes this many forward batches' queries before one retrieval: the
#: encoder sorts a block by length, so fewer pad tokens reach the model. 100 XQuAD queries
#: encoded at once took 15-20% less time than in blocks of 64 and 36 (me5-small, 2 CPUs).
SEARCH_BLOCK_BATCHES = 16
_FP_SHOWN = 16
#: Environment variable naming the local cache root (default ``~/.cache/tessera``).
_ENCODER_REF = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127}?)(?:[@:](?P<version>v?\d+))?$")


class IncompatibleEncoderError(ValueError):
    """A query encoder whose vectors do not live in the space of the index's documents."""


# ---- query encoder compatibility ------------------------------------------------------
def is_registered(root: "str | Location", encoder_fingerprint: str, set_fingerprint: str) -> bool:
    """Whether a query encoder version is registered as compatible with a set.

    Scans ``<root>/encoders/*/v*/manifest.json`` for a manifest whose ``fingerprint``
    is ``encoder_fingerprint`` and whose ``compatible_with.fingerprint`` is
    ``set_fingerprint``. Unreadable manifests are skipped with a warning.
    """
    root = layout.resolve_root(root)
    for loc in root.glob(f"encoders/*/v*/{layout.MANIFEST}"):
        try:
            m = json.loads(loc.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            logger.warning("skipping unreadable encoder manifest %s: %s", loc.url, err)
            continue
        compat = m.get("compatible_with") if isinstance(m, dict) else None
        if isinstance(compat, dict) and m.get("fingerprint") == encoder_fingerprint \
                and compat.get("fingerprint") == set_fingerprint:
            logger.info("query encoder %s is registered in %s", encoder_fingerprint[:_FP_SHOWN], loc.url)
            return True
    return False


@dataclass(frozen=True)
class EncoderChoice:
    """A query encoder accepted for an index: folder, settings and fingerprint."""

    path: Path
    settings: EncoderSettings
    fingerprint: str
    registered: bool


def _query_precision(precision: str, choice: EncoderChoice) -> str:
    """``precision`` for the query encoder ``choice`` (see :meth:`Searcher.open`)."""
    if not choice.registered:
        return precision
    if precision in ("bfloat16", "float16"):
        raise ValueError(f"query encoder {choice.path} is a re-tuned encoder: its changes to the weights are "
                         f"below {precision}'s resolution and would round away; serve it in float32")
    return "float32"


def choose_query_encoder(root: Location, index: str, source: dict, set_model: dict,
                         query_encoder: "str | None") -> EncoderChoice:
    """The query encoder to use for an index, checked against its set's fingerprint.

    Parameters
    ----------
    index : the index name (for messages).
    source : the index manifest's ``source`` (set, version, fingerprint).
    set_model : the set manifest's ``model`` (path, settings, fingerprint).
    query_encoder : a local Hugging Face folder, a registered encoder reference
        (``NAME``, ``NAME@vN``, ``NAME:vN``), or None for the set's own model.

    Raises
    ------
    IncompatibleEncoderError
        The encoder's fingerprint is neither the set's nor registered for it.
    ModelError
        The folder is not a usable model folder.
    """
    set_fp = set_model["fingerprint"]
    set_settings = EncoderSettings(**set_model["settings"])
    if query_encoder is None:
        path = _default_model_dir(set_model["path"], source)
        candidates = [set_settings]
    else:
        path, registered = query_encoder_dir(root, query_encoder)
        if registered is not None:
            _check_registered_for(registered, index, source, set_fp)
        # The set's conventions first (same weights, same prefixes = same vectors),
        # then the folder's own settings (how a registered, re-tuned encoder was saved).
        candidates = list(dict.fromkeys([set_settings, read_settings(path)]))
    fps = [fingerprint(path, s) for s in candidates]
    for settings, fp in zip(candidates, fps):
        if fp == set_fp:
            return EncoderChoice(path, settings, fp, registered=False)
        if query_encoder is not None and is_registered(root, fp, set_fp):
            return EncoderChoice(path, settings, fp, registered=True)
    raise IncompatibleEncoderError(
        f"query encoder {path} has fingerprint {fps[-1][:_FP_SHOWN]}, index {index!r} was built from "
        f"set {source['set']!r} {source['version']} whose documents were encoded with "
        f"{set_fp[:_FP_SHOWN]} ({set_model['path']}); refusing: use that model or a query encoder "
        "registered for the set")


def parse_encoder_ref(value: str) -> "tuple[str, str | None] | None":
    """``"NAME"`` → ``(NAME, None)``; ``"NAME@v3"`` / ``"NAME:3"`` → ``(NAME, "v000003")``; else None."""
    m = _ENCODER_REF.match(value) if isinstance(value, str) else None
    if m is None:
        return None
    version = m.group("version")
    return m.group("name"), layout.normalize_version(int(version.lstrip("v"))) if version else None


def encoder_cache_dir() -> Path:
    """Local folder holding downloaded query-encoder versions, by fingerprint."""
    return cache_root() / "encoders"


def query_encoder_dir(root: "str | Location", query_encoder: str) -> "tuple[Path, dict | None]":
    """The local folder of a query encoder given as a folder or a registered reference.

    Returns
    -------
    (folder, manifest): ``manifest`` is the registered version's manifest, None for a folder.

    Raises
    ------
    ModelError
        Neither an existing model folder nor a registered encoder name.
    NotFoundError
        A registered name without that version (or never published, for a bare name).
    """
    if Path(query_encoder).expanduser().is_dir():
        return check_model_dir(Path(query_encoder).expanduser()), None
    ref = parse_encoder_ref(query_encoder)
    root = layout.resolve_root(root)
    if ref is not None and Artifact(root, "encoders", ref[0]).exists():
        return resolve_query_encoder(root, query_encoder)
    from storage.manifest import list_names

    known = ", ".join(list_names(root, "encoders")) or "none"
    raise ModelError(f"query encoder {query_encoder!r} is neither a model folder nor an encoder registered "
                     f"under {root.url}/encoders (registered: {known})")


def resolve_query_encoder(root: "str | Location", ref: str) -> tuple[Path, dict]:
    """Download a registered query-encoder version to the local cache (once) and return it.

    Parameters
    ----------
    ref : ``NAME`` (the published version), ``NAME@vN`` or ``NAME:vN``.

    Returns
    -------
    (folder, manifest): a Hugging Face folder ``transformers`` loads as is, and the version's manifest.

    Raises
    ------
    ValueError
        ``ref`` is not a reference; a downloaded file does not match its sha256.
    NotFoundError
        Unknown encoder or version.
    """
    parsed = parse_encoder_ref(ref)
    if parsed is None:
        raise ValueError(f"invalid query encoder reference {ref!r}: use NAME, NAME@vN or NAME:vN")
    root = layout.resolve_root(root)
    art = Artifact(root, "encoders", parsed[0])
    manifest = art.manifest(parsed[1])
    fp = manifest.get("fingerprint")
    if not isinstance(fp, str) or not re.fullmatch(r"[0-9a-f]{64}", fp):
        raise ValueError(f"encoder {art.name!r} {manifest.get('version')}: manifest has no valid fingerprint")
    folder = encoder_cache_dir() / fp
    if not _cached(folder, fp):
        _download_encoder(art.version_dir(manifest["version"]), manifest, folder)
    logger.info("query encoder %s %s from %s", art.name, manifest["version"], folder)
    return folder, manifest


def _cached(folder: Path, fp: str) -> bool:
    """Whether ``folder`` holds a complete, unaltered copy of the encoder with fingerprint ``fp``."""
    try:
        return folder.is_dir() and fingerprint(folder, read_settings(folder)) == fp
    except ModelError:
        return False


def _download_encoder(vdir: Location, manifest: dict, folder: Path) -> None:
    """Copy every ``files`` entry of the version into ``folder``, checked, then rename into place."""
    entries = manifest.get("files") or []
    if not entries:
        raise ValueError(f"encoder {manifest.get('name')!r} {manifest.get('version')}: manifest lists no files")
    tmp = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        for entry in entries:
            target = tmp / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(index_files.read_checked(vdir, entry))
        if folder.exists():  # a stale or damaged copy: replaced whole
            shutil.rmtree(folder)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not folder.is_dir():  # another process won the race: use its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_registered_for(manifest: dict, index: str, source: dict, set_fp: str) -> None:
    compat = manifest.get("compatible_with") or {}
    if compat.get("fingerprint") != set_fp:
        raise IncompatibleEncoderError(
            f"query encoder {manifest.get('name')!r} {manifest.get('version')} is registered for set "
            f"{compat.get('set')!r} {compat.get('version')} ({str(compat.get('fingerprint'))[:_FP_SHOWN]}), "
            f"but index {index!r} was built from set {source['set']!r} {source['version']} "
            f"({set_fp[:_FP_SHOWN]}); refusing")


def _default_model_dir(path: str, source: dict) -> Path:
    try:
        return check_model_dir(path)
    except ModelError as err:
        raise ModelError(f"{err}; it is the model set {source['set']!r} {source['version']} was "
                         "embedded with: pass query_encoder= to use a copy of it elsewhere") from err


# ---- the two index families -----------------------------------------------------------
def _check_overrides(params: "dict | None", allowed: tuple[str, ...], kind: str) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict, got {type(params).__name__}")
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown search params {unknown} for a {kind} index; allowed: {list(allowed)}")
    return dict(params)


class Backend(Protocol):
    """What :class:`Searcher` needs of an index family (:class:`DenseBackend`, :class:`PlaidBackend`).

    ``index`` is the loaded index (a FAISS index, a :class:`~indexing.plaid.CentroidIndex`).
    """

    index: object

    def encode(self, encoder: Encoder, texts: list[str], langs: "list | None" = None) -> np.ndarray:
        """The query representation this family searches with (rows in the order of ``texts``);
        ``langs``: each query's language (X-MOD encoders), None entries detected."""
        ...

    def search(self, q: np.ndarray, k: int, allowed: "np.ndarray | None",
               overrides: "dict | None", *, split: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, positions)``, both ``(n, k)``, best first; position -1 pads a short row.

        ``allowed``: sorted int64 positions a result may take (None: any); ``overrides``:
        per-call search knobs of the family (``DENSE_OVERRIDES`` / ``PLAID_OVERRIDES``);
        ``split``: a single query's stages may be spread over the threads (plaid).
        """
        ...


class DenseBackend:
    """FAISS search over Matryoshka-truncated single vectors."""

    def __init__(self, index, params: dense.DenseIndexParams, vectors: "np.ndarray | None") -> None:
        self.index, self.params, self.vectors = index, params, vectors

    def encode(self, encoder: Encoder, texts: list[str], langs: "list | None" = None) -> np.ndarray:
        """``(n, dim)`` float32 unit query vectors."""
        return truncate(encoder.encode_queries(texts, langs), self.params.dim)

    def search(self, q: np.ndarray, k: int, allowed: "np.ndarray | None",
               overrides: "dict | None", *, split: bool = True) -> tuple[np.ndarray, np.ndarray]:
        params = dataclasses.replace(self.params, **_check_overrides(overrides, DENSE_OVERRIDES,
                                                                     self.params.kind))
        return dense.search(self.index, params, q, k, vectors=self.vectors, allowed=allowed)


class PlaidBackend:
    """PLAID search over residual-compressed ColBERT token vectors."""

    def __init__(self, index: CentroidIndex, dim: int) -> None:
        self.index, self.dim = index, dim
        self.threads: "int | None" = None

    def encode(self, encoder: Encoder, texts: list[str], langs: "list | None" = None) -> np.ndarray:
        """``(n, query_maxlen, colbert_dim)`` float32 query matrices."""
        return encoder.encode_queries_colbert(texts, langs)

    def search(self, q: np.ndarray, k: int, allowed: "np.ndarray | None",
               overrides: "dict | None", *, split: bool = True) -> tuple[np.ndarray, np.ndarray]:
        params = SearchParams(dim=self.dim, **_check_overrides(overrides, PLAID_OVERRIDES, PLAID))
        # threads=1: one query searched whole, in this thread (a batch still spreads its queries)
        threads = self.threads if split or len(q) > 1 or self.threads is None else 1
        return self.index.search(q, k, params, allowed=allowed, threads=threads)


class _Warm:
    """:meth:`CentroidIndex.warm` in a thread of its own (one BLAS thread), started now;
    :meth:`wait` joins it. A failure is logged, not raised: the first query then loads the
    stages itself (and meets the same error, if there is one, where it can be reported)."""

    def __init__(self, backend: "PlaidBackend") -> None:
        self._seconds = 0.0
        self._thread = threading.Thread(target=self._run, args=(backend,), name="tessera-warm", daemon=True)
        self._thread.start()

    def _run(self, backend: "PlaidBackend") -> None:
        try:
            self._seconds = backend.index.warm(backend.dim)
        except Exception:  # noqa: BLE001 (an optimisation: never the reason an index fails to open)
            logger.warning("loading the PLAID engine's compiled stages ahead of the first query failed",
                           exc_info=True)

    def wait(self) -> float:
        """Seconds the warm-up took (0 when there was nothing to load)."""
        self._thread.join()
        return self._seconds


def _check_count(vdir: Location, what: str, got: int, n_docs: int) -> None:
    if got != n_docs:
        raise ValueError(f"{vdir.url}: {what} holds {got} documents, its ids {n_docs}")


def _load_backend(manifest: dict, vdir: Location, set_manifest: dict,
                  set_dir: Location) -> "tuple[Backend, int | None, pa.StringArray | DocIds]":
    """The index ready to search, the codec's nbits (None for dense kinds) and the ids by label:
    a plaid index's from its memory-mapped id arrays where the version has them
    (:func:`indexing.index_files.read_doc_ids`: a million ids in ~25 ms and ~8 MiB, against
    0.2-0.3 s and ~100 MiB read from Parquet into Python strings), a dense index's from
    ``ids.parquet`` (its rescoring reads the set's vectors by id)."""
    kind, dim = manifest["index_kind"], int(manifest["dim"])
    if kind == PLAID:
        labels = read_doc_ids(vdir, manifest) if index_files.has_id_arrays(manifest) else read_ids(vdir, manifest)
        index = load_centroid_index(vdir, manifest, set_dir, set_manifest)
        _check_count(vdir, "the plaid index (labels)", index.n_docs, len(labels))
        return PlaidBackend(index, dim), index.codec.nbits, labels
    labels = read_ids(vdir, manifest)
    n_docs = len(labels) - labels.null_count
    params = dense.DenseIndexParams.from_dict(manifest["params"])
    if params.kind != kind or params.dim != dim:
        raise ValueError(f"{vdir.url}: params describe a {params.kind} index of dim {params.dim}, "
                         f"the manifest a {kind} index of dim {dim}")
    entries = index_files.entries(manifest, "index")
    if len(entries) != 1:
        raise ValueError(f"{vdir.url}: expected one 'index' file in the manifest, found {len(entries)}")
    index = dense.from_bytes(index_files.read_checked(vdir, entries[0]), kind)
    _check_count(vdir, "index.faiss", int(index.ntotal), n_docs)
    vectors = None
    if kind in dense.RESCORED_KINDS:
        vectors = read_dense(set_dir, set_manifest, labels, manifest.get("vectors", "plain"))
    return DenseBackend(index, params, vectors), None, labels


# ---- the searcher ---------------------------------------------------------------------
def _check_queries(queries: list[str]) -> list[str]:
    if isinstance(queries, str) or not isinstance(queries, (list, tuple)):
        raise ValueError(f"queries must be a list of strings, got {type(queries).__name__}")
    for i, text in enumerate(queries):
        if not isinstance(text, str):
            raise ValueError(f"query {i} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise ValueError(f"query {i} is empty or whitespace only")
    return list(queries)


def _check_text(value: "str | None", name: str) -> "str | None":
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{name} must be a non-empty string or None, got {value!r}")
    return value


class Searcher:
    """Text queries in, ranked document ids out, for one committed index version.

    Build it with :meth:`open`. Attributes describe the index: ``name``,
    ``version``, ``kind``, ``dim``, ``nbits`` (plaid: the codec's, else None),
    ``manifest``, ``set_manifest``, ``encoder`` (the accepted :class:`EncoderChoice`),
    ``budget`` (the :class:`~indexing.threads.ThreadBudget` every search runs under),
    ``batch_size``, ``load_seconds`` (``{"index": s, "model": s}`` spent in :meth:`open`, and for a plaid
    index ``"kernels"``: its compiled stages loaded meanwhile, :meth:`CentroidIndex.warm`)
    and ``search_seconds`` (``{"encode": s, "retrieve": s}`` summed over searches).

    :meth:`search` is two phases, each public for callers that time or reuse them
    (benchmarks): :meth:`encode_queries` then :meth:`retrieve`, whose positions
    :attr:`ids` names; :attr:`backend` is the loaded index family (a :class:`Backend`).
    """

    def __init__(self, root: Location, manifest: dict, set_manifest: dict, backend: Backend, nbits: "int | None",
                 ids: "pa.StringArray | DocIds", encoder: Encoder, choice: EncoderChoice, *,
                 budget: "ThreadBudget | None" = None, load_seconds: "dict | None" = None) -> None:
        self.root, self.manifest, self.set_manifest = root, manifest, set_manifest
        self.name, self.version = manifest["name"], manifest["version"]
        self.kind, self.dim, self.nbits = manifest["index_kind"], int(manifest["dim"]), nbits
        self.encoder = choice
        self._backend, self._encoder = backend, encoder
        # ids by label: a plaid index's memory-mapped (DocIds: results named one by one, the
        # tuple of every id and the Arrow array that filters match against built when first asked
        # for), a dense index's as an Arrow array and a tuple
        self._names: "DocIds | tuple[str | None, ...]" = ids if isinstance(ids, DocIds) else tuple(ids.to_pylist())
        self._arrow: "pa.StringArray | None" = None if isinstance(ids, DocIds) else ids
        self._tuple: "tuple[str | None, ...] | None" = None if isinstance(ids, DocIds) else self._names
        self._n_docs = (ids.n_ids() if isinstance(ids, DocIds) else len(ids) - ids.null_count)
        self._con = None
        self.budget = budget or ThreadBudget()
        self.batch_size = encoder.max_batch
        self.load_seconds = dict(load_seconds or {})
        self.search_seconds = {"encode": 0.0, "retrieve": 0.0}

    @classmethod
    def open(cls, root: "str | Location", index: str, *, version: "str | None" = None,
             query_encoder: "str | None" = None, device: str = "cpu",
             threads: "int | None" = None, batch_size: int = 64,
             detector: "str | None" = None, precision: str = "auto") -> "Searcher":
        """Load an index version, its id map, and a query encoder compatible with it.

        Parameters
        ----------
        root : the store root (local path or s3://).
        index : the index name.
        version : e.g. ``"v000002"``; default the published (current) version.
        query_encoder : a local Hugging Face folder, or a registered query-encoder
            version ``NAME``, ``NAME@vN`` or ``NAME:vN`` (see the module docstring);
            default the model the set was embedded with (``model.path`` in the set manifest).
        device : torch device of the query encoder.
        threads : the process's CPU thread budget, shared by query encoding (torch's
            threads) and retrieval (faiss's OpenMP threads and plaid's queries searched
            at once, BLAS at one thread; a single pre-encoded plaid query, :meth:`retrieve`,
            split over them), one phase at a time so that the pools of one never spin
            against the other; default the CPUs the process may run on.
            See :mod:`indexing.threads`.
        batch_size : queries encoded and retrieved together by :meth:`search`, >= 1.
        detector : X-MOD encoders: the language of a query given without one: ``"none"``
            (default: the set's fallback adapter), ``"script"`` or ``"module:function"``
            (:func:`embedding.languages.make_detector`).
        precision : the query encoder's type (``embedding.model.PRECISIONS``). "auto": the
            set's own model as :func:`embedding.model.resolve_precision` chooses (bfloat16 on
            a GPU and on a CPU that multiplies it natively: one me5-small query in 12 ms
            instead of 20 on 2 AMD EPYC cores); a registered (re-tuned) encoder in float32,
            because its adiabatic changes to the weights are below bfloat16's resolution and
            would round away (asking for half precision with one raises ``ValueError``).

        Raises
        ------
        NotFoundError
            Unknown index (the message lists the known ones) or version, or a missing set.
        IncompatibleEncoderError
            The query encoder does not match the set the index was built from.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        budget = ThreadBudget(threads)
        detect = make_detector(detector)  # a bad name fails before anything loads
        start = time.perf_counter()
        root = layout.resolve_root(root)
        art = Artifact(root, "indexes", layout.check_name(index, "index name"))
        manifest = index_files.index_manifest(art, version)
        source = manifest["source"]
        set_manifest, set_dir = index_files.source_set(root, source)
        choice = choose_query_encoder(root, index, source, set_manifest["model"], query_encoder)
        query_precision = _query_precision(precision, choice)
        vdir = art.version_dir(manifest["version"])
        backend, nbits, ids = _load_backend(manifest, vdir, set_manifest, set_dir)
        warming = None
        if isinstance(backend, PlaidBackend):
            backend.threads = budget.threads
            # the engine's compiled stages loaded while the query encoder loads, not in the first query
            warming = _Warm(backend)
        loaded = time.perf_counter()
        with budget.encoding():
            lm = load_model(choice.path, choice.settings, device=device, precision=query_precision)
        assert lm.fingerprint == choice.fingerprint, "model changed while loading"
        seconds = {"index": loaded - start, "model": time.perf_counter() - loaded}
        if warming is not None:
            seconds["kernels"] = warming.wait()
        logger.info("opened index %s %s (%s, dim %d, %d documents) of set %s %s in %.2f s, query encoder (%s) "
                    "in %.2f s; %d threads", index, manifest["version"], manifest["index_kind"], int(manifest["dim"]),
                    len(ids), source["set"], source["version"], seconds["index"], lm.precision, seconds["model"],
                    budget.threads)
        return cls(root, manifest, set_manifest, backend, nbits, ids,
                   Encoder(lm, max_batch=batch_size, detector=detect), choice, budget=budget, load_seconds=seconds)

    @property
    def precision(self) -> str:
        """The query encoder's type: "float32", "bfloat16" or "float16" (see :meth:`open`)."""
        return self._encoder.lm.precision

    @property
    def n_docs(self) -> int:
        """Documents in the index (labels of removed documents not counted)."""
        return self._n_docs

    @property
    def doc_ids(self) -> list[str]:
        """Ids of the documents in the index, by label (a copy; holes left by removed documents skipped)."""
        return [d for d in self._ids if d is not None]

    @property
    def _ids(self) -> "tuple[str | None, ...]":
        if self._tuple is None:
            self._tuple = tuple(self._names)
        return self._tuple

    @property
    def _id_array(self) -> "pa.StringArray":
        """The ids as Arrow's strings, what a filter's matches are looked up in (built once)."""
        if self._arrow is None:
            self._arrow = self._names.to_arrow()
        return self._arrow

    @property
    def ids(self) -> "tuple[str | None, ...]":
        """The document id of every label (position) of the index, None for a hole: ``ids[p]``
        is the document at position ``p`` of :meth:`retrieve`'s results."""
        return self._ids

    @property
    def backend(self) -> Backend:
        """The loaded index family (:class:`DenseBackend` or :class:`PlaidBackend`); ``backend.index``
        is the index itself."""
        return self._backend

    def encode_queries(self, texts: list[str], langs: "list | None" = None) -> np.ndarray:
        """The texts encoded as this index searches them: ``(n, dim)`` float32 unit vectors (dense
        kinds) or ``(n, query_maxlen, colbert_dim)`` float32 matrices (plaid). ``langs``: each
        text's language, for X-MOD encoders (None entries: detected, else the fallback adapter).

        Runs in the caller's thread settings; :meth:`search` runs it under ``budget.encoding()``.
        """
        return self._backend.encode(self._encoder, texts, langs)

    def retrieve(self, q: np.ndarray, k: int, allowed: "np.ndarray | None" = None,
                 params: "dict | None" = None, *, split: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Search encoded queries (:meth:`encode_queries`): ``(scores, positions)``, ``(n, k)`` each,
        best first, position -1 for none; ``ids[p]`` names position ``p``.

        ``allowed``: sorted int64 positions (:meth:`allowed_positions`), None for all; ``params``
        as in :meth:`search`. Runs in the caller's thread settings; :meth:`search` runs it under
        ``budget.retrieval()``. ``split`` (plaid): a single query spreads its stages over the
        budget's threads; :meth:`search` passes False, because the query was encoded on the
        same threads a moment before and torch's OpenMP workers still spin: on 2 CPUs, XQuAD
        questions against 12,837 sentences, a split search right after the encoding took 10.0 ms
        against 8.6 whole (interleaved in one process), while a pre-encoded one takes 6.6 against 8.2.
        """
        return self._backend.search(q, k, allowed, params, split=split)

    def search(self, queries: list[str], k: int = 10, *, lang: "str | None" = None,
               where: "str | None" = None, params: "dict | None" = None,
               langs: "list | None" = None) -> list[list[tuple[str, float]]]:
        """Top-``k`` documents of each query, best first.

        Parameters
        ----------
        queries : n non-empty texts, in blocks of ``SEARCH_BLOCK_BATCHES * batch_size`` (see
            :meth:`open`): a block is encoded in length-sorted forward passes of ``batch_size``
            queries, then searched in one vectorised index search.
        k : results per query, >= 1 (fewer when fewer documents match).
        lang : only documents of this language (the ``lang`` column of ``documents``).
        where : one boolean expression over the ``documents`` view columns, e.g. ``"year > 2005"``
            (no subquery or table function: see :func:`storage.catalog.check_filter`).
        params : per-call search knobs: ``nprobe``, ``ef_search``, ``rescore`` for dense
            kinds; ``ncells``, ``centroid_score_threshold``, ``ndocs``, ``exact_tokens``, ``exact_margin``,
            ``exact_gap_quantile``, ``merge_tokens``, ``products`` for plaid (see
            :class:`~indexing.plaid.SearchParams`).
        langs : n query languages (X-MOD encoders: each query's adapter; None entries are
            detected, see :meth:`open`); ignored by encoders without adapters. ``lang``
            filters documents, ``langs`` routes queries.

        Returns
        -------
        list of n lists of ``(doc_id, score)``; scores are inner products (dense;
        minus Hamming distances for binary without rescoring) or MaxSim (plaid).

        Raises
        ------
        ValueError
            An empty query (naming its position), a bad ``k``, an invalid filter or params.
        """
        texts = _check_queries(queries)
        if langs is not None and len(langs) != len(texts):
            raise ValueError(f"{len(texts)} queries but {len(langs)} languages")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        allowed = self.allowed_positions(lang=lang, where=where)
        if not texts or (allowed is not None and allowed.size == 0):
            return [[] for _ in texts]
        out: list[list[tuple[str, float]]] = []
        block = self.batch_size * SEARCH_BLOCK_BATCHES
        for begin in range(0, len(texts), block):
            end = begin + block
            out += self._search_batch(texts[begin:end], int(k), allowed, params,
                                      list(langs[begin:end]) if langs is not None else None)
        return out

    def _search_batch(self, texts: list[str], k: int, allowed: "np.ndarray | None",
                      params: "dict | None", langs: "list | None" = None) -> list[list[tuple[str, float]]]:
        """Encode ``texts`` at once, then search their query matrix at once, each phase under the budget."""
        start = time.perf_counter()
        with self.budget.encoding():
            q = self.encode_queries(texts, langs)
        encoded = time.perf_counter()
        with self.budget.retrieval(len(texts)):
            scores, ids = self.retrieve(q, k, allowed, params, split=False)
        self.search_seconds["encode"] += encoded - start
        self.search_seconds["retrieve"] += time.perf_counter() - encoded
        return [[(self._names[p], float(s)) for s, p in zip(srow, prow) if p >= 0]
                for srow, prow in zip(scores, ids)]

    def allowed_positions(self, *, lang: "str | None" = None,
                          where: "str | None" = None) -> "np.ndarray | None":
        """Sorted int64 positions of the documents passing the filters; None without filters.

        ``where`` is checked by :func:`storage.catalog.check_filter` (one boolean expression
        over the ``documents`` columns) and runs on the catalog's read-only connection,
        over the rows of the set version this index was built from.
        """
        from storage.catalog import check_filter, view_columns

        lang, where = _check_text(lang, "lang"), _check_text(where, "where")
        if lang is None and where is None:
            return None
        sql = "SELECT id FROM documents_all WHERE set_name = ? AND version = ?"
        args = [self.manifest["source"]["set"], self.manifest["source"]["version"]]
        if lang is not None:
            sql += " AND lang = ?"
            args.append(lang)
        if where is not None:
            con = self.catalog()
            sql += f" AND ({check_filter(where, view_columns(con, 'documents_all'), con)})"
        matched = self._query_ids(sql, args, where)
        found = pc.index_in(matched, value_set=self._id_array).drop_null()
        positions = np.unique(found.to_numpy(zero_copy_only=False).astype(np.int64))
        logger.debug("filter lang=%r where=%r: %d of %d documents", lang, where, len(positions), self.n_docs)
        return positions

    def catalog(self):
        """The catalog's read-only DuckDB connection, opened once."""
        from storage.catalog import connect

        if self._con is None:
            self._con = connect(self.root)
        return self._con

    def _query_ids(self, sql: str, args: list, where: "str | None") -> pa.Array:
        import duckdb

        from storage.catalog import CatalogError, one_line

        try:
            table = self.catalog().sql(sql, params=args).to_arrow_table()
        except duckdb.Error as err:
            raise CatalogError(f"invalid filter {where!r}: {one_line(err)}") from err
        return table.column("id").combine_chunks().cast(pa.string())
