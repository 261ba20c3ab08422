#!/usr/bin/env bash
# The GPU checks in one call, for a lent GPU machine that has torch, transformers and pyarrow
# but no Ray, no faiss and no network (see benchmarks/README.md, "On a GPU machine").
#
# Needs a bundle made beforehand on a machine with pip (benchmarks/device_bundle.sh), at
# $BUNDLE (default .dev): whl/*.whl (faiss-cpu, jsonschema and its needs), ray-slim.tar.xz
# (Ray without its Java jars, RLlib, Serve and the dashboard's web client, binaries
# stripped) and data.tar.xz (me5cfg/: multilingual-e5-small's config and tokenizer, no
# weights; tatoeba/). Writes its logs and the benchmark's JSON under $OUT.
#
# 1. the GPU tests (tests/jobs/test_gpu.py): the encoder on CUDA against the CPU, and the
#    embed job on a Ray cluster with a GPU against the same job on CPU;
# 2. bench_embed.py --device cuda: the job against the bare forward on the GPU, with seeded
#    random weights in multilingual-e5-small's architecture (benchmarks/random_weights.py:
#    the speed is the model's, the vectors are meaningless).
set -u
BUNDLE=${BUNDLE:-.dev}
OUT=${OUT:-/tmp/tessera-gpu-out}
DOCS=${DOCS:-20000}
REPEATS=${REPEATS:-2}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
SITE=/tmp/tessera-site
if [ ! -d "$SITE/ray" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$BUNDLE"/whl/*.whl \
    || exit 1
  tar -C "$SITE" -xJf "$BUNDLE/ray-slim.tar.xz" || exit 1
  mkdir -p /tmp/tessera-data && tar -C /tmp/tessera-data -xJf "$BUNDLE/data.tar.xz" || exit 1
fi
export PYTHONPATH="$SITE:$PWD"
{ nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm --format=csv; nproc;
  python3 -c "import torch, transformers, ray, faiss, pyarrow, numpy; print('torch', torch.__version__,
  torch.cuda.is_available(), 'transformers', transformers.__version__, 'ray', ray.__version__, 'faiss',
  faiss.__version__, 'pyarrow', pyarrow.__version__, 'numpy', numpy.__version__)"; } 2>&1 | tee "$OUT/env.txt"
MODEL=/tmp/tessera-data/me5-random
[ -f "$MODEL/model.safetensors" ] || python3 benchmarks/random_weights.py /tmp/tessera-data/me5cfg "$MODEL" \
  >/dev/null 2>&1 || { echo "random_weights failed"; exit 1; }

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -x tests/jobs/test_gpu.py \
    > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests exit $?"; tail -5 "$OUT/gpu_tests.log"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/bench_embed.py --tatoeba /tmp/tessera-data/tatoeba \
    --model "$MODEL" --device cuda --docs "$DOCS" --modes dense both --repeats "$REPEATS" \
    ${BENCH_ARGS:-} --out "$OUT/embed_gpu.json" > "$OUT/bench.log" 2>&1
  echo "bench exit $?"; grep -v "^20[0-9][0-9]-\|pid=" "$OUT/bench.log" | tail -25
fi
