"""The index job: a committed embedding set version → an index version. Never re-encodes.

Dense kinds (``flat``, ``ivf``, ``ivfpq``, ``hnsw``, ``int8``, ``binary``): a training
sample is drawn from the shards, the index is trained once (on a GPU worker when
the cluster has one and faiss-gpu is installed), every shard is added to a copy of
the trained empty index in its own Ray task, and the parts are merged in shard
order. HNSW graphs cannot be merged, so one task adds the shards in order.

``plaid``: every ``tokens`` shard becomes a centroid-index part in its own task,
reusing the set's codec; the parts are concatenated.

The version holds ``index.faiss`` or ``plaid/*.npy``, ``ids.parquet`` (positional
id → document id) and a manifest naming the exact set version, codec and model
fingerprint.
"""
from __future__ import annotations

import io
import logging
import os
import socket
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from jobs.runtime import init_ray
from jobs.timing import Timings
from storage import layout, schemas
from storage.fs import Location, location
from storage.manifest import Artifact, NotFoundError, file_entry, utcnow

logger = logging.getLogger(__name__)

DENSE_KINDS = ("flat", "ivf", "ivfpq", "hnsw", "int8", "binary")
KINDS = DENSE_KINDS + ("plaid",)


@dataclass(frozen=True)
class IndexConfig:
    """One index build. ``dim`` None = the set's full dimension; ``name`` None = ``<set>-<kind>[-<dim>]``."""

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

    def __post_init__(self) -> None:
        layout.check_name(self.set_name, "set name")
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
    timings = Timings()
    root = layout.resolve_root(cfg.root)
    sets = Artifact(root, "sets", cfg.set_name)
    set_version = sets.resolve(cfg.set_version)
    set_manifest = sets.manifest(set_version)
    set_dir = sets.version_dir(set_version)
    want = "tokens" if cfg.kind == "plaid" else "dense"
    shards = sorted((e for e in set_manifest["files"] if e["kind"] == want), key=lambda e: e["shard"])
    stored = set_manifest["dims"]["colbert" if cfg.kind == "plaid" else "dense"]
    if stored is None or not shards:
        raise NotFoundError(f"set {cfg.set_name} {set_version} has no {want} vectors "
                            f"(it was embedded with --mode {set_manifest['config']['mode']})")
    dim = cfg.dim or stored
    if dim > stored:
        raise ValueError(f"dimension {dim} is above the stored dimension {stored} of set {cfg.set_name}")
    urls = [_url(set_dir, e) for e in shards]
    rows = [int(e["rows"]) for e in shards]
    init_ray()
    art = Artifact(root, "indexes", cfg.index_name)
    version, _ = art.claim(f"{cfg.set_name}/{set_version}/{cfg}", {"host": socket.gethostname(), "pid": os.getpid()})
    vdir = art.version_dir(version)
    if cfg.kind == "plaid":
        with timings("build"):
            entries, params, n_bytes = _build_plaid(set_manifest, set_dir, urls, vdir)
    else:
        entries, params, n_bytes = _build_dense(cfg, dim, urls, rows, vdir, timings)
    with timings("ids"):
        entries.append(_write_ids(urls, vdir))
    manifest = {
        "index_kind": cfg.kind, "dim": dim, "params": params, "n_docs": int(sum(rows)),
        "source": {"set": cfg.set_name, "version": set_version, "dir": set_dir.url,
                   "fingerprint": set_manifest["model"]["fingerprint"], "stored_dim": stored,
                   "codec": set_manifest.get("codec") if cfg.kind == "plaid" else None},
        "config": asdict(cfg), "files": entries, "index_bytes": n_bytes,
        "bytes_per_document": n_bytes / max(1, sum(rows)), "timings": timings.to_dict(), "created_at": utcnow(),
    }
    manifest = art.commit(version, manifest)
    if cfg.publish:
        art.publish(version)
    return manifest


def _url(set_dir: Location, entry: dict) -> str:
    path = entry["path"]
    return path if "://" in path or path.startswith("/") else set_dir.join(path).url


def _put(vdir: Location, path: str, data: bytes, kind: str, rows: int) -> dict:
    import hashlib

    loc = vdir.join(path)
    loc.write_bytes(data)
    return file_entry(loc, vdir, kind=kind, rows=rows, nbytes=len(data), sha256=hashlib.sha256(data).hexdigest())


# ---- dense ------------------------------------------------------------------------------
def _read_dense(url: str, dim: int) -> np.ndarray:
    from embedding.mrl import truncate

    return truncate(schemas.dense_matrix(schemas.read_table(location(url), ["vector"])), dim)


def _sample_shard(url: str, dim: int, take: int, seed: int) -> np.ndarray:
    x = _read_dense(url, dim)
    if take >= len(x):
        return x
    return x[np.sort(np.random.default_rng(seed).choice(len(x), take, replace=False))]


def _add_shards(trained: bytes, kind: str, params: dict, urls: list[str], starts: list[int], dim: int) -> bytes:
    from indexing import dense

    index = dense.from_bytes(trained, kind)
    for url, start in zip(urls, starts):
        dense.add(index, _read_dense(url, dim), start)
    return dense.to_bytes(index)


def _train(params_dict: dict, sample: np.ndarray) -> bytes:
    from indexing import dense

    return dense.to_bytes(dense.train(dense.DenseIndexParams.from_dict(params_dict), sample))


def _build_dense(cfg: IndexConfig, dim: int, urls: list[str], rows: list[int], vdir: Location,
                 timings: Timings) -> tuple[list[dict], dict, int]:
    import ray

    from indexing import dense

    total = sum(rows)
    params = cfg.dense_params(dim)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    with timings("sample"):
        share = min(1.0, cfg.train_size / max(total, 1))
        task = ray.remote(num_cpus=0.5)(_sample_shard)
        parts = ray.get([task.remote(u, dim, max(1, int(round(r * share))), cfg.seed + i)
                         for i, (u, r) in enumerate(zip(urls, rows))])
        sample = np.concatenate(parts)
    params = params.resolved(total, n_train=len(sample))
    with timings("train"):
        trained = ray.get(ray.remote(num_cpus=1, num_gpus=gpus)(_train).remote(params.to_dict(), sample))
    starts = list(np.cumsum([0] + rows[:-1]).astype(int))
    add = ray.remote(num_cpus=1)(_add_shards)
    with timings("add"):
        if cfg.kind == "hnsw":  # graphs don't merge: one task, shards in order
            blobs = ray.get([add.remote(trained, cfg.kind, params.to_dict(), urls, starts, dim)])
        else:
            blobs = ray.get([add.remote(trained, cfg.kind, params.to_dict(), [u], [s], dim)
                             for u, s in zip(urls, starts)])
    with timings("merge"):
        index = dense.merge([dense.from_bytes(b, cfg.kind) for b in blobs])
        data = dense.to_bytes(index)
    logger.info("%s index over %d vectors at dim %d: %.1f MB", cfg.kind, total, dim, len(data) / 1e6)
    return [_put(vdir, "index.faiss", data, "index", total)], params.to_dict(), len(data)


# ---- plaid ------------------------------------------------------------------------------
def _plaid_part(codec_bytes: bytes, url: str) -> dict:
    from embedding.codec import ResidualCodec
    from indexing.plaid import CentroidIndex

    codec = ResidualCodec.from_bytes(codec_bytes)
    table = schemas.read_table(location(url), ["codes", "residuals", "n_vectors"])
    codes = table.column("codes").combine_chunks().values.to_numpy(zero_copy_only=False)
    residuals = np.frombuffer(b"".join(v.as_py() for v in table.column("residuals")), np.uint8)
    lengths = np.asarray(table.column("n_vectors").to_numpy(), np.int64)
    residuals = residuals.reshape(int(lengths.sum()), codec.residual_bytes)
    return CentroidIndex.from_flat(codec, codes.astype(codec.code_dtype), residuals, lengths).to_arrays()


def _build_plaid(set_manifest: dict, set_dir: Location, urls: list[str], vdir: Location
                 ) -> tuple[list[dict], dict, int]:
    import ray

    from embedding.codec import ResidualCodec
    from indexing.plaid import CentroidIndex

    codec_info = set_manifest["codec"]
    codec_bytes = set_dir.join(codec_info["file"]).read_bytes()
    codec = ResidualCodec.from_bytes(codec_bytes)
    task = ray.remote(num_cpus=1)(_plaid_part)
    parts = [CentroidIndex.from_arrays(codec, a) for a in ray.get([task.remote(codec_bytes, u) for u in urls])]
    index = CentroidIndex.from_parts(codec, parts)
    entries = []
    for name, arr in index.to_arrays().items():
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        entries.append(_put(vdir, f"plaid/{name}.npy", buf.getvalue(), "plaid", len(arr)))
    n_bytes = sum(e["bytes"] for e in entries)
    logger.info("centroid index: %d documents, %d tokens, %d centroids, %.1f MB", index.n_docs, index.n_tokens,
                codec.n_centroids, n_bytes / 1e6)
    return entries, {"nbits": codec.nbits, "n_centroids": codec.n_centroids}, n_bytes


# ---- ids ----------------------------------------------------------------------------------
def _write_ids(urls: list[str], vdir: Location) -> dict:
    ids = pa.concat_arrays([schemas.read_table(location(u), ["id"]).column("id").combine_chunks() for u in urls])
    table = pa.table({"pos": pa.array(np.arange(len(ids), dtype=np.int64)), "id": ids})
    info = schemas.write_table(vdir.join("ids.parquet"), table)
    return file_entry(vdir.join("ids.parquet"), vdir, kind="ids", rows=info["rows"], nbytes=info["bytes"],
                      sha256=info["sha256"])
