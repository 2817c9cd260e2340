"""Temporal-aggregated smoothing factors and the layer-wise α grid search."""

from __future__ import annotations

import torch

SMOOTH_FLOOR = 1e-4  # keeps factors (and channel maxima) away from 0, as the published code does


def weight_channel_absmax(weight: torch.Tensor) -> torch.Tensor:
    """max_o |W[o, c]| per input channel c of an (out, in) weight."""
    return weight.abs().amax(dim=0).clamp(min=SMOOTH_FLOOR)


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor,
                      alphas: torch.Tensor) -> torch.Tensor:
    """s_α = a^α / w^(1−α) per input channel, for each α: shape (len(alphas), in).

    Activations are divided by s and weight columns multiplied by it; α = 1 moves all of the
    activation range into the weights, α = 0 equalises by the weights alone.
    """
    a = act_absmax.float().clamp(min=SMOOTH_FLOOR)
    w = weight_absmax.float().clamp(min=SMOOTH_FLOOR)
    alphas = alphas.float().unsqueeze(-1)
    return (a.pow(alphas) / w.pow(1 - alphas)).clamp(min=SMOOTH_FLOOR)


def candidate_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alphas: torch.Tensor,
                      identity: bool) -> torch.Tensor:
    """The grid search's factors: s_α for each α, then, with `identity`, s = 1 (no smoothing)."""
    factors = smoothing_factors(act_absmax, weight_absmax, alphas)
    return torch.cat([factors, torch.ones_like(factors[:1])]) if identity else factors


def static_activation_range(channel_min: torch.Tensor, channel_max: torch.Tensor,
                            factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-tensor (min, max) of x / s over the calibration run, from per-channel extremes:
    exact, since s > 0 divides each channel's extremes separately. Shapes (…, 1, 1) to broadcast."""
    lo = (channel_min / factors).amin(dim=-1)
    hi = (channel_max / factors).amax(dim=-1)
    return lo[..., None, None], hi[..., None, None]


def best_candidate(losses: torch.Tensor) -> int:
    """Index of the smallest loss (the first one on ties)."""
    return int(torch.argmin(losses))
