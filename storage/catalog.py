"""The DuckDB catalog: SQL views over every committed manifest and metadata shard.

Views
-----
``embedding_sets``  one row per committed set version (counts, dims, codec, model fingerprint)
``shards``          one row per file listed in a set manifest (kind, shard, rows, bytes, sha256)
``documents``       one row per live document and set version (the ``docs`` shards, tombstoned rows dropped)
``skipped``         documents a set version skipped, with the reason
``tombstones``      per re-indexed set version: the (id, shard) rows it replaced or deleted, and why
``indexes``         one row per committed index version (when any exist)
``encoders``        one row per committed query-encoder version (when any exist)
``runs``            one row per job run report (re-index: new/changed/deleted/unchanged, bytes, decision)

Only committed versions appear: a version without a manifest is invisible.
s3:// roots are read through the s3fs filesystem registered with DuckDB.
"""
from __future__ import annotations

import json
import logging

import duckdb

from storage import layout
from storage.fs import Location, location
from storage.manifest import Artifact, pinned_index
from storage.sets import entry_location

logger = logging.getLogger(__name__)


class _Pointers:
    """``CURRENT`` bodies read once per connection: a set and the indexes it pins are
    judged current from the same read, so the views never pair a new set with an old index."""

    def __init__(self, root: Location) -> None:
        self.root, self._cache = root, {}

    def body(self, kind: str, name: str) -> "dict | None":
        if (kind, name) not in self._cache:
            self._cache[(kind, name)] = Artifact(self.root, kind, name).pointer()
        return self._cache[(kind, name)]

    def current(self, kind: str, name: str) -> "str | None":
        body = self.body(kind, name)
        if body is None:
            return None
        if kind == "indexes" and body.get("set"):
            pinned = pinned_index(self.body("sets", body["set"]), name)
            if pinned:
                return pinned
        return body["version"]


def _manifests(root: Location, kind: str, pointers: "_Pointers | None" = None) -> list[dict]:
    """Committed manifests of ``kind`` with ``is_current`` and ``_dir`` added (one glob, not a walk)."""
    pointers = pointers or _Pointers(root)
    found = root.glob(f"{kind}/*/v*/{layout.MANIFEST}")
    out = []
    for loc in found:
        m = json.loads(loc.read_text())
        m["is_current"] = m["version"] == pointers.current(kind, m["name"])
        m["_dir"] = loc.url.rsplit("/", 1)[0]
        out.append(m)
    return sorted(out, key=lambda m: (m["name"], layout.version_number(m["version"])))


def _q(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _file_url(m: dict, entry: dict) -> str:
    return entry_location(Location(m["_dir"]), entry).url


def connect(root: "str | Location", con: "duckdb.DuckDBPyConnection | None" = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the catalog views of ``root`` defined."""
    root = location(root)
    con = con or duckdb.connect()
    if root.is_remote:
        con.register_filesystem(root.fs)
    pointers = _Pointers(root)
    sets = _manifests(root, "sets", pointers)
    _table(con, "embedding_sets", [_set_row(m) for m in sets], _SET_COLUMNS)
    _table(con, "shards", [dict(set_name=m["name"], version=m["version"], is_current=m["is_current"],
                                kind=e["kind"], shard=e.get("shard"), path=_file_url(m, e), rows=e["rows"],
                                bytes=e["bytes"], sha256=e["sha256"])
                           for m in sets for e in m["files"]], _SHARD_COLUMNS)
    _parquet_view(con, "tombstones", sets, "tombstones",
                  "id VARCHAR, shard INTEGER, rows VARCHAR, reason VARCHAR, tombstoned_in VARCHAR")
    _parquet_view(con, "documents", sets, "docs",
                  "id VARCHAR, lang VARCHAR, title VARCHAR, sha256 VARCHAR, n_chars INTEGER, "
                  "n_tokens INTEGER, truncated BOOLEAN, shard INTEGER, meta_sha256 VARCHAR", dead="docs")
    _parquet_view(con, "skipped", sets, "skipped", "id VARCHAR, reason VARCHAR, shard INTEGER", dead="skipped")
    for kind, view in (("indexes", "indexes"), ("encoders", "encoders")):
        rows = [_generic_row(m) for m in _manifests(root, kind, pointers)]
        _table(con, view, rows, _GENERIC_COLUMNS)
    runs = [json.loads(loc.read_text()) for loc in root.glob("runs/*.json")]
    _table(con, "runs", [_run_row(r) for r in runs], _RUN_COLUMNS)
    return con


_SET_COLUMNS = {
    "set_name": "VARCHAR", "version": "VARCHAR", "is_current": "BOOLEAN", "created_at": "VARCHAR",
    "committed_at": "VARCHAR", "documents": "BIGINT", "skipped_empty": "BIGINT", "tokens": "BIGINT",
    "truncated": "BIGINT", "shards": "BIGINT", "dense_dim": "INTEGER", "colbert_dim": "INTEGER",
    "nbits": "INTEGER", "n_centroids": "INTEGER", "model_fingerprint": "VARCHAR", "model_path": "VARCHAR",
    "parent": "VARCHAR", "bytes": "BIGINT", "path": "VARCHAR",
}
_SHARD_COLUMNS = {"set_name": "VARCHAR", "version": "VARCHAR", "is_current": "BOOLEAN", "kind": "VARCHAR",
                  "shard": "INTEGER", "path": "VARCHAR", "rows": "BIGINT", "bytes": "BIGINT",
                  "sha256": "VARCHAR"}
_GENERIC_COLUMNS = {"name": "VARCHAR", "version": "VARCHAR", "is_current": "BOOLEAN",
                    "committed_at": "VARCHAR", "set_name": "VARCHAR", "set_version": "VARCHAR",
                    "index_kind": "VARCHAR", "model_fingerprint": "VARCHAR", "bytes": "BIGINT",
                    "manifest": "VARCHAR"}
_RUN_COLUMNS = {"run_id": "VARCHAR", "job": "VARCHAR", "set_name": "VARCHAR", "started_at": "VARCHAR",
                "finished_at": "VARCHAR", "status": "VARCHAR", "exit_code": "INTEGER", "version": "VARCHAR",
                "parent": "VARCHAR", "new": "BIGINT", "changed": "BIGINT", "deleted": "BIGINT",
                "unchanged": "BIGINT", "bytes_written": "BIGINT", "bytes_reused": "BIGINT",
                "decision": "VARCHAR", "seconds": "DOUBLE", "error": "VARCHAR", "report": "VARCHAR"}


def _set_row(m: dict) -> dict:
    codec = m.get("codec") or {}
    counts = m.get("counts", {})
    return {
        "set_name": m["name"], "version": m["version"], "is_current": m["is_current"],
        "created_at": m.get("created_at"), "committed_at": m.get("committed_at"),
        "documents": counts.get("documents"), "skipped_empty": counts.get("skipped_empty"),
        "tokens": counts.get("tokens"), "truncated": counts.get("truncated"), "shards": counts.get("shards"),
        "dense_dim": m.get("dims", {}).get("dense"), "colbert_dim": m.get("dims", {}).get("colbert"),
        "nbits": codec.get("nbits"), "n_centroids": codec.get("n_centroids"),
        "model_fingerprint": m.get("model", {}).get("fingerprint"), "model_path": m.get("model", {}).get("path"),
        "parent": m.get("parent"), "bytes": sum(e["bytes"] for e in m.get("files", [])), "path": m["_dir"],
    }


def _generic_row(m: dict) -> dict:
    src = m.get("source", {})
    return {"name": m["name"], "version": m["version"], "is_current": m["is_current"],
            "committed_at": m.get("committed_at"), "set_name": src.get("set"), "set_version": src.get("version"),
            "index_kind": m.get("index_kind"), "model_fingerprint": src.get("fingerprint"),
            "bytes": sum(e.get("bytes", 0) for e in m.get("files", [])),
            "manifest": json.dumps({k: v for k, v in m.items() if k != "_dir"}, default=str)}


def _run_row(r: dict) -> dict:
    counts, io = r.get("counts") or {}, r.get("bytes") or {}
    return {"run_id": r.get("run_id"), "job": r.get("job"), "set_name": r.get("set"),
            "started_at": r.get("started_at"), "finished_at": r.get("finished_at"), "status": r.get("status"),
            "exit_code": r.get("exit_code"), "version": r.get("version"), "parent": r.get("parent"),
            "new": counts.get("new"), "changed": counts.get("changed"), "deleted": counts.get("deleted"),
            "unchanged": counts.get("unchanged"), "bytes_written": io.get("written"), "bytes_reused": io.get("reused"),
            "decision": (r.get("decision") or {}).get("mode"), "seconds": r.get("seconds"), "error": r.get("error"),
            "report": json.dumps(r, default=str)}


def _table(con: duckdb.DuckDBPyConnection, name: str, rows: list[dict], columns: dict[str, str]) -> None:
    """A small in-memory table from Python rows (manifests are small: no Parquet needed)."""
    cols = ", ".join(f'"{c}" {t}' for c, t in columns.items())
    con.execute(f'CREATE OR REPLACE TEMP TABLE "{name}" ({cols})')
    if rows:
        placeholders = ", ".join("?" for _ in columns)
        con.executemany(f'INSERT INTO "{name}" VALUES ({placeholders})',
                        [[r.get(c) for c in columns] for r in rows])


def _parquet_view(con: duckdb.DuckDBPyConnection, name: str, sets: list[dict], kind: str, empty: str,
                  dead: "str | None" = None) -> None:
    """A view over one kind of file of every committed set version.

    ``dead``: drop the rows the version's tombstones name in files of that kind
    (``docs`` or ``skipped``): a re-indexed version reuses its parent's shards,
    with the replaced and deleted documents tombstoned.
    """
    parts = []
    for m in sets:
        files = [_file_url(m, e) for e in m["files"] if e["kind"] == kind]
        if not files:
            continue
        listing = "[" + ", ".join(_q(f) for f in files) + "]"
        select = (f"SELECT {_q(m['name'])} AS set_name, {_q(m['version'])} AS version, "
                  f"{'TRUE' if m['is_current'] else 'FALSE'} AS is_current, * "
                  f"FROM read_parquet({listing}, union_by_name = true)")
        graves = [_file_url(m, e) for e in m["files"] if e["kind"] == "tombstones"]
        if dead and graves:
            select = (f"SELECT f.* FROM ({select}) f ANTI JOIN (SELECT id, shard FROM "
                      f"read_parquet({_q(graves[0])}) WHERE \"rows\" = {_q(dead)}) t "
                      f"ON f.id = t.id AND f.shard = t.shard")
        parts.append(select)
    if parts:
        sql = " UNION ALL BY NAME ".join(parts)
    else:
        cols = ", ".join(f"NULL::{t.split(' ')[1]} AS {t.split(' ')[0]}" for t in empty.split(", "))
        sql = f"SELECT NULL::VARCHAR AS set_name, NULL::VARCHAR AS version, NULL::BOOLEAN AS is_current, {cols} LIMIT 0"
    con.execute(f'CREATE OR REPLACE TEMP VIEW "{name}" AS {sql}')


def query(root: "str | Location", sql: str) -> tuple[list[str], list[tuple]]:
    """Run ``sql`` against the catalog of ``root``; return (column names, rows)."""
    con = connect(root)
    try:
        cur = con.execute(sql)
    except duckdb.Error as err:
        raise ValueError(f"SQL error: {err}") from err
    columns = [d[0] for d in cur.description] if cur.description else []
    return columns, cur.fetchall()
