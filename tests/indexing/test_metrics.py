"""Metrics (hand-computed on toy rankings) and the evaluation report."""
from __future__ import annotations

import json
import logging
import math

import pytest

from indexing.metrics import METRIC_KEYS, EvalResult, evaluate
from indexing.report import plot_series, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DOCS = [("d1", 0.9), ("d2", 0.8), ("d3", 0.7)]


@pytest.fixture
def toy():
    """q1: relevant at rank 1, q2: at rank 3, q3: not retrieved (d9)."""
    run = {"q1": DOCS, "q2": DOCS, "q3": DOCS}
    qrels = {"q1": {"d1": 1}, "q2": {"d3": 1}, "q3": {"d9": 1}}
    return run, qrels


def test_hand_computed_per_query_values(toy):
    run, qrels = toy
    res = evaluate(run, qrels, {})
    assert res.per_query["q1"] == {"nDCG@10": 1.0, "R@10": 1.0, "R@100": 1.0, "MRR@10": 1.0}
    assert res.per_query["q2"]["nDCG@10"] == pytest.approx(0.5)      # 1 / log2(3 + 1)
    assert res.per_query["q2"]["MRR@10"] == pytest.approx(1 / 3)
    assert res.per_query["q2"]["R@10"] == 1.0
    assert res.per_query["q3"] == dict.fromkeys(METRIC_KEYS, 0.0)


def test_overall_means_and_keys(toy):
    run, qrels = toy
    res = evaluate(run, qrels, {})
    assert set(res.overall) == {"nDCG@10", "R@10", "R@100", "MRR@10", "queries"}
    assert res.overall["queries"] == 3
    assert res.overall["nDCG@10"] == pytest.approx(1.5 / 3)
    assert res.overall["MRR@10"] == pytest.approx((1 + 1 / 3) / 3)
    assert res.overall["R@10"] == pytest.approx(2 / 3)
    assert res.missing_docs == 0 and res.unjudged_queries == 0


def test_recall_at_100_sees_deeper_than_10():
    run = {"q": [(f"d{i}", 1.0 / (i + 1)) for i in range(100)]}
    res = evaluate(run, {"q": {"d49": 1, "d0": 1}}, {"q": "en"})
    assert res.per_query["q"]["R@10"] == pytest.approx(0.5)
    assert res.per_query["q"]["R@100"] == pytest.approx(1.0)
    assert res.per_query["q"]["MRR@10"] == pytest.approx(1.0)


def test_graded_relevance_uses_grades_as_gains():
    run = {"q": [("b", 2.0), ("a", 1.0), ("c", 0.5)]}
    res = evaluate(run, {"q": {"a": 2, "b": 1}}, {})
    dcg = 1 / math.log2(2) + 2 / math.log2(3)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert res.per_query["q"]["nDCG@10"] == pytest.approx(dcg / idcg)
    assert res.per_query["q"]["MRR@10"] == 1.0           # any grade > 0 is relevant
    # grade 0 is judged but not relevant
    res = evaluate({"q": [("x", 1.0), ("a", 0.5)]}, {"q": {"x": 0, "a": 1}}, {})
    assert res.per_query["q"]["MRR@10"] == pytest.approx(0.5)


def test_list_order_is_the_ranking_not_the_scores():
    # trec_eval breaks score ties by doc id (descending), which would put "b" first.
    res = evaluate({"q": [("a", 1.0), ("b", 1.0)]}, {"q": {"a": 1}}, {})
    assert res.per_query["q"]["MRR@10"] == 1.0
    # distance-like scores (ascending) do not reorder the list either; repeats count once
    res = evaluate({"q": [("x", 0.1), ("x", 0.1), ("a", 0.9)]}, {"q": {"a": 1}}, {})
    assert res.per_query["q"]["MRR@10"] == pytest.approx(0.5)


def test_per_language_grouping(toy):
    run, qrels = toy
    run = {**run, "q4": [("d2", 1.0), ("d1", 0.5)]}
    qrels = {**qrels, "q4": {"d1": 1}}
    lang = {"q1": "en", "q2": "de", "q3": None, "q4": "en"}
    res = evaluate(run, qrels, lang)
    assert list(res.per_language) == ["de", "en", "und"]
    en = res.per_language["en"]
    assert en["queries"] == 2
    assert en["nDCG@10"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert en["MRR@10"] == pytest.approx(0.75)
    assert res.per_language["de"]["nDCG@10"] == pytest.approx(0.5)
    assert res.per_language["und"] == {**dict.fromkeys(METRIC_KEYS, 0.0), "queries": 1}


def test_unjudged_skipped_and_unretrieved_score_zero(toy):
    run, qrels = toy
    run = {**run, "extra": DOCS}                       # in the run, no judgements
    qrels = {**qrels, "q5": {"d1": 1}, "empty": {}}    # judged but not in the run; empty judgements
    res = evaluate(run, qrels, {"q1": "en", "lonely": "fr"})
    assert res.unjudged_queries == 2                   # "extra" and "lonely"
    assert "extra" not in res.per_query and "empty" not in res.per_query
    assert res.per_query["q5"] == dict.fromkeys(METRIC_KEYS, 0.0)
    assert res.overall["queries"] == 4
    assert res.overall["nDCG@10"] == pytest.approx(1.5 / 4)


def test_missing_docs_counted_and_logged(toy, caplog):
    run, qrels = toy
    qrels = {**qrels, "q1": {"d1": 1, "gone": 0}}
    with caplog.at_level(logging.WARNING, logger="indexing.metrics"):
        res = evaluate(run, qrels, {}, known_docs={"d1", "d2", "d3"})
    assert res.missing_docs == 2                       # d9 and gone
    assert "2 judgements name documents absent" in caplog.text
    assert res.per_query["q3"]["R@100"] == 0.0         # still evaluated
    assert evaluate(run, qrels, {}).missing_docs == 0  # not counted without known_docs


def test_no_judged_queries_raises():
    with pytest.raises(ValueError, match="no judged queries"):
        evaluate({"q": DOCS}, {"q": {}}, {})


def test_to_dict_round_trip_is_json(toy):
    res = evaluate(*toy, {"q1": "en"})
    d = json.loads(json.dumps(res.to_dict()))
    assert set(d) == {"overall", "per_language", "per_query", "missing_docs", "unjudged_queries"}
    assert EvalResult.from_dict(d) == res


# ---- report -------------------------------------------------------------------------
def _fake(ndcg: float, *, missing: int = 0) -> EvalResult:
    langs = {"de": ndcg - 0.05, "en": ndcg + 0.05, "zh": ndcg - 0.1}
    row = lambda v: {"nDCG@10": v, "R@10": v + 0.1, "R@100": v + 0.2, "MRR@10": v, "queries": 10}  # noqa: E731
    return EvalResult(row(ndcg) | {"queries": 30}, {k: row(v) for k, v in langs.items()},
                      {"q1": {k: ndcg for k in METRIC_KEYS}}, missing_docs=missing, unjudged_queries=0)


@pytest.fixture
def fake_results():
    results = {"plaid-nbits1": _fake(0.50), "plaid-nbits2": _fake(0.60), "plaid-nbits4": _fake(0.65),
               "mrl-384": _fake(0.70, missing=3), "mrl-128": _fake(0.62)}
    meta = {"plaid-nbits1": {"kind": "plaid", "nbits": 1, "dim": 384},
            "plaid-nbits2": {"kind": "plaid", "nbits": 2, "dim": 384},
            "plaid-nbits4": {"kind": "plaid", "nbits": 4, "dim": 384},
            "mrl-384": {"kind": "flat", "dim": 384}, "mrl-128": {"kind": "flat", "dim": 128}}
    return results, meta


def test_write_report_files(tmp_path, fake_results):
    results, meta = fake_results
    out = write_report(results, str(tmp_path / "rep"), title="XQuAD", meta=meta)
    assert out["json"] == str(tmp_path / "rep" / "report.json")
    assert [p.rsplit("/", 1)[1] for p in out["plots"]] == ["quality_vs_nbits.png", "quality_vs_dim.png"]
    for url in out["plots"]:
        with open(url, "rb") as f:
            assert f.read(8) == PNG_MAGIC

    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["labels"] == list(results)
    assert report["results"]["mrl-384"]["meta"] == {"kind": "flat", "dim": 384}
    assert report["results"]["mrl-384"]["missing_docs"] == 3
    assert report["results"]["plaid-nbits2"]["overall"]["nDCG@10"] == 0.60

    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.startswith("# XQuAD\n")
    assert "| label | kind | nbits | dim | nDCG@10 | R@10 | R@100 | MRR@10 | queries |" in md
    assert "| plaid-nbits2 | plaid | 2 | 384 | 0.6000 | 0.7000 | 0.8000 | 0.6000 | 30 |" in md
    assert "| lang | plaid-nbits1 | plaid-nbits2 | plaid-nbits4 | mrl-384 | mrl-128 |" in md
    assert "| en | 0.5500 | 0.6500 | 0.7000 | 0.7500 | 0.6700 |" in md
    assert "`mrl-384`: 3 judgements naming documents absent" in md
    assert "![quality vs nbits](quality_vs_nbits.png)" in md
    assert "![quality vs dim](quality_vs_dim.png)" in md


def test_report_without_varying_settings_has_no_plots(tmp_path):
    out = write_report({"xq-ivfpq": _fake(0.5)}, tmp_path, title="one", meta={"xq-ivfpq": {"dim": 384}})
    assert out["plots"] == []
    md = (tmp_path / "report.md").read_text()
    assert "## Plots" not in md and "every query was judged" in md


def test_plot_series_holds_other_settings_fixed(fake_results):
    _, meta = fake_results
    assert plot_series(meta, "nbits") == (["plaid-nbits1", "plaid-nbits2", "plaid-nbits4"],
                                          {"kind": "plaid", "dim": 384})
    assert plot_series(meta, "dim") == (["mrl-128", "mrl-384"], {"kind": "flat"})


def test_report_rejects_bad_meta(tmp_path):
    with pytest.raises(ValueError, match="without results: \\['ghost'\\]"):
        write_report({"a": _fake(0.5)}, tmp_path, title="t", meta={"ghost": {}})
    with pytest.raises(ValueError, match=r"meta\['a'\]\['nbits'\] must be a number"):
        write_report({"a": _fake(0.5)}, tmp_path, title="t", meta={"a": {"nbits": "two"}})
    with pytest.raises(ValueError, match="no results"):
        write_report({}, tmp_path, title="t")
