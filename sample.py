"""Sample a grid of images from a full-precision DiT (the baseline) or a quantized checkpoint.

    python sample.py --image-size 256 --seed 1                       # official DiT-XL/2
    python sample.py --ckpt assets/demo/dit_fmnist.safetensors --cfg-scale 1.5 --num-sampling-steps 50
    python sample.py --path results/dit_fmnist-W4A8 --cfg-scale 1.5 --num-sampling-steps 50
"""

from __future__ import annotations

import argparse

import torch

from diffusion import create_diffusion
from quant.backends import BACKEND_HELP, BACKENDS
from runtime.cli import (
    ArgumentParser,
    add_model_arguments,
    add_speed_arguments,
    create_logger,
    default_device,
    load_for_sampling,
    parse_device,
    positive_int,
    run_cli,
    speed_up_sampling,
)
from runtime.errors import UserError
from runtime.images import make_grid, save_png, to_uint8
from runtime.sampling import SampleNoise, generate
from runtime.vae import decode, load_vae

# The eight ImageNet classes the official sample.py draws.
OFFICIAL_CLASS_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]


def default_class_labels(num_classes: int) -> list[int]:
    """The official eight ImageNet labels for 1000-class models, otherwise each class once."""
    return OFFICIAL_CLASS_LABELS if num_classes == 1000 else list(range(num_classes))


def main(args: argparse.Namespace) -> None:
    logger = create_logger("sample")
    device = parse_device(args.device)
    model, spec, _, _ = load_for_sampling(args, device, logger.info)
    graphs = speed_up_sampling(model, args, device, logger.info)
    vae = load_vae(spec.vae, device)
    diffusion = create_diffusion(str(args.num_sampling_steps))

    labels = args.class_labels or default_class_labels(spec.num_classes)
    if max(labels) >= spec.num_classes or min(labels) < 0:
        raise UserError(f"--class-labels must lie in 0..{spec.num_classes - 1}")
    y = torch.tensor(labels, device=device)
    noise = SampleNoise(args.seed, range(len(labels)), (spec.in_channels, spec.input_size, spec.input_size), device)
    samples = decode(vae, generate(model, diffusion, y, noise, args.cfg_scale, progress=True, graphs=graphs))
    save_png(make_grid(to_uint8(samples), nrow=args.nrow), args.output)
    logger.info(f"saved {len(labels)} samples to {args.output}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--backend", choices=BACKENDS, default="fake", help=BACKEND_HELP)
    parser.add_argument("--path", type=str, default=None,
                        help="a quantized checkpoint directory from QuantDiT.py (instead of --ckpt)")
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale (1 = none)")
    parser.add_argument("--num-sampling-steps", type=positive_int, default=250, help="respaced diffusion steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise: image i depends only on the seed and i")
    parser.add_argument("--class-labels", type=int, nargs="+", default=None,
                        help="one image per label; default: the official 8 ImageNet labels, or each class once")
    parser.add_argument("--nrow", type=positive_int, default=None, help="images per grid row (default: about square)")
    parser.add_argument("--output", type=str, default="sample.png", help="where to write the PNG grid")
    parser.add_argument("--device", type=str, default=default_device(), help="cuda or cpu")
    add_speed_arguments(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
