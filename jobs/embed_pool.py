"""The encoder actor pool of the embed job (and of a re-index's delta).

How many actors, on which device, with how many threads (:func:`actor_plan`); what
each actor is given, as plain data (:func:`worker_spec`); Ray Data's ``map_batches``
of piece rows over the pool (:func:`run_pool`, which yields each shard's statistics
as it finishes); and the finished-shard markers that tell a resumed run what is
done (:func:`done_shards`). The actors themselves are ``jobs.embed_worker``'s.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from typing import TYPE_CHECKING, Iterator

from embedding.codec import ready_bf16_search
from jobs.embed_worker import ShardEncoder, WorkerSpec
from jobs.errors import quiet_ray_failure_logs
from jobs.failpoints import FAILPOINTS_ENV
from jobs.runtime import CUDA_AT_START_ENV, ActorPlan, cuda_worker_fits, mark_cuda_worker, plan_actors, thread_env
from jobs.timing import Timings
from storage import layout
from storage.corpus import CorpusFile
from storage.fs import Location, location

if TYPE_CHECKING:
    from jobs.embed import EmbedConfig, ModelInfo

logger = logging.getLogger(__name__)


def actor_plan(cfg: EmbedConfig) -> ActorPlan:
    """The encoder pool for ``cfg`` on the cluster Ray is connected to (logged)."""
    import ray

    res = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = max((int(n["Resources"].get("CPU", 0)) for n in nodes), default=None)
    p = plan_actors(res.get("CPU", 1), res.get("GPU", 0), device=cfg.device, actors=cfg.actors,
                    threads=cfg.threads, cpus_per_node=per_node)
    p = dataclasses.replace(p, calls=calls_per_actor(cfg))
    logger.info("encoder pool: %d actor(s) on %s, %d thread(s) and %d shard(s) at a time each", p.actors,
                p.device, p.threads, p.calls)
    return p


def worker_spec(cfg: EmbedConfig, model: ModelInfo, files: list[CorpusFile], vdir: Location,
                p: ActorPlan, dense: bool, colbert: bool) -> WorkerSpec:
    """What every encoder actor of the pool gets: the model, the corpus files, the version folder."""
    augment = {"config": cfg.augment.to_dict(), "run_seed": cfg.seed} if cfg.augment else None
    if cfg.precision == "float16" and p.device != "cuda":
        raise ValueError(f"precision float16 runs on CUDA only, and this run's encoders are on {p.device} "
                         "(no GPU in the cluster or --device cpu): use bfloat16 or float32")
    return WorkerSpec(model.path, model.settings.to_dict(), model.fingerprint, [f.to_dict() for f in files],
                      dataclasses.asdict(cfg.columns), vdir.url, dense, colbert, p.threads, p.device,
                      cfg.max_batch, cfg.max_tokens, augment, cfg.precision)


def calls_per_actor(cfg: EmbedConfig, sample: bool = False) -> int:
    """Shards an encoder actor holds at once, each call in its own thread: with two, one
    reads its shard or writes the last one while the other holds the model
    (``jobs.embed_worker.EncoderActor``'s compute lock).

    ``cfg.calls_per_actor`` when set; else 2 for the codec sample's pass (``sample``),
    whose every shard writes its token vectors as float16 (~100 MB a 3,200-sentence shard:
    on a local store one call made the job wait for each of those writes; two took
    ``tessera embed --mode both`` on 12,837 XQuAD sentences from 68.4-69.3 to 65.1-66.6 s,
    the sample pass's forward 29 → 32 s beside the writes but the pass 4 s shorter), 2
    when the set is written to a remote store, whose round trips are waits worth
    overlapping, and 1 on a local one. Measured
    (``benchmarks/bench_embed_io.py``, 2 CPUs): the second call slows the first one's
    forward wherever the CPU or the interpreter is the bottleneck (+2% with me5-small,
    +21-31% with a 2-layer model whose forward is bound by Python's dispatch, as on a
    GPU); overlapping paid only against S3 with the fast model (steady seconds x0.85),
    while on a local store one call was as fast or faster (x1.01 me5-small, x1.06 fast model).
    """
    if cfg.calls_per_actor:
        return cfg.calls_per_actor
    return 2 if sample or location(cfg.root).is_remote else 1


def map_pieces(rows: list[dict], actor_cls, spec, p: ActorPlan, codec_url: "str | None"):
    """Ray Data: one row per piece → actor pool → whatever the actors return."""
    import ray.data
    from ray.data import ActorPoolStrategy

    # The actor's own exception (a ShardError naming shard, file and records) reaches the
    # driver instead of Ray Data's UserCodeException, whose cause does not survive pickling;
    # Ray Data's console report of it is dropped (the CLI prints one line).
    ray.data.DataContext.get_current().raise_original_map_exception = True
    quiet_ray_failure_logs()
    env = thread_env(p)
    if os.environ.get(FAILPOINTS_ENV):  # fault-injection tests reach the workers this way
        env[FAILPOINTS_ENV] = os.environ[FAILPOINTS_ENV]
    extra = {"runtime_env": {"env_vars": env}}
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    # max_restarts=0: a dead encoder actor fails the job (one line, exit 1), and the same
    # command resumes from the shards already written. Ray Data's default (restart forever,
    # retry its tasks forever) would loop on a shard that crashes its worker, and makes Ray
    # log a core_worker.cc error on every run: Ray Data passes every actor its constructor
    # arguments (ours and its own) through the object store, which a restart may not find.
    # Ray 2.60 warns that actor options passed this way are deprecated, but has no named
    # parameter for max_restarts yet.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(actor_cls, batch_size=1, batch_format="numpy",
                              fn_constructor_kwargs={"spec": spec, "codec_url": codec_url},
                              compute=ActorPoolStrategy(min_size=1, max_size=p.actors,
                                                        max_concurrent_calls_per_actor=p.calls,
                                                        # Ray Data's default is 2; more would queue on a
                                                        # busy actor what an idle one could take.
                                                        max_tasks_in_flight_per_actor=max(2, p.calls),
                                                        enable_true_multi_threading=True),
                              num_cpus=p.num_cpus, num_gpus=p.num_gpus, max_restarts=0, **extra)


WORKER_STAGES = ("load", "read", "wait", "tokenize", "forward", "post", "augment", "compress", "write")


def add_worker_stages(timings: Timings, stats: dict, prefix: str) -> None:
    """Add a shard's in-actor seconds per stage to ``timings`` as ``<prefix><stage>``."""
    for stage in WORKER_STAGES:
        if f"{stage}_seconds" in stats:
            timings.add(prefix + stage, stats[f"{stage}_seconds"])


def run_pool(rows: list[dict], actor_cls, spec, p: ActorPlan, codec_url: "str | None",
             timings: "Timings | None" = None) -> Iterator[dict]:
    """Map the piece rows over an actor pool; yield each shard's statistics as it finishes.

    ``timings["actor_start"]`` gets the pool's start-up: from the launch to the end of
    the first model load (actor processes, imports, the model), or to the start of the
    first shard's work when no shard loads one. The run pays it once whatever the corpus
    size; benchmarks report it apart from the steady state. (Measured from the shards'
    own start times: Ray Data may hold finished results back, so the arrival of the
    first one says little.)
    """
    launched = time.time()
    loaded, started = None, None
    for row in map_pieces(rows, actor_cls, spec, p, codec_url).iter_rows():
        stats = json.loads(row["stats"])
        if "started_at" in stats:
            at = max(0.0, stats["started_at"] - launched)
            started = at if started is None else min(started, at)
            # Only the call that loaded its actor's model reports load_seconds (another
            # call on that actor waits for the load): that actor was ready then.
            if stats.get("load_seconds"):
                at += stats["load_seconds"]
                loaded = at if loaded is None else min(loaded, at)
        yield stats
    ready = loaded if loaded is not None else started
    if timings is not None and ready is not None:
        timings.add("actor_start", ready)


def run_cached(rows: list[dict], spec: WorkerSpec, codec_url: str, p: ActorPlan) -> Iterator[dict]:
    """Pass 2 of shards whose every document the codec-sample pass cached, as plain Ray
    tasks (:func:`write_cached_shards`); yield each shard's statistics.

    Such a shard needs no model, only compression and writes: tasks run on the worker
    processes Ray already has warm (the codec fit's among them), where an actor pool
    would start new processes first (2-3 s on 2 CPUs, longer than the compression of a
    2,000-document corpus). On CPUs, one task per two CPUs, each with its share of the
    shards, compressing two at once on one thread each: a task per shard waited ~1 s for
    Ray to start a second worker process on 2 CPUs, longer than its shard took. On GPUs
    (``p.device == "cuda"``), one task that holds a GPU as the fit task did, whose worker
    Ray keeps for it (``jobs.embed_codec._fit_remote``'s ``keep_worker``): torch imported
    and CUDA started there already, where a new encoder pool paid both again (an H200
    node: ~6.6 s of a 14.8 s pass 2 over 23,096 sentences). No retries: a failure fails
    the job as a pool's would, and the same command resumes from the shards already written.
    """
    import ray

    if p.device == "cuda":
        n_tasks, threads = 1, max(1, p.threads)
        task = ray.remote(num_cpus=p.num_cpus, num_gpus=p.num_gpus, max_retries=0)(write_cached_shards)
    else:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        n_tasks = max(1, min(len(rows), cpus // 2))
        threads = max(1, cpus // n_tasks)
        # One CPU reserved whatever the threads: a task asking for more than is ever free at
        # once (another job's actors on a shared cluster) would wait forever.
        task = ray.remote(num_cpus=1, max_retries=0)(write_cached_shards)
    pending = [task.remote(spec, codec_url, rows[i::n_tasks], threads, os.environ.get(FAILPOINTS_ENV),
                           p.calls)
               for i in range(n_tasks)]
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for stats in ray.get(done[0]):
                yield json.loads(stats)
    finally:
        for ref in pending:  # a failed task (or a stopped driver) stops the others
            ray.cancel(ref)


def cached_as_tasks(cached: "set[int] | frozenset", augment) -> bool:
    """Whether pass 2 writes the shards in ``cached`` (every document in the codec-sample
    cache) as tasks (:func:`run_cached`): there are some and they need no model (no query
    augmentation to encode). The codec fit keeps its GPU worker for them when so."""
    return bool(cached) and not augment


def run_shards(rows: list[dict], actor_cls, spec: WorkerSpec, p: ActorPlan, codec_url: "str | None",
               timings: "Timings | None" = None, cached: "set[int] | frozenset" = frozenset()) -> Iterator[dict]:
    """Pass 2: the rows whose shard is in ``cached`` as tasks (:func:`run_cached`) where
    :func:`cached_as_tasks` says so; the others on the actor pool."""
    quick = ([r for r in rows if r["shard"] in cached] if codec_url and cached_as_tasks(cached, spec.augment)
             else [])
    if quick:
        yield from run_cached(quick, spec, codec_url, p)
    rest = [r for r in rows if r["shard"] not in cached] if quick else rows
    if rest:
        yield from run_pool(rest, actor_cls, spec, p, codec_url, timings)


def run_precision(shard_stats: list[dict], inherited: "str | None" = None) -> "str | None":
    """A version's ``workers.precision``: the type the encoders ran in for its documents
    ("bfloat16"), the types in order joined by "," where shards differ (a run resumed with
    another ``--precision``, a re-index's new documents beside its parent's), None when
    nothing was encoded. ``inherited``: the parent's value, for a version that keeps some of
    its documents. A shard marker written before this was recorded counts as "unknown"."""
    names = set(inherited.split(",")) if inherited else set()
    for stats in shard_stats:
        if stats.get("documents"):
            names.update(stats.get("precision") or ["unknown"])
    return ",".join(sorted(names)) or None


def done_shards(vdir: Location) -> dict[int, dict]:
    """Statistics of the shards whose marker exists, by shard number."""
    out = {}
    for loc in vdir.join(layout.SHARD_MARKERS).glob("*.json"):
        stats = json.loads(loc.read_text())
        out[int(stats["shard"])] = stats
    return out


def write_cached_shards(spec: WorkerSpec, codec_url: str, rows: list[dict], threads: int,
                        failpoints: "str | None" = None, calls: int = 2) -> list[str]:
    """Pass 2 of shards whose every document pass 1 cached, in a plain Ray task: read the
    cache, compress, write (``ShardEncoder``'s own code, errors included; no model).
    Returns each shard's statistics (JSON), in the order of ``rows``.

    ``max(threads, calls)`` shards at a time, each read and written in its own thread; their
    compressions in runs of documents on ``threads`` more threads, one torch (and BLAS)
    thread each: ``threads`` single-threaded compressions keep the task's CPUs busy without
    an OpenMP team per call, to the last shard (``ShardEncoder.compress_tokens``). torch's
    parallel reductions run ~1.5x slower when a thread other than a process's main thread
    starts them (two threads from a pool thread, 2 AMX cores: 507k XQuAD-sentence tokens
    compressed in 7.6 s; in the main thread 5.6; two pool threads of one thread each 5.0,
    the same codes). The first failure cancels the shards not yet started and is raised.

    On a GPU (``spec.device == "cuda"``) the nearest-centroid search runs there, as in an
    encoder actor, unless this worker started CUDA for another task with other GPUs
    (``jobs.runtime.cuda_worker_fits``; a multi-GPU node): then on this task's CPUs.

    ``threads``: the task's CPUs (Ray starts task workers with one thread).
    ``failpoints``: the driver's ``TESSERA_FAILPOINTS`` (tests).
    """
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    if failpoints:
        os.environ[FAILPOINTS_ENV] = failpoints
    else:
        os.environ.pop(FAILPOINTS_ENV, None)
    warm = CUDA_AT_START_ENV in os.environ  # a GPU task ran here before (the codec fit's)
    if spec.device == "cuda":
        if cuda_worker_fits():
            mark_cuda_worker()
        else:
            logger.warning("this worker started CUDA on other GPUs than its task's (%s): compressing on CPU",
                           os.environ.get("CUDA_VISIBLE_DEVICES"))
            spec = dataclasses.replace(spec, device="cpu")
    encoder = ShardEncoder(spec, codec_url, exclusive=False)
    if spec.device == "cuda":  # in the markers: did the codec fit's worker (CUDA started) take these shards
        encoder.stats_extra["warm_gpu_worker"] = warm
    if encoder.codec is not None and spec.device == "cpu":
        ready_bf16_search(encoder.codec.n_centroids, 1)
    one = lambda row: str(encoder({k: [v] for k, v in row.items()})["stats"][0])  # noqa: E731
    with threadpool_limits(limits=1, user_api="blas"), \
            ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="compress") as shared, \
            ThreadPoolExecutor(max_workers=max(1, threads, calls), thread_name_prefix="shard") as pool:
        encoder.compress_pool = shared  # the shards' compressions in runs any of ``threads`` takes
        futures = [pool.submit(one, row) for row in rows]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
