"""Reproducible class-conditional sampling: sample i's label, initial noise and per-step noise come
from its own generator, seeded by (global seed, i) alone, so a sample does not depend on the batch
it lands in, the batch size, or the number of processes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def sample_seed(global_seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample `index` under `global_seed`."""
    state = np.random.SeedSequence([global_seed, index]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class SampleNoise:
    """One CPU generator per sample. Draw order per sample: label (if drawn), initial noise,
    then one noise tensor per sampling step."""

    def __init__(self, global_seed: int, indices: Sequence[int], shape: tuple[int, ...], device: torch.device | str):
        self.generators = [torch.Generator().manual_seed(sample_seed(global_seed, i)) for i in indices]
        self.shape = tuple(shape)
        self.device = device

    def labels(self, num_classes: int) -> torch.Tensor:
        """Each sample's class label, uniform over the classes."""
        return torch.cat([torch.randint(num_classes, (1,), generator=g) for g in self.generators]).to(self.device)

    def draw(self) -> torch.Tensor:
        """(n, *shape) standard normal noise, one row per sample."""
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device)

    def noise_fn(self, x: torch.Tensor) -> torch.Tensor:
        """Per-step noise for a batch that holds the samples once, or twice (CFG halves)."""
        noise = self.draw().to(x.dtype)
        return noise.repeat(x.shape[0] // noise.shape[0], *([1] * (x.ndim - 1)))


@torch.no_grad()
def generate(model, diffusion, labels: torch.Tensor, noise: SampleNoise, cfg_scale: float, progress: bool = False) -> torch.Tensor:
    """Ancestral sampling of one model-space sample per label, with classifier-free guidance when
    cfg_scale > 1 (the batch is doubled; the second half uses the null class)."""
    x_T = noise.draw()
    if cfg_scale > 1.0:
        null = torch.full_like(labels, model.y_embedder.num_classes)
        z = torch.cat([x_T, x_T])
        kwargs = dict(y=torch.cat([labels, null]), cfg_scale=cfg_scale)
        forward = model.forward_with_cfg
    else:
        z, kwargs, forward = x_T, dict(y=labels), model.forward
    dtype = next(model.parameters()).dtype  # a bf16 model (quantized backends) gets bf16 inputs

    def model_fn(x, t, **model_kwargs):
        return forward(x.to(dtype), t, **model_kwargs).float()

    samples = diffusion.p_sample_loop(
        model_fn, z.shape, z, clip_denoised=False, model_kwargs=kwargs, progress=progress, device=z.device,
        noise_fn=noise.noise_fn,
    )
    return samples[: len(labels)]


def sample_uint8(model, diffusion, vae, spec, indices: Sequence[int], global_seed: int, cfg_scale: float,
                 labels: torch.Tensor | None = None, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Samples `indices` as (N, H, W, 3) uint8 images and their (N,) labels (drawn from each
    sample's generator unless given)."""
    from images import to_rgb, to_uint8
    from vae import decode

    noise = SampleNoise(global_seed, indices, (spec.in_channels, spec.input_size, spec.input_size), device)
    drawn = noise.labels(spec.num_classes)  # drawn first in any case, so the noise stream is the same
    labels = drawn if labels is None else labels.to(device)
    images = decode(vae, generate(model, diffusion, labels, noise, cfg_scale))
    return to_rgb(to_uint8(images)), labels.cpu().numpy()
