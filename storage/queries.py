"""Evaluation inputs: query files and relevance judgements (qrels), local or s3://.

* :func:`load_queries` reads queries from Parquet or JSONL (chosen by extension);
  :func:`load_search_queries` also takes plain text, one query per line.
* :func:`load_qrels` reads judgements from TREC text (``qid 0 docid rel`` or
  ``qid docid rel``, whitespace or tab separated), Parquet or JSONL.

Both are small enough to hold in memory (thousands to a few million rows), so they
are read whole. Errors name the file and the row (0-based, Parquet) or line
(1-based, text and JSONL).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

from storage.fs import Location, location
from storage.input_files import JSONL_EXT, PARQUET_EXT, file_format, jsonl_objects, read_parquet, text_lines

logger = logging.getLogger(__name__)

#: Accepted names for the three qrels columns, in order of preference
#: (Tessera's own, short TREC-ish names, BEIR's TSV header).
QRELS_COLUMNS = {
    "query_id": ("query_id", "qid", "query-id"),
    "doc_id": ("doc_id", "docid", "corpus-id", "corpus_id"),
    "relevance": ("relevance", "rel", "score"),
}
_MAX_LISTED = 5


class QueryFileError(ValueError):
    """Bad query or qrels input; the message names the file and the row or line."""


@dataclass(frozen=True)
class Query:
    """One evaluation query.

    Parameters
    ----------
    id : str
        The user's query id (unique within a file).
    text : str
        Non-empty query text.
    lang : str or None
        Language code, ``None`` when the file has no language for it.
    """

    id: str
    text: str
    lang: str | None = None


# ---- queries ------------------------------------------------------------------------
def load_queries(url: "str | Location", *, id_column: str = "id", text_column: str = "text",
                 lang_column: str = "lang") -> list[Query]:
    """Read evaluation queries from a Parquet or JSONL file.

    Parameters
    ----------
    url : str or Location
        ``.parquet``/``.pq`` or ``.jsonl``/``.json``/``.ndjson`` file, local or s3://.
    id_column, text_column : str
        Required columns holding the query id (string or integer) and text.
    lang_column : str
        Optional column holding the language; absent or null gives ``lang=None``.

    Returns
    -------
    list of Query
        In file order.

    Raises
    ------
    QueryFileError
        Unknown extension, missing columns, empty or null text, null/empty ids,
        duplicate ids, invalid UTF-8 or JSON, or an empty file.
    """
    loc = location(url)
    columns = (id_column, text_column, lang_column)
    if _file_format(loc) == "parquet":
        rows = _parquet_rows(loc, columns)
    else:
        rows = _jsonl_rows(loc, columns)
    queries = [_make_query(loc.url, where, row, columns) for where, row in rows]
    if not queries:
        raise QueryFileError(f"{loc.url}: no queries in file")
    _check_unique_ids(loc.url, queries)
    logger.info("loaded %d queries from %s", len(queries), loc.url)
    return queries


def load_search_queries(url: "str | Location") -> list[Query]:
    """Queries to search: a Parquet or JSONL file (see :func:`load_queries`), else plain text.

    A plain text file (any other extension) holds one query per line; its id is the
    1-based line number and blank lines are skipped.

    Raises
    ------
    QueryFileError
        As :func:`load_queries`; for text, a line that is not UTF-8 (named) or no query at all.
    """
    loc = location(url)
    if _file_format(loc, allow_text=True) != "trec":
        return load_queries(loc)
    queries = [Query(str(lineno), line.strip()) for lineno, line in text_lines(loc, QueryFileError) if line.strip()]
    if not queries:
        raise QueryFileError(f"{loc.url}: no queries in file")
    logger.info("loaded %d queries (one a line) from %s", len(queries), loc.url)
    return queries


def _parquet_rows(loc: Location, columns: tuple[str, str, str]) -> Iterator[tuple[str, dict]]:
    id_column, text_column, lang_column = columns
    table = read_parquet(loc, QueryFileError)
    _require(loc.url, table.column_names, [id_column, text_column])
    wanted = [c for c in columns if c in table.column_names]
    for i, row in enumerate(table.select(wanted).to_pylist()):
        yield f"row {i}", row


def _jsonl_rows(loc: Location, columns: tuple[str, str, str]) -> Iterator[tuple[str, dict]]:
    id_column, text_column, _ = columns
    for lineno, obj in jsonl_objects(loc, QueryFileError):
        _require(loc.url, list(obj), [id_column, text_column], where=f"line {lineno}")
        yield f"line {lineno}", obj


def _make_query(url: str, where: str, row: dict, columns: tuple[str, str, str]) -> Query:
    id_column, text_column, lang_column = columns
    qid = _as_id(url, where, id_column, row.get(id_column))
    text = row.get(text_column)
    if text is None:
        raise QueryFileError(f"{url}: {where}: null query text for query {qid!r}")
    text = _as_text(url, where, text_column, text)
    if not text.strip():
        raise QueryFileError(f"{url}: {where}: empty query text for query {qid!r}")
    lang = row.get(lang_column)
    if lang is not None:
        lang = _as_text(url, where, lang_column, lang).strip() or None
    return Query(qid, text, lang)


def _check_unique_ids(url: str, queries: list[Query]) -> None:
    seen: set[str] = set()
    dups: dict[str, None] = {}
    for q in queries:
        if q.id in seen:
            dups[q.id] = None
        seen.add(q.id)
    if dups:
        listed = list(dups)[:_MAX_LISTED]
        raise QueryFileError(f"{url}: {len(dups)} duplicate query id(s), e.g. {listed}")


# ---- qrels --------------------------------------------------------------------------
def load_qrels(url: "str | Location") -> dict[str, dict[str, int]]:
    """Read relevance judgements.

    Parameters
    ----------
    url : str or Location
        Parquet or JSONL (by extension) with columns ``query_id``, ``doc_id``,
        ``relevance`` (also ``qid``/``docid``/``rel`` or BEIR's
        ``query-id``/``corpus-id``/``score``); any other extension is read as
        TREC text: ``qid 0 docid rel`` or ``qid docid rel`` per line, whitespace
        or tab separated. A BEIR-style header line is skipped.

    Returns
    -------
    dict
        ``{query_id: {doc_id: relevance}}`` with integer relevance grades.

    Raises
    ------
    QueryFileError
        Malformed lines or rows (named), missing columns, non-integer relevance,
        conflicting grades for one (query, doc) pair, or an empty file.
    """
    loc = location(url)
    fmt = _file_format(loc, allow_text=True)
    if fmt == "parquet":
        triples = _qrels_from_records(loc.url, _parquet_records(loc), "row")
    elif fmt == "jsonl":
        triples = _qrels_from_records(loc.url, jsonl_objects(loc, QueryFileError), "line")
    else:
        triples = _qrels_from_trec(loc)
    qrels = _collect_qrels(loc.url, triples)
    if not qrels:
        raise QueryFileError(f"{loc.url}: no relevance judgements in file")
    logger.info("loaded qrels for %d queries (%d judgements) from %s", len(qrels),
                sum(len(d) for d in qrels.values()), loc.url)
    return qrels


def _qrels_from_trec(loc: Location) -> Iterator[tuple[str, str, str, int]]:
    for lineno, line in text_lines(loc, QueryFileError):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split("\t")] if "\t" in line else line.split()
        if len(fields) == 4:
            qid, _, docid, rel = fields
        elif len(fields) == 3:
            qid, docid, rel = fields
        else:
            raise QueryFileError(f"{loc.url}: line {lineno}: expected 'qid 0 docid rel' or "
                                 f"'qid docid rel', got {len(fields)} field(s): {line.strip()[:100]!r}")
        if lineno == 1 and _is_header(qid, docid, rel):
            continue
        where = f"line {lineno}"
        yield where, _as_id(loc.url, where, "qid", qid), _as_id(loc.url, where, "docid", docid), \
            _as_grade(loc.url, where, rel)


def _qrels_from_records(url: str, records: Iterator[tuple[int, dict]],
                        unit: str) -> Iterator[tuple[str, str, str, int]]:
    names: dict[str, str] | None = None
    for i, rec in records:
        where = f"{unit} {i}"
        if names is None:
            names = _qrels_names(url, list(rec), where)
        for role, name in names.items():
            if name not in rec:
                raise QueryFileError(f"{url}: {where}: missing {role} column {name!r} "
                                     f"(keys: {sorted(rec)[:10]})")
        yield where, _as_id(url, where, names["query_id"], rec[names["query_id"]]), \
            _as_id(url, where, names["doc_id"], rec[names["doc_id"]]), \
            _as_grade(url, where, rec[names["relevance"]])


def _qrels_names(url: str, found: list[str], where: str) -> dict[str, str]:
    names: dict[str, str] = {}
    for role, aliases in QRELS_COLUMNS.items():
        match = next((a for a in aliases if a in found), None)
        if match is None:
            raise QueryFileError(f"{url}: {where}: no {role} column (tried {list(aliases)}); "
                                 f"columns found: {found[:20]}")
        names[role] = match
    return names


def _collect_qrels(url: str, triples: Iterator[tuple[str, str, str, int]]) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for where, qid, docid, rel in triples:
        docs = qrels.setdefault(qid, {})
        if docid in docs and docs[docid] != rel:
            raise QueryFileError(f"{url}: {where}: query {qid!r} doc {docid!r} judged twice "
                                 f"with different relevance ({docs[docid]} and {rel})")
        docs[docid] = rel
    return qrels


def _is_header(qid: str, docid: str, rel: str) -> bool:
    """A first line that names the columns (BEIR's ``query-id corpus-id score``), not a
    malformed judgement: a non-numeric relevance alone does not make a header."""
    try:
        float(rel)
    except ValueError:
        names = [v.strip().lower() for v in (qid, docid, rel)]
        return all(n in QRELS_COLUMNS[role] for n, role in zip(names, ("query_id", "doc_id", "relevance")))
    return False


# ---- reading files ------------------------------------------------------------------
def _file_format(loc: Location, allow_text: bool = False) -> str:
    fmt = file_format(loc.url)
    if fmt is not None:
        return fmt
    if allow_text:
        return "trec"
    raise QueryFileError(f"{loc.url}: unknown file format (expected one of {PARQUET_EXT + JSONL_EXT})")


def _parquet_records(loc: Location) -> Iterator[tuple[int, dict]]:
    table = read_parquet(loc, QueryFileError)
    if table.num_rows:
        _qrels_names(loc.url, table.column_names, "schema")
    return enumerate(table.to_pylist())


# ---- values -------------------------------------------------------------------------
def _require(url: str, found: list[str], required: list[str], where: str | None = None) -> None:
    missing = [c for c in required if c not in found]
    if missing:
        at = f"{where}: " if where else ""
        raise QueryFileError(f"{url}: {at}missing column(s) {missing}; columns found: {found[:20]}")


def _as_id(url: str, where: str, column: str, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, bytes)):
        raise QueryFileError(f"{url}: {where}: {column!r} must be a string or integer id, got {value!r}")
    text = _as_text(url, where, column, value) if isinstance(value, bytes) else str(value)
    if not text.strip():
        raise QueryFileError(f"{url}: {where}: empty {column!r}")
    return text.strip()


def _as_text(url: str, where: str, column: str, value: object) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise QueryFileError(f"{url}: {where}: column {column!r} is not valid UTF-8 "
                                 f"(byte {err.start})") from err
    if not isinstance(value, str):
        raise QueryFileError(f"{url}: {where}: column {column!r} must be a string, got {value!r}")
    return value


def _as_grade(url: str, where: str, value: object) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        grade = float(value) if isinstance(value, (str, float)) else None
    except ValueError:
        grade = None
    if grade is None or grade != grade or not grade.is_integer():
        raise QueryFileError(f"{url}: {where}: relevance must be an integer grade, got {value!r}")
    return int(grade)
