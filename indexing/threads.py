"""One CPU thread budget for a process that encodes queries and searches an index.

A search alternates two phases, each served by its own thread pools:

* encoding: torch's intra-op pool (its own libgomp; MKL runs on it);
* retrieval: faiss's OpenMP pool and the OpenBLAS bundled with faiss (dense kinds),
  numpy's OpenBLAS, a pthreads pool (plaid).

An idle pool busy-waits before its threads sleep: numpy's OpenBLAS workers spin for
about 0.1 s after every call, libgomp's for a few milliseconds. On a small machine the
next phase then shares the cores with the spinning threads of the previous one (encoding
a query ran 3.3x slower right after a plaid search on 2 cores). Environment variables
(``OMP_WAIT_POLICY``, ``OPENBLAS_NUM_THREADS``) only act before the runtimes start,
too late for a library, so the budget uses runtime controls:

* torch's intra-op pool gets the whole budget during encoding;
* retrieval runs with numpy's OpenBLAS (pthreads) at one thread, so it never
  wakes its workers (the products of one query are small; a batch is spread over its
  queries instead: faiss's OpenMP over the rows of the query matrix, plaid's query pool;
  a single pre-encoded plaid query splits its stages over Python threads, each calling
  BLAS at one thread);
* OpenMP (faiss; torch's libgomp serves it once torch is loaded) gets
  ``min(threads, nq)`` threads: a single query leaves no worker spinning into the
  next encoding.

Nothing here imports torch or faiss: a pool that is not loaded is not limited.
"""
from __future__ import annotations

import contextlib
import numbers
import os
import sys
from typing import Iterator

from threadpoolctl import ThreadpoolController

_CONTROLLER: "tuple[int, ThreadpoolController] | None" = None


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def check_threads(threads: "int | None") -> "int | None":
    """``threads`` as an int (None stays None); ValueError unless an integer >= 1."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1 or None, got {threads!r}")
    return int(threads)


def controller() -> ThreadpoolController:
    """The process's thread pools, found once: a scan of the loaded libraries reads
    ``/proc/self/maps`` (about 1 ms, as long as a small search). Rescanned when modules
    were imported since (a newly imported extension may bring its own BLAS or OpenMP)."""
    global _CONTROLLER
    n_modules = len(sys.modules)
    if _CONTROLLER is None or _CONTROLLER[0] != n_modules:
        _CONTROLLER = (n_modules, ThreadpoolController())
    return _CONTROLLER[1]


class ThreadBudget:
    """CPU threads shared by query encoding and retrieval, one phase at a time.

    Parameters
    ----------
    threads : threads for the process; None: :func:`available_cpus`.
    """

    def __init__(self, threads: "int | None" = None) -> None:
        self.threads = check_threads(threads) or available_cpus()

    def __repr__(self) -> str:
        return f"ThreadBudget(threads={self.threads})"

    @contextlib.contextmanager
    def encoding(self) -> Iterator[None]:
        """Encode with torch's intra-op pool at the budget; the caller's setting is put back after."""
        torch = sys.modules.get("torch")
        before = torch.get_num_threads() if torch is not None else self.threads
        if before != self.threads:
            torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            if before != self.threads:
                torch.set_num_threads(before)

    @contextlib.contextmanager
    def retrieval(self, nq: int) -> Iterator[None]:
        """Search ``nq`` queries: BLAS at one thread, OpenMP at ``min(threads, nq)``.

        faiss's OpenBLAS runs on OpenMP (its threading layer) and follows the OpenMP
        limit; numpy's, on pthreads, is the one whose workers spin for long.

        The OpenMP limit covers every libgomp loaded: faiss's wheel brings its own, but
        with torch imported first faiss's OpenMP calls resolve to torch's (one pool).
        :meth:`encoding` gives torch its budget back."""
        ctl = controller()
        with ctl.limit(limits=1, user_api="blas"), ctl.limit(limits=max(1, min(self.threads, nq)), user_api="openmp"):
            yield

