#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on the CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "[test] Fashion-MNIST is missing: the dataset tests will be skipped (apt-get install dataset-fashion-mnist)"
fi
exec .venv/bin/python -m pytest -q "$@"
