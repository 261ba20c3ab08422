"""Fault injection for the nightly re-index (acceptance criteria of the re-index issue).

Kill a Ray actor mid-job, kill the driver, stop the S3 endpoint mid-write: every time the
rerun completes, DuckDB shows exactly the expected ids once each and search returns the
same top-10 as a clean run. Concurrent runs: exactly one proceeds. A reader polling
search during a publish (or a rollback) never sees an error or a mixed version.

Cost control: the initial set (60 docs, flat + ivf + plaid) is embedded and indexed
once per module and copied for every test; the clean reference run is one re-index of
one such copy. Every test re-indexes the same snapshot, so the reference applies to all.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import ensure_local_ray
from indexing.searcher import Searcher
from jobs.cli import main as cli
from jobs.reindex import LEASE, ReindexConfig, rollback
from jobs.reindex import run as reindex
from storage import catalog
from storage.fs import location
from storage.lease import Lease
from storage.manifest import Artifact
from tests.helpers import RAY_STATE, REPO_ROOT, clear_s3fs_instance_cache, free_port, mkdtemp_short
from tests.jobs.test_reindex import (
    QUERIES,
    docs,
    next_snapshot,
    setup_set,
    texts,
    top10,
    write_jsonl,
)

KINDS = {"flat": {}, "ivf": {"nlist": 4, "nprobe": 4}, "plaid": {}}
NAMES = {k: f"t-{k}" for k in KINDS}
# Every run uses this, the clean reference included: with ~37 of 60 rows new or changed the
# default (0.25) would rebuild the indexes; the update-in-place path is the one to fault.
MAX_ADDED_SHARE = 10.0
SHARDS = "sets/t/v000002/_shards"   # the delta shards' markers (the parent has shards 0..3)


def snapshot2(rows: list[dict]) -> list[dict]:
    """``next_snapshot`` (changed, metadata-only, deleted, new, turned-empty rows) plus ~30 more
    rewritten texts, so that the delta spans three shards (4, 5, 6) of 16 rows at most."""
    snap, _ = next_snapshot(rows)
    t = texts()
    for r in snap:
        if r["id"].startswith("d") and 8 <= int(r["id"][1:]) < 40 and r["text"].strip():
            r["text"] = f"revised {t[(int(r['id'][1:]) * 3) % len(t)]} #{r['id']}"
    return snap


def current_counts(root) -> dict[str, int]:
    con = catalog.connect(str(root))
    return dict(con.execute("select id, count(*) from documents where is_current group by id").fetchall())


def all_top10(root) -> dict[str, list[list[str]]]:
    return {n: top10(root, n) for n in NAMES.values()}


def markers(root: Path) -> dict[str, tuple[bytes, int]]:
    """{marker name: (content, mtime_ns)} of the delta shards finished so far (local root)."""
    d = Path(root) / SHARDS
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.glob("*.json"))} if d.is_dir() else {}


def versions(root, kind: str, name: str) -> list[str]:
    return Artifact(location(str(root)), kind, name).versions()


def assert_like_clean_run(root, ref: dict) -> None:
    """Exactly the snapshot's non-empty ids, once each, and the clean run's top-10 everywhere."""
    assert current_counts(root) == {i: 1 for i in ref["want"]}
    art = Artifact(location(str(root)), "sets", "t")
    assert art.current() == "v000002"
    for name in NAMES.values():
        s = Searcher.open(str(root), name)
        assert s.manifest["source"]["version"] == "v000002", name
    assert all_top10(root) == ref["after"]


# ---- module fixtures: the initial set (copied per test) and the clean reference run ---------------
@pytest.fixture(scope="module")
def world(ray_session_tmp, s3_server, tiny_model_dir, tmp_path_factory):
    ensure_local_ray()
    base = tmp_path_factory.mktemp("faults")
    rows = docs(60)
    corpus1 = write_jsonl(str(base / "snap1.jsonl"), rows)
    snap = snapshot2(rows)
    corpus2 = write_jsonl(str(base / "snap2.jsonl"), snap)
    template = base / "template"
    setup_set(template, corpus1, tiny_model_dir, kinds=KINDS)
    return {"base": base, "rows": rows, "snap": snap, "corpus1": corpus1, "corpus2": corpus2,
            "template": template}


@pytest.fixture(scope="module")
def reference(world):
    """The clean run: the same snapshot re-indexed on an untouched copy of the same set."""
    ensure_local_ray()
    root = world["base"] / "clean"
    shutil.copytree(world["template"], root)
    before = all_top10(root)
    report = reindex(ReindexConfig(set_name="t", corpus=(world["corpus2"],), root=str(root),
                                   max_added_share=MAX_ADDED_SHARE, local_rows=0))
    assert report["decision"]["mode"] == "incremental" and not report["decision"]["rebuild_indexes"]
    assert report["decision"]["encoded_in"] == "ray"   # the faults below hit Ray actors
    assert {r["how"] for r in report["indexes"].values()} == {"updated"}
    want = sorted(r["id"] for r in world["snap"] if r["text"].strip())
    ref = {"root": root, "report": report, "before": before, "after": all_top10(root), "want": want,
           "shards": sorted(markers(root))}
    assert len(ref["shards"]) >= 3, ref["shards"]        # the delta really spans several shards
    assert current_counts(root) == {i: 1 for i in want}
    assert ref["after"] != before
    return ref


@pytest.fixture
def store(world, ray_local, tmp_path):
    """A fresh copy of the initial set (v000001, indexes published)."""
    root = tmp_path / "store"
    shutil.copytree(world["template"], root)
    return root


def _cfg(world, root, **kw) -> ReindexConfig:
    return ReindexConfig(set_name="t", corpus=(world["corpus2"],), root=str(root), max_added_share=MAX_ADDED_SHARE,
                         local_rows=0, **kw)


# ---- 1. ray.kill of an encoder actor mid re-index -----------------------------------------------------
def test_actor_killed_mid_job_then_rerun_resumes(world, reference, store, ray_local, monkeypatch):
    root = store
    before_ids = current_counts(root)
    # One actor taking one shard at a time, so the shards run in plan order (Ray Data would
    # otherwise queue several on the actor, in any order): the kill on the last delta shard
    # then comes after the others finished.
    monkeypatch.setattr(ray_local.data.DataContext.get_current(), "max_tasks_in_flight_per_actor", 1)
    last = reference["shards"][-1]
    shard = int(last.split(".")[0])
    monkeypatch.setenv("TESSERA_FAILPOINTS", f"embed.shard={shard}:kill")
    with pytest.raises(Exception, match="actor died"):      # ray.exceptions.ActorDiedError
        reindex(_cfg(world, root, actors=1))
    art = Artifact(location(str(root)), "sets", "t")
    assert art.current() == "v000001" and art.versions() == ["v000001"]
    assert current_counts(root) == before_ids
    assert all_top10(root) == reference["before"]
    done = markers(root)
    assert sorted(done) == reference["shards"][:-1], done   # earlier shards finished, the killed one did not
    runs = catalog.query(str(root), "select status, exit_code from runs where job = 'reindex'")[1]
    assert runs == [("failed", 1)]

    monkeypatch.delenv("TESSERA_FAILPOINTS")
    report = reindex(_cfg(world, root, actors=1))
    assert report["status"] == "published" and report["version"] == "v000002"
    after = markers(root)
    assert sorted(after) == reference["shards"]
    for name, (content, mtime) in done.items():      # not re-encoded: the markers are untouched
        assert after[name] == (content, mtime), name
    assert_like_clean_run(root, reference)


# ---- subprocess helpers ------------------------------------------------------------------------------
def reindex_args(world, root) -> list[str]:
    return ["reindex", "--set", "t", "--corpus", world["corpus2"], "--root", str(root),
            "--max-added-share", str(MAX_ADDED_SHARE), "--local-rows", "0"]


class Cli:
    """``python -m jobs.cli ARGS`` in its own process group, its output (stdout and stderr)
    collected line by line while it runs; ``env`` overrides os.environ (None removes)."""

    def __init__(self, args: list[str], **env) -> None:
        full = {k: v for k, v in os.environ.items() if k != "TESSERA_FAILPOINTS"}
        for k, v in env.items():
            if v is None:
                full.pop(k, None)
            else:
                full[k] = v
        self.proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=str(REPO_ROOT), env=full,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def finish(self, timeout: float = 400) -> tuple[int, str]:
        """Wait; on timeout kill the whole process group (its own Ray included) and fail."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self._reader.join(10)
            pytest.fail(f"the CLI ran past {timeout}s:\n{self.log[-4000:]}")
        self._reader.join(30)
        return self.proc.returncode, self.log


def joined(**env) -> dict:
    """Env for a CLI that joins the session's Ray instead of starting its own (saves ~10 s)."""
    return {"RAY_ADDRESS": RAY_STATE["local_address"], **env}


def cli_inproc(args: list[str]) -> tuple[int, str]:
    """The CLI in this process; returns (exit code, stderr). Leaves the root logger as it was
    (the CLI reconfigures logging to the stderr of the moment)."""
    import contextlib
    import io
    import logging

    root_logger = logging.getLogger()
    handlers, level = root_logger.handlers[:], root_logger.level
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            code = cli(args)
    finally:
        root_logger.handlers[:] = handlers
        root_logger.setLevel(level)
    return code, buf.getvalue()


# ---- 2. the driver killed -----------------------------------------------------------------------------
@pytest.mark.parametrize("failpoint", ["reindex.after_shards=1:crash", "reindex.stage=2:crash"])
def test_driver_killed_then_rerun_takes_over_and_resumes(world, reference, store, failpoint):
    from storage.lease import read_lease

    root = store
    proc = Cli(reindex_args(world, root), **joined(TESSERA_FAILPOINTS=failpoint))
    code, log = proc.finish()
    assert code == 17, log[-4000:]
    art = Artifact(location(str(root)), "sets", "t")
    assert art.current() == "v000001"                # nothing published
    assert all_top10(root) == reference["before"]
    assert sorted(current_counts(root)) == sorted(r["id"] for r in world["rows"])
    dead = read_lease(location(str(root)).join("sets", "t", LEASE))
    assert dead is not None and dead["pid"] == proc.pid      # the dead driver's lease is still there
    done = markers(root)
    if "after_shards" in failpoint:
        assert done and art.versions() == ["v000001"]         # some shards done, nothing committed
    else:
        assert sorted(done) == reference["shards"]
        assert art.versions() == ["v000001", "v000002"]       # set and indexes committed, unpublished
        assert all(versions(root, "indexes", n) == ["v000001", "v000002"] for n in NAMES.values())

    code, log = Cli(reindex_args(world, root), **joined()).finish()
    assert code == 0, log[-4000:]
    assert "took over lease" in log and f"process {proc.pid} on this host no longer exists" in log
    assert read_lease(location(str(root)).join("sets", "t", LEASE)) is None
    # resumed, not redone: one new set version, one new version per index, finished shards kept
    assert art.versions() == ["v000001", "v000002"]
    assert all(versions(root, "indexes", n) == ["v000001", "v000002"] for n in NAMES.values())
    after = markers(root)
    assert sorted(after) == reference["shards"]
    assert all(after[name] == v for name, v in done.items())
    assert_like_clean_run(root, reference)
    runs = catalog.query(str(root), "select status, exit_code from runs where job = 'reindex' "
                                    "order by started_at")[1]
    assert runs == [("published", 0)]                # the killed driver wrote no report


# ---- 4. concurrent runs -------------------------------------------------------------------------------
def test_held_lease_refuses_and_expired_lease_is_taken_over(world, store):
    root = store
    lease_loc = location(str(root)).join("sets", "t", LEASE)
    # (a) a live run holds the lease: exit 5 at once, naming it; nothing written but the run report
    held = Lease.acquire(lease_loc, {"run_id": "other"}, ttl_s=60)
    try:
        t0 = time.monotonic()
        code, err = cli_inproc(reindex_args(world, root))
        elapsed = time.monotonic() - t0
    finally:
        held.release()
    assert code == 5, err
    assert "busy" in err and "held by run other" in err, err
    reports = catalog.query(str(root), "select report from runs where job = 'reindex'")[1]
    assert len(reports) == 1 and set(json.loads(reports[0][0])["timings"]) <= {"lease"}, reports
    assert elapsed < 60, elapsed                     # refused before Ray, hashing or the model
    assert versions(root, "sets", "t") == ["v000001"]
    assert not (root / "sets" / "t" / "v000002").exists()
    assert all(versions(root, "indexes", n) == ["v000001"] for n in NAMES.values())
    runs = catalog.query(str(root), "select status, exit_code from runs where job = 'reindex'")[1]
    assert runs == [("busy", 5)]

    # (c) an expired lease of a dead run on another host does not block: taken over. The
    # unchanged snapshot makes the run cheap: "nothing to do" (4) comes after the lease.
    lease_loc.write_text(json.dumps({"token": uuid.uuid4().hex, "owner": {"run_id": "ghost"},
                                     "acquired_at": "2020-01-01T00:00:00+00:00", "expires_at": time.time() - 5,
                                     "ttl_s": 60.0, "host": "elsewhere", "pid": 12345, "pid_ns": None}))
    args = reindex_args(world, root)
    args[args.index("--corpus") + 1] = world["corpus1"]
    code, err = cli_inproc(args)
    assert code == 4, err
    assert "took over lease" in err and "expired" in err, err
    assert not lease_loc.exists()                    # released at the end
    assert versions(root, "sets", "t") == ["v000001"]
    runs = catalog.query(str(root), "select status from runs where job = 'reindex' order by status")[1]
    assert runs == [("busy",), ("nothing_to_do",)]


def test_two_concurrent_runs_exactly_one_proceeds(world, reference, store):
    root = store
    procs = [Cli(reindex_args(world, root), **joined()) for _ in range(2)]
    results = [p.finish() for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 5], [log[-3000:] for _, log in results]
    loser = next(log for c, log in results if c == 5)
    assert "busy" in loser and "held by run" in loser
    assert versions(root, "sets", "t") == ["v000001", "v000002"]
    assert_like_clean_run(root, reference)
    runs = catalog.query(str(root), "select status from runs where job = 'reindex' order by status")[1]
    assert runs == [("busy",), ("published",)]


# ---- 3. the S3 endpoint fails mid-write -----------------------------------------------------------------
class StoppableS3:
    """A dedicated moto S3 endpoint that can be stopped and restarted on the same port.

    ``ThreadedMotoServer.stop`` only closes the listening socket: its handler threads keep
    serving the clients' keep-alive connections, so a client that already talks to it would
    not notice. ``stop`` here also shuts those connections down, like a crashed server.
    moto keeps its state in-process (shared with the session's server), so the buckets are
    all there again after ``start``. ``marker_put`` is set once a shard marker
    (``.../_shards/NNNNN.json``) was stored: the moment to pull the plug mid-job. Until
    then the first server holds every later marker PUT (its connection dies with the stop), so
    the job is still mid-way when the test, which may be starved of CPU beside another
    test, gets round to stopping it; a restarted server holds nothing.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.conns: set = set()
        self.lock = threading.Lock()
        self.marker_put = threading.Event()
        self.stopped = threading.Event()

    def start(self) -> None:
        from moto.moto_server.threaded_moto_server import ThreadedMotoServer
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        owner = self
        moto_app = DomainDispatcherApplication(create_backend_app)
        holds = not self.marker_put.is_set()   # only the server the test pulls the plug on
        stopped = self.stopped = threading.Event()

        def app(environ, start_response):
            path = environ.get("PATH_INFO", "")
            is_marker = environ["REQUEST_METHOD"] == "PUT" and "/_shards/" in path and path.endswith(".json")
            if is_marker and holds and owner.marker_put.is_set():
                stopped.wait(120)
                start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
                return [b"stopped"]
            out = moto_app(environ, start_response)
            if is_marker:
                owner.marker_put.set()
            return out

        class Handler(MotoRequestHandler):
            def setup(self):
                super().setup()
                with owner.lock:
                    owner.conns.add(self.connection)

            def finish(self):
                with owner.lock:
                    owner.conns.discard(self.connection)
                super().finish()

        class Server(ThreadedMotoServer):
            def _server_entry(self) -> None:
                self._server = make_server(self._ip_address, self._port, app, True, request_handler=Handler)
                self._server_ready_event.set()
                self._server.serve_forever()

        server = Server(ip_address="127.0.0.1", port=self.port, verbose=False)
        server._thread = threading.Thread(target=server._server_entry, daemon=True)
        server._thread.start()
        if not server._server_ready_event.wait(30):      # make_server failed (port taken?)
            raise RuntimeError(f"moto did not start on port {self.port}")
        self.server = server

    def stop(self) -> None:
        import socket

        if self.server is None:
            return
        self.server.stop()
        self.server = None
        with self.lock:
            conns, self.conns = list(self.conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.stopped.set()  # a held marker PUT wakes to a dead connection, as in a crash


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                        region_name="us-east-1")


def s3_markers(client, root: str) -> dict[str, tuple]:
    bucket, _, prefix = root[len("s3://"):].partition("/")
    resp = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{SHARDS}/")
    return {o["Key"].rsplit("/", 1)[1]: (o["ETag"], o["LastModified"]) for o in resp.get("Contents", [])
            if o["Key"].endswith(".json")}


def upload(local: Path, url: str) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            location(f"{url}/{p.relative_to(local).as_posix()}").write_bytes(p.read_bytes())


def wait_for(cond, timeout: float, proc: Cli) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            return cond()
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("outage", ["until_failed", "brief"])
def test_s3_endpoint_stops_mid_write(world, reference, ray_local, s3_server, s3_bucket, outage):
    """The re-index runs in a subprocess with its own Ray whose only endpoint is the dedicated
    server, stopped right after the first delta shard's marker was stored.

    until_failed: the run fails (and does not hang); restarted server, rerun: published.
    brief: the server is back as soon as the run logged its first failed request, well inside
    ``storage.fs.retry``'s window (5 tries, backoff from 0.2 s, >= 3 s in all): the same run
    completes. botocore's own retries are off (AWS_MAX_ATTEMPTS=1) so that the job's retry
    layer is what absorbs the outage, and the failing run gives up in seconds, not minutes.
    This process reads the bucket through the session's server (same moto state).
    """
    root = f"{s3_bucket}/store"
    upload(world["template"], root)
    clear_s3fs_instance_cache()
    assert all_top10(root) == reference["before"]
    session = s3_client(s3_server)
    s3 = StoppableS3()
    s3.start()
    env = {"AWS_ENDPOINT_URL": s3.endpoint, "AWS_MAX_ATTEMPTS": "1", "RAY_ADDRESS": None,
           "RAY_TMPDIR": mkdtemp_short()}
    try:
        assert s3_client(s3.endpoint).list_objects_v2(Bucket=s3_bucket[len("s3://"):])["KeyCount"] > 0
        proc = Cli(reindex_args(world, root), **env)
        assert wait_for(s3.marker_put.is_set, 400, proc), "no delta shard finished:\n" + proc.log[-4000:]
        time.sleep(0.05)                                 # let the marker's response go out
        s3.stop()
        done = s3_markers(session, root)
        assert done and len(done) < len(reference["shards"]), done       # mid-job
        if outage == "brief":
            failed = wait_for(lambda: "transient storage error" in proc.log, 60, proc)
            s3.start()
            code, log = proc.finish()
            assert failed, "no request hit the outage:\n" + log[-4000:]
            assert code == 0, log[-4000:]
        else:
            code, log = proc.finish(300)                 # fails, does not hang
            assert code != 0, log[-4000:]
            assert "EndpointConnectionError" in log, log[-4000:]
            errors = [line for line in log.splitlines() if line.startswith("tessera:")]   # one line, the last,
            assert errors == [log.strip().splitlines()[-1]], log[-4000:]                 # naming the URL
            assert f"{s3_bucket}/" in errors[0] and "Traceback" not in log and "ray::" not in log, log[-4000:]
            clear_s3fs_instance_cache()
            assert Artifact(location(root), "sets", "t").current() == "v000001"     # nothing published
            assert all_top10(root) == reference["before"]
            assert sorted(current_counts(root)) == sorted(r["id"] for r in world["rows"])
            s3.start()
            code, log = Cli(reindex_args(world, root), **env).finish()
            assert code == 0, log[-4000:]
    finally:
        s3.stop()
    clear_s3fs_instance_cache()
    after = s3_markers(session, root)
    assert sorted(after) == reference["shards"]
    assert all(after[name] == v for name, v in done.items())       # finished shards not re-encoded
    assert versions(root, "sets", "t") == ["v000001", "v000002"]
    assert all(versions(root, "indexes", n) == ["v000001", "v000002"] for n in NAMES.values())
    assert_like_clean_run(root, reference)


# ---- 5. a reader polling search and the catalog during publishes --------------------------------------
POLLED = ("t-flat", "t-plaid")


def observe(root) -> list[tuple]:
    """What a reader sees now: a fresh Searcher per polled index (its version, its source set
    version, its top-10 for QUERIES) and the catalog (current set version, current ids)."""
    out = []
    for name in POLLED:
        s = Searcher.open(str(root), name)
        hits = [[d for d, _ in h] for h in s.search(QUERIES, k=10)]
        out.append(("search", name, s.version, s.manifest["source"]["version"], hits))
    con = catalog.connect(str(root))
    cur = [r[0] for r in con.execute("select version from embedding_sets where is_current").fetchall()]
    ids = [r[0] for r in con.execute("select id from documents where is_current order by id").fetchall()]
    out.append(("catalog", cur, ids))
    return out


class Poller:
    """``observe`` in a loop on a thread; records every observation, and every error."""

    def __init__(self, root) -> None:
        self.root = root
        self.seen: list[tuple] = []
        self.errors: list[str] = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import traceback

        while not self.stop_event.is_set():
            try:
                self.seen.extend(observe(self.root))
            except Exception:  # noqa: BLE001 - recorded: the test asserts there is none
                self.errors.append(traceback.format_exc())

    def rounds(self) -> int:
        return sum(o[0] == "catalog" for o in self.seen)

    def start(self) -> None:
        self.thread.start()
        self.wait_rounds(1)

    def wait_rounds(self, n: int) -> None:
        """Wait until ``n`` more full rounds were recorded."""
        target, deadline = self.rounds() + n, time.monotonic() + 120
        while self.rounds() < target and not self.errors:
            assert time.monotonic() < deadline, "the poller is stuck"
            time.sleep(0.05)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(120)
        assert not self.thread.is_alive()


def check_observations(seen: list[tuple], expect: dict[str, dict]) -> dict[str, int]:
    """Every observation is exactly one released state. ``expect``: {set version: {"index":
    index version, "top10": {index: top-10}, "ids": current ids}}. Returns searches per set version."""
    counts = dict.fromkeys(expect, 0)
    for obs in seen:
        if obs[0] == "search":
            _, name, index_version, set_version, hits = obs
            assert set_version in expect, obs[:4]
            assert index_version == expect[set_version]["index"], obs[:4]       # the pair released together
            assert hits == expect[set_version]["top10"][name], obs[:4]          # and its results, not the other's
            counts[set_version] += 1
        else:
            _, current, ids = obs
            assert len(current) == 1 and current[0] in expect, obs[:2]
            assert ids == expect[current[0]]["ids"], current
    return counts


def test_reader_sees_old_or_new_never_mixed(world, reference, store, monkeypatch):
    """Two readers: a thread polling all along (whatever instants it happens to hit), and a
    look taken right after every single pointer write of each publish (``Artifact.publish``
    wrapped): every intermediate state a reader can meet, deterministically."""
    root = store
    old_ids = sorted(r["id"] for r in world["rows"])
    expect = {"v000001": {"index": "v000001", "top10": reference["before"], "ids": old_ids},
              "v000002": {"index": "v000002", "top10": reference["after"], "ids": reference["want"]}}
    steps: list[tuple[str, list]] = []
    original = Artifact.publish

    def publish_then_look(self, version, **kw):
        original(self, version, **kw)
        steps.append((f"{self.kind}/{self.name} -> {version}", observe(root)))

    monkeypatch.setattr(Artifact, "publish", publish_then_look)
    poller = Poller(root)
    poller.start()
    try:
        reindex(_cfg(world, root))                       # publishes while the poller reads
        poller.wait_rounds(2)                            # the 2nd one started after the publish
        first = check_observations(poller.seen, expect) if not poller.errors else None
        n_reindex = len(steps)
        for to in ("v000001", "v000002"):
            rollback(str(root), "t", to)                 # each one a publish under the reader
            poller.wait_rounds(2)
    finally:
        poller.stop()
    assert not poller.errors, poller.errors[0]
    assert first["v000001"] and first["v000002"], first  # saw the old results, then the new ones
    counts = check_observations(poller.seen, expect)
    assert counts["v000001"] > first["v000001"] and counts["v000002"] > first["v000002"], counts
    for what, seen in steps:
        try:
            check_observations(seen, expect)
        except AssertionError as err:
            raise AssertionError(f"after writing {what}: {err}") from err
        # nothing moves during one look: every index and the catalog name the same set version
        looked = {o[3] if o[0] == "search" else o[1][0] for o in seen}
        assert len(looked) == 1, (what, looked)
    # the reindex's publish: pin the old pairing, move 3 index pointers, flip the set; rollbacks: 3 + 1
    assert n_reindex == 5 and len(steps) == 5 + 2 * 4, [w for w, _ in steps]
    flips = [seen[-1][1][0][-1] for _, seen in steps]    # the catalog's current set version after each write
    # each publish flips everything at its last write (the set's CURRENT), not before
    assert "".join(flips) == "11112" + "2221" + "1112", [(w, f) for (w, _), f in zip(steps, flips)]
    assert_like_clean_run(root, reference)             # rolled back and forth: as the clean run
