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
#    the speed is the model's, the vectors are meaningless); with BASE=<folder>, a second
#    source tree (say `git archive <rev> | tar -x -C .dev/base`) runs the same benchmark
#    after this one, on the same machine (embed_gpu_base.json beside embed_gpu.json);
# 3. bench_start.py --device cuda: what a fresh GPU process pays before its first document
#    (torch's import, CUDA's start, transformers, the model, the first forward).
#
# MODES (default "dense both"), DOCS, REPEATS; SKIP_TESTS=1, SKIP_BENCH=1, SKIP_START=1;
# PACK=<file.tgz>: everything under $OUT packed there after each step (the lent machine
# returns few files; a step cut short by its timeout keeps what the steps before wrote).
set -u
BUNDLE=${BUNDLE:-.dev}
OUT=${OUT:-/tmp/tessera-gpu-out}  # an absolute path
DOCS=${DOCS:-20000}
REPEATS=${REPEATS:-2}
MODES=${MODES:-dense both}
mkdir -p "$OUT"
T0=$(date +%s)
step() {  # a line in $OUT/steps.txt with the seconds since the start; the pack
  echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/steps.txt"
  if [ -n "${PACK:-}" ]; then tar -czf "$PACK" -C "$OUT" .; fi
}
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
  lscpu | grep -i "model name"; grep -o -w "amx_bf16\|avx512_bf16" /proc/cpuinfo | sort | uniq -c;
  python3 -c "import torch, transformers, ray, faiss, pyarrow, numpy; print('torch', torch.__version__,
  torch.cuda.is_available(), 'transformers', transformers.__version__, 'ray', ray.__version__, 'faiss',
  faiss.__version__, 'pyarrow', pyarrow.__version__, 'numpy', numpy.__version__)"; } 2>&1 | tee "$OUT/env.txt"
MODEL=/tmp/tessera-data/me5-random
[ -f "$MODEL/model.safetensors" ] || python3 benchmarks/random_weights.py /tmp/tessera-data/me5cfg "$MODEL" \
  >/dev/null 2>&1 || { echo "random_weights failed"; exit 1; }
step "environment ready"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -x tests/jobs/test_gpu.py \
    > "$OUT/gpu_tests.log" 2>&1
  step "gpu tests exit $?"; tail -5 "$OUT/gpu_tests.log"
fi
bench() {  # $1: source tree, $2: name of the outputs
  (cd "$1" && PYTHONPATH="$SITE:$PWD" timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/bench_embed.py \
    --tatoeba /tmp/tessera-data/tatoeba --model "$MODEL" --device cuda --docs "$DOCS" --modes $MODES \
    --repeats "$REPEATS" ${BENCH_ARGS:-} --out "$OUT/$2.json" > "$OUT/$2.log" 2>&1)
  step "bench $2 ($1) exit $?"; grep -v "^20[0-9][0-9]-\|pid=" "$OUT/$2.log" | tail -25
}
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  bench . embed_gpu
  if [ -n "${BASE:-}" ]; then bench "$BASE" embed_gpu_base; fi
fi
if [ "${SKIP_START:-0}" != 1 ]; then
  timeout "${START_TIMEOUT:-90}" python3 benchmarks/bench_start.py --model "$MODEL" --device cuda --rounds 2 \
    --out "$OUT/start_gpu.json" > "$OUT/start_gpu.log" 2>&1
  step "start probe exit $?"; cat "$OUT/start_gpu.log"
fi
