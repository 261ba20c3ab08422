"""The DuckDB catalog: SQL views over every committed manifest and metadata shard.

Views
-----
``embedding_sets``  one row per committed set version (counts, dims, codec, model fingerprint, device and
                    precision of its encoders, ``is_current``)
``documents``       one row per live document of each set's CURRENT version (the ``docs`` shards,
                    tombstoned rows dropped)
``skipped``         documents the current version of each set skipped, with the reason
``tombstones``      the current version's replaced or deleted (id, shard) rows, and why (re-indexed sets)
``shards``          one row per file listed in the current version's manifest (kind, shard, rows, bytes, sha256)
``documents_all``, ``skipped_all``, ``tombstones_all``, ``shards_all``
                    the same over every committed version (``version``, ``is_current`` tell them apart)
``indexes``         one row per committed index version (when any exist)
``encoders``        one row per committed query-encoder version (when any exist)
``runs``            one row per job run report (re-index: new/changed/deleted/unchanged, bytes, decision)

Only committed versions appear: a version without a manifest is invisible, and a set
that was never published has no current version (it shows only in the ``*_all`` views).
s3:// roots are read through the s3fs filesystem registered with DuckDB.

Read-only
---------
:func:`connect` builds the views, then locks the connection: no file access beyond the
files the views read (``allowed_paths``), no extension install or load, no Python
replacement scans, configuration locked. :func:`query` (``tessera sql``) also checks the
statement with DuckDB's own parser before running it: exactly one SELECT (``WITH``,
``DESCRIBE``, ``SUMMARIZE``, ``SHOW`` included) whose tables are the catalog views or its
own CTEs and whose table functions are ``range``/``generate_series``/``unnest``/
``json_each``/``json_tree``. :func:`check_filter` checks a ``--where`` filter: one
boolean expression over the ``documents`` columns (no subquery, no table function, no
comment, no ``;``), rebuilt from its syntax tree so that nothing but that expression
reaches the query it is put into. Both raise :class:`CatalogError` (a ``ValueError``,
exit 2 in the CLI) with a one-line message naming the refused part; nothing is run.
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

#: The per-document views: the plain name shows each set's current version, ``<name>_all`` every version.
PER_VERSION_VIEWS = ("documents", "skipped", "tombstones", "shards")
VIEWS = ("embedding_sets", *PER_VERSION_VIEWS, *(f"{v}_all" for v in PER_VERSION_VIEWS),
         "indexes", "encoders", "runs")


class CatalogError(ValueError):
    """A statement or filter the read-only catalog refuses (one line, naming the refused part)."""


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
    """A read-only DuckDB connection with the catalog views of ``root`` defined.

    The connection is locked after the views are built (see the module docstring):
    it reads the files the views name and nothing else, and its settings cannot change.
    """
    root = location(root)
    con = con or duckdb.connect()
    if root.is_remote:
        con.register_filesystem(root.fs)
    pointers = _Pointers(root)
    sets = _manifests(root, "sets", pointers)
    current = [m for m in sets if m["is_current"]]
    _table(con, "embedding_sets", [_set_row(m) for m in sets], _SET_COLUMNS)
    files: list[str] = []
    for suffix, ms in (("_all", sets), ("", current)):
        _table(con, "shards" + suffix, [dict(set_name=m["name"], version=m["version"], is_current=m["is_current"],
                                             kind=e["kind"], shard=e.get("shard"), path=_file_url(m, e),
                                             rows=e["rows"], bytes=e["bytes"], sha256=e["sha256"])
                                        for m in ms for e in m["files"]], _SHARD_COLUMNS)
        files += _parquet_view(con, "tombstones" + suffix, ms, "tombstones",
                               "id VARCHAR, shard INTEGER, rows VARCHAR, reason VARCHAR, tombstoned_in VARCHAR")
        files += _parquet_view(con, "documents" + suffix, ms, "docs",
                               "id VARCHAR, lang VARCHAR, title VARCHAR, sha256 VARCHAR, n_chars INTEGER, "
                               "n_tokens INTEGER, truncated BOOLEAN, shard INTEGER, meta_sha256 VARCHAR", dead="docs")
        files += _parquet_view(con, "skipped" + suffix, ms, "skipped", "id VARCHAR, reason VARCHAR, shard INTEGER",
                               dead="skipped")
    for kind, view in (("indexes", "indexes"), ("encoders", "encoders")):
        rows = [_generic_row(m) for m in _manifests(root, kind, pointers)]
        _table(con, view, rows, _GENERIC_COLUMNS)
    runs = [json.loads(loc.read_text()) for loc in root.glob("runs/*.json")]
    _table(con, "runs", [_run_row(r) for r in runs], _RUN_COLUMNS)
    _lock(con, sorted(set(files)))
    return con


def _lock(con: duckdb.DuckDBPyConnection, files: list[str]) -> None:
    """Make ``con`` read-only: the views' files and nothing else, no extensions, settings locked.

    ``allowed_paths`` lists exact files (a directory would let ``COPY ... TO`` write into
    the store); it applies to s3:// files read through the registered s3fs as well.
    """
    con.execute(f"SET allowed_paths = [{', '.join(_q(f) for f in files)}]")
    for setting in ("enable_external_access", "autoinstall_known_extensions", "autoload_known_extensions",
                    "allow_community_extensions", "python_enable_replacements"):
        con.execute(f"SET {setting} = false")
    con.execute("SET lock_configuration = true")


_SET_COLUMNS = {
    "set_name": "VARCHAR", "version": "VARCHAR", "is_current": "BOOLEAN", "created_at": "VARCHAR",
    "committed_at": "VARCHAR", "documents": "BIGINT", "skipped_empty": "BIGINT", "tokens": "BIGINT",
    "truncated": "BIGINT", "shards": "BIGINT", "dense_dim": "INTEGER", "colbert_dim": "INTEGER",
    "nbits": "INTEGER", "n_centroids": "INTEGER", "model_fingerprint": "VARCHAR", "model_path": "VARCHAR",
    "parent": "VARCHAR", "bytes": "BIGINT", "path": "VARCHAR", "device": "VARCHAR", "precision": "VARCHAR",
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
    workers = m.get("workers") or {}
    return {
        "set_name": m["name"], "version": m["version"], "is_current": m["is_current"],
        "created_at": m.get("created_at"), "committed_at": m.get("committed_at"),
        "documents": counts.get("documents"), "skipped_empty": counts.get("skipped_empty"),
        "tokens": counts.get("tokens"), "truncated": counts.get("truncated"), "shards": counts.get("shards"),
        "dense_dim": m.get("dims", {}).get("dense"), "colbert_dim": m.get("dims", {}).get("colbert"),
        "nbits": codec.get("nbits"), "n_centroids": codec.get("n_centroids"),
        "model_fingerprint": m.get("model", {}).get("fingerprint"), "model_path": m.get("model", {}).get("path"),
        "parent": m.get("parent"), "bytes": sum(e["bytes"] for e in m.get("files", [])), "path": m["_dir"],
        "device": workers.get("device"), "precision": workers.get("precision"),
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
                  dead: "str | None" = None) -> list[str]:
    """A view over one kind of file of the set versions ``sets``; returns the files it reads.

    ``dead``: drop the rows the version's tombstones name in files of that kind
    (``docs`` or ``skipped``): a re-indexed version reuses its parent's shards,
    with the replaced and deleted documents tombstoned.
    """
    parts, read = [], []
    for m in sets:
        files = [_file_url(m, e) for e in m["files"] if e["kind"] == kind]
        if not files:
            continue
        read += files
        listing = "[" + ", ".join(_q(f) for f in files) + "]"
        select = (f"SELECT {_q(m['name'])} AS set_name, {_q(m['version'])} AS version, "
                  f"{'TRUE' if m['is_current'] else 'FALSE'} AS is_current, * "
                  f"FROM read_parquet({listing}, union_by_name = true)")
        graves = [_file_url(m, e) for e in m["files"] if e["kind"] == "tombstones"]
        if dead and graves:
            read.append(graves[0])
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
    return read


def query(root: "str | Location", sql: str) -> tuple[list[str], list[tuple]]:
    """Run one read-only SELECT ``sql`` against the catalog of ``root``; return (column names, rows).

    Raises
    ------
    CatalogError
        Anything but one SELECT over the catalog views (checked before it runs), or a
        DuckDB error while running it; the message is one line.
    """
    con = connect(root)
    check_select(sql, con)
    try:
        cur = con.execute(sql)
    except duckdb.Error as err:
        raise CatalogError(f"SQL error: {one_line(err)}") from err
    columns = [d[0] for d in cur.description] if cur.description else []
    return columns, cur.fetchall()


def view_columns(con: duckdb.DuckDBPyConnection, view: str = "documents") -> list[str]:
    """Column names of a catalog view (``documents``: its metadata columns included)."""
    if view not in VIEWS:
        raise ValueError(f"unknown catalog view {view!r}")
    cur = con.execute(f'SELECT * FROM "{view}" LIMIT 0')
    names = [d[0] for d in cur.description]
    cur.fetchall()  # DuckDB keeps a connection busy until its result is read
    return names


# ---- checking statements and filters with DuckDB's parser ------------------------------------
#: Table functions ``tessera sql`` may use: they make rows from their arguments and read nothing.
TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest", "json_each", "json_tree"})
#: ``SHOW`` forms that list the catalog's own tables.
_SHOW_SPECIAL = frozenset({'"tables"', "__show_tables_expanded"})

#: Scalar functions and operators a filter may call: pure functions of their arguments
#: (string, number, date, list, struct and JSON ones); no aggregate, window or table function.
FILTER_FUNCTIONS = frozenset("""
    ~~ !~~ ~~* !~~* ~~~ !~~~ ^@ || + - * / // % ** ^ -> ->> @> <@ &&
    like_escape not_like_escape ilike_escape not_ilike_escape regexp_matches regexp_full_match
    regexp_extract regexp_replace glob
    abs ceil ceiling floor round trunc sign sqrt cbrt ln log log10 log2 exp pow power greatest least
    isnan isinf isfinite even gcd lcm
    lower upper lcase ucase length len strlen char_length character_length length_grapheme bit_length
    starts_with ends_with prefix suffix contains instr position strpos substring substr left right
    trim ltrim rtrim replace concat concat_ws lpad rpad reverse repeat split_part string_split str_split
    nfc_normalize strip_accents unicode ascii chr ord format printf md5 sha256 hash
    levenshtein damerau_levenshtein hamming jaccard jaro_similarity jaro_winkler_similarity editdist3
    nullif ifnull if typeof
    date_part datepart date_trunc datetrunc date_diff datediff date_sub datesub year month day week
    dayofweek dayofyear dayofmonth quarter hour minute second epoch epoch_ms strftime strptime try_strptime
    to_timestamp make_date make_timestamp to_years to_months to_weeks to_days to_hours to_minutes
    to_seconds to_milliseconds to_microseconds
    list_value array_value list_contains list_has array_contains array_has list_has_any list_has_all
    array_has_any array_has_all list_extract list_element array_extract element_at list_position
    list_indexof array_position array_length cardinality list_distinct list_sort array_sort
    struct_extract struct_pack row map_extract map_contains map_keys map_values
    json_extract json_extract_string json_extract_path json_extract_path_text json_value json_exists
    json_contains json_type json_array_length json_keys json_valid
""".split())
#: Operator nodes a filter may hold (``OPERATOR`` class).
_FILTER_OPERATORS = frozenset({"OPERATOR_NOT", "OPERATOR_IS_NULL", "OPERATOR_IS_NOT_NULL", "COMPARE_IN",
                               "COMPARE_NOT_IN", "OPERATOR_COALESCE", "OPERATOR_NULLIF", "ARRAY_EXTRACT",
                               "ARRAY_SLICE", "STRUCT_EXTRACT"})
_FILTER_CLASSES = frozenset({"COLUMN_REF", "CONSTANT", "COMPARISON", "CONJUNCTION", "OPERATOR", "BETWEEN",
                             "CAST", "CASE", "FUNCTION", "COLLATE", "TYPE"})
_CLASS_WORDS = {"SUBQUERY": "a subquery", "WINDOW": "a window function", "STAR": "*",
                "PARAMETER": "a prepared-statement parameter", "LAMBDA": "a lambda", "COLUMN_REF": "a column"}
_FILTER_PREFIX = "SELECT * FROM documents WHERE "


def check_select(sql: str, con: "duckdb.DuckDBPyConnection | None" = None) -> None:
    """Raise CatalogError unless ``sql`` is exactly one SELECT over the catalog views.

    DuckDB's parser decides: one statement of type SELECT (``WITH``, ``DESCRIBE``,
    ``SUMMARIZE``, ``SHOW`` are SELECTs), whose syntax tree names only catalog views or
    its own CTEs as tables and only :data:`TABLE_FUNCTIONS` as table functions. The
    locked connection (see :func:`connect`) stands behind this check.
    """
    if not isinstance(sql, str) or not sql.strip():
        raise CatalogError("empty SQL: give one SELECT over the catalog views, e.g. "
                           "\"select lang, count(*) from documents group by lang\"")
    con = con or duckdb.connect()
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as err:
        raise CatalogError(f"SQL syntax error: {one_line(err)}") from err
    refused = [st for st in statements if st.type != duckdb.StatementType.SELECT]
    if refused:
        raise CatalogError(f"the catalog is read-only: {_statement_word(refused[0])} statements are not allowed "
                           "(run one SELECT over the catalog views)")
    if len(statements) != 1:
        raise CatalogError(f"one statement at a time: got {len(statements)} separated by ';'")
    tree = _syntax_tree(sql, con)
    _check_tables(tree, frozenset(), set(VIEWS))


def check_filter(where: str, columns: "list[str] | None" = None,
                 con: "duckdb.DuckDBPyConnection | None" = None) -> str:
    """Check a ``--where`` filter; return it as DuckDB prints its syntax tree back.

    A filter is one boolean expression over the ``documents`` view's columns: column
    references, constants, comparisons, AND/OR/NOT, IN lists, BETWEEN, LIKE/ILIKE/GLOB,
    IS [NOT] NULL, casts, CASE and the scalar functions of :data:`FILTER_FUNCTIONS`.
    The expression returned is rebuilt from the parsed tree, so the caller pastes
    exactly what was checked (no comment or unbalanced parenthesis survives).

    Parameters
    ----------
    where : the filter text, e.g. ``"year > 2005 and lang in ('de', 'fr')"``.
    columns : the columns it may name (case-insensitive); None checks the syntax only.
    con : a connection to parse with (the catalog's own, locked one); default a fresh one.

    Raises
    ------
    CatalogError
        Naming the refused part: a comment, ``;``, a subquery, a table function, an
        aggregate or window function, an unknown column, anything but one expression.
    """
    if not isinstance(where, str) or not where.strip():
        raise CatalogError(f"invalid filter {where!r}: expected a boolean expression such as \"year > 2005\"")
    shown = _shown(where)
    tokens = duckdb.tokenize(where)
    if any(kind == duckdb.token_type.operator and where[pos] == ";" for pos, kind in tokens):
        raise CatalogError(f"invalid filter {shown}: ';' (a statement separator) is not allowed in a filter")
    con = con or duckdb.connect()
    tree = _syntax_tree(_FILTER_PREFIX + where, con, what=f"invalid filter {shown}")
    comments = [pos for pos, kind in tokens if kind == duckdb.token_type.comment]
    if comments:
        raise CatalogError(f"invalid filter {shown}: comments are not allowed in a filter "
                           f"(at character {comments[0] + 1})")
    if len(tree["statements"]) != 1:
        raise CatalogError(f"invalid filter {shown}: one expression, not several statements")
    node = tree["statements"][0]["node"]
    extra = _filter_shape(node)
    if extra:
        raise CatalogError(f"invalid filter {shown}: a filter is one boolean expression, found {extra}")
    allowed = None if columns is None else {c.lower() for c in columns}
    refused = _refused_expression(node["where_clause"], allowed)
    if refused:
        raise CatalogError(f"invalid filter {shown}: {refused}")
    _unqualify(node["where_clause"])
    text = con.execute("SELECT json_deserialize_sql(?)", [json.dumps(tree)]).fetchall()[0][0]
    assert text.startswith(_FILTER_PREFIX), text
    return text[len(_FILTER_PREFIX):]


def _syntax_tree(sql: str, con: duckdb.DuckDBPyConnection, what: str = "SQL") -> dict:
    """DuckDB's syntax tree of ``sql`` (``json_serialize_sql``); CatalogError when it has none."""
    tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])
    if tree.get("error"):
        message = one_line(tree.get("error_message", "not a SELECT"))
        if tree.get("error_type") == "not implemented":
            message = f"only a plain SELECT can run here ({message}; PIVOT/UNPIVOT statements are not supported)"
        raise CatalogError(f"{what}: {message}" if what != "SQL" else f"SQL error: {message}")
    return tree


def _check_tables(node, ctes: frozenset, views: set) -> None:
    """Walk a syntax tree: every table is a view or a CTE in scope, every table function harmless."""
    if isinstance(node, list):
        for child in node:
            _check_tables(child, ctes, views)
        return
    if not isinstance(node, dict):
        return
    cte_map = node.get("cte_map")
    if isinstance(cte_map, dict) and cte_map.get("map"):
        ctes = ctes | {entry["key"].lower() for entry in cte_map["map"]}
    kind = node.get("type")
    if kind == "BASE_TABLE":
        name = str(node.get("table_name", ""))
        if name.lower() not in ctes and name.lower() not in views:
            name = ".".join((node.get("qualified_name") or {}).get("path") or [name])
            raise CatalogError(f"unknown table {_shown(name)}: tessera sql reads only the catalog views "
                               f"({', '.join(VIEWS)})")
    elif kind == "TABLE_FUNCTION":
        fn = (node.get("function") or {}).get("function_name", "?")
        if str(fn).lower() not in TABLE_FUNCTIONS:
            raise CatalogError(f"table function {fn}() is not allowed: tessera sql reads only the catalog views "
                               f"({', '.join(VIEWS)})")
    elif kind == "SHOW_REF" and node.get("table_name"):
        name = str(node["table_name"])
        if name not in _SHOW_SPECIAL and name.lower() not in ctes and name.lower() not in views:
            raise CatalogError(f"unknown table {_shown(name)}: tessera sql reads only the catalog views "
                               f"({', '.join(VIEWS)})")
    for value in node.values():
        if isinstance(value, (dict, list)):
            _check_tables(value, ctes, views)


def _filter_shape(node: dict) -> "str | None":
    """What, besides ``SELECT * FROM documents WHERE <expression>``, the parsed filter holds."""
    if node.get("type") != "SELECT_NODE":
        return "a set operation (UNION/EXCEPT/INTERSECT)" if node.get("type") == "SET_OPERATION_NODE" \
            else str(node.get("type"))
    words = {"ORDER_MODIFIER": "ORDER BY", "LIMIT_MODIFIER": "LIMIT", "LIMIT_PERCENT_MODIFIER": "LIMIT",
             "DISTINCT_MODIFIER": "DISTINCT"}
    modifiers = [words.get(m.get("type"), str(m.get("type"))) for m in node.get("modifiers") or []]
    checks = [(modifiers, " ".join(modifiers)), (node.get("group_expressions"), "GROUP BY"),
              (node.get("group_sets"), "GROUP BY"), (node.get("having"), "HAVING"),
              (node.get("qualify"), "QUALIFY"), (node.get("sample"), "USING SAMPLE"),
              ((node.get("cte_map") or {}).get("map"), "WITH")]
    for present, word in checks:
        if present:
            return word
    table = node.get("from_table") or {}
    if table.get("type") != "BASE_TABLE" or table.get("table_name") != "documents" \
            or len(node.get("select_list") or []) != 1 or node["select_list"][0].get("class") != "STAR":
        return "more than an expression"
    if node.get("where_clause") is None:
        return "no expression"
    return None


def _refused_expression(expr, allowed: "set[str] | None") -> "str | None":
    """The first part of a filter expression that is not allowed, in words; None if all is."""
    if isinstance(expr, list):
        for child in expr:
            found = _refused_expression(child, allowed)
            if found:
                return found
        return None
    if not isinstance(expr, dict):
        return None
    cls = expr.get("class")
    if cls is not None:
        if cls not in _FILTER_CLASSES:
            return f"{_CLASS_WORDS.get(cls, cls.lower())} is not allowed in a filter"
        if cls == "OPERATOR" and expr.get("type") not in _FILTER_OPERATORS:
            return f"operator {expr.get('type')} is not allowed in a filter"
        if cls == "FUNCTION":
            name = str(expr.get("function_name", "?"))
            if name.lower() not in FILTER_FUNCTIONS:
                return f"function {name}() is not allowed in a filter"
            if expr.get("distinct") or expr.get("filter") or (expr.get("order_bys") or {}).get("orders"):
                return f"aggregate modifiers on {name}() are not allowed in a filter"
        if cls == "COLUMN_REF":
            names = [str(n) for n in expr.get("column_names", [])]
            if len(names) == 2 and names[0].lower() == "documents":
                names = names[1:]
            if len(names) != 1:
                return f"column {'.'.join(names)!r}: name a column of the documents view"
            if allowed is not None and names[0].lower() not in allowed:
                return (f"unknown column {names[0]!r} (documents has: {', '.join(sorted(allowed))})")
    for key, value in expr.items():
        if key != "type_expr" or cls != "CAST":  # a cast's target type holds no expression to check
            found = _refused_expression(value, allowed)
            if found:
                return found
    return None


def _unqualify(expr) -> None:
    """``documents.year`` → ``year`` in place: the caller may run the filter on another view
    with the same columns (``documents_all``, a subquery)."""
    if isinstance(expr, list):
        for child in expr:
            _unqualify(child)
    elif isinstance(expr, dict):
        if expr.get("class") == "COLUMN_REF" and len(expr.get("column_names", [])) == 2:
            expr["column_names"] = expr["column_names"][1:]
        for value in expr.values():
            _unqualify(value)


def _statement_word(statement) -> str:
    """``COPY``, ``ATTACH``, ``INSTALL``, ... : the statement's first word, or its type."""
    words = statement.query.strip().split(None, 1)
    first = words[0].upper() if words else ""
    kind = statement.type.name
    return first if first.isalpha() and first not in ("WITH", kind) else kind


def _shown(text: str, limit: int = 200) -> str:
    """``repr`` of user text, cut to ``limit`` characters: always one line."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[:limit - 4] + "...'"


def one_line(err: "BaseException | str") -> str:
    """A DuckDB message on one line (its ``LINE 1: ... ^`` pointer dropped)."""
    lines = []
    for line in str(err).splitlines():
        if line.startswith("LINE ") or not line.strip():
            break
        lines.append(line.strip())
    return " ".join(lines) or str(err).strip().splitlines()[0]
