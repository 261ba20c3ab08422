"""The set lease: one run at a time, dead runs' leases expire, takeover is race-safe.

Every test runs on a local folder and on S3 (the moto fixture).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from storage import lease as lease_mod
from storage.fs import Location
from storage.lease import Lease, LeaseHeld, LeaseLost, read_lease


@pytest.fixture(scope="module")
def lease_bucket(s3_server) -> str:
    """One bucket for the module: conftest's per-test ``s3_bucket`` drops the s3fs
    instance cache, and opening a new S3 session costs ~0.3 s per test."""
    import boto3

    name = f"tessera-lease-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(params=["local", "s3"])
def loc(request, tmp_path) -> Location:
    """The lease object of set "demo" under a fresh local or S3 root."""
    root = Location(str(tmp_path)) if request.param == "local" \
        else Location(request.getfixturevalue("lease_bucket")).join(uuid.uuid4().hex)
    return root.join("sets", "demo", "_lease.json")


def _marker(loc: Location, token: str, n: int = 0) -> Location:
    return Location(f"{loc.url}.takeover-{token}" + (f".{n}" if n else ""))


def _write_body(loc: Location, run_id: str = "other-run", expires_in: float = 60.0,
                **fields) -> dict:
    """Write a lease by hand, as another run would have; returns the body."""
    now = time.time()
    body = {"token": uuid.uuid4().hex, "owner": {"run_id": run_id},
            "acquired_at": "2026-01-01T00:00:00+00:00", "expires_at": now + expires_in,
            "ttl_s": 60.0, "host": socket.gethostname(), "pid": os.getpid(),
            "pid_ns": lease_mod.pid_ns(), **fields}
    loc.write_text(json.dumps(body))
    return body


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _race(n: int, fn) -> tuple[list, list]:
    """Run ``fn`` in ``n`` threads released together; returns (results, errors)."""
    barrier = threading.Barrier(n)
    results, errors, lock = [], [], threading.Lock()

    def _one(i: int) -> None:
        barrier.wait()
        try:
            out = fn(i)
        except BaseException as err:  # noqa: BLE001 - collected for the assertions
            with lock:
                errors.append(err)
        else:
            with lock:
                results.append(out)

    threads = [threading.Thread(target=_one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results, errors


# ---- acquire / release ----------------------------------------------------------------
def test_acquire_writes_body_and_release_deletes_it(loc):
    lease = Lease.acquire(loc, {"run_id": "r1"}, ttl_s=30)
    stored = read_lease(loc)
    assert stored == lease.body
    assert stored["owner"] == {"run_id": "r1"}
    assert stored["host"] == socket.gethostname() and stored["pid"] == os.getpid()
    assert stored["ttl_s"] == 30.0 and 25 < stored["expires_at"] - time.time() <= 30
    assert len(stored["token"]) == 32
    lease.check()
    lease.release()
    assert read_lease(loc) is None and not loc.exists()
    lease.release()  # idempotent
    Lease.acquire(loc, {"run_id": "r2"}).release()


def test_second_acquire_names_the_holder(loc):
    first = Lease.acquire(loc, {"run_id": "nightly-0412"}, ttl_s=60)
    with pytest.raises(LeaseHeld, match=r"run nightly-0412 \(host .*, pid \d+, acquired .*\).*"
                                        r"expires at .* \(in \d+s\).*retry after") as info:
        Lease.acquire(loc, {"run_id": "nightly-0413"})
    assert info.value.holder["token"] == first.token
    assert read_lease(loc)["token"] == first.token
    first.release()


def test_context_manager_releases_even_on_error(loc):
    with pytest.raises(KeyError), Lease.acquire(loc, {"run_id": "r1"}, ttl_s=30) as lease:
        lease.check()
        raise KeyError("boom")
    assert read_lease(loc) is None


def test_read_lease_absent_and_unreadable(loc):
    assert read_lease(loc) is None
    loc.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        read_lease(loc)


# ---- takeover ---------------------------------------------------------------------------
def test_expired_lease_is_taken_over(loc, caplog):
    old = Lease.acquire(loc, {"run_id": "stalled"}, ttl_s=0.1)
    time.sleep(0.15)
    with caplog.at_level(logging.WARNING, logger="storage.lease"):
        new = Lease.acquire(loc, {"run_id": "fresh"}, ttl_s=30)
    assert read_lease(loc)["token"] == new.token
    assert _marker(loc, old.token).exists()  # left in place on purpose
    assert "took over" in caplog.text and "run stalled" in caplog.text and "expired" in caplog.text
    new.release()


def test_same_host_dead_pid_is_taken_over(loc, caplog):
    body = _write_body(loc, run_id="killed-driver", pid=_dead_pid(), expires_in=600)
    with caplog.at_level(logging.WARNING, logger="storage.lease"):
        lease = Lease.acquire(loc, {"run_id": "rerun"})
    assert read_lease(loc)["token"] == lease.token != body["token"]
    assert "run killed-driver" in caplog.text and "no longer exists" in caplog.text
    lease.release()


def test_live_same_host_pid_is_not_taken_over(loc):
    body = _write_body(loc, run_id="live-run", pid=os.getpid(), expires_in=600)
    with pytest.raises(LeaseHeld, match="live-run"):
        Lease.acquire(loc, {"run_id": "second"})
    assert read_lease(loc)["token"] == body["token"]


def test_dead_pid_on_another_host_is_not_taken_over(loc):
    body = _write_body(loc, run_id="remote-run", pid=_dead_pid(), host="some-other-host")
    with pytest.raises(LeaseHeld, match="remote-run"):
        Lease.acquire(loc, {"run_id": "second"})
    assert read_lease(loc)["token"] == body["token"]


def test_unreadable_lease_is_held_until_older_than_ttl(loc):
    loc.write_text("{torn")
    with pytest.raises(LeaseHeld, match="unreadable"):
        Lease.acquire(loc, {"run_id": "r"}, ttl_s=30)
    time.sleep(0.15)
    lease = Lease.acquire(loc, {"run_id": "r"}, ttl_s=0.1)
    assert read_lease(loc)["token"] == lease.token


def test_takeover_in_progress_and_dead_taker(loc, monkeypatch):
    body = _write_body(loc, run_id="old", expires_in=-1)
    _marker(loc, body["token"]).write_text("{}")  # another taker is mid-takeover
    with pytest.raises(LeaseHeld, match="being taken over by another run"):
        Lease.acquire(loc, {"run_id": "new"}, ttl_s=0.1)
    # that taker died: once its marker is stale, the next marker is used
    monkeypatch.setattr(lease_mod, "_TAKEOVER_STALE_S", 0.1)
    time.sleep(0.15)
    lease = Lease.acquire(loc, {"run_id": "new"}, ttl_s=0.1)
    assert read_lease(loc)["token"] == lease.token
    assert _marker(loc, body["token"], 1).exists()


# ---- renew / check / release after loss ---------------------------------------------------
def test_renew_extends_expiry(loc):
    lease = Lease.acquire(loc, {"run_id": "r"}, ttl_s=5)
    before = read_lease(loc)["expires_at"]
    time.sleep(0.05)
    lease.renew()
    after = read_lease(loc)
    assert after["expires_at"] > before and after == lease.body
    assert after["acquired_at"] == lease.body["acquired_at"]
    lease.check()
    lease.release()


def test_lost_lease_after_takeover(loc):
    old = Lease.acquire(loc, {"run_id": "stalled"}, ttl_s=0.1)
    time.sleep(0.15)
    new = Lease.acquire(loc, {"run_id": "fresh"}, ttl_s=30)
    with pytest.raises(LeaseLost, match="taken over by run fresh"):
        old.check()
    with pytest.raises(LeaseLost, match="taken over by run fresh"):
        old.renew()
    old.release()  # must not delete the new holder's lease
    assert read_lease(loc)["token"] == new.token
    new.check()
    new.release()


def test_expired_but_untaken_lease_fails_check_and_renew(loc):
    lease = Lease.acquire(loc, {"run_id": "stalled"}, ttl_s=0.1)
    time.sleep(0.15)
    with pytest.raises(LeaseLost, match="expired"):
        lease.check()
    with pytest.raises(LeaseLost, match="expired"):
        lease.renew()


def test_release_leaves_someone_elses_lease(loc):
    lease = Lease.acquire(loc, {"run_id": "mine"}, ttl_s=30)
    other = _write_body(loc, run_id="theirs")  # e.g. an operator forced it over
    lease.release()
    assert read_lease(loc)["token"] == other["token"]
    loc.delete()
    with pytest.raises(LeaseLost, match="gone"):
        lease.check()


# ---- concurrency ------------------------------------------------------------------------
def test_concurrent_acquire_has_one_winner(loc):
    won, errors = _race(8, lambda i: Lease.acquire(loc, {"run_id": f"run-{i}"}, ttl_s=30))
    assert len(won) == 1, errors
    assert len(errors) == 7 and all(isinstance(e, LeaseHeld) for e in errors), errors
    assert read_lease(loc)["token"] == won[0].token
    won[0].release()


def test_concurrent_takeover_has_one_winner(loc):
    body = _write_body(loc, run_id="dead", expires_in=-5)
    won, errors = _race(8, lambda i: Lease.acquire(loc, {"run_id": f"run-{i}"}, ttl_s=30))
    assert len(won) == 1, errors
    assert len(errors) == 7 and all(isinstance(e, LeaseHeld) for e in errors), errors
    assert read_lease(loc)["token"] == won[0].token != body["token"]
    won[0].check()
    won[0].release()


# ---- heartbeat --------------------------------------------------------------------------
def test_heartbeat_keeps_short_lease_alive(loc):
    with Lease.acquire(loc, {"run_id": "long-job"}, ttl_s=0.6) as lease:
        time.sleep(0.9)  # 1.5 ttl
        lease.check()
        with pytest.raises(LeaseHeld, match="long-job"):
            Lease.acquire(loc, {"run_id": "intruder"}, ttl_s=0.6)
    assert read_lease(loc) is None


def test_heartbeat_remembers_loss(loc):
    lease = Lease.acquire(loc, {"run_id": "mine"}, ttl_s=0.6)
    lease.start_heartbeat(interval_s=0.05)
    other = _write_body(loc, run_id="usurper")
    deadline = time.time() + 5
    while lease.lost is None and time.time() < deadline:
        time.sleep(0.02)
    with pytest.raises(LeaseLost, match="usurper"):
        lease.check()
    lease.release()
    assert read_lease(loc)["token"] == other["token"]
