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

Usage::

    .venv/bin/python benchmarks/bench_xmod.py --xquad ../shared/data/xquad --work /tmp/xmod-bench
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--xquad", default=str(REPO.parent / "shared" / "data" / "xquad"))
    p.add_argument("--work", default="/tmp/xmod-bench")
    p.add_argument("--docs", type=int, default=480)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "xmod_batching"))
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
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
    texts, langs = [], []
    for i in range(args.docs):
        lang = LANGS[i % len(LANGS)]
        texts.append(paras[lang][(i // len(LANGS)) % len(paras[lang])])
        langs.append(lang)
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


if __name__ == "__main__":
    sys.exit(main())
