"""Ray: connecting, stopping with the driver, and sizing actor pools so reads and writes are never starved."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

#: Marks the processes of a local Ray started by ``init_ray`` (see jobs/watchdog.py).
OWNER_ENV = "TESSERA_LOCAL_RAY"
#: The folder Tessera's packages are imported from: the repository for an editable install,
#: ``site-packages`` for a wheel. ``ray.init`` runs from it (:func:`code_root_cwd`).
CODE_ROOT = str(Path(__file__).resolve().parents[1])
#: The watchdogs this process started. They run until it exits, so their Popen objects are
#: kept for as long (a dropped one warns "subprocess ... is still running").
_WATCHDOGS: "list[subprocess.Popen]" = []


class Terminated(KeyboardInterrupt):
    """SIGTERM reached the driver: the job unwinds as on Ctrl+C, and the CLI exits with 143.

    A ``KeyboardInterrupt`` so that whatever cleans up after an interrupt (a lease's
    release, a run report, Ray's own ``ray.get``) does so for SIGTERM too; claimed
    versions and finished shards stay, and the same command resumes them.
    """

    exit_code = 128 + signal.SIGTERM


class _Interrupt:
    """SIGINT/SIGTERM handler: the first signal raises in the main thread, a second exits at once."""

    def __init__(self) -> None:
        self.raised = False

    def __call__(self, signum: int, frame) -> None:
        if self.raised:  # cleanup hangs or the user insists: go now; the watchdog stops a local Ray
            os._exit(128 + signum)
        self.raised = True
        if signum == signal.SIGTERM:
            raise Terminated("terminated by SIGTERM")
        raise KeyboardInterrupt


def handle_interrupts() -> None:
    """SIGTERM raises ``Terminated`` and SIGINT ``KeyboardInterrupt`` (main thread only).

    The CLI calls it first; ``init_ray`` puts it back after ``ray.init``, which replaces it
    (its core worker's handler dumps a stack trace and aborts: no cleanup, exit 134).
    Ignored signals stay ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    handler = _Interrupt()
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, handler)


@contextlib.contextmanager
def code_root_cwd() -> Iterator[None]:
    """Inside: the working directory is :data:`CODE_ROOT`; after it, what it was.

    Ray puts the driver's working directory at ``ray.init`` first on every worker's
    ``sys.path`` (and a local Ray's processes start in it), ahead of the installed packages.
    Tessera's top-level packages have common names (``jobs``, ``storage``, ``embedding``,
    ``indexing``): run from a folder that holds a ``storage.py`` or a ``jobs/`` package of the
    user's own, the workers imported those instead of Tessera's (the job failed with the
    user's module's error, or ran other code), and a checkout's worktree ran another
    checkout's code in its workers (the twenty-ninth session's A/B). From :data:`CODE_ROOT`
    the workers import the code the driver runs. Every path a worker is given is absolute
    (``storage.fs.Location`` resolves local ones in the driver); a relative ``$RAY_TMPDIR``
    is made absolute first, as Ray would have read it. Where :data:`CODE_ROOT` is no folder
    to enter (an import from a zip), nothing changes: Ray's default, as before."""
    try:
        before = os.getcwd()
    except OSError:  # a deleted working directory: nothing to go back to
        before = None
    tmpdir = os.environ.get("RAY_TMPDIR")
    if tmpdir and not os.path.isabs(tmpdir) and before is not None:
        os.environ["RAY_TMPDIR"] = os.path.join(before, tmpdir)
    try:
        os.chdir(CODE_ROOT)
    except OSError as err:  # not a folder (a zip import) or not enterable: Ray's default, as before
        logger.debug("ray.init from the working directory: %s", err)
    try:
        yield
    finally:
        if before is not None:
            os.chdir(before)


def init_ray(num_cpus: "int | None" = None) -> None:
    """Join ``$RAY_ADDRESS`` if set, else start a local Ray; no-op when already connected.

    A local Ray is the driver's own: ``ray.shutdown`` stops it when the driver exits (Ray's
    atexit hook, also after SIGTERM/SIGINT with ``handle_interrupts``), and a watchdog
    stops what is left of it if the driver is killed (SIGKILL, OOM). A cluster at
    ``$RAY_ADDRESS`` is only joined: nothing here ever stops it.
    """
    import ray

    arrow_pool()  # the driver's own (its reads of the corpus, the index builds' merges)
    if ray.is_initialized():
        quiet_ray_console()
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray's own INFO lines ("Started a local Ray instance") only with -v; its log files keep them.
    level = logging.INFO if logger.isEnabledFor(logging.DEBUG) else logging.WARNING
    # ray.init replaces the SIGTERM handler (in the main thread); ours is put back after it.
    main = threading.current_thread() is threading.main_thread()
    interrupts = signal.getsignal(signal.SIGTERM) if main else None
    address = os.environ.get("RAY_ADDRESS")
    try:
        if address:
            logger.info("connecting to the Ray cluster at %s", address)
            with code_root_cwd():
                ray.init(address=address, log_to_driver=True, logging_level=level)
        else:
            cpus = num_cpus or os.cpu_count() or 1
            # Ray starts workers at nice 15. Here the actors are the job's critical path (the
            # model forward), so on a machine shared with other work they would yield to all
            # of it while the job waits; at nice 0 they run like any foreground process.
            # RAY_worker_niceness set by the user wins; a cluster (RAY_ADDRESS) keeps its own.
            os.environ.setdefault("RAY_worker_niceness", "0")
            # Every process of the local Ray inherits the driver's environment: Arrow's
            # allocator for all of them (see arrow_pool).
            os.environ.setdefault(ARROW_POOL_ENV, ARROW_POOL)
            logger.info("starting a local Ray with %d CPUs", cpus)
            token = start_watchdog()
            # Only the processes started now inherit the marker (the raylet passes it on to
            # its agents and workers); later children of the driver don't.
            if token:
                os.environ[OWNER_ENV] = token
            try:
                with code_root_cwd():
                    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True, logging_level=level)
            finally:
                os.environ.pop(OWNER_ENV, None)
    except SystemExit as err:  # Ray's own SIGTERM handler, while ray.init ran
        if isinstance(interrupts, _Interrupt) and err.code == signal.SIGTERM:
            raise Terminated("terminated by SIGTERM") from None
        raise
    finally:
        if isinstance(interrupts, _Interrupt):
            signal.signal(signal.SIGTERM, interrupts)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    quiet_ray_console()


class _RayDataConsoleFilter(logging.Filter):
    """Ray Data's console lines that say nothing to a Tessera user: its INFO records
    ("Starting execution of Dataset", "Execution plan", "execution finished") unless the
    CLI runs with -v, and the warning that its progress bars are off (jobs.timing reports
    progress instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Progress bars disabled"):
            return False
        return record.levelno >= logging.WARNING or logger.isEnabledFor(logging.DEBUG)


def quiet_ray_console() -> None:
    """Keep Ray Data's chatter off stderr; its log file (``logs/ray-data`` in Ray's session
    folder) still gets every record. Idempotent."""
    for handler in logging.getLogger("ray.data").handlers:
        if "File" in type(handler).__name__:
            continue
        if not any(isinstance(f, _RayDataConsoleFilter) for f in handler.filters):
            handler.addFilter(_RayDataConsoleFilter())


def start_watchdog() -> "str | None":
    """Start jobs/watchdog.py for this driver; return the marker token for the local Ray's processes.

    None where it can't work (no /proc: not Linux) or fails to start (the job goes on:
    Ray's own fate-sharing still stops everything but the raylet's agents).
    """
    if not os.path.isdir("/proc/self"):
        return None
    token = f"{os.getpid()}-{uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if k != OWNER_ENV}
    try:
        # Its own session: a kill of the driver's process group must not take it along.
        _WATCHDOGS.append(subprocess.Popen(
            [sys.executable, "-I", str(Path(__file__).with_name("watchdog.py")), str(os.getpid()), token],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True))
    except OSError as err:
        logger.warning("no watchdog for the local Ray (%s): a killed driver may leave Ray's agents "
                       "running for a minute", err)
        return None
    return token


@dataclass(frozen=True)
class ActorPlan:
    """How many encoder actors and what each one reserves and uses."""

    actors: int
    num_cpus: float
    num_gpus: float
    threads: int
    device: str
    #: shards an actor holds at once (``jobs.embed_pool.calls_per_actor``)
    calls: int = 1

    def to_dict(self) -> dict:
        return {"actors": self.actors, "num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                "threads": self.threads, "device": self.device, "calls": self.calls}


#: Arrow's own switch for its default allocator (read when a process first allocates)
ARROW_POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"
#: the allocator a job's processes give Arrow unless ``$ARROW_DEFAULT_MEMORY_POOL`` names one
ARROW_POOL = "system"


def arrow_pool() -> None:
    """Give this process's Arrow allocations to the pool ``$ARROW_DEFAULT_MEMORY_POOL`` names
    (``system``, ``jemalloc``, ``mimalloc``), else to :data:`ARROW_POOL` (glibc's malloc).
    Idempotent; the variable set after this process's first allocation is followed too.

    pyarrow's default, mimalloc, hands the memory of a freed buffer back to the kernel
    within milliseconds, so each of a job's large Parquet reads and writes (a shard's
    codec-sample cache: ~100 MB of float16 per 3,200 XQuAD sentences) touches fresh pages
    again; where first touches are slow (this repository's VM: 160-320 MB/s against
    several GB/s for memory freed a moment before) that was the larger part of those
    steps. The first Parquet write of a 3,210-row dense table after a forward pass took
    190-285 ms with mimalloc, 24 ms with the system pool or jemalloc (17-24 ms for the
    ones after it, either way). Called by each of the embed job's processes (the driver,
    the encoder actors, the codec fit and pass 2's tasks) and by the index build's tasks that
    read Parquet, which covers a cluster's workers (``$RAY_ADDRESS``); :func:`init_ray` also
    sets the variable for the local Ray it starts, whose every process inherits it.
    """
    import pyarrow as pa

    name = os.environ.get(ARROW_POOL_ENV) or ARROW_POOL
    if pa.default_memory_pool().backend_name == name:
        return
    make = {"system": pa.system_memory_pool, "jemalloc": pa.jemalloc_memory_pool,
            "mimalloc": pa.mimalloc_memory_pool}.get(name)
    try:
        pool = make() if make is not None else None
    except NotImplementedError:  # a pyarrow built without it
        pool = None
    if pool is None:
        logger.warning("%s=%r: no such Arrow memory pool here; keeping %s", ARROW_POOL_ENV, name,
                       pa.default_memory_pool().backend_name)
        return
    pa.set_memory_pool(pool)


#: numpy's own switch for asking the kernel for transparent huge pages (read at its import)
NUMPY_HUGEPAGE_ENV = "NUMPY_MADVISE_HUGEPAGE"


@contextlib.contextmanager
def small_pages() -> Iterator[None]:
    """Inside: numpy asks for no transparent huge pages for the process's new large arrays,
    unless ``$NUMPY_MADVISE_HUGEPAGE`` says what to do (then numpy already did as it says);
    after it, numpy's setting as it was.

    numpy marks each array of 4 MiB or more ``MADV_HUGEPAGE``. Where the kernel's THP
    ``defrag`` setting is ``madvise`` (the common default) a first touch of such memory
    compacts memory synchronously when no free 2 MiB page is at hand, and how long that
    takes depends on what the machine did before: the first write of a fresh 780 MB
    float32 array (the normalised sample of a 507k-token codec fit) took 0.13-1.9 s with
    it and 0.25 s without, run after run (2 Xeon cores, THP ``madvise``). The fit of
    those 507k tokens (k=8,192, 4 iterations, bfloat16) took 10.4-12.3 s with it and
    10.1-10.2 without, three interleaved rounds, the same codec byte for byte. Called
    by the embed job's fit task only: in the encoder actors too, the whole job was no
    faster (XQuAD sentences, both modes: steady ratio 0.484-0.494 over three rounds
    against 0.494-0.510 over five), their pass-2 compression and cache writes slower
    (6.5-7.4 s against 5.8-6.2; 3.3-3.4 against 2.7-3.2), huge pages serving them better.
    """
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 / 1.x: the same private switch
    setter = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    if os.environ.get(NUMPY_HUGEPAGE_ENV) is not None or setter is None:
        yield
        return
    before = setter(False)
    try:
        yield
    finally:
        setter(before)


#: the ``CUDA_VISIBLE_DEVICES`` of a worker process's first GPU task (:func:`mark_cuda_worker`)
CUDA_AT_START_ENV = "TESSERA_CUDA_DEVICES_AT_START"


def mark_cuda_worker() -> None:
    """Record, in this Ray worker's environment, the GPUs Ray gave the first GPU task it ran
    (its ``CUDA_VISIBLE_DEVICES``): CUDA starts once per process, with those, and a later task
    Ray hands the same process (``max_calls=0``) may be given others (:func:`cuda_worker_fits`)."""
    os.environ.setdefault(CUDA_AT_START_ENV, os.environ.get("CUDA_VISIBLE_DEVICES", ""))


def cuda_worker_fits() -> bool:
    """Whether the GPUs this process started CUDA with (:func:`mark_cuda_worker`), if it did,
    are the ones Ray gave its current task."""
    first = os.environ.get(CUDA_AT_START_ENV)
    return first is None or first == os.environ.get("CUDA_VISIBLE_DEVICES", "")


def thread_env(p: ActorPlan) -> dict[str, str]:
    """Environment for the pool's actors and the codec fit: ``p.threads`` OpenMP/BLAS threads.

    Ray sets ``OMP_NUM_THREADS`` to a task's CPU reservation (1 here, so that the pool
    leaves Ray Data a CPU), which made faiss's k-means and numpy's nearest-centroid
    search in the compression run on one core of two while the other idled. torch's
    threads are set explicitly (``torch.set_num_threads``) and were never affected.

    The fast tokenizer encodes a shard's texts on ``p.threads`` threads too (Rayon's pool):
    the CLI turns its parallelism off in the driver, which may fork after tokenising
    (``tessera search`` starting Ray), and the actors inherited that; they never fork,
    and a shard's tokenisation runs while the forward waits for it. 4,096 XQuAD
    sentences took 0.26-0.34 s to tokenise on 2 threads against 0.52-0.77 s on one.
    """
    n = str(max(1, p.threads))
    return {"OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n,
            "TOKENIZERS_PARALLELISM": "true" if p.threads > 1 else "false", "RAYON_NUM_THREADS": n}


#: Where a job's encoders run: ``auto`` takes the GPUs when the cluster has them.
DEVICES = ("auto", "cpu", "cuda")


def plan_actors(cpus: float, gpus: float, *, device: str = "auto", actors: "int | None" = None,
                threads: "int | None" = None, cpus_per_node: "int | None" = None) -> ActorPlan:
    """Size the encoder pool (pure; see tests/jobs/test_plan.py).

    GPUs: one actor per GPU, each reserving 1 GPU and 1 CPU. CPUs: each actor
    reserves one CPU but runs ``threads`` torch threads (default: one node's
    CPUs shared between the actors on it), and at least one CPU stays unreserved
    so Ray Data's read, write and collect tasks always find a slot.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    use_gpu = gpus >= 1 and device in ("auto", "cuda")
    if device == "cuda" and gpus < 1:
        raise ValueError("device 'cuda' was asked for but the Ray cluster has no GPU")
    if use_gpu:
        n = min(actors or int(gpus), int(gpus))
        return ActorPlan(max(1, n), 1.0, 1.0, threads or 4, "cuda")
    total = max(1, int(cpus))
    t = threads or cpus_per_node or total
    n = actors or max(1, total // t)
    if total > 1:
        n = min(n, total - 1)  # one CPU always left for Ray Data's own tasks
    return ActorPlan(max(1, n), 1.0 if total > 1 else 0.5, 0.0, t, "cpu")
