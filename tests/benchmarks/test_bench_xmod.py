"""Tests for the pure helpers of benchmarks/bench_xmod.py (no model, no Ray, no timing)."""

from __future__ import annotations

import pytest

from benchmarks.bench_xmod import LANGS, corpus_rows, pick_texts, render_pool, stage_split, summarise_pool


def _paras() -> dict[str, list[str]]:
    return {lang: [f"{lang}-{i}" for i in range(3)] for lang in LANGS}


def test_pick_texts_languages_in_turn_and_wrap():
    texts, langs = pick_texts(_paras(), 40)
    assert langs[:12] == list(LANGS) and langs[12] == LANGS[0]
    assert texts[0] == "ar-0" and texts[12] == "ar-1" and texts[36] == "ar-0"  # 3 paragraphs: wraps round


def test_corpus_rows_same_texts_two_labellings():
    texts, langs = pick_texts(_paras(), 24)
    one, mixed = corpus_rows(texts, langs, "one"), corpus_rows(texts, langs, "mixed")
    assert [r["id"] for r in one] == [r["id"] for r in mixed]
    assert [r["text"] for r in one] == [r["text"] for r in mixed] == texts
    assert {r["lang"] for r in one} == {"en"}
    assert [r["lang"] for r in mixed] == langs and len(set(langs)) == 12
    with pytest.raises(ValueError):
        corpus_rows(texts, langs, "other")


def test_stage_split_sums_both_passes():
    t = {"sample_forward": 2.0, "worker_forward": 1.0, "sample_tokenize": 0.5, "worker_post": 0.25,
         "actor_start": 4.0, "fit_codec": 9.0, "kmeans": 1.0, "worker_compress": 0.5}
    s = stage_split(10.0, t)
    assert s == {"wall": 10.0, "forward": 3.0, "tokenize": 0.5, "post": 0.25, "actor_start": 4.0, "kmeans": 1.0,
                 "compress": 0.5, "rest": 0.75}


def _run(r, mode, label, wall, forward, start=1.0):
    return {"round": r, "mode": mode, "label": label,
            "split": {"wall": wall, "forward": forward, "tokenize": 0.0, "post": 0.0, "actor_start": start,
                      "kmeans": 0.0, "compress": 0.0, "rest": wall - forward - start}}


def test_summarise_pool_paired_ratios_and_docs_per_s():
    runs = [_run(0, "dense", "one", 10.0, 4.0), _run(0, "dense", "mixed", 12.0, 6.0),
            _run(1, "dense", "mixed", 11.0, 5.0), _run(1, "dense", "one", 11.0, 4.0),
            _run(2, "dense", "one", 9.0, 4.0), _run(2, "dense", "mixed", 18.0, 8.0),
            _run(3, "dense", "one", 9.0, 4.0)]  # round 3 unpaired: left out
    s = summarise_pool(runs, 100)["dense"]
    assert s["rounds"] == 3
    assert s["mixed_over_one_time"]["wall"] == 1.2  # median of 1.2, 1.0, 2.0
    assert s["mixed_over_one_time"]["forward"] == 1.5  # median of 1.5, 1.25, 2.0
    assert s["docs_per_s"] == {"one": 10.0, "mixed": round(100 / 12.0, 1)}
    assert s["docs_per_s_steady"]["one"] == round(100 / 9.0, 1)
    result = {"documents": 100, "model": {"hidden": 128}, "max_batch": 64, "ray_cpus": 2,
              "workers": {"actors": 1, "threads": 2}, "rounds": 3, "command": "x", "summary": {"dense": s},
              "runs": [dict(r, load_avg_after=[1.0, 1.0, 1.0]) for r in runs], "batches": {"one": 1, "mixed": 2},
              "mean_batch_rows": {"one": 100.0, "mixed": 50.0},
              "machine": {"load_avg_at_start": (1, 1, 1), "load_avg_at_end": (1, 1, 1), "platform": "p"}}
    text = "\n".join(render_pool(result))
    assert "dense" in text and "1.200" in text
