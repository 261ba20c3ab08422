"""The retune job's training and dev queries.

Training pairs are Parquet or JSONL, one row per (query, positive) pair or one per
query with a list of positives: a ``text``/``query`` column, positives in
``positives``/``positive``/``doc_ids``/``doc_id``/``pos`` (one id or a list), an optional
``id``/``query_id``/``qid`` and ``lang``. Rows are grouped by query id, else by text.
Queries + qrels (``--train-qrels``) work too: each query's positives are its
documents judged > 0. Errors name the file and the row or line.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from storage.fs import Location, location
from storage.input_files import file_format, jsonl_objects, read_parquet
from storage.queries import Query, QueryFileError, load_qrels, load_queries

logger = logging.getLogger(__name__)

TEXT_COLUMNS = ("text", "query")
POSITIVE_COLUMNS = ("positives", "positive", "doc_ids", "doc_id", "pos")
ID_COLUMNS = ("id", "query_id", "qid")
_LISTED = 5


@dataclass(frozen=True)
class TrainQuery:
    """One training query and the ids of its relevant documents."""

    id: str
    text: str
    lang: "str | None"
    positives: tuple[str, ...]


def load_training(train: str, qrels: "str | None" = None) -> list[TrainQuery]:
    """Training queries with positives, from pairs or from queries + qrels.

    Raises
    ------
    QueryFileError
        Unreadable file, missing columns, empty text or no positive, naming the file and row.
    """
    if qrels is not None:
        judged = load_qrels(qrels)
        queries = load_queries(train)
        out = [TrainQuery(q.id, q.text, q.lang, tuple(sorted(d for d, g in judged.get(q.id, {}).items() if g > 0)))
               for q in queries]
        dropped = [q.id for q in out if not q.positives]
        if dropped:
            logger.warning("%d training queries have no positive judgement and are skipped, e.g. %s",
                           len(dropped), dropped[:_LISTED])
        out = [q for q in out if q.positives]
        if not out:
            raise QueryFileError(f"{location(qrels).url}: judges none of the {len(queries)} training queries "
                                 f"of {location(train).url} as relevant")
        return out
    return _group_pairs(location(train).url, _pair_rows(location(train)))


def _pair_rows(loc: Location) -> list[tuple[str, dict]]:
    fmt = file_format(loc.url)
    if fmt == "parquet":
        return [(f"row {i}", r) for i, r in enumerate(read_parquet(loc, QueryFileError).to_pylist())]
    if fmt is None:
        raise QueryFileError(f"{loc.url}: training pairs must be Parquet or JSONL (or queries + --train-qrels)")
    return [(f"line {lineno}", obj) for lineno, obj in jsonl_objects(loc, QueryFileError)]


def _column(url: str, where: str, row: dict, names: tuple[str, ...], required: bool = True):
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    if required:
        raise QueryFileError(f"{url}: {where}: no {names[0]!r} column (tried {list(names)}); "
                             f"keys: {sorted(row)[:10]}")
    return None


def _group_pairs(url: str, rows: list[tuple[str, dict]]) -> list[TrainQuery]:
    """Rows (one per pair, or one per query with a list of positives) grouped by query id or text."""
    if not rows:
        raise QueryFileError(f"{url}: no training pairs in file")
    groups: dict[str, dict] = {}
    for where, row in rows:
        text = _column(url, where, row, TEXT_COLUMNS)
        if not isinstance(text, str) or not text.strip():
            raise QueryFileError(f"{url}: {where}: empty or non-text query")
        pos = _column(url, where, row, POSITIVE_COLUMNS)
        pos = [pos] if isinstance(pos, (str, int)) else list(pos) if isinstance(pos, (list, tuple)) else None
        if not pos or any(not str(p).strip() for p in pos):
            raise QueryFileError(f"{url}: {where}: no positive document id")
        qid = _column(url, where, row, ID_COLUMNS, required=False)
        key = str(qid) if qid is not None else text
        g = groups.setdefault(key, {"text": text, "lang": row.get("lang"), "pos": []})
        if g["text"] != text:
            raise QueryFileError(f"{url}: {where}: query id {key!r} appears with two different texts")
        g["pos"].extend(str(p).strip() for p in pos)
    return [TrainQuery(k if k != g["text"] else f"train-{i}", g["text"], g["lang"], tuple(dict.fromkeys(g["pos"])))
            for i, (k, g) in enumerate(groups.items())]


def load_dev(dev_queries: "str | None", dev_qrels: "str | None") -> tuple[list[Query], dict[str, dict[str, int]]]:
    """Dev queries that have judgements, and their qrels (none without ``dev_queries``).

    Raises
    ------
    QueryFileError
        As :func:`storage.queries.load_queries` / ``load_qrels``; or no dev query is judged relevant.
    """
    if dev_queries is None:
        return [], {}
    queries, qrels = load_queries(dev_queries), load_qrels(dev_qrels)
    judged = [q for q in queries if any(g > 0 for g in qrels.get(q.id, {}).values())]
    if not judged:
        raise QueryFileError(f"{location(dev_qrels).url} judges none of the {len(queries)} dev queries of "
                             f"{location(dev_queries).url} relevant: the gate has nothing to measure")
    if len(judged) < len(queries):
        logger.warning("%d of %d dev queries have no judgement and are left out", len(queries) - len(judged),
                       len(queries))
    return judged, {q.id: qrels[q.id] for q in judged}

