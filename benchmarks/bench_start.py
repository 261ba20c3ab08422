"""What a fresh encoder process pays before its first document, step by step.

Each Ray process of the embed job that computes (an encoder actor, the codec-fit task)
starts as a bare Python: it imports torch, starts the device (CUDA's context on a GPU),
imports transformers and the model's class, loads the weights and tokenizer and runs its
first forward (cuBLAS's handle and the kernels load there). This runs those steps in that
order in ``--rounds`` fresh processes, one after another, and prints each step's median
seconds (JSON with ``--out``); the first round also pays cold file caches, so the rounds
are listed too.

Usage::

    python benchmarks/bench_start.py --model ~/.cache/tessera/models/me5-small --device cpu
    python benchmarks/bench_start.py --model /tmp/tessera-data/me5-random --device cuda --rounds 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("import_numpy_pyarrow", "import_torch", "device_start", "import_transformers", "import_model_class",
         "load_model", "first_forward", "second_forward")


def child(model: str, device: str, precision: str) -> dict:
    """The steps in this (fresh) process; their seconds."""
    sys.path.insert(0, str(ROOT))
    out, t = {}, time.perf_counter()

    def step(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        out[name] = round(now - t, 4)
        t = now

    import numpy  # noqa: F401
    import pyarrow  # noqa: F401
    step("import_numpy_pyarrow")
    import torch
    step("import_torch")
    if device == "cuda":
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
    step("device_start")
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    step("import_transformers")
    MODEL_MAPPING[type(transformers.AutoConfig.from_pretrained(model))]  # imports the modelling module
    step("import_model_class")
    from embedding.encoder import Encoder
    from embedding.model import load_model

    lm = load_model(model, device=device, precision=precision)
    step("load_model")
    encoder = Encoder(lm)
    for name in ("first_forward", "second_forward"):  # as the encoder actor warms up (jobs.embed_worker)
        encoder.forward_only(["warm-up"] * 2, 16)
        if device == "cuda":
            torch.cuda.synchronize()
        step(name)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.model, args.device, args.precision)))
        return 0
    rounds = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--device", args.device,
                               "--precision", args.precision], capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["process"] = round(time.perf_counter() - t, 4)  # the interpreter's own start and exit too
        rounds.append(r)
    med = {k: round(statistics.median(r[k] for r in rounds), 3) for k in (*STEPS, "process")}
    print(f"fresh {args.device} process, median of {args.rounds} (seconds): "
          + ", ".join(f"{k} {v}" for k, v in med.items()))
    for i, r in enumerate(rounds):
        print(f"  round {i + 1}: " + ", ".join(f"{k} {r[k]}" for k in (*STEPS, "process")))
    if args.out:
        Path(args.out).write_text(json.dumps({"device": args.device, "model": args.model, "median": med,
                                              "rounds": rounds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
