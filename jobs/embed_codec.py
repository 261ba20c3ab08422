"""Pass 1 of the embed job: the residual codec of a version.

A PLAID-sized sample of documents, drawn by id (``jobs.plan.plan_sample``), is
encoded on the actor pool into a per-shard cache under ``_sample/`` (a resumed run
reads finished shards back instead of encoding them again; pass 2 takes those
documents' encodings from the cache too); the codec is then fitted with faiss
k-means on a worker (a GPU one when the cluster has GPUs), never in the driver, and
written as ``codec.npz`` with its description in ``_codec.json``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from embedding.codec import (
    ResidualCodec,
    bf16_products,
    content_order,
    default_n_centroids,
    kmeans_flops,
    resolve_kmeans,
)
from embedding.faiss_import import import_faiss
from jobs import plan as planner
from jobs.embed_pool import add_worker_stages, cached_as_tasks, calls_per_actor, run_pool, worker_spec
from jobs.embed_worker import SampleEncoder
from jobs.failpoints import failpoint
from jobs.runtime import ActorPlan, arrow_pool, mark_cuda_worker, small_pages
from jobs.sample_cache import cached_names, read_sample_tokens, sample_cache
from jobs.timing import Progress, Timings
from storage.corpus import CorpusError, CorpusFile
from storage.fs import Location
from storage.manifest import dumps

if TYPE_CHECKING:
    from jobs.embed import EmbedConfig, ModelInfo

logger = logging.getLogger(__name__)


def ensure_codec(cfg: EmbedConfig, model: ModelInfo, files: list[CorpusFile], pieces: list,
                 vdir: Location, p: ActorPlan, plan: dict[int, list[int]],
                 timings: "Timings | None" = None) -> dict:
    """Fit (or, on resume, reuse) the residual codec of this version; return its description.

    ``plan`` is the codec sample (:func:`sample_plan`), drawn by document id; the fit
    orders tokens by content, so the codec of a snapshot with a few documents changed is
    nearly the codec of the snapshot before: see ``jobs.plan.plan_sample``.
    """
    loc = vdir.join("codec.npz")
    info_loc = vdir.join("_codec.json")
    if loc.exists() and info_loc.exists():
        logger.info("reusing the codec fitted by the interrupted run")
        return json.loads(info_loc.read_text())
    total = sum(pc.rows for pc in pieces)
    n_docs = planner.sample_size(total)
    rows = [{**pieces[s].to_dict(), "rows": json.dumps(r)} for s, r in sorted(plan.items())]
    # A run killed during this pass left the shards it finished in the sample cache:
    # their tokens are read back, never encoded again.
    cached = cached_names(vdir)
    todo = [r for r in rows if sample_cache(vdir, r["shard"]).name not in cached]
    rows_by_shard = {r["shard"]: r["rows"] for r in rows}
    n_reused = len(rows) - len(todo)
    if n_reused:
        logger.info("codec sample: %d of %d shards already encoded by the interrupted run", n_reused, len(rows))
    if todo:
        spec = worker_spec(cfg, model, files, vdir, p, dense=cfg.dense, colbert=True)
        progress = Progress("codec sample", sum(len(json.loads(r["rows"])) for r in todo))
        # each shard's float16 cache write overlaps the next shard's encoding (calls_per_actor)
        sp = dataclasses.replace(p, calls=calls_per_actor(cfg, sample=True))
        # Until the first shard is done (actors load the model first) this is the only line.
        logger.info("codec sample: encoding %d of %d documents from %d shard(s), %d at a time per actor",
                    progress.total, total, len(todo), sp.calls)
        for stats in run_pool(todo, SampleEncoder, spec, sp, None, timings):
            progress.update(len(json.loads(rows_by_shard[stats["shard"]])))
            if timings is not None:
                add_worker_stages(timings, stats, "sample_")
    failpoint("embed.codec_fit", 1)
    # The sample's token vectors are read and fitted on a worker: the driver holds ids
    # and the codec's bytes, never the sample (at 30k Tatoeba sentences it peaked at
    # 2.2 GB when it gathered them).
    caches = [sample_cache(vdir, r["shard"]).url for r in rows]
    with timings("kmeans") if timings is not None else contextlib.nullcontext():
        codec_bytes, fit = _fit_remote(caches, model.colbert_dim, n_docs, total, cfg, p,
                                       keep_worker=cached_as_tasks(fully_sampled(pieces, plan), cfg.augment))
    if timings is not None:  # inside "kmeans": the task's imports, its read of the cache and the fit itself
        for stage, seconds in fit["seconds"].items():
            timings.add(stage, seconds)
    if not fit["sample_tokens"]:
        if n_docs == total:
            raise CorpusError(f"every text in the corpus is empty ({total} rows in {len(files)} file(s), "
                              f"column {cfg.text_column!r}): nothing to embed")
        raise CorpusError(f"no non-empty text among the {n_docs} documents sampled for the codec "
                          f"(of {total}, column {cfg.text_column!r}): is nearly every text empty?")
    logger.info("fitted the codec: %d centroids, nbits %d, on %d of %d sampled token vectors "
                "(%d sampled documents, ~%d corpus tokens)", fit["k"], cfg.nbits, fit["train_tokens"],
                fit["sample_tokens"], n_docs, fit["est_tokens"])
    codec = ResidualCodec.from_bytes(codec_bytes)
    loc.write_bytes(codec_bytes)
    info = {"file": "codec.npz", "sha256": hashlib.sha256(codec_bytes).hexdigest(), "bytes": len(codec_bytes),
            "sample_documents": n_docs, "sample_tokens": fit["sample_tokens"], "train_tokens": fit["train_tokens"],
            "sample_shards": len(rows), "sample_shards_reused": n_reused,
            "estimated_corpus_tokens": fit["est_tokens"], "kmeans_iters": cfg.kmeans_iters, "kmeans": fit["kmeans"],
            **codec.params()}
    info_loc.write_text(dumps(info))
    return info


def sample_plan(cfg: EmbedConfig, pieces: list, ids: "list | None") -> dict[int, list[int]]:
    """{shard: sampled row offsets}: the documents of the codec sample, drawn by document id
    (``ids``, one array per file; ``jobs.plan.plan_sample``)."""
    total = sum(pc.rows for pc in pieces)
    n_docs = planner.sample_size(total)
    keys = [planner.id_keys(a.to_pylist(), cfg.seed) for a in ids] if ids is not None and n_docs < total else None
    return planner.plan_sample(pieces, n_docs, cfg.seed, keys)


def fully_sampled(pieces: list, plan: dict[int, list[int]]) -> set[int]:
    """Shards whose every row is in the codec sample ``plan`` (:func:`sample_plan`): pass 1
    cached all their encodings, so pass 2 compresses and writes them without a model (on a
    small corpus, every shard)."""
    return {pc.shard for pc in pieces if len(plan.get(pc.shard, ())) == pc.rows}


def _subsample(x: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` rows: those first in content-key order (a draw that moves little
    when the corpus moves little; see ``embedding.codec.content_keys``)."""
    if len(x) <= limit:
        return x
    order, _ = content_order(x, seed)
    return x[np.sort(order[:limit])]


def _kmeans_device(p: ActorPlan, faiss) -> "str | None":
    """Where the fit task runs k-means: "cuda" when it holds a GPU (the pool's plan) and
    faiss has none of its own (faiss-cpu; faiss-gpu's k-means uses the GPU itself), else
    None (faiss). On a 16-core GPU node faiss-cpu's k-means on the plan's 4 threads took
    32 s of a 63 s job (20k docs, 226k tokens, k=4096); torch on the GPU well under 1 s."""
    if p.device != "cuda" or faiss.get_num_gpus() > 0:
        return None
    import torch

    return "cuda" if torch.cuda.is_available() else None


def _fit_remote(caches: list[str], dim: int, n_docs: int, total: int, cfg: EmbedConfig,
                p: ActorPlan, keep_worker: bool = False) -> tuple[bytes, dict]:
    """Read the sample cache and fit k-means on a worker (a GPU one when the cluster has GPUs).

    ``keep_worker``: pass 2 writes shards the sample cache holds whole as tasks
    (``jobs.embed_pool.cached_as_tasks``), on GPUs as one GPU task (``run_cached``):
    a GPU task's worker, which Ray otherwise ends after one call, stays for it, CUDA
    context and torch loaded (one start fewer).

    Returns the codec's bytes and ``sample_tokens``, ``train_tokens``, ``k``,
    ``est_tokens``, ``kmeans`` (the kind the task ran: ``auto`` resolved where it ran;
    ``sample_tokens == 0``: nothing fitted, empty bytes).
    """
    import ray

    threads, nbits, n_centroids = p.threads, cfg.nbits, cfg.n_centroids
    limit, seed, niter, kmeans = cfg.max_sample_tokens, cfg.seed, cfg.kmeans_iters, cfg.kmeans

    def fit(submitted: float) -> tuple[bytes, dict]:
        waited = time.time() - submitted  # scheduling, a worker process, CPUs freed by the sample pool
        t0 = time.perf_counter()
        arrow_pool()  # before the sample's read (a worker of a cluster's own Ray: see jobs.runtime)
        if p.num_gpus:
            mark_cuda_worker()
        faiss = import_faiss()

        faiss.omp_set_num_threads(threads)  # Ray gave this task OMP_NUM_THREADS=1 (see thread_env)
        t1 = time.perf_counter()
        sample = read_sample_tokens([Location(url) for url in caches], dim)
        seconds = {"fit_wait": waited, "fit_import": t1 - t0, "fit_read": time.perf_counter() - t1}
        stats = {"sample_tokens": int(len(sample)), "train_tokens": 0, "k": 0, "est_tokens": 0, "kmeans": kmeans,
                 "seconds": seconds}
        if not len(sample):
            return b"", stats
        est_tokens = int(len(sample) / max(n_docs, 1) * total)
        k = n_centroids or min(default_n_centroids(est_tokens), len(sample))
        # float16 as cached: the fit converts and normalises it a block at a time (a float32
        # copy here, ~0.8 GB of fresh memory at 507k tokens, cost ~5 s on 2 CPUs)
        train = _subsample(sample, limit, seed)
        del sample
        stats.update(train_tokens=int(len(train)), k=int(k), est_tokens=est_tokens)
        t = time.perf_counter()
        device = _kmeans_device(p, faiss)
        # "auto" as this task's CPU or GPU and the sample's size resolve it (may import torch)
        flops = kmeans_flops(len(train), k, dim, niter)
        kind = resolve_kmeans(kmeans, device, flops)
        stats["kmeans"] = kind
        if device is None and bf16_products(kind, device, flops):  # torch on this task's CPUs
            import torch

            torch.set_num_threads(threads)
        seconds["fit_import"] += time.perf_counter() - t
        t = time.perf_counter()
        codec = ResidualCodec.fit(train, nbits, k, seed=seed, niter=niter, kmeans=kind, device=device)
        seconds["fit_kmeans"] = time.perf_counter() - t
        seconds["fit_task"] = time.perf_counter() - t0
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()  # the worker may stay (keep_worker): its cached blocks go
        stats["ended"] = time.time()
        return codec.to_bytes(), stats

    def fit_small_pages(submitted: float) -> tuple[bytes, dict]:
        # the sample's normalised float32 copy without huge pages; the worker, which Ray may
        # give a later task of the job, gets numpy's setting back (see jobs.runtime.small_pages)
        with small_pages():
            return fit(submitted)

    options = {"max_calls": 0} if keep_worker and p.num_gpus else {}  # 0: no limit
    task = ray.remote(num_cpus=p.num_cpus, num_gpus=p.num_gpus, **options)(fit_small_pages)
    codec_bytes, stats = ray.get(task.remote(time.time()))
    if "ended" in stats:
        stats["seconds"]["fit_return"] = time.time() - stats.pop("ended")
    return codec_bytes, stats
