"""The ADM sample-batch format: an `.npz` with `arr_0` (N×H×W×3 uint8 images) and, here,
`arr_1` (N class labels). The ADM/TensorFlow evaluation suite reads the same file unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from runtime.errors import UserError
from runtime.fileio import atomic_output


def save_samples_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Write images (N, H, W, 3) uint8 and optional labels (N,) atomically."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"arr_0 must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    arrays = {"arr_0": images}
    if labels is not None:
        if labels.shape != (len(images),):
            raise ValueError(f"arr_1 must hold one label per image, got shape {labels.shape}")
        arrays["arr_1"] = labels.astype(np.int64)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append another ".npz"
            np.savez(f, **arrays)


def load_samples_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """(images, labels or None) from a sample npz, with a one-line error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sample file {path} does not exist; create it with sample_merge_TAS.py")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise UserError(f"{path} is a single array, not an npz; expected an ADM-style npz with N×H×W×3 "
                            "uint8 images in arr_0 (sample_merge_TAS.py writes one)")
        with loaded as data:
            if "arr_0" not in data:
                raise UserError(f"{path} has no arr_0; expected an ADM-style npz with N×H×W×3 uint8 images in arr_0")
            images = data["arr_0"]
            labels = data["arr_1"] if "arr_1" in data else None
    except (OSError, ValueError, EOFError) as error:
        raise UserError(f"{path} is not a readable npz ({error}); regenerate it") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"{path}: arr_0 is {images.dtype} {images.shape}, expected uint8 N×H×W×3; regenerate the samples")
    if labels is not None and labels.shape != (len(images),):
        raise UserError(f"{path}: arr_1 has shape {labels.shape}, expected one label per image ({len(images)})")
    return images, labels
