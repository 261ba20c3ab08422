"""benchmarks/bench_codec_steps.py end to end on a tiny cache (no model): both steps run in
child processes for two trees and the summary says whether their outputs agree."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.bench_codec_steps import main
from embedding.vectors import DocumentVectors
from jobs.sample_cache import cache_table, write_cache
from storage.fs import Location

REPO = Path(__file__).resolve().parents[2]
DIM = 16


def test_two_trees_time_both_steps_and_agree(tmp_path):
    rng = np.random.default_rng(0)
    for shard in range(2):
        tokens = [rng.standard_normal((n, DIM)).astype(np.float32) for n in rng.integers(1, 30, 40)]
        enc = DocumentVectors(None, tokens, np.array([len(t) for t in tokens], np.int32), np.zeros(40, bool))
        write_cache(Location(str(tmp_path / "cache" / f"part-{shard:05d}.arrow")), cache_table(list(range(40)), enc))
    out = tmp_path / "steps.json"
    assert main(["--cache", str(tmp_path / "cache"), "--trees", str(REPO), str(REPO), "--kmeans", "flat",
                 "--nbits", "2", "--dim", str(DIM), "--rounds", "1", "--threads", "1", "--settle", "0",
                 "--out", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"fit", "pass2"}
    for step in summary.values():
        assert step["same_output"] is True and step["base_seconds"] > 0 and step["new_seconds"] > 0
    assert "pass2" in out.with_suffix(".txt").read_text()
