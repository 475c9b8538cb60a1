#!/usr/bin/env bash
# Install valuekit (editable) with its test and data extras into the current Python.
# On a machine without torch, install the CPU build first: a bare `torch` requirement
# would otherwise pull several GB of CUDA wheels onto a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "${VALUEKIT_TORCH:-torch==2.13.0}"
fi
"$PY" -m pip install -q -e ".[test,mnist,multilingual,baselines,benchdata]"
# pyenv only sees new console scripts after a rehash
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
