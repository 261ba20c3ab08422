"""``tessera eval``: indexes scored on queries and qrels (``jobs.evaluate``)."""
from __future__ import annotations

import argparse

from embedding.model import PRECISIONS
from jobs.commands.common import EVAL_DEVICES, Command, config_from, json_arg, print_json, root_arg
from jobs.errors import EXIT_OK


def add_arguments(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("--index", nargs="+", required=True)
    ev.add_argument("--queries", required=True, help="Parquet/JSONL with id, text, optional lang")
    ev.add_argument("--qrels", required=True, help="TREC qrels or Parquet/JSONL")
    ev.add_argument("--k", "-k", type=int)
    ev.add_argument("--out", help="report folder (default ROOT/reports/eval-<time>)")
    ev.add_argument("--query-encoder")
    ev.add_argument("--batch-size", type=int)
    ev.add_argument("--device", choices=EVAL_DEVICES)
    ev.add_argument("--precision", choices=PRECISIONS,
                    help="the query encoder's type (default auto: as tessera search --precision)")
    ev.add_argument("--lang", help="only documents in this language (e.g. en for X->English)")
    ev.add_argument("--where", help="one boolean expression over the documents view's columns")
    ev.add_argument("--same-language", action="store_true", default=None,
                    help="each query searches the documents of its own language")
    root_arg(ev)
    json_arg(ev)


def to_config(args: argparse.Namespace):
    from jobs.evaluate import EvalConfig

    return config_from(EvalConfig, args, index=tuple(args.index))


def run(args: argparse.Namespace) -> int:
    from jobs import preflight
    from storage.layout import resolve_root

    preflight.evaluation(resolve_root(args.root), args.index, args.queries, args.qrels)  # before torch loads
    from jobs.evaluate import run as evaluate

    print_result(evaluate(to_config(args)), args.json)
    return EXIT_OK


def print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    for label, r in result["results"].items():
        o = r["overall"]
        print(f"{label}: nDCG@10 {o['nDCG@10']:.4f}  R@10 {o['R@10']:.4f}  R@100 {o['R@100']:.4f}  "
              f"MRR@10 {o['MRR@10']:.4f}  ({o['queries']} queries)")
        for lang, v in sorted(r["per_language"].items()):
            print(f"    {lang:<6} nDCG@10 {v['nDCG@10']:.4f}  ({v['queries']} queries)")
    print(f"report: {result['report']['markdown']}")


EVAL = Command("eval", "evaluate indexes on queries + qrels (nDCG@10, R@10, R@100, MRR@10)", add_arguments, run)
