"""A small Fashion-MNIST CNN whose penultimate features define the demo's Fréchet distance (FD)
and whose predictions give the class accuracy of generated samples.

It reads the same 32×32, [-1, 1] images the demo DiT generates (Fashion-MNIST padded by 2).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn

from runtime.checkpoints import read_state_dict
from runtime.errors import UserError

DEFAULT_CLASSIFIER = "assets/demo/fmnist_classifier.safetensors"
FEATURE_DIM = 128
DEMO_CLASSES = 10  # Fashion-MNIST


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3×3 conv + batch-norm + ReLU layers, then 2× max pooling."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class FashionClassifier(nn.Module):
    """32² -> 16² -> 8² -> 4² convolutional stages, global average pooling to FEATURE_DIM
    features, and a linear layer to the 10 classes."""

    def __init__(self, num_classes: int = DEMO_CLASSES):
        super().__init__()
        self.stages = nn.Sequential(conv_block(1, 32), conv_block(32, 64), conv_block(64, FEATURE_DIM))
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x).mean(dim=(2, 3))  # (N, FEATURE_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))  # (N, classes)


def load_classifier(path: str | os.PathLike = DEFAULT_CLASSIFIER, device: str | torch.device = "cpu") -> FashionClassifier:
    model = FashionClassifier()
    state = read_state_dict(path)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as error:
        raise UserError(f"{path} is not a FashionClassifier checkpoint ({str(error).splitlines()[0]})") from None
    return model.to(device).eval()


@torch.no_grad()
def features_and_predictions(
    classifier: FashionClassifier, images: torch.Tensor, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features (N, FEATURE_DIM) float64 and predicted labels (N,) of [-1, 1] images."""
    device = next(classifier.parameters()).device
    features, predictions = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        f = classifier.features(batch)
        features.append(f.double().cpu())
        predictions.append(classifier.head(f).argmax(dim=1).cpu())
    return torch.cat(features).numpy(), torch.cat(predictions).numpy()
