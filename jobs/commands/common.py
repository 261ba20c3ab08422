"""What every ``tessera`` subcommand shares: its record, the common options, configs built
from the options given, defaults quoted in ``--help``, and printing.

Defaults have one home, the job's config dataclass. An option that sets a config field
has that field's name as its ``dest`` and argparse default None, meaning "not given":
:func:`config_from` passes only the options given, so a left-out option keeps the
field's own default. The job modules import numpy, pyarrow and faiss, which parsing,
``--help`` and a bad-input error must not wait for (and faiss may be missing: ``tessera
sets`` works without it), so a config class is imported when a command builds its
config, and a default quoted in a help text is read when that help is printed
(:func:`show_in_help`).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

from embedding.model import MODES, POOLINGS  # noqa: F401 - the command modules import them from here
from indexing.kinds import INDEX_KINDS  # noqa: F401
from jobs.runtime import DEVICES

# Choices come from their one home (embedding.model, indexing.kinds, jobs.runtime); those
# modules import neither faiss nor torch nor numpy, so parsing stays fast.
EVAL_DEVICES = tuple(d for d in DEVICES if d != "auto")  # jobs.evaluate runs in the CLI's process


@dataclass(frozen=True)
class Command:
    """One subcommand: its name and ``--help`` texts, how it adds its options to its parser,
    and how it runs (parsed arguments in, exit code out; see ``jobs.errors``)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


# ---- options ------------------------------------------------------------------------------
def root_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=None,
                   help="store root URL (local path or s3://bucket/prefix); default $TESSERA_ROOT or ./tessera-data")


def json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def traceback_arg(p: argparse.ArgumentParser) -> None:
    """``--traceback`` after the command too (``tessera embed ... --traceback``); left out, the
    top-level option's value stands."""
    p.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                   help="show the Python traceback on errors")


def config_from(cls: type, args: argparse.Namespace, **values):
    """``cls(...)`` from the options given: every field of the config dataclass ``cls``
    whose option was given (not None), then ``values`` (options converted by the command:
    tuples, resolved paths) over them, a None among them left out too."""
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    fields.update({k: v for k, v in values.items() if v is not None})
    return cls(**fields)


def given(args: argparse.Namespace, *names: str) -> dict:
    """The options among ``names`` that were given, for a function whose own defaults apply
    to the rest (``Searcher.open``, ``storage.gc.collect``)."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


class _Shown:
    """A value that ``--help`` shows, read when the help is formatted. A module that can't be
    imported (faiss missing) shows where the value lives instead: the help still prints."""

    def __init__(self, read: Callable[[], str], where: str):
        self.read, self.where = read, where

    def __str__(self) -> str:
        try:
            return self.read()
        except ImportError:
            return self.where


def field_default(module: str, cls: str, field: str) -> _Shown:
    """The default of ``module.cls``'s field ``field`` (a config dataclass), as ``--help`` shows it."""
    def read() -> str:
        fields = dataclasses.fields(getattr(importlib.import_module(module), cls))
        return plain(next(f.default for f in fields if f.name == field))

    return _Shown(read, f"{module}.{cls}.{field}")


def constant(module: str, name: str, show: Callable[[object], str] | None = None) -> _Shown:
    """``module.name`` as ``--help`` shows it (``show``, default :func:`plain`)."""
    return _Shown(lambda: (show or plain)(getattr(importlib.import_module(module), name)), f"{module}.{name}")


def show_in_help(action: argparse.Action, **values: _Shown) -> argparse.Action:
    """Let ``%(NAME)s`` in ``action``'s help show ``values[NAME]`` (argparse fills a help
    text's ``%(...)s`` from the action's attributes when it formats the help)."""
    for name, value in values.items():
        setattr(action, name, value)
    return action


def plain(value) -> str:
    """``value`` as a person writes it: 5e-8, not 5e-08."""
    return re.sub(r"e([+-])0+(?=\d)", r"e\1", repr(value)) if isinstance(value, float) else str(value)


def or_list(values) -> str:
    """``(1, 2, 4)`` as ``1, 2 or 4``."""
    words = [plain(v) for v in values]
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else "".join(words)


# ---- output -------------------------------------------------------------------------------
def root_str(args: argparse.Namespace) -> str:
    from storage.layout import resolve_root

    return resolve_root(args.root).url


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


def print_rows(cols: list[str], rows: list[tuple], as_json: bool) -> None:
    if as_json:
        print_json([dict(zip(cols, r)) for r in rows])
        return
    text = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in text]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in text:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


def _cell(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def short(err: BaseException) -> str:
    """``err``'s message as one line, out of Ray's wrappers (see jobs.errors)."""
    from jobs.errors import one_line, unwrap

    return one_line(unwrap(err))
