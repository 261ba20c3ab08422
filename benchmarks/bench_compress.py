"""Compression benchmark: the codec's nearest-centroid search in float32 (numpy) against
bfloat16 with float32 rescoring of near ties, side by side on real token vectors.

``ResidualCodec.compress`` spends nearly all its time finding each token's nearest
centroid (tokens x centroids x dim multiply-adds). On a CPU that multiplies bfloat16
natively, and in a process that has torch (an embed actor; a pass-2 task from 8,192
centroids), it runs that search as a bfloat16 product and rescores in float32 every
token whose best centroids are within the product's rounding bound, so the codes are
float32's. This script measures what that buys, in one process, without Ray or a store:

1. ``--docs`` documents of the corpus are encoded (ColBERT token vectors, as the embed job
   makes them) and rounded through float16 (as the job's codec-sample cache holds them);
2. the codec is ``--codec`` (a set's ``codec.npz``, e.g. the one the embed job fitted on
   the whole corpus) or fitted on these tokens;
3. ``--rounds`` times, alternating which goes first: ``compress_with_residual_sum`` with
   the float32 search and with the bfloat16 one (seconds, median), and the bare searches;
   the codes, residual bytes and |residual| sums must be equal.

Usage::

    python benchmarks/prepare_data.py --xquad ../shared/data/xquad --xquad-sentences --out bench-data
    python benchmarks/bench_compress.py --corpus bench-data/xqs_corpus.jsonl \
        --model ~/.cache/tessera/models/me5-small --codec ROOT/sets/SET/v000001/codec.npz
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True, help="JSONL with id and text")
    p.add_argument("--model", required=True)
    p.add_argument("--docs", type=int, default=1600, help="documents encoded (every n-th of the corpus)")
    p.add_argument("--codec", default=None, help="a set's codec.npz (default: fitted on the encoded tokens)")
    p.add_argument("--nbits", type=int, default=2, help="nbits of a fitted codec")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "compress.json"))
    return p.parse_args(argv)


def encode(corpus: str, model: str, n_docs: int) -> np.ndarray:
    from embedding.encoder import Encoder
    from embedding.model import load_model

    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    step = max(1, len(texts) // n_docs)
    texts = texts[::step][:n_docs]
    enc = Encoder(load_model(model)).encode_documents(texts, dense=False, colbert=True)
    return np.concatenate(enc.tokens).astype(np.float16).astype(np.float32)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import embedding.codec as codec_mod
    from embedding.codec import ResidualCodec, native_bf16

    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    t = time.perf_counter()
    tokens = encode(args.corpus, args.model, args.docs)
    encode_s = time.perf_counter() - t
    if args.codec:
        codec = ResidualCodec.from_bytes(Path(args.codec).read_bytes())
    else:
        codec = ResidualCodec.fit(tokens, args.nbits, kmeans="auto")
    unit = tokens / np.linalg.norm(tokens, axis=1, keepdims=True)
    bf16_on = codec_mod.use_bf16_search

    def use(side: str) -> None:  # the codec's choice of search, forced
        codec_mod.use_bf16_search = lambda *a: side == "bfloat16"

    times: dict[str, list[float]] = {"float32": [], "bfloat16": [], "search_float32": [], "search_bfloat16": []}
    results = {}
    with threadpool_limits(limits=args.threads, user_api="blas"):
        for r in range(args.rounds):
            for side in (("float32", "bfloat16") if r % 2 == 0 else ("bfloat16", "float32")):
                use(side)
                t = time.perf_counter()
                results[side] = codec.compress_with_residual_sum(tokens)
                times[side].append(time.perf_counter() - t)
                t = time.perf_counter()
                codec.assign(unit)  # the search alone, as the side runs it
                times["search_" + side].append(time.perf_counter() - t)
    codec_mod.use_bf16_search = bf16_on
    (c32, p32, s32), (c16, p16, s16) = results["float32"], results["bfloat16"]
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "native_bf16": native_bf16(), "torch": torch.__version__},
        "tokens": int(len(tokens)), "documents": args.docs, "centroids": codec.n_centroids, "dim": codec.dim,
        "nbits": codec.nbits, "encode_seconds": encode_s, "rounds": args.rounds, "seconds": times,
        "median_seconds": med,
        "compress_ratio": med["bfloat16"] / med["float32"],
        "search_ratio": med["search_bfloat16"] / med["search_float32"],
        "codes_equal": bool(np.array_equal(c32, c16)), "residuals_equal": bool(np.array_equal(p32, p16)),
        "abs_sum_equal": s32 == s16,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"{len(tokens)} tokens, {codec.n_centroids} centroids, dim {codec.dim}, {args.threads} thread(s), "
          f"native bfloat16: {out['machine']['native_bf16']}")
    print(f"compress: float32 {med['float32']:.2f} s, bfloat16 {med['bfloat16']:.2f} s "
          f"(ratio {out['compress_ratio']:.2f}); search alone {med['search_float32']:.2f} / "
          f"{med['search_bfloat16']:.2f} s (ratio {out['search_ratio']:.2f})")
    print(f"codes equal: {out['codes_equal']}, residual bytes equal: {out['residuals_equal']}, "
          f"|residual| sums equal: {out['abs_sum_equal']}")
    print(f"written to {args.out}")
    return 0 if out["codes_equal"] and out["residuals_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
