"""``tessera reindex`` (a set re-indexed from a new corpus snapshot, ``jobs.reindex``),
``tessera rollback`` (a set pointed back at an earlier version) and ``tessera gc``
(old versions dropped, unreferenced files deleted, ``storage.gc``)."""
from __future__ import annotations

import argparse
import sys

from embedding.model import PRECISIONS
from jobs.commands.common import Command, config_from, given, json_arg, print_json, root_arg, short
from jobs.errors import (
    EXIT_BAD_INPUT,
    EXIT_BUSY,
    EXIT_FAILED,
    EXIT_NOTHING,
    EXIT_OK,
    EXIT_REFUSED,
    RUN_WORDS,
    exit_code,
)
from jobs.runtime import DEVICES


def add_arguments(ri: argparse.ArgumentParser) -> None:
    ri.add_argument("--set", dest="set_name", required=True)
    ri.add_argument("--corpus", nargs="+", required=True, help="the new snapshot: files, globs or directories")
    ri.add_argument("--model", help="model folder or fetched name (default: the one the set was embedded with)")
    ri.add_argument("--full", action="store_true", default=None,
                    help="re-embed everything (new codec) and rebuild every index")
    ri.add_argument("--keep", type=int, help="then keep only the N newest set versions (gc)")
    ri.add_argument("--max-added-share", type=float,
                    help="rebuild indexes when documents added since they were trained exceed this share")
    ri.add_argument("--max-residual-ratio", type=float,
                    help="re-fit the codec when the mean |residual| of tokens added since its fit exceeds this "
                         "multiple of the codec's ...")
    ri.add_argument("--min-refit-share", type=float,
                    help="... and their documents are at least this share of those it was fitted on")
    ri.add_argument("--lease-ttl", type=float, help="seconds a lease outlives a dead run")
    ri.add_argument("--local-rows", type=int,
                    help="encode a delta of at most this many documents in this process instead of starting a "
                         "Ray actor pool (0: always Ray)")
    ri.add_argument("--actors", type=int)
    ri.add_argument("--threads", type=int)
    ri.add_argument("--device", choices=DEVICES)
    ri.add_argument("--precision", choices=PRECISIONS, help="the encoder's type (as tessera embed --precision)")
    ri.add_argument("--no-publish", dest="publish", action="store_false", default=None)
    root_arg(ri)
    json_arg(ri)


def to_config(args: argparse.Namespace):
    from jobs.model_fetch import resolve_model
    from jobs.reindex import ReindexConfig

    # The run checks the snapshot before the model's hash and Ray (jobs.preflight), after its
    # run report is started: the runs view records a refused nightly run too.
    model = resolve_model(args.model) if args.model else None
    return config_from(ReindexConfig, args, corpus=tuple(args.corpus), model=str(model) if model else None)


def run(args: argparse.Namespace) -> int:
    from jobs.reindex import run as reindex

    cfg = to_config(args)
    try:
        report = reindex(cfg)
    except Exception as err:  # noqa: BLE001 - the report is written; map the outcome to its exit code
        return stopped(err)
    print_result(cfg.set_name, report, args.json)
    return EXIT_OK


def stopped(err: Exception) -> int:
    """The exit code of a run that stopped without failing (bad input, refused, nothing to
    do, busy), its one line printed; a failure is raised again."""
    code = exit_code(err)
    if code == EXIT_FAILED:
        raise err
    print(f"tessera: {'error' if code == EXIT_BAD_INPUT else RUN_WORDS[code]}: {short(err)}", file=sys.stderr)
    return code


def print_result(set_name: str, report: dict, as_json: bool) -> None:
    if as_json:
        print_json(report)
        return
    c, d = report["counts"], report["decision"]
    print(f"{set_name} {report['version']} ({d['mode']}, from {report['parent']}): {c['new']} new, "
          f"{c['changed']} changed, {c['deleted']} deleted, {c['unchanged']} unchanged; "
          f"{report['bytes'].get('written', 0) / 1e6:.1f} MB written, {report['bytes'].get('reused', 0) / 1e6:.1f} MB "
          f"reused; run {report['run_id']}")
    for name, r in sorted(report.get("indexes", {}).items()):
        print(f"  index {name} {r['version']}: {r['how']}"
              + (f" (-{r.get('removed', 0)} +{r.get('added', 0)})" if r["how"] == "updated" else ""))


# ---- tessera rollback -----------------------------------------------------------------------
def add_rollback_arguments(rb: argparse.ArgumentParser) -> None:
    rb.add_argument("--set", dest="set_name", required=True)
    rb.add_argument("--to", required=True, help="a committed version, e.g. v000003")
    root_arg(rb)
    json_arg(rb)


def rollback(args: argparse.Namespace) -> int:
    from jobs.reindex import rollback as roll_back

    try:
        report = roll_back(args.root, args.set_name, args.to)
    except Exception as err:  # noqa: BLE001
        return stopped(err)
    if args.json:
        print_json(report)
    else:
        pins = ", ".join(f"{k} {v}" for k, v in sorted(report["indexes"].items())) or "no indexes"
        print(f"{args.set_name}: current is now {report['version']} (was {report['parent']}); {pins}")
    return EXIT_OK


# ---- tessera gc -----------------------------------------------------------------------------
def add_gc_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("--set", dest="set_name", default=None, help="default: every set")
    g.add_argument("--keep", type=int, help="keep the N newest versions of each set (default: all)")
    g.add_argument("--stale-hours", type=float, help="delete uncommitted versions whose claim is older than this")
    g.add_argument("--dry-run", action="store_true", default=None)
    root_arg(g)
    json_arg(g)


def gc(args: argparse.Namespace) -> int:
    from storage.gc import collect
    from storage.layout import resolve_root

    result = collect(resolve_root(args.root), args.set_name, **given(args, "keep", "stale_hours", "dry_run"))
    if args.json:
        print_json(result)
        return EXIT_OK
    verb = "would delete" if args.dry_run else "deleted"
    for kind in ("sets", "indexes"):
        for name, r in sorted(result[kind].items()):
            dropped = ", ".join(r["dropped_versions"]) or "no versions"
            print(f"{kind[:-1] if kind == 'sets' else 'index'} {name}: dropped {dropped}; "
                  f"{verb} {r['deleted_files']} files ({r['freed_bytes'] / 1e6:.1f} MB)")
    return EXIT_OK


REINDEX = Command(
    "reindex", "re-index a set from a new corpus snapshot: embed only what changed, update its indexes", add_arguments,
    run,
    description="Diff a corpus snapshot against the set's current version by content hash, embed only new and "
                "changed documents with the set's own model and codec, reuse unchanged shards by reference, "
                "tombstone the rest, update every index built on the set, and publish the set and its indexes "
                "in one atomic step. Run the same command again to resume a failed run. Exit codes: "
                f"{EXIT_OK} published, {EXIT_FAILED} failed, {EXIT_BAD_INPUT} bad input, {EXIT_REFUSED} "
                f"{RUN_WORDS[EXIT_REFUSED]} (another model without --full), {EXIT_NOTHING} "
                f"{RUN_WORDS[EXIT_NOTHING]}, {EXIT_BUSY} {RUN_WORDS[EXIT_BUSY]} (another run holds the set's lease).")
ROLLBACK = Command("rollback", "point a set (and the indexes released with it) back at an earlier version",
                   add_rollback_arguments, rollback)
GC = Command("gc", "drop old versions and delete files no kept version references", add_gc_arguments, gc)
