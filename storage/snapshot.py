"""A corpus snapshot against a stored set version: content hashes and the diff.

Every snapshot row is hashed (sha256 of its text, and of its metadata: lang, title,
extras) piece by piece with :func:`hash_piece`; :func:`diff_snapshot` compares those
hashes with the live rows of a set version (``docs`` and ``skipped``, tombstones
applied) in DuckDB and says which rows are new, changed, unchanged or deleted. Where
the pieces are hashed (in the driver or in Ray tasks) is the job's choice
(``jobs.reindex_worker``); nothing here knows about Ray or the models.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from storage import sets
from storage.corpus import ColumnMap, CorpusFile, meta_hashes, read_rows, text_hashes
from storage.fs import Location


def hash_piece(file: dict, index: int, start: int, end: int, cols: dict) -> pa.Table:
    """Content hashes of rows ``[start, end)`` of corpus file ``file`` (``CorpusFile.to_dict()``,
    number ``index`` in the snapshot): a table of :func:`hash_schema`."""
    table = read_rows(CorpusFile.from_dict(file), start, end, ColumnMap(**cols))
    texts = table.column("text").to_pylist()
    return pa.table({"id": table.column("id"), "sha256": pa.array(text_hashes(texts), pa.string()),
                     "meta_sha256": pa.array(meta_hashes(table), pa.string()),
                     "lang": table.column("lang"), "title": table.column("title"),
                     "empty": pa.array([not (t or "").strip() for t in texts], pa.bool_()),
                     "file": pa.array(np.full(table.num_rows, index, np.int32)),
                     "row": pa.array(np.arange(start, end, dtype=np.int64))})


def hash_schema() -> pa.Schema:
    """id, sha256 (text), meta_sha256, lang, title, empty, file (index into the snapshot's files), row."""
    return pa.schema([("id", pa.string()), ("sha256", pa.string()), ("meta_sha256", pa.string()),
                      ("lang", pa.string()), ("title", pa.string()), ("empty", pa.bool_()),
                      ("file", pa.int32()), ("row", pa.int64())])


@dataclass
class Diff:
    """What a snapshot changes in a set version.

    ``todo``: snapshot rows to encode (file, row, id, status new|changed).
    ``dead``: stored rows to tombstone (id, shard, rows docs|skipped, reason changed|deleted).
    """

    todo: pa.Table
    dead: pa.Table
    unchanged: int

    def counts(self) -> dict:
        status = self.todo.column("status").to_pylist()
        reasons = self.dead.column("reason").to_pylist()
        return {"new": status.count("new"), "changed": status.count("changed"),
                "deleted": reasons.count("deleted"), "unchanged": self.unchanged,
                "snapshot": len(status) + self.unchanged}


def stored_rows(vdir: Location, manifest: dict) -> pa.Table:
    """Live rows of a set version: id, sha256, meta_sha256, lang, title, shard, rows (docs|skipped)."""
    from concurrent.futures import ThreadPoolExecutor

    def docs(f: sets.SetFile) -> pa.Table:
        t = sets.read_live(f)
        n = t.num_rows
        meta = t.column("meta_sha256") if "meta_sha256" in t.column_names else pa.nulls(n, pa.string())
        return pa.table({"id": t.column("id"), "sha256": t.column("sha256"), "meta_sha256": meta,
                         "lang": t.column("lang"), "title": t.column("title"), "shard": t.column("shard"),
                         "rows": pa.array(["docs"] * n, pa.string())})

    def skipped(f: sets.SetFile) -> pa.Table:
        t = sets.read_live(f, ["id", "shard"])
        n = t.num_rows
        return pa.table({"id": t.column("id"), "sha256": pa.nulls(n, pa.string()),
                         "meta_sha256": pa.nulls(n, pa.string()), "lang": pa.nulls(n, pa.string()),
                         "title": pa.nulls(n, pa.string()), "shard": t.column("shard"),
                         "rows": pa.array(["skipped"] * n, pa.string())})

    with ThreadPoolExecutor(max_workers=8) as pool:
        parts = list(pool.map(docs, sets.set_files(vdir, manifest, "docs")))
        parts += list(pool.map(skipped, sets.set_files(vdir, manifest, "skipped")))
    return pa.concat_tables([p.cast(parts[0].schema) for p in parts]) if parts else None


_DIFF_SQL = """
SELECT s."file", s."row", s.id, CASE WHEN o.id IS NULL THEN 'new' ELSE 'changed' END AS status,
       o.shard AS old_shard, o."rows" AS old_rows
FROM snap s LEFT JOIN old o ON s.id = o.id
WHERE o.id IS NULL OR NOT (
      (s.empty AND o."rows" = 'skipped')
   OR (NOT s.empty AND o."rows" = 'docs' AND s.sha256 = o.sha256
       AND CASE WHEN o.meta_sha256 IS NOT NULL THEN o.meta_sha256 = s.meta_sha256
                ELSE s.lang IS NOT DISTINCT FROM o.lang AND s.title IS NOT DISTINCT FROM o.title END))
ORDER BY s."file", s."row"
"""


def diff_snapshot(snapshot: pa.Table, parent_dir: Location, parent: dict) -> Diff:
    """new / changed / unchanged / deleted, computed in DuckDB over the snapshot's hashes
    and the parent version's stored rows (``docs`` and ``skipped``, tombstones applied)."""
    import duckdb

    old = stored_rows(parent_dir, parent)
    if old is None:
        old = pa.table({"id": pa.array([], pa.string()), "sha256": pa.array([], pa.string()),
                        "meta_sha256": pa.array([], pa.string()), "lang": pa.array([], pa.string()),
                        "title": pa.array([], pa.string()), "shard": pa.array([], pa.int32()),
                        "rows": pa.array([], pa.string())})
    con = duckdb.connect()
    con.register("snap", snapshot)
    con.register("old", old)
    todo = con.sql(_DIFF_SQL).to_arrow_table()
    deleted = con.sql("""SELECT o.id, o.shard, o."rows", 'deleted' AS reason FROM old o
                             ANTI JOIN snap s ON o.id = s.id ORDER BY o.shard, o.id""").to_arrow_table()
    changed = con.sql("""SELECT id, old_shard AS shard, old_rows AS "rows", 'changed' AS reason
                             FROM todo WHERE status = 'changed' ORDER BY shard, id""").to_arrow_table()
    dead = pa.concat_tables([deleted, changed.cast(deleted.schema)])
    return Diff(todo, dead, snapshot.num_rows - todo.num_rows)

