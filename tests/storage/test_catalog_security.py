"""The catalog is read-only and filters cannot inject (issue 14, items 1, 2 and 7).

A small store is written by hand (two committed versions of one set, the second current
and re-indexed with tombstones; a third committed but never published), so these tests
need neither Ray nor a model. The attacks go through :func:`storage.catalog.query`,
:func:`storage.catalog.check_filter` and the ``tessera sql`` command line; each must be
refused before it runs: nothing written, no file content in the message.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import catalog
from storage.catalog import CatalogError, check_filter, check_select
from storage.fs import location
from storage.manifest import Artifact

REPO = Path(__file__).resolve().parents[2]
SECRET = "TOPSECRET-4f1c"


def _parquet(loc, table: pa.Table) -> dict:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    loc.write_bytes(data)
    return {"bytes": len(data), "sha256": loc.sha256(), "rows": table.num_rows}


def _docs(ids: list[str], year: int, shard: int) -> pa.Table:
    n = len(ids)
    return pa.table({"id": ids, "lang": ["en" if i % 2 else "de" for i in range(n)], "title": [None] * n,
                     "sha256": ["0" * 64] * n, "n_chars": [10] * n, "n_tokens": [3] * n, "truncated": [False] * n,
                     "shard": pa.array([shard] * n, pa.int32()), "meta_sha256": ["1" * 64] * n,
                     "year": [year + i for i in range(n)]})


def _version(art: Artifact, files: dict, parent: "str | None") -> str:
    """Commit a version holding ``files`` ({relative path: (kind, shard, table)})."""
    version, _ = art.claim(f"key-{len(art.versions())}", {})
    vdir = art.version_dir(version)
    entries = []
    for rel, (kind, shard, table) in files.items():
        info = _parquet(vdir.join(rel), table)
        entry = {"path": rel, "kind": kind, **info}
        if shard is not None:
            entry["shard"] = shard
        entries.append(entry)
    art.commit(version, {"files": entries, "counts": {}, "parent": parent, "model": {"fingerprint": "f"}})
    return version


def build_store(root: str) -> str:
    """Set ``t``: v1 (4 docs, 1 skipped), v2 = v1's shard reused, d1 deleted, d5 added (current),
    v3 committed but not published. Returns ``root``."""
    art = Artifact(location(root), "sets", "t")
    v1 = _version(art, {"docs/part-00000.parquet": ("docs", 0, _docs(["d0", "d1", "d2", "d3"], 2000, 0)),
                        "skipped/part-00000.parquet": ("skipped", 0, pa.table({
                            "id": ["e0"], "reason": ["empty_text"], "shard": pa.array([0], pa.int32())}))}, None)
    art.publish(v1)
    graves = pa.table({"id": ["d1"], "shard": pa.array([0], pa.int32()), "rows": ["docs"], "reason": ["deleted"],
                       "tombstoned_in": ["v000002"]})
    version, _ = art.claim("key-v2", {})
    vdir = art.version_dir(version)
    reused = {"path": "../v000001/docs/part-00000.parquet", "kind": "docs", "shard": 0,
              **_parquet(vdir.join("../v000001/docs/part-00000.parquet"), _docs(["d0", "d1", "d2", "d3"], 2000, 0))}
    new = {"path": "docs/part-00001.parquet", "kind": "docs", "shard": 1,
           **_parquet(vdir.join("docs/part-00001.parquet"), _docs(["d5"], 2010, 1))}
    tomb = {"path": "tombstones.parquet", "kind": "tombstones", **_parquet(vdir.join("tombstones.parquet"), graves)}
    art.commit(version, {"files": [reused, new, tomb], "counts": {}, "parent": v1, "model": {"fingerprint": "f"}})
    art.publish(version)
    _version(art, {"docs/part-00002.parquet": ("docs", 2, _docs(["x0", "x1"], 1990, 2))}, version)  # v3, unpublished
    return root


@pytest.fixture
def store(tmp_path) -> str:
    (tmp_path / "secret.txt").write_text(SECRET + "\n")
    return build_store(str(tmp_path / "store"))


# ---- 7. the per-document views show the current version ---------------------------------------
def test_documents_is_the_current_version_and_documents_all_every_version(store):
    q = lambda sql: catalog.query(store, sql)[1]  # noqa: E731
    assert q("select id from documents order by id") == [("d0",), ("d2",), ("d3",), ("d5",)]
    assert q("select distinct version, is_current from documents") == [("v000002", True)]
    assert q("select version, count(*) from documents_all group by version order by version") == \
        [("v000001", 4), ("v000002", 4), ("v000003", 2)]
    assert q("select count(*) from documents_all where is_current") == [(4,)]
    assert q("select id from skipped") == [] and q("select id, version from skipped_all") == [("e0", "v000001")]
    assert q("select id, reason from tombstones") == [("d1", "deleted")]
    assert q("select count(*) from shards") == [(3,)] and q("select count(*) from shards_all") == [(6,)]
    assert q("select version, is_current from embedding_sets order by version") == \
        [("v000001", False), ("v000002", True), ("v000003", False)]
    # metadata columns stay queryable, and the full SELECT language with them
    assert q("""with y as (select id, year, row_number() over (order by year desc) r from documents)
                select d.id from y join documents d using (id) where r = 1
                union all select 'n=' || count(*) from documents_all where version = 'v000001'""") == \
        [("d5",), ("n=4",)]


def test_a_set_never_published_has_no_current_documents(tmp_path):
    art = Artifact(location(str(tmp_path)), "sets", "u")
    _version(art, {"docs/part-00000.parquet": ("docs", 0, _docs(["a"], 2000, 0))}, None)
    assert catalog.query(str(tmp_path), "select count(*) from documents")[1] == [(0,)]
    assert catalog.query(str(tmp_path), "select count(*) from documents_all")[1] == [(1,)]


# ---- 1. tessera sql is read-only -------------------------------------------------------------------
SQL_ATTACKS = {
    "copy (select * from documents) to '{out}/leak.csv'": "COPY",
    "copy documents to '{out}/leak.parquet' (format parquet)": "COPY",
    "attach '{out}/x.duckdb'": "ATTACH",
    "attach ':memory:' as m": "ATTACH",
    "install httpfs": "INSTALL",
    "load httpfs": "LOAD",
    "set enable_external_access = true": "SET",
    "reset lock_configuration": "RESET",
    "pragma version": "PRAGMA",
    "create table t as select * from documents": "CREATE",
    "create or replace temp view documents as select 1": "CREATE",
    "insert into runs select * from runs": "INSERT",
    "update runs set status = 'x'": "UPDATE",
    "delete from runs": "DELETE",
    "drop view documents": "DROP",
    "export database '{out}/exp'": "EXPORT",
    "call pragma_version()": "CALL",
    "explain select 1": "EXPLAIN",
    "select 1; copy (select 1) to '{out}/leak.csv'": "COPY",
    "select 1; select 2": "one statement at a time",
    "select * from read_csv('/etc/passwd')": "read_csv",
    "select * from read_csv_auto('{secret}')": "read_csv_auto",
    "select * from read_text('{secret}')": "read_text",
    "select cast((select content from read_text('{secret}')) as int)": "read_text",
    "select * from read_blob('{secret}')": "read_blob",
    "select * from glob('/etc/*')": "glob",
    "select * from read_parquet('{out}/store/sets/t/v000001/docs/part-00000.parquet')": "read_parquet",
    "select * from query('select 42')": "query",
    "select * from duckdb_settings()": "duckdb_settings",
    "select * from '{secret}'": "unknown table",
    "select * from documents d join '/etc/passwd' p on true": "unknown table",
    "describe '/etc/passwd'": "unknown table",
    "with x as (select 1) select * from x, (select * from '{secret}')": "unknown table",
    "select * from information_schema.tables": "unknown table 'information_schema.tables'",
    "pivot documents on lang using count(*)": "PIVOT",
}


@pytest.mark.parametrize("attack", sorted(SQL_ATTACKS))
def test_sql_refuses_anything_but_a_select_over_the_views(store, tmp_path, attack):
    sql = attack.format(out=tmp_path, secret=tmp_path / "secret.txt")
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(CatalogError) as err:
        catalog.query(store, sql)
    message = str(err.value)
    assert SQL_ATTACKS[attack] in message and "\n" not in message and SECRET not in message
    assert "root:" not in message            # /etc/passwd's first line
    assert sorted(p for p in tmp_path.rglob("*")) == before       # nothing written


@pytest.mark.parametrize("sql", [
    "select lang, count(*) from documents group by lang order by lang",
    "with recursive r(n) as (select 1 union all select n + 1 from r where n < 3) select sum(n) from r",
    "select json_extract_string(manifest, '$.name') from indexes",
    "select * from documents d, unnest([1, 2]) u(x) where d.id = 'd0'",
    "select count(*) filter (where year > 2001) from documents_all",
    "select * from range(3)",
    "describe documents",
    "summarize documents",
    "show tables",
    "from documents select id limit 1",
    "SELECT COUNT(*) FROM Documents JOIN DOCUMENTS_ALL USING (id, version)",
    "select id from documents where id in (select id from documents_all where version = 'v000001')",
    "select * from (values (1), (2)) v(x)",
    "/* a comment */ select 1 -- and another",
])
def test_sql_keeps_duckdbs_select_power(store, sql):
    catalog.query(store, sql)


def test_the_connection_itself_is_locked(store, tmp_path):
    """Behind the parser check: the connection reads the views' files and nothing else."""
    import duckdb

    con = catalog.connect(store)
    for sql in (f"select * from read_text('{tmp_path / 'secret.txt'}')",
                f"copy (select 1) to '{tmp_path}/store/sets/t/leak.csv'",
                "install httpfs", "set enable_external_access = true"):
        with pytest.raises(duckdb.Error) as err:
            con.execute(sql)
        assert SECRET not in str(err.value)
    assert not (tmp_path / "store" / "sets" / "t" / "leak.csv").exists()
    assert con.execute("select count(*) from documents").fetchone() == (4,)


def test_sql_on_s3_reads_the_views_and_nothing_else(s3_bucket):
    root = build_store(f"{s3_bucket}/store")
    location(f"{s3_bucket}/secret.txt").write_text(SECRET)
    assert catalog.query(root, "select count(*) from documents")[1] == [(4,)]
    assert catalog.query(root, "select count(*) from documents_all")[1] == [(10,)]
    for sql in (f"select * from read_text('{s3_bucket}/secret.txt')",
                f"copy (select * from documents) to '{s3_bucket}/store/leak.csv'",
                f"select * from read_parquet('{root}/sets/t/v000003/docs/part-00002.parquet')"):
        with pytest.raises(CatalogError) as err:
            catalog.query(root, sql)
        assert SECRET not in str(err.value)
    con = catalog.connect(root)              # the lock alone, without the parser check
    with pytest.raises(Exception) as err:
        con.execute(f"select * from read_text('{s3_bucket}/secret.txt')").fetchall()
    assert "disabled by configuration" in str(err.value) and SECRET not in str(err.value)
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do; the check is that nothing was written
        con.execute(f"copy (select 1) to '{root}/sets/t/leak.csv'")
    assert not location(f"{root}/sets/t/leak.csv").exists()


def test_check_select_names_the_statement():
    with pytest.raises(CatalogError, match=r"read-only: COPY statements are not allowed"):
        check_select("copy (select 1) to 'x.csv'")
    with pytest.raises(CatalogError, match="empty SQL"):
        check_select("  ")
    with pytest.raises(CatalogError, match="SQL syntax error"):
        check_select("selec 1")


# ---- 2. filters are one expression --------------------------------------------------------------
COLUMNS = ["set_name", "version", "is_current", "id", "lang", "title", "year", "meta"]

FILTER_ATTACKS = {
    "cast((select content from read_text('/etc/hostname')) as int) = 1": "a subquery is not allowed",
    "1=1) union select 1 --": "syntax error at or near \")\"",
    "1=1) union (select 1": "syntax error",
    "1=1 union select 1": "set operation",
    "year > 0; drop table documents": "';'",
    "year > 0 -- and lang = 'de'": "comments are not allowed",
    "year > 0 /* x */": "comments are not allowed",
    "id in (select id from documents_all)": "a subquery is not allowed",
    "exists (select 1)": "a subquery is not allowed",
    "year in (select * from read_csv('/etc/passwd'))": "a subquery is not allowed",
    "(select count(*) from glob('/etc/*')) > 0": "a subquery is not allowed",
    "lang = read_text('/etc/hostname')": "function read_text() is not allowed",
    "lang = (from glob('/etc/*'))": "a subquery is not allowed",
    "nope > 1": "unknown column 'nope'",
    "\"/etc/passwd\" is null": "unknown column '/etc/passwd'",
    "x.year > 1": "column 'x.year'",
    "count(*) > 1": "function count_star() is not allowed",
    "row_number() over () = 1": "a window function is not allowed",
    "getvariable('x') = 1": "function getvariable() is not allowed",
    "year > 1 order by 1": "found ORDER BY",
    "year > 1 limit 1": "LIMIT",
    "year > 1 group by year": "GROUP BY",
    "year = $1": "parameter",
    "list_filter([1], x -> x > 1) = [1]": "function list_filter() is not allowed",
    "": "expected a boolean expression",
}


@pytest.mark.parametrize("attack", sorted(FILTER_ATTACKS))
def test_check_filter_refuses_and_names_the_part(attack):
    with pytest.raises(CatalogError) as err:
        check_filter(attack, COLUMNS)
    message = str(err.value)
    assert FILTER_ATTACKS[attack] in message and "\n" not in message, message


@pytest.mark.parametrize("where, expected", [
    ("year > 2005", '("year" > 2005)'),
    ("lang in ('de', 'fr') and year between 2000 and 2010", None),
    ("title like '%a%' or title ilike 'b%' or title is null", None),
    ("cast(year as varchar) = '2001' and lower(lang) <> 'x' and coalesce(title, '') = ''", None),
    ("json_extract_string(meta, '$.a') = 'x' or meta->>'b' = 'y'", None),
    ("documents.year >= 2001 and not (id = 'd0')", "((\"year\" >= 2001) AND (NOT (id = 'd0')))"),
    ("title = '-- not a comment; nor a separator'", None),
    ("case when year > 2001 then true else false end", None),
])
def test_check_filter_keeps_boolean_expressions(where, expected):
    normalized = check_filter(where, COLUMNS)
    if expected:
        assert normalized == expected
    assert check_filter(normalized, COLUMNS) == normalized          # a fixed point


def test_filter_runs_on_the_store(store):
    con = catalog.connect(store)
    expr = check_filter("year >= 2002 and lang = 'de'", catalog.view_columns(con, "documents"), con)
    assert con.execute(f"select id from documents where {expr} order by id").fetchall() == [("d2",), ("d5",)]
    with pytest.raises(CatalogError, match="unknown column 'colour'"):
        check_filter("colour = 'red'", catalog.view_columns(con), con)


# ---- through the command line -------------------------------------------------------------------
def tessera(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_sql_attacks_exit_2_with_one_line(store, tmp_path):
    for sql in (f"copy (select * from documents) to '{tmp_path}/leak.csv'", f"attach '{tmp_path}/x.duckdb'",
                "select * from read_csv('/etc/passwd')", f"select * from read_text('{tmp_path}/secret.txt')"):
        out = tessera("sql", sql, "--root", store, cwd=tmp_path)
        assert out.returncode == 2, (sql, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tessera: error:"), out.stderr
        assert SECRET not in out.stderr and "root:" not in out.stderr and out.stdout == ""
    assert not (tmp_path / "leak.csv").exists() and not (tmp_path / "x.duckdb").exists()
    ok = tessera("sql", "select count(*) as n from documents", "--root", store, "--json", cwd=tmp_path)
    assert ok.returncode == 0 and '"n": 4' in ok.stdout, ok.stderr
