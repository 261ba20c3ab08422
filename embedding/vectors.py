"""Encoded documents as plain arrays (no torch), so readers of cached encodings need no model."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class DocumentVectors:
    """Encoded documents, in input order.

    Attributes
    ----------
    dense : (n, H) float32 unit rows, or None.
    tokens : list of n arrays (t_i, dim) float32 unit rows, or None (float16 for the rows the
        embed job's pass 2 takes from its codec-sample cache, as pass 1 stored them).
    n_tokens : (n,) int32, tokens of the full text (with special tokens), before truncation.
    truncated : (n,) bool, some text did not reach a stored vector.
    """

    dense: "np.ndarray | None"
    tokens: "list[np.ndarray] | None"
    n_tokens: np.ndarray
    truncated: np.ndarray
