"""Length bucketing: order texts by token count so batches carry little padding."""
from __future__ import annotations

from typing import Iterator

import numpy as np

#: Per-batch cost in padded tokens that :class:`embedding.encoder.Encoder` uses on CPU
#: (``batch_cost="auto"``). A forward pass costs about this many tokens' work besides its
#: tokens (Python's dispatch of the layers, thread start-up). First measured with me5-small on
#: 2 AMD cores in float32, 4,096 Tatoeba sentences in 1,024-text shards (medians of 2
#: interleaved rounds): greedy batches 28.2 s, cost 16 22.2 s, cost 32 20.2 s; again: greedy
#: 28.5 s, cost 32 22.9 s, cost 64 23.3 s. On 2 Intel cores with AMX in bfloat16 a token
#: costs ~3x less and a batch's dispatch no less, so the balance moved: 12,837 XQuAD
#: sentences in 4,096-text shards, bare forward, interleaved rounds, cost 32 35.1 / 34.7 /
#: 34.5 / 35.4 s, 128 32.6 / 31.0 / 32.4 / 31.7 s (then 35.7 / 35.2 / 35.9 against 31.3 /
#: 32.6 / 34.1, 256 30.5 / 33.5 / 33.6): 300 batches with 0.5% padding became 233 with 1.3%.
#: XQuAD paragraphs (209 tokens) in 1,024-text shards: 195 batches, 0.8% padding -> 101, 1.9%.
#: On a GPU, where a small batch is bound by the dispatch and padding is nearly free, the
#: encoder keeps greedy batches.
CPU_BATCH_COST = 128


def length_buckets(lengths: np.ndarray, max_batch: int, max_tokens: int,
                   batch_cost: "int | None" = None) -> Iterator[np.ndarray]:
    """Split positions into batches of similar length.

    Parameters
    ----------
    lengths : (n,) int, tokens per text.
    max_batch : most sequences in one batch.
    max_tokens : most padded tokens (batch rows × longest row) in one batch.
    batch_cost : None: greedy, longest first, every batch as full as ``max_batch`` and
        ``max_tokens`` allow. A number of tokens: the split of the same longest-first order
        that minimises the padded tokens plus ``batch_cost`` per batch (exact, by dynamic
        programming over the order). A shard's few long texts then get small batches of
        their own instead of padding up to ``max_batch - 1`` short ones to their length
        (Tatoeba in 1,024-text shards, me5-small: 200.7k padded tokens greedy, 168.2k at
        cost 32, for 166.4k real ones; 268 batches instead of 188).

    Yields
    ------
    (b,) int64 positions into ``lengths``; every position exactly once, longest first.
    """
    if max_batch < 1 or max_tokens < 1:
        raise ValueError(f"max_batch and max_tokens must be >= 1 (got {max_batch}, {max_tokens})")
    if batch_cost is not None and batch_cost < 0:
        raise ValueError(f"batch_cost must be >= 0 or None (got {batch_cost})")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    if batch_cost is None:
        start = 0
        while start < len(order):
            longest = max(int(lengths[order[start]]), 1)
            size = max(1, min(max_batch, max_tokens // longest))
            yield order[start:start + size]
            start += size
        return
    for start, stop in _cheapest_split(np.maximum(np.asarray(lengths)[order].astype(np.int64), 1),
                                       max_batch, max_tokens, batch_cost):
        yield order[start:stop]


def _cheapest_split(desc: np.ndarray, max_batch: int, max_tokens: int, batch_cost: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of ``desc`` (lengths, longest first) that minimise
    ``sum(batch_cost + (stop - start) * desc[start])`` with at most ``max_batch`` rows and
    ``max_tokens`` padded tokens a batch (a single row is always allowed)."""
    n = len(desc)
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, np.int64)
    for stop in range(1, n + 1):
        starts = np.arange(max(0, stop - max_batch), stop)
        padded = desc[starts] * (stop - starts)
        cost = best[starts] + batch_cost + padded
        cost[(padded > max_tokens) & (starts < stop - 1)] = np.inf
        k = int(np.argmin(cost))
        best[stop], cut[stop] = cost[k], starts[k]
    ranges = []
    stop = n
    while stop > 0:
        ranges.append((int(cut[stop]), stop))
        stop = int(cut[stop])
    return ranges[::-1]
