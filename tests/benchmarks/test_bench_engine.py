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


_STUB = """
import json, sys, time
tree, log = sys.argv[1], sys.argv[2]
print(json.dumps({"source": tree, "queries": 3}), flush=True)
for line in sys.stdin:
    with open(log, "a") as f:
        f.write(f"{tree} {int(line)}\\n")
    print(json.dumps([0.001 * (1 + int(line)), [int(line)] * 10]), flush=True)
"""


def test_interleaved_sides_alternate_query_by_query_and_keep_their_processes(tmp_path, monkeypatch):
    """--interleave: one process a side for the whole run (here a stub speaking the --serve
    protocol), each query sent to every side before the next, the first side alternating."""
    import sys

    import benchmarks.bench_engine as bench

    log = tmp_path / "log.txt"
    stub = tmp_path / "stub.py"
    stub.write_text(_STUB)
    trees = [tmp_path / "a", tmp_path / "b"]
    for tree in trees:
        tree.mkdir()

    def command(tree, args, products, mode):
        assert mode == "--serve"
        return [sys.executable, str(stub), str(tree), str(log)], None

    monkeypatch.setattr(bench, "_tree_command", command)
    args = parse_args(["--root", "r", "--index", "i", "--queries", "q.npy", "--n", "5", "--rounds", "2",
                       "--interleave"])  # 5 asked, 3 in the (stub's) file: 3 timed
    passes = bench.run_interleaved([(str(t), None) for t in trees], args)
    a, b = (str(t) for t in trees)
    sent = [line.split() for line in log.read_text().splitlines()]
    assert sent == [[a, "0"], [b, "0"], [b, "1"], [a, "1"], [a, "2"], [b, "2"],   # round 1
                    [b, "0"], [a, "0"], [a, "1"], [b, "1"], [b, "2"], [a, "2"]]   # round 2 starts the other way
    assert [p["median_ms"] for p in passes[a]] == pytest.approx([2.0, 2.0])
    assert passes[b][1]["ids"] == [[0] * 10, [1] * 10, [2] * 10]
    assert summarise([(a, None), (b, None)], passes)["same_results"] is True


def test_an_interleaved_side_importing_another_tree_is_refused(tmp_path, monkeypatch):
    import sys

    import benchmarks.bench_engine as bench

    stub = tmp_path / "stub.py"
    stub.write_text(_STUB)
    monkeypatch.setattr(bench, "_tree_command", lambda tree, args, products, mode: (
        [sys.executable, str(stub), "/somewhere/else", str(tmp_path / "log.txt")], None))
    args = parse_args(["--root", "r", "--index", "i", "--queries", "q.npy", "--interleave"])
    with pytest.raises(RuntimeError, match="imported Tessera from /somewhere/else"):
        bench.run_interleaved([(str(tmp_path), None)], args)
