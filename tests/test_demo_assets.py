"""The committed demo assets: sizes, loadability, and the classifier's accuracy."""

from __future__ import annotations

import pytest
import torch

from conftest import ROOT
from evaluation.classifier import DEFAULT_CLASSIFIER, features_and_predictions, load_classifier
from evaluation.data import FASHION_MNIST_DIR, fashion_mnist_tensors
from evaluation.metrics import accuracy
from runtime.checkpoints import load_model, resolve_spec

DEMO_CKPT = ROOT / "assets/demo/dit_fmnist.safetensors"


def test_demo_dit_is_small_and_loads_with_its_config():
    sizes = DEMO_CKPT.stat().st_size + DEMO_CKPT.with_suffix(".json").stat().st_size
    assert sizes <= 20_000_000
    spec = resolve_spec(None, None, str(DEMO_CKPT))
    assert spec.vae is None and spec.image_size == 32 and spec.dit_kwargs["patch_size"] == 2
    model = load_model(spec, str(DEMO_CKPT))
    assert model.x_embedder.num_patches == 256  # like DiT-XL/2 at 256²


def test_classifier_is_small():
    assert (ROOT / DEFAULT_CLASSIFIER).stat().st_size <= 2_000_000


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_classifier_accuracy_on_the_test_set():
    images, labels = fashion_mnist_tensors("test")
    torch.manual_seed(0)
    subset = torch.randperm(len(images))[:2000]
    _, predictions = features_and_predictions(load_classifier(ROOT / DEFAULT_CLASSIFIER), images[subset])
    assert accuracy(predictions, labels[subset].numpy()) >= 0.90
