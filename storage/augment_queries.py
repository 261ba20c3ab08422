"""Queries that augment passages (xQG): from a separate file or from a corpus column.

* :func:`load_augment_queries` reads a Parquet or JSONL file (local or s3://) with one
  query a row: the passage's id, the query text and its language (columns named by the
  caller, default ``passage_id``, ``text``, ``lang``); a passage may have many rows.
* :func:`queries_from_column` reads a corpus column whose value, per document, is a
  list of queries: strings (no language) or ``{"text", "lang"}`` objects.
* :func:`check_known` refuses queries naming passages the corpus does not have.

Errors name the file and the row (0-based, Parquet) or line (1-based, JSONL), so a job
refuses bad input before it encodes or publishes anything.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from storage.fs import Location, location
from storage.input_files import JSONL_EXT, PARQUET_EXT, file_format, json_error, jsonl_objects, read_parquet

logger = logging.getLogger(__name__)

_MAX_LISTED = 5


class AugmentQueryError(ValueError):
    """Bad augmentation queries; the message names the file and the row or line."""


@dataclass
class AugmentQueries:
    """Augmentation queries in input order.

    Attributes
    ----------
    passage_ids : passage (document) id of each query.
    texts : query texts (non-empty).
    langs : language codes, None where not given.
    where : ``"<url>: line 3"`` / ``"<url>: row 2"`` of each query, for error messages.
    """

    passage_ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    langs: list = field(default_factory=list)
    where: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def for_passages(self, ids: Sequence[str]) -> tuple[np.ndarray, list[str], list]:
        """The queries of the passages ``ids`` (e.g. one shard's documents).

        Returns
        -------
        owner : (m,) int64 position in ``ids`` of each query's passage.
        texts, langs : the m queries, grouped by passage in ``ids`` order, input order within.
        """
        pos = {pid: i for i, pid in enumerate(ids)}
        picked = [(pos[p], j) for j, p in enumerate(self.passage_ids) if p in pos]
        picked.sort()
        return (np.array([i for i, _ in picked], np.int64), [self.texts[j] for _, j in picked],
                [self.langs[j] for _, j in picked])

    def table(self) -> pa.Table:
        """``passage_id, text, lang`` as Arrow (how a job hands them to its workers)."""
        return pa.table({"passage_id": pa.array(self.passage_ids, pa.string()),
                         "text": pa.array(self.texts, pa.string()), "lang": pa.array(self.langs, pa.string())})

    @classmethod
    def from_table(cls, table: pa.Table, url: str = "<table>") -> "AugmentQueries":
        """Inverse of :meth:`table`."""
        return cls(table.column("passage_id").to_pylist(), table.column("text").to_pylist(),
                   table.column("lang").to_pylist(), [f"{url}: row {i}" for i in range(table.num_rows)])


def load_augment_queries(url: "str | Location", *, known_ids: "Iterable[str] | None" = None,
                         passage_column: str = "passage_id", text_column: str = "text",
                         lang_column: str = "lang") -> AugmentQueries:
    """Read augmentation queries from a Parquet or JSONL file.

    Parameters
    ----------
    known_ids : the corpus' document ids; a query naming any other passage is an error.
    passage_column, text_column : required columns (passage id: string or integer).
    lang_column : optional column; absent or null gives None.

    Raises
    ------
    AugmentQueryError
        Unknown extension, missing file or columns, invalid JSON or UTF-8, null or empty
        passage id or text, a non-string language, no rows, or an unknown passage.
    """
    loc = location(url)
    columns = (passage_column, text_column, lang_column)
    fmt = file_format(loc.url)
    if fmt == "parquet":
        rows = _parquet_rows(loc, columns)
    elif fmt == "jsonl":
        rows = _jsonl_rows(loc, columns)
    else:
        raise AugmentQueryError(f"{loc.url}: unknown file format (expected one of {PARQUET_EXT + JSONL_EXT})")
    out = AugmentQueries()
    for where, row in rows:
        _add(out, f"{loc.url}: {where}", row.get(passage_column), row.get(text_column), row.get(lang_column),
             columns)
    if not len(out):
        raise AugmentQueryError(f"{loc.url}: no queries in file")
    if known_ids is not None:
        check_known(out, known_ids)
    logger.info("loaded %d augmentation queries for %d passages from %s", len(out), len(set(out.passage_ids)),
                loc.url)
    return out


def queries_from_column(ids: Sequence[str], values: Sequence, *, column: str, where: Sequence[str]) -> AugmentQueries:
    """Augmentation queries held in a corpus column, one list per document.

    Parameters
    ----------
    ids : document ids.
    values : per document None (no queries), a list of strings, or a list of
        ``{"text": str, "lang": str | None}``; a JSON string holding such a list is
        decoded (JSONL corpora written by tools that stringify nested values).
    column : the column's name (for messages).
    where : per document ``"<url>: line 3"`` / ``"<url>: row 2"``.
    """
    out = AugmentQueries()
    cols = ("id", "text", "lang")
    for pid, value, at in zip(ids, values, where):
        if value is None:
            continue
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise AugmentQueryError(f"{at}: column {column!r} must be a list of queries, got a string that "
                                        f"is not JSON ({json_error(err)})") from err
        if not isinstance(value, (list, tuple)):
            raise AugmentQueryError(f"{at}: column {column!r} must be a list of queries, got "
                                    f"{type(value).__name__}")
        for k, item in enumerate(value):
            if isinstance(item, dict):
                _add(out, f"{at}: {column}[{k}]", pid, item.get("text"), item.get("lang"), cols)
            else:
                _add(out, f"{at}: {column}[{k}]", pid, item, None, cols)
    return out


def check_known(queries: AugmentQueries, known_ids: Iterable[str]) -> None:
    """Raise AugmentQueryError naming the first rows whose passage is not in ``known_ids``."""
    known = known_ids if isinstance(known_ids, (set, frozenset)) else set(known_ids)
    bad = [j for j, pid in enumerate(queries.passage_ids) if pid not in known]
    if bad:
        listed = "; ".join(f"{queries.where[j]}: passage {queries.passage_ids[j]!r}" for j in bad[:_MAX_LISTED])
        raise AugmentQueryError(f"{len(bad)} augmentation queries name passages that are not in the corpus "
                                f"({len({queries.passage_ids[j] for j in bad})} unknown ids), e.g. {listed}")


# ---- reading ------------------------------------------------------------------------
def _add(out: AugmentQueries, at: str, pid, text, lang, columns: tuple[str, str, str]) -> None:
    passage_column, text_column, lang_column = columns
    if isinstance(pid, bool) or not isinstance(pid, (str, int)) or not str(pid).strip():
        raise AugmentQueryError(f"{at}: {passage_column!r} must be a non-empty string or integer id, got {pid!r}")
    if not isinstance(text, str) or not text.strip():
        raise AugmentQueryError(f"{at}: {text_column!r} must be a non-empty string, got {text!r}")
    if lang is not None and not isinstance(lang, str):
        raise AugmentQueryError(f"{at}: {lang_column!r} must be a string language code, got {lang!r}")
    out.passage_ids.append(str(pid).strip())
    out.texts.append(text.strip())
    out.langs.append(lang.strip() or None if lang is not None else None)
    out.where.append(at)


def _parquet_rows(loc: Location, columns: tuple[str, str, str]) -> Iterator[tuple[str, dict]]:
    table = read_parquet(loc, AugmentQueryError)
    _require(loc.url, table.column_names, columns[:2])
    wanted = [c for c in columns if c in table.column_names]
    for i, row in enumerate(table.select(wanted).to_pylist()):
        yield f"row {i}", row


def _jsonl_rows(loc: Location, columns: tuple[str, str, str]) -> Iterator[tuple[str, dict]]:
    for lineno, obj in jsonl_objects(loc, AugmentQueryError):
        _require(loc.url, list(obj), columns[:2], f"line {lineno}")
        yield f"line {lineno}", obj


def _require(url: str, found: list[str], required: Sequence[str], where: "str | None" = None) -> None:
    missing = [c for c in required if c not in found]
    if missing:
        at = f"{where}: " if where else ""
        raise AugmentQueryError(f"{url}: {at}missing column(s) {missing}; columns found: {found[:20]}")
