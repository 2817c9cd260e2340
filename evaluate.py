"""Measure a sample npz (ADM format: arr_0 N×H×W×3 uint8, arr_1 labels).

    # the demo (32×32 Fashion-MNIST): FD against the real test set, class accuracy, PSNR
    python evaluate.py samples/w4a8.npz --paired samples/fp.npz
    python evaluate.py samples/w4a8.npz samples/fp.npz        # FD against another sample set
    # ImageNet: FID, Inception Score, precision/recall through torch-fidelity
    python evaluate.py samples/dit-xl2.npz VIRTUAL_imagenet256_labeled.npz --suite imagenet

The demo metrics use the committed Fashion-MNIST classifier (assets/demo/fmnist_classifier.safetensors):
its 128 penultimate features define the Fréchet distance (FD), its predictions the accuracy.
The ImageNet suite uses torch-fidelity's Inception features: close to, not identical with, the
ADM TensorFlow suite, which reads the same npz files unchanged for paper-comparable numbers.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from evaluation.classifier import DEFAULT_CLASSIFIER, DEMO_CLASSES, features_and_predictions, load_classifier
from evaluation.data import FASHION_MNIST_DIR, fashion_mnist_tensors, to_model_range
from evaluation.metrics import accuracy, frechet_distance_of_features, psnr
from runtime.cli import ArgumentParser, default_device, parse_device, run_cli
from runtime.errors import UserError
from runtime.npzio import load_samples_npz


def grayscale_model_input(images: np.ndarray):
    """(N, 32, 32, 3) uint8 samples -> (N, 1, 32, 32) classifier input in [-1, 1]."""
    if images.shape[1:3] != (32, 32):
        raise UserError(f"the demo suite needs 32×32 images, got {images.shape[1]}×{images.shape[2]}; use --suite imagenet")
    return to_model_range(images[..., :1])


MIN_SAMPLES = 2  # a Fréchet distance needs a covariance


def samples_for_fd(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    images, labels = load_samples_npz(path)
    if len(images) < MIN_SAMPLES:
        raise UserError(f"{path} holds {len(images)} sample(s); a Fréchet distance needs at least {MIN_SAMPLES}")
    return images, labels


def demo_metrics(samples_path: str, reference_path: str | None, paired_path: str | None, classifier_path: str,
                 data_path: str, device) -> dict:
    """FD against the real test set (or a reference npz), accuracy against arr_1, PSNR against a paired npz."""
    images, labels = samples_for_fd(samples_path)
    if labels is not None and (labels.min() < 0 or labels.max() >= DEMO_CLASSES):
        raise UserError(f"{samples_path}: labels (arr_1) must lie in 0..{DEMO_CLASSES - 1} for the demo classifier, "
                        f"found {labels.min()}..{labels.max()}; use --suite imagenet for other models")
    paired_images = None
    if paired_path:
        paired_images, _ = load_samples_npz(paired_path)
        if paired_images.shape != images.shape:
            raise UserError(f"--paired {paired_path} holds {paired_images.shape[0]} images of "
                            f"{paired_images.shape[1]}×{paired_images.shape[2]}, {samples_path} "
                            f"{images.shape[0]} of {images.shape[1]}×{images.shape[2]}; pair samples of the same "
                            "seeds and count")
    classifier = load_classifier(classifier_path, device)
    features, predictions = features_and_predictions(classifier, grayscale_model_input(images))
    results: dict = {"samples": samples_path, "n": len(images)}

    if reference_path:
        reference_images, _ = samples_for_fd(reference_path)
        reference_features, _ = features_and_predictions(classifier, grayscale_model_input(reference_images))
        results["fd_vs_reference"] = frechet_distance_of_features(features, reference_features)
        results["reference"] = reference_path
    else:
        test_images, _ = fashion_mnist_tensors("test", data_path)
        test_features, _ = features_and_predictions(classifier, test_images)
        results["fd_vs_test_set"] = frechet_distance_of_features(features, test_features)
    if labels is not None:
        results["class_accuracy"] = accuracy(predictions, labels)
    if paired_images is not None:
        results["psnr_vs_paired"] = psnr(images, paired_images)
        results["paired"] = paired_path
    return results


def imagenet_metrics(samples_path: str, reference_path: str | None) -> dict:
    """FID, Inception Score, precision and recall with torch-fidelity's Inception network."""
    samples_for_fd(samples_path)
    if reference_path is None:
        raise UserError("the ImageNet suite needs a reference npz, e.g. ADM's VIRTUAL_imagenet256_labeled.npz")
    try:
        import torch
        import torch_fidelity
    except ImportError:
        raise UserError("the ImageNet suite needs torch-fidelity: pip install torch-fidelity") from None

    class NpzImages(torch.utils.data.Dataset):
        def __init__(self, path):
            self.images, _ = load_samples_npz(path)

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return torch.from_numpy(self.images[i]).permute(2, 0, 1)  # uint8 (3, H, W), as torch-fidelity expects

    try:
        return torch_fidelity.calculate_metrics(
            input1=NpzImages(samples_path), input2=NpzImages(reference_path), cuda=torch.cuda.is_available(),
            fid=True, isc=True, prc=True, verbose=False,
        )
    except (OSError, RuntimeError) as error:
        raise UserError(
            f"torch-fidelity could not load its Inception weights ({str(error).splitlines()[0]}); connect once to "
            "download them, or put the weights file in torch's hub cache (TORCH_HOME)"
        ) from None


def main(args: argparse.Namespace) -> None:
    if args.suite == "imagenet" and args.paired:
        raise UserError("--paired (PSNR) belongs to the demo suite; drop it with --suite imagenet")
    if args.suite == "demo":
        results = demo_metrics(args.samples, args.reference, args.paired, args.classifier, args.data_path,
                               parse_device(args.device))
    else:
        results = imagenet_metrics(args.samples, args.reference)
    print(json.dumps(results, indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", help="sample npz to measure")
    parser.add_argument("reference", nargs="?", default=None,
                        help="reference npz for FD/FID (demo default: the real Fashion-MNIST test set)")
    parser.add_argument("--paired", type=str, default=None, help="npz of the same noise (e.g. FP samples) for PSNR")
    parser.add_argument("--suite", choices=["demo", "imagenet"], default="demo", help="demo classifier or Inception")
    parser.add_argument("--classifier", type=str, default=DEFAULT_CLASSIFIER, help="demo classifier safetensors")
    parser.add_argument("--data-path", type=str, default=str(FASHION_MNIST_DIR), help="Fashion-MNIST idx folder")
    parser.add_argument("--device", type=str, default=default_device(), help="cuda or cpu")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
