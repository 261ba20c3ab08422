"""Tabular input files (corpus, queries, training pairs): their formats and the one JSONL reader.

A file is Parquet or JSONL by its extension (:data:`PARQUET_EXT`, :data:`JSONL_EXT`).
A JSONL line is one JSON object; :func:`parse_line` says what is wrong with a line
that isn't one (invalid UTF-8, invalid JSON, not an object) and the callers name the
file and the 1-based line: ``<url>: line N: not valid UTF-8 (byte 3: b'\\xff')``.
Each caller raises its own error type (``CorpusError``, ``QueryFileError``), passed
in as ``error``, so a bad line reads the same whichever input it is in.
"""
from __future__ import annotations

import json
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from storage.fs import Location

PARQUET_EXT = (".parquet", ".pq")
JSONL_EXT = (".jsonl", ".json", ".ndjson")


class LineError(ValueError):
    """What is wrong with one JSONL line; the caller names the file and the line."""


def file_format(url: str) -> "str | None":
    """``"parquet"`` or ``"jsonl"`` by extension (any case); None for anything else."""
    low = url.lower()
    if low.endswith(PARQUET_EXT):
        return "parquet"
    if low.endswith(JSONL_EXT):
        return "jsonl"
    return None


def json_error(err: json.JSONDecodeError) -> str:
    """``Expecting value at column 3``; ``Unterminated string starting at column 9`` (the
    decoder's message may itself end in "at")."""
    msg = err.msg.rstrip()
    return f"{msg} column {err.colno}" if msg.endswith(" at") else f"{msg} at column {err.colno}"


def parse_line(raw: bytes) -> dict:
    """One JSONL line as a dict.

    Raises
    ------
    LineError
        Not UTF-8 (naming the byte), not JSON (naming the column) or not an object;
        ``__cause__`` is the decoder's error.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LineError(f"not valid UTF-8 (byte {err.start}: {raw[err.start:err.start + 4]!r})") from err
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise LineError(f"invalid JSON: {json_error(err)}") from err
    if not isinstance(obj, dict):
        raise LineError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_line_at(url: str, lineno: int, raw: bytes, error: type[ValueError]) -> dict:
    """:func:`parse_line`, its error raised as ``error("<url>: line <lineno>: ...")``."""
    try:
        return parse_line(raw)
    except LineError as err:
        raise error(f"{url}: line {lineno}: {err}") from err.__cause__


def read_bytes(loc: Location, error: type[ValueError]) -> bytes:
    """The whole file; a missing one raises ``error("<url>: no such file")``."""
    try:
        return loc.read_bytes()
    except FileNotFoundError as err:
        raise error(f"{loc.url}: no such file") from err


def read_parquet(loc: Location, error: type[ValueError]) -> pa.Table:
    """A small Parquet file read whole; missing or unreadable raises ``error`` naming the file."""
    try:
        # An Arrow buffer, not a Python file: see storage.schemas.read_table.
        return pq.read_table(pa.BufferReader(loc.read_bytes()))
    except FileNotFoundError as err:
        raise error(f"{loc.url}: no such file") from err
    except (pa.ArrowInvalid, OSError) as err:
        raise error(f"{loc.url}: unreadable Parquet file: {err}") from err


def text_lines(loc: Location, error: type[ValueError]) -> Iterator[tuple[int, str]]:
    """Decoded lines of a small file read whole, with 1-based line numbers; invalid UTF-8 names its line."""
    for lineno, raw in enumerate(read_bytes(loc, error).splitlines(), start=1):
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise error(f"{loc.url}: line {lineno}: not valid UTF-8 (byte {err.start}: "
                        f"{raw[err.start:err.start + 4]!r})") from err


def jsonl_objects(loc: Location, error: type[ValueError]) -> Iterator[tuple[int, dict]]:
    """``(1-based line, object)`` for every non-blank line of a small JSONL file read whole.

    Raises
    ------
    error
        No such file, or a line that is not a UTF-8 JSON object (named).
    """
    for lineno, raw in enumerate(read_bytes(loc, error).splitlines(), start=1):
        if raw.strip():
            yield lineno, parse_line_at(loc.url, lineno, raw, error)
