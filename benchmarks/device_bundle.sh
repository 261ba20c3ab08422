#!/usr/bin/env bash
# Make the bundle benchmarks/device_gpu.sh needs, here (pip and the package index reachable),
# at $BUNDLE (default .dev, which .git/info/exclude should ignore), under the lent machine's
# 64 MiB a call: about 45 MB. Python 3.12 wheels for x86-64 Linux.
#   MODEL_DIR  a multilingual-e5-small folder (its config and tokenizer are taken, not its weights)
#   TATOEBA    the Tatoeba folder (default ../shared/data/tatoeba)
set -euo pipefail
BUNDLE=${BUNDLE:-.dev}
MODEL_DIR=${MODEL_DIR:-$HOME/.cache/tessera/models/me5-small}
TATOEBA=${TATOEBA:-../shared/data/tatoeba}
PLAT=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mkdir -p "$BUNDLE/whl"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q "${PLAT[@]}" -d "$BUNDLE/whl" faiss-cpu==1.15.1 jsonschema jsonschema-specifications \
  referencing rpds-py
python3 -m pip download -q "${PLAT[@]}" -d "$tmp" ray==2.60.0
mkdir "$tmp/ray" && (cd "$tmp/ray" && unzip -q ../ray-*.whl)
# Not used by Ray Data with include_dashboard=False: the Java jars, RLlib, Serve, LLM, the web UI.
rm -rf "$tmp"/ray/ray/{jars,rllib,serve,llm,dashboard/client/build}
strip --strip-unneeded "$tmp/ray/ray/_raylet.so"
strip "$tmp/ray/ray/core/src/ray/gcs/gcs_server" "$tmp/ray/ray/core/src/ray/raylet/raylet"
tar -C "$tmp/ray" -cf - . | xz -T0 -9 > "$BUNDLE/ray-slim.tar.xz"
mkdir -p "$tmp/data/me5cfg"
cp "$MODEL_DIR"/{config.json,tessera_encoder.json,tokenizer.json,tokenizer_config.json} "$tmp/data/me5cfg/"
cp -r "$TATOEBA" "$tmp/data/tatoeba"
tar -C "$tmp/data" -cf - . | xz -T0 -9 > "$BUNDLE/data.tar.xz"
du -sh "$BUNDLE"/* "$BUNDLE"
