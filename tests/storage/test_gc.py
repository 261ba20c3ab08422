"""gc housekeeping that needs no embedded set: lease takeover markers."""
from __future__ import annotations

import os
import time

from storage.fs import location
from storage.gc import collect


def test_gc_deletes_only_old_takeover_markers(tmp_path):
    d = tmp_path / "sets" / "t"
    d.mkdir(parents=True)
    old, fresh, other = (d / "_lease.json.takeover-aaa", d / "_lease.json.takeover-bbb.1", d / "notes.txt")
    for p in (old, fresh, other):
        p.write_text("{}")
    two_days_ago = time.time() - 48 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    os.utime(other, (two_days_ago, two_days_ago))

    dry = collect(location(str(tmp_path)), "t", stale_hours=24, dry_run=True)
    assert dry["sets"]["t"]["deleted_markers"] == 1 and old.exists()
    out = collect(location(str(tmp_path)), "t", stale_hours=24)
    assert out["sets"]["t"]["deleted_markers"] == 1
    assert not old.exists() and fresh.exists() and other.exists()
    assert not (d / "_lease.json").exists()          # gc's own lease is released
