"""CPU encoders that run several forward passes at once (``Encoder(streams=...)``)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from embedding.encoder import CPU_STREAMS, STREAMS_ENV, Encoder
from embedding.model import load_model

# lengths from a few tokens to ~60, so that max_batch=4 cuts them into many batches of different widths
TEXTS = [("The river flows into the sea. " * (1 + i % 7)) + f"Satz {i} über Flüsse, 火山 {i}." for i in range(40)]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu", precision="float32")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_stream_plan(lm, two_threads, monkeypatch):
    monkeypatch.delenv(STREAMS_ENV, raising=False)
    assert CPU_STREAMS == 2
    assert Encoder(lm).stream_plan(10) == (2, 1)
    assert Encoder(lm, streams=1).stream_plan(10) == (1, 2)
    assert Encoder(lm, streams=4).stream_plan(10) == (2, 1)  # at most one stream per torch thread
    assert Encoder(lm).stream_plan(1) == (1, 2)  # one batch: nothing to overlap
    torch.set_num_threads(1)
    assert Encoder(lm).stream_plan(10) == (1, 1)
    torch.set_num_threads(4)
    assert Encoder(lm, streams=2).stream_plan(10) == (2, 2)
    for bad in (0, -1, 1.5, True, "two"):
        with pytest.raises(ValueError, match="streams must be 'auto' or an integer >= 1"):
            Encoder(lm, streams=bad)
    monkeypatch.setenv(STREAMS_ENV, "1")  # the escape hatch: auto means one stream
    assert Encoder(lm).stream_plan(10) == (1, 4)
    assert Encoder(lm, streams=2).stream_plan(10) == (2, 2)  # an explicit number wins
    monkeypatch.setenv(STREAMS_ENV, "3")
    assert Encoder(lm).stream_plan(10) == (3, 1)
    for bad in ("0", "two", "-2"):
        monkeypatch.setenv(STREAMS_ENV, bad)
        with pytest.raises(ValueError, match=f"{STREAMS_ENV} must be an integer >= 1, got '{bad}'"):
            Encoder(lm).stream_plan(10)


def test_streams_encode_exactly_what_one_stream_does(lm, two_threads, monkeypatch):
    monkeypatch.delenv(STREAMS_ENV, raising=False)
    one = Encoder(lm, max_batch=4, streams=1)
    many = Encoder(lm, max_batch=4)
    seen = []
    forward = many._forward

    def spy(seqs, **kw):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return forward(seqs, **kw)

    many._forward = spy
    a = one.encode_documents(TEXTS, dense=True, colbert=True)
    start = time.perf_counter()
    b = many.encode_documents(TEXTS, dense=True, colbert=True)
    wall = time.perf_counter() - start
    assert len(seen) >= 10
    # the longest batch alone in the caller's thread on both threads (a model's first-use
    # caches are built before threads share it), then the others in the streams on one each
    assert seen[0] == (threading.current_thread().name, 2)
    assert all(name.startswith("tessera-forward") and n == 1 for name, n in seen[1:]), seen[:3]
    np.testing.assert_allclose(b.dense, a.dense, atol=1e-6)
    assert [t.shape for t in b.tokens] == [t.shape for t in a.tokens]
    for x, y in zip(b.tokens, a.tokens):
        np.testing.assert_allclose(x, y, atol=1e-6)
    np.testing.assert_array_equal(b.n_tokens, a.n_tokens)
    np.testing.assert_array_equal(b.truncated, a.truncated)
    assert torch.get_num_threads() == 2  # the caller's threads are back
    # the stages are wall-clock seconds of the pass, not the streams' seconds added up
    stages = many.stage_seconds
    assert stages["forward"] > 0 and stages["forward"] + stages["post"] + stages["tokenize"] <= wall + 0.05
    assert many.forward_only(TEXTS, 64) == one.forward_only(TEXTS, 64)


def test_a_failing_batch_fails_the_pass_and_restores_threads(lm, two_threads, monkeypatch):
    monkeypatch.delenv(STREAMS_ENV, raising=False)
    enc = Encoder(lm, max_batch=2)
    calls = []
    forward = enc._forward

    def failing(seqs, **kw):
        calls.append(len(seqs))
        if len(calls) == 3:
            raise RuntimeError("batch 3 failed")
        return forward(seqs, **kw)

    enc._forward = failing
    with pytest.raises(RuntimeError, match="batch 3 failed"):
        enc.encode_documents(TEXTS)
    assert torch.get_num_threads() == 2
    assert not [t for t in threading.enumerate() if t.name.startswith("tessera-forward")]
    enc._forward = forward  # the encoder still works after the failure
    assert enc.encode_documents(TEXTS[:5]).dense.shape == (5, 32)


def test_fewer_batches_than_streams_get_wider_streams(lm, monkeypatch):
    monkeypatch.delenv(STREAMS_ENV, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        enc = Encoder(lm, max_batch=1, streams=4)
        seen = []
        forward = enc._forward

        def spy(seqs, **kw):
            seen.append((threading.current_thread().name.startswith("tessera-forward"), torch.get_num_threads()))
            return forward(seqs, **kw)

        enc._forward = spy
        enc.encode_documents(TEXTS[:3])  # three batches: the longest alone, then two streams of two threads
        assert seen[0] == (False, 4) and sorted(seen[1:]) == [(True, 2), (True, 2)]
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
