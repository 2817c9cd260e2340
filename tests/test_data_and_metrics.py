"""Fashion-MNIST loading, the sample npz format, and the metrics against hand-computed values."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.data import (
    FASHION_MNIST_DIR,
    ImageFolder,
    center_crop_resize,
    load_fashion_mnist,
    read_idx,
    to_model_range,
)
from evaluation.metrics import accuracy, feature_statistics, frechet_distance, frechet_distance_of_features, psnr
from runtime.errors import UserError
from runtime.npzio import load_samples_npz, save_samples_npz

needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist"
)


def write_idx(path, array: np.ndarray, gz: bool):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.gz" if gz else "a")
    write_idx(path, array, gz)
    assert np.array_equal(read_idx(path), array)


def test_truncated_idx_is_reported(tmp_path):
    path = tmp_path / "a"
    write_idx(path, np.zeros((4, 4), np.uint8), gz=False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(UserError, match="truncated"):
        read_idx(path)


def test_missing_dataset_names_the_package(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)


@needs_fashion_mnist
def test_fashion_mnist_splits():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    train_images, train_labels = load_fashion_mnist("train")
    assert train_images.shape == (60000, 28, 28) and len(train_labels) == 60000


def test_padding_to_32_keeps_the_image_centred_on_black():
    image = np.full((1, 28, 28), 255, np.uint8)
    x = to_model_range(image)
    assert x.shape == (1, 1, 32, 32)
    assert torch.all(x[0, 0, 2:30, 2:30] == 1.0) and x[0, 0, 0].eq(-1).all() and x[0, 0, :, 31].eq(-1).all()


def test_image_folder(tmp_path):
    for name, colour in [("cats", 10), ("dogs", 200)]:
        (tmp_path / name).mkdir()
        Image.new("RGB", (40, 30), (colour,) * 3).save(tmp_path / name / "a.png")
    dataset = ImageFolder(tmp_path, image_size=16)
    assert dataset.classes == ["cats", "dogs"] and len(dataset) == 2
    x, label = dataset[1]
    assert x.shape == (3, 16, 16) and label == 1
    assert torch.allclose(x, torch.full_like(x, 200 / 127.5 - 1))
    assert center_crop_resize(Image.new("RGB", (100, 50)), 20).size == (20, 20)


def test_npz_round_trip_and_errors(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(5)
    save_samples_npz(tmp_path / "s.npz", images, labels)
    got_images, got_labels = load_samples_npz(tmp_path / "s.npz")
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
    np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))
    with pytest.raises(UserError, match="expected uint8"):
        load_samples_npz(tmp_path / "float.npz")
    np.savez(tmp_path / "other.npz", x=images)
    with pytest.raises(UserError, match="no arr_0"):
        load_samples_npz(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable npz"):
        load_samples_npz(tmp_path / "junk.npz")


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(1).normal(size=(500, 6))
    assert frechet_distance_of_features(features, features) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_two_gaussians_has_its_closed_form():
    # diagonal covariances commute: FD = |mu1-mu2|² + Σ (sqrt(a_i) - sqrt(b_i))²
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # a rotated pair (non-commuting) against scipy-free direct evaluation: C1 = I, so (C1 C2)^½ = C2^½
    rotation = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    c2 = rotation @ np.diag([4.0, 0.25]) @ rotation.T
    assert frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), c2) == pytest.approx(2 + 4.25 - 2 * (2 + 0.5))


def test_feature_statistics_are_unbiased():
    features = np.array([[0.0, 0.0], [2.0, 2.0]])
    mu, cov = feature_statistics(features)
    assert np.allclose(mu, [1, 1]) and np.allclose(cov, [[2, 2], [2, 2]])


def test_psnr_by_hand():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0] = 10  # mse 100 -> 10·log10(255²/100)
    assert psnr(b, a) == pytest.approx((10 * np.log10(255**2 / 100) + 100.0) / 2)


def test_accuracy():
    assert accuracy(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
