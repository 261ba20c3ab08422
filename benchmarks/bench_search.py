"""Search end to end (issue 17): single-query latency and batch throughput, before and after.

Two worker processes hold the same indexes with the same query encoder: "before" imports
Tessera from an older checkout (``--before-src``, e.g. a ``git worktree`` of the commit
before the thread budget), "after" from this one. The driver asks them in turn, one
at a time (never both running), so both see the same machine::

    git worktree add --detach /tmp/s17/before 7cb275f
    flock /tmp/bench.lock .venv/bin/python -m benchmarks.bench_search --root /tmp/s17-root \\
        --index xqb-flat xqb-ivfpq xqb-hnsw xqb-plaid --queries /tmp/bench-data/queries.jsonl \\
        --before-src /tmp/s17/before --rounds 5 --n 20 --batch 200 --out benchmarks/results/search_xquad

Per round, index and variant: ``single``: ``search([q])`` for n queries (encoding
included), ``retrieve``: the index search of the same n pre-encoded queries (encoding
excluded), ``encode``: the query encoder alone, ``batch``: one ``search(queries)``
over ``--batch`` queries (queries/s). Medians over all rounds; p95 over all calls.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


# ---- worker ----------------------------------------------------------------------------
def _phases(s):
    """``s``, with ``encode_queries``/``retrieve`` on a checkout older than those public phases.

    Before the thread budget (7cb275f) the phases were the backend's own ``encode`` and
    ``search``; the "before" worker needs them to time encoding and retrieval apart.
    """
    if not hasattr(s, "encode_queries"):
        backend, encoder = vars(s)["_backend"], vars(s)["_encoder"]
        s.encode_queries = lambda texts: backend.encode(encoder, texts)
        s.retrieve = lambda q, k: backend.search(q, k, None, None)
    return s


def _worker(src: str, root: str, indexes: list[str], texts: list[str]) -> None:
    sys.path.insert(0, src)
    from indexing.searcher import Searcher

    searchers = {name: _phases(Searcher.open(root, name)) for name in indexes}
    encoded = {}
    for name, s in searchers.items():  # warm up; pre-encoded queries for the retrieval-only timing
        s.search(texts[:2], 10)
        encoded[name] = [s.encode_queries([t]) for t in texts]
    print(json.dumps({"ready": True, "threads": getattr(getattr(s, "budget", None), "threads", None)}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        s, name, lo, hi = searchers[cmd["index"]], cmd["index"], cmd["lo"], cmd["hi"]
        out = []
        if cmd["mode"] == "single":
            for t in texts[lo:hi]:
                start = time.perf_counter()
                s.search([t], 10)
                out.append(time.perf_counter() - start)
        elif cmd["mode"] == "retrieve":
            budget = getattr(s, "budget", None)
            for q in encoded[name][lo:hi]:
                start = time.perf_counter()
                if budget is None:
                    s.retrieve(q, 10)
                else:
                    with budget.retrieval(1):
                        s.retrieve(q, 10)
                out.append(time.perf_counter() - start)
        elif cmd["mode"] == "encode":
            budget = getattr(s, "budget", None)
            for t in texts[lo:hi]:
                start = time.perf_counter()
                if budget is None:
                    s.encode_queries([t])
                else:
                    with budget.encoding():
                        s.encode_queries([t])
                out.append(time.perf_counter() - start)
        else:  # batch
            start = time.perf_counter()
            s.search(texts[lo:hi], 10)
            out.append(time.perf_counter() - start)
        print(json.dumps({"seconds": out}), flush=True)


class _Worker:
    def __init__(self, label: str, src: str, args: argparse.Namespace) -> None:
        self.label = label
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", src, "--root", args.root,
               "--queries", args.queries, "--index", *args.index, "--n-texts", str(args.n_texts)]
        env = {**os.environ, "PYTHONPATH": src}
        self.proc = subprocess.Popen(cmd, cwd=src, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.label} ended (exit {self.proc.wait()})")
        return json.loads(line)

    def ask(self, **cmd) -> list[float]:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ---- driver ----------------------------------------------------------------------------
def _texts(path: str, n: int) -> list[str]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    step = max(1, len(rows) // n)  # spread over the file's languages
    return [r["text"] for r in rows[::step][:n]]


def _summary(rows: dict) -> list[dict]:
    out = []
    for (index, variant), r in rows.items():
        ms = {m: np.array(r[m]) * 1e3 for m in ("single", "retrieve", "encode")}
        out.append({"index": index, "variant": variant,
                    "single_median_ms": float(np.median(ms["single"])),
                    "single_p95_ms": float(np.percentile(ms["single"], 95)),
                    "retrieve_median_ms": float(np.median(ms["retrieve"])),
                    "retrieve_p95_ms": float(np.percentile(ms["retrieve"], 95)),
                    "encode_median_ms": float(np.median(ms["encode"])),
                    "single_qps": float(1e3 / np.median(ms["single"])),
                    "batch_qps": float(statistics.median(r["batch_qps"])),
                    "calls": int(len(ms["single"]))})
    return out


def _table(summary: list[dict]) -> str:
    head = (f"{'index':12} {'variant':7} {'single med':>10} {'p95':>7} {'retr med':>9} {'p95':>7} "
            f"{'enc med':>8} {'1-q q/s':>8} {'batch q/s':>9}")
    lines = [head, "-" * len(head)]
    for r in summary:
        lines.append(f"{r['index']:12} {r['variant']:7} {r['single_median_ms']:10.1f} {r['single_p95_ms']:7.1f} "
                     f"{r['retrieve_median_ms']:9.1f} {r['retrieve_p95_ms']:7.1f} {r['encode_median_ms']:8.1f} "
                     f"{r['single_qps']:8.1f} {r['batch_qps']:9.1f}")
    return "\n".join(lines)


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True)
    p.add_argument("--index", nargs="+", required=True)
    p.add_argument("--queries", required=True, help="JSONL with a text field")
    p.add_argument("--before-src", default=None, help="checkout of the old code (omit: after only)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n", type=int, default=20, help="single queries per round, index and variant")
    p.add_argument("--batch", type=int, default=200, help="queries in one batched search")
    p.add_argument("--n-texts", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "search_xquad"))
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.root, args.index, _texts(args.queries, args.n_texts))
        return 0
    args.n_texts = max(args.batch, args.n * args.rounds)
    variants = [("before", args.before_src)] if args.before_src else []
    variants.append(("after", str(REPO)))
    started = time.perf_counter()
    workers = [_Worker(label, src, args) for label, src in variants]
    rows: dict = {}
    for rnd in range(args.rounds):
        lo, hi = rnd * args.n, (rnd + 1) * args.n
        for index in args.index:
            for mode in ("single", "retrieve", "encode", "batch"):
                order = workers if rnd % 2 == 0 else workers[::-1]  # who goes first alternates
                for w in order:
                    r = rows.setdefault((index, w.label), {"single": [], "retrieve": [], "encode": [],
                                                           "batch_qps": []})
                    if mode == "batch":
                        (sec,) = w.ask(index=index, mode=mode, lo=0, hi=args.batch)
                        r["batch_qps"].append(args.batch / sec)
                    else:
                        r[mode] += w.ask(index=index, mode=mode, lo=lo, hi=hi)
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for w in workers:
        w.close()
    summary = _summary(rows)
    table = _table(summary)
    machine = f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, load average {os.getloadavg()}"
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.bench_search " + " ".join(argv if argv is not None else sys.argv[1:])
    out.with_suffix(".json").write_text(json.dumps({
        "command": command, "machine": machine, "threads": {w.label: w.info.get("threads") for w in workers},
        "rounds": args.rounds, "n": args.n, "batch": args.batch, "seconds": time.perf_counter() - started,
        "summary": summary}, indent=2) + "\n")
    out.with_suffix(".txt").write_text(f"{command}\n{machine}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
