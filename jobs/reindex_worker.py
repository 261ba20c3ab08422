"""The re-index's work on the cluster: content-hashing the snapshot and encoding its delta.

Both go where they cost least. A snapshot of at most :data:`LOCAL_HASH_ROWS` rows is
hashed in the driver, a larger one in one Ray task per piece
(:func:`storage.snapshot.hash_piece`); a delta of at most ``local_rows`` documents is
encoded in the driver, a larger one on the embed job's actor pool. Either way the
same code writes the same shards and markers (:func:`jobs.embed.encode_shards`).
"""
from __future__ import annotations

import dataclasses
import json
import logging

import pyarrow as pa

from jobs import embed as embed_job
from jobs import plan as planner
from jobs.embed_pool import done_shards
from jobs.failpoints import failpoint
from jobs.runtime import ActorPlan
from jobs.timing import Progress
from storage.corpus import CorpusFile
from storage.fs import Location
from storage.snapshot import hash_piece, hash_schema

logger = logging.getLogger(__name__)

#: Snapshots of at most this many rows are hashed in the driver (Ray tasks above it).
LOCAL_HASH_ROWS = 20_000


def hash_snapshot(ecfg: embed_job.EmbedConfig, files: list[CorpusFile]) -> pa.Table:
    """Content hashes of every snapshot row: one Ray task per piece, or in this process
    for a snapshot of at most ``LOCAL_HASH_ROWS`` rows.

    Returns
    -------
    table: id, sha256 (text), meta_sha256, lang, title, empty, file (index into ``files``), row.
    """
    import ray

    pieces = planner.build_pieces([f.n_rows for f in files], ecfg.rows_per_shard)
    cols = dataclasses.asdict(ecfg.columns)
    total = sum(p.rows for p in pieces)
    progress = Progress("hash", total)
    if total <= LOCAL_HASH_ROWS:
        # Hashing a few thousand rows takes milliseconds; a Ray task's start-up about a second.
        results = (hash_piece(files[p.file].to_dict(), p.file, p.start, p.end, cols) for p in pieces)
    else:
        task = ray.remote(num_cpus=0.5, max_retries=3)(hash_piece)
        refs = [task.remote(files[p.file].to_dict(), p.file, p.start, p.end, cols) for p in pieces]
        results = (ray.get(ref) for ref in refs)
    parts = []
    for p, part in zip(pieces, results):
        parts.append(part)
        progress.update(p.rows)
    return pa.concat_tables(parts) if parts else hash_schema().empty_table()


def encode_delta(ecfg: embed_job.EmbedConfig, model: embed_job.ModelInfo, files: list[CorpusFile],
                 pieces: list, vdir: Location, p: ActorPlan, codec_url: "str | None", local_rows: int) -> str:
    """Encode the unfinished delta shards; return where: ``driver``, ``ray`` or ``none`` (all done).

    ``pieces``: ``jobs.plan.plan_delta``'s, each with the offsets of its changed rows.
    """
    done = done_shards(vdir)
    todo = [pc.to_dict() for pc in pieces if pc.shard not in done]
    if done:
        logger.info("%d of %d delta shards already finished; encoding the other %d", len(pieces) - len(todo),
                    len(pieces), len(todo))
    if not todo:
        return "none"
    n_rows = sum(len(json.loads(t["rows"])) for t in todo)
    progress = Progress("re-embed", n_rows)
    in_process = n_rows <= local_rows
    if in_process:
        logger.info("encoding %d rows in this process (--local-rows %d): an actor pool would cost more to start",
                    n_rows, local_rows)
    shards = embed_job.encode_shards(ecfg, model, files, todo, vdir, p, codec_url, in_process=in_process)
    for i, stats in enumerate(shards):
        progress.update(stats["rows_in"])
        failpoint("reindex.after_shards", i + 1)  # tests: the driver dies with shards half done
    return "driver" if in_process else "ray"
