"""Pure helpers of benchmarks/bench_engine.py (its processes are run for real by the benchmark)."""

from __future__ import annotations

import pytest

from benchmarks.bench_engine import parse_args, summarise, table


def _pass(median, ids):
    return {"median_ms": median, "mean_ms": median + 0.1, "ids": ids}


def test_summary_takes_the_median_of_round_medians_and_checks_every_result():
    top = [list(range(10))]  # one query's top 10
    passes = {"/old": [_pass(5.0, top), _pass(4.0, top), _pass(6.0, top)],
              "/new": [_pass(3.0, top), _pass(3.5, top), _pass(2.0, top)]}
    sides = [("/old", None), ("/new", None)]
    summary = summarise(sides, passes)
    assert summary["same_results"] is True
    assert summary["trees"]["/old"]["median_ms"] == 5.0 and summary["trees"]["/new"]["median_ms"] == 3.0
    assert summary["trees"]["/new"]["round_medians_ms"] == [3.0, 3.5, 2.0]
    assert summary["trees"]["/new"]["overlap_with_first"] == 1.0
    passes["/new"][2] = _pass(2.0, [top[0][::-1]])  # one query ranked otherwise in one round: reported
    assert summarise(sides, passes)["same_results"] is False
    lines = table({"index": "x", "queries": 1, "rounds": 3, "threads": 1, "summary": summary})
    assert any(line.startswith("/new") and "3.00" in line for line in lines)
    assert lines[-1].endswith("True")


def test_sides_of_other_products_are_compared_by_overlap_not_identity():
    """--products: each tree once per value; int8 may rank other documents than float32, so
    identity is asked only of sides with the same products, and overlap is reported."""
    ids32, ids8 = [list(range(10))], [list(range(9)) + [42]]
    passes = {"/t [float32]": [_pass(4.0, ids32)] * 2, "/t [int8]": [_pass(2.5, ids8)] * 2,
              "/u [float32]": [_pass(4.1, ids32)] * 2, "/u [int8]": [_pass(2.4, ids8)] * 2}
    sides = [("/t", "float32"), ("/t", "int8"), ("/u", "float32"), ("/u", "int8")]
    summary = summarise(sides, passes)
    assert summary["same_results"] is True
    assert summary["trees"]["/t [int8]"]["overlap_with_first"] == pytest.approx(0.9)
    passes["/u [int8]"] = [_pass(2.4, ids32)] * 2  # the second tree's int8 side differs from the first's
    assert summarise(sides, passes)["same_results"] is False
    assert parse_args(["--root", "r", "--index", "i", "--queries", "q.npy", "--products", "float32", "int8"]
                      ).products == ["float32", "int8"]


@pytest.mark.parametrize("flag", ["--threads", "--rounds", "--n"])
def test_counts_below_one_are_refused(flag, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--root", "r", "--index", "i", "--queries", "q.npy", flag, "0"])
    assert f"{flag} must be >= 1" in capsys.readouterr().err
