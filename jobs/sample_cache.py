"""The codec-sample cache of the embed job: pass 1's encodings of the sampled documents.

Pass 1 (``jobs.embed_worker.SampleEncoder``) writes one Parquet file per shard under
``_sample/`` in the version folder; the codec fit reads the token vectors back
(:func:`read_cache_tokens`, without the driver), and pass 2 takes the sampled documents'
encodings from it instead of running the model again (:func:`read_cache`). The job
deletes the folder once the version is committed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from storage import layout, schemas
from storage.fs import Location

if TYPE_CHECKING:
    from embedding.vectors import DocumentVectors

SAMPLE_CACHE = "_sample"


def sample_cache(vdir: Location, shard: int) -> Location:
    """Where pass 1 caches one shard's sampled encodings."""
    return vdir.join(SAMPLE_CACHE, layout.shard_name(shard))


def cache_table(offsets: list[int], enc: "DocumentVectors | None") -> pa.Table:
    """One shard's cache: each encoded row's offset, its token vectors (float16) and dense
    vector (float32) as bytes, its input length and whether it was truncated."""
    if enc is None:  # no non-empty sampled row: an empty cache still marks the shard done
        return pa.table({"row": pa.array([], pa.int32()), "n_tokens": pa.array([], pa.int32()),
                         "truncated": pa.array([], pa.bool_()), "tokens": pa.array([], pa.binary())})
    cols = {"row": pa.array(offsets, pa.int32()), "n_tokens": pa.array(enc.n_tokens, pa.int32()),
            "truncated": pa.array(enc.truncated, pa.bool_()),
            "tokens": pa.array([np.ascontiguousarray(t, np.float16).tobytes() for t in enc.tokens], pa.binary())}
    if enc.dense is not None:
        cols["dense"] = pa.array([np.asarray(v, np.float32).tobytes() for v in enc.dense], pa.binary())
    return pa.table(cols)


def read_cache(loc: Location, dim: int) -> dict[int, tuple]:
    """{row offset: (dense (H,) float32 or None, tokens (t, dim) float32, n_tokens, truncated)}."""
    table = schemas.read_table(loc).to_pylist()
    return {r["row"]: (np.frombuffer(r["dense"], np.float32) if r.get("dense") is not None else None,
                       np.frombuffer(r["tokens"], np.float16).reshape(-1, dim).astype(np.float32),
                       r["n_tokens"], r["truncated"]) for r in table}


def read_cache_tokens(loc: Location, dim: int) -> np.ndarray:
    """Every token vector of one shard's sample cache, ``(t, dim)`` float16."""
    col = schemas.read_table(loc, columns=["tokens"]).column("tokens").combine_chunks()
    if not len(col):
        return np.zeros((0, dim), np.float16)
    offsets = np.frombuffer(col.buffers()[1], np.int32)[col.offset:col.offset + len(col) + 1]
    data = np.frombuffer(col.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
    return data.view(np.float16).reshape(-1, dim)
