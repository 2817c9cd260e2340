#!/usr/bin/env bash
# Create .venv (once) with the project's dependencies; later runs only check that it is current.
#   bash scripts/setup.sh        the runtime requirements (what the demo needs)
#   bash scripts/setup.sh dev    plus the test tools (pytest, ruff, Triton for the kernel tests)
# PYTHON picks the interpreter (default python3); TORCH_SPEC the PyTorch to install when the venv
# has none (default: the tested CPU-capable release).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-runtime}
case "$MODE" in
  runtime) requirements=requirements.txt ;;
  dev) requirements=requirements-dev.txt ;;
  *) echo "error: unknown setup mode '$MODE'; use 'runtime' (default) or 'dev'" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements-$MODE.sha256
wanted=$(cat requirements.txt "$requirements" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "[setup] installing $TORCH_SPEC"
    .venv/bin/python -m pip install -q "$TORCH_SPEC"
  fi
  echo "[setup] installing $requirements"
  .venv/bin/python -m pip install -q -r "$requirements"
  echo "$wanted" > "$stamp"
fi
