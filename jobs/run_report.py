"""Run reports: ``runs/<run id>.json``, one per run of a job that holds a set's lease.

A report is written when the run ends, whatever the outcome (published, refused,
nothing to do, busy, failed: ``jobs.errors.RUN_STATUS``), with the run's config,
counts, bytes and timings; the DuckDB catalog's ``runs`` view reads them. The lease
such a run holds is given back here too, without masking the run's own outcome.
"""
from __future__ import annotations

import logging
import os
import socket
import time
import uuid

from jobs.errors import RUN_STATUS
from storage import layout
from storage.fs import Location
from storage.lease import Lease
from storage.manifest import dumps, utcnow

logger = logging.getLogger(__name__)


class RunReport:
    """``runs/<run id>.json``: written when the run ends, whatever the outcome."""

    def __init__(self, root: Location, job: str, set_name: str, config: dict) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.root = root
        self.body: dict = {"run_id": f"{stamp}-{job}-{set_name}-{uuid.uuid4().hex[:6]}", "job": job,
                           "set": set_name, "started_at": utcnow(), "host": socket.gethostname(),
                           "pid": os.getpid(), "config": config, "counts": {}, "bytes": {}}
        self._t0 = time.perf_counter()

    @property
    def run_id(self) -> str:
        return self.body["run_id"]

    def finish(self, exit_code: int, error: "BaseException | None" = None) -> dict:
        self.body.update(status=RUN_STATUS.get(exit_code, "failed"), exit_code=exit_code, finished_at=utcnow(),
                         seconds=round(time.perf_counter() - self._t0, 3))
        if error is not None:
            self.body["error"] = f"{type(error).__name__}: {error}"
        try:
            layout.runs_dir(self.root).join(f"{self.run_id}.json").write_text(dumps(self.body))
        except Exception as err:  # noqa: BLE001 - the report must not hide the run's own outcome
            logger.error("could not write the run report %s: %s", self.run_id, err)
        return self.body


def release_lease(lease: "Lease | None") -> None:
    """Give the lease back; a failure here must not mask the run's own outcome (it expires anyway)."""
    if lease is None:
        return
    try:
        lease.release()
    except Exception as err:  # noqa: BLE001 - the run's result stands; the lease expires after its ttl
        logger.warning("could not release the lease %s (%s: %s); it expires on its own after %s s",
                       getattr(lease, "loc", "?"), type(err).__name__, err, getattr(lease, "ttl", "?"))
