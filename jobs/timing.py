"""Stage timings that end up in manifests and run reports."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator

logger = logging.getLogger(__name__)


class Timings:
    """Accumulates seconds per stage: ``with timings("encode"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + spent, 3)
            logger.info("stage %s: %.1fs", stage, spent)

    def add(self, stage: str, seconds: float) -> None:
        """Add seconds measured elsewhere (e.g. inside the actors) to ``stage``."""
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + seconds, 3)

    def to_dict(self) -> dict[str, float]:
        return dict(self.seconds)


class Progress:
    """Rows/s and ETA on the module logger (stderr through the CLI's handler)."""

    def __init__(self, what: str, total: int, every: float = 5.0) -> None:
        self.what, self.total, self.every = what, total, every
        self.done = 0
        self.start = self._last = time.perf_counter()

    def update(self, rows: int) -> None:
        self.done += rows
        now = time.perf_counter()
        if now - self._last >= self.every or self.done >= self.total:
            self._last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            logger.info("%s: %d/%d rows (%.0f%%), %.1f rows/s, ETA %s", self.what, self.done, self.total,
                        100.0 * self.done / max(self.total, 1), rate, _fmt(eta))


def _fmt(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}"
