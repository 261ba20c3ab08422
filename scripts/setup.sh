#!/usr/bin/env bash
# Create .venv and install Tessera with its test tools.
#   - torch==2.13.0 goes in FIRST: on CPU machines a bare `torch` requirement would pull a
#     multi-GB CUDA build; with 2.13.0 present, the project's `torch>=2.4` is already met.
#   - faiss: faiss-gpu when an NVIDIA GPU is visible, faiss-cpu otherwise (never both:
#     they provide the same module).
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip >/dev/null
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then FAISS=gpu; else FAISS=cpu; fi
python -m pip install --quiet -c scripts/constraints.txt -e ".[${FAISS},dev]"
echo "tessera installed in $(pwd)/.venv (faiss: ${FAISS})" >&2
