"""Quantize a DiT with DiTAS (data-free W4A8 post-training quantization) and save a self-contained
quantized checkpoint directory.

    python QuantDiT.py --image-size 256 --seed 1 --model DiT-XL/2 --act-bit 8 --weight-bit 4 --num-sampling-steps 50
    python QuantDiT.py --ckpt assets/demo/dit_fmnist.safetensors --output results/demo-w4a8

Stages: a calibration run of the FP model (Gaussian noise, 16 fixed labels, cfg --cfg-scale)
collects each layer's per-channel input extremes over all timesteps (TAS); a second run scores
every smoothing strength α of --alpha-grid per layer on the layer's output error (grid search);
weights are smoothed, then quantized with the training-free LoRA (by default, --recipe best,
with error-compensated rounding and a LoRA fit to the layer's output; --recipe paper is the
published method); a third run measures each
layer's error before (plain round-to-nearest) and after; the factors are folded (qkv, fc1 into
adaLN; proj into the V rows of qkv; fc2 on the fly).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch

import config as defaults
from quant.calibrate import CalibrationRun, default_calibration_labels
from quant.checkpoint import save_quantized
from quant.config import (
    ACT_BITS_RANGE,
    ACT_FORMATS,
    ACT_GRANULARITIES,
    ADALN_WEIGHT_BITS,
    DEFAULT_RECIPE,
    LORA_WEIGHTINGS,
    RECIPES,
    ROUNDINGS,
    WEIGHT_BITS_RANGE,
    WEIGHT_GRANULARITIES,
    QuantConfig,
    default_alpha_grid,
    recipe_settings,
)
from quant.pipeline import quantize_dit
from quant.targets import get_module, quant_targets
from runtime.checkpoints import load_model_and_dtype
from runtime.cli import (
    ArgumentParser,
    add_model_arguments,
    create_logger,
    default_device,
    parse_device,
    positive_int,
    run_cli,
    spec_and_checkpoint,
)
from runtime.errors import UserError
from runtime.fileio import check_output_directory, recover_directory, sha256_of


def quant_config_from_args(args: argparse.Namespace) -> QuantConfig:
    try:
        return QuantConfig(
            weight_bits=args.weight_bit, act_bits=args.act_bit, weight_granularity=args.weight_granularity,
            weight_group_size=args.weight_group_size,
            act_dynamic=not args.static_act, act_format=args.act_format, smooth=not args.no_smooth,
            alpha_grid=tuple(args.alpha_grid),
            lora_rank=args.lora_rank, lora_iters=args.lora_iters, search_lora_iters=args.search_lora_iters,
            search_rows_per_step=args.search_rows_per_step, adaln_weight_bits=args.adaln_bit,
            **recipe_settings(args.recipe, rounding=args.rounding, lora_weighting=args.lora_weighting,
                              identity_candidate=args.identity_candidate, act_granularity=args.act_granularity),
        )
    except ValueError as error:
        raise UserError(f"{error}") from None


def check_group_size(model: torch.nn.Module, config: QuantConfig) -> None:
    """Per-group weights need every quantized layer's input width to be a multiple of the group."""
    if config.weight_granularity not in ("per_group", "two_level"):
        return
    for target in quant_targets(model):
        width = get_module(model, target.name).in_features
        if width % config.weight_group_size:
            raise UserError(f"--weight-group-size {config.weight_group_size} does not divide the {width} inputs of "
                            f"{target.name}; choose a divisor of every layer's width (e.g. 32, 64 or 128)")


def check_report_finite(report) -> None:
    """A non-finite layer error means the quantized model computes NaN or Inf: never save it."""
    for layer in report.layers:
        if not all(math.isfinite(e) for e in (layer.rtn_error, layer.final_error, *layer.lora_errors)):
            raise UserError(f"quantizing {layer.name} gave a non-finite output error; nothing was saved "
                            "(check the checkpoint and the flags)")


def format_summary(report) -> str:
    lines = [f"{'layer':<24} {'alpha':>5} {'RTN err':>9} {'DiTAS err':>9} {'LoRA ‖W−Q−LR‖ first→last':>26}"]
    for layer in report.layers:
        alpha = "-" if layer.alpha is None else f"{layer.alpha:.2f}"
        lora = f"{layer.lora_errors[0]:.3g} → {layer.lora_errors[-1]:.3g}" if layer.lora_errors else "-"
        lines.append(f"{layer.name:<24} {alpha:>5} {layer.rtn_error:>9.2e} {layer.final_error:>9.2e} {lora:>26}")
    better = sum(layer.final_error < layer.rtn_error for layer in report.layers)
    unsmoothed = sum(layer.chose_no_smoothing for layer in report.layers)
    if unsmoothed:
        lines.append(f"no smoothing (the identity candidate) chosen in {unsmoothed}/{len(report.layers)} layers")
    lines.append(f"DiTAS error below round-to-nearest in {better}/{len(report.layers)} layers "
                 "(relative squared output error over the calibration run)")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    logger = create_logger("QuantDiT")
    config = quant_config_from_args(args)
    device = parse_device(args.device)
    torch.manual_seed(args.seed)
    spec, ckpt = spec_and_checkpoint(args)
    output = Path(args.output or f"results/{Path(ckpt).stem}-{config.label}")
    check_output_directory(output)
    for line in recover_directory(output):
        logger.info(line)
    labels = tuple(args.calib_labels) if args.calib_labels else default_calibration_labels(spec.num_classes)
    if max(labels) >= spec.num_classes or min(labels) < 0:
        raise UserError(f"--calib-labels must lie in 0..{spec.num_classes - 1}")
    model, source_dtype = load_model_and_dtype(spec, ckpt, device)
    check_group_size(model, config)
    logger.info(f"quantizing {ckpt} to {config.label}: {config.to_dict()}")
    run = CalibrationRun(labels=labels, cfg_scale=args.cfg_scale, num_steps=args.num_sampling_steps, seed=args.seed)
    model, report = quantize_dit(model, config, run, device, logger=logger)

    logger.info("per-layer summary:\n" + format_summary(report))
    check_report_finite(report)
    extra = {
        "source_checkpoint": str(ckpt),
        "source_sha256": sha256_of(ckpt) if Path(ckpt).is_file() else None,
        "calibration": dataclasses.asdict(run),
        "alphas": {layer.name: layer.alpha for layer in report.layers},
        "report": report.to_dict(),
    }
    storage_dtype = source_dtype if args.storage_dtype == "source" else torch.float32
    save_quantized(output, model, config, spec, extra, storage_dtype=storage_dtype)
    logger.info(f"stage times (s): {json.dumps({k: round(v, 2) for k, v in report.seconds.items()})}"
                + (f", peak GPU memory {report.peak_gpu_bytes / 2**30:.2f} GiB" if report.peak_gpu_bytes else ""))
    logger.info(f"saved quantized checkpoint to {output}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration noise and of the randomized SVD")
    lo, hi = WEIGHT_BITS_RANGE
    parser.add_argument("--weight-bit", type=int, default=defaults.global_weight_bit,
                        help=f"weight bits, {lo}..{hi} (default from config.py: {defaults.global_weight_bit})")
    lo, hi = ACT_BITS_RANGE
    parser.add_argument("--act-bit", type=int, default=defaults.global_act_bit,
                        help=f"activation bits, {lo}..{hi} (default from config.py: {defaults.global_act_bit})")
    parser.add_argument("--num-sampling-steps", type=positive_int, default=50, help="steps of the calibration sampling run")
    parser.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale of the calibration run")
    parser.add_argument("--calib-labels", type=int, nargs="+", default=None,
                        help="class labels of the calibration run (default: the published 16 ImageNet labels, "
                             "or 16 labels cycling through the classes)")
    parser.add_argument("--alpha-grid", type=float, nargs="+", default=list(default_alpha_grid()),
                        help="smoothing strengths to search (default 0, 0.05, ..., 1)")
    parser.add_argument("--adaln-bit", type=int, choices=ADALN_WEIGHT_BITS, default=defaults.global_adaln_bit,
                        help="weight-only bits of each block's adaLN modulation layer, after folding (default from "
                             f"config.py: {defaults.global_adaln_bit}; none = floating point, as in the paper)")
    parser.add_argument("--lora-rank", type=int, default=QuantConfig.lora_rank, help="rank of the training-free LoRA (0: none)")
    parser.add_argument("--lora-iters", type=positive_int, default=QuantConfig.lora_iters, help="alternating quantize/low-rank iterations")
    parser.add_argument("--search-lora-iters", type=int, default=QuantConfig.search_lora_iters,
                        help="LoRA iterations used while scoring α (a cheaper stand-in for --lora-iters)")
    parser.add_argument("--search-rows-per-step", type=int, default=QuantConfig.search_rows_per_step,
                        help="token rows per timestep and layer used to score α (0: all)")
    parser.add_argument("--weight-granularity", choices=[g for g in WEIGHT_GRANULARITIES if g != "per_tensor"],
                        default=QuantConfig.weight_granularity,
                        help="one weight scale per output channel, per group of inputs, or two_level: a float scale per "
                             "row and an integer scale per group (int8-GEMM friendly, see README)")
    parser.add_argument("--weight-group-size", type=positive_int, default=QuantConfig.weight_group_size, help="inputs per group for per_group")
    parser.add_argument("--act-granularity", choices=ACT_GRANULARITIES, default=None,
                        help="one activation range per tensor (the paper) or per token (default: the recipe's)")
    parser.add_argument("--act-format", choices=ACT_FORMATS, default=QuantConfig.act_format,
                        help="activation codes: int (integers with a zero point, the paper; the triton backend) or "
                             "fp8_e4m3 (8-bit floats times a scale, symmetric; the fp8 backend's cuBLAS FP8 GEMMs, "
                             "with --act-bit 8 and weights of at most 4 bits per channel)")
    parser.add_argument("--static-act", action="store_true",
                        help="fix activation ranges from calibration instead of computing them per forward")
    parser.add_argument("--no-smooth", action="store_true", help="skip TAS smoothing (round-to-nearest baseline)")
    parser.add_argument("--recipe", choices=list(RECIPES), default=DEFAULT_RECIPE,
                        help="paper: the published DiTAS (round to nearest, plain LoRA, alpha grid only), code for code; "
                             f"best (default): {', '.join(f'{k}={v}' for k, v in RECIPES['best'].items())}, the best "
                             "measured on the demo (README, 'Beyond the paper'). --act-granularity and the three flags below "
                             "override it")
    parser.add_argument("--identity-candidate", action=argparse.BooleanOptionalAction, default=None,
                        help="also offer each layer no smoothing (s = 1) in the grid search (default: the recipe's)")
    parser.add_argument("--rounding", choices=ROUNDINGS, default=None,
                        help="final weight codes: round to nearest (the paper), or compensated: column by column, "
                             "each rounding error pushed onto the remaining columns through the calibration inputs' "
                             "H = sum x^T x (GPTQ-style, data-free); the grid search still rounds to nearest "
                             "(default: the recipe's)")
    parser.add_argument("--lora-weighting", choices=LORA_WEIGHTINGS, default=None,
                        help="what the LoRA minimises: plain ||W - Q - LR|| (the paper), or activation: the layer's "
                             "output error over the calibration inputs, ||(W - Q - LR) H^1/2|| (default: the recipe's)")
    parser.add_argument("--storage-dtype", choices=["source", "float32"], default="source",
                        help="dtype of the checkpoint's floating-point parts (LoRA factors, biases, unquantized "
                             "weights): the source checkpoint's (bf16 for the demo: 0.48x its size with --adaln-bit 8) "
                             "or float32 (the exact fake-backend numerics); weight scales stay float32")
    parser.add_argument("--output", type=str, default=None,
                        help="checkpoint directory to write (default results/<ckpt name>-W<b>A<b>)")
    parser.add_argument("--device", type=str, default=default_device(), help="cuda or cpu")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
