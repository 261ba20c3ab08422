"""Pure helpers of benchmarks/bench_engine.py (its processes are run for real by the benchmark)."""

from __future__ import annotations

import pytest

from benchmarks.bench_engine import parse_args, summarise, table


def _pass(median, ids):
    return {"median_ms": median, "mean_ms": median + 0.1, "ids": ids}


def test_summary_takes_the_median_of_round_medians_and_checks_every_result():
    passes = {"/old": [_pass(5.0, [[1, 2]]), _pass(4.0, [[1, 2]]), _pass(6.0, [[1, 2]])],
              "/new": [_pass(3.0, [[1, 2]]), _pass(3.5, [[1, 2]]), _pass(2.0, [[1, 2]])]}
    summary = summarise(["/old", "/new"], passes)
    assert summary["same_results"] is True
    assert summary["trees"]["/old"]["median_ms"] == 5.0 and summary["trees"]["/new"]["median_ms"] == 3.0
    assert summary["trees"]["/new"]["round_medians_ms"] == [3.0, 3.5, 2.0]
    passes["/new"][2] = _pass(2.0, [[2, 1]])  # one query ranked otherwise in one round: reported
    assert summarise(["/old", "/new"], passes)["same_results"] is False
    lines = table({"index": "x", "queries": 1, "rounds": 3, "threads": 1, "summary": summary})
    assert any(line.startswith("/new") and "3.00" in line for line in lines)
    assert lines[-1].endswith("True")


@pytest.mark.parametrize("flag", ["--threads", "--rounds", "--n"])
def test_counts_below_one_are_refused(flag, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--root", "r", "--index", "i", "--queries", "q.npy", flag, "0"])
    assert f"{flag} must be >= 1" in capsys.readouterr().err
