"""The diffusion process: schedule, respacing, samplers and losses against their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion import create_diffusion, get_named_beta_schedule, space_timesteps
from diffusion.likelihood import discretized_gaussian_log_likelihood, normal_kl


def test_linear_schedule_endpoints():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(betas), (0.02 - 1e-4) / 999)


def test_space_timesteps_examples():
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(1000, "1000") == set(range(1000))
    fifty = sorted(space_timesteps(1000, "50"))
    assert len(fifty) == 50 and fifty[0] == 0 and fifty[-1] == 999
    sections = sorted(space_timesteps(300, "10,15,20"))
    assert len(sections) == 45
    assert [s // 100 for s in sections] == [0] * 10 + [1] * 15 + [2] * 20
    with pytest.raises(ValueError):
        space_timesteps(10, "20")


def test_respacing_keeps_the_base_alphas_cumprod():
    base = np.cumprod(1 - get_named_beta_schedule("linear", 1000))
    for respacing in ["50", "250", "ddim25", ""]:
        d = create_diffusion(respacing)
        np.testing.assert_allclose(d.alphas_cumprod, base[d.timestep_map], rtol=1e-12)


def test_model_is_called_with_original_timesteps():
    d = create_diffusion("4")
    seen = []

    def model(x, t, **kwargs):
        seen.append(t.tolist())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    d.p_sample_loop(model, (1, 1, 2, 2), device="cpu")
    assert seen == [[999], [666], [333], [0]]


def perfect_denoiser(diffusion, x0_value: float):
    """The exact eps-prediction for data that is always the constant x0_value, zero var output."""
    base_alphas = np.cumprod(1 - get_named_beta_schedule("linear", 1000))

    def model(x, t, **kwargs):
        ab = torch.from_numpy(base_alphas)[t].float().view(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * x0_value) / (1 - ab).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    return model


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_samplers_recover_a_point_mass(loop):
    d = create_diffusion("50")
    torch.manual_seed(0)
    out = getattr(d, loop)(perfect_denoiser(d, 0.3), (2, 1, 4, 4), clip_denoised=False, device="cpu")
    assert torch.allclose(out, torch.full_like(out, 0.3), atol=1e-3)


def test_sampling_is_deterministic_for_a_seed(tiny_pixel_model):
    d = create_diffusion("10")
    y = torch.tensor([1, 2])

    def run(seed):
        torch.manual_seed(seed)
        return d.p_sample_loop(tiny_pixel_model, (2, 1, 8, 8), model_kwargs=dict(y=y), device="cpu")

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


def test_the_per_step_arrays_go_to_the_device_once(tiny_pixel_model, monkeypatch):
    """A host-to-device copy at every step would make the host wait for the GPU at every step."""
    d = create_diffusion("10")
    y = torch.tensor([1, 2])
    d.p_sample_loop(tiny_pixel_model, (2, 1, 8, 8), model_kwargs=dict(y=y), device="cpu")
    copies = []
    monkeypatch.setattr(torch, "from_numpy", lambda array: copies.append(array) or torch.as_tensor(array))
    d.p_sample_loop(tiny_pixel_model, (2, 1, 8, 8), model_kwargs=dict(y=y), device="cpu")
    assert copies == []


def test_noise_fn_supplies_the_step_noise():
    d = create_diffusion("5")
    calls = []

    def noise_fn(x):
        calls.append(x.shape)
        return torch.zeros_like(x)

    model = lambda x, t, **kw: torch.zeros(x.shape[0], 2, *x.shape[2:])  # noqa: E731
    x_T = torch.randn(1, 1, 2, 2)
    out = d.p_sample_loop(model, x_T.shape, noise=x_T, clip_denoised=False, noise_fn=noise_fn, device="cpu")
    assert len(calls) == 5
    # with zero eps and zero noise each step is the posterior mean with x0 = x_t / sqrt(ab_t)
    x = x_T.double()
    for i in reversed(range(5)):
        x0 = x / math.sqrt(d.alphas_cumprod[i])
        x = d.posterior_mean_coef1[i] * x0 + d.posterior_mean_coef2[i] * x
    assert torch.allclose(out.double(), x, rtol=1e-4, atol=1e-5)


def test_mse_loss_of_a_zero_model_is_the_noise_power():
    d = create_diffusion("", learn_sigma=False)
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    model = lambda x, t, **kw: torch.zeros_like(x)  # noqa: E731
    losses = d.training_losses(model, x0, torch.tensor([0, 500, 999]), noise=noise)
    assert torch.allclose(losses["loss"], (noise**2).mean(dim=(1, 2, 3)))
    assert "vb" not in losses


def test_learned_sigma_loss_adds_the_kl_to_the_true_posterior():
    d = create_diffusion("")
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 3])
    var_out = torch.full_like(x0, 0.9)
    model = lambda x, tt, **kw: torch.cat([noise, var_out], dim=1)  # noqa: E731  (perfect eps)
    losses = d.training_losses(model, x0, t, noise=noise)
    assert torch.allclose(losses["mse"], torch.zeros(2), atol=1e-10)
    # perfect eps: both means agree, so the KL is the variance mismatch only, in bits per dim
    for row, ti in enumerate(t.tolist()):
        min_log, max_log = d.posterior_log_variance_clipped[ti], math.log(d.betas[ti])
        frac = (0.9 + 1) / 2
        model_log = frac * max_log + (1 - frac) * min_log
        true_log = d.posterior_log_variance_clipped[ti]
        kl = 0.5 * (-1 + model_log - true_log + math.exp(true_log - model_log)) / math.log(2)
        assert kl > 0.01 and losses["vb"][row].item() == pytest.approx(kl, rel=1e-3)


def test_decoder_nll_at_t0_and_kl_elsewhere():
    d = create_diffusion("")
    x0 = torch.zeros(1, 1, 2, 2)
    t = torch.tensor([0])
    out = d._vb_terms_bpd(lambda x, tt, **kw: torch.zeros(1, 2, 2, 2), x0, d.q_sample(x0, t), t, clip_denoised=False)
    assert out["output"].item() > 0  # the decoder NLL in bits


def test_normal_kl_closed_form():
    kl = normal_kl(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0), torch.tensor(math.log(4.0)))
    expected = math.log(2.0) + (1 + 1) / (2 * 4) - 0.5
    assert kl.item() == pytest.approx(expected, rel=1e-6)


def test_discretized_likelihood_sums_to_one_over_all_levels():
    levels = torch.linspace(-1, 1, 256)
    means = torch.full_like(levels, 0.1)
    log_scales = torch.full_like(levels, math.log(0.3))
    probs = discretized_gaussian_log_likelihood(levels, means=means, log_scales=log_scales).exp()
    # the tanh CDF approximation is within about 1e-3 of the true CDF
    assert probs.sum().item() == pytest.approx(1.0, abs=5e-3)
