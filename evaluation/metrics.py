"""Sample-quality metrics as pure functions over arrays: Fréchet distance, PSNR, accuracy."""

from __future__ import annotations

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||² + tr(C1 + C2 - 2 (C1 C2)^½), the Fréchet distance of two Gaussians.

    tr((C1 C2)^½) is computed as tr((C1^½ C2 C1^½)^½): the inner matrix is symmetric PSD, so an
    eigendecomposition gives it stably, without the complex round-off of a general sqrtm.
    """
    sqrt_cov1 = _psd_sqrt(cov1)
    trace_sqrt_product = np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_cov1 @ cov2 @ sqrt_cov1), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt_product)


def frechet_distance_of_features(features1: np.ndarray, features2: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def psnr(images: np.ndarray, reference: np.ndarray, max_value: float = 255.0) -> float:
    """Mean over images of the per-image PSNR (dB) between paired uint8 images; identical images
    count as 100 dB so that one exact match does not make the mean infinite."""
    if images.shape != reference.shape:
        raise ValueError(f"paired sets differ in shape: {images.shape} vs {reference.shape}")
    diff = images.astype(np.float64) - reference.astype(np.float64)
    mse = (diff**2).reshape(len(images), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        values = np.where(mse == 0, 100.0, 10 * np.log10(max_value**2 / np.maximum(mse, 1e-300)))
    return float(values.mean())


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(predictions) == np.asarray(labels)).mean())
