"""The embed job with shard I/O overlapping the encoding, against one shard at a time, side by side.

An encoder actor runs ``calls_per_actor`` calls at once: while one holds
the model (the forward passes and the compression, under the actor's compute lock),
the other reads its shard or writes the last one. With ``--calls 1 2`` this runs the
same job both ways, alternating round by round in one Ray session:

* ``1``: each actor reads, encodes and writes one shard after the other (the default on a
  local store);
* ``2``: the default for an s3:// store (``jobs.embed_pool.calls_per_actor``; 1 on a local one).

Both write the same files (a test checks that); what changes is how long the actors
wait on the store. Per variant it reports the job's seconds (median over ``--rounds``),
the actors' seconds per stage summed over the shards (read, tokenise + forward,
compress, write, and time waiting for the other call's compute), and the ratio of the
job's steady seconds (without Ray start, model fingerprint and the pool's start-up)
between the variants.

The share of I/O in a shard, and so what overlapping it saves, grows with the model's
speed: on these CPUs me5-small's forward dwarfs a shard's reads and writes, while on a
GPU (many times faster) it does not. ``--model`` a small fast model (``--tiny`` builds
the test suite's 2-layer BERT) shows the GPU-like case on a CPU. ``--store s3`` runs
against a local moto S3 server (a real S3 endpoint on 127.0.0.1, with none of a remote
store's latency: a lower bound of what a real bucket costs).

Usage (hold the benchmark lock while timing)::

    flock /tmp/bench.lock python benchmarks/bench_embed_io.py --tatoeba ../shared/data/tatoeba \\
        --docs 4000 --model ~/.cache/tessera/models/me5-small --mode both --store s3 --rounds 2
    flock /tmp/bench.lock python benchmarks/bench_embed_io.py --tatoeba ../shared/data/tatoeba \\
        --docs 20000 --tiny --mode both --store s3 --rounds 3

Writes ``benchmarks/results/embed_io_<store>_<model>.{json,txt}`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.prepare_data import build_tatoeba, write_jsonl  # noqa: E402

logger = logging.getLogger("bench_embed_io")

STAGES = ("read", "wait", "tokenize", "forward", "compress", "write")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tatoeba", required=True, help="Tatoeba folder (short multilingual sentences)")
    p.add_argument("--docs", type=int, default=4000)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="model folder")
    model.add_argument("--tiny", action="store_true", help="build the test suite's tiny BERT and use it")
    p.add_argument("--mode", choices=("dense", "colbert", "both"), default="both")
    p.add_argument("--store", choices=("local", "s3"), default="local")
    p.add_argument("--calls", type=int, nargs="+", default=[1, 2], help="calls_per_actor variants")
    p.add_argument("--rows-per-shard", type=int, default=500)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def start_s3() -> tuple[object, str]:
    """A moto S3 server on 127.0.0.1 and a fresh bucket; the environment points s3fs at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
    return server, f"s3://{bucket}"


def stage_sums(timings: dict) -> dict:
    """The actors' seconds per stage, both passes together."""
    out = {}
    for stage in STAGES:
        out[stage] = round(sum(timings.get(f"{p}{stage}", 0.0) for p in ("sample_", "worker_")), 3)
    return out


def run_job(corpus: str, model: str, root: str, mode: str, rows_per_shard: int, calls: int) -> dict:
    from jobs.embed import EmbedConfig, run

    cfg = EmbedConfig(corpus=(corpus,), model=model, set_name=f"io{calls}", root=root, mode=mode,
                      rows_per_shard=rows_per_shard, calls_per_actor=calls)
    start = time.perf_counter()
    manifest = run(cfg)
    seconds = time.perf_counter() - start
    t = manifest["timings"]
    fixed = t.get("model", 0.0) + t.get("actor_start", 0.0)
    return {"calls": calls, "seconds": round(seconds, 3), "steady_seconds": round(seconds - fixed, 3),
            "documents": manifest["counts"]["documents"], "shards": manifest["counts"]["shards"],
            "stages": stage_sums(t), "timings": t}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = Path(tempfile.mkdtemp(prefix="tessera-bench-io-"))
    model = args.model
    if args.tiny:
        sys.path.insert(0, str(REPO / "tests"))
        from fixtures_models import build_tiny_model

        model = str(build_tiny_model(work / "tiny"))
    bench = build_tatoeba(Path(args.tatoeba))
    docs = [{"id": d["id"], "text": d["text"], "lang": d["lang"]}
            for pair in zip(bench.queries, bench.corpus) for d in pair][: args.docs]
    server, root = start_s3() if args.store == "s3" else (None, str(work / "store"))
    corpus = f"{root}/corpus.jsonl" if args.store == "s3" else str(work / "corpus.jsonl")
    if args.store == "s3":
        from storage.fs import location

        local = work / "corpus.jsonl"
        write_jsonl(local, docs)
        location(corpus).write_bytes(local.read_bytes())
    else:
        write_jsonl(Path(corpus), docs)
    from jobs.runtime import init_ray

    start = time.perf_counter()
    init_ray()
    ray_start = time.perf_counter() - start
    runs: dict[int, list] = {c: [] for c in args.calls}
    try:
        for r in range(args.rounds):
            order = args.calls if r % 2 == 0 else args.calls[::-1]
            for calls in order:
                job = run_job(corpus, model, f"{root}/r{r}", args.mode, args.rows_per_shard, calls)
                runs[calls].append(job)
                logger.info("round %d, %d call(s) per actor: %.1f s (steady %.1f s)", r, calls, job["seconds"],
                            job["steady_seconds"])
    finally:
        if server is not None:
            server.stop()
    summary = {}
    for calls, jobs in runs.items():
        summary[calls] = {"seconds": statistics.median(j["seconds"] for j in jobs),
                          "steady_seconds": statistics.median(j["steady_seconds"] for j in jobs),
                          "stages": {s: statistics.median(j["stages"][s] for j in jobs) for s in STAGES}}
    base = min(args.calls)
    for calls in args.calls:
        summary[calls]["steady_ratio_vs_%d" % base] = round(summary[calls]["steady_seconds"]
                                                            / summary[base]["steady_seconds"], 3)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpu": False},
              "model": "tiny (tests/fixtures_models.py)" if args.tiny else args.model, "mode": args.mode,
              "store": args.store, "documents": len(docs), "rows_per_shard": args.rows_per_shard,
              "rounds": args.rounds, "ray_start_seconds": round(ray_start, 2),
              "summary": {str(k): v for k, v in summary.items()},
              "runs": {str(k): v for k, v in runs.items()}}
    name = "tiny" if args.tiny else Path(args.model).name
    out = Path(args.out or REPO / "benchmarks" / "results" / f"embed_io_{args.store}_{name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    table = render(result)
    out.with_suffix(".txt").write_text(table)
    print(table, end="")
    return 0


def render(result: dict) -> str:
    lines = [f"embed job, {result['documents']} Tatoeba documents, mode {result['mode']}, store "
             f"{result['store']}, model {result['model']}, {result['rows_per_shard']} rows a shard, "
             f"median of {result['rounds']} round(s), {result['machine']['cpus']} CPUs",
             "calls/actor   job s  steady s  steady ratio   actors' seconds: "
             + "  ".join(f"{s:>8}" for s in STAGES)]
    for calls, s in result["summary"].items():
        ratio = next(v for k, v in s.items() if k.startswith("steady_ratio"))
        lines.append(f"{calls:>11} {s['seconds']:>7.1f} {s['steady_seconds']:>9.1f} {ratio:>13.3f}"
                     + " " * 18 + "  ".join(f"{s['stages'][st]:>8.2f}" for st in STAGES))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
