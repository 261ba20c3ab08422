"""Fault injection for tests: ``TESSERA_FAILPOINTS`` names the places where a job fails.

The embed job, its encoder actors and the re-index call :func:`failpoint` at the
points a kill or an error teaches something (a shard, the codec fit, a re-index
stage); the variable reaches Ray's workers through the pool's runtime environment.
Unset (every real run), a failpoint costs one dictionary lookup.
"""
from __future__ import annotations

import os
import time

FAILPOINTS_ENV = "TESSERA_FAILPOINTS"


def failpoint(name: str, value: int) -> None:
    """Fault injection for tests: ``TESSERA_FAILPOINTS="embed.shard=3"`` fails shard 3.

    ``embed.shard=3:crash`` kills the worker process instead of raising;
    ``embed.shard=3:kill`` has Ray kill the worker's actor (``ray.kill``);
    ``embed.shard=3:hang`` blocks it for an hour (a job to kill while its actors run).
    """
    for item in filter(None, os.environ.get(FAILPOINTS_ENV, "").split(",")):
        key, _, target = item.partition("=")
        target, _, how = target.partition(":")
        if key == name and target.strip() == str(value):
            if how == "crash":
                os._exit(17)
            if how == "kill":
                import ray

                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                time.sleep(60)  # the kill lands while we wait
            if how == "hang":
                time.sleep(3600)
            raise RuntimeError(f"failpoint {name}={value} triggered")
