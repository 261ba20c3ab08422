"""Embed-job benchmark: the whole Ray job against the bare model forward, side by side.

Prints a table and writes JSON:

* documents/s and tokens/s of ``jobs.embed.run`` (scan, Ray Data actor pool, encoding,
  compression, Parquet writes, manifest) against ``Encoder.forward_only`` over the same
  texts with the same tokenizer limits, batching and torch threads, in one run;
* bytes per ColBERT token stored at nbits 1/2/4 against raw float16;
* mean cosine of decompressed to original token vectors at each nbits.

Usage::

    python benchmarks/bench_embed.py --xquad ../shared/data/xquad \
        --model ~/.cache/tessera/models/me5-small [--docs-per-lang 240] [--mode dense]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepare_data import build_xquad, write_jsonl  # noqa: E402

logger = logging.getLogger("bench_embed")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--xquad", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--docs-per-lang", type=int, default=240)
    p.add_argument("--mode", choices=("dense", "colbert", "both"), default="dense")
    p.add_argument("--nbits", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--codec-docs", type=int, default=120, help="documents encoded for the codec figures")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--out", default="bench-out/embed.json")
    return p.parse_args(argv)


def corpus_subset(xquad: str, per_lang: int) -> list[dict]:
    docs = build_xquad(xquad).corpus
    seen: dict[str, int] = {}
    out = []
    for d in docs:
        if seen.get(d["lang"], 0) < per_lang:
            seen[d["lang"]] = seen.get(d["lang"], 0) + 1
            out.append(d)
    return out


def time_forward(model_dir: str, texts: list[str], threads: int, max_batch: int) -> dict:
    import torch

    from embedding.encoder import Encoder
    from embedding.model import load_model

    torch.set_num_threads(threads)
    lm = load_model(model_dir, device="cpu")
    enc = Encoder(lm, max_batch=max_batch)
    inputs = [lm.settings.passage_prefix + t for t in texts]
    start = time.perf_counter()
    tokens = enc.forward_only(inputs, lm.settings.max_length)
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "documents": len(texts)}


def time_job(corpus: str, model_dir: str, root: str, mode: str, max_batch: int) -> dict:
    from jobs.embed import EmbedConfig, run

    cfg = EmbedConfig(corpus=(corpus,), model=model_dir, set_name="bench", root=root, mode=mode,
                      max_batch=max_batch)
    start = time.perf_counter()
    manifest = run(cfg)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "documents": manifest["counts"]["documents"],
            "tokens": manifest["counts"]["input_tokens"], "timings": manifest["timings"],
            "workers": manifest["workers"]}


def codec_figures(model_dir: str, texts: list[str], nbits_list: list[int]) -> list[dict]:
    import pyarrow as pa

    from embedding.codec import ResidualCodec, default_n_centroids
    from embedding.encoder import Encoder
    from embedding.model import load_model
    from storage import schemas

    lm = load_model(model_dir, device="cpu")
    tokens = Encoder(lm).encode_documents(texts, dense=False, colbert=True).tokens
    allv = np.concatenate(tokens)
    dim = allv.shape[1]
    k = min(default_n_centroids(len(allv)), len(allv) // 8)
    rows = []
    for nbits in nbits_list:
        codec = ResidualCodec.fit(allv, nbits, k, seed=0, niter=4)
        codes, residuals = codec.compress(allv)
        recon = codec.decompress(codes, residuals)
        cos = float(np.mean(np.sum(recon * allv, axis=1) / np.linalg.norm(allv, axis=1)))
        splits = np.cumsum([len(t) for t in tokens])[:-1]
        table = schemas.tokens_table([str(i) for i in range(len(tokens))], np.split(codes, splits),
                                     np.split(residuals, splits), codec.code_dtype)
        sink = pa.BufferOutputStream()
        import pyarrow.parquet as pq

        pq.write_table(table, sink, compression="zstd")
        parquet_bytes = len(sink.getvalue())
        rows.append({"nbits": nbits, "centroids": k, "tokens": int(len(allv)),
                     "bytes_per_token_raw_fp16": dim * 2, "bytes_per_token_codec": codec.bytes_per_token(),
                     "bytes_per_token_parquet": parquet_bytes / len(allv),
                     "compression_vs_fp16": dim * 2 / (parquet_bytes / len(allv)), "mean_cosine": cos})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from jobs.runtime import init_ray

    docs = corpus_subset(args.xquad, args.docs_per_lang)
    texts = [d["text"] for d in docs]
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        write_jsonl(Path(corpus), docs)
        init_ray()
        job = time_job(corpus, args.model, os.path.join(tmp, "store"), args.mode, args.max_batch)
        fwd = time_forward(args.model, texts, job["workers"]["threads"], args.max_batch)
    codec = codec_figures(args.model, texts[:: max(1, len(texts) // args.codec_docs)][: args.codec_docs], args.nbits)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpu": False},
        "documents": len(docs), "mode": args.mode, "job": job, "forward": fwd,
        "ratio_docs_per_s": (job["documents"] / job["seconds"]) / (fwd["documents"] / fwd["seconds"]),
        "ratio_tokens_per_s": (job["tokens"] / job["seconds"]) / (fwd["tokens"] / fwd["seconds"]),
        "codec": codec,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"embed benchmark: {len(docs)} XQuAD paragraphs, mode {args.mode}, {result['machine']['cpus']} CPUs")
    print(f"{'':<22}{'seconds':>10}{'docs/s':>10}{'tokens/s':>12}")
    for name, r in (("whole job", job), ("model forward only", fwd)):
        print(f"{name:<22}{r['seconds']:>10.1f}{r['documents'] / r['seconds']:>10.2f}{r['tokens'] / r['seconds']:>12.1f}")
    print(f"ratio job/forward: docs/s {result['ratio_docs_per_s']:.3f}, tokens/s {result['ratio_tokens_per_s']:.3f}")
    print(f"{'nbits':>5}{'B/token fp16':>14}{'B/token codec':>15}{'B/token parquet':>17}{'x vs fp16':>11}{'cosine':>9}")
    for r in codec:
        print(f"{r['nbits']:>5}{r['bytes_per_token_raw_fp16']:>14}{r['bytes_per_token_codec']:>15}"
              f"{r['bytes_per_token_parquet']:>17.1f}{r['compression_vs_fp16']:>11.2f}{r['mean_cosine']:>9.4f}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
