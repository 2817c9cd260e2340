"""Inference speed, memory and model size of DiT-XL/2: floating point against the quantized backends.

    python benchmarks/speed.py                      # check the kernels, GEMM microbenchmark, sampling rows
    python benchmarks/speed.py --parts check        # only the kernel-vs-fake correctness check

Parts (--parts):
- check: every kernel against the `fake` backend on the same quantized layer (relative error, fresh
  random inputs with channel outliers, float32 and bf16 inputs), at all DiT-XL/2 and demo shapes.
- gemm: the quantized layers' GEMMs at DiT-XL/2 shapes (M = batch × 2 (CFG) × 256 tokens) in
  TFLOP/s (2·M·N·K per second) against bf16 cuBLAS and cuBLAS's plain int8 GEMM (torch._int_mm):
  the int8 GEMM with its epilogue alone, and the whole layer (range reduction, quantize pass, GEMM).
- sample: 50-step sampling with CFG (batch --batch, so 2 × batch rows), random weights, no VAE:
  ms per step, images per second, peak GPU memory and model bytes for each --rows entry.
  Each row is warmed up (compilation, autotuning) with a few forward calls before the timed run.

Quantized rows use a synthetic quantized model: random N(0, 0.02²) weights quantized by
round-to-nearest with a rank-32 LoRA of one iteration and random fc2 smoothing factors — the
same tensors and kernels as a DiTAS checkpoint, whose values do not change the speed.
Prints JSON lines (also appended to --output) and markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.quantize_speed import random_dit  # noqa: E402
from checkpoints import spec_from_name  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from quant.backends import TritonQuantLinear, prepare_for_inference, register_kernel_op  # noqa: E402
from quant.config import QuantConfig  # noqa: E402
from quant.layers import quantize_layer  # noqa: E402
from quant.modules import QuantLinear  # noqa: E402
from quant.pipeline import install  # noqa: E402
from quant.targets import get_module, quant_targets  # noqa: E402

# name: (weight bits or None for floating point, backend, float dtype, compiled)
ROWS = {
    "fp32": (None, None, torch.float32, False),
    "bf16": (None, None, torch.bfloat16, False),
    "bf16-compile": (None, None, torch.bfloat16, True),
    "fake-w4a8-compile": (4, "fake", torch.bfloat16, True),
    "w8a8": (8, "triton", torch.bfloat16, False),
    "w8a8-compile": (8, "triton", torch.bfloat16, True),
    "w4a8": (4, "triton", torch.bfloat16, False),
    "w4a8-compile": (4, "triton", torch.bfloat16, True),
}
HIDDEN = {"DiT-XL/2": 1152, "demo": 256}
TOKENS = 256  # DiT-XL/2 at 256² (32² latents, patch 2)


def layer_shapes(hidden: int) -> dict[str, tuple[int, int]]:
    """(in, out) of the four quantized layers of a block."""
    return {"qkv": (hidden, 3 * hidden), "proj": (hidden, hidden), "fc1": (hidden, 4 * hidden),
            "fc2": (4 * hidden, hidden)}


def random_quantized_layer(linear: torch.nn.Linear, config: QuantConfig, on_the_fly: bool,
                           generator: torch.Generator):
    """(layer, factors): `linear` quantized by round-to-nearest with a one-iteration LoRA; with
    `on_the_fly`, smoothed by random factors kept in the layer (fc2's kind), else unsmoothed (None)."""
    factors = torch.rand(linear.in_features, generator=generator) * 2 + 0.5 if on_the_fly else None
    used = torch.ones(linear.in_features) if factors is None else factors
    device = linear.weight.device
    layer = quantize_layer(linear, used.to(device).unsqueeze(0), config, 1, generator=generator)[0].select(0)
    if factors is None:
        return dataclasses.replace(layer, smooth_inv=None), None
    return layer, factors.to(device)


def quantized_layer_pair(in_features: int, out_features: int, weight_bits: int, on_the_fly: bool, device,
                         seed: int = 0) -> tuple[QuantLinear, TritonQuantLinear]:
    """One random layer quantized (rank-32 LoRA, optional on-the-fly smoothing) as fake and kernel modules."""
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features).to(device)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) * 0.02)
    config = QuantConfig(weight_bits=weight_bits, act_bits=8)
    fake = QuantLinear.from_layer(random_quantized_layer(linear, config, on_the_fly, generator)[0], config)
    return fake, TritonQuantLinear(fake)


def outlier_input(rows: int, features: int, device, dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    spread = 1 + 20 * (torch.rand(features, generator=generator) > 0.98)  # a few outlier channels
    x = torch.randn(rows, features, generator=generator) * spread + 0.1
    return x.to(device=device, dtype=dtype)


@torch.no_grad()
def check_kernels(device, emit) -> bool:
    torch.backends.cuda.matmul.allow_tf32 = False  # the fake reference in true float32
    ok = True
    for model_name, hidden in HIDDEN.items():
        for role, (k, n) in layer_shapes(hidden).items():
            for bits in (8, 4, 3):
                fake, kernel = quantized_layer_pair(k, n, bits, role == "fc2", device)
                for dtype, tolerance in ((torch.float32, 2e-3), (torch.bfloat16, 8e-3)):
                    x = outlier_input(4000, k, device, dtype, seed=bits * 7 + k)
                    reference = fake(x.float()).float()
                    error = ((kernel(x).float() - reference).norm() / reference.norm()).item()
                    passed = error < tolerance
                    ok &= passed
                    emit({"part": "check", "model": model_name, "layer": role, "shape": [4000, k, n],
                          "weight_bits": bits, "input": str(dtype).removeprefix("torch."),
                          "relative_error": error, "tolerance": tolerance, "passed": passed})
    return ok


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100)


@torch.no_grad()
def gemm_microbenchmark(device, batch: int, emit) -> None:
    from quant.kernels import int8_gemm, quantize_rows

    m = 2 * batch * TOKENS
    for role, (k, n) in layer_shapes(HIDDEN["DiT-XL/2"]).items():
        flops = 2 * m * n * k
        x = outlier_input(m, k, device, torch.bfloat16, seed=k)
        weight = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        row = {"part": "gemm", "layer": role, "M": m, "K": k, "N": n,
               "bf16_cublas_TFLOPs": flops / bench_ms(functools.partial(torch.nn.functional.linear, x, weight)) / 1e9}
        # cuBLAS's int8 GEMM (no epilogue): the int8 ceiling of this card at this shape
        a8 = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
        b8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device)
        try:
            row["int8_cublas_TFLOPs"] = flops / bench_ms(functools.partial(torch._int_mm, a8, b8.t())) / 1e9
        except RuntimeError as error:  # a private op: its layout rules change between releases
            row["int8_cublas_TFLOPs"], row["int8_cublas_error"] = float("nan"), str(error).splitlines()[0]
        for bits in (8, 4):
            _, kernel = quantized_layer_pair(k, n, bits, role == "fc2", device)
            qparams = kernel.qparams(x)
            codes, rowsum, down = quantize_rows(x, qparams, 8, kernel.smooth_inv, kernel.lora_right)
            gemm = functools.partial(int8_gemm, codes, rowsum, qparams, kernel.weight, kernel.packed,
                                     kernel.column_sums, kernel.weight_zero, kernel.weight_scale, kernel.bias, down,
                                     kernel.lora_left, torch.bfloat16)
            row[f"w{bits}a8_gemm_TFLOPs"] = flops / bench_ms(gemm) / 1e9
            row[f"w{bits}a8_layer_TFLOPs"] = flops / bench_ms(functools.partial(kernel, x)) / 1e9
        emit(row)


def synthetic_quantized_dit(name: str, image_size: int, device, weight_bits: int, adaln_bits: int | None):
    model = random_dit(name, image_size, device)
    config = QuantConfig(weight_bits=weight_bits, act_bits=8, adaln_weight_bits=adaln_bits)
    generator = torch.Generator().manual_seed(0)
    targets = quant_targets(model)
    layers, factors = {}, {}
    for target in targets:
        layers[target.name], factors[target.name] = random_quantized_layer(
            get_module(model, target.name), config, target.role == "fc2", generator)
    install(model, targets, layers, factors, config)
    return model


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def build_row(name: str, args, device) -> torch.nn.Module:
    weight_bits, backend, dtype, compiled = ROWS[name]
    if weight_bits is None:
        model = random_dit(args.model, args.image_size, device).to(dtype)
    else:
        model = synthetic_quantized_dit(args.model, args.image_size, device, weight_bits, args.adaln_bit)
        prepare_for_inference(model, backend, dtype)
    if compiled:  # regional compilation: one compiled block serves all 28
        for block in model.blocks:
            block.compile()
        model.final_layer.compile()
    return model


@torch.no_grad()
def time_sampling(model, dtype, args, device) -> dict:
    steps, batch = args.num_sampling_steps, args.batch
    diffusion = create_diffusion(str(steps))
    generator = torch.Generator(device=device).manual_seed(0)
    spec = spec_from_name(args.model, image_size=args.image_size)
    latent = (spec.in_channels, spec.input_size, spec.input_size)
    labels = torch.randint(0, 1000, (batch,), device=device, generator=generator)
    kwargs = dict(y=torch.cat([labels, torch.full_like(labels, 1000)]), cfg_scale=1.5)

    def forward(x, t, **kw):
        return model.forward_with_cfg(x.to(dtype), t, **kw).float()

    z = torch.randn(batch, *latent, device=device, generator=generator)
    z = torch.cat([z, z])
    for step in range(3):  # warm-up: compilation and autotuning
        forward(z, torch.full((2 * batch,), 999 - step, device=device), **kwargs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    diffusion.p_sample_loop(forward, z.shape, z, clip_denoised=False, model_kwargs=kwargs, device=device)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"ms_per_step": 1000 * seconds / steps, "images_per_s": batch / seconds,
            "peak_GiB": torch.cuda.max_memory_allocated() / 2**30}


def main(args: argparse.Namespace) -> None:
    device = torch.device("cuda")
    register_kernel_op()
    output = Path(args.output) if args.output else None
    card = torch.cuda.get_device_name()
    rows: list[dict] = []

    def emit(row: dict) -> None:
        row = {"card": card, **row}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if output:
            with output.open("a") as stream:
                stream.write(json.dumps(row) + "\n")

    if "check" in args.parts:
        passed = check_kernels(device, emit)
        print(f"kernel check: {'all passed' if passed else 'FAILED'}", flush=True)
    if "gemm" in args.parts:
        gemm_microbenchmark(device, args.batch, emit)
    if "sample" in args.parts:
        torch.backends.cuda.matmul.allow_tf32 = True  # the published sampler's setting (fp32 row)
        for name in args.rows:
            start = time.perf_counter()
            model = build_row(name, args, device)
            result = time_sampling(model, ROWS[name][2], args, device)
            emit({"part": "sample", "row": name, "model": args.model, "batch": args.batch,
                  "steps": args.num_sampling_steps, "adaln_bit": args.adaln_bit if ROWS[name][0] else None,
                  **result, "model_MB": model_bytes(model) / 1e6, "wall_s": time.perf_counter() - start})
            del model
            torch.cuda.empty_cache()
    print_tables(rows)


def print_tables(rows: list[dict]) -> None:
    sample = [r for r in rows if r["part"] == "sample"]
    if sample:
        base = next((r for r in sample if r["row"] == "bf16-compile"), None)
        print("\n| row | ms / step | images / s | vs bf16 compile | peak GPU memory (GiB) | model bytes (MB) |")
        print("|---|---|---|---|---|---|")
        for r in sample:
            ratio = f"{r['images_per_s'] / base['images_per_s']:.2f}×" if base else "-"
            print(f"| {r['row']} | {r['ms_per_step']:.1f} | {r['images_per_s']:.2f} | {ratio} | {r['peak_GiB']:.2f} "
                  f"| {r['model_MB']:.0f} |")
    gemm = [r for r in rows if r["part"] == "gemm"]
    if gemm:
        print("\n| layer | M×K×N | bf16 cuBLAS | int8 cuBLAS | W8A8 GEMM | W8A8 layer | W4A8 GEMM | W4A8 layer |  (TFLOP/s)")
        print("|---|---|---|---|---|---|---|---|")
        for r in gemm:
            print(f"| {r['layer']} | {r['M']}×{r['K']}×{r['N']} | {r['bf16_cublas_TFLOPs']:.0f} | "
                  f"{r['int8_cublas_TFLOPs']:.0f} | "
                  f"{r['w8a8_gemm_TFLOPs']:.0f} | {r['w8a8_layer_TFLOPs']:.0f} | {r['w4a8_gemm_TFLOPs']:.0f} | "
                  f"{r['w4a8_layer_TFLOPs']:.0f} |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["check", "gemm", "sample"], choices=["check", "gemm", "sample"])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="images per batch (2× rows with CFG)")
    parser.add_argument("--num-sampling-steps", type=int, default=50)
    parser.add_argument("--adaln-bit", type=int, default=8, choices=[8, 0],
                        help="weight-only bits of the adaLN layers in the quantized rows (0: bf16)")
    parser.add_argument("--output", default=None, help="JSON lines file the rows are appended to")
    args = parser.parse_args()
    args.adaln_bit = args.adaln_bit or None
    return args


if __name__ == "__main__":
    main(parse_args())
