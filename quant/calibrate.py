"""Data-free calibration: the model samples from Gaussian noise for fixed class labels, and hooks
on the target layers collect statistics of their inputs over every sampling timestep."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from diffusion import create_diffusion
from runtime.sampling import SampleNoise, denoiser_step, guided_batch

from .targets import LayerTarget, get_module

# The 16 ImageNet classes of the published calibration run.
PUBLISHED_CALIBRATION_LABELS = (207, 360, 387, 974, 88, 979, 417, 279, 27, 336, 177, 594, 748, 718, 447, 613)


def default_calibration_labels(num_classes: int) -> tuple[int, ...]:
    """The published 16 labels for ImageNet models, otherwise 16 labels cycling through the classes."""
    if num_classes == 1000:
        return PUBLISHED_CALIBRATION_LABELS
    return tuple(i % num_classes for i in range(16))


@dataclass(frozen=True)
class CalibrationRun:
    """One sampling run that feeds the statistics: labels, guidance, steps and noise seed. Every
    pass of the pipeline samples it through `diffusion()`, so the step count is stated once."""

    labels: tuple[int, ...]
    cfg_scale: float = 1.5
    num_steps: int = 50
    seed: int = 0

    def diffusion(self):
        """The DiT diffusion respaced to `num_steps` sampling steps."""
        return create_diffusion(str(self.num_steps))


@dataclass(frozen=True)
class ChannelStats:
    """Per input channel of one layer, over all timesteps: min, max (and |max| derived), and
    optionally the inputs' second moment H = Σ xᵀx (in, in) over every row of every timestep."""

    min: torch.Tensor
    max: torch.Tensor
    gram: torch.Tensor | None = None

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.min.abs(), self.max.abs())


@contextmanager
def input_hooks(model: nn.Module, targets: Sequence[LayerTarget],
                on_input: Callable[[LayerTarget, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Call on_input(target, input, output) on every forward of each target layer; the hooks are
    removed on exit, whatever happens."""
    handles = []
    try:
        for target in targets:
            def hook(module, args, output, target=target):
                on_input(target, args[0], output)

            handles.append(get_module(model, target.name).register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def run_sampling(model: nn.Module, run: CalibrationRun, device: torch.device,
                 progress: bool = True, desc: str = "calibration") -> None:
    """The calibration run: ancestral sampling with CFG for run.labels (results discarded), the
    model called as the samplers call it (runtime.sampling)."""
    diffusion = run.diffusion()
    spec_shape = (model.in_channels, model.x_embedder.grid_size * model.patch_size,
                  model.x_embedder.grid_size * model.patch_size)
    noise = SampleNoise(run.seed, range(len(run.labels)), spec_shape, device)
    z, y = guided_batch(model, noise.draw(), torch.tensor(run.labels, device=device), run.cfg_scale)
    step, _ = denoiser_step(model, run.cfg_scale)
    steps = diffusion.p_sample_loop_progressive(step, z.shape, z, clip_denoised=False, model_kwargs=dict(y=y),
                                                device=device, noise_fn=noise.noise_fn)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, total=diffusion.num_timesteps, desc=desc, unit="step")
    for _ in steps:
        pass


@torch.no_grad()
def collect_channel_stats(model: nn.Module, targets: Sequence[LayerTarget], run: CalibrationRun,
                          device: torch.device, progress: bool = True,
                          with_gram: bool = False) -> dict[str, ChannelStats]:
    """Per-channel min and max of each target layer's input over all timesteps of one run (the
    temporal aggregation of TAS), and with `with_gram` the inputs' H = Σ xᵀx (float32)."""
    mins: dict[str, torch.Tensor] = {}
    maxs: dict[str, torch.Tensor] = {}
    grams: dict[str, torch.Tensor] = {}

    def accumulate(target: LayerTarget, x: torch.Tensor, _output) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        lo, hi = flat.amin(dim=0), flat.amax(dim=0)
        if target.name in mins:
            torch.minimum(mins[target.name], lo, out=mins[target.name])
            torch.maximum(maxs[target.name], hi, out=maxs[target.name])
        else:
            mins[target.name], maxs[target.name] = lo, hi
        if with_gram:
            if target.name in grams:
                grams[target.name].addmm_(flat.T, flat)
            else:
                grams[target.name] = flat.T @ flat

    with input_hooks(model, targets, accumulate):
        run_sampling(model, run, device, progress, desc="TAS statistics")
    return {name: ChannelStats(mins[name], maxs[name], grams.get(name)) for name in mins}
