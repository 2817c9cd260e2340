"""Converting model samples to 8-bit images, grids and PNG files."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image

from runtime.fileio import atomic_output


def to_uint8(samples: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) images in [-1, 1] -> (N, H, W, C) uint8, the conversion of the ADM/DiT
    samplers (127.5·x + 128, clamped, truncated)."""
    pixels = torch.clamp(127.5 * samples.float() + 128.0, 0, 255)
    return pixels.permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def to_rgb(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 with C in {1, 3} -> (N, H, W, 3): grayscale is repeated, as the ADM
    evaluation suite expects three channels."""
    if images.shape[-1] == 3:
        return images
    if images.shape[-1] != 1:
        raise ValueError(f"expected 1 or 3 channels, got {images.shape[-1]}")
    return np.repeat(images, 3, axis=-1)


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images into one (rows·(H+pad)+pad, …, C) image, `nrow` per row."""
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i, image in enumerate(images):
        top = padding + (i // nrow) * (h + padding)
        left = padding + (i % nrow) * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """Write an (H, W, C) uint8 image atomically: a reader never sees a half-written PNG."""
    array = image[..., 0] if image.shape[-1] == 1 else image
    with atomic_output(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
