"""``tessera search``: query texts (or a file of queries) against an index (``indexing.searcher``)."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from embedding.model import PRECISIONS
from jobs.commands.common import Command, given, json_arg, print_json, root_arg, root_str
from jobs.errors import EXIT_OK


def add_arguments(se: argparse.ArgumentParser) -> None:
    se.add_argument("--index", required=True)
    se.add_argument("query", nargs="*", help="one or more query texts (or --queries FILE)")
    se.add_argument("--queries", default=None, metavar="FILE",
                    help="many queries in one process: JSONL/Parquet with id, text, optional lang, or plain text "
                         "(one query a line, id = line number); results as JSONL lines "
                         "{query_id, rank, doc_id, score}")
    se.add_argument("--out", default=None, metavar="FILE", help="with --queries: write the JSONL here, not stdout")
    se.add_argument("--batch-size", type=int, help="queries encoded and searched together")
    se.add_argument("--precision", choices=PRECISIONS,
                    help="the query encoder's type: auto (the default) is bfloat16 where the CPU multiplies it "
                         "natively, float32 elsewhere and always for a re-tuned encoder")
    se.add_argument("--same-language", action="store_true",
                    help="with --queries: each query searches the documents of its own language (its lang)")
    se.add_argument("--k", "-k", type=int)
    se.add_argument("--lang", default=None, help="only documents in this language")
    se.add_argument("--where", default=None,
                    help='one boolean expression over the documents view\'s columns, e.g. "year > 2005"')
    se.add_argument("--query-lang", default=None, metavar="LANG",
                    help="X-MOD models: the queries' language, whose adapter encodes them (default: a --queries "
                         "file's lang, else --lang-detector, else the set's fallback adapter)")
    se.add_argument("--lang-detector", default=None, metavar="none|script|MODULE:FUNCTION",
                    help="X-MOD models: how the language of a query given without one is found (default none: "
                         "the set's fallback adapter)")
    se.add_argument("--version", default=None, help="index version (default: current)")
    se.add_argument("--query-encoder", default=None,
                    help="a query-encoder folder or registered version (must match the set)")
    se.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="search parameter: nprobe, ef_search, rescore (dense); ncells, centroid_score_threshold, "
                         "ndocs, exact_tokens, exact_margin, exact_gap_quantile, merge_tokens, products (plaid; "
                         "exact_margin=inf: no early termination; exact_gap_quantile<1 ends it sooner; "
                         "merge_tokens=inf: no query tokens merged; products=auto|float32|int8: the engine's "
                         "products, auto = int8 on a CPU with AMX)")
    se.add_argument("--threads", type=int, default=None,
                    help="CPU threads shared by query encoding and retrieval (default: the CPUs available)")
    root_arg(se)
    json_arg(se)


def run(args: argparse.Namespace) -> int:
    import time

    from jobs import preflight
    from storage.layout import resolve_root

    params = parse_params(args.param) or None  # bad input fails before the imports (torch) and the model
    queries = search_queries(args)
    preflight.artifact(resolve_root(args.root), "indexes", args.index, args.version)
    from indexing.searcher import Searcher
    from storage.catalog import check_filter

    if args.where is not None:
        check_filter(args.where)  # its syntax before the model loads; its columns when it runs
    # k, the batch size and the precision: Searcher's own defaults unless given
    searcher = Searcher.open(root_str(args), args.index, version=args.version, query_encoder=args.query_encoder,
                             threads=args.threads, detector=args.lang_detector,
                             **given(args, "batch_size", "precision"))
    start = time.perf_counter()
    results = run_searches(searcher, queries, args, params)
    if not args.quiet:  # load and per-query times apart: what a warm index costs per query
        print(timings(searcher, len(queries), time.perf_counter() - start), file=sys.stderr)
    if args.queries is not None:
        write_hits(queries, results, args.out)
        return EXIT_OK
    print_result(args.query, results, args.json)
    return EXIT_OK


#: ``--param`` keys whose values are words, not numbers (checked where the index reads them)
WORD_PARAMS = ("products",)


def parse_params(pairs: list[str]) -> dict:
    """``--param KEY=VALUE`` options as numbers by key (words for :data:`WORD_PARAMS`)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(f"--param expects KEY=VALUE, got {pair!r}")
        if key in WORD_PARAMS:
            out[key] = value
            continue
        try:
            # inf and -inf too: exact_margin=inf ends no exact stage early,
            # centroid_score_threshold=-inf prunes no centroid
            out[key] = float(value) if "." in value or value.lower().lstrip("+-") == "inf" else int(value)
        except ValueError:
            raise ValueError(f"--param {key}: expected a number, got {value!r}") from None
    return out


def search_queries(args: argparse.Namespace) -> list:
    """The queries of ``tessera search`` (storage.queries.Query), checked before torch loads."""
    from embedding.languages import make_detector
    from indexing.threads import check_threads
    from storage.queries import Query, load_search_queries

    check_threads(args.threads)
    make_detector(args.lang_detector)  # a bad detector fails before the index and the model load
    if args.query_lang is not None and not args.query_lang.strip():
        raise ValueError("--query-lang is empty")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.queries is None:
        for flag in ("out", "same_language"):
            if getattr(args, flag):
                raise ValueError(f"--{flag.replace('_', '-')} goes with --queries FILE")
        if not args.query:
            raise ValueError("give query texts or --queries FILE")
        return [Query(str(i), text) for i, text in enumerate(args.query, 1)]
    if args.query:
        raise ValueError("give query texts or --queries FILE, not both")
    if args.same_language and args.lang is not None:
        raise ValueError("--same-language and --lang exclude each other")
    if args.out is not None and not Path(args.out).expanduser().resolve().parent.is_dir():
        raise ValueError(f"--out {args.out}: no such folder {Path(args.out).expanduser().resolve().parent}")
    return load_search_queries(args.queries)


def run_searches(searcher, queries: list, args: argparse.Namespace, params: dict | None) -> list:
    """Hits of every query, in order; with --same-language one search per language."""
    groups: dict = {}
    for i, q in enumerate(queries):
        groups.setdefault(q.lang if args.same_language else args.lang, []).append(i)
    results: list = [None] * len(queries)
    for lang, rows in groups.items():
        langs = [args.query_lang or queries[i].lang for i in rows]  # the adapters of X-MOD models
        hits = searcher.search([queries[i].text for i in rows], lang=lang, where=args.where, params=params,
                               langs=langs, **given(args, "k"))
        for i, h in zip(rows, hits):
            results[i] = h
    return results


def write_hits(queries: list, results: list, out: str | None) -> None:
    """One JSON line per hit: query_id, rank (1-based), doc_id, score."""
    with open(Path(out).expanduser(), "w", encoding="utf-8") if out else contextlib.nullcontext(sys.stdout) as stream:
        for q, hits in zip(queries, results):
            for rank, (doc, score) in enumerate(hits, 1):
                stream.write(json.dumps({"query_id": q.id, "rank": rank, "doc_id": doc, "score": score},
                                        ensure_ascii=False) + "\n")


def print_result(texts: list[str], results: list, as_json: bool) -> None:
    if as_json:
        print_json([{"query": q, "results": [{"id": d, "score": s} for d, s in hits]}
                    for q, hits in zip(texts, results)])
        return
    for q, hits in zip(texts, results):
        print(f"query: {q}")
        for rank, (doc, score) in enumerate(hits, 1):
            print(f"{rank:>4}  {score:8.4f}  {doc}")


def timings(searcher, n: int, seconds: float) -> str:
    """The stderr line after a search: load times, then per-query encoding and retrieval."""
    load, spent = searcher.load_seconds, searcher.search_seconds
    per = 1e3 / max(1, n)
    return (f"search: index loaded in {load['index']:.2f} s, query encoder in {load['model']:.2f} s; "
            f"{n} quer{'y' if n == 1 else 'ies'} in {seconds:.3f} s ({seconds * per:.1f} ms/query: encoding "
            f"{spent['encode'] * per:.1f}, retrieval {spent['retrieve'] * per:.1f}; {n / max(seconds, 1e-9):.1f} "
            f"queries/s; {searcher.budget.threads} threads, batches of {searcher.batch_size})")


SEARCH = Command("search", "search an index with the set's query encoder", add_arguments, run)
