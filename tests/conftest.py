"""Shared fixtures: tiny DiTs with every weight randomised (the official init zeroes the adaLN and
output layers, which would make most comparisons trivially pass)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.checkpoints import ModelSpec  # noqa: E402

TINY_PIXEL_KWARGS = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=10)
TINY_LATENT_KWARGS = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every trainable weight a random value (the fixed position embedding stays)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "pos_embed":
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model.eval()


@pytest.fixture
def tiny_pixel_spec() -> ModelSpec:
    return ModelSpec(dit_kwargs=dict(TINY_PIXEL_KWARGS), vae=None)


@pytest.fixture
def tiny_pixel_model(tiny_pixel_spec):
    torch.manual_seed(0)
    return randomize(tiny_pixel_spec.build())


@pytest.fixture
def tiny_latent_model():
    torch.manual_seed(0)
    return randomize(ModelSpec(dit_kwargs=dict(TINY_LATENT_KWARGS)).build())
