"""Codec re-fit benchmark: how much of a PLAID ranking survives re-fitting the codec, per nbits.

A nightly re-index keeps the set's codec and compresses new documents with it; a full
rebuild re-fits the codec on the new snapshot. Both hold the same documents, so their
top-10 differ only by the codec. This script measures that difference in one process,
without Ray or a store, over the same XQuAD snapshots as ``bench_reindex.py``:

1. the paragraphs of snapshot A and B (B = A with ``--change`` of it changed) and the
   XQuAD questions are encoded once (ColBERT token vectors, as the embed job makes them);
2. for each ``--nbits`` and ``--codec-seeds``: codec A is fit on A's tokens and codec B
   on B's (all tokens, ``default_n_centroids`` centroids, ``--kmeans-iters``: what the
   embed job does at this corpus size); B's documents compressed with codec A stand
   for the index updated in place, with codec B for the full rebuild;
3. the top-10 of both is compared (exact MaxSim over the compressed vectors, and the
   PLAID search at its defaults), with MRR@10 against the gold paragraphs, the bytes per
   token and the PLAID search latency (one query at a time) on the rebuilt index.

Usage::

    python benchmarks/prepare_data.py --xquad ../shared/data/xquad --out bench-data
    python benchmarks/bench_codec_refit.py --data bench-data --model ~/.cache/tessera/models/me5-small \
        [--nbits 2 4] [--codec-seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_reindex import mrr10, overlap, pick_queries, read_jsonl, snapshots, write_results  # noqa: E402
from embedding.codec import ResidualCodec  # noqa: E402
from indexing.plaid import CentroidIndex, SearchParams  # noqa: E402

logger = logging.getLogger("bench_codec_refit")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="output folder of prepare_data.py")
    p.add_argument("--model", required=True)
    p.add_argument("--docs-per-lang", type=int, default=100)
    p.add_argument("--change", type=float, default=0.01, help="share of documents changed")
    p.add_argument("--queries-per-lang", type=int, default=25)
    p.add_argument("--seed", type=int, default=0, help="seed of the snapshot change (as bench_reindex.py)")
    p.add_argument("--nbits", type=int, nargs="+", default=[2, 4])
    p.add_argument("--codec-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--kmeans-iters", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default="benchmarks/results/codec_refit_xquad")
    return p.parse_args(argv)


def encode(model: str, texts: list[str], queries: list[str], threads: int) -> tuple[list[np.ndarray], np.ndarray]:
    """ColBERT token vectors of each text (float16, as stored before compression) and query matrices."""
    import torch

    from embedding.encoder import Encoder
    from embedding.model import load_model

    torch.set_num_threads(threads)
    enc = Encoder(load_model(model, device="cpu"))
    t0 = time.perf_counter()
    docs = enc.encode_documents(texts, dense=True, colbert=True)  # the embed job's shared pass
    q = enc.encode_queries_colbert(queries)
    logger.info("encoded %d texts and %d queries in %.1f s", len(texts), len(queries), time.perf_counter() - t0)
    return [t.astype(np.float16) for t in docs.tokens], q


def fit(tokens: list[np.ndarray], nbits: int, seed: int, niter: int) -> ResidualCodec:
    """The codec the embed job fits at this size: every token, ``default_n_centroids`` centroids."""
    return ResidualCodec.fit(np.concatenate(tokens).astype(np.float32), nbits, seed=seed, niter=niter)


def build(codec: ResidualCodec, tokens: list[np.ndarray]) -> CentroidIndex:
    parts = [codec.compress(t.astype(np.float32)) for t in tokens]
    return CentroidIndex.build(codec, [c for c, _ in parts], [r for _, r in parts])


def top10(index: CentroidIndex, q: np.ndarray, ids: list[str], exact: bool) -> list[list[str]]:
    _, pos = index.exact_maxsim(q, 10) if exact else index.search(q, 10, SearchParams())
    return [[ids[p] for p in row if p >= 0] for row in pos]


def latency(index: CentroidIndex, q: np.ndarray) -> dict:
    index.search(q[:4], 10, SearchParams())  # warm-up
    times = []
    for i in range(len(q)):
        t0 = time.perf_counter()
        index.search(q[i:i + 1], 10, SearchParams())
        times.append(time.perf_counter() - t0)
    return {"median_ms": float(np.median(times) * 1e3), "p95_ms": float(np.percentile(times, 95) * 1e3)}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    data = Path(args.data)
    a, b, plan = snapshots(read_jsonl(data / "corpus.jsonl"), args.docs_per_lang, args.change, args.seed)
    queries, gold_rows = pick_queries(data, args.queries_per_lang)

    key = lambda d: (d["id"], d["text"])  # noqa: E731
    texts = sorted({key(d) for d in a + b})
    vectors, q = encode(args.model, [t for _, t in texts], queries, args.threads)
    tok = dict(zip(texts, vectors))
    tokens_a, tokens_b, ids_b = [tok[key(d)] for d in a], [tok[key(d)] for d in b], [d["id"] for d in b]

    rows = []
    for nbits in args.nbits:
        for seed in args.codec_seeds:
            t0 = time.perf_counter()
            codec_a, codec_b = (fit(t, nbits, seed, args.kmeans_iters) for t in (tokens_a, tokens_b))
            updated, rebuilt = build(codec_a, tokens_b), build(codec_b, tokens_b)
            row = {"nbits": nbits, "codec_seed": seed, "n_centroids": codec_b.n_centroids,
                   "bytes_per_token": codec_b.bytes_per_token()}
            for name, exact in (("exact", True), ("plaid", False)):
                inc, full = top10(updated, q, ids_b, exact), top10(rebuilt, q, ids_b, exact)
                row[f"{name}_overlap"] = overlap(inc, full)
                row[f"{name}_mrr10_updated"] = mrr10(inc, gold_rows)
                row[f"{name}_mrr10_rebuilt"] = mrr10(full, gold_rows)
            row["plaid_latency"] = latency(rebuilt, q)
            row["seconds"] = time.perf_counter() - t0
            logger.info("%s", row)
            rows.append(row)

    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpu": False},
              "model": args.model, "snapshot": plan, "queries": len(queries), "kmeans_iters": args.kmeans_iters,
              "rows": rows}
    lines = [f"codec re-fit on {plan['documents']} XQuAD paragraphs, {args.change:.0%} changed; {len(queries)} "
             f"questions; {os.cpu_count()} CPUs, no GPU; top-10 of B compressed with A's codec (updated in place) "
             "vs with B's own codec (full rebuild)",
             f"{'nbits':>5} {'seed':>4} {'B/token':>7} {'exact overlap':>13} {'PLAID overlap':>13} "
             f"{'MRR@10 updated':>14} {'rebuilt':>8} {'PLAID ms median':>15} {'p95':>6}"]
    for r in rows:
        lines.append(f"{r['nbits']:>5} {r['codec_seed']:>4} {r['bytes_per_token']:>7} {r['exact_overlap']:>13.4f} "
                     f"{r['plaid_overlap']:>13.4f} {r['plaid_mrr10_updated']:>14.4f} {r['plaid_mrr10_rebuilt']:>8.4f} "
                     f"{r['plaid_latency']['median_ms']:>15.1f} {r['plaid_latency']['p95_ms']:>6.1f}")
    for nbits in args.nbits:
        sel = [r for r in rows if r["nbits"] == nbits]
        lines.append(f"nbits {nbits}: PLAID overlap mean {np.mean([r['plaid_overlap'] for r in sel]):.4f} "
                     f"(min {min(r['plaid_overlap'] for r in sel):.4f}), exact mean "
                     f"{np.mean([r['exact_overlap'] for r in sel]):.4f}")
    write_results(args.out, result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
