"""Train the Fashion-MNIST classifier used by evaluate.py (features for FD, predictions for accuracy).

    python train_classifier.py --output assets/demo/fmnist_classifier.safetensors
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from evaluation.classifier import FashionClassifier, features_and_predictions
from evaluation.data import FASHION_MNIST_DIR, fashion_mnist_tensors
from evaluation.metrics import accuracy
from runtime.cli import ArgumentParser, create_logger, default_device, parse_device, positive_int, run_cli
from runtime.fileio import atomic_output


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 pixels (the padding is black, -1)."""
    n = images.shape[0]
    flip = torch.rand(n, generator=generator, device=images.device) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    padded = F.pad(images, (2, 2, 2, 2), value=-1.0)
    dx, dy = torch.randint(0, 5, (2,), generator=generator, device=images.device).tolist()
    return padded[:, :, dy : dy + images.shape[2], dx : dx + images.shape[3]]


def main(args: argparse.Namespace) -> None:
    logger = create_logger("train_classifier")
    torch.manual_seed(args.seed)
    device = parse_device(args.device)
    train_x, train_y = (t.to(device) for t in fashion_mnist_tensors("train", args.data_path))
    test_x, test_y = fashion_mnist_tensors("test", args.data_path)

    model = FashionClassifier().to(device)
    steps_per_epoch = len(train_x) // args.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator, device=device)
        total = 0.0
        for step in range(steps_per_epoch):
            batch = order[step * args.batch_size : (step + 1) * args.batch_size]
            loss = F.cross_entropy(model(augment(train_x[batch], generator)), train_y[batch], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        model.eval()
        _, predictions = features_and_predictions(model, test_x)
        logger.info(f"epoch {epoch + 1}/{args.epochs}: loss {total / steps_per_epoch:.4f}, "
                    f"test accuracy {accuracy(predictions, test_y.numpy()):.4f}")

    test_accuracy = accuracy(predictions, test_y.numpy())
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_output(args.output) as tmp:
        save_file(state, str(tmp), metadata={"test_accuracy": f"{test_accuracy:.4f}", "epochs": str(args.epochs)})
    logger.info(f"saved {args.output} (test accuracy {test_accuracy:.4f})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", type=str, default=str(FASHION_MNIST_DIR), help="folder with the idx files")
    parser.add_argument("--epochs", type=positive_int, default=12, help="passes over the 60,000 training images")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="images per optimisation step")
    parser.add_argument("--lr", type=float, default=4e-3, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation, order and augmentation")
    parser.add_argument("--output", type=str, default="assets/demo/fmnist_classifier.safetensors", help="safetensors to write")
    parser.add_argument("--device", type=str, default=default_device(), help="cuda or cpu")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
