"""Error-compensating rounding (OBQ / GPTQ, Frantar et al. 2022) of one weight matrix on a given
integer grid, data-free: H comes from the model's own calibration run.

For a layer y = W·x with calibration inputs of second moment H = Σ xᵀx, rounding weight column j
leaves an output error whose effect on E‖(W − Ŵ)x‖² is removed, to first order, by shifting the
columns not yet rounded by −e_j · H⁻¹[j, k>j] / H⁻¹[j, j]. With U the upper Cholesky factor of
H⁻¹ this is the update W[:, k] −= (e_j / U[j, j]) · U[j, k]; columns are processed in blocks so
that the update of the later blocks is one matrix product. The grid (scales and zero points) is
fixed beforehand, so the result has exactly the storage format of round-to-nearest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .primitives import QuantizedWeight


def damped(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """H + damping · mean(diag H) · I, with inputs that never fire (zero diagonal) given a unit
    diagonal so that H stays invertible (their columns do not affect the output)."""
    h = hessian.double().clone()
    diagonal = h.diagonal()
    diagonal[diagonal == 0] = 1.0
    diagonal += damping * diagonal.mean()
    return h


def damped_cholesky(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """The lower Cholesky factor (float64) of the damped H: what both factor_and_inverse and
    inverse_cholesky start from, so a layer whose rounding and LoRA metric both read H factors it
    once."""
    return torch.linalg.cholesky(damped(hessian, damping))


def factor_and_inverse(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, C⁻¹) in float32 from C = damped_cholesky(H), with C·Cᵀ the damped H. Any such C weights
    a low-rank fit the same way, ‖E·C‖² = tr(E H Eᵀ); a Cholesky factor costs a fraction of the
    symmetric square root's eigendecomposition (seconds on DiT-XL/2's 4,608-wide fc2)."""
    identity = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    return factor.float(), torch.linalg.solve_triangular(factor, identity, upper=False).float()


def inverse_cholesky(factor: torch.Tensor) -> torch.Tensor:
    """U, the upper Cholesky factor of the damped H⁻¹ (float32), from C = damped_cholesky(H): what
    compensated_codes needs of H, computed once per layer and reused by every LoRA iteration."""
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True).float()


def column_loop(w: torch.Tensor, upper: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, low: torch.Tensor,
                high: torch.Tensor, span: slice, codes: torch.Tensor) -> torch.Tensor:
    """The columns of `span`, in order: writes their codes into `codes` and returns their errors
    scaled by 1/U[j, j] (rows, width), for the update of the later columns. w is the partly
    compensated (out, in) weight (updated inside the span); scale … high the grid at each element."""
    errors = torch.empty(w.shape[0], span.stop - span.start, dtype=w.dtype, device=w.device)
    for j in range(span.start, span.stop):
        q = torch.minimum(torch.maximum(torch.round(w[:, j] / scale[:, j]) + zero[:, j], low[:, j]), high[:, j])
        codes[:, j] = q
        error = (w[:, j] - (q - zero[:, j]) * scale[:, j]) / upper[j, j]
        w[:, j:span.stop] -= error.unsqueeze(1) * upper[j, j:span.stop].unsqueeze(0)
        errors[:, j - span.start] = error
    return errors


def compensated_codes(weight: torch.Tensor, upper: torch.Tensor, grid: QuantizedWeight, symmetric: bool = False,
                      block: int = 128, columns: Callable | None = None) -> QuantizedWeight:
    """Codes of an (out, in) `weight` on `grid`'s scales and zero points (unpacked; per channel,
    per group or per tensor; symmetric grids use codes 1 … 2^b − 1, as quantize_weight does),
    chosen column by column with error compensation through `upper` = inverse_cholesky of H's
    damped_cholesky factor.
    `columns` walks one block of columns (column_loop's contract); by default the Triton kernel on
    a GPU (a few launches per block instead of a dozen per column) and column_loop elsewhere."""
    out, inp = weight.shape
    upper = upper.to(weight.device, torch.float32).contiguous()

    def per_element(t: torch.Tensor | int) -> torch.Tensor:  # a per-group quantity at every (row, column)
        if not isinstance(t, torch.Tensor):
            return torch.full((out, inp), float(t), device=weight.device)
        return t.float().to(weight.device).repeat_interleave(grid.group_size, dim=-1).expand(out, inp).contiguous()

    scale, zero = per_element(grid.group_scales()), per_element(grid.zero)
    low, high = (per_element(bound) for bound in grid.code_bounds(symmetric))
    if columns is None and weight.is_cuda:
        from .compensate_kernel import compensate_columns as columns
    columns = columns or column_loop
    w = weight.float().clone()
    codes = torch.empty(out, inp, dtype=torch.float32, device=weight.device)
    for start in range(0, inp, block):
        span = slice(start, min(start + block, inp))
        errors = columns(w, upper, scale, zero, low, high, span, codes)
        w[:, span.stop:] -= errors @ upper[span, span.stop:]
    return dataclasses.replace(grid, codes=codes.to(torch.uint8), packed=False)
