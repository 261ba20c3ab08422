"""Reading a committed embedding-set version file by file, tombstones applied.

A version written by ``tessera reindex`` reuses its parent's shards by reference:
its manifest names them ``../v000001/dense/part-00003.parquet`` (relative, so a
store can be moved or copied as a whole), and no byte is copied. Documents that
were deleted from the corpus, or replaced by a newer text, are recorded as
*tombstones*: ``(id, shard, rows)`` rows of the version's ``tombstones.parquet``,
where ``rows`` says which files of the shard hold the id: ``docs`` (then also its
``dense`` and ``tokens`` files) or ``skipped`` (a document skipped for empty text).
A row is live unless tombstoned; shard numbers are unique within a set's lineage,
so the triple names one row.

Every reader of a set's rows (index builds, search, re-tuning, the DuckDB
catalog) goes through :func:`set_files` and :func:`read_live`, so none of them
can see a dead row.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage import schemas
from storage.fs import Location

TOMBSTONES = "tombstones.parquet"
TOMBSTONE_SCHEMA = pa.schema([("id", pa.string()), ("shard", pa.int32()), ("rows", pa.string()),
                              ("reason", pa.string()), ("tombstoned_in", pa.string())])
ROW_FILES = {"docs": "docs", "dense": "docs", "tokens": "docs", "skipped": "skipped",
             "dense_aug": "docs", "tokens_aug": "docs"}  # xQG-augmented vectors: one row per document too
REASONS = ("deleted", "changed")


def entry_location(vdir: Location, entry: dict) -> Location:
    """Where a manifest ``files`` entry lives: relative to ``vdir`` unless absolute or a URL."""
    path = entry["path"]
    return Location(path) if "://" in path or path.startswith("/") else vdir.join(path)


@dataclass(frozen=True)
class SetFile:
    """One Parquet file of a set version and the ids tombstoned in it.

    Attributes
    ----------
    url : where it lives.
    kind : ``docs``, ``dense``, ``tokens``, ``skipped``, or ``dense_aug``/``tokens_aug`` (augmented vectors).
    shard : the shard number (unique within the set's lineage).
    rows : rows in the file, live or not.
    dead : ids of the file's rows that are tombstoned in this version.
    """

    url: str
    kind: str
    shard: int
    rows: int
    dead: frozenset = field(default_factory=frozenset)

    @property
    def live_rows(self) -> int:
        return self.rows - len(self.dead)


def read_tombstones(vdir: Location, manifest: dict) -> pa.Table:
    """The version's tombstones (``TOMBSTONE_SCHEMA``: id, shard, rows, reason, tombstoned_in);
    empty for a version without any."""
    entries = [e for e in manifest.get("files", []) if e.get("kind") == "tombstones"]
    if not entries:
        return TOMBSTONE_SCHEMA.empty_table()
    return schemas.read_table(entry_location(vdir, entries[0])).cast(TOMBSTONE_SCHEMA)


def dead_by_shard(tombstones: pa.Table, kind: str) -> dict[int, frozenset]:
    """``{shard: frozenset of ids}`` tombstoned in the files of ``kind``."""
    out: dict[int, set] = {}
    rows = ROW_FILES[kind]
    for sid, shard, where in zip(tombstones.column("id").to_pylist(), tombstones.column("shard").to_pylist(),
                                 tombstones.column("rows").to_pylist()):
        if where == rows:
            out.setdefault(int(shard), set()).add(sid)
    return {k: frozenset(v) for k, v in out.items()}


def set_files(vdir: Location, manifest: dict, kind: str) -> list[SetFile]:
    """The version's files of ``kind``, by shard, each with its tombstoned ids."""
    dead = dead_by_shard(read_tombstones(vdir, manifest), kind)
    entries = sorted((e for e in manifest.get("files", []) if e.get("kind") == kind),
                     key=lambda e: e.get("shard", 0))
    return [SetFile(entry_location(vdir, e).url, kind, int(e.get("shard", 0)), int(e["rows"]),
                    dead.get(int(e.get("shard", 0)), frozenset())) for e in entries]


def read_live(f: SetFile, columns: "list[str] | None" = None) -> pa.Table:
    """The live rows of ``f`` (all columns, or ``columns``), in file order."""
    want = None if columns is None else (columns if "id" in columns or not f.dead else ["id", *columns])
    table = schemas.read_table(Location(f.url), want)
    if f.dead:
        dead = pa.array(sorted(f.dead), pa.string())
        keep = pc.invert(pc.is_in(table.column("id"), value_set=dead))
        table = table.filter(keep)
    if columns is not None and "id" not in columns and "id" in table.column_names:
        table = table.drop_columns(["id"])
    return table


def live_ids(files: list[SetFile]) -> pa.StringArray:
    """Ids of the live rows of ``files`` in order (positional order of a full index build)."""
    parts = [read_live(f, ["id"]).column("id").combine_chunks() for f in files]
    return pa.concat_arrays(parts) if parts else pa.array([], pa.string())


def tombstone_table(ids: list[str], shards: list[int], rows: list[str], reasons: list[str],
                    version: str) -> pa.Table:
    """Build a tombstone table; ``rows`` are ``docs`` or ``skipped``, ``reasons`` ``deleted`` or ``changed``."""
    bad = sorted(set(reasons) - set(REASONS)) + sorted(set(rows) - {"docs", "skipped"})
    if bad:
        raise ValueError(f"unknown tombstone reason(s) or row file(s) {bad}")
    n = len(ids)
    return pa.table({"id": pa.array(ids, pa.string()), "shard": pa.array(np.asarray(shards, np.int32)),
                     "rows": pa.array(rows, pa.string()),
                     "reason": pa.array(reasons, pa.string()), "tombstoned_in": pa.array([version] * n, pa.string())},
                    schema=TOMBSTONE_SCHEMA)
