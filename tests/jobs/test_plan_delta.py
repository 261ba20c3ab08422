"""Invariants of the re-index planner (pure, no I/O)."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.plan import plan_delta


@settings(max_examples=200, deadline=None)
@given(rows=st.dictionaries(st.integers(0, 4), st.sets(st.integers(0, 5000), max_size=300), max_size=5),
       per_shard=st.integers(1, 64), stride=st.integers(1, 64), first=st.integers(0, 100))
def test_every_row_once_in_bounded_shards(rows, per_shard, stride, first):
    pieces = plan_delta({f: list(r) for f, r in rows.items()}, per_shard, stride, first)
    seen = {}
    for i, p in enumerate(pieces):
        assert p.shard == first + i                       # consecutive, deterministic numbering
        assert 1 <= len(p.rows) <= per_shard
        assert p.start % stride == 0 and p.start <= p.start + p.rows[0] and p.start + p.rows[-1] == p.end - 1
        assert list(p.rows) == sorted(set(p.rows))
        for r in p.rows:
            seen.setdefault(p.file, []).append(p.start + r)
        assert json.loads(p.to_dict()["rows"]) == list(p.rows)
    assert {f: sorted(v) for f, v in seen.items()} == {f: sorted(r) for f, r in rows.items() if r}


def test_bad_input():
    with pytest.raises(ValueError, match="unique"):
        plan_delta({0: [3, 3]}, 4, 4, 0)
    with pytest.raises(ValueError, match=">= 1"):
        plan_delta({0: [1]}, 0, 4, 0)
    assert plan_delta({}, 4, 4, 7) == []
