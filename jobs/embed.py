"""The embed job: corpus → embedding set version (dense MRL vectors, compressed ColBERT tokens).

Flow (each step is skipped when a resumed run already finished it):

0. rows per shard (unless given, sized to the texts' lengths) and the input record: every corpus
   file's size and content (sha256; the ETag on s3), the model's fingerprint and the settings,
   hashed into one key before Ray starts; when the set's current version has the same key, the
   run stops with :class:`Unchanged` (the CLI's exit 4) and writes nothing, unless ``force``;
1. scan the corpus files in parallel Ray tasks: columns, ids, piece offsets;
   duplicate or null ids stop the job before anything is written;
2. claim a version of the set (a resumed run gets its unfinished version back);
3. ColBERT: encode a PLAID-sized sample, caching each shard's encodings under ``_sample/``
   (a resumed run reads them back instead of encoding them again), fit the residual codec
   (k-means: faiss with the pool's threads, or torch on the GPU), write ``codec.npz``;
4. Ray Data ``map_batches`` over the pieces, an actor pool: each actor holds one model (loaded on first use,
   so a small corpus, all in the sample cache, never loads it twice), writes its shards, then their markers;
5. the manifest (every file with rows, bytes, sha256), then ``CURRENT``.

This module is the driver. Pass 1 lives in ``jobs.embed_codec``, the actor pool in
``jobs.embed_pool``, the actors in ``jobs.embed_worker``; :func:`encode_shards` is the
encode pass that a re-index (``jobs.reindex``) runs on its delta as well.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from embedding.codec import KMEANS_CHOICES, SUPPORTED_NBITS
from embedding.model import MODES, PRECISIONS, EncoderSettings, check_model_dir, fingerprint, read_settings
from jobs import embed_augment, preflight
from jobs import plan as planner
from jobs.embed_augment import AugmentConfig
from jobs.embed_codec import ensure_codec, fully_sampled, sample_plan
from jobs.embed_pool import actor_plan, add_worker_stages, done_shards, run_precision, run_shards, worker_spec
from jobs.embed_worker import ShardEncoder
from jobs.errors import NothingToDo, bad_input, unwrap
from jobs.runtime import DEVICES, ActorPlan, init_ray
from jobs.sample_cache import SAMPLE_CACHE
from jobs.timing import Progress, Timings
from storage import layout
from storage.corpus import ColumnMap, CorpusError, CorpusFile, expand, find_duplicates, scan_file
from storage.fs import Location
from storage.manifest import Artifact, utcnow

logger = logging.getLogger(__name__)

# 4 bits per residual dimension by default (FastPlaid's default as well). Against 2 bits it doubles
# the token bytes (194 vs 98 per 384-d token) and costs ~1.15x PLAID search time at equal settings,
# for reconstruction cosine 0.997 vs 0.987 and rankings that survive a codec re-fit: exact-MaxSim
# top-10 of an index updated in place vs a full rebuild of a 1%-changed XQuAD snapshot agreed at
# 0.985-0.989 over three codec seeds, 0.948-0.967 at 2 bits (benchmarks/bench_codec_refit.py,
# bench_reindex.py). --nbits 2 (or 1) remains for storage-bound sets.
DEFAULT_NBITS = 4
#: EmbedConfig fields that change neither documents nor vectors (but for rounding): out of the run and input keys.
RUNTIME_FIELDS = ("root", "actors", "threads", "calls_per_actor", "device", "precision", "max_batch", "max_tokens",
                  "publish", "force")


class Unchanged(NothingToDo):
    """The set's current version was embedded from the same corpus files (byte for byte),
    model and settings: a new version would duplicate it (``force`` embeds it anyway)."""


@dataclass(frozen=True)
class EmbedConfig:
    """Configuration of one embed run. Checked before anything is written.

    Attributes
    ----------
    corpus : files, globs or directories (Parquet / JSONL), local or s3://.
    model : a local Hugging Face folder.
    set_name : the embedding set to write a new version of.
    root : the store root (None: $TESSERA_ROOT or ./tessera-data).
    mode : "dense", "colbert" or "both". nbits : ColBERT residual bits a dimension (1, 2 or 4; default 4).
    rows_per_shard : None: sized to the texts (``jobs.preflight.rows_per_shard``), 1,024 to 4,096.
    force : a new version even when the current one has the same input (:func:`input_record`), not :class:`Unchanged`.
    adapter_fallback : X-MOD models: the adapter of documents whose language has none.
    augment : xQG passage augmentation (``jobs.embed_augment``); None: none.
    precision : the encoders' type (``embedding.model.PRECISIONS``; float16 needs CUDA, checked by ``worker_spec``).
    """

    corpus: tuple[str, ...]
    model: str
    set_name: str
    root: "str | None" = None
    mode: str = "both"
    nbits: int = DEFAULT_NBITS
    id_column: str = "id"
    text_column: str = "text"
    lang_column: str = "lang"
    title_column: str = "title"
    rows_per_shard: "int | None" = None
    n_centroids: "int | None" = None
    kmeans_iters: int = 4
    kmeans: str = "auto"  # embedding.codec.KMEANS_CHOICES; auto: embedding.codec.resolve_kmeans
    max_sample_tokens: int = 1 << 19
    seed: int = 0
    max_batch: int = 64
    max_tokens: int = 16384
    actors: "int | None" = None
    threads: "int | None" = None
    calls_per_actor: "int | None" = None  # None: jobs.embed_pool.calls_per_actor's default
    device: str = "auto"
    precision: str = "auto"  # embedding.model.PRECISIONS; auto: embedding.model.resolve_precision on each actor
    pooling: "str | None" = None
    query_prefix: "str | None" = None
    passage_prefix: "str | None" = None
    max_length: "int | None" = None
    doc_maxlen: "int | None" = None
    query_maxlen: "int | None" = None
    publish: bool = True
    force: bool = False
    adapter_fallback: "str | None" = None
    augment: "AugmentConfig | None" = None

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            object.__setattr__(self, "augment", AugmentConfig.from_dict(self.augment))
        if isinstance(self.corpus, str):
            object.__setattr__(self, "corpus", (self.corpus,))
        if not self.corpus:
            raise ValueError("no corpus given")
        layout.check_name(self.set_name, "set name")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.nbits not in SUPPORTED_NBITS:
            raise ValueError(f"nbits must be 1, 2 or 4, got {self.nbits!r}")
        for name in ("kmeans_iters", "max_batch", "max_tokens", "max_sample_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rows_per_shard", "n_centroids", "actors", "threads", "calls_per_actor"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, allowed in (("device", DEVICES), ("kmeans", KMEANS_CHOICES), ("precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        ColumnMap(self.id_column, self.text_column, self.lang_column, self.title_column)

    @property
    def dense(self) -> bool:
        return self.mode in ("dense", "both")

    @property
    def colbert(self) -> bool:
        return self.mode in ("colbert", "both")

    @property
    def columns(self) -> ColumnMap:
        return ColumnMap(self.id_column, self.text_column, self.lang_column, self.title_column)

    def settings(self, model_dir: Path) -> EncoderSettings:
        """The model folder's own settings with this run's overrides."""
        return read_settings(model_dir).replace(
            pooling=self.pooling, query_prefix=self.query_prefix, passage_prefix=self.passage_prefix,
            max_length=self.max_length, doc_maxlen=self.doc_maxlen, query_maxlen=self.query_maxlen,
            adapter_fallback=self.adapter_fallback)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["corpus"] = list(self.corpus)
        # the new settings are left out when unset: sets embedded before them keep their keys
        return {k: v for k, v in d.items() if (v is not None or k not in ("adapter_fallback", "augment"))
                and (k, v) != ("kmeans", "auto")}


@dataclass(frozen=True)
class ModelInfo:
    path: str
    settings: EncoderSettings
    fingerprint: str
    hidden_size: int
    colbert_dim: int
    projection: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"settings": self.settings.to_dict()}  # the settings' own keys


def describe_model(cfg: EmbedConfig) -> ModelInfo:
    """Fingerprint and dimensions of the model, without loading it into torch."""
    from embedding.model import projection_shape

    d = check_model_dir(cfg.model)
    settings = cfg.settings(d)
    config = json.loads((d / "config.json").read_text())
    hidden = int(config.get("hidden_size") or config.get("d_model") or config.get("dim"))
    proj = projection_shape(d, hidden)  # read from the weights' header: this process needs no torch
    dim = proj[0] if proj is not None else hidden
    if cfg.colbert and dim * cfg.nbits % 8:
        raise ValueError(f"ColBERT dimension {dim} × nbits {cfg.nbits} is not a multiple of 8 bits: "
                         "the residuals can't be byte-packed; choose another --nbits")
    return ModelInfo(str(d.resolve()), settings, fingerprint(d, settings), hidden, dim, proj is not None)


def run(cfg: EmbedConfig) -> dict:
    """Run the job; return the committed manifest."""
    timings = Timings()
    root = layout.resolve_root(cfg.root)
    art = Artifact(root, "sets", cfg.set_name)
    with timings("check"):
        urls = preflight.embed(cfg.corpus, cfg.model, cfg.columns)  # in a second, before Ray and the model
        preflight.languages(urls, cfg.columns, cfg.model, cfg.adapter_fallback)
        aug = embed_augment.describe(cfg.augment, cfg.seed) if cfg.augment else None
        cfg = dataclasses.replace(cfg, rows_per_shard=preflight.rows_per_shard(urls, cfg.columns, cfg.rows_per_shard))
    with timings("model"):
        model = describe_model(cfg)
    with timings("input"):
        source = input_record(cfg, model, urls, aug)
    if not cfg.force:
        check_unchanged(art, source)
    init_ray()
    with timings("scan"):
        files, ids_digest, ids = scan_corpus(cfg, urls)
        queries = embed_augment.check_queries(cfg, ids) if cfg.augment else None
    run_key = resume_key(cfg, model, files, ids_digest, aug)
    version, resumed = art.claim(run_key, {"host": socket.gethostname(), "pid": os.getpid()})
    try:
        embed_augment.write_queries(queries, art.version_dir(version))
        return _write_version(cfg, art, version, resumed, model, files, ids, run_key, timings, source)
    except Exception as err:
        if not resumed and bad_input(unwrap(err)) is not None:
            discard_version(art, version)  # bad input leaves nothing behind (a failure stays resumable)
        raise


def _write_version(cfg: EmbedConfig, art: Artifact, version: str, resumed: bool, model: ModelInfo,
                   files: list[CorpusFile], ids: list, run_key: str, timings: Timings, source: dict) -> dict:
    """Everything after the claim: codec, shards, manifest, CURRENT."""
    pieces = planner.build_pieces([f.n_rows for f in files], cfg.rows_per_shard)
    vdir = art.version_dir(version)
    logger.info("%s %s/%s (%d documents in %d shards from %d files)",
                "resuming" if resumed else "writing", cfg.set_name, version,
                sum(f.n_rows for f in files), len(pieces), len(files))
    p = actor_plan(cfg)
    codec_info, plan = None, {}
    if cfg.colbert:
        plan = sample_plan(cfg, pieces, ids)
        with timings("fit_codec"):
            codec_info = ensure_codec(cfg, model, files, pieces, vdir, p, plan, timings)
    with timings("encode"):
        encode_pieces(cfg, model, files, pieces, vdir, p, codec_info, timings, fully_sampled(pieces, plan))
    with timings("commit"):
        manifest = _manifest(cfg, model, files, pieces, vdir, codec_info, p, run_key,
                             art, timings, source)
        if not manifest["counts"]["documents"]:
            raise CorpusError(f"every text in the corpus is empty ({manifest['counts']['input_rows']} rows in "
                              f"{len(files)} file(s), column {cfg.text_column!r}): nothing to embed")
        manifest = art.commit(version, manifest)
        if cfg.publish:
            art.publish(version)
    vdir.join(SAMPLE_CACHE).delete(recursive=True)  # pass 1's encodings, now in the shards
    vdir.join(embed_augment.QUERIES_DIR).delete(recursive=True)  # the actors' copy of the queries
    return manifest


# ---- scanning -------------------------------------------------------------------------
def scan_corpus(cfg: EmbedConfig, urls: "list[str] | None" = None) -> tuple[list[CorpusFile], str, list]:
    """Scan every corpus file in parallel Ray tasks; raise CorpusError on bad ids.

    ``urls``: the corpus files, when :func:`jobs.preflight.corpus` already expanded them.

    Returns
    -------
    (files, ids_digest, ids): the scanned files in order, a sha256 over all ids and
    the ids themselves (one pyarrow array per file).
    """
    import ray

    urls = urls or [loc.url for loc in expand(list(cfg.corpus))]
    task = ray.remote(num_cpus=0.5, max_retries=2, retry_exceptions=False)(scan_file)
    results = ray.get([task.remote(u, cfg.columns, cfg.rows_per_shard) for u in urls])
    files = [r[0] for r in results]
    ids = [r[1] for r in results]
    dups = find_duplicates(files, ids, cols=cfg.columns)
    if dups:
        n = sum(len(a) for a in ids) - len(set().union(*[set(a.to_pylist()) for a in ids]))
        raise CorpusError(f"{n} duplicate id(s) in the corpus, first: " + ", ".join(dups))
    digest = hashlib.sha256()
    for arr in ids:
        for value in arr.to_pylist():
            digest.update(value.encode("utf-8") + b"\n")
    return files, digest.hexdigest(), ids


def discard_version(art: Artifact, version: str) -> None:
    """Delete an uncommitted version (and the set's folder when nothing else is in it), so a
    run refused for its input leaves no trace: no folder, no name in "known:" lists."""
    art.version_dir(version).delete(recursive=True)
    if not art.loc.list():
        art.loc.delete(recursive=True)
    logger.info("removed the unfinished %s/%s %s", art.kind, art.name, version)


def resume_key(cfg: EmbedConfig, model: ModelInfo, files: list[CorpusFile], ids_digest: str,
               augment: "dict | None" = None) -> str:
    """The run key of an embed run (its manifest's ``run_key``, its version's claim).

    Same key ⇔ same input (scanned ``files`` and the sha256 over their ids, from
    :func:`scan_corpus`), model and settings: a rerun resumes instead of starting over.
    ``augment``: ``jobs.embed_augment.describe``'s record (queries file tag, generator).
    """
    relevant = {k: v for k, v in cfg.to_dict().items() if k not in RUNTIME_FIELDS}
    key = {"cfg": relevant, "model": model.fingerprint, "ids": ids_digest,
           "files": [(f.url, f.n_rows) for f in files], **({"augment": augment} if augment else {})}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# ---- the input record: is this run a duplicate of the current version? ---------------------
def input_record(cfg: EmbedConfig, model: ModelInfo, urls: "list[str] | None" = None,
                 augment: "dict | None" = None) -> dict:
    """What a version is embedded from, and its sha256 ``key``.

    Every corpus file's URL, size and content tag (the sha256 of a local file's bytes,
    hashed in a few threads; an s3 object's ETag, which S3 changes with every write, so
    no s3 object is read), the model's fingerprint (weights, tokenizer, encoder settings)
    and the settings that shape the documents or their vectors (not root, threads,
    batch sizes, publish, force). Computed before Ray starts and the model loads.

    Returns
    -------
    ``{"key": sha256 hex, "files": [{"url", "bytes", "sha256" | "etag"}, ...]}``
    """
    from concurrent.futures import ThreadPoolExecutor

    urls = list(urls) if urls else [loc.url for loc in expand(list(cfg.corpus))]
    with ThreadPoolExecutor(max(1, min(8, len(urls)))) as pool:
        files = list(pool.map(preflight.content_tag, urls))
    settings = {k: v for k, v in cfg.to_dict().items() if k not in RUNTIME_FIELDS + ("corpus", "set_name")}
    key = {"settings": settings, "model": model.fingerprint, "files": files,
           **({"augment": augment} if augment else {})}
    return {"key": hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest(), "files": files,
            **({"augment": augment} if augment else {})}


def check_unchanged(art: Artifact, source: dict) -> None:
    """Raise :class:`Unchanged` when the set's current version has ``source``'s input key."""
    current = art.current()
    if current is None:
        return
    if (art.manifest(current).get("input") or {}).get("key") == source["key"]:
        n = len(source["files"])
        raise Unchanged(f"set {art.name!r} {current} was embedded from the same {n} corpus file{'s' * (n != 1)} "
                        "(byte for byte), model and settings: nothing to embed (--force embeds it again)")


# ---- pass 2: encode everything --------------------------------------------------------
def encode_pieces(cfg: EmbedConfig, model: ModelInfo, files: list[CorpusFile], pieces: list,
                  vdir: Location, p: ActorPlan, codec_info: "dict | None",
                  timings: "Timings | None" = None, cached: "set[int] | frozenset" = frozenset()) -> None:
    """Encode every piece without a finished-shard marker (``cached``: see :func:`encode_shards`)."""
    done = done_shards(vdir)
    todo = [pc.to_dict() for pc in pieces if pc.shard not in done]
    if done:
        logger.info("%d of %d shards already finished; encoding the other %d", len(done), len(pieces), len(todo))
    if not todo:
        return
    codec_url = vdir.join(codec_info["file"]).url if codec_info else None
    progress = Progress("embed", sum(pc["end"] - pc["start"] for pc in todo))
    for stats in encode_shards(cfg, model, files, todo, vdir, p, codec_url, timings=timings, cached=cached):
        progress.update(stats["rows_in"])


def encode_shards(cfg: EmbedConfig, model: ModelInfo, files: list[CorpusFile], rows: list[dict],
                  vdir: Location, p: ActorPlan, codec_url: "str | None", *, in_process: bool = False,
                  timings: "Timings | None" = None, cached: "set[int] | frozenset" = frozenset()) -> Iterator[dict]:
    """Encode piece rows into shards of the version folder ``vdir``; yield each shard's
    statistics as it finishes (its files and its finished-shard marker are written by then).

    The embed job's encode pass, and a re-index's delta, go through here.

    Parameters
    ----------
    cfg, model : the run's settings and :func:`describe_model`'s description of its model.
    files : the scanned corpus files (:func:`scan_corpus`); a row's ``file`` indexes them.
    rows : ``Piece.to_dict()`` rows (shard, file, start, end); a re-index's delta rows
        also carry ``rows``, the JSON list of the offsets in the range to encode.
    p : the encoder pool (``jobs.embed_pool.actor_plan``); also sizes the threads.
    codec_url : the residual codec that compresses the ColBERT tokens (None: dense only).
    in_process : encode here, one shard after the other, instead of on the actor pool:
        the same encoder class writing the same files and markers, with the model
        loaded once in this process on ``cfg.threads`` (default every CPU). For a few
        hundred documents an actor pool costs more to start than the encoding.
    timings : gets the pool's start-up as ``actor_start`` (see ``jobs.embed_pool.run_pool``).
    cached : shards whose every document the codec-sample cache holds (``jobs.embed_pool.run_shards``).
    """
    spec = worker_spec(cfg, model, files, vdir, p, dense=cfg.dense, colbert=cfg.colbert)
    if not in_process:
        yield from run_shards(rows, ShardEncoder, spec, p, codec_url, timings, cached)
        return
    threads = cfg.threads or max(1, os.cpu_count() or 1)
    encoder = ShardEncoder(dataclasses.replace(spec, threads=threads), codec_url)
    for row in rows:
        out = encoder({k: [v] for k, v in row.items()})
        yield json.loads(out["stats"][0])


# ---- the manifest ---------------------------------------------------------------------
def _manifest(cfg: EmbedConfig, model: ModelInfo, files: list[CorpusFile], pieces: list, vdir: Location,
              codec_info: "dict | None", p: ActorPlan, run_key: str, art: Artifact, timings: Timings,
              source: dict) -> dict:
    stats = done_shards(vdir)
    missing = [pc.shard for pc in pieces if pc.shard not in stats]
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) have no finished marker (first: {missing[:5]}); "
                           "run the same command again to finish them")
    shard_stats = [stats[pc.shard] for pc in pieces]
    entries = [e for s in shard_stats for e in s["files"]]
    if codec_info:
        entries.append({"path": codec_info["file"], "kind": "codec", "rows": codec_info["n_centroids"],
                        "bytes": codec_info["bytes"], "sha256": codec_info["sha256"]})
    count = lambda key: int(sum(s[key] for s in shard_stats))  # noqa: E731
    return {
        "config": cfg.to_dict(),
        "model": model.to_dict(),
        "modes": {"dense": cfg.dense, "colbert": cfg.colbert},
        "dims": {"dense": model.hidden_size if cfg.dense else None,
                 "colbert": model.colbert_dim if cfg.colbert else None},
        "dense_dtype": "float16",
        "codec": codec_info,
        "counts": {"input_rows": count("rows_in"), "documents": count("documents"),
                   "skipped_empty": count("skipped_empty"), "tokens": count("tokens"),
                   "input_tokens": count("input_tokens"), "truncated": count("truncated"),
                   "shards": len(pieces), **embed_augment.adapter_counts(shard_stats)},
        "corpus": [{"url": f.url, "format": f.format, "rows": f.n_rows} for f in files],
        "files": entries,
        "parent": art.current(),
        "run_key": run_key,
        "input": source,
        **embed_augment.manifest_record(cfg.augment, source, shard_stats),
        "workers": {**p.to_dict(), "precision": run_precision(shard_stats)},
        "timings": {**timings.to_dict(), **_worker_timings(shard_stats),
                    "encode_worker_seconds": round(sum(s["encode_seconds"] for s in shard_stats), 3)},
        "created_at": utcnow(),
    }


def _worker_timings(shard_stats: list[dict]) -> dict:
    """In-actor seconds per stage of the encode pass, summed over its shards (``worker_<stage>``)."""
    t = Timings()
    for stats in shard_stats:
        add_worker_stages(t, stats, "worker_")
    return t.to_dict()
