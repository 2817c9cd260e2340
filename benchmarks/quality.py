"""Sample quality of quantization methods on the demo model, all from the same noise.

    python -m benchmarks.quality --num-samples 2000 --settings W4A8 W8A8 W4A6 W3A8

For each bit setting and method (round-to-nearest, SmoothQuant α = 0.5, DiTAS without LoRA,
DiTAS without grid search, full DiTAS) it quantizes the demo DiT, samples --num-samples images
(cfg 1.5, 50 steps; sample i's noise depends only on the seed and i) and reports FD against the
real test set, FD against the FP samples, class accuracy, PSNR against FP and quantization time.
Prints a markdown table and writes JSON lines to --output.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.rowlog import RowLog, card_of, provenance
from diffusion import create_diffusion
from evaluation.classifier import DEFAULT_CLASSIFIER, features_and_predictions, load_classifier
from evaluation.data import FASHION_MNIST_DIR, fashion_mnist_tensors, to_model_range
from evaluation.metrics import accuracy, frechet_distance_of_features, psnr
from quant.backends import BACKENDS, prepare_for_inference
from quant.calibrate import CalibrationRun, default_calibration_labels
from quant.config import DEFAULT_RECIPE, RECIPES, QuantConfig
from quant.pipeline import quantize_dit
from runtime.checkpoints import load_model, resolve_spec
from runtime.sampling import sample_uint8

METHODS = {
    "RTN": dict(smooth=False, lora_rank=0),
    "SmoothQuant a=0.5": dict(alpha_grid=(0.5,), lora_rank=0),
    "DiTAS w/o LoRA": dict(lora_rank=0, search_lora_iters=0),
    "DiTAS w/o grid (a=0.5)": dict(alpha_grid=(0.5,)),
    "RTN + LoRA": dict(smooth=False),
    "DiTAS": dict(),
    "DiTAS + 8-bit adaLN": dict(adaln_weight_bits=8),
    "DiTAS, per-token activations": dict(act_granularity="per_token"),
    # issue 15's parts, each alone and together
    "DiTAS + compensated rounding": dict(rounding="compensated"),
    "DiTAS + weighted LoRA": dict(lora_weighting="activation"),
    "DiTAS + no-smoothing candidate": dict(identity_candidate=True),
    "DiTAS + all three": {**RECIPES["best"], "act_granularity": "per_tensor"},  # the three weight parts
    "best, per-token activations": RECIPES["best"],
    "best, per-group 64": {**RECIPES["best"], "weight_granularity": "per_group", "weight_group_size": 64},
    "best, two-level 64": {**RECIPES["best"], "weight_granularity": "two_level", "weight_group_size": 64},
    "default": RECIPES[DEFAULT_RECIPE],  # what QuantDiT.py does without flags (now: "best, per-token activations")
    # issue 13's optional activation format: FP8 e4m3 codes instead of 8-bit integers
    "default, FP8 activations": {**RECIPES[DEFAULT_RECIPE], "act_format": "fp8_e4m3"},
    "DiTAS, FP8 activations": dict(act_format="fp8_e4m3"),
    "DiTAS per-group 64": dict(weight_granularity="per_group", weight_group_size=64),
    "DiTAS per-group 128": dict(weight_granularity="per_group", weight_group_size=128),
    # issue 17: two-level groups (a float scale per row, integer scales per group)
    "DiTAS two-level 64": dict(weight_granularity="two_level", weight_group_size=64),
    "DiTAS two-level 128": dict(weight_granularity="two_level", weight_group_size=128),
    # the grid search's stand-ins, measured against each other
    "DiTAS, search scored without LoRA": dict(search_lora_iters=0),
    "DiTAS, search on all rows": dict(search_rows_per_step=0),
    "DiTAS, search with full LoRA": dict(search_lora_iters=10),
    "DiTAS, search on 512 rows": dict(search_rows_per_step=512),
    "DiTAS, search on 2048 rows": dict(search_rows_per_step=2048),
}
# The rows of the committed table (issue 5), in its order; the others are available by name.
TABLE_METHODS = ["RTN", "SmoothQuant a=0.5", "DiTAS w/o LoRA", "DiTAS w/o grid (a=0.5)", "DiTAS", "RTN + LoRA"]


def parse_setting(text: str) -> tuple[int, int]:
    weight, act = text.upper().lstrip("W").split("A")
    return int(weight), int(act)


def generate(model, spec, n: int, batch: int, device, seed: int) -> tuple[np.ndarray, np.ndarray]:
    diffusion = create_diffusion("50")
    chunks = [sample_uint8(model, diffusion, None, spec, range(i, min(n, i + batch)), seed, 1.5, device=device)
              for i in range(0, n, batch)]
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


def main(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    log = RowLog(args.output, common=provenance(card_of(device)) | {"num_samples": args.num_samples, "seed": args.seed})
    spec = resolve_spec(None, None, args.ckpt)
    classifier = load_classifier(args.classifier, device)
    test_features, _ = features_and_predictions(classifier, fashion_mnist_tensors("test", args.data_path)[0])

    def measure(images, labels, fp_images=None, fp_features=None):
        features, predictions = features_and_predictions(classifier, to_model_range(images[..., :1]))
        row = {"fd_test": frechet_distance_of_features(features, test_features),
               "accuracy": accuracy(predictions, labels)}
        if fp_images is not None:
            row.update(fd_fp=frechet_distance_of_features(features, fp_features), psnr_fp=psnr(images, fp_images))
        return row, features

    fp_images, fp_labels = generate(load_model(spec, args.ckpt, device), spec, args.num_samples, args.batch, device,
                                      args.seed)
    fp_row, fp_features = measure(fp_images, fp_labels)
    log.add({"setting": "FP", "method": "-", **fp_row})
    run = CalibrationRun(default_calibration_labels(spec.num_classes), 1.5, 50, 0)
    for setting in args.settings:
        weight_bits, act_bits = parse_setting(setting)
        for method in args.methods:
            config = QuantConfig(weight_bits=weight_bits, act_bits=act_bits, **METHODS[method])
            start = time.perf_counter()
            model, _ = quantize_dit(load_model(spec, args.ckpt, device), config, run, device,
                                    progress=False)
            seconds = time.perf_counter() - start
            prepare_for_inference(model, args.backend)
            images, labels = generate(model, spec, args.num_samples, args.batch, device, args.seed)
            row, _ = measure(images, labels, fp_images, fp_features)
            log.add({"setting": config.label, "method": method, "backend": args.backend, **row, "quant_s": seconds})

    print("| setting | method | FD vs test | FD vs FP | class acc. | PSNR vs FP (dB) | quant. time (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in log.rows:
        print(f"| {r['setting']} | {r['method']} | {r['fd_test']:.3f} | {r.get('fd_fp', float('nan')):.3f} | "
              f"{100 * r['accuracy']:.1f} % | {r.get('psnr_fp', float('nan')):.2f} | {r.get('quant_s', float('nan')):.1f} |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="assets/demo/dit_fmnist.safetensors")
    parser.add_argument("--classifier", default=DEFAULT_CLASSIFIER)
    parser.add_argument("--data-path", default=str(FASHION_MNIST_DIR))
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling seed: sample i's noise and label depend only on it and i (FP and every row alike)")
    parser.add_argument("--batch", type=int, default=1000, help="images per sampling batch (twice the rows with CFG)")
    parser.add_argument("--settings", nargs="+", default=["W8A8", "W4A8", "W4A6", "W3A8"])
    parser.add_argument("--methods", nargs="+", default=TABLE_METHODS, choices=list(METHODS))
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "quality.jsonl"),
                        help="JSON lines file every row is appended to as it is measured")
    parser.add_argument("--backend", choices=BACKENDS, default="fake",
                        help="fake: the reference numerics (float32); triton: int8 kernels, float parts in bf16")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 matmuls on Ampere+ GPUs, as the samplers use by default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


if __name__ == "__main__":
    main(parse_args())
