"""benchmarks/bench_embed.py's reference side on the tiny model (no Ray): the bare forward and
the in-process shard run either in a spawned child that has exited when the call returns
(the default, so the job never runs beside the benchmark's own copy of the model) or in the
benchmark's process, which loads the model once and keeps it."""
from __future__ import annotations

import os

import pytest

from benchmarks.bench_embed import parse_args, time_reference

TEXTS = [f"document {i} about {'cats' if i % 2 else 'the weather in Paris'}" * (1 + i % 3) for i in range(23)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_reference_runs_in_a_child_that_has_exited(tiny_model_dir):
    fwd = time_reference("child", str(tiny_model_dir), 1, 8, "cpu", "float32", TEXTS, "both", 10, [7])
    assert fwd["pid"] != os.getpid()
    assert not _alive(fwd["pid"])  # joined before time_reference returned: its memory and threads are gone
    assert fwd["documents"] == len(TEXTS) and fwd["tokens"] > len(TEXTS) and fwd["seconds"] > 0
    assert fwd["load_seconds"] > 0 and fwd["precision"] == "float32"
    assert fwd["shards"]["documents"] == len(TEXTS) and fwd["shards"]["stages"]["forward"] > 0
    assert set(fwd["shards_by_size"]) == {"10", "7"}
    again = time_reference("child", str(tiny_model_dir), 1, 8, "cpu", "float32", TEXTS, "dense", 10, [])
    assert again["pid"] != fwd["pid"] and again["load_seconds"] > 0  # every round loads afresh
    assert again["tokens"] == fwd["tokens"]  # the same passages, prefix and max_length


def test_reference_in_the_driver_keeps_its_model(tiny_model_dir):
    first = time_reference("driver", str(tiny_model_dir), 1, 8, "cpu", "float32", TEXTS, "dense", 10, [])
    second = time_reference("driver", str(tiny_model_dir), 1, 8, "cpu", "float32", TEXTS, "dense", 10, [])
    assert first["pid"] == second["pid"] == os.getpid()
    assert second["load_seconds"] == 0.0 and first["tokens"] == second["tokens"]


def test_reference_in_defaults_to_a_child():
    base = ["--xquad", "x", "--model", "m"]
    assert parse_args(base).reference_in == "child"
    assert parse_args(base + ["--reference-in", "driver"]).reference_in == "driver"
    with pytest.raises(SystemExit):
        parse_args(base + ["--reference-in", "thread"])


def test_the_job_workers_run_the_benchmarks_own_tree(tmp_path, monkeypatch):
    """Ray's workers import from the working directory at ray.init: the job starts Ray from the
    folder its driver's code came from (jobs.runtime.code_root_cwd), which for the benchmark is
    its own tree, so an A/B of two worktrees started from one directory runs each tree's code
    in the job's workers too (until the thirty-first session the benchmark moved into its tree)."""
    from pathlib import Path

    import benchmarks.bench_embed as bench
    from jobs.runtime import CODE_ROOT, code_root_cwd

    tree = Path(bench.__file__).resolve().parents[1]
    assert Path(CODE_ROOT) == tree and (tree / "jobs" / "embed.py").exists()
    monkeypatch.chdir(tmp_path)
    with code_root_cwd():
        assert os.getcwd() == str(tree)
    assert os.getcwd() == str(tmp_path)
