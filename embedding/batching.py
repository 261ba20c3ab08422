"""Length bucketing: order texts by token count so batches carry little padding."""
from __future__ import annotations

from typing import Iterator

import numpy as np


def length_buckets(lengths: np.ndarray, max_batch: int, max_tokens: int) -> Iterator[np.ndarray]:
    """Split positions into batches of similar length.

    Parameters
    ----------
    lengths : (n,) int, tokens per text.
    max_batch : most sequences in one batch.
    max_tokens : most padded tokens (batch rows × longest row) in one batch.

    Yields
    ------
    (b,) int64 positions into ``lengths``; every position exactly once, longest first.
    """
    if max_batch < 1 or max_tokens < 1:
        raise ValueError(f"max_batch and max_tokens must be >= 1 (got {max_batch}, {max_tokens})")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    start = 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        size = max(1, min(max_batch, max_tokens // longest))
        yield order[start:start + size]
        start += size
