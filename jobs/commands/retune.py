"""``tessera retune`` (a query encoder tuned against a set's stored vectors, ``jobs.retune``)
and ``tessera encoders`` (the query-encoder versions)."""
from __future__ import annotations

import argparse
import sys

from jobs.commands.common import (
    Command,
    config_from,
    field_default,
    json_arg,
    print_json,
    print_rows,
    root_arg,
    show_in_help,
)
from jobs.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_REFUSED
from jobs.runtime import DEVICES


def add_arguments(rt: argparse.ArgumentParser) -> None:
    rt.add_argument("--set", dest="set_name", required=True)
    rt.add_argument("--index", required=True, help="an index of the set: hard negatives are mined on it")
    rt.add_argument("--train", required=True,
                    help="training pairs (Parquet/JSONL: text|query, doc_id|positives[, id, lang]), "
                         "or queries with --train-qrels")
    rt.add_argument("--train-qrels", help="qrels for --train given as queries (id, text)")
    rt.add_argument("--dev-queries", help="the gate's queries (id, text, lang)")
    rt.add_argument("--dev-qrels", help="the gate's judgements")
    rt.add_argument("--name", help="encoder name (default SET-query)")
    rt.add_argument("--base", help="start from this folder or registered NAME[@vN] (default: the set's model)")
    rt.add_argument("--index-version")
    rt.add_argument("--dim", type=int, help="training/evaluation dimension (default: the index's)")
    show_in_help(rt.add_argument("--lr", type=float,
                                 help="peak learning rate (default %(config_default)s, adiabatic)"),
                 config_default=field_default("jobs.retune", "RetuneConfig", "lr"))
    rt.add_argument("--sweep-lr", metavar="LR,LR,...", help="one run per learning rate")
    rt.add_argument("--freeze", action="append", metavar="GLOB",
                    help="freeze parameters matching this glob (repeatable), e.g. '*output.dense.weight'")
    rt.add_argument("--sweep-freeze", metavar="SET,SET,...",
                    help="one run per freeze setting: 'none' or globs joined by '+', e.g. none,*output.dense.weight")
    rt.add_argument("--epochs", type=int)
    rt.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    rt.add_argument("--batch-size", type=int)
    rt.add_argument("--warmup-ratio", type=float)
    rt.add_argument("--weight-decay", type=float)
    rt.add_argument("--clip", type=float, help="gradient-norm clipping (0: off)")
    rt.add_argument("--seed", type=int)
    rt.add_argument("--temperature", type=float)
    rt.add_argument("--no-in-batch", dest="in_batch", action="store_false", default=None,
                    help="no in-batch negatives")
    rt.add_argument("--negatives", type=int, help="hard negatives per query")
    rt.add_argument("--mine-k", type=int, help="mine hard negatives from this many results")
    rt.add_argument("--skip-top", type=int, help="skip this many top ranks (likely unjudged positives)")
    rt.add_argument("--negatives-lang", help="mine only documents in this language")
    rt.add_argument("--negatives-where",
                    help="mine only documents matching this boolean expression over the documents view's columns")
    rt.add_argument("--max-regression", type=float, help="nDCG@10 points any language may lose")
    rt.add_argument("--tolerance", type=float, help="nDCG@10 points the overall score may lose")
    rt.add_argument("--force", action="store_true", default=None,
                    help="publish even if the gate refuses (recorded)")
    rt.add_argument("--no-publish", dest="publish", action="store_false", default=None)
    rt.add_argument("--device", choices=DEVICES)
    rt.add_argument("--threads", type=int)
    root_arg(rt)
    json_arg(rt)


def to_config(args: argparse.Namespace):
    from jobs.retune import RetuneConfig

    def split(text: str) -> list[str]:
        return [v.strip() for v in text.split(",") if v.strip()]

    sweep_lr = tuple(float(v) for v in split(args.sweep_lr)) if args.sweep_lr else None
    sweep_freeze = tuple(() if v.lower() == "none" else tuple(p for p in v.split("+") if p)
                         for v in split(args.sweep_freeze)) if args.sweep_freeze else None
    return config_from(RetuneConfig, args, freeze=tuple(args.freeze) if args.freeze else None,
                       sweep_lr=sweep_lr, sweep_freeze=sweep_freeze)


def run(args: argparse.Namespace) -> int:
    from jobs import preflight
    from storage.layout import resolve_root

    preflight.retune(resolve_root(args.root), args.set_name, args.index,
                     {"training file": args.train, "training qrels": args.train_qrels,
                      "dev queries": args.dev_queries, "dev qrels": args.dev_qrels}, args.index_version)
    from jobs.retune import GateRefused
    from jobs.retune import run as retune

    cfg = to_config(args)
    try:
        manifest = retune(cfg)
    except GateRefused as refused:
        if args.json:
            print_json(refused.report)
        else:
            print(str(refused).split("\n", 2)[-1])
        print(f"tessera: refused: {str(refused).splitlines()[0]}", file=sys.stderr)
        return EXIT_REFUSED
    print_result(manifest, cfg.publish, args.json)
    return EXIT_OK


def print_result(manifest: dict, published: bool, as_json: bool) -> None:
    if as_json:
        print_json(manifest)
        return
    from jobs.retune_gate import languages_table, runs_table

    print(runs_table(manifest["runs"]))
    ev = manifest["evaluation"]
    if ev:
        print(f"\nrun {manifest['chosen_run']} per language (nDCG@10, exact search at dim {ev['dim']}):")
        print(languages_table(ev["before"], ev["after"]))
    state = "published" if published else "committed (not published)"
    forced = " (FORCED past the gate)" if manifest["forced"] else ""
    print(f"\n{state} {manifest['name']} {manifest['version']}{forced}:"
          f" fingerprint {manifest['fingerprint'][:16]}, registered for set {manifest['compatible_with']['set']} "
          f"{manifest['compatible_with']['version']}; {manifest['immutability']['files']} stored files unchanged")
    print(f"use it: tessera search --index {manifest['index']['name']} --query-encoder "
          f"{manifest['name']}@{manifest['version']} ...")


# ---- tessera encoders -----------------------------------------------------------------------
def add_encoders_arguments(en: argparse.ArgumentParser) -> None:
    root_arg(en)
    json_arg(en)


def encoders(args: argparse.Namespace) -> int:
    from jobs import preflight
    from storage.layout import resolve_root
    from storage.manifest import committed_manifests

    preflight.store(resolve_root(args.root))

    cols = ["name", "version", "is_current", "set", "set_version", "index", "lr", "freeze", "forced",
            "ndcg_before", "ndcg_after", "fingerprint", "base_fingerprint", "committed_at"]
    rows = []
    for m in committed_manifests(resolve_root(args.root), "encoders"):
        compat, ev, tr = m.get("compatible_with") or {}, m.get("evaluation") or {}, m.get("training") or {}
        rows.append((m["name"], m["version"], m["is_current"], compat.get("set"), compat.get("version"),
                     (m.get("index") or {}).get("name"), tr.get("lr"), "+".join(tr.get("freeze") or []) or None,
                     m.get("forced"), (ev.get("before") or {}).get("overall", {}).get("nDCG@10"),
                     (ev.get("after") or {}).get("overall", {}).get("nDCG@10"), str(m.get("fingerprint"))[:16],
                     str(m.get("base_fingerprint"))[:16], m.get("committed_at")))
    print_rows(cols, rows, args.json)
    return EXIT_OK


RETUNE = Command(
    "retune", "tune the query encoder against a set's stored vectors (documents untouched)", add_arguments, run,
    description="Tune only the query encoder of a set (adiabatic learning rates), gate it on dev queries per "
                f"language, and publish it as a query-encoder version. Exit codes: {EXIT_OK} published, "
                f"{EXIT_FAILED} failed, {EXIT_BAD_INPUT} bad input, {EXIT_REFUSED} refused by the gate "
                "(table printed).")
ENCODERS = Command("encoders", "list query-encoder versions and the sets they are registered for",
                   add_encoders_arguments, encoders)
