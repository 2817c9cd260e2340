"""Building the quantized form of one layer for given smoothing factors (one or a batch of
candidates): smooth the weight first, then quantize it with the low-rank correction, so every
quantized weight is a true b-bit integer tensor times its scales."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn

from .calibrate import ChannelStats
from .compensate import compensated_codes, damped_cholesky, factor_and_inverse, inverse_cholesky
from .config import QuantConfig
from .lowrank import quantize_with_low_rank
from .primitives import QuantizedLayer, QuantizedWeight, quantize_weight
from .smooth import static_activation_range


def quantize_layer(
    linear: nn.Linear,
    factors: torch.Tensor,
    config: QuantConfig,
    lora_iters: int,
    stats: ChannelStats | None = None,
    generator: torch.Generator | None = None,
) -> tuple[QuantizedLayer, tuple[float, ...]]:
    """The layer with input divided by `factors` (shape (in,) or (candidates, in); ones: no
    smoothing) and weight columns multiplied by them, quantized with `lora_iters` alternating
    LoRA iterations (0: no LoRA). Returns the layer and its LoRA error history."""
    weight = linear.weight.detach().float() * factors.unsqueeze(-2)
    quantize = functools.partial(quantize_weight, bits=config.weight_bits, granularity=config.weight_granularity,
                                 group_size=config.weight_group_size, symmetric=config.weight_symmetric)
    h_factors = None
    if needs_input_gram(config):
        if stats is None or stats.gram is None:
            raise ValueError(f"{config.rounding} rounding and {config.lora_weighting} LoRA need the inputs' H")
        # factored once for both parts that read H
        h_factors = [damped_cholesky(g, config.hessian_damping)
                     for g in smoothed_grams(stats.gram.to(weight.device), factors)]
    quantize = ROUNDERS[config.rounding].build(quantize, h_factors, config)
    weighting = LORA_METRICS[config.lora_weighting].build(h_factors, config)
    rank = config.lora_rank if lora_iters > 0 else 0
    fitted = quantize_with_low_rank(weight, quantize, rank, max(lora_iters, 1), config.low_rank_method, generator,
                                    weighting)

    static_range = None
    if not config.act_dynamic:
        if stats is None:
            raise ValueError("static activation ranges need calibration statistics")
        static_range = static_activation_range(stats.min, stats.max, factors)
    bias = None if linear.bias is None else linear.bias.detach().float()
    layer = QuantizedLayer(
        weight=fitted.weight,
        bias=bias,
        act_bits=config.act_bits,
        act_granularity=config.act_granularity,
        act_format=config.act_format,
        smooth_inv=1.0 / factors,
        lora_left=fitted.left,
        lora_right=fitted.right,
        static_range=static_range,
    )
    return layer, fitted.errors


# The method's parts chosen by QuantConfig, by name (the names QuantConfig validates: ROUNDINGS,
# LORA_WEIGHTINGS). A rounder turns round-to-nearest (a function of a (candidates, out, in) weight)
# into the rounding used; a LoRA metric gives the (C, C⁻¹) pair (C·Cᵀ = H) the low-rank fit is weighted
# by, or None for the plain ‖W − Q − L·R‖. `h_factors` holds, for each candidate, the damped_cholesky
# factor of H of its smoothed inputs, or is None; a part that reads it says so, and the calibration
# run then accumulates H for every layer.


class Part(NamedTuple):
    build: Callable
    needs_gram: bool


def _round_to_nearest(nearest, h_factors, config: QuantConfig):
    return nearest


def _compensated_rounding(nearest, h_factors, config: QuantConfig):
    uppers = [inverse_cholesky(c) for c in h_factors]  # once, not per LoRA iteration
    return functools.partial(compensate_each, uppers=uppers, rounder=nearest, symmetric=config.weight_symmetric)


def _plain_metric(h_factors, config: QuantConfig):
    return None


def _activation_metric(h_factors, config: QuantConfig):
    factors = [factor_and_inverse(c) for c in h_factors]
    return torch.stack([c for c, _ in factors]), torch.stack([i for _, i in factors])


ROUNDERS = {"nearest": Part(_round_to_nearest, needs_gram=False),
            "compensated": Part(_compensated_rounding, needs_gram=True)}
LORA_METRICS = {"plain": Part(_plain_metric, needs_gram=False), "activation": Part(_activation_metric, needs_gram=True)}


def needs_input_gram(config: QuantConfig) -> bool:
    """Whether the calibration run must accumulate each layer's H = Σ xᵀx for the chosen parts."""
    return ROUNDERS[config.rounding].needs_gram or LORA_METRICS[config.lora_weighting].needs_gram


def smoothed_grams(gram: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """H of the smoothed inputs x / s for each candidate: H / (s sᵀ), shape (candidates, in, in)."""
    factors = factors.reshape(-1, factors.shape[-1]).to(gram)
    return gram / (factors.unsqueeze(-1) * factors.unsqueeze(-2))


def compensate_each(weights: torch.Tensor, uppers: list[torch.Tensor], rounder, symmetric: bool) -> QuantizedWeight:
    """Error-compensated codes of each candidate (candidates, out, in) on its round-to-nearest grid,
    with each candidate's inverse_cholesky factor."""
    parts = [compensated_codes(w, u, rounder(w), symmetric) for w, u in zip(weights, uppers)]
    first = parts[0]
    return dataclasses.replace(
        first, codes=torch.stack([q.codes for q in parts]), scale=torch.stack([q.scale for q in parts]),
        zero=torch.stack([q.zero for q in parts]),
        group_scale=None if first.group_scale is None else torch.stack([q.group_scale for q in parts]))
