"""Layer-wise output error of weight-quantization options on the demo model, on the CPU in minutes
(issue 15): a cheap first look before the sample-quality protocol of benchmarks/quality.py.

    python -m benchmarks.layer_errors --num-sampling-steps 10

For each method it quantizes the demo DiT (W4A8 unless --setting) and records the mean over the 32
quantized layers of the relative squared output error against the FP layer over the calibration
run (the report's final_error; round-to-nearest's is rtn_error), how many layers chose no
smoothing, and the quantization time. The error is measured on the same calibration run that
the options use to build H, so it is an in-sample figure: sample quality decides.
Rows appended to benchmarks/results/layer_errors.jsonl.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.quality import METHODS, parse_setting
from benchmarks.rowlog import RowLog, card_of, provenance
from quant.calibrate import CalibrationRun, default_calibration_labels
from quant.config import QuantConfig
from quant.pipeline import quantize_dit
from runtime.checkpoints import load_model, resolve_spec

DEFAULT_METHODS = ["DiTAS", "DiTAS + compensated rounding", "DiTAS + weighted LoRA", "DiTAS + no-smoothing candidate",
                   "DiTAS + all three"]


def main(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    spec = resolve_spec(None, None, args.ckpt)
    log = RowLog(args.output, common=provenance(card_of(device)))
    weight_bits, act_bits = parse_setting(args.setting)
    run = CalibrationRun(default_calibration_labels(spec.num_classes), 1.5, args.num_sampling_steps, 0)
    for method in args.methods:
        config = QuantConfig(weight_bits=weight_bits, act_bits=act_bits, **METHODS[method])
        start = time.perf_counter()
        _, report = quantize_dit(load_model(spec, args.ckpt, device),
                                 config, run, device, progress=False)
        layers = report.layers
        log.add({"setting": config.label, "method": method, "steps": args.num_sampling_steps,
                 "mean_final_error": statistics.mean(layer.final_error for layer in layers),
                 "mean_rtn_error": statistics.mean(layer.rtn_error for layer in layers),
                 "layers_unsmoothed": sum(layer.chose_no_smoothing for layer in layers), "layers": len(layers),
                 "quant_s": time.perf_counter() - start, "stage_s": report.seconds})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="assets/demo/dit_fmnist.safetensors")
    parser.add_argument("--setting", default="W4A8")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--num-sampling-steps", type=int, default=10, help="steps of the calibration run")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "layer_errors.jsonl"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


if __name__ == "__main__":
    main(parse_args())
