"""Folding smoothing factors into the layers that produce the smoothed activations.

For a block with modulation (shift, scale) = adaLN(c), the input of qkv (and of fc1) is
    u = LN(x) · (1 + scale) + shift.
Dividing it by s channel-wise is the same as using
    shift' = shift / s,   1 + scale' = (1 + scale) / s,
and since shift and scale are affine in SiLU(c) with adaLN rows (W, b):
    W_shift' = W_shift / s,  b_shift' = b_shift / s,  W_scale' = W_scale / s,  b_scale' = (b_scale + 1) / s − 1.
The input of proj is a per-head mix (attention probabilities) of the V rows of qkv, so dividing
V's output rows (weight scales, LoRA left rows, bias) by s divides proj's input by s exactly.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from models import Modulation

from .modules import QuantLinear

# Which modulation chunks produce each layer's input, by the names DiTBlock.modulation uses.
MODULATION_OF = {"qkv": ("shift_msa", "scale_msa"), "fc1": ("shift_mlp", "scale_mlp")}


@torch.no_grad()
def fold_into_modulation(adaln_linear: nn.Linear, role: str, factors: torch.Tensor) -> None:
    """Divide the input of `role` (qkv or fc1) by `factors` through the adaLN linear layer."""
    shift_name, scale_name = MODULATION_OF[role]
    hidden = factors.numel()
    s = factors.to(adaln_linear.weight)
    for name in (shift_name, scale_name):
        rows = slice(Modulation._fields.index(name) * hidden, (Modulation._fields.index(name) + 1) * hidden)
        adaln_linear.weight[rows] /= s[:, None]
        if name == scale_name:
            adaln_linear.bias[rows] = (adaln_linear.bias[rows] + 1) / s - 1
        else:
            adaln_linear.bias[rows] /= s


@torch.no_grad()
def fold_into_value_rows(qkv: QuantLinear, factors: torch.Tensor) -> None:
    """Divide the V output rows of a quantized qkv by `factors` (proj's smoothing), exactly:
    per-row weight scales, LoRA left rows and bias are divided; integer codes are unchanged."""
    hidden = factors.numel()
    v_rows = slice(2 * hidden, 3 * hidden)
    s = factors.to(qkv.weight_scale)
    qkv.weight_scale[v_rows] /= s[:, None]
    if qkv.lora_left is not None:
        qkv.lora_left[v_rows] /= s[:, None]
    if qkv.bias is not None:
        qkv.bias[v_rows] /= s
