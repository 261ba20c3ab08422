"""Pure helpers of benchmarks/bench_vs_colbert.py (no colbert-ai needed)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.bench_vs_colbert import (
    interleaved,
    maxsim_topk,
    ndcg_at_k,
    parse_point,
    pick_queries,
    to_ids,
    trim_padding,
)
from indexing.plaid import maxsim


def test_pick_queries_keeps_indexed_gold_per_language_in_file_order():
    rows = [{"id": f"q{i}-{lang}", "text": f"t{i}{lang}", "lang": lang} for i in range(4) for lang in ("de", "en")]
    qrels = {"q0-de": {"d0"}, "q1-de": {"missing"}, "q2-de": {"d2"}, "q3-de": {"d3"},
             "q0-en": {"e0"}, "q2-en": {"e2"}}
    qids, texts, gold = pick_queries(rows, qrels, {"d0", "d2", "d3", "e0", "e2"}, per_lang=2)
    assert qids == ["q0-de", "q0-en", "q2-de", "q2-en"]
    assert texts == ["t0de", "t0en", "t2de", "t2en"]
    assert gold == [{"d0"}, {"e0"}, {"d2"}, {"e2"}]


def test_ndcg_binary_relevance():
    assert ndcg_at_k([["a", "b"]], [{"a"}]) == 1.0
    assert ndcg_at_k([["x", "a"]], [{"a"}]) == pytest.approx(1 / np.log2(3))
    assert ndcg_at_k([["x"] * 10 + ["a"]], [{"a"}]) == 0.0
    assert ndcg_at_k([["b", "x", "a"]], [{"a", "b"}]) == pytest.approx((1 + 0.5) / (1 + 1 / np.log2(3)))


def test_to_ids_drops_padding():
    assert to_ids(np.array([[2, 0, -1]]), ["a", "b", "c"]) == [["c", "a"]]


def test_trim_padding_keeps_at_least_one_row():
    q = np.zeros((4, 3), np.float32)
    q[1, 0] = 1
    assert trim_padding(q).shape == (2, 3)
    assert trim_padding(np.zeros((4, 3))).shape == (1, 3)


def test_maxsim_topk_matches_maxsim_and_ignores_padding_rows():
    rng = np.random.default_rng(0)
    lengths = np.array([3, 0, 5, 1, 4])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    vectors = rng.standard_normal((offsets[-1] + 7, 8)).astype(np.float32)  # 7 padding rows
    q = rng.standard_normal((4, 8)).astype(np.float32)
    live = [i for i in range(len(lengths)) if lengths[i]]
    scores = {i: maxsim(q, vectors[offsets[i]:offsets[i + 1]]) for i in live}
    expected = sorted(live, key=lambda i: -scores[i])[:3]
    assert maxsim_topk(q, vectors, offsets, k=3).tolist() == expected


def test_parse_point_names_search_params_and_checks_values():
    assert parse_point("ndocs=128,exact_tokens=4096") == {"ndocs": 128, "exact_tokens": 4096}
    assert parse_point("centroid_score_threshold=0.4") == {"centroid_score_threshold": 0.4}
    assert parse_point("exact_margin=0.005,ndocs=64") == {"exact_margin": 0.005, "ndocs": 64}
    assert parse_point("exact_margin=inf") == {"exact_margin": float("inf")}
    with pytest.raises(ValueError, match="unknown search parameter 'nprobe'"):
        parse_point("nprobe=3")
    with pytest.raises(ValueError, match="ndocs"):
        parse_point("ndocs=0")


def test_interleaved_rotates_the_engines_and_keeps_first_round_tops():
    calls = []
    engines = {name: (lambda name: lambda i: calls.append((name, i)) or [name, i])(name) for name in "abc"}
    times, tops = interleaved(engines, n=3, rounds=2)
    assert calls[:3] == [("a", 0), ("b", 0), ("c", 0)]  # warm-up
    timed = calls[3:]
    assert [e for e, i in timed[:9]] == list("abc" + "bca" + "cab")  # the first engine rotates
    assert all(len(t) == 6 for t in times.values())
    assert tops["b"] == [["b", 0], ["b", 1], ["b", 2]]


@pytest.mark.parametrize("by", ["query", "pass"])
def test_interleaved_latency_alternates_by_query_or_by_pass(by, monkeypatch):
    import benchmarks.bench_vs_colbert as bench

    calls = []
    monkeypatch.setattr(bench, "colbert_queries", lambda Q: list(Q))
    monkeypatch.setattr(bench, "tessera_search", lambda cindex, q: calls.append(("tessera", int(q))) or [int(q)])
    monkeypatch.setattr(bench, "colbert_search",
                        lambda scorer, config, q: calls.append(("colbert", int(q))) or [int(q)])
    times, tops = bench.interleaved_latency(None, None, None, np.arange(3), rounds=2, by=by)
    timed = calls[2:]  # after one warm-up query each
    if by == "query":  # the first engine alternates query by query and round by round
        assert timed[:6] == [("tessera", 0), ("colbert", 0), ("colbert", 1), ("tessera", 1),
                             ("tessera", 2), ("colbert", 2)]
        assert timed[6:8] == [("colbert", 0), ("tessera", 0)]
    else:  # a whole pass each, the first engine alternating round by round
        assert [e for e, _ in timed] == ["tessera"] * 3 + ["colbert"] * 3 + ["colbert"] * 3 + ["tessera"] * 3
        assert [i for _, i in timed[:3]] == [0, 1, 2]
    assert all(len(t) == 6 for t in times.values())
    assert tops == {"tessera": [[0], [1], [2]], "colbert": [[0], [1], [2]]}
