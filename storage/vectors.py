"""Reading a set version's stored vectors: dense single vectors and compressed ColBERT tokens.

Every reader of stored vectors (index builds and updates, search's rescoring,
re-tuning) goes through here, file by file over :func:`storage.sets.set_files`
with tombstones applied (:func:`storage.sets.read_live`), so all of them see the
same rows in the same order: the live rows of the files sorted by shard, the
positions of a full index build.

Arrays come back as stored: dense vectors float16 at the stored dimension
(truncating to a Matryoshka prefix is :func:`embedding.mrl.truncate`'s job), token
codes and packed residuals as the codec wrote them (decompressing is the codec's).
A set embedded with xQG augmentation also stores ``dense_aug``/``tokens_aug`` files of
the same schemas: :func:`read_dense` takes ``vectors="augmented"`` for them, and
:func:`dense_file`/:func:`token_file` read either kind's files.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage import layout, schemas, sets
from storage.fs import Location


def dense_file(f: sets.SetFile) -> tuple[pa.StringArray, np.ndarray]:
    """The live rows of one ``dense`` file: ids ``(n,)`` and float16 vectors ``(n, D)``."""
    table = sets.read_live(f, ["id", "vector"])
    return table.column("id").combine_chunks(), schemas.dense_matrix(table)


def token_file(f: sets.SetFile, residual_bytes: int,
               code_dtype: np.dtype) -> tuple[pa.StringArray, np.ndarray, np.ndarray, np.ndarray]:
    """The live documents of one ``tokens`` file.

    Parameters
    ----------
    residual_bytes, code_dtype : the set codec's (``ResidualCodec.residual_bytes`` / ``.code_dtype``).

    Returns
    -------
    (ids (n,), codes (T,) ``code_dtype``, residuals (T, residual_bytes) uint8, lengths (n,) int64),
    T being the sum of ``lengths``; document i's tokens follow document i-1's.
    """
    table = sets.read_live(f, ["id", "codes", "residuals", "n_vectors"])
    codes = table.column("codes").combine_chunks().values.to_numpy(zero_copy_only=False)
    residuals = np.frombuffer(b"".join(v.as_py() for v in table.column("residuals")), np.uint8)
    lengths = np.asarray(table.column("n_vectors").to_numpy(), np.int64)
    residuals = residuals.reshape(int(lengths.sum()), residual_bytes)
    return table.column("id").combine_chunks(), codes.astype(code_dtype), residuals, lengths


def read_dense(set_dir: Location, manifest: dict, labels: "pa.StringArray | None" = None,
               vectors: str = "plain") -> np.ndarray:
    """The set's live float16 dense vectors, ``(n, D)``.

    Without ``labels``: in the concatenation order of the live rows of the ``dense``
    files sorted by shard (the positions of a full index build). With ``labels``
    (ids by label, nulls for holes): row ``i`` is the vector of ``labels[i]``, zeros
    for a hole. ``vectors``: ``"plain"`` or ``"augmented"`` (``dense_aug`` files).
    """
    kind = layout.vector_kind("dense", vectors)
    files = sets.set_files(set_dir, manifest, kind)
    if not files:
        raise ValueError(f"set {manifest.get('name')!r} {manifest.get('version')} has no {kind} "
                         "vectors (embedded with mode colbert" + (" or without augmentation?)" if kind != "dense"
                                                                 else "?)"))
    parts = [dense_file(f) for f in files]
    mats = np.concatenate([m for _, m in parts]).astype(np.float16, copy=False)
    if labels is None:
        return mats
    ids = pa.concat_arrays([i for i, _ in parts])
    if ids.equals(labels):
        return mats
    where = pc.index_in(labels, value_set=ids).to_numpy(zero_copy_only=False)
    out = np.zeros((len(labels), mats.shape[1]), np.float16)
    have = ~np.isnan(where.astype(np.float64))
    out[have] = mats[where[have].astype(np.int64)]
    return out
