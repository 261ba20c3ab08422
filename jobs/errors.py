"""From an exception to what the user reads: one line on stderr and an exit code.

Errors raised on a Ray worker reach the driver wrapped (``RayTaskError``, whose
``str`` is the worker's whole traceback with ANSI colours; Ray Data adds its own
``UserCodeException``). :func:`unwrap` digs out the exception the worker raised,
:func:`one_line` turns any message into one plain line, and :func:`describe`
gives the CLI's exit code and line for a failure. This module is the one home of the exit
codes (and of the run outcomes they stand for); nothing else defines one. Nothing here imports Ray: a Ray exception can
only exist once Ray is imported, so ``sys.modules`` is asked instead.
"""
from __future__ import annotations

import logging
import re
import sys

#: The CLI's exit codes. 130/143 (interrupted, terminated) come from ``jobs.runtime``.
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_REFUSED, EXIT_NOTHING, EXIT_BUSY = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130
#: The word the CLI prints before the message of a run that stopped without failing.
RUN_WORDS = {EXIT_REFUSED: "refused", EXIT_NOTHING: "nothing to do", EXIT_BUSY: "busy"}
#: A run report's ``status`` for each exit code.
RUN_STATUS = {EXIT_OK: "published", EXIT_FAILED: "failed", EXIT_BAD_INPUT: "bad_input",
              EXIT_REFUSED: "refused", EXIT_NOTHING: "nothing_to_do", EXIT_BUSY: "busy"}

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
#: the last line of a Python traceback: ``package.module.Error: message``
_EXC_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$")
#: what Ray Data appends to a failed task's exception (``_annotate_exception_with_retry_context``)
_RAY_SUFFIX = re.compile(r"^(Failed to .+ after \d+/\d+ attempts|To change retry attempts|"
                         r"This looks like an AWS S3 permissions error)")
_MAX_CHARS = 600


class Refused(RuntimeError):
    """A run that would change what a set means and was not asked to (exit 3): a re-index with
    another model without ``--full``; a re-tuned query encoder refused by its gate."""


class NothingToDo(RuntimeError):
    """The input equals what is already stored (exit 4): an unchanged snapshot or corpus."""


def unwrap(err: BaseException) -> BaseException:
    """The exception the user's code (a task, an actor, a Ray Data UDF) raised, out of
    Ray's wrappers; ``err`` itself when it is not a Ray wrapper."""
    exc = sys.modules.get("ray.exceptions")
    if exc is None:
        return err
    seen: set[int] = set()
    while id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, exc.RayTaskError):
            cause = err.cause
            if cause is None or cause is err:
                break
            if isinstance(cause, exc.UserCodeException) and cause.__cause__ is None:
                # Ray Data's wrapper lost the UDF's exception on the way (``__cause__`` is
                # not pickled); only the traceback text still holds its message.
                return _from_traceback(str(err)) or cause
            err = cause
        elif isinstance(err, exc.UserCodeException) and err.__cause__ is not None:
            err = err.__cause__
        else:
            break
    return err


def _from_traceback(text: str) -> "RuntimeError | None":
    """The innermost non-Ray ``Type: message`` of a traceback text, as a RuntimeError."""
    lines = [_ANSI.sub("", line).rstrip() for line in text.splitlines()]
    found = [m for m in map(_EXC_LINE.match, lines) if m and not m.group(0).startswith("ray.")]
    if not found:
        return None
    # Chained blocks print innermost first; the wrapper our worker raised (naming the shard)
    # is the last one before Ray's.
    m = found[-1]
    return RuntimeError(f"{m.group(1)}: {m.group(2)}")


def one_line(err: "BaseException | str") -> str:
    """``err``'s message as one line: ANSI codes stripped, a traceback reduced to its last
    ``Type: message``, Ray Data's retry advice dropped, other line breaks folded, at most
    ~600 characters."""
    text = _ANSI.sub("", str(err)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not _RAY_SUFFIX.match(line.strip())]
    if "Traceback (most recent call last)" in text and lines:
        lines = lines[-1:]
    out = " ".join(lines) or type(err).__name__
    return out if len(out) <= _MAX_CHARS else out[:_MAX_CHARS - 1] + "…"


def bad_input(err: BaseException) -> "BaseException | None":
    """The exception in ``err``'s chain that says the user's input is at fault, or None."""
    from embedding.faiss_import import FaissMissing
    from storage.manifest import NotFoundError

    seen: set[int] = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (ValueError, NotFoundError, FileNotFoundError, FaissMissing)):
            return e  # CorpusError, ModelError, QueryFileError are ValueErrors
        stack.extend([e.__cause__, e.__context__])
    return None


def exit_code(err: BaseException) -> int:
    """The exit code of a failed run: 3 refused, 4 nothing to do, 5 busy, 2 bad input, 1 anything
    else; 130/143 for an interrupt (``KeyboardInterrupt``, ``jobs.runtime.Terminated``)."""
    if isinstance(err, KeyboardInterrupt):
        return getattr(err, "exit_code", EXIT_INTERRUPTED)
    return describe(err)[0]


def describe(err: BaseException) -> tuple[int, str]:
    """(exit code, one line) for a failed command: 3 refused, 4 nothing to do, 5 busy,
    2 bad input, 1 anything else."""
    from storage.lease import LeaseHeld

    inner = unwrap(err)
    if isinstance(inner, LeaseHeld):
        return EXIT_BUSY, f"busy: {one_line(inner)}"
    if isinstance(inner, Refused):
        return EXIT_REFUSED, f"refused: {one_line(inner)}"
    if isinstance(inner, NothingToDo):
        return EXIT_NOTHING, f"nothing to do: {one_line(inner)}"
    bad = bad_input(inner)
    if bad is not None:
        return EXIT_BAD_INPUT, f"error: {one_line(unwrap(bad))}"
    text = one_line(inner)
    name = type(inner).__name__
    if _is_ray_error(inner):
        name = "Ray"  # ActorDiedError and friends: the class name says little to a user
    return EXIT_FAILED, f"failed: {text}" if text.startswith(f"{name}:") else f"failed: {name}: {text}"


def _is_ray_error(err: BaseException) -> bool:
    exc = sys.modules.get("ray.exceptions")
    return exc is not None and isinstance(err, exc.RayError)


class _RayDataFailureFilter(logging.Filter):
    """Drops Ray Data's console records about a failed dataset (the CLI reports the error)."""

    PREFIXES = ("Exception occurred in ", "An exception was raised from a task of operator", "Full stack trace")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith(self.PREFIXES) or msg.endswith("execution failed"))


def quiet_ray_failure_logs() -> None:
    """Keep Ray Data from printing a failed dataset's error and traceback on stderr.

    The CLI prints the error once, as one line (``--traceback`` for the whole story);
    Ray Data's log file in the session directory still gets every record. Idempotent.
    """
    for handler in logging.getLogger("ray.data").handlers:
        if "File" in type(handler).__name__:
            continue
        if not any(isinstance(f, _RayDataFailureFilter) for f in handler.filters):
            handler.addFilter(_RayDataFailureFilter())


def mute_worker_logs() -> None:
    """Stop printing Ray workers' forwarded log lines: once a job has failed, lines still in
    flight (retry warnings of the other workers) would come after the one-line error. The
    switch Ray's own debugger uses (``ray.util.rpdb``); a no-op without Ray."""
    worker = sys.modules.get("ray._private.worker")
    if worker is not None and hasattr(worker, "_worker_logs_enabled"):
        worker._worker_logs_enabled = False
