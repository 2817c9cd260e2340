"""Scoring quantized layer candidates by their output error over a whole calibration run.

One sampling pass of the full-precision model feeds every layer: a hook on each target layer
compares, at every timestep, the layer's FP output with the output of each candidate on the same
input, and accumulates the squared error. Nothing is stored per timestep, so memory does not grow
with the number of steps or with depth beyond the candidates themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from .calibrate import CalibrationRun, input_hooks, run_sampling
from .primitives import QuantizedLayer
from .targets import LayerTarget


@dataclass
class ErrorSums:
    """Running sums over a calibration run for one layer's candidates."""

    squared_error: torch.Tensor  # (candidates,)
    reference_power: torch.Tensor | float = 0.0  # Σ y² of the FP output (a tensor: no GPU sync per step)

    def relative(self) -> torch.Tensor:
        """Squared error relative to the FP output's power (0 = exact)."""
        return self.squared_error / max(float(self.reference_power), 1e-30)


def _subsample_rows(rows: torch.Tensor, limit: int) -> torch.Tensor:
    """At most `limit` rows, evenly strided (deterministic, covers every image and position)."""
    if limit <= 0 or rows.shape[0] <= limit:
        return rows
    stride = rows.shape[0] // limit
    return rows[: stride * limit : stride]


@torch.no_grad()
def score_candidates(
    model: nn.Module,
    targets: Sequence[LayerTarget],
    candidates: Mapping[str, Sequence[QuantizedLayer | Callable[[], QuantizedLayer]]],
    run: CalibrationRun,
    device: torch.device,
    compute_dtype: torch.dtype = torch.float32,
    rows_per_step: int = 0,
    progress: bool = True,
    desc: str = "grid search",
) -> dict[str, ErrorSums]:
    """Squared output error of every candidate of every layer, summed over all timesteps.

    `candidates[name]` is a list of groups, each holding candidates of the same structure stacked
    along a leading dimension; the sums list the candidates of all groups in order. A group may be
    a function that builds it: it is then rebuilt at every timestep and never stored, so memory
    does not grow with depth.
    """
    sums: dict[str, ErrorSums] = {}

    def accumulate(target: LayerTarget, x: torch.Tensor, output: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1])
        reference = output.reshape(-1, output.shape[-1])
        if rows_per_step:
            rows, reference = _subsample_rows(rows, rows_per_step), _subsample_rows(reference, rows_per_step)
        reference32 = reference.float().unsqueeze(0)
        errors = []
        for group in candidates[target.name]:
            layer = group if isinstance(group, QuantizedLayer) else group()
            predicted = layer(rows.unsqueeze(0), dtype=compute_dtype, batch_dims=1)
            errors.append((predicted.float() - reference32).pow(2).sum(dim=(1, 2)))
        error = torch.cat(errors).double()
        entry = sums.setdefault(target.name, ErrorSums(torch.zeros_like(error)))
        entry.squared_error += error
        entry.reference_power = entry.reference_power + reference.float().pow(2).sum().double()

    with input_hooks(model, targets, accumulate):
        run_sampling(model, run, device, progress, desc=desc)
    return sums
