"""The files of a committed index version, and reading them back.

An index version (written by ``jobs/build_index``) is a folder::

    <root>/indexes/<name>/vNNNNNN/manifest.json   index_kind, source {set, version, fingerprint, dir},
                                                  dim, params, n_docs, files (path, kind, bytes, sha256)
    <root>/indexes/<name>/vNNNNNN/index.faiss     dense kinds
    <root>/indexes/<name>/vNNNNNN/plaid/<key>.npy plaid: one array per CentroidIndex.to_arrays() key
    <root>/indexes/<name>/vNNNNNN/ids.parquet     pos (int64) -> id (string)

Every file is checked against its manifest sha256 before use. PLAID arrays are
memory-mapped: where they lie for a local root, from a local copy made once (named
by its sha256, under ``$TESSERA_CACHE_DIR/indexes``) for s3://. This module needs
no model: :func:`open_centroid_index` serves pre-encoded queries in a process that
never imports torch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import uuid

import numpy as np
import pyarrow as pa

from embedding.codec import ResidualCodec
from indexing import dense
from indexing.plaid import CentroidIndex
from storage import layout, schemas
from storage.fs import Location
from storage.manifest import Artifact, NotFoundError

logger = logging.getLogger(__name__)

PLAID = "plaid"
INDEX_KINDS = dense.KINDS + (PLAID,)


def _cache_root():
    # Imported here: embedding.model imports torch, which only an s3 index needs.
    from embedding.model import cache_root

    return cache_root()


def file_location(base: Location, path: str) -> Location:
    """A manifest file entry's location: relative to ``base`` unless absolute or a URL."""
    return Location(path) if "://" in path or path.startswith("/") else base.join(path)


def entries(manifest: dict, kind: str) -> list[dict]:
    return [e for e in manifest.get("files", []) if e.get("kind") == kind]


def read_checked(base: Location, entry: dict) -> bytes:
    """The bytes of a manifest file entry, checked against its recorded sha256."""
    loc = file_location(base, entry["path"])
    data = loc.read_bytes()
    expected = entry.get("sha256")
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(f"{loc.url}: sha256 does not match the manifest (corrupt or replaced file)")
    return data


def index_manifest(art: Artifact, version: "str | None") -> dict:
    m = art.manifest(version)
    kind = m.get("index_kind")
    if kind not in INDEX_KINDS:
        raise ValueError(f"index {art.name!r} {m.get('version')}: unknown index_kind {kind!r}; "
                         f"expected one of {', '.join(INDEX_KINDS)}")
    for key in ("source", "dim", "files"):
        if key not in m:
            raise ValueError(f"index {art.name!r} {m.get('version')}: manifest lacks {key!r}")
    return m


def source_set(root: Location, source: dict) -> tuple[dict, Location]:
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


def read_codec(set_dir: Location, set_manifest: dict) -> ResidualCodec:
    name = (set_manifest.get("codec") or {}).get("file")
    if name is None:
        raise ValueError(f"set {set_manifest.get('name')!r} {set_manifest.get('version')} has no "
                         "ColBERT codec: a plaid index needs a set embedded with mode colbert or both")
    return ResidualCodec.from_bytes(set_dir.join(name).read_bytes())


def plaid_arrays(vdir: Location, manifest: dict) -> dict[str, np.ndarray]:
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


def local_npy(base: Location, entry: dict) -> str:
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


def read_ids(vdir: Location, manifest: dict) -> pa.StringArray:
    """Document ids by label, ``(n_labels,)``, from the version's ``ids.parquet``.

    A full build labels its documents ``0..n-1``. An index updated in place by a
    re-index keeps every surviving document's label, so removed documents leave
    holes (null ids) and new ones are labelled from ``n_labels`` of the parent on.
    """
    entry = (entries(manifest, "ids") or [{"path": "ids.parquet"}])[0]
    table = schemas.read_table(file_location(vdir, entry["path"]), columns=["pos", "id"]).sort_by("pos")
    pos = table.column("pos").to_numpy()
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
                        ) -> tuple[CentroidIndex, dict]:
    """The PLAID index of a committed version, memory-mapped, with no query encoder.

    Parameters
    ----------
    root : the store root (local path or s3://).
    index : the index name (a plaid index).
    version : default the published version.

    Returns
    -------
    (CentroidIndex, dict)
        The index (positions are the labels of ``ids.parquet``) and its manifest.
    """
    art = Artifact(layout.resolve_root(root), "indexes", layout.check_name(index, "index name"))
    manifest = index_manifest(art, version)
    if manifest["index_kind"] != PLAID:
        raise ValueError(f"index {index!r} is a {manifest['index_kind']} index, not {PLAID}")
    set_manifest, set_dir = source_set(art.root, manifest["source"])
    return load_centroid_index(art.version_dir(manifest["version"]), manifest, set_dir, set_manifest), manifest


def load_centroid_index(vdir: Location, manifest: dict, set_dir: Location, set_manifest: dict) -> CentroidIndex:
    """The PLAID index of version folder ``vdir``, memory-mapped, with its set's codec."""
    codec = read_codec(set_dir, set_manifest)
    # The files passed their manifest sha256: only shapes are checked, so the
    # memory-mapped arrays are not read whole at load.
    return CentroidIndex.from_arrays(codec, plaid_arrays(vdir, manifest), check=False)
