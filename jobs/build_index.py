"""The index job: a committed embedding set version → an index version. Never re-encodes.

Dense kinds (``flat``, ``ivf``, ``ivfpq``, ``hnsw``, ``int8``, ``binary``): a training
sample is drawn from the shards, the index is trained once (on a GPU worker when
the cluster has one and faiss-gpu is installed), every shard is added to a copy of
the trained empty index in its own Ray task, and the parts are merged in shard
order. HNSW graphs cannot be merged, so one task adds the shards in order.

``plaid``: every ``tokens`` shard becomes a centroid-index part in its own task,
reusing the set's codec; the parts are concatenated.

``vectors="augmented"`` builds from the set's xQG-augmented vectors (``dense_aug`` /
``tokens_aug`` files, same schemas and codec) instead of the plain ones; the manifest
records it (``vectors``) and search reads the matching vectors for rescoring.

The version holds ``index.faiss`` or ``plaid/*.npy``, ``ids.parquet`` (positional
id → document id; the same ids as ``ids/*.npy`` arrays for a serving process without
pyarrow, ``indexing.index_files.read_doc_ids``) and a manifest naming the exact set
version, codec and model fingerprint.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import asdict, dataclass

import numpy as np

from indexing.index_files import put_file, write_ids
from jobs.runtime import arrow_pool, init_ray
from jobs.timing import Timings
from storage import layout, sets, vectors
from storage.fs import Location
from storage.manifest import Artifact, NotFoundError, utcnow

logger = logging.getLogger(__name__)

DENSE_KINDS = ("flat", "ivf", "ivfpq", "hnsw", "int8", "binary")
KINDS = DENSE_KINDS + ("plaid",)


@dataclass(frozen=True)
class IndexConfig:
    """One index build. ``dim`` None = the set's full dimension; ``name`` None = ``<set>-<kind>[-<dim>]``;
    ``vectors``: ``"plain"`` or ``"augmented"`` (the set's xQG-augmented vectors)."""

    set_name: str
    kind: str
    root: "str | None" = None
    set_version: "str | None" = None
    dim: "int | None" = None
    name: "str | None" = None
    nlist: "int | None" = None
    pq_m: "int | None" = None
    pq_nbits: int = 8
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    nprobe: int = 16
    rescore: int = 10
    train_size: int = 200_000
    seed: int = 0
    publish: bool = True
    vectors: str = "plain"

    def __post_init__(self) -> None:
        layout.check_name(self.set_name, "set name")
        layout.vector_kind("dense", self.vectors)
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.train_size < 1:
            raise ValueError(f"train_size must be >= 1, got {self.train_size}")
        layout.check_name(self.index_name, "index name")

    @property
    def index_name(self) -> str:
        return self.name or f"{self.set_name}-{self.kind}" + (f"-{self.dim}" if self.dim else "")

    def dense_params(self, dim: int):
        from indexing.dense import DenseIndexParams

        return DenseIndexParams(kind=self.kind, dim=dim, nlist=self.nlist, pq_m=self.pq_m, pq_nbits=self.pq_nbits,
                                hnsw_m=self.hnsw_m, ef_construction=self.ef_construction, ef_search=self.ef_search,
                                nprobe=self.nprobe, rescore=self.rescore)


def run(cfg: IndexConfig) -> dict:
    """Build, commit and (by default) publish the index; return its manifest."""
    set_art = Artifact(layout.resolve_root(cfg.root), "sets", cfg.set_name)
    with _set_lease(set_art, cfg):
        return _run(cfg)


def _run(cfg: IndexConfig) -> dict:
    timings = Timings()
    root = layout.resolve_root(cfg.root)
    set_art = Artifact(root, "sets", cfg.set_name)
    set_version = set_art.resolve(cfg.set_version)
    set_manifest = set_art.manifest(set_version)
    set_dir = set_art.version_dir(set_version)
    want = layout.vector_kind("tokens" if cfg.kind == "plaid" else "dense", cfg.vectors)
    files = sets.set_files(set_dir, set_manifest, want)
    stored = set_manifest["dims"]["colbert" if cfg.kind == "plaid" else "dense"]
    if stored is None or not files:
        how = "without passage augmentation (--augment-*), or " if cfg.vectors == "augmented" else ""
        raise NotFoundError(f"set {cfg.set_name} {set_version} has no {want} vectors "
                            f"(it was embedded {how}with --mode {set_manifest['config']['mode']})")
    dim = cfg.dim or stored
    if dim > stored:
        raise ValueError(f"dimension {dim} is above the stored dimension {stored} of set {cfg.set_name}")
    rows = [f.live_rows for f in files]
    init_ray()
    art = Artifact(root, "indexes", cfg.index_name)
    version, _ = art.claim(f"{cfg.set_name}/{set_version}/{cfg}", {"host": socket.gethostname(), "pid": os.getpid()})
    vdir = art.version_dir(version)
    if cfg.kind == "plaid":
        with timings("build"):
            entries, params, n_bytes = _build_plaid(set_manifest, set_dir, files, vdir)
    else:
        entries, params, n_bytes = _build_dense(cfg, dim, files, rows, vdir, timings)
    with timings("ids"):
        entries.extend(write_ids(sets.live_ids(files), vdir))
    manifest = {
        "index_kind": cfg.kind, "dim": dim, "params": params, "n_docs": int(sum(rows)),
        "source": {"set": cfg.set_name, "version": set_version, "dir": set_dir.url,
                   "fingerprint": set_manifest["model"]["fingerprint"], "stored_dim": stored,
                   "codec": set_manifest.get("codec") if cfg.kind == "plaid" else None},
        "config": config_dict(cfg), "files": entries, "index_bytes": n_bytes,
        "bytes_per_document": n_bytes / max(1, sum(rows)), "timings": timings.to_dict(), "created_at": utcnow(),
        **({"vectors": cfg.vectors} if cfg.vectors != "plain" else {}),
    }
    manifest = art.commit(version, manifest)
    if cfg.publish:
        publish_index(root, cfg.set_name, set_version, art, version)
    return manifest


def config_dict(cfg: IndexConfig) -> dict:
    """The manifest's ``config``; ``vectors`` only when not plain (plain builds keep their keys)."""
    d = asdict(cfg)
    if d["vectors"] == "plain":
        del d["vectors"]
    return d


@contextlib.contextmanager
def _set_lease(set_art: Artifact, cfg: IndexConfig):
    """Hold the set's lease while building when publishing will move a pin in its ``CURRENT``.

    A set published by ``tessera reindex`` pins its indexes; moving a pin rewrites the set's
    ``CURRENT``, so it must not interleave with a re-index, rollback or gc of the set (the
    later write would drop the other's change). A held lease fails fast (LeaseHeld, exit 5)
    before anything is built.
    """
    if not cfg.publish or "indexes" not in (set_art.pointer() or {}):
        yield
        return
    from storage.lease import Lease

    lease = Lease.acquire(set_art.loc.join(layout.LEASE), {"job": "index", "index": cfg.index_name})
    lease.start_heartbeat()
    try:
        yield
    finally:
        try:
            lease.release()
        except Exception as err:  # the index is published; the lease expires on its own
            logger.warning("could not release the lease of set %s: %s", cfg.set_name, err)


def publish_index(root: Location, set_name: str, set_version: str, art: Artifact, version: str) -> None:
    """Make a freshly built index current.

    When the set's ``CURRENT`` pins indexes (it was published by ``tessera reindex``
    or ``rollback``) and this index is built on the set's current version, the pin is
    moved too; an index on another set version is committed and its own pointer
    moved, but the set's pin (if any) keeps deciding what readers see.
    """
    from storage.manifest import pinned_index

    art.publish(version, set_name=set_name)
    sets_art = Artifact(root, "sets", set_name)
    ptr = sets_art.pointer() or {}
    if "indexes" not in ptr:
        return
    if ptr.get("version") == set_version:
        sets_art.publish(set_version, indexes={**ptr["indexes"], art.name: version})
    elif pinned_index(ptr, art.name):
        logger.warning("index %s %s is built on %s %s, not on its current version %s: the set keeps "
                       "%s %s current", art.name, version, set_name, set_version, ptr.get("version"),
                       art.name, pinned_index(ptr, art.name))


# ---- dense ------------------------------------------------------------------------------
def read_dense(f: sets.SetFile, dim: int) -> np.ndarray:
    """The live vectors of one ``dense`` file, truncated to ``dim`` (float32, unit rows)."""
    from embedding.mrl import truncate

    return truncate(vectors.dense_file(f)[1], dim)


def _sample_shard(f: sets.SetFile, dim: int, take: int, seed: int) -> np.ndarray:
    arrow_pool()  # the tasks that read Parquet: on a cluster's own Ray too (see jobs.runtime)
    x = read_dense(f, dim)
    if take >= len(x):
        return x
    return x[np.sort(np.random.default_rng(seed).choice(len(x), take, replace=False))]


def _add_shards(trained: bytes, kind: str, params: dict, files: list, starts: list[int], dim: int) -> bytes:
    from indexing import dense

    arrow_pool()
    index = dense.from_bytes(trained, kind)
    for f, start in zip(files, starts):
        dense.add(index, read_dense(f, dim), start)
    return dense.to_bytes(index)


def _train(params_dict: dict, sample_refs: list) -> bytes:
    """Ray task: train the empty index on the shards' samples."""
    import ray

    from indexing import dense

    sample = np.concatenate(ray.get(sample_refs))
    return dense.to_bytes(dense.train(dense.DenseIndexParams.from_dict(params_dict), sample))


def _build_dense(cfg: IndexConfig, dim: int, files: list, rows: list[int], vdir: Location,
                 timings: Timings) -> tuple[list[dict], dict, int]:
    import ray

    total = sum(rows)
    params = cfg.dense_params(dim)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    with timings("sample"):  # the sample stays in the object store: the driver holds no vectors
        share = min(1.0, cfg.train_size / max(total, 1))
        takes = [max(1, int(round(r * share))) for r in rows]
        task = ray.remote(num_cpus=0.5)(_sample_shard)
        parts = [task.remote(u, dim, t, cfg.seed + i) for i, (u, t) in enumerate(zip(files, takes))]
        ray.wait(parts, num_returns=len(parts), fetch_local=False)
    params = params.resolved(total, n_train=sum(min(t, r) for t, r in zip(takes, rows)))
    with timings("train"):
        trained = ray.remote(num_cpus=1, num_gpus=gpus)(_train).remote(params.to_dict(), parts)
        ray.wait([trained], fetch_local=False)
    starts = list(np.cumsum([0] + rows[:-1]).astype(int))
    add = ray.remote(num_cpus=1)(_add_shards)
    with timings("add"):
        if cfg.kind == "hnsw":  # graphs don't merge: one task, shards in order
            blobs = [add.remote(trained, cfg.kind, params.to_dict(), files, starts, dim)]
        else:
            blobs = [add.remote(trained, cfg.kind, params.to_dict(), [f], [s], dim)
                     for f, s in zip(files, starts)]
        ray.wait(blobs, num_returns=len(blobs), fetch_local=False)
    with timings("merge"):
        entry = ray.get(ray.remote(num_cpus=1)(_merge_dense).remote(cfg.kind, blobs, vdir, total))
    logger.info("%s index over %d vectors at dim %d: %.1f MB", cfg.kind, total, dim, entry["bytes"] / 1e6)
    return [entry], params.to_dict(), entry["bytes"]


def _merge_dense(kind: str, blob_refs: list, vdir: Location, total: int) -> dict:
    """Ray task: merge the shards' indexes and write ``index.faiss`` (the driver holds no vectors)."""
    import ray

    from indexing import dense

    index = dense.merge([dense.from_bytes(b, kind) for b in ray.get(blob_refs)])
    return put_file(vdir, "index.faiss", dense.to_bytes(index), "index", total)


# ---- plaid ------------------------------------------------------------------------------
def read_tokens(f: sets.SetFile, codec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The live documents of one ``tokens`` file: flat codes (T,), residuals (T, bytes), lengths (n,)."""
    return vectors.token_file(f, codec.residual_bytes, codec.code_dtype)[1:]


def _plaid_part(codec_url: str, f: sets.SetFile) -> dict:
    """Ray task: one ``tokens`` shard as centroid-index arrays (the task reads the codec itself)."""
    from embedding.codec import ResidualCodec
    from indexing.plaid import CentroidIndex

    arrow_pool()
    codec = ResidualCodec.from_bytes(Location(codec_url).read_bytes())
    return CentroidIndex.from_flat(codec, *read_tokens(f, codec)).to_arrays()


def _write_plaid(part_refs: list, vdir: Location) -> tuple[list[dict], int, int]:
    """Ray task: stream the shards' index parts (zero-copy from the object store) into ``vdir``."""
    import ray

    from indexing.index_files import write_plaid_parts

    parts = ray.get(part_refs)
    return (write_plaid_parts(parts, vdir), sum(len(p["doc_offsets"]) - 1 for p in parts),
            sum(len(p["codes"]) for p in parts))


def _build_plaid(set_manifest: dict, set_dir: Location, files: list, vdir: Location
                 ) -> tuple[list[dict], dict, int]:
    """One index part per ``tokens`` shard, each in its own task, then one task streams
    them into the version's files: the driver never holds a vector or an index array."""
    import ray

    codec_info = set_manifest["codec"]
    codec_url = set_dir.join(codec_info["file"]).url
    task = ray.remote(num_cpus=1)(_plaid_part)
    # The parts were built and checked by from_flat in their tasks: no second scan.
    # Each task reads the codec (tens of MB at 16k centroids) itself: passed as an
    # argument, the driver would put a copy of it in the object store per shard.
    refs = [task.remote(codec_url, f) for f in files]
    entries, n_docs, n_tokens = ray.get(ray.remote(num_cpus=1)(_write_plaid).remote(refs, vdir))
    n_bytes = sum(e["bytes"] for e in entries)
    logger.info("centroid index: %d documents, %d tokens, %d centroids, %.1f MB", n_docs, n_tokens,
                codec_info["n_centroids"], n_bytes / 1e6)
    return entries, {"nbits": codec_info["nbits"], "n_centroids": codec_info["n_centroids"]}, n_bytes
