"""The files of a committed index version, and reading them back.

An index version (written by ``jobs/build_index``) is a folder::

    <root>/indexes/<name>/vNNNNNN/manifest.json   index_kind, source {set, version, fingerprint, dir},
                                                  dim, params, n_docs, files (path, kind, bytes, sha256)
    <root>/indexes/<name>/vNNNNNN/index.faiss     dense kinds
    <root>/indexes/<name>/vNNNNNN/plaid/<key>.npy plaid: one array per CentroidIndex.to_arrays() key
    <root>/indexes/<name>/vNNNNNN/ids.parquet     pos (int64) -> id (string)
    <root>/indexes/<name>/vNNNNNN/ids/offsets.npy the same ids as arrays (kind ``id_arrays``): label p's
    <root>/indexes/<name>/vNNNNNN/ids/utf8.npy    UTF-8 bytes are utf8[offsets[p]:offsets[p + 1]]

Every file is checked against its manifest sha256 before use. PLAID arrays are
memory-mapped: where they lie for a local root, from a local copy made once (named
by its sha256, under ``$TESSERA_CACHE_DIR/indexes``) for s3://. This module needs
no model: :func:`open_centroid_index` serves pre-encoded queries in a process that
never imports torch, and :func:`read_doc_ids` names its results without pyarrow (reading
``ids.parquet`` took ~50 MB resident there; it stays what jobs and DuckDB read).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import uuid
from typing import TYPE_CHECKING, Iterator

import numpy as np

from embedding.codec import ResidualCodec
from indexing.kinds import INDEX_KINDS, PLAID  # noqa: F401 - INDEX_KINDS re-exported
from indexing.plaid import ARRAY_KEYS, DERIVED_KEYS, CentroidIndex
from storage import layout
from storage.fs import Location
from storage.manifest import Artifact, FileEntry, IndexManifest, IndexSource, NotFoundError, SetManifest, file_entry

if TYPE_CHECKING:  # pyarrow (and storage.schemas, which imports it) only where Parquet is read or written
    import pyarrow as pa

logger = logging.getLogger(__name__)

#: manifest kind of the two ``ids/*.npy`` files (:func:`write_ids`, :func:`read_doc_ids`)
ID_ARRAYS = "id_arrays"
_ID_OFFSETS, _ID_UTF8 = "ids/offsets.npy", "ids/utf8.npy"



def _cache_root():
    # Imported here: embedding.model imports torch, which only an s3 index needs.
    from embedding.model import cache_root

    return cache_root()


def file_location(base: Location, path: str) -> Location:
    """A manifest file entry's location: relative to ``base`` unless absolute or a URL."""
    return Location(path) if "://" in path or path.startswith("/") else base.join(path)


def entries(manifest: "SetManifest | IndexManifest", kind: str) -> list[FileEntry]:
    return [e for e in manifest.get("files", []) if e.get("kind") == kind]


def read_checked(base: Location, entry: FileEntry) -> bytes:
    """The bytes of a manifest file entry, checked against its recorded sha256."""
    loc = file_location(base, entry["path"])
    data = loc.read_bytes()
    expected = entry.get("sha256")
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(f"{loc.url}: sha256 does not match the manifest (corrupt or replaced file)")
    return data


def index_manifest(art: Artifact, version: "str | None") -> IndexManifest:
    m = art.manifest(version)
    kind = m.get("index_kind")
    if kind not in INDEX_KINDS:
        raise ValueError(f"index {art.name!r} {m.get('version')}: unknown index_kind {kind!r}; "
                         f"expected one of {', '.join(INDEX_KINDS)}")
    for key in ("source", "dim", "files"):
        if key not in m:
            raise ValueError(f"index {art.name!r} {m.get('version')}: manifest lacks {key!r}")
    return m


def source_set(root: Location, source: IndexSource) -> tuple[SetManifest, Location]:
    """The source set's manifest and version folder (under ``root``, else ``source["dir"]``)."""
    art = Artifact(root, "sets", source["set"])
    try:
        version = art.resolve(source["version"])
        return art.manifest(version), art.version_dir(version)
    except NotFoundError:
        folder = Location(source["dir"]) if source.get("dir") else None
        if folder is None or not folder.join(layout.MANIFEST).exists():
            raise
    logger.info("set %s %s is not under %s; reading it from %s", source["set"], source["version"],
                root.url, folder.url)
    return json.loads(folder.join(layout.MANIFEST).read_text()), folder


def read_codec(set_dir: Location, set_manifest: SetManifest) -> ResidualCodec:
    name = (set_manifest.get("codec") or {}).get("file")
    if name is None:
        raise ValueError(f"set {set_manifest.get('name')!r} {set_manifest.get('version')} has no "
                         "ColBERT codec: a plaid index needs a set embedded with mode colbert or both")
    return ResidualCodec.from_bytes(set_dir.join(name).read_bytes())


def plaid_arrays(vdir: Location, manifest: IndexManifest) -> dict[str, np.ndarray]:
    """``{key: array}`` from the ``plaid/<key>.npy`` files (no pickle), memory-mapped.

    Every file is checked against its manifest sha256 (streamed, not held in
    memory). A local file is mapped where it lies; a remote one is copied once to
    ``$TESSERA_CACHE_DIR/indexes/<sha256>.npy`` and mapped from there, so that
    opening the index again reads nothing from the store but the hashes' inputs.
    """
    arrays = {}
    for entry in entries(manifest, PLAID):
        key = posixpath.basename(entry["path"]).removesuffix(".npy")
        arrays[key] = np.load(local_npy(vdir, entry), mmap_mode="r", allow_pickle=False)
    return arrays


def local_npy(base: Location, entry: FileEntry) -> str:
    """A local path holding the bytes of ``entry``, checked against its sha256."""
    loc = file_location(base, entry["path"])
    expected = entry.get("sha256")
    if not expected:
        raise ValueError(f"{loc.url}: the manifest records no sha256 for this index file")
    if not loc.is_remote:
        if loc.sha256() != expected:
            raise ValueError(f"{loc.url}: sha256 does not match the manifest (corrupt or replaced file)")
        return loc.path
    cached = _cache_root() / "indexes" / f"{expected}.npy"
    if cached.exists():
        if Location(str(cached)).sha256() == expected:
            return str(cached)
        logger.warning("cached copy of %s is corrupt; downloading it again", loc.url)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{uuid.uuid4().hex}.partial")
    try:
        digest = hashlib.sha256()
        with loc.open("rb") as src, open(tmp, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 22), b""):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != expected:
            raise ValueError(f"{loc.url}: sha256 does not match the manifest (corrupt or replaced file)")
        os.replace(tmp, cached)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("cached %s locally as %s", loc.url, cached)
    return str(cached)


def _int64s(column: "pa.ChunkedArray", what: str) -> np.ndarray:
    """An integer column without nulls as int64 numpy values, read from Arrow's buffer:
    pyarrow's ``to_numpy`` imports pandas (~40 MB resident in a serving process that has
    no other use for it)."""
    import pyarrow as pa

    values = column.combine_chunks()
    if values.null_count or not pa.types.is_integer(values.type):
        raise ValueError(f"{what}: expected integers without nulls, got {values.type} ({values.null_count} nulls)")
    if values.type != pa.int64():
        values = values.cast(pa.int64())
    return np.frombuffer(values.buffers()[1], dtype=np.int64, count=len(values), offset=values.offset * 8)


def read_ids(vdir: Location, manifest: IndexManifest) -> "pa.StringArray":
    """Document ids by label, ``(n_labels,)``, from the version's ``ids.parquet``.

    A full build labels its documents ``0..n-1``. An index updated in place by a
    re-index keeps every surviving document's label, so removed documents leave
    holes (null ids) and new ones are labelled from ``n_labels`` of the parent on.
    """
    import pyarrow as pa

    from storage import schemas

    entry = (entries(manifest, "ids") or [{"path": "ids.parquet"}])[0]
    table = schemas.read_table(file_location(vdir, entry["path"]), columns=["pos", "id"])
    pos = _int64s(table.column("pos"), f"{vdir.url}/ids.parquet: pos")
    if len(pos) and np.any(np.diff(pos) < 0):  # written in order; sorted here only if not (numpy:
        order = np.argsort(pos, kind="stable")  # Arrow's sort loads its compute kernels, ~11 MB)
        table, pos = table.take(pa.array(order)), pos[order]
    n_docs = manifest.get("n_docs")
    if n_docs is not None and n_docs != len(pos):
        raise ValueError(f"{vdir.url}: ids.parquet has {len(pos)} rows, the manifest says {n_docs} documents")
    n_labels = int(manifest.get("n_labels", len(pos)))
    if len(pos) and (pos[0] < 0 or pos[-1] >= n_labels or np.any(np.diff(pos) <= 0)):
        raise ValueError(f"{vdir.url}/ids.parquet: labels are not unique values in 0..{n_labels - 1}")
    ids = table.column("id").combine_chunks()
    if len(pos) == n_labels:
        return ids
    out = np.full(n_labels, None, dtype=object)
    out[pos] = ids.to_numpy(zero_copy_only=False)
    return pa.array(out, pa.string())


def open_centroid_index(root: "str | Location", index: str, version: "str | None" = None
                        ) -> tuple[CentroidIndex, IndexManifest]:
    """The PLAID index of a committed version, memory-mapped, with no query encoder.

    Parameters
    ----------
    root : the store root (local path or s3://).
    index : the index name (a plaid index).
    version : default the published version.

    Returns
    -------
    (CentroidIndex, IndexManifest)
        The index (positions are the labels of ``ids.parquet``) and its manifest.
    """
    art = Artifact(layout.resolve_root(root), "indexes", layout.check_name(index, "index name"))
    manifest = index_manifest(art, version)
    if manifest["index_kind"] != PLAID:
        raise ValueError(f"index {index!r} is a {manifest['index_kind']} index, not {PLAID}")
    set_manifest, set_dir = source_set(art.root, manifest["source"])
    return load_centroid_index(art.version_dir(manifest["version"]), manifest, set_dir, set_manifest), manifest


def load_centroid_index(vdir: Location, manifest: IndexManifest, set_dir: Location,
                        set_manifest: SetManifest) -> CentroidIndex:
    """The PLAID index of version folder ``vdir``, memory-mapped, with its set's codec."""
    codec = read_codec(set_dir, set_manifest)
    # The files passed their manifest sha256: only shapes are checked, so the
    # memory-mapped arrays are not read whole at load.
    return CentroidIndex.from_arrays(codec, plaid_arrays(vdir, manifest), check=False)


# ---- writing a version ---------------------------------------------------------------------
_CHUNK_BYTES = 1 << 24  # bytes per streamed write
_IVF_BLOCK = 1 << 22  # inverted-list entries merged at a time


def put_file(vdir: Location, path: str, data: bytes, kind: str, rows: int) -> FileEntry:
    """Write ``data`` to ``vdir/path``; its manifest entry."""
    loc = vdir.join(path)
    loc.write_bytes(data)
    return file_entry(loc, vdir, kind=kind, rows=rows, nbytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def write_ids(ids: "pa.StringArray", vdir: Location, labels: "np.ndarray | None" = None,
              n_labels: "int | None" = None) -> list[FileEntry]:
    """``ids.parquet`` (label → document id; labels ``0..n-1`` unless given, ascending) and
    the same ids as the two ``ids/*.npy`` arrays of :func:`read_doc_ids` (``n_labels``
    labels, default one past the last; a label without an id is a hole). Their entries."""
    import pyarrow as pa

    from storage import schemas

    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    pos = np.arange(len(ids), dtype=np.int64) if labels is None else np.asarray(labels, np.int64)
    n_labels = int(pos[-1]) + 1 if n_labels is None and len(pos) else int(n_labels or 0)
    if len(pos) != len(ids) or (len(pos) and (pos[0] < 0 or pos[-1] >= n_labels or np.any(np.diff(pos) <= 0))):
        raise ValueError(f"{vdir.url}: {len(ids)} ids need {len(ids)} ascending labels in 0..{n_labels - 1}")
    ids = ids.cast(pa.string())
    if ids.null_count:
        raise ValueError(f"{vdir.url}: null id at label {int(pos[ids.is_null().to_numpy(zero_copy_only=False)][0])}")
    offsets, utf8 = _id_arrays(ids, pos, n_labels)
    empty = np.diff(offsets)[pos] == 0
    if np.any(empty):  # (a hole is an empty span: an id is never empty, storage.corpus refuses those)
        raise ValueError(f"{vdir.url}: empty id at label {int(pos[np.argmax(empty)])}")
    table = pa.table({"pos": pa.array(pos), "id": ids})
    info = schemas.write_table(vdir.join("ids.parquet"), table)
    out = [file_entry(vdir.join("ids.parquet"), vdir, kind="ids", rows=info["rows"], nbytes=info["bytes"],
                      sha256=info["sha256"])]
    for path, array in ((_ID_OFFSETS, offsets), (_ID_UTF8, utf8)):
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        out.append(put_file(vdir, path, buf.getvalue(), ID_ARRAYS, len(array)))
    return out


def _id_arrays(ids: "pa.StringArray", pos: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Arrow's own layout of ``ids`` (strings without nulls: int32 offsets into one UTF-8
    buffer) spread over ``n_labels`` labels, ``ids[i]`` at label ``pos[i]`` (ascending): the
    int64 offsets of :class:`DocIds` (a label without an id an empty span) and the bytes."""
    ends = np.frombuffer(ids.buffers()[1], dtype=np.int32, count=len(ids) + 1, offset=ids.offset * 4) \
        if len(ids) else np.zeros(1, np.int32)
    offsets = np.zeros(n_labels + 1, dtype=np.int64)
    offsets[pos + 1] = np.diff(ends)
    np.cumsum(offsets, out=offsets)
    data = ids.buffers()[2] if len(ids) else None  # (None too where every id is empty)
    utf8 = np.frombuffer(data, dtype=np.uint8)[int(ends[0]):int(ends[-1])] if data is not None \
        else np.zeros(0, np.uint8)
    return offsets, utf8


class DocIds:
    """Document ids by label, as :func:`read_doc_ids` reads them: ``ids[p]`` is label ``p``'s
    id (None for a hole, see :func:`read_ids`), decoded when asked for; the arrays may be
    memory-mapped, so a process holds only the pages of the ids it names. ``n_ids``: the
    count of labels with an id where the caller has it (else counted when first asked for)."""

    def __init__(self, offsets: np.ndarray, utf8: np.ndarray, n_ids: "int | None" = None) -> None:
        self.offsets, self.utf8 = offsets, utf8
        self._n_ids = n_ids

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, label: int) -> "str | None":
        n = len(self)
        p = int(label) + n if int(label) < 0 else int(label)
        if not 0 <= p < n:
            raise IndexError(f"label {label} out of range for {n} labels")
        lo, hi = int(self.offsets[p]), int(self.offsets[p + 1])
        return self.utf8[lo:hi].tobytes().decode("utf-8") if hi > lo else None

    def __iter__(self) -> Iterator["str | None"]:
        return iter(self.to_pylist())

    def n_ids(self) -> int:
        """Labels that name a document (holes not counted)."""
        if self._n_ids is None:
            self._n_ids = int(np.count_nonzero(np.diff(self.offsets)))
        return self._n_ids

    def to_arrow(self) -> "pa.StringArray":
        """The ids as Arrow strings (holes null), built from the two arrays' bytes, as
        :func:`read_ids` reads them from ``ids.parquet``."""
        import pyarrow as pa

        valid = np.diff(self.offsets) > 0
        bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if not valid.all() else None
        large = pa.LargeStringArray.from_buffers(len(self), pa.py_buffer(np.ascontiguousarray(self.offsets)),
                                                 pa.py_buffer(np.ascontiguousarray(self.utf8)), bitmap)
        return large.cast(pa.string())

    def to_pylist(self) -> "list[str | None]":
        data, offsets = self.utf8.tobytes(), self.offsets.tolist()
        return [data[lo:hi].decode("utf-8") if hi > lo else None for lo, hi in zip(offsets, offsets[1:])]


def has_id_arrays(manifest: IndexManifest) -> bool:
    """The version holds its ids as the two ``ids/*.npy`` arrays (written since the
    thirty-eighth session; older versions only ``ids.parquet``)."""
    return {e["path"] for e in entries(manifest, ID_ARRAYS)} == {_ID_OFFSETS, _ID_UTF8}


def read_doc_ids(vdir: Location, manifest: IndexManifest) -> DocIds:
    """The version's document ids by label (:func:`read_ids`' ids) from its ``ids/*.npy``
    arrays, memory-mapped (sha256-checked; an s3 index's copied once to the local cache as
    :func:`plaid_arrays`' are), so naming results needs no pyarrow. A version written before
    the arrays existed has only ``ids.parquet``: read with pyarrow then."""
    if not has_id_arrays(manifest):
        import pyarrow as pa

        ids = read_ids(vdir, manifest)
        valid = np.asarray(ids.is_valid().to_numpy(zero_copy_only=False), bool)
        return DocIds(*_id_arrays(ids.drop_null().cast(pa.string()), np.flatnonzero(valid), len(ids)))
    found = {e["path"]: e for e in entries(manifest, ID_ARRAYS)}
    offsets, utf8 = (np.load(local_npy(vdir, found[p]), mmap_mode="r", allow_pickle=False)
                     for p in (_ID_OFFSETS, _ID_UTF8))
    n_labels = int(manifest.get("n_labels", manifest.get("n_docs", len(offsets) - 1)))
    spans = np.diff(offsets) if offsets.ndim == 1 else None
    bad = (offsets.dtype != np.int64 or utf8.dtype != np.uint8 or spans is None or utf8.ndim != 1
           or len(offsets) != n_labels + 1 or (len(offsets) and (offsets[0] != 0 or offsets[-1] != len(utf8)))
           or np.any(spans < 0))
    if bad:
        raise ValueError(f"{vdir.url}/{_ID_OFFSETS}: not the offsets of {n_labels} ids into {_ID_UTF8}")
    ids = DocIds(offsets, utf8, n_ids=int(np.count_nonzero(spans)))
    n_docs = manifest.get("n_docs")
    if n_docs is not None and ids.n_ids() != n_docs:
        raise ValueError(f"{vdir.url}/{_ID_OFFSETS}: the manifest says {n_docs} documents")
    return ids


def write_plaid(index: CentroidIndex, vdir: Location) -> list[FileEntry]:
    """``plaid/<key>.npy`` files of a centroid index (no pickle); their manifest entries."""
    return write_plaid_parts([index.to_arrays()], vdir)


def write_plaid_parts(parts: "list[dict[str, np.ndarray]]", vdir: Location) -> list[FileEntry]:
    """The ``plaid/<key>.npy`` files of the concatenation of ``parts``, streamed.

    ``parts`` are :meth:`CentroidIndex.to_arrays` of indexes built with one codec
    (e.g. one per shard, memory-mapped or in Ray's object store); the files hold
    exactly the arrays of :meth:`CentroidIndex.from_parts` over them, but no merged
    array is ever built: each file is written part by part (the inverted lists a
    block of centroids at a time), so memory stays bounded by a part, not the corpus.
    """
    if not parts:
        raise ValueError("no index parts to write")
    missing = [(i, k) for i, p in enumerate(parts) for k in ARRAY_KEYS + DERIVED_KEYS if k not in p]
    if missing:
        raise ValueError(f"index parts lack arrays (part, key): {missing[:5]}")
    n_docs = [len(p["doc_offsets"]) - 1 for p in parts]
    doc_shift = np.cumsum([0] + n_docs, dtype=np.int64)
    if doc_shift[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"at most {np.iinfo(np.int32).max} documents per index, got {doc_shift[-1]}")
    token_shift = np.cumsum([0] + [len(p["codes"]) for p in parts], dtype=np.int64)
    cell_shift = np.cumsum([0] + [len(p["doc_cells"]) for p in parts], dtype=np.int64)
    streams = {
        "doc_offsets": _offsets_stream(parts, "doc_offsets", token_shift),
        "doc_cell_offsets": _offsets_stream(parts, "doc_cell_offsets", cell_shift),
        "ivf_offsets": _whole(sum(np.asarray(p["ivf_offsets"], np.int64) for p in parts)),
        "ivf_docs": _ivf_docs_stream(parts, doc_shift),
    }
    for key in ("codes", "residuals", "doc_cells", "token_inv_norms"):
        streams[key] = _concat_stream(parts, key)
    out = []
    for key in ARRAY_KEYS + DERIVED_KEYS:
        dtype, shape, chunks = streams[key]
        loc = vdir.join(f"{PLAID}/{key}.npy")
        header = _npy_header(dtype, shape)
        nbytes, sha = loc.write_stream(lambda: _as_bytes(header, chunks()))
        out.append(file_entry(loc, vdir, kind=PLAID, rows=shape[0], nbytes=nbytes, sha256=sha))
    return out


def _npy_header(dtype: np.dtype, shape: tuple) -> bytes:
    """The header ``np.save`` writes for an array of ``dtype`` and ``shape``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _as_bytes(header: bytes, arrays) -> "Iterator[bytes]":
    yield header
    for arr in arrays:
        arr = np.ascontiguousarray(arr)
        flat = arr.reshape(-1).view(np.uint8) if arr.size else np.empty(0, np.uint8)
        for lo in range(0, len(flat), _CHUNK_BYTES):
            yield flat[lo:lo + _CHUNK_BYTES].tobytes()


def _row_slices(n: int, row_bytes: int) -> "Iterator[slice]":
    step = max(1, _CHUNK_BYTES // max(1, row_bytes))
    for lo in range(0, n, step):
        yield slice(lo, min(n, lo + step))


def _whole(arr: np.ndarray):
    return arr.dtype, arr.shape, lambda: iter([arr])


def _concat_stream(parts, key: str):
    first = np.asarray(parts[0][key])
    dtypes = {np.asarray(p[key]).dtype for p in parts}
    if len(dtypes) > 1:
        raise ValueError(f"index parts disagree on the dtype of {key!r}: {sorted(map(str, dtypes))}")
    shape = (sum(len(p[key]) for p in parts),) + first.shape[1:]

    def chunks():
        for p in parts:
            arr = p[key]
            row = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
            for sl in _row_slices(len(arr), row):
                yield arr[sl]
    return first.dtype, shape, chunks


def _offsets_stream(parts, key: str, shift: np.ndarray):
    n = sum(len(p[key]) - 1 for p in parts) + 1

    def chunks():
        yield np.zeros(1, np.int64)
        for p, s in zip(parts, shift):
            tail = p[key][1:]
            for sl in _row_slices(len(tail), 8):
                yield np.asarray(tail[sl], np.int64) + s
    return np.dtype(np.int64), (n,), chunks


def _ivf_docs_stream(parts, doc_shift: np.ndarray):
    """Merged inverted lists: list ``c`` is every part's list ``c`` in part order (positions shifted)."""
    offsets = [np.asarray(p["ivf_offsets"], np.int64) for p in parts]
    merged = sum(offsets)
    n_centroids = len(merged) - 1

    def chunks():
        c0 = 0
        while c0 < n_centroids:
            c1 = int(np.searchsorted(merged, merged[c0] + _IVF_BLOCK, side="right")) - 1
            c1 = min(n_centroids, max(c0 + 1, c1))
            cells, docs = [], []
            for p, off, s in zip(parts, offsets, doc_shift):
                counts = np.diff(off[c0:c1 + 1])
                cells.append(np.repeat(np.arange(c0, c1, dtype=np.int64), counts))
                docs.append(np.asarray(p["ivf_docs"][off[c0]:off[c1]], np.int64) + s)
            cells_a, docs_a = np.concatenate(cells), np.concatenate(docs)
            # Parts hold increasing position ranges: a stable sort by cell keeps every list sorted.
            yield docs_a[np.argsort(cells_a, kind="stable")].astype(np.int32)
            c0 = c1
    return np.dtype(np.int32), (int(merged[-1]),), chunks
