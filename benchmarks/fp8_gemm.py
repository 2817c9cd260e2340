"""FP8 (e4m3) GEMMs on cuBLAS against bf16 and the int8 kernels, at DiT-XL/2's layer shapes: whether
issue 13's optional FP8 activation format is worth building.

    python -m benchmarks.fp8_gemm --batches 1 8 64

The FP8 layer it prices: W4 codes minus their zero point (integers in −15..15, exact in e4m3) as the
weight, each activation row scaled to e4m3's range (amax / 448), and `torch._scaled_mm` with one
scale per row and per column (rowwise), bf16 out. For each batch (M = 2 × batch × 256 rows) and
layer it times, replayed from CUDA graphs: cuBLAS bf16 (`F.linear`), the FP8 GEMM with and without
fast accumulation, and the int8 GEMM that the `triton` backend runs (its epilogue included: zero
points, LoRA, bias; from 256 rows also the W4 unpack before it), each with the same bias. It also reports the FP8 GEMM's relative difference from
the same product in float32 (the activation rounded to e4m3 and the integer weight), and whether the
weight survived e4m3 exactly. Rows are appended, as measured, to --output (benchmarks/results/gemm.jsonl).
The LoRA branch and the activation quantization lie outside these GEMMs: the whole `fp8` layer is
timed in the model by `speed.py` (row w4a8-fp8-token-compile), its demo quality by `quality.py`.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.hopper_gemm import graphed_ms
from benchmarks.rowlog import RowLog, card_of, provenance
from benchmarks.synthetic import HIDDEN, TOKENS, layer_shapes, outlier_input, quantized_layer_pair

E4M3_MAX = 448.0


def rowwise_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) as e4m3 codes and their (M, 1) float32 scales: each row's amax maps to 448."""
    scale = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def signed_weight_codes(layer) -> torch.Tensor:
    """A TritonQuantLinear's W4 codes minus their zero point, (N, K) float32 integers in −15..15."""
    from quant.kernels import unpack_signed

    codes = unpack_signed(layer.weight, layer.in_features) if layer.packed else layer.weight
    return codes.float() - layer.weight_zero.float()[:, None]


@torch.no_grad()
def measure(batch: int, log: RowLog, device) -> None:
    from quant.kernels import int8_gemm, quantize_rows

    m = 2 * batch * TOKENS
    for role, (k, n) in layer_shapes(HIDDEN["DiT-XL/2"]).items():
        flops = 2 * m * n * k
        x = outlier_input(m, k, device, torch.bfloat16, seed=k)
        _, layer = quantized_layer_pair(k, n, 4, False, device, act_granularity="per_token")
        weight = signed_weight_codes(layer)
        weight_e4m3 = weight.to(torch.float8_e4m3fn)
        bias = layer.bias.to(torch.bfloat16)
        a, scale_a = rowwise_e4m3(x)
        scale_b = layer.weight_scale.float()[None, :]
        fp8 = functools.partial(torch._scaled_mm, a, weight_e4m3.t(), scale_a, scale_b, bias=bias,
                                out_dtype=torch.bfloat16)
        reference = (a.float() @ weight.t()) * scale_a * scale_b + bias.float()
        bf16_weight = (weight * layer.weight_scale.float()[:, None]).to(torch.bfloat16)
        qparams = layer.qparams(x)
        codes, rowsum, down = quantize_rows(x, qparams, 8, None, layer.split_right)
        int8 = functools.partial(int8_gemm, codes, rowsum, qparams, layer.weight, layer.packed, layer.column_sums,
                                 layer.weight_zero, layer.weight_scale, layer.bias, down, layer.lora_left,
                                 torch.bfloat16, layer.use_tma)
        got = fp8()
        log.add({"kernel": "FP8 e4m3 rowwise (cuBLAS) vs bf16 and int8", "layer": role, "M": m, "K": k, "N": n,
                 "weight_exact_in_e4m3": torch.equal(weight_e4m3.float(), weight),
                 "fp8_relative_difference": ((got.float() - reference).norm() / reference.norm()).item(),
                 "bf16_cublas_TFLOPs": flops / graphed_ms(functools.partial(F.linear, x, bf16_weight, bias)) / 1e9,
                 "fp8_cublas_TFLOPs": flops / graphed_ms(fp8) / 1e9,
                 "fp8_cublas_fast_accum_TFLOPs": flops / graphed_ms(functools.partial(fp8, use_fast_accum=True)) / 1e9,
                 "int8_kernel_TOPS": flops / graphed_ms(int8) / 1e9})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64],
                        help="images per batch; the GEMMs have 2 × batch × 256 rows")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "gemm.jsonl"),
                        help="JSON lines file every row is appended to as it is measured")
    args = parser.parse_args()
    device = torch.device("cuda")
    log = RowLog(args.output, common=provenance(card_of(device)))
    for batch in args.batches:
        measure(batch, log, device)


if __name__ == "__main__":
    main()
