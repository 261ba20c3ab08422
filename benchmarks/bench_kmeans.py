"""Codec k-means benchmark: flat (PLAID's) against two-level k-means, side by side.

The embed job's codec fit is k-means over the sample's token vectors; ``flat`` compares
every vector with every centroid each iteration, ``two-level`` (``--kmeans two-level``)
clusters into ~sqrt(k) coarse cells and then each cell into its share of the k centroids.
This script measures what that buys and costs, in one process, without Ray or a store:

1. the corpus paragraphs and the queries are encoded once (ColBERT token vectors, as the
   embed job makes them; queries as the searcher makes them);
2. for each ``--nbits``, flat and two-level codecs are fitted alternately ``--repeats``
   times on all the tokens (``default_n_centroids`` centroids, ``--kmeans-iters``), timing
   the fit (median);
3. quality: the mean |residual| on the held-out tokens, the mean cosine of decompressed to
   original tokens, and exact MaxSim top-10 over the decompressed tokens against exact
   MaxSim over the original float tokens (overlap) and against the qrels (nDCG@10).

Usage::

    python benchmarks/prepare_data.py --xquad ../shared/data/xquad --out bench-data
    python benchmarks/bench_kmeans.py --corpus bench-data/corpus_1200.jsonl --queries bench-data/queries.jsonl \
        --qrels bench-data/qrels_same.tsv --model ~/.cache/tessera/models/me5-small [--nbits 2 4]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepare_data import read_qrels  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True, help="JSONL with id and text")
    p.add_argument("--queries", required=True, help="JSONL with id and text")
    p.add_argument("--qrels", required=True, help="TREC qrels")
    p.add_argument("--model", required=True)
    p.add_argument("--n-queries", type=int, default=300, help="queries with a relevant document in the corpus")
    p.add_argument("--nbits", type=int, nargs="+", default=[2, 4])
    p.add_argument("--kmeans-iters", type=int, default=4)
    p.add_argument("--kinds", nargs="+", default=None, help="k-means kinds (default: every KMEANS_KINDS)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="fit seeds (content-key salts: another k-means start and held-out split); "
                        "two or more show how much a kind's quality moves with the start alone")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "kmeans_xquad.json"))
    return p.parse_args(argv)


def maxsim(queries: np.ndarray, tokens: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(n_queries, n_docs) exact MaxSim scores; ``offsets``: each document's first token."""
    out = np.empty((len(queries), len(offsets)), np.float32)
    for qi, q in enumerate(queries):
        out[qi] = np.maximum.reduceat(tokens @ q.T, offsets, axis=0).sum(axis=1)
    return out


def top10(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :10]


def ndcg10(top: np.ndarray, qids: list[str], doc_ids: list[str], qrels: dict[str, set]) -> float:
    values = []
    for qi, qid in enumerate(qids):
        rel = qrels[qid]
        dcg = sum(1 / np.log2(r + 2) for r, d in enumerate(top[qi]) if doc_ids[d] in rel)
        values.append(dcg / sum(1 / np.log2(r + 2) for r in range(min(10, len(rel)))))
    return float(np.mean(values))


def main(argv=None) -> int:
    args = parse_args(argv)
    import faiss
    import torch

    from embedding.codec import KMEANS_KINDS, ResidualCodec, default_n_centroids
    from embedding.encoder import Encoder
    from embedding.model import load_model

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    docs = [json.loads(line) for line in Path(args.corpus).read_text(encoding="utf-8").splitlines() if line.strip()]
    doc_ids = [d["id"] for d in docs]
    qrels: dict[str, set] = {}
    known = set(doc_ids)
    for qid, did in read_qrels(Path(args.qrels)):
        if did in known:
            qrels.setdefault(qid, set()).add(did)
    queries = [q for q in (json.loads(line) for line in Path(args.queries).read_text(encoding="utf-8").splitlines()
                           if line.strip()) if q["id"] in qrels]
    queries = queries[:: max(1, len(queries) // args.n_queries)][: args.n_queries]
    enc = Encoder(load_model(args.model, device="cpu"))
    start = time.perf_counter()
    tokens = enc.encode_documents([d["text"] for d in docs], dense=False, colbert=True).tokens
    encode_s = time.perf_counter() - start
    allv = np.concatenate(tokens).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in tokens])[:-1]])
    qvecs = enc.encode_queries_colbert([q["text"] for q in queries])
    qids = [q["id"] for q in queries]
    unit = allv / np.linalg.norm(allv, axis=1, keepdims=True)
    ref = top10(maxsim(qvecs, unit, offsets))
    k = min(default_n_centroids(len(allv)), len(allv))
    rows = []
    for nbits in args.nbits:
        runs = [(kind, seed) for seed in args.seeds for kind in (args.kinds or KMEANS_KINDS)]
        fits: dict[tuple, list[float]] = {run: [] for run in runs}
        codecs = {}
        for _ in range(args.repeats):
            for kind, seed in runs:  # interleaved
                t = time.perf_counter()
                codecs[kind, seed] = ResidualCodec.fit(allv, nbits, k, seed=seed, niter=args.kmeans_iters,
                                                       kmeans=kind)
                fits[kind, seed].append(time.perf_counter() - t)
        for (kind, seed), codec in codecs.items():
            dec = codec.decompress(*codec.compress(allv))
            top = top10(maxsim(qvecs, dec, offsets))
            rows.append({"nbits": nbits, "kmeans": kind, "seed": seed, "centroids": codec.n_centroids,
                         "fit_seconds": statistics.median(fits[kind, seed]), "fit_seconds_all": fits[kind, seed],
                         "avg_residual": codec.avg_residual,
                         "mean_cosine": float(np.mean(np.sum(dec * unit, axis=1))),
                         "overlap_vs_raw_maxsim": float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, ref)])),
                         "ndcg10": ndcg10(top, qids, doc_ids, qrels)})
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads},
              "documents": len(docs), "tokens": int(len(allv)), "queries": len(queries), "centroids": k,
              "kmeans_iters": args.kmeans_iters, "encode_seconds": encode_s,
              "raw_ndcg10": ndcg10(ref, qids, doc_ids, qrels), "rows": rows}
    lines = [f"codec k-means: {len(docs)} documents, {len(allv)} tokens, {k} centroids, {args.kmeans_iters} "
             f"iterations, {len(queries)} queries, {args.threads} threads; raw-vector MaxSim nDCG@10 "
             f"{result['raw_ndcg10']:.4f}",
             "nbits  kmeans    seed  fit s  avg|res|  cosine  top10 vs raw MaxSim  nDCG@10"]
    for r in rows:
        lines.append(f"{r['nbits']:>5}  {r['kmeans']:<10}{r['seed']:>4} {r['fit_seconds']:6.2f}  "
                     f"{r['avg_residual']:.4f}  {r['mean_cosine']:.4f}  {r['overlap_vs_raw_maxsim']:19.3f}  "
                     f"{r['ndcg10']:.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
