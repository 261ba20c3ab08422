"""Ray: connecting, and sizing actor pools so reads and writes are never starved."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)


def init_ray(num_cpus: "int | None" = None) -> None:
    """Join ``$RAY_ADDRESS`` if set, else start a local Ray; no-op when already connected."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        cpus = num_cpus or os.cpu_count() or 1
        # Ray starts workers at nice 15. Here the actors are the job's critical path (the
        # model forward), so on a machine shared with other work they would yield to all
        # of it while the job waits; at nice 0 they run like any foreground process.
        # RAY_worker_niceness set by the user wins; a cluster (RAY_ADDRESS) keeps its own.
        os.environ.setdefault("RAY_worker_niceness", "0")
        logger.info("starting a local Ray with %d CPUs", cpus)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


@dataclass(frozen=True)
class ActorPlan:
    """How many encoder actors and what each one reserves and uses."""

    actors: int
    num_cpus: float
    num_gpus: float
    threads: int
    device: str

    def to_dict(self) -> dict:
        return {"actors": self.actors, "num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                "threads": self.threads, "device": self.device}


def thread_env(p: ActorPlan) -> dict[str, str]:
    """Environment for the pool's actors and the codec fit: ``p.threads`` OpenMP/BLAS threads.

    Ray sets ``OMP_NUM_THREADS`` to a task's CPU reservation (1 here, so that the pool
    leaves Ray Data a CPU), which made faiss's k-means and numpy's nearest-centroid
    search in the compression run on one core of two while the other idled. torch's
    threads are set explicitly (``torch.set_num_threads``) and were never affected.
    """
    n = str(max(1, p.threads))
    return {"OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def plan_actors(cpus: float, gpus: float, *, device: str = "auto", actors: "int | None" = None,
                threads: "int | None" = None, cpus_per_node: "int | None" = None) -> ActorPlan:
    """Size the encoder pool (pure; see tests/jobs/test_plan.py).

    GPUs: one actor per GPU, each reserving 1 GPU and 1 CPU. CPUs: each actor
    reserves one CPU but runs ``threads`` torch threads (default: one node's
    CPUs shared between the actors on it), and at least one CPU stays unreserved
    so Ray Data's read, write and collect tasks always find a slot.
    """
    if device not in ("auto", "cpu", "cuda"):
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
