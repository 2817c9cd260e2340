"""The `fp8` backend's layer: a QuantLinear with FP8 e4m3 activations (QuantConfig.act_format)
computed by one scaled FP8 GEMM, `torch._scaled_mm` (cuBLAS on CUDA; torch has it on the CPU too),
with a scale per activation row and per weight row (row_scaled_fp8_gemm).

The weight operand is the integer codes minus their zero points. For weights of at most 4 bits
these lie in −15..15, exact e4m3 values, so the GEMM computes exactly what the fake backend's
numerics do up to the order of the sums and the bf16 output; wider codes are not exact in e4m3, and
per-group scales have no place in a per-row scaled GEMM: those layers keep the fake backend. The
codes are stored unpacked, one byte per weight (twice a 4-bit checkpoint's codes), because
unpacking on every call would cost a pass over the weights per layer at batch 1.
"""

from __future__ import annotations

import torch

from .modules import KeepsDtypes, QuantLinear
from .primitives import fp8_activation_scale, row_first_range, to_fp8_e4m3, unpack_int4

MAX_FP8_WEIGHT_BITS = 4  # codes minus zero points within ±15: exact in e4m3 (integers to 16 are)
OUTPUT_DTYPE = torch.bfloat16  # cuBLAS's row-scaled FP8 GEMM writes bf16


def fp8_unsupported_reason(layer: QuantLinear) -> str | None:
    """Why the FP8 GEMM cannot run `layer` (None: it can)."""
    if layer.act_format != "fp8_e4m3":
        return f"{layer.act_format} activations"
    if layer.weight_bits > MAX_FP8_WEIGHT_BITS:
        return f"{layer.weight_bits}-bit weights (codes not exact in e4m3)"
    if layer.group_size != layer.in_features:
        return "per-group weight scales"
    return None


def row_scaled_fp8_gemm(a: torch.Tensor, b: torch.Tensor, row_scales: torch.Tensor,
                        column_scales: torch.Tensor) -> torch.Tensor:
    """(a @ b) · row_scales · column_scales in OUTPUT_DTYPE for e4m3 a (M, K), b (K, N) and float32
    scales (M, 1), (1, N): one cuBLAS call with the scales in its epilogue on CUDA. On the CPU the
    same FP8 GEMM runs with unit scales into float32 and the scales follow, because torch's CPU
    _scaled_mm takes row scales only from 2.13 on (2.11, environment.yml's pin, has one per tensor)."""
    if a.device.type == "cuda":
        return torch._scaled_mm(a, b, scale_a=row_scales, scale_b=column_scales, out_dtype=OUTPUT_DTYPE)
    unit = torch.ones((), device=a.device)
    products = torch._scaled_mm(a, b, scale_a=unit, scale_b=unit, out_dtype=torch.float32)
    return (products * row_scales * column_scales).to(OUTPUT_DTYPE)


class Fp8QuantLinear(KeepsDtypes):
    """The same function as an FP8-activation QuantLinear on torch._scaled_mm. Holds the weight as
    e4m3 (codes − zero), its per-row scales, and the rest in float32 (LoRA factors in bf16)."""

    def __init__(self, source: QuantLinear):
        super().__init__()
        reason = fp8_unsupported_reason(source)
        if reason:
            raise ValueError(f"the FP8 GEMM cannot run a layer with {reason}")
        self.in_features, self.out_features = source.in_features, source.out_features
        self.weight_bits, self.act_granularity = source.weight_bits, source.act_granularity
        codes = unpack_int4(source.weight_codes) if source.packed else source.weight_codes
        signed = codes.to(torch.int16) - source.weight_zero.to(torch.int16)
        self.register_buffer("weight", signed.to(torch.float8_e4m3fn).contiguous())  # (out, in), exact
        self.register_buffer("weight_scale", source.weight_scale.reshape(1, -1).float().contiguous())
        self.register_buffer("bias", None if source.bias is None else source.bias.float())
        self.register_buffer("smooth_inv", None if source.smooth_inv is None else source.smooth_inv.float())
        self.register_buffer("act_range", None if source.act_range is None else source.act_range.float())
        lora = source.lora_left is not None
        self.register_buffer("lora_left", source.lora_left.to(OUTPUT_DTYPE) if lora else None)
        self.register_buffer("lora_right", source.lora_right.to(OUTPUT_DTYPE) if lora else None)

    def activation_scales(self, x2d: torch.Tensor) -> torch.Tensor:
        """One float32 scale per row of the (smoothed) input, (rows, 1): its own range per token,
        or the tensor's (dynamic or calibrated) repeated, since the row-scaled GEMM takes a column."""
        lo, hi = self.act_range if self.act_range is not None else row_first_range(x2d, self.act_granularity)
        return fp8_activation_scale(lo, hi).expand(x2d.shape[0], 1).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features).float()
        if self.smooth_inv is not None:
            x2d = x2d * self.smooth_inv
        scales = self.activation_scales(x2d)
        codes = to_fp8_e4m3(x2d / scales)
        y = row_scaled_fp8_gemm(codes, self.weight.t(), scales, self.weight_scale)
        if self.lora_left is not None:  # from the quantized activation, as the reference numerics
            dequantized = (codes.float() * scales).to(OUTPUT_DTYPE)
            y = y + (dequantized @ self.lora_right.t()) @ self.lora_left.t()
        if self.bias is not None:
            y = y + self.bias.to(OUTPUT_DTYPE)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        rank = 0 if self.lora_left is None else self.lora_left.shape[1]
        return (f"in={self.in_features}, out={self.out_features}, W{self.weight_bits}A8 fp8_e4m3 scaled GEMM, "
                f"act={self.act_granularity}/{'dynamic' if self.act_range is None else 'static'}, "
                f"lora_rank={rank}, smooth_on_the_fly={self.smooth_inv is not None}")
