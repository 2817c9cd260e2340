#!/usr/bin/env bash
# Create .venv (once) with the project's dependencies; later runs only check that it is current.
# PYTHON picks the interpreter (default python3); TORCH_SPEC the PyTorch to install when the venv
# has none (default: the tested CPU-capable release).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha256
wanted=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "[setup] installing $TORCH_SPEC"
    .venv/bin/python -m pip install -q "$TORCH_SPEC"
  fi
  echo "[setup] installing requirements-dev.txt"
  .venv/bin/python -m pip install -q -r requirements-dev.txt
  echo "$wanted" > "$stamp"
fi
