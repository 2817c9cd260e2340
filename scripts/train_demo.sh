#!/usr/bin/env bash
# Reproduce the committed demo assets on one GPU: the Fashion-MNIST classifier, the demo DiT, its
# FP samples (cfg 1.5, 50 steps) with FD and class accuracy, and the README sample grid.
# Environment: DATA (idx folder), OUT_DIR (where to write), STEPS, MINUTES, SAMPLES, CLS_EPOCHS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
OUT_DIR=${OUT_DIR:-assets/demo}
STEPS=${STEPS:-16000}
MINUTES=${MINUTES:-6.5}
SAMPLES=${SAMPLES:-2000}
CLS_EPOCHS=${CLS_EPOCHS:-12}
EXTRA=${EXTRA:---compile}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

echo "== classifier"
time $PY train_classifier.py --data-path "$DATA" --epochs "$CLS_EPOCHS" --output "$OUT_DIR/fmnist_classifier.safetensors"

echo "== demo DiT"
time $PY train.py --data fashion-mnist --data-path "$DATA" --model-config configs/demo_fmnist.json \
  --max-steps "$STEPS" --max-minutes "$MINUTES" --global-batch-size 256 --lr 3e-4 --warmup-steps 500 --cosine \
  --grad-clip 1.0 --ema-decay 0.9995 --log-every 500 --ckpt-every 1000000 --results-dir "$OUT_DIR/run" \
  --export "$OUT_DIR/dit_fmnist.safetensors" $EXTRA

echo "== FP samples and metrics"
$PY - "$OUT_DIR" "$SAMPLES" <<'PYEOF'
import sys, time, torch
from checkpoints import resolve_spec, load_model
from diffusion import create_diffusion
from npzio import save_samples_npz
from sampling import sample_uint8
import numpy as np
out, n = sys.argv[1], int(sys.argv[2])
device = "cuda" if torch.cuda.is_available() else "cpu"
ckpt = f"{out}/dit_fmnist.safetensors"
spec = resolve_spec(None, None, ckpt)
model = load_model(spec, ckpt, device)
diffusion = create_diffusion("50")
start, chunks = time.time(), []
for first in range(0, n, 500):
    chunks.append(sample_uint8(model, diffusion, None, spec, range(first, min(n, first + 500)), 0, 1.5, device=device))
images, labels = np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])
print(f"{n} samples in {time.time() - start:.1f} s")
save_samples_npz(f"{out}/fp_samples.npz", images, labels)
PYEOF
$PY evaluate.py "$OUT_DIR/fp_samples.npz" --classifier "$OUT_DIR/fmnist_classifier.safetensors" --data-path "$DATA" | tee "$OUT_DIR/fp_metrics.json"
$PY sample.py --ckpt "$OUT_DIR/dit_fmnist.safetensors" --cfg-scale 1.5 --num-sampling-steps 50 --seed 0 \
  --class-labels $(for r in 0 1 2 3; do echo 0 1 2 3 4 5 6 7 8 9; done) --nrow 10 --output "$OUT_DIR/samples_grid.png"
