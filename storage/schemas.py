"""Parquet schemas of an embedding set, and writing one table as one object.

* ``docs``     id, lang, title, sha256 (of the text), n_chars, n_tokens, truncated, shard,
               meta_sha256 (of lang, title and the extra columns), + the corpus' extra columns
* ``dense``    id, vector: fixed_size_list<float16>[dim] (full dimension, unit norm; MRL reads a prefix)
* ``tokens``   id, codes: list<uint8|16|32> (centroid per token), residuals: binary
               (bit-packed buckets, ``n_vectors × dim·nbits/8`` bytes), n_vectors
* ``skipped``  id, reason (e.g. ``empty_text``): nothing is dropped silently
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.fs import Location, retry

DOCS_CORE = pa.schema([
    ("id", pa.string()), ("lang", pa.string()), ("title", pa.string()), ("sha256", pa.string()),
    ("n_chars", pa.int32()), ("n_tokens", pa.int32()), ("truncated", pa.bool_()), ("shard", pa.int32()),
    ("meta_sha256", pa.string()),
])
SKIPPED = pa.schema([("id", pa.string()), ("reason", pa.string()), ("shard", pa.int32())])
FILE_KINDS = ("docs", "dense", "tokens", "skipped")


def dense_schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float16(), dim))])


def tokens_schema(code_type: pa.DataType) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("codes", pa.list_(code_type)),
                      ("residuals", pa.binary()), ("n_vectors", pa.int32())])


def dense_table(ids: list[str], vectors: np.ndarray) -> pa.Table:
    """(n, dim) float → table with float16 vectors."""
    n, dim = vectors.shape
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float16).reshape(-1), type=pa.float16())
    return pa.Table.from_arrays([pa.array(ids, pa.string()), pa.FixedSizeListArray.from_arrays(flat, dim)],
                                schema=dense_schema(dim))


def dense_matrix(table: pa.Table) -> np.ndarray:
    """The ``vector`` column as an (n, dim) float16 array (no copy when possible)."""
    col = table.column("vector").combine_chunks()
    dim = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, dim)


def tokens_table(ids: list[str], codes: list[np.ndarray], residuals: list[np.ndarray],
                 code_dtype: np.dtype) -> pa.Table:
    """Per document: its centroid codes (n_i,) and packed residuals (n_i, bytes)."""
    ctype = pa.from_numpy_dtype(np.dtype(code_dtype))
    lengths = np.array([len(c) for c in codes], np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate(codes).astype(code_dtype) if len(codes) else np.zeros(0, code_dtype)
    code_col = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=ctype))
    res_col = pa.array([np.ascontiguousarray(r).tobytes() for r in residuals], pa.binary())
    return pa.Table.from_arrays([pa.array(ids, pa.string()), code_col, res_col, pa.array(lengths)],
                                schema=tokens_schema(ctype))


def _row_group_size(table: pa.Table) -> int:
    """Rows per Parquet row group of a written table: up to 8,192."""
    return max(1, min(table.num_rows, 8192))


def write_table(loc: Location, table: pa.Table) -> dict:
    """Serialise ``table`` to Parquet (zstd) and write it as one atomic object.

    Returns
    -------
    {"rows", "bytes", "sha256"} of what was written.
    """
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=_row_group_size(table))
    data = sink.getvalue().to_pybytes()
    loc.write_bytes(data)
    return {"rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_table(loc: Location, columns: "list[str] | None" = None) -> pa.Table:
    """Read a Parquet file (only ``columns`` when given), retrying transient store errors.

    Without Arrow's pre-buffering: reading a Python file object (the store's) through
    Arrow's I/O threads sometimes aborted the process at exit ("terminate called without
    an active exception", apache/arrow#34314; 4 of 30 runs that imported torch and read
    four token files, 0 of 30 with ``pre_buffer=False``, equally fast here).

    Through ``ParquetFile.read``, not ``pq.read_table``: the latter goes through Arrow's
    dataset layer, which imports ``pyarrow.dataset`` and pandas; its first use cost a process
    ~70 MB resident against ~20 MB (an index's 12,837 ids, a serving process).
    """
    def read() -> pa.Table:
        with loc.open("rb") as f:
            return pq.ParquetFile(f, pre_buffer=False).read(columns=columns)
    return retry(read, f"read {loc.url}")
