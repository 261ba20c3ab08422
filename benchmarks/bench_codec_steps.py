"""The embed job's codec steps outside the model, one source tree against another.

Two steps of ``tessera embed --mode both`` that do not run the model, each timed in a fresh
process per tree (fresh memory, as the job's fit task and pass-2 workers see it: on a VM
that hands freed pages back to its host, first-touch memory costs more than the arithmetic),
alternating which tree goes first, medians printed with their ratio:

* ``fit``: the fit task's work: read the shards' codec-sample caches (float16), fit the
  codec (``ResidualCodec.fit``, ``--kmeans`` kind, 8,192 centroids for ~500k tokens), under
  the tree's ``jobs.runtime.small_pages`` where it has one, as its fit task runs;
* ``pass2``: pass 2's work for fully cached shards: read each cache (``read_cache``) and
  compress its documents' tokens (``compress_with_residual_sum``).

Each tree runs its own code for both (the tree's ``jobs.sample_cache`` and
``embedding.codec``): a tree without ``read_sample_tokens`` is driven as the fit task and
pass 2 drove the codec before it (caches concatenated and converted to float32 first; a
shard's tokens concatenated before compression). The fitted codecs' sha256 and the
compressed bytes' sha256 are compared across trees.

Usage (a baseline checkout as the other tree: ``git worktree add /tmp/base <rev>``)::

    python benchmarks/bench_codec_steps.py --encode CORPUS.jsonl --model DIR --cache /tmp/steps
    python benchmarks/bench_codec_steps.py --cache /tmp/steps --trees /tmp/base . \\
        --kmeans flat-bf16 --rounds 2 --out benchmarks/results/codec_steps_X.json

``--encode`` encodes the corpus's texts once (ColBERT tokens, as the job's pass 1) into
``--cache`` as 4 shard caches; later runs reuse them. Each shard is written in both formats
the job's caches have had, Parquet (``part-N.parquet``, before the thirtieth session) and
Arrow IPC (``part-N.arrow``, ``jobs.sample_cache.write_cache``), and each tree reads the
files of the format its own ``sample_cache`` names.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True, help="folder of the shard caches (written by --encode)")
    p.add_argument("--encode", help="JSONL corpus (field 'text') to encode into --cache first")
    p.add_argument("--model", help="model folder for --encode")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--trees", nargs=2, metavar=("BASE", "NEW"), help="source trees to compare")
    p.add_argument("--steps", nargs="+", choices=("fit", "pass2"), default=["fit", "pass2"])
    p.add_argument("--kmeans", default="flat-bf16")
    p.add_argument("--nbits", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dim", type=int, default=384, help="the token vectors' dimension (me5-small's: 384)")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds a child waits after its imports (freed pages go back to a VM's host)")
    p.add_argument("--out", help="JSON results (a .txt of the printed table beside it)")
    p.add_argument("--child", nargs=2, metavar=("STEP", "TREE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def encode(args: argparse.Namespace) -> None:
    """The corpus's ColBERT tokens as ``--shards`` codec-sample caches, as pass 1 writes them."""
    sys.path.insert(0, str(REPO))
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from embedding.encoder import Encoder
    from embedding.model import load_model
    from jobs.sample_cache import cache_table, write_cache
    from storage.fs import Location

    torch.set_num_threads(args.threads)
    with open(args.encode, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    enc = Encoder(load_model(args.model, device="cpu"))
    started = time.perf_counter()
    out = enc.encode_documents(texts, dense=False, colbert=True)
    print(f"encoded {len(texts)} texts in {time.perf_counter() - started:.1f} s", flush=True)
    for shard, rows in enumerate(np.array_split(np.arange(len(texts)), args.shards)):
        part = type(out)(None, [out.tokens[i] for i in rows], out.n_tokens[rows], out.truncated[rows])
        table = cache_table(list(range(len(rows))), part)
        write_cache(Location(str(Path(args.cache) / f"part-{shard:05d}.arrow")), table)
        # the format of the caches before (schemas.write_scratch_table, removed with it)
        pq.write_table(table, str(Path(args.cache) / f"part-{shard:05d}.parquet"), compression="none",
                       use_dictionary=False, row_group_size=max(1, min(table.num_rows, 8192)))


def child(step: str, tree: str, args: argparse.Namespace) -> dict:
    """One step with ``tree``'s code, in this (fresh) process."""
    sys.path.insert(0, tree)
    import resource

    import numpy as np
    import torch

    import jobs.sample_cache as sc
    from embedding.codec import ResidualCodec, default_n_centroids
    from storage.fs import Location

    torch.set_num_threads(args.threads)
    suffix = Path(sc.sample_cache(Location(args.cache), 0).url).suffix  # the tree's own cache format
    locs = [Location(str(p)) for p in sorted(Path(args.cache).glob(f"part-*{suffix}"))]
    time.sleep(args.settle)  # pages freed by the imports go back to the host, as between the job's stages
    started = time.perf_counter()
    if step == "fit":
        dim = args.dim
        try:  # the fit task's memory setting, where the tree has one (jobs.runtime.small_pages)
            from jobs.runtime import small_pages
        except ImportError:
            small_pages = contextlib.nullcontext
        with small_pages():
            if hasattr(sc, "read_sample_tokens"):
                sample = sc.read_sample_tokens(locs, dim)
            else:  # the fit task before: a float16 array per shard, concatenated, then float32
                sample = np.concatenate([sc.read_cache_tokens(loc, dim) for loc in locs]).astype(np.float32)
            codec = ResidualCodec.fit(sample, args.nbits, default_n_centroids(len(sample)), seed=0, niter=4,
                                      kmeans=args.kmeans)
        digest = hashlib.sha256(codec.to_bytes()).hexdigest()
        Path(args.cache, "codec.npz").write_bytes(codec.to_bytes())
    else:
        codec = ResidualCodec.from_bytes(Path(args.cache, "codec.npz").read_bytes())
        h = hashlib.sha256()
        for loc in locs:
            cached = sc.read_cache(loc, codec.dim)
            tokens = [cached[o][1] for o in sorted(cached)]
            if hasattr(sc, "read_sample_tokens"):  # a shard's documents as they are
                codes, packed, _ = codec.compress_with_residual_sum(tokens)
            else:  # pass 2 before: the shard's tokens concatenated first
                codes, packed, _ = codec.compress_with_residual_sum(np.concatenate(tokens))
            h.update(codes.tobytes())
            h.update(packed.tobytes())
            del cached, tokens, codes, packed
        digest = h.hexdigest()
    return {"seconds": time.perf_counter() - started, "sha256": digest,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(step: str, tree: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", step, tree, "--cache", args.cache, "--kmeans", args.kmeans,
           "--nbits", str(args.nbits), "--threads", str(args.threads), "--dim", str(args.dim),
           "--settle", str(args.settle)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], os.path.abspath(args.child[1]), args)), flush=True)
        # The result is out: leave without the interpreter's teardown. A process that imported
        # torch and read Parquet through a Python file object (the cache read) sometimes dies
        # there with "terminate called without an active exception" (SIGABRT; 7 of 40 runs alone
        # here, about half under load; apache/arrow#34314), which failed this step after its work.
        # storage.schemas.read_table no longer pre-buffers such files (0 of 30); this stays as a
        # second guard for a step that must only report.
        sys.stderr.flush()
        os._exit(0)
    if args.encode:
        Path(args.cache).mkdir(parents=True, exist_ok=True)
        encode(args)
    if not args.trees:
        return 0
    trees = [os.path.abspath(t) for t in args.trees]
    runs: dict = {step: {t: [] for t in trees} for step in args.steps}
    for r in range(args.rounds):
        order = trees if r % 2 == 0 else trees[::-1]
        for step in args.steps:
            if step == "pass2" and not Path(args.cache, "codec.npz").exists():
                run_child("fit", trees[0], args)  # every tree compresses with the same codec
            for tree in order:
                res = run_child(step, tree, args)
                runs[step][tree].append(res)
                print(f"round {r} {step} {tree}: {res['seconds']:.2f} s, peak RSS {res['peak_rss_mb']:.0f} MB",
                      flush=True)
    lines = [f"codec steps, {args.kmeans}, nbits {args.nbits}, {args.threads} threads, {args.rounds} rounds "
             f"(fresh process per step and tree, alternating order); median seconds, peak RSS MB",
             f"{'step':<7}{'base s':>9}{'new s':>9}{'ratio':>8}{'base MB':>9}{'new MB':>9}  same output"]
    summary = {}
    for step in args.steps:
        base, new = (runs[step][t] for t in trees)
        b, n = (statistics.median(x["seconds"] for x in side) for side in (base, new))
        bm, nm = (max(x["peak_rss_mb"] for x in side) for side in (base, new))
        same = {x["sha256"] for x in base} == {x["sha256"] for x in new}
        summary[step] = {"base_seconds": b, "new_seconds": n, "ratio": n / b, "base_peak_rss_mb": bm,
                         "new_peak_rss_mb": nm, "same_output": same}
        lines.append(f"{step:<7}{b:>9.2f}{n:>9.2f}{n / b:>8.2f}{bm:>9.0f}{nm:>9.0f}  {same}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps({"trees": trees, "kmeans": args.kmeans, "nbits": args.nbits,
                                              "rounds": runs, "summary": summary}, indent=1))
        Path(args.out).with_suffix(".txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
