#!/usr/bin/env bash
# The main job on the bundled demo model, on the CPU: set up (if needed), then sample one image per
# Fashion-MNIST class with the full-precision demo DiT (cfg 1.5, 50 steps) into samples/demo_fp.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p samples
.venv/bin/python sample.py --ckpt assets/demo/dit_fmnist.safetensors --cfg-scale 1.5 --num-sampling-steps 50 \
  --seed 0 --nrow 10 --output samples/demo_fp.png --device "${DEVICE:-cpu}"
