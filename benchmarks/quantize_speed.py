"""Time and memory of DiTAS quantization end to end (calibration, grid search, LoRA, measuring).

    python -m benchmarks.quantize_speed --model DiT-XL/2 --image-size 256 --num-sampling-steps 50

Weights are random (every weight ~ N(0, 0.02²), adaLN included, so activations are not trivial):
the cost does not depend on their values. One row with per-stage seconds and the peak GPU memory,
printed and appended to --output (benchmarks/results/quantize_speed.jsonl) with the call id, card,
date and commit; the table in benchmarks/RESULTS.md is kept by hand.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.rowlog import RowLog, provenance
from quant.calibrate import CalibrationRun, default_calibration_labels
from quant.config import DEFAULT_RECIPE, LORA_WEIGHTINGS, RECIPES, ROUNDINGS, QuantConfig, recipe_settings
from quant.pipeline import quantize_dit
from runtime.checkpoints import spec_from_name


def random_dit(name: str, image_size: int, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    spec = spec_from_name(name, image_size=image_size)
    model = spec.build()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname != "pos_embed":
                param.normal_(0, 0.02)
    return model.to(device).eval()


def main(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # the published code's setting for the FP model
    model = random_dit(args.model, args.image_size, device)
    config = QuantConfig(weight_bits=args.weight_bit, act_bits=args.act_bit, search_lora_iters=args.search_lora_iters,
                         search_rows_per_step=args.search_rows_per_step,
                         **recipe_settings(args.recipe, rounding=args.rounding, lora_weighting=args.lora_weighting,
                                           identity_candidate=args.identity_candidate))
    run = CalibrationRun(default_calibration_labels(1000), 1.5, args.num_sampling_steps, 0)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    _, report = quantize_dit(model, config, run, device,
                             progress=False)
    total = time.perf_counter() - start
    result = {
        "model": args.model, "image_size": args.image_size, "steps": args.num_sampling_steps, "config": config.label,
        "recipe": args.recipe, "rounding": config.rounding, "lora_weighting": config.lora_weighting,
        "identity_candidate": config.identity_candidate, "act_granularity": config.act_granularity,
        "search_lora_iters": config.search_lora_iters, "search_rows_per_step": config.search_rows_per_step,
        "total_s": round(total, 2), "stages_s": {k: round(v, 2) for k, v in report.seconds.items()},
        "peak_gpu_GiB": None if device.type != "cuda" else round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    RowLog(args.output, common=provenance(result.pop("device"))).add(result)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--num-sampling-steps", type=int, default=50)
    parser.add_argument("--weight-bit", type=int, default=4)
    parser.add_argument("--act-bit", type=int, default=8)
    parser.add_argument("--search-lora-iters", type=int, default=QuantConfig.search_lora_iters)
    parser.add_argument("--search-rows-per-step", type=int, default=QuantConfig.search_rows_per_step)
    parser.add_argument("--recipe", choices=list(RECIPES), default=DEFAULT_RECIPE,
                        help="method settings as QuantDiT.py's --recipe (default: QuantDiT.py's default)")
    parser.add_argument("--rounding", choices=ROUNDINGS, default=None, help="overrides the recipe")
    parser.add_argument("--lora-weighting", choices=LORA_WEIGHTINGS, default=None, help="overrides the recipe")
    parser.add_argument("--identity-candidate", action=argparse.BooleanOptionalAction, default=None,
                        help="overrides the recipe")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "quantize_speed.jsonl"),
                        help="JSON lines file the row is appended to")
    return parser.parse_args()


if __name__ == "__main__":
    main(parse_args())
