"""The PLAID engine alone: ``CentroidIndex.search`` of pre-encoded queries, code trees side by side.

Each round runs every tree of ``--trees`` (checkouts: a ``git worktree`` of an older commit, and
``.``) in a fresh process whose ``sys.path`` starts with that tree, one process at a time (never
two at once), in the order given. A process opens the plaid index ``--index`` memory-mapped
(``indexing.index_files.open_centroid_index``: no query encoder; torch only with int8 products),
searches ``--warmup`` queries untimed (numba's kernels loaded), then times ``--n`` single-query
searches at k=10 and the engine's defaults, at ``--threads`` (1: BLAS pinned to one thread;
above: ``threads=N`` as ``Searcher.retrieve`` passes it: with float32 products each query's
stages split over N threads, with int8 products its torch products on N threads). Reported per
tree: each round's median and
mean ms a query, the median of the rounds' medians, and whether every tree returned the same
positions for every query (a speed change must not be a results change).

``--interleave`` keeps one process per side for the whole run and sends them the queries in
turn, one query at a time (A B, then B A for the next query, ...): each side's query then
finds the caches as the other side's query left them, as a search between other work does
(the way ``bench_vs_colbert.py`` interleaves colbert-ai), where the default runs each side's
pass back to back in a warm process.

``--products float32 int8`` runs each tree once per value (``TESSERA_PLAID_PRODUCTS`` in its
process: what the engine's default ``products`` means), in turn; results may then differ
between the values (int8 scores candidates differently), so the table gives each side's
top-10 overlap with the first side instead, and "the same results" is asked only of sides
with the same products.

The queries are a ``.npy`` of ``(n, Lq, dim)`` float32 query matrices, e.g. the ``queries.npy``
that ``bench_vs_colbert.py`` leaves in its ``--work`` folder::

    git worktree add /tmp/base 157c3b2
    flock /tmp/bench.lock .venv/bin/python benchmarks/bench_engine.py --root /tmp/vs-root \\
        --index xqs2-plaid --queries /tmp/vs-work-xqs2/queries.npy --trees /tmp/base . \\
        --threads 1 --rounds 3 --out benchmarks/results/engine_xqs2_t1_s33
    flock /tmp/bench.lock .venv/bin/python benchmarks/bench_engine.py --root /tmp/vs-root \
        --index xqs2-plaid --queries /tmp/vs-work-xqs2/queries.npy --products float32 int8 \
        --threads 1 --rounds 3 --out benchmarks/results/engine_xqs2_t1_products_s34
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
K = 10


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="Tessera store root")
    p.add_argument("--index", required=True, help="plaid index name")
    p.add_argument("--queries", required=True, help=".npy of (n, Lq, dim) float32 query matrices")
    p.add_argument("--trees", nargs="+", default=["."], help="code trees (checkouts), timed in this order")
    p.add_argument("--products", nargs="+", default=[None], choices=["auto", "float32", "int8"],
                   help="run each tree with each of these engine products (TESSERA_PLAID_PRODUCTS)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n", type=int, default=250, help="timed queries a pass (the first n of --queries)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", help="output stem: writes .json and .txt")
    p.add_argument("--interleave", action="store_true",
                   help="one process per side for the whole run, the sides' searches alternating query by query")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("threads", "rounds", "n"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


@contextlib.contextmanager
def _warm_searcher(args: argparse.Namespace) -> Iterator[tuple]:
    """This process's side (its ``sys.path`` starts with one tree): the index opened, the warm-up
    queries searched, BLAS at one thread for the duration. Yields ``(search, n, source)``:
    ``search(i)`` times the ``i``-th of the ``n`` timed queries (``--n`` or fewer, as the file
    holds) and returns ``(seconds, top-K positions)``; ``source`` is where Tessera was imported from."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    import indexing
    from indexing.index_files import open_centroid_index

    cindex, _ = open_centroid_index(args.root, args.index)
    Q = np.load(args.queries)[: args.warmup + args.n]
    threads = args.threads if args.threads > 1 else None

    def search(i: int) -> tuple[float, list]:
        q = Q[args.warmup + i]
        start = time.perf_counter()
        _, top = cindex.search(q[None], K, threads=threads)
        return time.perf_counter() - start, top[0].tolist()

    with threadpool_limits(1, user_api="blas"):
        for q in Q[: args.warmup]:
            cindex.search(q[None], K, threads=threads)
        yield search, len(Q) - min(args.warmup, len(Q)), str(Path(indexing.__file__).resolve().parents[1])


def worker(args: argparse.Namespace) -> dict:
    """Time the searches in this process, one pass over the timed queries."""
    with _warm_searcher(args) as (search, n, source):
        timed = [search(i) for i in range(n)]
    seconds = [took for took, _ in timed]
    return {"source": source, "queries": len(seconds), "median_ms": statistics.median(seconds) * 1e3,
            "mean_ms": statistics.fmean(seconds) * 1e3, "ids": [top for _, top in timed]}


def serve(args: argparse.Namespace) -> None:
    """:func:`worker` one query at a time: after the warm-up a JSON line says where Tessera was
    imported from and how many timed queries there are; then each line of stdin is a query's
    number among them, the reply a JSON line ``[seconds, top-K positions]``."""
    with _warm_searcher(args) as (search, n, source):
        print(json.dumps({"source": source, "queries": n}), flush=True)
        for line in sys.stdin:
            print(json.dumps(list(search(int(line)))), flush=True)


def _tree_command(tree: Path, args: argparse.Namespace, products: "str | None", mode: str) -> tuple[list, dict]:
    path = os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    if products is not None:
        env["TESSERA_PLAID_PRODUCTS"] = products
    cmd = [sys.executable, str(Path(__file__).resolve()), mode, "--root", args.root, "--index", args.index,
           "--queries", args.queries, "--threads", str(args.threads), "--n", str(args.n),
           "--warmup", str(args.warmup)]
    return cmd, env


def run_interleaved(sides: list[tuple[str, "str | None"]], args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every side's rounds from one serving process a side, the sides' searches alternating."""
    procs = []
    n = args.n
    try:
        for tree, prod in sides:
            cmd, env = _tree_command(Path(tree), args, prod, "--serve")
            proc = subprocess.Popen(cmd, cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            first = proc.stdout.readline()
            if not first:
                raise RuntimeError(f"{tree}: the search process failed (exit {proc.wait()})")
            ready = json.loads(first)
            if Path(ready["source"]) != Path(tree):
                raise RuntimeError(f"{tree}: the process imported Tessera from {ready['source']}, not from the tree")
            n = min(n, ready["queries"])
        passes: dict[str, list[dict]] = {_label(*side): [] for side in sides}
        for r in range(args.rounds):
            seconds: list[list[float]] = [[] for _ in sides]
            ids: list[list] = [[] for _ in sides]
            for i in range(n):
                order = range(len(sides)) if (i + r) % 2 == 0 else reversed(range(len(sides)))
                for s in order:
                    procs[s].stdin.write(f"{i}\n")
                    procs[s].stdin.flush()
                    reply = procs[s].stdout.readline()
                    if not reply:
                        raise RuntimeError(f"{sides[s][0]}: the search process failed (exit {procs[s].wait()})")
                    took, top = json.loads(reply)
                    seconds[s].append(took)
                    ids[s].append(top)
            for s, side in enumerate(sides):
                passes[_label(*side)].append({"median_ms": statistics.median(seconds[s]) * 1e3,
                                              "mean_ms": statistics.fmean(seconds[s]) * 1e3, "ids": ids[s]})
        return passes
    finally:
        for proc in procs:
            if proc.stdin:
                proc.stdin.close()
            proc.wait()


def run_tree(tree: Path, args: argparse.Namespace, products: "str | None" = None) -> dict:
    cmd, env = _tree_command(tree, args, products, "--worker")
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{tree}: the search process failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(out["source"]) != tree:
        raise RuntimeError(f"{tree}: the process imported Tessera from {out['source']}, not from the tree")
    return out


def _overlap(a: list, b: list) -> float:
    return statistics.fmean(len(set(x) & set(y)) / K for x, y in zip(a, b))


def summarise(sides: list[tuple[str, "str | None"]], passes: dict) -> dict:
    """``sides``: (tree, products); ``passes`` each side's rounds, by its label."""
    labels = [_label(*side) for side in sides]
    first = passes[labels[0]][0]["ids"]
    first_tree = sides[0][0]  # each side is held to the first tree's side of its own products
    same = all(p["ids"] == passes[_label(first_tree, prod)][0]["ids"]
               for (_, prod), label in zip(sides, labels) for p in passes[label])
    return {"same_results": same,
            "trees": {label: {"median_ms": statistics.median(p["median_ms"] for p in passes[label]),
                              "round_medians_ms": [p["median_ms"] for p in passes[label]],
                              "round_means_ms": [p["mean_ms"] for p in passes[label]],
                              "overlap_with_first": _overlap(passes[label][0]["ids"], first)} for label in labels}}


def _label(tree: str, products: "str | None") -> str:
    return tree if products is None else f"{tree} [{products}]"


def table(result: dict) -> list[str]:
    lines = [f"CentroidIndex.search alone: index {result['index']}, {result['queries']} queries a pass, "
             f"{result['rounds']} round(s), {result['threads']} thread(s); "
             + ("one process a side, the sides' searches alternating query by query" if result.get("interleaved")
                else "trees in turn, a fresh process each"),
             f"{'tree':<48} {'median ms':>10}  {'overlap':>7}  rounds (median / mean ms)"]
    for tree, r in result["summary"]["trees"].items():
        rounds = ", ".join(f"{m:.2f} / {a:.2f}" for m, a in zip(r["round_medians_ms"], r["round_means_ms"]))
        lines.append(f"{tree:<48} {r['median_ms']:>10.2f}  {r['overlap_with_first']:>7.4f}  {rounds}")
    lines.append(f"(overlap: top-{K} positions in common with the first side's first round)")
    lines.append(f"same top-{K} positions in every tree and round (sides of equal products): "
                 f"{result['summary']['same_results']}")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.serve:
        serve(args)
        return 0
    sides = [(str(Path(t).resolve()), prod) for t in args.trees for prod in args.products]
    if args.interleave:
        passes = run_interleaved(sides, args)
    else:
        passes = {_label(*side): [] for side in sides}
        for _ in range(args.rounds):
            for tree, prod in sides:
                passes[_label(tree, prod)].append(run_tree(Path(tree), args, prod))
    timed = len(next(iter(passes.values()))[0]["ids"])  # --n, or fewer where the file holds fewer
    result = {"index": args.index, "queries": timed, "rounds": args.rounds, "threads": args.threads,
              "interleaved": args.interleave, "machine": {"cpus": os.cpu_count()},
              "summary": summarise(sides, passes)}
    lines = table(result)
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    return 0 if result["summary"]["same_results"] else 1


if __name__ == "__main__":
    sys.exit(main())
