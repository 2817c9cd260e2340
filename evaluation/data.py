"""Training data: Fashion-MNIST from the Debian package `dataset-fashion-mnist`, or a folder of
class subfolders of images for users' own data.

Images come out as float tensors in [-1, 1], (C, H, W), the range the diffusion model works in.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from runtime.errors import UserError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_PADDED_SIZE = 32  # 28² padded by 2 on each side: 16×16 patches of 2, like DiT-XL/2 at 256²
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}

# The idx format's type codes (http://yann.lecun.com/exdb/mnist/): only unsigned bytes are used here.
_IDX_UBYTE = 0x08


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (optionally gzipped) as a uint8 array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != _IDX_UBYTE:
        raise UserError(f"{path} is not an unsigned-byte idx file; reinstall dataset-fashion-mnist")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated ({body.size} of {int(np.prod(shape))} bytes); reinstall dataset-fashion-mnist")
    return body.reshape(shape).copy()  # writable, so torch.from_numpy needs no warning


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise UserError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}; install it with "
        "`apt-get install dataset-fashion-mnist` or pass --data-path to a folder holding the idx files"
    )


def load_fashion_mnist(split: str, root: str | os.PathLike = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) int64 labels of the "train" or "test" split."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {list(FASHION_MNIST_FILES)}")
    root = Path(root)
    image_stem, label_stem = FASHION_MNIST_FILES[split]
    images = read_idx(_find_idx(root, image_stem))
    labels = read_idx(_find_idx(root, label_stem)).astype(np.int64)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise UserError(f"Fashion-MNIST {split} files in {root} disagree on the number of images; reinstall them")
    return images, labels


def to_model_range(images: np.ndarray, size: int = FASHION_MNIST_PADDED_SIZE) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) uint8 -> (N, C, size, size) float in [-1, 1], zero-padded
    (black, -1) symmetrically up to `size`."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).float()  # a writable copy
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = x / 127.5 - 1.0
    pad_h, pad_w = size - x.shape[2], size - x.shape[3]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"images of {tuple(x.shape[2:])} are larger than {size}")
    return torch.nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=-1.0)


def fashion_mnist_tensors(split: str, root: str | os.PathLike = FASHION_MNIST_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """The split as model-ready (N, 1, 32, 32) images in [-1, 1] and (N,) labels."""
    images, labels = load_fashion_mnist(split, root)
    return to_model_range(images), torch.from_numpy(labels)


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size`, then take the central size×size crop (ADM's recipe:
    box-filter halving while the image is at least twice too big, then bicubic)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageFolder(torch.utils.data.Dataset):
    """Images under root/<class name>/..., classes numbered in sorted order of their folder names."""

    def __init__(self, root: str | os.PathLike, image_size: int, channels: int = 3):
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"image folder {root} does not exist; pass --data-path to a folder of class subfolders")
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise UserError(f"no images found under {root}/<class>/; expected files ending in {sorted(IMAGE_EXTENSIONS)}")
        self.image_size = image_size
        self.mode = {1: "L", 3: "RGB"}[channels]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            image = center_crop_resize(image.convert(self.mode), self.image_size)
        array = np.asarray(image)
        return to_model_range(array[None], self.image_size)[0], label
