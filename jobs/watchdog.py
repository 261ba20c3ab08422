"""Stops the processes of a local Ray that outlived the driver which started it.

Ray ties the processes ``ray.init`` starts (gcs_server, raylet, monitor, log monitor,
dashboard head) to the driver with ``PR_SET_PDEATHSIG``, and its workers exit a second
or two after their raylet. The raylet's two agents do not: ``ray::DashboardAgent`` and
``ray::RuntimeEnvAgent`` notice within ~2 s that the raylet died, then block for 60 s
publishing that error to the GCS that died with it (Ray 2.60,
``ray._private.process_watcher.report_raylet_error_logs``; no setting shortens it), so
every ``kill -9`` of a driver left them orphaned (parent pid 1) for a minute or more.

The driver (``jobs.runtime.start_watchdog``) starts this script, stdlib only and by path
so it is up in ~30 ms, in a session of its own so that a kill of the driver's process
group does not reach it. While the driver lives, it notes every second (every quarter
second while the tree changes) the driver's Ray tree: the children of the driver whose
environment holds the marker ``TESSERA_LOCAL_RAY=<token>`` (set by the driver only while
``ray.init`` starts them: gcs_server, raylet, ...), and all their descendants (agents,
workers), each with its start time, and the Ray session folder the roots were started
with (``--session_dir``: unique to that Ray). Once the driver is gone (exit, SIGTERM,
SIGKILL: this process is reparented), it stops what is left of that tree, and any
orphan (a process with this process's new parent) that holds a file under that session
folder open for writing (its log files: an agent started after the last look),
SIGTERM, then SIGKILL. A process is only ever signalled while its pid still has the
start time noted for it (through a pidfd, so a reused pid is never hit), and only
processes of that Ray: never by name, so other Ray clusters on the machine (other
session folders) and the driver's other children are left alone. After a clean exit
(``ray.shutdown``) nothing is left and it exits at once.

Usage: ``python -I watchdog.py DRIVER_PID TOKEN``.
"""
from __future__ import annotations

import os
import signal
import sys
import time

MARKER = "TESSERA_LOCAL_RAY"
POLL_S = 0.25      # how often the parent is checked
NOTE_EVERY = 4     # polls between two looks at the tree (~6 ms of CPU each on a Ray with 3 actors) ...
BUSY_POLLS = 20    # ... but a look at every poll for this many polls after the tree last changed
GRACE_S = 1.5      # SIGTERM, then SIGKILL for what is left after this long
GIVE_UP_S = 30.0   # a process that can't die (uninterruptible sleep) is left after this

Tree = dict  # pid -> start time (clock ticks since boot, field 22 of /proc/<pid>/stat)


def stat_fields(pid: int) -> "list[bytes] | None":
    """The fields of ``/proc/<pid>/stat`` after the name (state, parent, ...), or None when
    the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2:].split()  # the name may hold spaces and parentheses


def start_time(pid: int) -> "int | None":
    """The process's start time, or None when it is gone or a zombie."""
    fields = stat_fields(pid)
    return None if fields is None or fields[0] in (b"Z", b"X") else int(fields[19])


def children(pid: int) -> list[int]:
    """Pids of ``pid``'s children (of all its threads)."""
    found: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return found


def carries(pid: int, token: str) -> bool:
    """Does ``pid``'s environment hold ``MARKER=token``?"""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{MARKER}={token}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def descendants(roots: list[int]) -> Tree:
    """``roots`` and everything below them, with their start times."""
    tree: Tree = {}
    stack = list(roots)
    while stack:
        pid = stack.pop()
        t = start_time(pid)
        if t is None or pid in tree:
            continue
        tree[pid] = t
        stack.extend(children(pid))
    return tree


def ray_tree(driver: int, token: str, marked: dict) -> Tree:
    """The driver's marked children and their descendants.

    ``marked`` maps the driver's children to (start time, marked?): a marked child's
    environment is not read again; an unmarked one's is, at every look (a few children).
    """
    roots = []
    now = {}
    for pid in children(driver):
        t = start_time(pid)
        if t is None:
            continue
        known = marked.get(pid)
        # Only a marked verdict is kept: a child looked at between its fork and its exec shows the
        # driver's environment as it was at the driver's start, without the marker ray.init set
        # (the kernel reads the environment from the initial stack; putenv does not write there),
        # and it keeps its start time across the exec.
        now[pid] = known if known and known[0] == t and known[1] else (t, carries(pid, token))
        if now[pid][1]:
            roots.append(pid)
    marked.clear()
    marked.update(now)
    return descendants(roots)


SESSION_FLAGS = ("--session_dir=", "--session-dir=")  # the raylet's and the GCS server's


def session_dirs(pids: "list[int]") -> "set[str]":
    """The Ray session folders that ``pids`` were started with (their command lines)."""
    found = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        found.update(a.split("=", 1)[1].rstrip("/") for a in args if a.startswith(SESSION_FLAGS))
    return {d for d in found if os.path.isabs(d) and d != "/"}


def writing_under(pid: int, folders: "set[str]") -> bool:
    """Does ``pid`` hold a file under one of ``folders`` open for writing?"""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # gone, or not ours to look at
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if not any(target.startswith(d + "/") for d in folders):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
                flags = next(int(line.split()[1], 8) for line in f if line.startswith(b"flags:"))
        except (OSError, StopIteration, ValueError):
            continue
        if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
            return True
    return False


def orphans_writing_under(folders: "set[str]") -> list[int]:
    """Orphans (children of this process's parent, which adopted them as it adopted this
    process) that write under ``folders``."""
    if not folders:
        return []
    me, parent = os.getpid(), os.getppid()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        fields = stat_fields(pid)
        # the start time read again after the look at its files: the same process did both
        if fields and int(fields[1]) == parent and writing_under(pid, folders) \
                and start_time(pid) == int(fields[19]):
            out.append(pid)
    return out


def marked_anywhere(token: str) -> list[int]:
    """Every process whose environment holds the marker: the ones started after the last look
    that are still marked (Ray's agents and workers overwrite part of theirs with their title)."""
    me = os.getpid()
    return [int(n) for n in os.listdir("/proc") if n.isdigit() and int(n) != me and carries(int(n), token)]


def send(pid: int, started: int, sig: int) -> None:
    """Signal ``pid`` if it is still the process that started at ``started``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:  # no pidfd (Linux < 5.3): the check and the kill are a moment apart
        if start_time(pid) == started:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return
    try:
        if start_time(pid) == started:  # the pidfd now pins this very process
            signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)


def stop(tree: Tree, token: str, folders: "set[str]" = frozenset()) -> Tree:
    """SIGTERM what is left of ``tree``, what it started since, what else is marked and the
    orphans that write under the Ray session ``folders``; SIGKILL it after ``GRACE_S``.
    Returns the processes that were found alive."""
    alive = descendants([p for p, t in tree.items() if start_time(p) == t] + marked_anywhere(token)
                        + orphans_writing_under(folders))
    for pid, t in alive.items():
        send(pid, t, signal.SIGTERM)
    t0 = time.monotonic()
    while True:
        left = {p: t for p, t in alive.items() if start_time(p) == t}
        if not left or time.monotonic() - t0 > GIVE_UP_S:
            return alive
        if time.monotonic() - t0 > GRACE_S:
            for pid, t in left.items():
                send(pid, t, signal.SIGKILL)
        time.sleep(0.1)


def main(argv: list[str]) -> int:
    driver, token = int(argv[0]), argv[1]
    # Terminal Ctrl+C and hang-ups are for the driver, which handles them itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    tree: Tree = {}
    marked: dict = {}
    folders: set = set()
    polls, busy = 0, BUSY_POLLS  # ray.init starts right after this script
    while os.getppid() == driver:  # reparented (to init or a subreaper) once the driver is gone
        if busy > 0 or polls % NOTE_EVERY == 0:
            # A process noted once stays noted while it lives, even if it leaves the tree.
            # While Ray starts processes (its agents come up a second after the raylet), the
            # tree is looked at every poll: a process started after the last look is found
            # only if it still shows the marker (Ray's agents may not) or writes into the
            # session folder.
            now = {**{p: t for p, t in tree.items() if start_time(p) == t}, **ray_tree(driver, token, marked)}
            if not folders:  # until a root shows it: a root looked at before its exec does not
                folders = session_dirs([p for p, (_, is_root) in marked.items() if is_root])
            busy = BUSY_POLLS if now != tree else max(busy - 1, 0)
            tree = now
        polls += 1
        time.sleep(POLL_S)
    stop(tree, token, folders)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
