"""What per-language batching costs an X-MOD encoder: one language vs twelve mixed.

The same texts (XQuAD paragraphs, ``--docs`` of them, 12 languages in turn) are encoded
by a random X-MOD model with 12 adapters (``fixtures_models.build_tiny_xmod``, hidden
``--hidden``) through ``Encoder.encode_documents`` (dense + ColBERT tokens, as the embed
job calls it), labelled two ways:

* ``one``: every text labelled ``en`` -> one adapter, length buckets over all texts;
* ``mixed``: each text labelled with its real language -> 12 adapter groups, length
  buckets within each group (more, smaller and less evenly filled batches).

Rounds alternate the two (which goes first alternates too); the figure is the median of
the per-round ratios mixed / one (each pair ran back to back), with best / best beside it.
The ratio is what matters on this shared machine; the tiny model makes the fixed
per-batch costs weigh more than they would in a real 270M-parameter X-MOD.

``--pool`` measures the same through the real embed job (``jobs.embed.run``: Ray Data
actor pool, shard reads, ColBERT codec fit and compression, Parquet writes, manifest)
on a local store under ``--work``, in one local Ray session (``jobs.runtime.init_ray``,
``--ray-cpus`` CPUs, temp dir ``<work>/ray``): corpus ``one`` (every paragraph labelled
``en``) and corpus ``mixed`` (each labelled with its language) as two JSONL files,
each run a fresh set name (nothing skipped as unchanged), ``--modes`` in turn, the
order of the pair alternating by round. Per run it keeps the wall seconds and the
manifest's stage timings; the report gives the median docs/s of each corpus, the
median of the per-round ratios mixed / one (wall, and wall less the pool's start-up),
and the split forward (actors' model forward, sample and encode passes) vs the rest.

Usage::

    .venv/bin/python benchmarks/bench_xmod.py --xquad ../shared/data/xquad --work /tmp/xmod-bench
    .venv/bin/python benchmarks/bench_xmod.py --pool --docs 960 --rounds 3 --work /tmp/xmod-bench
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

LANGS = ("ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh")
ADAPTERS = ("ar_AR", "de_DE", "el_GR", "en_XX", "es_XX", "hi_IN", "ro_RO", "ru_RU", "th_TH", "tr_TR",
            "vi_VN", "zh_CN")
LABELS = ("one", "mixed")
#: manifest timings summed into the split: the actors' model forward (sample pass + encode pass)
FORWARD_KEYS = ("sample_forward", "worker_forward")
#: tokenising and pooling/projection in the actors: the other per-batch work
TOKENIZE_KEYS = ("sample_tokenize", "worker_tokenize")
POST_KEYS = ("sample_post", "worker_post")


def pick_texts(paras: dict[str, list[str]], docs: int) -> tuple[list[str], list[str]]:
    """``docs`` paragraphs, the 12 languages in turn (each language's paragraphs in order,
    wrapping round): the texts and each one's language."""
    texts, langs = [], []
    for i in range(docs):
        lang = LANGS[i % len(LANGS)]
        texts.append(paras[lang][(i // len(LANGS)) % len(paras[lang])])
        langs.append(lang)
    return texts, langs


def corpus_rows(texts: list[str], langs: list[str], label: str) -> list[dict]:
    """JSONL rows of corpus ``one`` (every text labelled ``en``) or ``mixed`` (its own language)."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    return [{"id": f"x{i:05d}", "text": t, "lang": "en" if label == "one" else lang}
            for i, (t, lang) in enumerate(zip(texts, langs))]


def stage_split(seconds: float, timings: dict) -> dict:
    """One job's wall ``seconds`` split by its manifest ``timings``: the actors' forward,
    tokenise and post (pooling/projection) seconds, the pool's start-up (processes, model
    load), the codec's k-means and the token compression (``both``/``colbert``), and the
    rest (Ray and Ray Data scheduling, reads, sample cache, writes, manifest)."""
    pick = lambda keys: round(sum(timings.get(k, 0.0) for k in keys), 3)  # noqa: E731
    out = {"wall": round(seconds, 3), "forward": pick(FORWARD_KEYS), "tokenize": pick(TOKENIZE_KEYS),
           "post": pick(POST_KEYS), "actor_start": pick(("actor_start",)), "kmeans": pick(("kmeans",)),
           "compress": pick(("worker_compress",))}
    out["rest"] = round(seconds - sum(v for k, v in out.items() if k != "wall"), 3)
    return out


def summarise_pool(runs: list[dict], documents: int) -> dict:
    """Per mode: median docs/s of each corpus and the median of the per-round ratios.

    ``runs``: ``{"round", "mode", "label", "split"}`` (``split`` from :func:`stage_split`),
    both labels of every (round, mode). Ratios are times mixed / one (> 1: mixed is slower)
    of the wall, the wall less the pool's start-up (``steady``) and the forward alone.
    """
    out = {}
    for mode in dict.fromkeys(r["mode"] for r in runs):
        by = {(r["round"], r["label"]): r["split"] for r in runs if r["mode"] == mode}
        rounds = sorted({k[0] for k in by if (k[0], "one") in by and (k[0], "mixed") in by})
        steady = lambda s: s["wall"] - s["actor_start"]  # noqa: E731
        ratio = lambda f: round(statistics.median(f(by[r, "mixed"]) / f(by[r, "one"]) for r in rounds), 3)  # noqa: E731
        med = {lab: {k: round(statistics.median(by[r, lab][k] for r in rounds), 3) for k in by[rounds[0], lab]}
               for lab in LABELS}
        out[mode] = {
            "rounds": len(rounds),
            "docs_per_s": {lab: round(documents / med[lab]["wall"], 1) for lab in LABELS},
            "docs_per_s_steady": {lab: round(documents / (med[lab]["wall"] - med[lab]["actor_start"]), 1)
                                  for lab in LABELS},
            "mixed_over_one_time": {"wall": ratio(lambda s: s["wall"]), "steady": ratio(steady),
                                    "forward": ratio(lambda s: s["forward"]),
                                    "rest": ratio(lambda s: s["rest"])},
            "median_split_seconds": med,
        }
    return out


def render_pool(result: dict) -> list[str]:
    lines = [f"X-MOD per-language batching on the embed job's actor pool: {result['documents']} XQuAD paragraphs "
             f"(12 languages), random X-MOD hidden {result['model']['hidden']}, 2 layers, 12 adapters, "
             f"max_batch {result['max_batch']}, local Ray {result['ray_cpus']} CPUs, "
             f"{result['workers']['actors']} actor x {result['workers']['threads']} threads, "
             f"median of {result['rounds']} alternating rounds",
             f"command: {result['command']}",
             "docs/s = documents / job wall seconds (steady: less the pool's start-up); ratios = time mixed / one, "
             "median of per-round ratios (> 1: mixed slower)",
             "docs/s are medians over each corpus's own runs (possibly from different rounds); the ratios pair "
             "runs made back to back, so load that drifts over the session cancels out of them",
             f"{'mode':6}{'one d/s':>9}{'mixed d/s':>11}{'one st':>8}{'mix st':>8}"
             f"{'wall':>7}{'steady':>8}{'forward':>9}{'rest':>7}"]
    for mode, s in result["summary"].items():
        r = s["mixed_over_one_time"]
        lines.append(f"{mode:6}{s['docs_per_s']['one']:9.1f}{s['docs_per_s']['mixed']:11.1f}"
                     f"{s['docs_per_s_steady']['one']:8.1f}{s['docs_per_s_steady']['mixed']:8.1f}"
                     f"{r['wall']:7.3f}{r['steady']:8.3f}{r['forward']:9.3f}{r['rest']:7.3f}")
    lines.append("median seconds per stage (manifest timings; forward/tokenize/post = actors' sample + encode "
                 "passes, compress = worker_compress, rest = wall - the others)")
    for mode, s in result["summary"].items():
        for lab in LABELS:
            m = s["median_split_seconds"][lab]
            keys = ("wall", "forward", "tokenize", "post", "actor_start", "kmeans", "compress", "rest")
            lines.append(f"  {mode:6}{lab:6} " + ", ".join(f"{k} {m[k]:.2f}" for k in keys))
    lines.append("per-run wall seconds: " + "; ".join(
        f"r{x['round']} {x['mode']} {x['label']} {x['split']['wall']:.1f}" for x in result["runs"]))
    adapters = {x["label"]: x.get("per_adapter") for x in result["runs"]}
    lines.append(f"documents per adapter (manifest counts.per_adapter): {adapters}")
    lines.append(f"batches per corpus (one shard, Encoder.batches): {result['batches']}, "
                 f"mean rows/batch {result['mean_batch_rows']}")
    lines.append("1-min load average after each run: " + ", ".join(f"{x['load_avg_after'][0]:.1f}"
                                                                  for x in result["runs"]))
    lines.append(f"load average (1, 5, 15 min) at start {result['machine']['load_avg_at_start']}, "
                 f"at end {result['machine']['load_avg_at_end']}; platform {result['machine']['platform']}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--xquad", default=str(REPO.parent / "shared" / "data" / "xquad"))
    p.add_argument("--work", default="/tmp/xmod-bench")
    p.add_argument("--docs", type=int, default=480)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None,
                   help="results path without suffix (default benchmarks/results/xmod_batching[_pool])")
    p.add_argument("--pool", action="store_true", help="through the embed job's actor pool (see above)")
    p.add_argument("--modes", nargs="+", choices=("dense", "colbert", "both"), default=["dense", "both"],
                   help="--pool: the embed modes, each run for both corpora every round")
    p.add_argument("--ray-cpus", type=int, default=2, help="--pool: CPUs of the local Ray")
    p.add_argument("--from-json", default=None,
                   help="--pool: recompute the splits and summary of a finished run's JSON (its runs' wall "
                        "seconds and manifest timings) and write --out again; runs nothing")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(REPO / "benchmarks" / "results" / ("xmod_batching_pool" if args.pool else "xmod_batching"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.pool and args.from_json:
        return rerender_pool(Path(args.from_json), Path(args.out))
    if args.pool:
        return run_pool_bench(args, argv)
    import torch
    from prepare_data import load_xquad

    from embedding.encoder import Encoder
    from embedding.model import EncoderSettings, load_model
    from fixtures_models import build_tiny_xmod

    torch.set_num_threads(args.threads)
    folder = Path(args.work) / f"xmod-{args.hidden}"
    if not (folder / "config.json").exists():
        build_tiny_xmod(folder, languages=ADAPTERS, colbert_dim=32, hidden=args.hidden)
    lm = load_model(folder, EncoderSettings(doc_maxlen=180, max_length=256), device="cpu")
    enc = Encoder(lm, max_batch=args.max_batch)
    paras = {lang: [p["context"] for a in load_xquad(Path(args.xquad), lang) for p in a["paragraphs"]]
             for lang in LANGS}
    texts, langs = pick_texts(paras, args.docs)
    labels = {"one": ["en"] * len(texts), "mixed": langs}
    batches = {}
    for name, lab in labels.items():
        ids, _ = enc.tokenize([enc.s.passage_prefix + t for t in texts], enc.s.max_length)
        batches[name] = [len(b) for b, _ in enc.batches(ids, enc.route(lab))]
    enc.encode_documents(texts[:24], dense=True, colbert=True, langs=langs[:24])  # warm-up
    seconds: dict[str, list[float]] = {"one": [], "mixed": []}
    for r in range(args.rounds):
        order = ("one", "mixed") if r % 2 == 0 else ("mixed", "one")
        for name in order:
            t0 = time.perf_counter()
            enc.encode_documents(texts, dense=True, colbert=True, langs=labels[name])
            seconds[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    result = {
        "model": {"hidden": args.hidden, "layers": 2, "adapters": len(ADAPTERS), "colbert_dim": 32},
        "documents": len(texts), "rounds": args.rounds, "max_batch": args.max_batch,
        "batches": {k: len(v) for k, v in batches.items()},
        "mean_batch_rows": {k: round(sum(v) / len(v), 1) for k, v in batches.items()},
        "seconds": seconds, "docs_per_s": {k: round(len(texts) / v, 1) for k, v in med.items()},
        "mixed_over_one_time": round(med["mixed"] / med["one"], 3),
        # each round's pair ran back to back: the median of the paired ratios resists load spikes
        "mixed_over_one_paired_median": round(statistics.median(
            m / o for m, o in zip(seconds["mixed"], seconds["one"])), 3),
        "mixed_over_one_best": round(min(seconds["mixed"]) / min(seconds["one"]), 3),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "load_avg_at_end": os.getloadavg()},
        "command": " ".join([".venv/bin/python", "benchmarks/bench_xmod.py", *(argv or sys.argv[1:])]),
    }
    lines = [f"X-MOD per-language batching: {len(texts)} XQuAD paragraphs (12 languages), random X-MOD "
             f"hidden {args.hidden}, 2 layers, 12 adapters, dense + ColBERT, max_batch {args.max_batch}, "
             f"median of {args.rounds} alternating rounds",
             f"command: {result['command']}",
             f"{'labels':8}{'batches':>9}{'rows/batch':>12}{'docs/s':>9}",
             *(f"{k:8}{result['batches'][k]:9d}{result['mean_batch_rows'][k]:12.1f}{result['docs_per_s'][k]:9.1f}"
               for k in ("one", "mixed")),
             f"mixed / one time: median of per-round ratios {result['mixed_over_one_paired_median']:.3f}, "
             f"best / best {result['mixed_over_one_best']:.3f}, median / median {result['mixed_over_one_time']:.3f}",
             "per-round seconds: " + ", ".join(f"{k} {[round(x, 2) for x in v]}" for k, v in seconds.items()),
             f"machine: {result['machine']}"]
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def run_pool_bench(args, argv) -> int:
    """``--pool``: the embed job, one corpus vs the other, in one local Ray session."""
    import logging

    from prepare_data import load_xquad, write_jsonl

    from fixtures_models import build_tiny_xmod
    from jobs.embed import EmbedConfig, run
    from jobs.runtime import init_ray

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    log = logging.getLogger("bench_xmod")
    log.setLevel(logging.INFO)
    load_start = os.getloadavg()
    work = Path(args.work)
    folder = work / f"xmod-{args.hidden}"
    if not (folder / "config.json").exists():
        build_tiny_xmod(folder, languages=ADAPTERS, colbert_dim=32, hidden=args.hidden)
    paras = {lang: [p["context"] for a in load_xquad(Path(args.xquad), lang) for p in a["paragraphs"]]
             for lang in LANGS}
    texts, langs = pick_texts(paras, args.docs)
    corpora = {}
    for label in LABELS:
        corpora[label] = work / f"corpus-{label}-{len(texts)}.jsonl"
        write_jsonl(corpora[label], corpus_rows(texts, langs, label))
    batches = _batch_sizes(folder, texts, langs, args.max_batch)
    root = work / f"store-{time.strftime('%Y%m%d-%H%M%S')}"
    os.environ.setdefault("RAY_TMPDIR", str(work))  # Ray's temp dir: <work>/ray
    t0 = time.perf_counter()
    init_ray(args.ray_cpus)
    ray_start = time.perf_counter() - t0
    runs, workers = [], None
    for r in range(args.rounds):
        order = LABELS if r % 2 == 0 else LABELS[::-1]
        for mode in args.modes:
            for label in order:
                cfg = EmbedConfig(corpus=(str(corpora[label]),), model=str(folder), set_name=f"{mode}-{label}-r{r}",
                                  root=str(root), mode=mode, max_batch=args.max_batch, doc_maxlen=180,
                                  max_length=256, force=True)
                start = time.perf_counter()
                manifest = run(cfg)
                seconds = time.perf_counter() - start
                if manifest["counts"]["documents"] != len(texts):
                    raise RuntimeError(f"{label}: {manifest['counts']['documents']} documents, expected {len(texts)}")
                workers = manifest["workers"]
                runs.append({"round": r, "mode": mode, "label": label,
                             "split": stage_split(seconds, manifest["timings"]), "timings": manifest["timings"],
                             "per_adapter": manifest["counts"].get("per_adapter"),
                             "load_avg_after": [round(x, 2) for x in os.getloadavg()]})
                log.info("round %d %s %s: %.1fs (%s)", r, mode, label, seconds, runs[-1]["split"])
        # written after every round: a run stopped early (time limit) keeps the rounds it finished
        _write_pool(args, argv, runs, r + 1, len(texts), batches, workers, ray_start, load_start)
    return 0


def _write_pool(args, argv, runs: list[dict], rounds: int, documents: int, batches: dict, workers: dict,
                ray_start: float, load_start: tuple) -> None:
    result = {
        "model": {"hidden": args.hidden, "layers": 2, "adapters": len(ADAPTERS), "colbert_dim": 32},
        "documents": documents, "rounds": rounds, "modes": args.modes, "max_batch": args.max_batch,
        "ray_cpus": args.ray_cpus, "ray_start_seconds": round(ray_start, 3), "workers": workers,
        "batches": {k: len(v) for k, v in batches.items()},
        "mean_batch_rows": {k: round(sum(v) / len(v), 1) for k, v in batches.items()},
        "summary": summarise_pool(runs, documents), "runs": runs,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_at_start": load_start,
                    "load_avg_at_end": os.getloadavg()},
        "command": " ".join([".venv/bin/python", "benchmarks/bench_xmod.py", *(argv or sys.argv[1:])]),
    }
    lines = render_pool(result)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def rerender_pool(src: Path, out: Path) -> int:
    """Recompute ``split`` and ``summary`` from a pool run's recorded walls and timings."""
    result = json.loads(src.read_text())
    for r in result["runs"]:
        r["split"] = stage_split(r["split"]["wall"], r["timings"])
    result["summary"] = summarise_pool(result["runs"], result["documents"])
    lines = render_pool(result)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _batch_sizes(folder: Path, texts: list[str], langs: list[str], max_batch: int) -> dict[str, list[int]]:
    """Rows per batch of each corpus as the job's actors batch one shard (same settings, no forward)."""
    from embedding.encoder import Encoder
    from embedding.model import EncoderSettings, load_model

    enc = Encoder(load_model(folder, EncoderSettings(doc_maxlen=180, max_length=256), device="cpu"),
                  max_batch=max_batch)
    ids, _ = enc.tokenize([enc.s.passage_prefix + t for t in texts], enc.s.max_length)
    return {lab: [len(b) for b, _ in enc.batches(ids, enc.route(["en"] * len(texts) if lab == "one" else langs))]
            for lab in LABELS}


if __name__ == "__main__":
    sys.exit(main())
