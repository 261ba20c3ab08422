"""``tessera sets`` (embedding sets and their versions) and ``tessera sql`` (one read-only
SELECT over the DuckDB catalog, ``storage.catalog``)."""
from __future__ import annotations

import argparse

from jobs.commands.common import Command, json_arg, print_rows, root_arg, root_str
from jobs.errors import EXIT_OK

SETS_QUERY = ("SELECT set_name, version, is_current, documents, skipped_empty, tokens, dense_dim, colbert_dim, "
              "nbits, committed_at FROM embedding_sets ORDER BY set_name, version")


def add_sets_arguments(s: argparse.ArgumentParser) -> None:
    root_arg(s)
    json_arg(s)


def sets(args: argparse.Namespace) -> int:
    from jobs import preflight
    from storage.catalog import query
    from storage.layout import resolve_root

    preflight.store(resolve_root(args.root))  # a mistyped --root or bucket is an error, not "(0 rows)"
    cols, rows = query(root_str(args), SETS_QUERY)
    print_rows(cols, rows, args.json)
    return EXIT_OK


def add_sql_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("query", help='e.g. "select lang, count(*) from documents group by lang"')
    root_arg(q)
    json_arg(q)


def sql(args: argparse.Namespace) -> int:
    from storage.catalog import query

    cols, rows = query(root_str(args), args.query)
    print_rows(cols, rows, args.json)
    return EXIT_OK


SETS = Command("sets", "list embedding sets and their versions", add_sets_arguments, sets)
SQL = Command("sql", "run one read-only SELECT over the catalog views (documents: each set's current version; "
                     "documents_all: every version; embedding_sets, shards, ...)", add_sql_arguments, sql)
