#!/usr/bin/env bash
# The main job on the bundled demo model: set up (if needed), quantize the demo DiT to W4A8 with
# DiTAS, then sample one image per Fashion-MNIST class from the quantized and the full-precision
# model (cfg 1.5, 50 steps, same noise): samples/demo_w4a8.png and samples/demo_fp.png.
# DEVICE=cuda runs it on a GPU (default cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DEVICE=${DEVICE:-cpu}
mkdir -p samples results
.venv/bin/python QuantDiT.py --ckpt assets/demo/dit_fmnist.safetensors --output results/demo-w4a8 --device "$DEVICE"
for model in "--path results/demo-w4a8 --output samples/demo_w4a8.png" \
             "--ckpt assets/demo/dit_fmnist.safetensors --output samples/demo_fp.png"; do
  # shellcheck disable=SC2086
  .venv/bin/python sample.py $model --cfg-scale 1.5 --num-sampling-steps 50 --seed 0 --nrow 10 --device "$DEVICE"
done
