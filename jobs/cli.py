"""The ``tessera`` command line. It only parses arguments into job configs and prints results.

Logs and progress go to stderr; ``--json`` prints exactly one JSON document on stdout.
Exit codes (``jobs.errors``): 0 success, 1 failure, 2 bad input (a clear message, nothing published),
3 refused (a re-tuned query encoder by its gate; a re-index with another model without --full),
4 nothing to do (a re-index of an unchanged snapshot, an embed of an unchanged corpus), 5 busy (another run
holds the set's lease).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from jobs.commands import catalog, embed, evaluate, index, model, reindex, retune, search
from jobs.commands.common import traceback_arg
from jobs.errors import exit_code

logger = logging.getLogger("tessera")

#: The subcommands, in the order ``tessera --help`` lists them.
SUBCOMMANDS = (embed.EMBED, catalog.SETS, catalog.SQL, index.INDEX, search.SEARCH, evaluate.EVAL, retune.RETUNE,
               reindex.REINDEX, reindex.ROLLBACK, reindex.GC, retune.ENCODERS, model.MODEL)
#: Command name -> its run: parsed arguments in, exit code out.
COMMANDS = {c.name: c.run for c in SUBCOMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--traceback", action="store_true", help="show the Python traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.add_arguments(sub.add_parser(command.name, help=command.help, description=command.description))
    for p in sub.choices.values():  # `tessera embed ... --traceback` works too
        traceback_arg(p)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "fsspec", "filelock", "httpx", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers reads these when (and where: Ray workers too) it is imported; importing it
    # here to say so took seconds, before a bad argument could even be reported.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # The first failed Ray task is the error reported (one line); Ray would print the others'
    # tracebacks as "Unhandled error" when their results are dropped.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # workers' forwarded lines without ANSI codes


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    from jobs.runtime import handle_interrupts

    handle_interrupts()  # SIGTERM unwinds like Ctrl+C: leases released, Ray shut down, exit 143
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt as err:  # jobs.runtime.Terminated too
        logger.error("%s", str(err) or "interrupted")
        return exit_code(err)
    except Exception as err:  # the CLI is the one place that turns errors into exit codes
        if args.traceback:
            logger.exception("failed")
        from jobs.errors import describe, mute_worker_logs

        code, line = describe(err)  # Ray's wrappers unwrapped, one line, no ANSI codes
        mute_worker_logs()  # the error is the last line, not the other workers' retries
        print(f"tessera: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
