"""Gaussian diffusion for training and sampling, with the ADM/DiT signatures and numerics.

The process constants are float64 numpy arrays (as in ADM) and are cast to float32 only when a
batch of timesteps is looked up, so results match the reference implementation to float rounding.
A respaced process (`SpacedDiffusion`) keeps a subset of the original timesteps; the model is
always called with the original timestep indices.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from .likelihood import discretized_gaussian_log_likelihood, normal_kl

NoiseFn = Callable[[torch.Tensor], torch.Tensor]


class ModelMeanType(enum.Enum):
    """What the model predicts."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the added noise


class ModelVarType(enum.Enum):
    """The reverse-process variance. LEARNED_RANGE interpolates (in log space) between the
    posterior variance (FIXED_SMALL) and beta_t (FIXED_LARGE) with a model output in [-1, 1]."""

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE, plus the variational bound when the variance is learned
    RESCALED_MSE = enum.auto()  # as MSE, with the bound scaled by num_timesteps / 1000
    KL = enum.auto()  # the variational bound alone
    RESCALED_KL = enum.auto()  # the bound times num_timesteps, an estimate of the full bound

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


class GaussianDiffusion:
    """A discrete-time Gaussian diffusion process of `len(betas)` steps.

    :param betas: float64 betas, one per step, from t = 0 (least noise) upwards.
    :param timestep_map: the original-process timestep of each step, passed to the model. None
        means the identity (an unspaced process).
    """

    def __init__(
        self,
        *,
        betas: np.ndarray,
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
        timestep_map: Iterable[int] | None = None,
    ):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self.timestep_map = list(range(self.num_timesteps)) if timestep_map is None else list(timestep_map)
        if len(self.timestep_map) != self.num_timesteps:
            raise ValueError("timestep_map needs one entry per step")

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0, so its log is clipped to the value at t = 1.
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if self.num_timesteps > 1
            else np.array([])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        # ModelVarType.FIXED_LARGE: beta_t, but the posterior variance at t = 0 for a better decoder likelihood
        self.fixed_large_variance = np.append(self.posterior_variance[1:2], betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self.timestep_map_array = np.asarray(self.timestep_map, dtype=np.int64)
        self._device_arrays: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _on_device(self, name: str, device: torch.device) -> torch.Tensor:
        """The per-step array `name` as a tensor on `device`, copied there once: a copy at every
        sampling step would make the host wait for the GPU's queued work each time."""
        key = (name, device)
        if key not in self._device_arrays:
            self._device_arrays[key] = torch.from_numpy(getattr(self, name)).to(device)
        return self._device_arrays[key]

    def _extract(self, name: str, t: torch.Tensor, broadcast_shape: torch.Size) -> torch.Tensor:
        """The per-step array `name` at t, as float32 on t's device, shaped to broadcast against
        `broadcast_shape`."""
        out = self._on_device(name, t.device)[t].float()
        return out.view(-1, *([1] * (len(broadcast_shape) - 1))).expand(broadcast_shape)

    # ------------------------------------------------------------------ the model call

    def _call_model(self, model, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None):
        original_t = self._on_device("timestep_map_array", t.device)[t].to(t.dtype)
        return model(x, original_t, **(model_kwargs or {}))

    # ------------------------------------------------------------------ forward process

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0), with the given noise if any."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_start {tuple(x_start.shape)}")
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
            + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t.shape)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t.shape)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reverse process

    def _split_variance(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor):
        """The mean part of the model output, and the reverse-process variance and its log."""
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            channels = x.shape[1]
            if model_output.shape != (x.shape[0], channels * 2, *x.shape[2:]):
                raise ValueError(
                    f"a learned-variance model must output {channels * 2} channels, got {tuple(model_output.shape)}"
                )
            model_output, var_values = torch.split(model_output, channels, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                log_variance = var_values
            else:
                min_log = self._extract("posterior_log_variance_clipped", t, x.shape)
                max_log = self._extract("log_betas", t, x.shape)
                frac = (var_values + 1) / 2  # [-1, 1] -> [min, max]
                log_variance = frac * max_log + (1 - frac) * min_log
            return model_output, torch.exp(log_variance), log_variance

        if self.model_var_type == ModelVarType.FIXED_LARGE:
            variance, log_variance = "fixed_large_variance", "fixed_large_log_variance"
        else:
            variance, log_variance = "posterior_variance", "posterior_log_variance_clipped"
        return model_output, self._extract(variance, t, x.shape), self._extract(log_variance, t, x.shape)

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None) -> dict:
        """p(x_{t-1} | x_t) from one model call: its mean, variance, log variance, and the x_0
        prediction (passed through `denoised_fn`, then clipped to [-1, 1] if `clip_denoised`)."""
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        model_output = self._call_model(model, x, t, model_kwargs)
        extra = None
        if isinstance(model_output, tuple):
            model_output, extra = model_output
        model_output, variance, log_variance = self._split_variance(model_output, x, t)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(model_output)
        elif self.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
        else:
            raise NotImplementedError("PREVIOUS_X prediction is not supported by the samplers")
        mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart, "extra": extra}

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t.shape
        )

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the mean by variance · ∇log p(y|x) (Sohl-Dickstein et al. guidance)."""
        gradient = self._call_model(cond_fn, x, t, model_kwargs)
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the score by ∇log p(y|x) (Song et al. guidance), for DDIM."""
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * self._call_model(cond_fn, x, t, model_kwargs)
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    @staticmethod
    def _nonzero_mask(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """1 where t > 0, 0 at the last step (no noise is added there)."""
        return (t != 0).float().view(-1, *([1] * (x.ndim - 1)))

    def p_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
        noise_fn: NoiseFn | None = None,
    ) -> dict:
        """One ancestral step x_t -> x_{t-1}. `noise_fn(x)` supplies the step's noise (default
        torch.randn_like), which lets a caller tie each sample's noise to its own generator."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        noise = (noise_fn or torch.randn_like)(x)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + self._nonzero_mask(t, x) * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, eta=0.0,
        noise_fn: NoiseFn | None = None,
    ) -> dict:
        """One DDIM step (Song et al., eq. 12); eta = 0 is deterministic."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        # Re-derive eps from x_0 so x_0-predicting models work too.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = (noise_fn or torch.randn_like)(x)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        sample = mean_pred + self._nonzero_mask(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
        device=None, progress=False, noise_fn: NoiseFn | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling from x_T (`noise`, or fresh Gaussian noise of `shape`) to x_0."""
        steps = self.p_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, noise_fn=noise_fn,
        )
        return deque(steps, maxlen=1)[0]["sample"]

    def p_sample_loop_progressive(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
        device=None, progress=False, noise_fn: NoiseFn | None = None,
    ) -> Iterator[dict]:
        """As p_sample_loop, yielding each step's {"sample", "pred_xstart"}."""

        def step(x, t):
            return self.p_sample(model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs, noise_fn=noise_fn)

        yield from self._reverse_process(step, model, shape, noise, device, progress)

    def ddim_sample_loop(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
        device=None, progress=False, eta=0.0, noise_fn: NoiseFn | None = None,
    ) -> torch.Tensor:
        """DDIM sampling from x_T to x_0."""
        steps = self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, eta=eta, noise_fn=noise_fn,
        )
        return deque(steps, maxlen=1)[0]["sample"]

    def ddim_sample_loop_progressive(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
        device=None, progress=False, eta=0.0, noise_fn: NoiseFn | None = None,
    ) -> Iterator[dict]:
        """As ddim_sample_loop, yielding each step's {"sample", "pred_xstart"}."""

        def step(x, t):
            return self.ddim_sample(model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs, eta, noise_fn=noise_fn)

        yield from self._reverse_process(step, model, shape, noise, device, progress)

    def _reverse_process(self, step, model, shape, noise, device, progress) -> Iterator[dict]:
        """Run `step(x_t, t)` from t = T-1 down to 0, starting at `noise` or fresh N(0, I)."""
        if device is None:
            device = next(model.parameters()).device
        x = noise if noise is not None else torch.randn(*shape, device=device)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc="sampling", unit="step")
        for i in indices:
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = step(x, t)
            yield out
            x = out["sample"]

    # ------------------------------------------------------------------ training

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None) -> dict:
        """One term of the variational bound in bits per dimension: the decoder NLL at t = 0,
        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) elsewhere."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None) -> dict:
        """Per-sample losses at timesteps t: {"loss"} and, by loss type, {"mse", "vb"}.

        With a learned variance the bound trains the variance only: the mean output is detached
        before the bound is computed, so the mean is trained by the MSE alone.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = self._call_model(model, x_t, t, model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            channels = x_t.shape[1]
            model_output, var_values = torch.split(model_output, channels, dim=1)
            frozen_out = torch.cat([model_output.detach(), var_values], dim=1)
            # The frozen output is returned as is: the lambda ignores the (mapped) timesteps.
            terms["vb"] = self._vb_terms_bpd(lambda *args, r=frozen_out: r, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        target = {
            ModelMeanType.PREVIOUS_X: lambda: self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0],
            ModelMeanType.START_X: lambda: x_start,
            ModelMeanType.EPSILON: lambda: noise,
        }[self.model_mean_type]()
        if model_output.shape != target.shape:
            raise ValueError(f"model output {tuple(model_output.shape)} does not match the target {tuple(target.shape)}")
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion process that keeps only `use_timesteps` of a base process.

    Betas are recomputed so the kept steps have the base process's alphas_cumprod; the model is
    called with the base-process timestep indices.
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
        self.use_timesteps = set(use_timesteps)
        base_betas = np.asarray(kwargs.pop("betas"), dtype=np.float64)
        self.original_num_steps = len(base_betas)
        base_alphas_cumprod = np.cumprod(1.0 - base_betas)
        kept = sorted(i for i in self.use_timesteps if 0 <= i < self.original_num_steps)
        if len(kept) != len(self.use_timesteps) or not kept:
            raise ValueError(f"use_timesteps must be a non-empty subset of 0..{self.original_num_steps - 1}")
        previous = np.append(1.0, base_alphas_cumprod[kept[:-1]])
        new_betas = 1 - base_alphas_cumprod[kept] / previous
        super().__init__(betas=new_betas, timestep_map=kept, **kwargs)
