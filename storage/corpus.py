"""Corpus input: Parquet or JSONL files, a glob or a directory, local or s3://.

Two steps, both streaming so nothing ever holds the whole corpus:

* :func:`scan_file` reads one file once, checks the required columns, collects
  its ids (for the duplicate check) and, for JSONL, the byte offset of every
  ``stride``-th row so a worker can later seek straight to its piece.
* :func:`read_rows` reads rows ``[start, end)`` of one scanned file as an Arrow
  table with canonical column names.

Errors name the file and the row (0-based row for Parquet, 1-based line for JSONL).
:func:`check_first_file` checks the columns of one file from its first line or its
schema, so a job can refuse a bad corpus before it starts Ray or loads a model.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.fs import Location, location, retry
from storage.input_files import JSONL_EXT, PARQUET_EXT, LineError, parse_line, parse_line_at
from storage.input_files import file_format as input_format

logger = logging.getLogger(__name__)

CANONICAL = ("id", "text", "lang", "title")


class CorpusError(ValueError):
    """Bad corpus input; the message names the file and row."""


@dataclass(frozen=True)
class ColumnMap:
    """Names of the corpus columns that play Tessera's roles."""

    id: str = "id"
    text: str = "text"
    lang: str = "lang"
    title: str = "title"

    def __post_init__(self) -> None:
        names = [self.id, self.text, self.lang, self.title]
        if any(not n for n in names):
            raise ValueError("column names must be non-empty")
        if len(set(names)) != len(names):
            raise ValueError(f"column mapping maps two roles to one column: {names}")

    def canonical(self, column: str) -> str:
        """The canonical name for a source column (extras keep their name)."""
        return {self.id: "id", self.text: "text", self.lang: "lang", self.title: "title"}.get(column, column)


@dataclass(frozen=True)
class CorpusFile:
    """A scanned input file: enough to read any row range without re-scanning."""

    url: str
    format: str                       # "parquet" | "jsonl"
    n_rows: int
    stride: int                       # rows between recorded offsets (JSONL)
    offsets: tuple[int, ...] = field(default=())   # byte offset of rows 0, stride, 2*stride, ...
    columns: tuple[str, ...] = field(default=())   # canonical names present in the file

    def to_dict(self) -> dict:
        return {"url": self.url, "format": self.format, "n_rows": self.n_rows,
                "stride": self.stride, "offsets": list(self.offsets), "columns": list(self.columns)}

    @classmethod
    def from_dict(cls, d: dict) -> "CorpusFile":
        return cls(d["url"], d["format"], int(d["n_rows"]), int(d["stride"]),
                   tuple(d.get("offsets", ())), tuple(d.get("columns", ())))


# ---- finding files ------------------------------------------------------------------
def file_format(url: str) -> str:
    """``"parquet"`` or ``"jsonl"``; CorpusError naming the extension for anything else."""
    fmt = input_format(url)
    if fmt is not None:
        return fmt
    raise CorpusError(f"{url}: unsupported format {_extension(url)} ({SUPPORTED})")


SUPPORTED = "a corpus is Parquet (.parquet, .pq) or JSONL (.jsonl, .json, .ndjson)"


def _extension(url: str) -> str:
    """``.csv`` for ``data.csv``; ``(no extension)`` when there is none."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return "." + name.rsplit(".", 1)[-1].lower() if "." in name.lstrip(".") else "(no extension)"


def expand(urls: "list[str] | tuple[str, ...] | str") -> list[Location]:
    """Resolve files, globs and directories to a sorted list of corpus files."""
    if isinstance(urls, str):
        urls = [urls]
    found: list[Location] = []
    for url in urls:
        loc = location(url)
        if any(ch in url for ch in "*?["):
            base, pattern = _split_glob(loc)
            matches = base.glob(pattern)
        elif retry(lambda: loc.fs.isdir(loc.path), f"list {loc.url}"):
            matches = loc.glob("**")
        elif loc.exists():
            file_format(loc.url)  # a single file of another format: say which
            matches = [loc]
        else:
            raise CorpusError(f"{url}: no such file or directory")
        corpus = [m for m in matches if _is_corpus_file(m)]
        if not corpus:
            others = sorted({_extension(m.url) for m in matches
                             if not m.name.startswith((".", "_")) and not m.fs.isdir(m.path)})
            if others:
                raise CorpusError(f"{url}: unsupported format {', '.join(others)}: no Parquet or JSONL "
                                  f"files found ({SUPPORTED})")
            raise CorpusError(f"{url}: no Parquet or JSONL files found")
        found.extend(corpus)
    unique = sorted({m.url: m for m in found}.values(), key=lambda m: m.url)
    return unique


def _split_glob(loc: Location) -> tuple[Location, str]:
    parts = loc.url.split("/")
    for i, part in enumerate(parts):
        if any(ch in part for ch in "*?["):
            return Location("/".join(parts[:i]) or "/"), "/".join(parts[i:])
    return loc, ""


def _is_corpus_file(loc: Location) -> bool:
    name = loc.name.lower()
    return not name.startswith((".", "_")) and name.endswith(PARQUET_EXT + JSONL_EXT) \
        and not loc.fs.isdir(loc.path)


# ---- scanning -----------------------------------------------------------------------
def scan_file(url: str, cols: ColumnMap, stride: int) -> tuple[CorpusFile, pa.Array]:
    """Scan one file: validate the columns and ids, record piece offsets.

    Returns
    -------
    (CorpusFile, ids)
        ``ids``: pa.StringArray of length ``n_rows``, in file order.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    fmt = file_format(url)
    scan = _scan_parquet if fmt == "parquet" else _scan_jsonl
    return retry(lambda: scan(location(url), cols, stride), f"scan {url}")


def _scan_parquet(loc: Location, cols: ColumnMap, stride: int) -> tuple[CorpusFile, pa.Array]:
    try:
        with loc.open("rb") as f:
            pfile = pq.ParquetFile(f)
            names = pfile.schema_arrow.names
            _require_columns(loc.url, names, cols)
            chunks = [b.column(0) for b in pfile.iter_batches(columns=[cols.id], batch_size=65536)]
            n_rows = pfile.metadata.num_rows
    except CorpusError:
        raise
    except (pa.ArrowInvalid, OSError) as err:
        raise CorpusError(f"{loc.url}: unreadable Parquet file: {err}") from err
    ids = pa.chunked_array(chunks, type=pfile.schema_arrow.field(cols.id).type) if chunks \
        else pa.chunked_array([], type=pa.string())
    ids = _ids_as_strings(loc.url, ids.combine_chunks(), first_row=0, cols=cols)
    columns = tuple(cols.canonical(n) for n in names)
    return CorpusFile(loc.url, "parquet", n_rows, stride, (), columns), ids


def _scan_jsonl(loc: Location, cols: ColumnMap, stride: int) -> tuple[CorpusFile, pa.Array]:
    ids: list[str] = []
    offsets: list[int] = []
    columns: dict[str, None] = {}
    pos = 0
    with loc.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start, pos = pos, pos + len(raw)
            if not raw.strip():
                continue
            obj = parse_line_at(loc.url, lineno, raw, CorpusError)
            if len(ids) % stride == 0:
                offsets.append(start)
            for key in obj:
                columns.setdefault(cols.canonical(key), None)
            ids.append(_line_id(loc.url, lineno, obj, cols))
            if cols.text not in obj:
                raise CorpusError(f"{loc.url}: line {lineno}: missing text column {cols.text!r} "
                                  f"(keys: {sorted(obj)[:10]}; map it with --text-column)")
    if not ids:
        raise CorpusError(f"{loc.url}: empty file (no JSON lines)")
    return (CorpusFile(loc.url, "jsonl", len(ids), stride, tuple(offsets), tuple(columns)),
            pa.array(ids, type=pa.string()))


def check_first_file(url: str, cols: ColumnMap) -> None:
    """Check one corpus file's columns cheaply: a Parquet schema, or a JSONL file's first line.

    Catches a wrong column mapping, an empty file and a file that isn't JSON before a job
    spends anything on it; :func:`scan_file` still checks every row.
    """
    loc = location(url)
    if file_format(url) == "parquet":
        try:
            with loc.open("rb") as f:
                names = pq.ParquetFile(f).schema_arrow.names
        except (pa.ArrowInvalid, OSError) as err:
            raise CorpusError(f"{url}: unreadable Parquet file: {err}") from err
        _require_columns(url, names, cols)
        return
    with loc.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                obj = parse_line_at(url, lineno, raw, CorpusError)
                _line_id(url, lineno, obj, cols)
                if cols.text not in obj:
                    raise CorpusError(f"{url}: line {lineno}: missing text column {cols.text!r} "
                                      f"(keys: {sorted(obj)[:10]}; map it with --text-column)")
                return
    raise CorpusError(f"{url}: empty file (no JSON lines)")


def text_bytes_per_row(urls: "list[str]", cols: ColumnMap, max_files: int = 4,
                       max_rows: int = 1024) -> "float | None":
    """Mean UTF-8 bytes of text (and title, when the file has one) per row, estimated from
    the first ``max_rows`` rows of the first ``max_files`` files: a JSONL file's first lines,
    a Parquet file's column-chunk sizes from its footer (the whole file, no data read).

    A cheap, deterministic estimate of how many tokens a row holds, for sizing shards
    (``jobs.plan.auto_rows_per_shard``): the same files give the same answer. None when the
    files hold no rows. Malformed rows are skipped here; :func:`scan_file` reports them.
    """
    total, rows = 0, 0
    for url in urls[:max_files]:
        loc = location(url)
        try:
            if file_format(url) == "parquet":
                with loc.open("rb") as f:
                    meta = pq.ParquetFile(f).metadata
                wanted = {cols.text, cols.title}
                for g in range(meta.num_row_groups):
                    group = meta.row_group(g)
                    rows += group.num_rows
                    for c in range(group.num_columns):
                        chunk = group.column(c)
                        if chunk.path_in_schema in wanted:
                            # a BYTE_ARRAY value carries a 4-byte length in the page data
                            total += max(0, chunk.total_uncompressed_size - 4 * group.num_rows)
                continue
            with loc.open("rb") as f:
                seen = 0
                for raw in f:
                    if seen >= max_rows:
                        break
                    if not raw.strip():
                        continue
                    seen += 1
                    try:
                        obj = parse_line(raw)
                    except LineError:
                        continue
                    for key in (cols.text, cols.title):
                        value = obj.get(key)
                        if isinstance(value, str):
                            total += len(value.encode("utf-8", "replace"))
                rows += seen
        except (OSError, pa.ArrowInvalid):
            continue  # the scan names the file and the error
    return total / rows if rows else None


def _line_id(url: str, lineno: int, obj: dict, cols: ColumnMap) -> str:
    if cols.id not in obj:
        raise CorpusError(f"{url}: line {lineno}: missing id column {cols.id!r} (keys: {sorted(obj)[:10]}; "
                          "map it with --id-column)")
    value = obj[cols.id]
    if value is None or value == "":
        raise CorpusError(f"{url}: line {lineno}: null or empty id")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise CorpusError(f"{url}: line {lineno}: id must be a string, got {value!r}")
    return str(value)


def _require_columns(url: str, names: list[str], cols: ColumnMap) -> None:
    missing = [c for c in (cols.id, cols.text) if c not in names]
    if missing:
        raise CorpusError(f"{url}: missing required column(s) {missing}; columns present: {names[:20]} "
                          "(map them with --id-column / --text-column)")


def _ids_as_strings(url: str, ids: pa.Array, first_row: int, cols: ColumnMap) -> pa.Array:
    if pa.types.is_integer(ids.type):
        ids = pc.cast(ids, pa.string())
    elif pa.types.is_large_string(ids.type):
        ids = pc.cast(ids, pa.string())
    elif not pa.types.is_string(ids.type):
        raise CorpusError(f"{url}: id column {cols.id!r} has type {ids.type}, expected string")
    bad = pc.or_(pc.is_null(ids), pc.equal(pc.utf8_length(pc.fill_null(ids, "")), 0))
    if pc.any(bad).as_py():
        rows = pc.indices_nonzero(bad).to_pylist()[:5]
        raise CorpusError(f"{url}: null or empty id at row(s) {[first_row + r for r in rows]}")
    return ids


def find_duplicates(files: list[CorpusFile], ids: list[pa.Array], limit: int = 5,
                    cols: "ColumnMap | None" = None) -> list[str]:
    """Describe up to ``limit`` duplicated ids with the file and row of each occurrence.

    Parquet: the 0-based row; JSONL: the 1-based line (the file is read again for those:
    blank lines are not rows, so a row's position is not its line).
    """
    all_ids = pa.chunked_array(ids, type=pa.string()) if ids else pa.chunked_array([], pa.string())
    counts = pc.value_counts(all_ids)
    dup_mask = pc.greater(counts.field("counts"), 1)
    dups = pc.filter(counts.field("values"), dup_mask).to_pylist()[:limit]
    if not dups:
        return []
    wanted = set(dups)
    where: dict[str, list[str]] = {d: [] for d in dups}
    for f, arr in zip(files, ids):
        rows = [row for row, value in enumerate(arr.to_pylist()) if value in wanted]
        if not rows:
            continue
        lines = _row_lines(f, set(rows)) if f.format == "jsonl" else {}
        for row in rows:
            value = arr[row].as_py()
            if len(where[value]) < 3:
                where[value].append(f"{f.url} line {lines[row]}" if row in lines else f"{f.url} row {row}")
    return [f"{d!r} ({'; '.join(where[d])})" for d in dups]


def _row_lines(file: CorpusFile, rows: set[int]) -> dict[int, int]:
    """{row: 1-based line} of a JSONL file for the given 0-based rows (non-blank lines)."""
    out: dict[int, int] = {}
    row = 0
    with location(file.url).open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if row in rows:
                out[row] = lineno
                if len(out) == len(rows):
                    break
            row += 1
    return out


# ---- reading a piece ----------------------------------------------------------------
def read_rows(file: CorpusFile, start: int, end: int, cols: ColumnMap) -> pa.Table:
    """Rows ``[start, end)`` of a scanned file with canonical column names.

    Returns
    -------
    pa.Table with ``id`` (string), ``text`` (string, nulls allowed), ``lang`` and
    ``title`` (string, null when absent) first, then the extra columns.
    """
    if not 0 <= start <= end <= file.n_rows:
        raise ValueError(f"{file.url}: row range [{start}, {end}) outside 0..{file.n_rows}")
    read = _read_parquet_rows if file.format == "parquet" else _read_jsonl_rows
    table = retry(lambda: read(file, start, end, cols), f"read {file.url} records {start + 1}-{end}")
    return _canonicalise(file.url, table, cols)


def _read_parquet_rows(file: CorpusFile, start: int, end: int, cols: ColumnMap) -> pa.Table:
    with location(file.url).open("rb") as f:
        pfile = pq.ParquetFile(f)
        groups, first, offset = [], None, 0
        for g in range(pfile.metadata.num_row_groups):
            n = pfile.metadata.row_group(g).num_rows
            if offset + n > start and offset < end:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        if not groups:
            return pfile.schema_arrow.empty_table()
        table = pfile.read_row_groups(groups)
    return table.slice(start - first, end - start)


def _read_jsonl_rows(file: CorpusFile, start: int, end: int, cols: ColumnMap) -> pa.Table:
    if start % file.stride:
        raise ValueError(f"{file.url}: piece start {start} is not a multiple of stride {file.stride}")
    rows: list[dict] = []
    if start == end:
        return pa.table({})
    pos = file.offsets[start // file.stride]
    with location(file.url).open("rb") as f:
        f.seek(pos)
        for raw in f:
            here, pos = pos, pos + len(raw)
            if not raw.strip():
                continue
            try:
                rows.append(parse_line(raw))
            except LineError as err:  # the file changed since the scan: count the lines before it
                raise CorpusError(f"{file.url}: line {_line_at(file.url, here)}: {err}") from err.__cause__
            if len(rows) == end - start:
                break
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise CorpusError(f"{file.url}: rows {start}-{end}: inconsistent column types: {err}") from err


def _line_at(url: str, offset: int) -> int:
    """The 1-based line number of the line starting at byte ``offset`` (error path only)."""
    with location(url).open("rb") as f:
        head = f.read(offset)
    return head.count(b"\n") + 1


def _canonicalise(url: str, table: pa.Table, cols: ColumnMap) -> pa.Table:
    renamed = table.rename_columns([cols.canonical(n) for n in table.column_names])
    n = renamed.num_rows
    out: dict[str, pa.Array] = {}
    for name in CANONICAL:
        if name in renamed.column_names:
            col = renamed.column(name)
            if name == "id":
                col = _ids_as_strings(url, col.combine_chunks(), 0, cols)
            elif not pa.types.is_string(col.type):
                col = _to_string(url, name, col)
            out[name] = col
        elif name in ("id", "text"):
            raise CorpusError(f"{url}: missing required column {name!r}")
        else:
            out[name] = pa.nulls(n, pa.string())
    for name in renamed.column_names:
        if name not in out:
            out[name] = renamed.column(name)
    return pa.table(out)


def _to_string(url: str, name: str, col) -> pa.Array:
    if pa.types.is_null(col.type) or pa.types.is_large_string(col.type):
        return pc.cast(col, pa.string())
    raise CorpusError(f"{url}: column {name!r} has type {col.type}, expected string")


# ---- content hashes ---------------------------------------------------------------------
def text_hashes(texts: list) -> list[str]:
    """sha256 of each text (UTF-8; a null text hashes as the empty string)."""
    return [hashlib.sha256((t or "").encode("utf-8")).hexdigest() for t in texts]


def meta_hashes(table: pa.Table) -> list[str]:
    """sha256 per row of everything but ``id`` and ``text`` (lang, title, extra columns).

    A canonical JSON of the row (sorted keys, ``str`` for non-JSON values), so the
    same metadata read from Parquet or JSONL hashes the same. A re-index compares
    these with the stored ``meta_sha256`` to catch metadata-only edits.
    """
    names = [n for n in table.column_names if n not in ("id", "text")]
    rows = table.select(names).to_pylist() if names else [{} for _ in range(table.num_rows)]
    return [hashlib.sha256(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
            .hexdigest() for r in rows]
