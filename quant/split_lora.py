"""The LoRA's factors as the integer kernels hold them.

L·R = (L·diag(s))·R̃ with R̃ = diag(s)⁻¹·R, s_r the power of two with max|R_r| / s_r in (63.5, 127],
and R̃ held as two int8 halves, R̃ ≈ high + low / LOW_SCALE (high = round(R̃), low the rounded
rest in 1 / LOW_SCALE steps, |low| ≤ 64): 14 to 15 bits of each rank's largest value, where bf16
kept 8 bits of each value, in the same two bytes a value. Powers of two keep L·diag(s) exactly L's
values, rescaled. The down-projection of the activation codes, (q − z)·R̃ᵀ, is then two int8
products summed exactly in int32 (the quantize passes' tl.dot, the Gluon GEMM's wgmmas from the
codes already in its ring) less the zero points' share (z − 128)·Σ_k half (each half's row sums,
held beside it), and s rides in L, which the epilogue multiplies by anyway.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

LOW_SCALE = 128  # R̃ ≈ high + low / LOW_SCALE


class SplitRight(NamedTuple):
    """R̃ (rank, K) as the kernels read it: codes = [high; low] (2·rank, K) int8, sums their rows'
    sums (2·rank,) int32."""

    codes: torch.Tensor
    sums: torch.Tensor

    @property
    def rank(self) -> int:
        return self.codes.shape[0] // 2


def split_lora(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, SplitRight]:
    """(L·diag(s) in float32, SplitRight of R̃) for the factors L (N, rank) and R (rank, K); a rank
    of zeros keeps zero codes."""
    scale, high, low = _split(right)
    codes = torch.cat([high, low]).to(torch.int8).contiguous()
    return (left.double() * scale).float(), SplitRight(codes, codes.sum(dim=1, dtype=torch.int32))


def representable(right: torch.Tensor) -> torch.Tensor:
    """R rounded to what split_lora keeps of it, s·(high + low / LOW_SCALE), in R's dtype: the
    factor a reference computes with to see the kernels' arithmetic exactly."""
    scale, high, low = _split(right)
    return (scale[:, None] * (high + low / LOW_SCALE)).to(right.dtype)


def _split(right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, high, low) of R (rank, K) in float64."""
    r = right.double()
    largest = r.abs().amax(dim=1)
    scale = torch.exp2(torch.ceil(torch.log2(largest.clamp_min(torch.finfo(torch.float32).tiny) / 127)))
    scaled = r / scale[:, None]
    high = scaled.round().clamp(-127, 127)
    low = ((scaled - high) * LOW_SCALE).round().clamp(-127, 127)
    return scale, high, low


def right_values(right: SplitRight) -> torch.Tensor:
    """R̃ = high + low / LOW_SCALE (rank, K) in float64: what the kernels multiply by (exactly)."""
    high, low = right.codes.double().chunk(2)
    return high + low / LOW_SCALE
