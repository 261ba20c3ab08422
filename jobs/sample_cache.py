"""The codec-sample cache of the embed job: pass 1's encodings of the sampled documents.

Pass 1 (``jobs.embed_worker.SampleEncoder``) writes one file per shard under ``_sample/``
in the version folder (:func:`write_cache`); the codec fit reads the token vectors back
(:func:`read_sample_tokens`, without the driver), and pass 2 takes the sampled documents'
encodings from it instead of running the model again (:func:`read_cache`). The job
deletes the folder once the version is committed.

The files are Arrow IPC files, uncompressed (``.arrow``), not Parquet: a job's scratch, read
back by the same version of the code, where Parquet's encoding only cost time. A local file
is memory-mapped and its columns are read in place, without a copy: the fit task's read of
all 507k token vectors of 12,837 XQuAD sentences (390 MB of float16) took 0.20 s against
1.4-1.6 s from Parquet, pass 2's reads of its four shards 0.19 s against 1.2 s (fresh
processes, Arrow's system allocator as in the job). An ``s3://`` file is read into
memory once, the fit's read without the dense column. A cache that an older version left
as Parquet (``.parquet``) is not read: a resumed run encodes that shard again.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, TypeVar

import numpy as np
import pyarrow as pa

from storage import layout
from storage.fs import Location, retry

if TYPE_CHECKING:
    from embedding.vectors import DocumentVectors

T = TypeVar("T")

SAMPLE_CACHE = "_sample"
#: a cache file's name after its shard's (``part-00003.arrow``)
CACHE_SUFFIX = ".arrow"
#: a cache file's schema metadata: how many token vectors it holds, read from the footer
#: first so that the fit reads every shard's vectors straight into one array
TOKEN_COUNT_KEY = b"tessera.token_vectors"
#: a cache file's schema metadata: the type the model that encoded it ran in ("bfloat16", ...;
#: :func:`read_cache_and_precision`)
PRECISION_KEY = b"tessera.precision"
#: bytes a ``binary`` column's int32 offsets can address; past it, ``large_binary``
BINARY_MAX_BYTES = int(np.iinfo(np.int32).max)


def sample_cache(vdir: Location, shard: int) -> Location:
    """Where pass 1 caches one shard's sampled encodings."""
    return vdir.join(SAMPLE_CACHE, layout.shard_name(shard).removesuffix(".parquet") + CACHE_SUFFIX)


def cached_names(vdir: Location) -> set[str]:
    """The file names of the shards whose cache pass 1 finished (a file exists only once
    it is whole: :func:`write_cache`)."""
    return {loc.name for loc in vdir.join(SAMPLE_CACHE).glob("*" + CACHE_SUFFIX)}


def write_cache(loc: Location, table: pa.Table) -> None:
    """Write one shard's cache (:func:`cache_table`) as an uncompressed Arrow IPC file, encoded
    straight into the store's file (``Location.write_with``: atomic, a reader never sees a
    partial file; never held whole in memory). No checksum: nothing publishes it."""
    def fill(f) -> None:
        with pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)
    loc.write_with(fill)


def read_cache_table(loc: Location, columns: "list[str] | None" = None,
                     schema: "pa.Schema | None" = None) -> pa.Table:
    """One shard's cache as written (``columns`` only, when given): a local file
    memory-mapped, its columns in place (no copy; the arrays are read-only); an ``s3://``
    file's batches read into memory, only ``columns``' buffers when given (the fit's read
    of the tokens downloads no dense vectors). ``schema``, the file's (:func:`cache_schema`),
    spares an ``s3://`` read of ``columns`` a second read of the footer. A file that is not
    a whole Arrow IPC file raises ValueError naming it."""
    fields = None
    if columns is not None and loc.is_remote:
        names = (schema if schema is not None else cache_schema(loc)).names
        fields = [names.index(c) for c in columns if c in names]  # a missing one: select's KeyError
    table = _with_reader(loc, lambda reader: reader.read_all(), fields)
    return table.select(columns) if columns is not None else table


def _with_reader(loc: Location, use: "Callable[[pa.ipc.RecordBatchFileReader], T]",
                 fields: "list[int] | None" = None) -> "T":
    """``use(reader)`` of the cache file at ``loc``, retrying transient store errors; an
    ``s3://`` file's reader reads only the columns numbered ``fields`` where given."""
    def read() -> "T":
        if loc.is_remote:
            options = pa.ipc.IpcReadOptions(included_fields=fields) if fields is not None else None
            with loc.open("rb") as f:  # ranged reads: the footer, then each batch's bodies
                return use(pa.ipc.open_file(f, options=options))
        # the buffers read keep the mapping after the file is closed
        with pa.memory_map(loc.path) as source:
            return use(pa.ipc.open_file(source))
    try:
        return retry(read, f"read {loc.url}")
    except FileNotFoundError:
        raise
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{loc.url}: not a readable codec-sample cache ({type(err).__name__}: {err})") from err


def cache_table(offsets: list[int], enc: "DocumentVectors | None", precision: "str | None" = None) -> pa.Table:
    """One shard's cache: each encoded row's offset, its token vectors (float16) and dense
    vector (float32) as bytes, its input length and whether it was truncated; ``precision``
    (the encoder's type, :func:`read_cache_and_precision`) in the footer when given."""
    meta = {PRECISION_KEY: precision.encode()} if precision else {}
    if enc is None:  # no non-empty sampled row: an empty cache still marks the shard done
        return pa.table({"row": pa.array([], pa.int32()), "n_tokens": pa.array([], pa.int32()),
                         "truncated": pa.array([], pa.bool_()), "tokens": pa.array([], pa.binary())},
                        metadata={TOKEN_COUNT_KEY: b"0", **meta})
    cols = {"row": pa.array(offsets, pa.int32()), "n_tokens": pa.array(enc.n_tokens, pa.int32()),
            "truncated": pa.array(enc.truncated, pa.bool_()), "tokens": _binary_column(enc.tokens, np.float16)}
    if enc.dense is not None:
        cols["dense"] = _binary_column(list(enc.dense), np.float32)
    return pa.table(cols, metadata={TOKEN_COUNT_KEY: str(sum(len(t) for t in enc.tokens)).encode(), **meta})


def _binary_column(arrays: list, dtype: type) -> pa.Array:
    """One binary value per array (its bytes as ``dtype``), built over a single buffer the
    arrays are converted into, instead of a Python ``bytes`` object per row copied again
    into Arrow (in the embed actor, that cost ~0.3 s of a 3,200-sentence shard's write);
    ``large_binary`` past 2 GiB."""
    lengths = np.array([np.size(a) for a in arrays], dtype=np.int64)
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    for a, start, end in zip(arrays, bounds[:-1], bounds[1:]):
        flat[start:end] = np.ravel(a)
    offsets = bounds * np.dtype(dtype).itemsize
    large = offsets[-1] > BINARY_MAX_BYTES
    kind, offsets = (pa.large_binary(), offsets) if large else (pa.binary(), offsets.astype(np.int32))
    return pa.Array.from_buffers(kind, len(arrays), [None, pa.py_buffer(offsets), pa.py_buffer(flat)])


def read_cache(loc: Location, dim: int) -> dict[int, tuple]:
    """{row offset: (dense (H,) float32 or None, tokens (t, dim) float16, n_tokens, truncated)}.

    The columns are read as whole arrays (each document's tokens a view of the shard's),
    not row by row as Python objects: on 12,837 sentences (~390 MB of float16) the
    row-by-row read took 2.3 s of pass 2. The tokens stay float16, as pass 1 stored
    them: compression converts them a batch at a time (a float32 copy of a shard's
    127k tokens, fresh memory, cost ~1.3 s of pass 2 on 2 CPUs)."""
    return _cache_rows(read_cache_table(loc), dim)


def read_cache_and_precision(loc: Location, dim: int) -> "tuple[dict[int, tuple], str | None]":
    """:func:`read_cache`'s rows and the type of the model that encoded them (the footer's
    :data:`PRECISION_KEY`; None for a cache written without it), in one read."""
    table = read_cache_table(loc)
    value = (table.schema.metadata or {}).get(PRECISION_KEY)
    return _cache_rows(table, dim), value.decode() if value is not None else None


def _cache_rows(table: pa.Table, dim: int) -> dict[int, tuple]:
    """:func:`read_cache`'s rows of a cache file's table."""
    if not table.num_rows:
        return {}
    rows = table.column("row").to_numpy()
    n_tokens = table.column("n_tokens").to_numpy()
    truncated = table.column("truncated").to_numpy(zero_copy_only=False)
    flat, starts = _binary_rows(table.column("tokens"), np.float16)
    tokens = flat.reshape(-1, dim)
    bounds = starts // dim
    dense = [None] * len(rows)
    if "dense" in table.column_names:
        col = _one_array(table.column("dense"))
        values, dbounds = _binary_rows(col, np.float32)
        valid = ~col.is_null().to_numpy(zero_copy_only=False)
        dense = [values[dbounds[i]:dbounds[i + 1]] if valid[i] else None for i in range(len(rows))]
    return {int(r): (dense[i], tokens[bounds[i]:bounds[i + 1]], int(n_tokens[i]), bool(truncated[i]))
            for i, r in enumerate(rows)}


def _binary_rows(column: "pa.ChunkedArray | pa.Array", dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """A binary column's values as one ``dtype`` array (no copy) and where each row starts
    in it, ``(n + 1,)`` int64 element offsets (the inverse of :func:`_binary_column`)."""
    col = _one_array(column) if isinstance(column, pa.ChunkedArray) else column
    width = np.int64 if pa.types.is_large_binary(col.type) else np.int32
    offsets = np.frombuffer(col.buffers()[1], width)[col.offset:col.offset + len(col) + 1].astype(np.int64)
    data = col.buffers()[2]
    raw = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    return raw[offsets[0]:offsets[-1]].view(dtype), (offsets - offsets[0]) // np.dtype(dtype).itemsize


def _one_array(column: pa.ChunkedArray) -> pa.Array:
    """The column as one array: its only chunk as it is (in place, in a mapped file), else the
    chunks concatenated (``combine_chunks`` copies even a single chunk)."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def read_cache_tokens(loc: Location, dim: int, schema: "pa.Schema | None" = None) -> np.ndarray:
    """Every token vector of one shard's sample cache, ``(t, dim)`` float16 (``schema``:
    :func:`read_cache_table`'s)."""
    col = read_cache_table(loc, columns=["tokens"], schema=schema).column("tokens")
    if not len(col):
        return np.zeros((0, dim), np.float16)
    return _binary_rows(col, np.float16)[0].reshape(-1, dim)


def read_sample_tokens(locs: "list[Location]", dim: int) -> np.ndarray:
    """Every token vector of these shards' caches, in order, as one ``(t, dim)`` float16 array.

    Each file's count comes from its footer (:data:`TOKEN_COUNT_KEY`), so the vectors are
    read one file at a time straight into the result, not gathered as per-shard arrays
    and concatenated (at 507k tokens that was ~0.4 GB more of fresh memory in the fit
    task); a file without the count (not one :func:`cache_table` built: an older version's
    caches were Parquet, which this version does not read) is concatenated.
    """
    schemas = [cache_schema(loc) for loc in locs]
    counts = [_token_count(schema.metadata or {}) for schema in schemas]
    if any(n is None for n in counts):
        chunks = [read_cache_tokens(loc, dim, schema) for loc, schema in zip(locs, schemas)]
        return np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float16)
    out = np.empty((sum(counts), dim), np.float16)
    start = 0
    for loc, schema, n in zip(locs, schemas, counts):
        chunk = read_cache_tokens(loc, dim, schema)
        if len(chunk) != n:
            raise ValueError(f"{loc.url}: the codec-sample cache's footer says {n} token vectors, "
                             f"it holds {len(chunk)}")
        out[start:start + n] = chunk
        start += n
    return out


def cache_schema(loc: Location) -> pa.Schema:
    """A cache file's schema, with its metadata (:data:`TOKEN_COUNT_KEY`,
    :data:`PRECISION_KEY`), from its footer alone: an ``s3://`` file's vectors are not
    downloaded for it."""
    return _with_reader(loc, lambda reader: reader.schema)


def _token_count(metadata: dict) -> "int | None":
    """:data:`TOKEN_COUNT_KEY` of a cache file's metadata; None when it has none."""
    value = metadata.get(TOKEN_COUNT_KEY)
    return int(value) if value is not None else None
