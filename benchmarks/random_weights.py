"""Stand-ins for weights that cannot be downloaded here: a random DiT checkpoint and a random SD VAE.

    python -m benchmarks.random_weights --model DiT-XL/2 --out work/xl      # work/xl/DiT-XL-2-random.safetensors + .json
    python -m benchmarks.random_weights --vae-cache work/hf                  # then HF_HOME=work/hf HF_HUB_OFFLINE=1

Speed and process-count checks of the real scripts need the real architectures, not the real
values. The VAE is written into a Hugging Face cache under the official repository name
(stabilityai/sd-vae-ft-<kind>), so `vae.load_vae` loads it through `from_pretrained` unchanged;
its weights are random, so decoded images are noise. Needs diffusers for the VAE.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.quantize_speed import random_dit
from runtime.checkpoints import spec_from_name, write_spec_json

# The architecture of stabilityai/sd-vae-ft-ema and -mse (their config.json).
SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu",
    block_out_channels=(128, 256, 512, 512), sample_size=256,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
FAKE_REVISION = "0" * 40  # the snapshot name a cache needs; no such commit exists upstream


def write_random_checkpoint(model: str, image_size: int, folder: Path, seed: int = 0) -> Path:
    """A random `model` checkpoint (safetensors) with its spec JSON beside it; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{model.replace('/', '-')}-{image_size}-random.safetensors"
    state = random_dit(model, image_size, torch.device("cpu"), seed).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    write_spec_json(spec_from_name(model, image_size=image_size), path.with_suffix(".json"))
    return path


def write_random_vae_cache(hf_home: Path, kind: str = "ema", seed: int = 0) -> Path:
    """A random SD VAE saved as the snapshot of stabilityai/sd-vae-ft-<kind> in the cache at hf_home."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(seed)
    repo = hf_home / "hub" / f"models--stabilityai--sd-vae-ft-{kind}"
    snapshot = repo / "snapshots" / FAKE_REVISION
    AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(FAKE_REVISION)
    return snapshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="DiT registry name (e.g. DiT-XL/2) of a random checkpoint")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("pretrained_models"), help="folder of the checkpoint")
    parser.add_argument("--vae-cache", type=Path, default=None, help="HF_HOME folder to hold a random SD VAE")
    parser.add_argument("--vae", default="ema", choices=["ema", "mse"])
    args = parser.parse_args()
    if args.model:
        print(write_random_checkpoint(args.model, args.image_size, args.out))
    if args.vae_cache:
        print(write_random_vae_cache(args.vae_cache, args.vae))


if __name__ == "__main__":
    main()
