"""A lease object that keeps two runs from re-indexing the same embedding set at once.

The lease is one small JSON object next to the set (``<root>/sets/<name>/_lease.json``)
and works the same on a local folder and on S3, using only the primitives of
:class:`~storage.fs.Location`: a conditional create (:meth:`Location.write_if_absent`),
an atomic overwrite, a read and a delete.

* :meth:`Lease.acquire` creates the object; if it exists and is still valid it raises
  :class:`LeaseHeld`, naming the run that holds it and when the lease expires.
* A lease may be taken over when it expired (``expires_at`` is wall-clock epoch
  seconds, compared across hosts) or when it was written on this host by a process
  that no longer exists (an operator re-running right after the driver was killed).
  Takeover is race-safe: each would-be taker creates the marker
  ``<lease>.takeover-<old token>`` with a conditional create, and only its creator may
  overwrite the lease. Markers stay in place (deleting one would reopen the race); a
  marker whose taker died mid-takeover is recognised by its age and the next one,
  ``...takeover-<old token>.1``, is used.
* A lease body that cannot be parsed (a torn local write, a hand edit) counts as held
  until the object is older than the acquirer's ``ttl_s``, then as expired.
* The holder keeps the lease with :meth:`Lease.renew` (or the heartbeat thread of
  :meth:`Lease.start_heartbeat`) and calls :meth:`Lease.check` before anything that
  must not happen twice, e.g. publishing a new version.

The lease is advisory and has no fencing token: a holder that stalls past its expiry
can be taken over while it still runs. Such a holder finds out at its next
``renew``/``check`` (:class:`LeaseLost`), so check right before committing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import fsspec.asyn

from storage.fs import Location, retry

logger = logging.getLogger(__name__)

#: A takeover is one read and one write; a takeover marker older than this (or than the
#: lease's ttl, whichever is larger) belongs to a taker that died half-way.
_TAKEOVER_STALE_S = 30.0
#: Successive markers tried for one old token before giving up.
_MAX_MARKERS = 16
#: Create / read / take-over rounds before giving up on a lease that keeps changing hands.
_MAX_ROUNDS = 5


class LeaseHeld(RuntimeError):
    """Another live run holds the lease.

    Attributes
    ----------
    holder : dict
        The lease body of the holder (empty when the stored body is unreadable).
    """

    def __init__(self, message: str, holder: dict | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


class LeaseLost(RuntimeError):
    """Our lease was taken over or deleted (e.g. we stalled past its expiry)."""


@dataclass(frozen=True)
class _Stored:
    """What the lease object holds now: the parsed body (None when unreadable) and a
    key naming this exact content (the token, or a hash of unreadable bytes)."""

    body: dict | None
    key: str


@dataclass(eq=False)
class Lease:
    """A held lease on ``loc``.

    Parameters
    ----------
    loc : Location
        The lease object, e.g. ``<root>/sets/<name>/_lease.json``.
    body : dict
        What we wrote: ``token`` (uuid hex), ``owner`` (the caller's dict, e.g. with a
        ``run_id``), ``acquired_at`` (ISO 8601, UTC), ``expires_at`` (epoch seconds),
        ``ttl_s``, ``host``, ``pid`` and ``pid_ns`` (the pid namespace, so that
        containers sharing a hostname do not judge each other's pids).
    """

    loc: Location
    body: dict
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _stop: threading.Event | None = field(default=None, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _lost: LeaseLost | None = field(default=None, init=False, repr=False)
    _renew_error: BaseException | None = field(default=None, init=False, repr=False)

    # ---- taking -----------------------------------------------------------------
    @classmethod
    def acquire(cls, loc: Location, owner: dict, ttl_s: float = 120.0) -> Lease:
        """Take the lease on ``loc`` or fail fast.

        Parameters
        ----------
        loc : Location
            The lease object.
        owner : dict
            JSON-serialisable description of the run; ``owner["run_id"]`` is quoted in
            the error other runs get.
        ttl_s : float
            Seconds the lease stays valid without a renew.

        Returns
        -------
        Lease

        Raises
        ------
        LeaseHeld
            Another live run holds the lease, or is taking it over right now.
        """
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s!r}")
        token = uuid.uuid4().hex
        for _ in range(_MAX_ROUNDS):
            body = _new_body(token, owner, ttl_s)
            if _write_if_absent(loc, _dumps(body)):
                logger.info("acquired lease %s (run %s, ttl %gs)", loc, owner.get("run_id"), ttl_s)
                return cls(loc, body)
            stored = _read_stored(loc)
            if stored is None:
                continue  # released between our create and our read: create again
            if stored.key == token:
                return cls(loc, stored.body)  # our create landed but its reply was lost
            reason = _takeover_reason(loc, stored, ttl_s)
            if reason is None:
                raise LeaseHeld(_held_message(loc, stored, ttl_s), stored.body)
            if not _claim_takeover(loc, stored, token, ttl_s):
                raise LeaseHeld(f"lease {loc} ({_describe(stored.body)}) is being taken over "
                                "by another run right now; retry later", stored.body)
            again = _read_stored(loc)
            if again is None or again.key != stored.key:
                continue  # released, or replaced since we looked: judge the new state
            body = _new_body(token, owner, ttl_s)
            loc.write_text(_dumps(body).decode("utf-8"))
            logger.warning("took over lease %s from %s: %s", loc, _describe(stored.body), reason)
            return cls(loc, body)
        raise LeaseHeld(f"lease {loc} changed hands {_MAX_ROUNDS} times while we tried to take it; "
                        "another run is competing for it, retry later")

    # ---- keeping ----------------------------------------------------------------
    @property
    def token(self) -> str:
        return self.body["token"]

    def renew(self) -> None:
        """Push ``expires_at`` to ``now + ttl_s``.

        Raises
        ------
        LeaseLost
            The stored lease is gone, carries another token, or already expired (then
            another run may be taking it over, so we must not write it back).
        """
        with self._lock:
            self._verify(_read_stored(self.loc))
            body = dict(self.body, expires_at=time.time() + float(self.body["ttl_s"]))
            self.loc.write_text(_dumps(body).decode("utf-8"))
            self.body = body
            self._renew_error = None

    @property
    def lost(self) -> "LeaseLost | None":
        """What the heartbeat found when it lost the lease (None while the lease holds)."""
        return self._lost

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless the stored lease is still ours and unexpired.

        Also raises when the heartbeat already found the lease lost.
        """
        if self._lost is not None:
            raise LeaseLost(str(self._lost)) from self._lost
        self._verify(_read_stored(self.loc))

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it still holds our token.

        Idempotent. A lease that is ours but already expired is left alone: another run
        may be half-way through taking it over, and an expired lease blocks nobody.
        """
        self.stop_heartbeat()
        with self._lock:
            stored = _read_stored(self.loc)
            if stored is None:
                return
            if stored.key != self.token:
                logger.info("not releasing lease %s: it now belongs to %s", self.loc,
                            _describe(stored.body))
                return
            if stored.body["expires_at"] < time.time():
                logger.warning("lease %s expired before release; leaving it for the next run "
                               "to take over", self.loc)
                return
            self.loc.delete()
            logger.info("released lease %s", self.loc)

    # ---- heartbeat --------------------------------------------------------------
    def start_heartbeat(self, interval_s: float | None = None) -> None:
        """Renew from a daemon thread every ``interval_s`` (default ``ttl_s / 3``).

        A renew that finds the lease lost stops the heartbeat and makes :meth:`check`
        raise :class:`LeaseLost`; other renew errors are logged and retried at the next
        beat (if they last, the lease expires and :meth:`check` says so).
        """
        if self._thread is not None and self._thread.is_alive():
            return
        interval = float(self.body["ttl_s"]) / 3 if interval_s is None else float(interval_s)
        if not interval > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s!r}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(interval, self._stop),
                                        name=f"lease-heartbeat:{self.loc}", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        """Stop the heartbeat thread (waits for a renew in flight); no-op when none runs."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        if thread is not threading.current_thread():
            thread.join()

    def _beat(self, interval: float, stop: threading.Event) -> None:
        while not stop.wait(interval):
            try:
                self.renew()
            except LeaseLost as err:
                self._lost = err
                logger.error("lease heartbeat stopped: %s", err)
                return
            except Exception as err:  # noqa: BLE001 - kept and retried; check() reports expiry
                self._renew_error = err
                logger.warning("renewing lease %s failed (%s: %s); retrying in %.1fs",
                               self.loc, type(err).__name__, err, interval)

    def __enter__(self) -> Lease:
        self.start_heartbeat()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()

    # ---- helpers ----------------------------------------------------------------
    def _verify(self, stored: _Stored | None) -> None:
        if stored is None:
            raise LeaseLost(f"lease {self.loc} is gone (deleted by someone else?)")
        if stored.key != self.token:
            raise LeaseLost(f"lease {self.loc} was taken over by {_describe(stored.body)}")
        late = time.time() - stored.body["expires_at"]
        if late > 0:
            why = f"; last renew error: {self._renew_error!r}" if self._renew_error else ""
            raise LeaseLost(f"lease {self.loc} expired {late:.1f}s ago and may be taken over "
                            f"by another run{why}")


def read_lease(loc: Location) -> dict | None:
    """The stored lease body, or None when there is no lease.

    Raises
    ------
    ValueError
        The object exists but is not a lease body.
    """
    stored = _read_stored(loc)
    if stored is None:
        return None
    if stored.body is None:
        raise ValueError(f"lease {loc} is unreadable (not a JSON lease body)")
    return stored.body


# ---- internals ----------------------------------------------------------------------
def _new_body(token: str, owner: dict, ttl_s: float) -> dict:
    now = time.time()
    return {"token": token, "owner": dict(owner), "acquired_at": _iso(now),
            "expires_at": now + float(ttl_s), "ttl_s": float(ttl_s),
            "host": socket.gethostname(), "pid": os.getpid(), "pid_ns": pid_ns()}


def _dumps(body: dict) -> bytes:
    return json.dumps(body, indent=2, sort_keys=True).encode("utf-8")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def pid_ns() -> str | None:
    """This process's pid namespace (Linux), or None: a lease's pid names a process only within it."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux: fall back to comparing hostnames only
        return None


def _write_if_absent(loc: Location, data: bytes) -> bool:
    if loc.is_remote:
        # write_if_absent talks to s3fs's client directly, which only exists once the
        # filesystem opened its session; make sure it did.
        fs = loc.fs
        fsspec.asyn.sync(fs.loop, fs.set_session)
    # A retried create whose first attempt landed returns False; acquire() then finds
    # its own token in the object.
    return retry(lambda: loc.write_if_absent(data), f"create {loc}")


def _parse(raw: bytes) -> dict | None:
    try:
        body = json.loads(raw.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
        return None
    if not isinstance(body, dict) or not isinstance(body.get("token"), str) \
            or not isinstance(body.get("expires_at"), (int, float)):
        return None
    return body


def _read_stored(loc: Location) -> _Stored | None:
    raw = b""
    for _ in range(3):
        try:
            raw = loc.read_bytes()
        except FileNotFoundError:
            return None
        body = _parse(raw)
        if body is not None:
            return _Stored(body, body["token"])
        # A local O_EXCL create is visible a moment before its bytes are: look again.
        time.sleep(0.02)
    return _Stored(None, "unreadable-" + hashlib.sha256(raw).hexdigest()[:16])


def age_s(loc: Location) -> float | None:
    """Seconds since the object was last written (None when it is gone)."""
    def _info() -> dict | None:
        if loc.is_remote:
            loc.fs.invalidate_cache(loc.path)
        try:
            return loc.fs.info(loc.path)
        except FileNotFoundError:
            return None
    info = retry(_info, f"stat {loc}")
    if info is None:
        return None
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    if isinstance(mtime, datetime):
        mtime = mtime.timestamp()
    return time.time() - float(mtime)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists under another user
        return True
    return True


def _takeover_reason(loc: Location, stored: _Stored, ttl_s: float) -> str | None:
    """Why ``stored`` may be taken over, or None while it is valid."""
    if stored.body is None:
        age = age_s(loc)
        if age is None or age > ttl_s:
            return f"its body is unreadable and {age or 0:.0f}s old"
        return None
    body, now = stored.body, time.time()
    if body["expires_at"] < now:
        return f"it expired {now - body['expires_at']:.1f}s ago"
    pid = body.get("pid")
    if body.get("host") == socket.gethostname() and body.get("pid_ns") in (None, pid_ns()) \
            and isinstance(pid, int) and pid > 0 and not _pid_alive(pid):
        return f"its process {pid} on this host no longer exists"
    return None


def _claim_takeover(loc: Location, stored: _Stored, token: str, ttl_s: float) -> bool:
    """Create this takeover's marker; True for exactly one of the racing takers."""
    base = f"{loc.url}.takeover-{stored.key}"
    stale_s = max(ttl_s, _TAKEOVER_STALE_S)
    marker_body = _dumps({"by": token, "host": socket.gethostname(), "pid": os.getpid(),
                          "at": _iso(time.time())})
    for n in range(_MAX_MARKERS):
        marker = Location(base if n == 0 else f"{base}.{n}")
        if _write_if_absent(marker, marker_body):
            return True
        age = age_s(marker)
        if age is not None and age < stale_s:
            return False
        logger.warning("takeover marker %s is %.0fs old: its taker died mid-takeover; "
                       "trying the next marker", marker, age or 0.0)
    return False


def _describe(body: dict | None) -> str:
    if not body:
        return "an unreadable lease"
    owner = body.get("owner") or {}
    return (f"run {owner.get('run_id')} (host {body.get('host')}, pid {body.get('pid')}, "
            f"acquired {body.get('acquired_at')})")


def _held_message(loc: Location, stored: _Stored, ttl_s: float) -> str:
    if stored.body is None:
        return (f"lease {loc} is unreadable (maybe being written right now); it counts as held "
                f"until it is {ttl_s:g}s old. Retry later, or delete it if no run uses this set")
    expires_at = stored.body["expires_at"]
    return (f"lease {loc} is held by {_describe(stored.body)}; it expires at {_iso(expires_at)} "
            f"(in {expires_at - time.time():.0f}s). Another run is working on this set: wait for "
            "it to finish, or retry after the lease expires")
