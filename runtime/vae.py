"""The Stable Diffusion VAE that maps DiT latents to images (latent models only).

diffusers is imported only when a latent model is used, so pixel-space models (the demo) need
neither diffusers nor network access.
"""

from __future__ import annotations

import torch

from runtime.errors import UserError

LATENT_SCALE = 0.18215  # DiT's latents are the SD VAE's latents times this factor


def load_vae(kind: str | None, device: str | torch.device):
    """`stabilityai/sd-vae-ft-<kind>` on `device`, or None for a pixel-space model."""
    if kind is None:
        return None
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise UserError("latent models need diffusers for the SD VAE: pip install diffusers") from None
    repo = f"stabilityai/sd-vae-ft-{kind}"
    try:
        return AutoencoderKL.from_pretrained(repo).to(device).eval()
    except OSError as error:
        raise UserError(
            f"cannot load the VAE {repo} ({str(error).splitlines()[0]}); connect to the Hugging Face Hub once "
            "or set HF_HOME to a cache that holds it"
        ) from None


@torch.no_grad()
def decode(vae, samples: torch.Tensor) -> torch.Tensor:
    """Model samples -> images in about [-1, 1]; identity for a pixel-space model."""
    if vae is None:
        return samples
    return vae.decode(samples / LATENT_SCALE).sample
