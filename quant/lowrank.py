"""The training-free LoRA: alternate Q = quant(W − L·R) and L·R = best rank-r fit of W − Q."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .primitives import QuantizedWeight


def exact_low_rank(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with L·R the best rank-r approximation of a (…, m, n), by a full SVD; the singular
    values are split evenly (L = U·√S, R = √S·Vᵀ)."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    root = s[..., :rank].sqrt()
    return u[..., :rank] * root.unsqueeze(-2), root.unsqueeze(-1) * vh[..., :rank, :]


def randomized_low_rank(a: torch.Tensor, rank: int, generator: torch.Generator | None = None,
                        oversample: int = 8, power_iters: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) of rank r by randomized subspace iteration (Halko et al.): a sketch of
    rank + oversample columns, `power_iters` re-orthogonalised power steps, then a small SVD.
    Much cheaper than a full SVD for r ≪ min(m, n), and close to optimal for decaying spectra."""
    m, n = a.shape[-2:]
    k = min(rank + oversample, m, n)
    omega = torch.randn(*a.shape[:-2], n, k, generator=generator, device="cpu", dtype=torch.float32)
    q = torch.linalg.qr(a @ omega.to(a)).Q
    for _ in range(power_iters):
        z = torch.linalg.qr(a.transpose(-1, -2) @ q).Q
        q = torch.linalg.qr(a @ z).Q
    u_small, s, vh = torch.linalg.svd(q.transpose(-1, -2) @ a, full_matrices=False)
    root = s[..., :rank].sqrt()
    u = q @ u_small[..., :rank]
    return u * root.unsqueeze(-2), root.unsqueeze(-1) * vh[..., :rank, :]


@dataclass(frozen=True)
class LowRankQuantized:
    """W ≈ dequant(weight) + left · right, and ‖W − Q − L·R‖_F after each accepted iteration."""

    weight: QuantizedWeight
    left: torch.Tensor | None  # (…, out, rank)
    right: torch.Tensor | None  # (…, rank, in)
    errors: tuple[float, ...]


def quantize_with_low_rank(
    w: torch.Tensor,
    quantize: Callable[[torch.Tensor], QuantizedWeight],
    rank: int,
    iters: int,
    method: str = "randomized",
    generator: torch.Generator | None = None,
    weighting: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LowRankQuantized:
    """Alternating quantization / low-rank fit of a (…, out, in) weight, `iters` times.

    An iteration is kept only if it lowers the error of every matrix in the batch's total, so the
    returned error never exceeds the previous one: min-max quantization re-derives its grid from
    its input and a randomized fit is not exactly optimal, so a step can occasionally overshoot.
    With `weighting` = (C, C⁻¹), C·Cᵀ = H the layer's input second moment, the fit and the errors
    are in the output metric ‖(·)·C‖ = ‖(·)·H^½‖: L·R is the best rank-r fit of the residual
    times C, mapped back by C⁻¹ (the activation-weighted LoRA).
    """
    w = w.float()

    def norm(residual: torch.Tensor) -> float:
        return float(torch.linalg.norm(residual if weighting is None else residual @ weighting[0]))

    if rank == 0:
        q = quantize(w)
        return LowRankQuantized(q, None, None, (norm(w - q.dequantize()),))

    def best_rank_r(a):
        return exact_low_rank(a, rank) if method == "exact" else randomized_low_rank(a, rank, generator)

    def fit(residual):
        if weighting is None:
            return best_rank_r(residual)
        left, right = best_rank_r(residual @ weighting[0])
        return left, right @ weighting[1]

    def fit_residual(q: QuantizedWeight):
        """(L, R, error of W − Q − L·R) for the quantized weight q."""
        residual = w - q.dequantize()
        left, right = fit(residual)
        return left, right, norm(residual - left @ right)

    best_q = quantize(w)
    best_left, best_right, best_error = fit_residual(best_q)
    errors = [best_error]
    for _ in range(iters - 1):
        q = quantize(w - best_left @ best_right)
        left, right, error = fit_residual(q)
        if error > best_error:
            break
        best_q, best_left, best_right, best_error = q, left, right, error
        errors.append(error)
    return LowRankQuantized(best_q, best_left, best_right, tuple(errors))
