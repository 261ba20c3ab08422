"""Copy a model folder with freshly initialised weights: for timing where the weights can't travel.

The lent GPU machine takes at most 64 MiB of files per call, and multilingual-e5-small's
weights are 470 MB. A model's speed does not depend on its weight values, only on its
architecture (``config.json``), its tokenizer and the texts, so the GPU benchmarks run on
a folder with the real config and tokenizer and seeded random weights. Its embeddings are
meaningless: never report a quality figure (nDCG, overlap) measured with it.

Usage::

    python benchmarks/random_weights.py SRC_DIR OUT_DIR   # SRC_DIR needs no weights file
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def build(src: Path, out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModel

    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in WEIGHT_FILES:
            shutil.copy2(f, out / f.name)
    torch.manual_seed(seed)
    model = AutoModel.from_config(AutoConfig.from_pretrained(str(src), local_files_only=True))
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def main(argv: "list[str] | None" = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    print(build(Path(args[0]), Path(args[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
