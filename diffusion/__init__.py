"""Gaussian diffusion with the ADM/DiT interface: `create_diffusion("250")`, then
`p_sample_loop`, `ddim_sample_loop` or `training_losses` on the returned process."""

from __future__ import annotations

from .gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, SpacedDiffusion
from .schedule import get_named_beta_schedule, space_timesteps

__all__ = [
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "SpacedDiffusion",
    "create_diffusion",
    "get_named_beta_schedule",
    "space_timesteps",
]


def create_diffusion(
    timestep_respacing,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> SpacedDiffusion:
    """The DiT diffusion: a `diffusion_steps`-step schedule respaced to `timestep_respacing`
    ("" or None keeps every step; "250", "10,20", "ddim25", … as in `space_timesteps`)."""
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
    )
