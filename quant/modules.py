"""The quantized linear layer used at inference: integer weight codes, scales, zero points and
LoRA factors as buffers, and one forward. Runtime code only: it never imports the algorithms."""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import QuantConfig
from .primitives import QuantizedLayer, QuantizedWeight, dequantize_codes, quantize_weight, quantized_linear

PACKED_BITS = 4  # codes of at most this many bits are stored two per byte


class KeepsDtypes(nn.Module):
    """A backend's layer whose buffers keep their dtypes when the model is cast (model.to(bfloat16)
    must not round the float32 scales); moving between devices still applies."""

    def _apply(self, fn, recurse=True):
        def same_dtype(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)

        return super()._apply(same_dtype, recurse)


class QuantLinear(nn.Module):
    """y = Q_a(x ⊙ smooth_inv) · (Ŵ + L·R)ᵀ + b with Ŵ = scale · (codes − zero).

    Buffers: `weight_codes` (uint8; two 4-bit codes per byte, low nibble first, when bits ≤ 4),
    `weight_scale` and `weight_zero` per (row, group) (two-level groups: `weight_scale` per row and
    integer `weight_group_scale` per group), `bias`, `lora_left`/`lora_right` (rank > 0),
    `smooth_inv` (layers smoothed on the fly: fc2), `act_range` (static activation ranges).
    """

    def __init__(self, in_features: int, out_features: int, config: QuantConfig, *, has_smooth: bool,
                 has_bias: bool = True, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_bits = config.weight_bits
        self.act_bits = config.act_bits
        self.act_granularity = config.act_granularity
        self.act_format = config.act_format
        self.packed = config.weight_bits <= PACKED_BITS
        two_level = config.weight_granularity == "two_level"
        if config.weight_granularity in ("per_group", "two_level"):
            if in_features % config.weight_group_size:
                raise ValueError(f"in_features {in_features} is not a multiple of group size {config.weight_group_size}")
            groups, self.group_size = in_features // config.weight_group_size, config.weight_group_size
        else:
            groups, self.group_size = 1, in_features
        code_columns = in_features // 2 if self.packed else in_features
        factory = dict(device=device)
        self.register_buffer("weight_codes", torch.empty(out_features, code_columns, dtype=torch.uint8, **factory))
        self.register_buffer("weight_scale", torch.empty(out_features, 1 if two_level else groups, dtype=torch.float32,
                                                         **factory))
        self.register_buffer("weight_zero", torch.empty(out_features, groups, dtype=torch.uint8, **factory))
        self.register_buffer("weight_group_scale", torch.empty(out_features, groups, dtype=torch.uint8, **factory)
                             if two_level else None)
        self.register_buffer("bias", torch.empty(out_features, **factory) if has_bias else None)
        rank = config.lora_rank
        self.register_buffer("lora_left", torch.empty(out_features, rank, **factory) if rank else None)
        self.register_buffer("lora_right", torch.empty(rank, in_features, **factory) if rank else None)
        self.register_buffer("smooth_inv", torch.empty(in_features, **factory) if has_smooth else None)
        self.register_buffer("act_range", None if config.act_dynamic else torch.empty(2, **factory))

    @classmethod
    def from_layer(cls, layer: QuantizedLayer, config: QuantConfig) -> QuantLinear:
        out_features, in_features = layer.weight.unpacked_codes().shape
        module = cls(in_features, out_features, config, has_smooth=layer.smooth_inv is not None,
                     has_bias=layer.bias is not None, device=layer.weight.codes.device)
        weight = layer.weight.pack() if module.packed else layer.weight
        module.weight_codes.copy_(weight.codes)
        module.weight_scale.copy_(layer.weight.scale.reshape(out_features, -1))
        module.weight_zero.copy_(layer.weight.zero.reshape(out_features, -1))
        if module.weight_group_scale is not None:
            module.weight_group_scale.copy_(layer.weight.group_scale)
        for name in ("bias", "lora_left", "lora_right", "smooth_inv"):
            value = getattr(layer, name)
            if value is not None:
                getattr(module, name).copy_(value)
        if layer.static_range is not None:
            module.act_range.copy_(torch.stack([t.reshape(()) for t in layer.static_range]))
        return module

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.weight_codes, self.weight_scale, self.weight_zero, self.weight_bits,
                               self.group_size, self.packed, self.weight_group_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # QuantizedLayer.__call__'s arithmetic on the buffers directly, in float32; building the
        # frozen dataclasses here would make torch.compile (dynamo) trace their hashing
        def f32(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.float()

        weight = dequantize_codes(self.weight_codes, self.weight_scale, self.weight_zero, self.packed,
                                  group_scale=self.weight_group_scale)
        static = None if self.act_range is None else (self.act_range[0].float(), self.act_range[1].float())
        return quantized_linear(x.float(), weight, f32(self.bias), self.act_bits, self.act_granularity,
                                f32(self.smooth_inv), f32(self.lora_left), f32(self.lora_right), static,
                                act_format=self.act_format).to(x.dtype)

    def extra_repr(self) -> str:
        rank = 0 if self.lora_left is None else self.lora_left.shape[1]
        activations = f"A{self.act_bits}" if self.act_format == "int" else f"A{self.act_bits} {self.act_format}"
        return (f"in={self.in_features}, out={self.out_features}, W{self.weight_bits}{activations}, "
                f"group={self.group_size}, act={self.act_granularity}/{'dynamic' if self.act_range is None else 'static'}, "
                f"lora_rank={rank}, smooth_on_the_fly={self.smooth_inv is not None}")


class WeightOnlyLinear(nn.Module):
    """y = x · Ŵᵀ + b with Ŵ = scale · (codes − zero): integer weights, floating-point activations.

    Used for the adaLN modulation layers (QuantConfig.adaln_weight_bits): their input is the
    per-sample conditioning (one row per image, not per token), so quantizing it saves memory
    and bandwidth but no integer-GEMM time. Buffers as in QuantLinear, unpacked.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.register_buffer("weight_codes", torch.empty(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=torch.float32, device=device))
        self.register_buffer("weight_zero", torch.empty(out_features, 1, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> WeightOnlyLinear:
        """Symmetric per-output-channel round-to-nearest of `linear`'s weight."""
        weight = quantize_weight(linear.weight.detach(), bits, "per_channel", symmetric=True)
        module = cls(linear.in_features, linear.out_features, bits, device=linear.weight.device)
        module.weight_codes.copy_(weight.codes)
        module.weight_scale.copy_(weight.scale)
        module.weight_zero.copy_(weight.zero)
        module.bias.copy_(linear.bias.detach())
        return module

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        # dequantized in float32, then rounded once to the compute dtype
        return dequantize_codes(self.weight_codes, self.weight_scale.float(), self.weight_zero, False).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, W{self.bits} weight-only"
