"""Embed-job benchmark: the whole Ray job against the bare model forward, side by side.

Prints a table and writes JSON:

* documents/s and tokens/s of ``jobs.embed.run`` (scan, Ray Data actor pool, encoding,
  codec fit, compression, Parquet writes, manifest) against ``Encoder.forward_only``
  over the same texts with the same tokenizer limits, batching and torch threads,
  alternating (forward, job per mode) for ``--repeats`` rounds; the ratios are medians
  over the rounds. The bare forward runs in a child process that loads the model, times
  it and exits before each job starts (``--reference-in child``, the default), so the job
  never runs beside the benchmark's own copy of the model; ``--reference-in driver``
  keeps the reference in the benchmark's process for all rounds, as the harness did up
  to the twenty-seventh session (on this 2-CPU VM that cost the both-mode job 8-20 s);
* the ratio with the fixed start-up costs (Ray start, model fingerprint, actor pools'
  start-up and model load; the reference's own model load) and without them (steady);
* the model share: the actors' own tokenise + forward seconds over the job's steady
  seconds, measured inside the same run, so load that other users put on a shared
  machine between the two sides of the side-by-side cancels out;
* the job's stage timings (sample pass, k-means, encode pass; inside the actors:
  tokenise, forward, pooling/projection, compression, writes), from which the GPU
  projection is made;
* bytes per ColBERT token stored at nbits 1/2/4 against raw float16 and the mean
  cosine of decompressed to original token vectors (``--codec-docs`` > 0).

Usage::

    python benchmarks/bench_embed.py --tatoeba ../shared/data/tatoeba \
        --model ~/.cache/tessera/models/me5-small --docs 12000 --modes dense both --repeats 3
    python benchmarks/bench_embed.py --xquad ../shared/data/xquad --model ... --docs 720
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepare_data import build_tatoeba, build_xquad, build_xquad_sentences, write_jsonl  # noqa: E402

logger = logging.getLogger("bench_embed")


def parse_args(argv=None) -> argparse.Namespace:
    from embedding.codec import KMEANS_CHOICES
    from embedding.model import PRECISIONS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--xquad", help="XQuAD folder: long paragraphs, 12 languages")
    src.add_argument("--tatoeba", help="Tatoeba folder: short sentences, 13 languages")
    src.add_argument("--xquad-sentences", help="XQuAD folder, paragraphs split into sentences (~40 "
                     "tokens, 10 languages; prepare_data.py --xquad-sentences)")
    p.add_argument("--model", required=True)
    p.add_argument("--docs", type=int, default=12000, help="documents (at most what the source holds)")
    p.add_argument("--modes", nargs="+", choices=("dense", "colbert", "both"), default=["dense", "both"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nbits", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--codec-docs", type=int, default=0, help="documents encoded for the codec figures (0: none)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--rows-per-shard", type=int, default=None,
                   help="the job's rows per shard (EmbedConfig.rows_per_shard; also the in-process shard-by-shard "
                        "run; default: the job's, sized to the texts by jobs.plan.auto_rows_per_shard)")
    p.add_argument("--shard-sizes", type=int, nargs="+", default=[],
                   help="more rows-per-shard values for the in-process shard-by-shard run, each timed in every "
                        "round beside the job's (order rotated per round): what the shard size alone costs")
    p.add_argument("--kmeans", choices=KMEANS_CHOICES, default="auto",
                   help="the job's codec k-means (auto: the job's default)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where both sides run: the reference forward and the job's encoder actors")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="the encoder's type on both sides (auto: the job's default, bfloat16 on a CPU that "
                        "multiplies it natively)")
    p.add_argument("--reference-in", choices=("child", "driver"), default="child",
                   help="where the bare forward runs: a child process that exits before each job (default), or "
                        "this process, which keeps the reference model while the jobs run (the harness before)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/embed_<source>_<n>docs.json)")
    return p.parse_args(argv)


def load_docs(args: argparse.Namespace) -> tuple[str, list[dict]]:
    """(source name, documents): Tatoeba interleaves each pair's foreign and English
    sentences (short multilingual text); XQuAD takes paragraphs (and XQuAD sentences their
    sentences) language after language."""
    if args.tatoeba:
        bench = build_tatoeba(Path(args.tatoeba))
        docs = [{"id": d["id"], "text": d["text"], "lang": d["lang"]}
                for pair in zip(bench.queries, bench.corpus) for d in pair]
        return "tatoeba", docs[: args.docs]
    if args.xquad_sentences:
        docs = build_xquad_sentences(Path(args.xquad_sentences)).corpus
        return "xquad_sentences", [{"id": d["id"], "text": d["text"], "lang": d["lang"]} for d in docs][: args.docs]
    docs = build_xquad(Path(args.xquad)).corpus
    return "xquad", docs[: args.docs]


def load_reference(model_dir: str, threads: int, max_batch: int, device: str = "cpu", precision: str = "auto"):
    import torch

    from embedding.encoder import Encoder
    from embedding.model import load_model

    torch.set_num_threads(threads)
    start = time.perf_counter()
    lm = load_model(model_dir, device=device, precision=precision)
    enc = Encoder(lm, max_batch=max_batch)
    if device == "cuda":  # CUDA context and kernels loaded before the first timed round
        enc.forward_only(["warm-up"] * 4, 16)
    return enc, time.perf_counter() - start


def time_forward(enc, texts: list[str]) -> dict:
    """The model's own speed: tokenise and run the bare forward over the same passages
    (prefix, dense ``max_length``), batched by length over the whole list."""
    inputs = [enc.s.passage_prefix + t for t in texts]
    start = time.perf_counter()
    tokens = enc.forward_only(inputs, enc.s.max_length)
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "documents": len(texts)}


def time_shards(enc, texts: list[str], mode: str, rows_per_shard: int = 1024) -> dict:
    """The job's encoding without Ray: ``encode_documents`` shard by shard (the job's default
    ``rows_per_shard``) in this process, with the encoder's stage seconds. Between the bare
    forward and the job: what per-shard encoding (batches bucketed inside a shard, pooling,
    copies to numpy) costs, apart from what the actors and Ray Data cost."""
    colbert = mode in ("colbert", "both")
    before = dict(enc.stage_seconds)
    start = time.perf_counter()
    for i in range(0, len(texts), rows_per_shard):
        enc.encode_documents(texts[i:i + rows_per_shard], dense=mode != "colbert", colbert=colbert)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "documents": len(texts),
            "stages": {k: round(v - before.get(k, 0.0), 3) for k, v in enc.stage_seconds.items()}}


_KEPT: dict = {}  # --reference-in driver: the reference encoder, loaded once and kept for every round


def reference_side(model_dir: str, threads: int, max_batch: int, device: str, precision: str, texts: list[str],
                   mode: str, rows_per_shard: int, sizes: list[int], keep: bool = False) -> dict:
    """One round's reference: the bare forward over ``texts``, then the job's encoding shard by
    shard in-process (``time_shards``) at ``rows_per_shard`` and at each of ``sizes``. Loads the
    model (``load_seconds``) unless ``keep`` and an earlier call in this process loaded it."""
    key = (model_dir, threads, max_batch, device, precision)
    if keep and key in _KEPT:
        enc, load = _KEPT[key], 0.0
    else:
        enc, load = load_reference(model_dir, threads, max_batch, device, precision)
        if keep:
            _KEPT[key] = enc
    fwd = time_forward(enc, texts)
    fwd["shards"] = time_shards(enc, texts, mode, rows_per_shard)
    fwd["shards_by_size"] = {str(rows_per_shard): fwd["shards"]["seconds"]}
    for n in sizes:
        fwd["shards_by_size"][str(n)] = time_shards(enc, texts, mode, n)["seconds"]
    fwd["load_seconds"], fwd["precision"], fwd["pid"] = load, enc.lm.precision, os.getpid()
    return fwd


def time_reference(where: str, *args) -> dict:
    """``reference_side`` in this process (``driver``, the model kept) or in a spawned child
    that has exited, its memory and threads gone, when this returns (``child``)."""
    if where == "driver":
        return reference_side(*args, keep=True)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(reference_side, *args).result()  # leaving the block joins the child


def time_job(corpus: str, model_dir: str, root: str, mode: str, max_batch: int, kmeans: str = "auto",
             device: str = "auto", rows_per_shard: "int | None" = None, precision: str = "auto") -> dict:
    from jobs.embed import EmbedConfig, run

    cfg = EmbedConfig(corpus=(corpus,), model=model_dir, set_name="bench", root=root, mode=mode,
                      max_batch=max_batch, kmeans=kmeans, device=device, rows_per_shard=rows_per_shard,
                      precision=precision)
    start = time.perf_counter()
    manifest = run(cfg)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "documents": manifest["counts"]["documents"],
            "tokens": manifest["counts"]["input_tokens"], "timings": manifest["timings"],
            "workers": manifest["workers"], "codec": {k: v for k, v in (manifest.get("codec") or {}).items()
                                                     if not k.startswith("bucket_")}}


def job_fixed_seconds(job: dict) -> float:
    """Start-up the job pays whatever the corpus size: the model fingerprint and the
    actors' model loads on the critical path (Ray's own start is added by the caller)."""
    t = job["timings"]
    return t.get("model", 0.0) + t.get("actor_start", 0.0)


def model_seconds(job: dict) -> float:
    """Seconds the job's actors spent tokenising and in the model forward (both passes)."""
    t = job["timings"]
    return sum(t.get(f"{p}{s}", 0.0) for p in ("sample_", "worker_") for s in ("tokenize", "forward"))


def codec_figures(model_dir: str, texts: list[str], nbits_list: list[int]) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

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
        pq.write_table(table, sink, compression="zstd")
        parquet_bytes = len(sink.getvalue())
        rows.append({"nbits": nbits, "centroids": k, "tokens": int(len(allv)),
                     "bytes_per_token_raw_fp16": dim * 2, "bytes_per_token_codec": codec.bytes_per_token(),
                     "bytes_per_token_parquet": parquet_bytes / len(allv),
                     "compression_vs_fp16": dim * 2 / (parquet_bytes / len(allv)), "mean_cosine": cos})
    return rows


def gpu_name(device: str) -> "str | bool":
    """The CUDA device's name when the benchmark ran on one, else False."""
    if device != "cuda":
        return False
    import torch

    return torch.cuda.get_device_name(0)


def summarise(mode: str, pairs: list[tuple[dict, dict]], ray_start: float, ref_load: float) -> dict:
    """Median ratios over the rounds of one mode, with and without fixed start-up costs."""
    steady, with_fixed, share = [], [], []
    for fwd, job in pairs:
        share.append(model_seconds(job) / (job["seconds"] - job_fixed_seconds(job)))
        fwd_rate = fwd["documents"] / fwd["seconds"]
        steady_s = job["seconds"] - job_fixed_seconds(job)
        steady.append(job["documents"] / steady_s / fwd_rate)
        with_fixed.append((job["documents"] / (job["seconds"] + ray_start))
                          / (fwd["documents"] / (fwd["seconds"] + ref_load)))
    return {"mode": mode, "ratio_steady": statistics.median(steady), "ratio_with_fixed": statistics.median(with_fixed),
            "model_share": statistics.median(share),
            "ratios_steady": steady, "ratios_with_fixed": with_fixed, "model_shares": share,
            "forward_seconds": statistics.median(f["seconds"] for f, _ in pairs),
            "inprocess_shards_seconds": statistics.median(f["shards"]["seconds"] for f, _ in pairs),
            "inprocess_shards_stages": _median_stages([f["shards"]["stages"] for f, _ in pairs]),
            "inprocess_seconds_by_shard_rows": {n: statistics.median(f["shards_by_size"][n] for f, _ in pairs)
                                                for n in pairs[0][0].get("shards_by_size", {})},
            "job_seconds": statistics.median(j["seconds"] for _, j in pairs),
            "stages": _median_stages([j["timings"] for _, j in pairs])}


def _median_stages(timings: list[dict]) -> dict:
    keys = sorted({k for t in timings for k in t})
    return {k: round(statistics.median(t.get(k, 0.0) for t in timings), 3) for k in keys}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from jobs.runtime import init_ray, plan_actors

    source, docs = load_docs(args)
    texts = [d["text"] for d in docs]
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"embed_{source}_{len(docs)}docs.json")
    rounds: dict[str, list] = {m: [] for m in args.modes}
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        write_jsonl(Path(corpus), docs)
        if args.rows_per_shard is None:  # what the job resolves it to, for the in-process shard run too
            from jobs.preflight import rows_per_shard
            from storage.corpus import ColumnMap

            args.rows_per_shard = rows_per_shard([corpus], ColumnMap())
        start = time.perf_counter()
        init_ray()
        ray_start = time.perf_counter() - start
        gpus = 1 if args.device == "cuda" else 0
        threads = plan_actors(os.cpu_count() or 1, gpus, device=args.device).threads  # what the job's actors run
        loads, precision = [], args.precision
        for r in range(args.repeats):
            for mode in args.modes:
                sizes = [n for n in args.shard_sizes if n != args.rows_per_shard]
                sizes = sizes[r % len(sizes):] + sizes[:r % len(sizes)] if sizes else []
                fwd = time_reference(args.reference_in, args.model, threads, args.max_batch, args.device,
                                     args.precision, texts, mode, args.rows_per_shard, sizes)
                if fwd["load_seconds"]:
                    loads.append(fwd["load_seconds"])
                precision = fwd["precision"]
                job = time_job(corpus, args.model, os.path.join(tmp, f"store-{mode}-{r}"), mode, args.max_batch,
                               args.kmeans, args.device, args.rows_per_shard, args.precision)
                if job["documents"] != fwd["documents"]:
                    raise RuntimeError(f"job embedded {job['documents']} documents, forward {fwd['documents']}")
                rounds[mode].append((fwd, job))
                logger.info("round %d %s: forward %.1fs, job %.1fs", r, mode, fwd["seconds"], job["seconds"])
    codec = codec_figures(args.model, texts[:: max(1, len(texts) // args.codec_docs)][: args.codec_docs],
                          args.nbits) if args.codec_docs else []
    ref_load = statistics.median(loads)  # one load (driver) or each child's (child)
    summary = [summarise(m, rounds[m], ray_start, ref_load) for m in args.modes]
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "gpu": gpu_name(args.device), "torch_threads": threads, "precision": precision},
        "source": source, "documents": len(docs), "repeats": args.repeats, "kmeans": args.kmeans,
        "rows_per_shard": args.rows_per_shard, "reference_in": args.reference_in,
        "fixed": {"ray_start_seconds": ray_start, "reference_model_load_seconds": ref_load},
        "summary": summary,
        "rounds": {m: [{"forward": f, "job": j} for f, j in rounds[m]] for m in args.modes},
        "codec": codec,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    table = render(result)
    out.with_suffix(".txt").write_text(table)
    print(table, end="")
    print(f"written to {out}")
    return 0


def render(result: dict) -> str:
    gpu = f", GPU {result['machine']['gpu']}" if result["machine"].get("gpu") else ""
    lines = [f"embed benchmark: {result['documents']} {result['source']} documents, "
             f"{result['machine']['cpus']} CPUs{gpu}, "
             f"{result['machine']['torch_threads']} torch threads, "
             f"{result['machine'].get('precision', 'float32')}, median of {result['repeats']} rounds",
             f"fixed: Ray start {result['fixed']['ray_start_seconds']:.1f}s, "
             f"reference model load {result['fixed']['reference_model_load_seconds']:.1f}s; the bare forward ran "
             + ("in a child process that exited before each job" if result.get("reference_in", "driver") == "child"
                else "in the benchmark's process, which kept the model while the jobs ran"),
             "steady, with fixed: docs/s of the job over docs/s of the bare forward, side by side (wall clock);",
             "model share: the actors' tokenise + forward seconds over the job's steady seconds, same run "
             "(immune to load that changes between the two sides)",
             f"{'mode':<7}{'forward s':>11}{'job s':>9}{'steady':>9}{'with fixed':>12}{'model share':>13}"]
    for s in result["summary"]:
        lines.append(f"{s['mode']:<7}{s['forward_seconds']:>11.1f}{s['job_seconds']:>9.1f}"
                     f"{s['ratio_steady']:>9.3f}{s['ratio_with_fixed']:>12.3f}{s['model_share']:>13.3f}")
    for s in result["summary"]:
        lines.append(f"  {s['mode']} stages (s, median): " + ", ".join(f"{k} {v:.1f}" for k, v in s["stages"].items()))
        lines.append(f"  {s['mode']} in this process, shard by shard without Ray: "
                     f"{s['inprocess_shards_seconds']:.1f}s (" + ", ".join(
                         f"{k} {v:.1f}" for k, v in s["inprocess_shards_stages"].items()) + ")")
        if len(s.get("inprocess_seconds_by_shard_rows", {})) > 1:
            lines.append(f"  {s['mode']} in this process by rows per shard (s, median; bare forward "
                         f"{s['forward_seconds']:.1f}): " + ", ".join(
                             f"{k} rows {v:.1f}" for k, v in s["inprocess_seconds_by_shard_rows"].items()))
    if result["codec"]:
        lines.append(f"{'nbits':>5}{'B/token fp16':>14}{'B/token codec':>15}{'B/token parquet':>17}"
                     f"{'x vs fp16':>11}{'cosine':>9}")
        for r in result["codec"]:
            lines.append(f"{r['nbits']:>5}{r['bytes_per_token_raw_fp16']:>14}{r['bytes_per_token_codec']:>15}"
                         f"{r['bytes_per_token_parquet']:>17.1f}{r['compression_vs_fp16']:>11.2f}"
                         f"{r['mean_cosine']:>9.4f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
