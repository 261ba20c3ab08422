"""Length bucketing (embedding.batching.length_buckets): greedy and cheapest-split batches."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedding.batching import CPU_BATCH_COST, length_buckets


def _cost(lengths: np.ndarray, batches: list[np.ndarray], batch_cost: int) -> int:
    return sum(batch_cost + len(b) * int(lengths[b].max()) for b in batches)


def _check_partition(lengths: np.ndarray, batches: list[np.ndarray], max_batch: int, max_tokens: int) -> None:
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))                 # every position once
    assert list(lengths[flat]) == sorted(lengths, reverse=True)               # longest first
    for b in batches:
        assert 1 <= len(b) <= max_batch
        assert len(b) == 1 or len(b) * lengths[b].max() <= max_tokens


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=200), st.integers(1, 70), st.integers(1, 5000),
       st.sampled_from([None, 0, 8, CPU_BATCH_COST, 500]))
def test_batches_cover_every_text_once_longest_first_within_the_limits(lengths, max_batch, max_tokens, cost):
    lengths = np.array(lengths)
    _check_partition(lengths, list(length_buckets(lengths, max_batch, max_tokens, cost)), max_batch, max_tokens)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=9), st.integers(1, 9), st.sampled_from([0, 5, 32]))
def test_the_cheapest_split_is_the_optimum_of_every_split_of_the_order(lengths, max_batch, cost):
    lengths = np.array(lengths)
    got = list(length_buckets(lengths, max_batch, 10**6, cost))
    desc = np.sort(lengths)[::-1]
    best = None
    for cuts in itertools.product([0, 1], repeat=len(desc) - 1):       # brute force over contiguous splits
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [len(desc)]
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        if max(sizes) <= max_batch:
            total = sum(cost + (b - a) * int(desc[a]) for a, b in zip(bounds, bounds[1:]))
            best = total if best is None else min(best, total)
    assert _cost(lengths, got, cost) == best


def test_a_long_outlier_gets_its_own_batch_instead_of_padding_the_short_ones():
    lengths = np.array([10] * 63 + [100])
    greedy = list(length_buckets(lengths, 64, 16384))
    cheap = list(length_buckets(lengths, 64, 16384, CPU_BATCH_COST))
    assert [len(b) for b in greedy] == [64]                  # 6,400 padded tokens for 730 real ones
    assert [len(b) for b in cheap] == [1, 63] and cheap[0].tolist() == [63]
    assert _cost(lengths, cheap, 0) == 730
    assert _cost(lengths, cheap, CPU_BATCH_COST) < _cost(lengths, greedy, CPU_BATCH_COST)


def test_a_high_batch_cost_keeps_full_batches_and_bad_costs_are_refused():
    lengths = np.arange(1, 129)
    assert [len(b) for b in length_buckets(lengths, 32, 10**6, 10**6)] == [32] * 4
    with pytest.raises(ValueError, match="batch_cost"):
        list(length_buckets(lengths, 32, 100, -1))


def test_the_encoder_uses_the_cpu_batch_cost_on_cpu(tiny_model_dir):
    from embedding.encoder import Encoder
    from embedding.model import load_model

    lm = load_model(tiny_model_dir, device="cpu")
    assert Encoder(lm).batch_cost == CPU_BATCH_COST
    assert Encoder(lm, batch_cost=None).batch_cost is None
    texts = ["short"] * 20 + ["a much longer text " * 20]
    a = Encoder(lm).encode_documents(texts, dense=True, colbert=True)
    b = Encoder(lm, batch_cost=None).encode_documents(texts, dense=True, colbert=True)
    np.testing.assert_allclose(a.dense, b.dense, atol=1e-5)            # batching changes no vector
    for x, y in zip(a.tokens, b.tokens):
        np.testing.assert_allclose(x, y, atol=1e-5)
