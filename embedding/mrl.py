"""Matryoshka (MRL) truncation: a prefix of the dimensions, re-normalised."""
from __future__ import annotations

import numpy as np


def check_dim(dim: "int | None", stored: int, what: str = "vectors") -> int:
    """``dim`` (default ``stored``) validated against the stored dimension."""
    if dim is None:
        return stored
    if not isinstance(dim, (int, np.integer)) or not 1 <= dim <= stored:
        raise ValueError(f"dimension {dim!r} is not in 1..{stored}, the stored dimension of the {what}")
    return int(dim)


def truncate(vectors: np.ndarray, dim: "int | None" = None) -> np.ndarray:
    """First ``dim`` dimensions of each row, L2-normalised, as float32.

    Parameters
    ----------
    vectors : (n, D) float16/float32.
    dim : 1..D; None keeps D (still re-normalises, which undoes float16 rounding).

    Returns
    -------
    (n, dim) float32 with unit rows (zero rows stay zero).
    """
    d = check_dim(dim, vectors.shape[-1])
    out = np.ascontiguousarray(vectors[..., :d], dtype=np.float32)
    norms = np.linalg.norm(out, axis=-1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out
