"""Error-compensating rounding, the activation-weighted LoRA and the no-smoothing candidate
(QuantConfig options; QuantDiT.py's default recipe "best" turns all three on, "paper" none)."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_PIXEL_KWARGS, randomize
from quant.calibrate import CalibrationRun
from quant.compensate import compensated_codes, damped_cholesky, factor_and_inverse, inverse_cholesky
from quant.config import DEFAULT_RECIPE, RECIPES, QuantConfig
from quant.lowrank import exact_low_rank, quantize_with_low_rank
from quant.pipeline import quantize_dit
from quant.primitives import quantize_weight
from quant.smooth import candidate_factors
from runtime.checkpoints import ModelSpec


def correlated_inputs(rows: int, features: int, seed: int) -> torch.Tensor:
    """Inputs with correlated channels and a few large ones, like a transformer's activations."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) / features**0.5 + torch.eye(features)
    scale = 1 + 4 * (torch.rand(features, generator=generator) > 0.9)
    return (torch.randn(rows, features, generator=generator) @ mixing) * scale


def output_error(weight: torch.Tensor, approximation: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.norm((weight - approximation) @ x.T))


@pytest.mark.parametrize("granularity,bits,symmetric", [("per_channel", 4, False), ("per_group", 4, False),
                                                        ("per_channel", 3, False), ("per_channel", 4, True)])
@pytest.mark.parametrize("seed", range(3))
def test_compensated_rounding_never_has_a_larger_output_error_than_nearest(granularity, bits, symmetric, seed):
    x = correlated_inputs(512, 64, seed)
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(100 + seed))
    grid = quantize_weight(weight, bits, granularity, 16, symmetric)
    compensated = compensated_codes(weight, inverse_cholesky(damped_cholesky(x.T @ x, 0.01)), grid, symmetric, block=16)
    assert compensated.codes.dtype == torch.uint8 and int(compensated.codes.max()) <= 2**bits - 1
    assert int(compensated.codes.min()) >= (1 if symmetric else 0)
    assert torch.equal(compensated.scale, grid.scale) and torch.equal(compensated.zero, grid.zero)  # same grid
    nearest_error = output_error(weight, grid.dequantize(), x)
    assert output_error(weight, compensated.dequantize(), x) < 0.9 * nearest_error


def test_with_uncorrelated_unit_inputs_compensated_rounding_is_rounding_to_nearest():
    weight = torch.randn(16, 32)
    grid = quantize_weight(weight, 4)
    upper = inverse_cholesky(damped_cholesky(torch.eye(32) * 1000, 1e-9))
    assert torch.equal(compensated_codes(weight, upper, grid).codes, grid.codes)


def test_the_weighting_factor_squares_to_the_damped_input_moment():
    x = correlated_inputs(256, 24, 0)
    factor, inverse = factor_and_inverse(damped_cholesky(x.T @ x, 0.01))
    torch.testing.assert_close(factor @ inverse, torch.eye(24), atol=1e-3, rtol=0)
    torch.testing.assert_close(factor @ factor.T, x.T @ x + 0.01 * (x.T @ x).diagonal().mean() * torch.eye(24),
                               rtol=1e-3, atol=1e-2)


def test_every_square_root_of_h_gives_the_same_weighted_fit():
    """C = H^½ (symmetric) and C = the Cholesky factor weight the exact rank-r fit identically."""
    x = correlated_inputs(512, 32, 1)
    residual = torch.randn(40, 32, generator=torch.Generator().manual_seed(1))
    h = (x.T @ x).double()
    values, vectors = torch.linalg.eigh(h)
    root = (vectors * values.sqrt()) @ vectors.T
    fits = []
    for factor in (root, torch.linalg.cholesky(h)):
        left, right = exact_low_rank(residual.double() @ factor, 4)
        fits.append(left @ right @ torch.linalg.inv(factor))
    torch.testing.assert_close(fits[0], fits[1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("seed", range(3))
def test_the_activation_weighted_lora_lowers_the_output_error(seed):
    x = correlated_inputs(512, 64, seed)
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(seed))
    weighting = factor_and_inverse(damped_cholesky(x.T @ x, 0.01))

    def quantize(w):
        return quantize_weight(w, 4)

    plain = quantize_with_low_rank(weight, quantize, 8, 1, "exact")
    weighted = quantize_with_low_rank(weight, quantize, 8, 1, "exact", weighting=weighting)
    assert torch.equal(plain.weight.codes, weighted.weight.codes)  # one iteration: the same Q, another fit
    plain_error = output_error(weight, plain.weight.dequantize() + plain.left @ plain.right, x)
    weighted_error = output_error(weight, weighted.weight.dequantize() + weighted.left @ weighted.right, x)
    assert weighted_error < plain_error


def test_the_identity_candidate_is_the_last_row_of_ones():
    factors = candidate_factors(torch.rand(8) + 0.5, torch.rand(8) + 0.5, torch.tensor([0.0, 0.5]), identity=True)
    assert factors.shape == (3, 8) and torch.equal(factors[-1], torch.ones(8))
    assert candidate_factors(torch.rand(8), torch.rand(8), torch.tensor([0.5]), identity=False).shape == (1, 8)


def test_pipeline_with_compensated_rounding_weighted_lora_and_the_identity_candidate():
    spec = ModelSpec(dit_kwargs=dict(TINY_PIXEL_KWARGS), vae=None)
    run = CalibrationRun(tuple(range(10)), 1.5, 3, 0)
    reports = {}
    weight_parts = {**RECIPES["best"], "act_granularity": "per_tensor"}  # the α scores need the paper's ranges
    for name, changes in {"paper": RECIPES["paper"], "new": weight_parts}.items():
        config = QuantConfig(lora_rank=4, lora_iters=2, alpha_grid=(0.0, 0.5), search_rows_per_step=0, **changes)
        model = randomize(spec.build(), std=0.1)
        _, reports[name] = quantize_dit(model, config, run, torch.device("cpu"), progress=False)
    for paper, new in zip(reports["paper"].layers, reports["new"].layers):
        assert len(new.search_errors) == 3 and new.search_errors[:2] == paper.search_errors  # same α scores
        assert (new.alpha is None) == (new.search_errors[2] < min(new.search_errors[:2]))
        assert new.rtn_error == paper.rtn_error  # the baseline stays plain round-to-nearest
    # over the whole model, the new weights are closer to FP than the paper's on the calibration run
    assert sum(layer.final_error for layer in reports["new"].layers) < sum(
        layer.final_error for layer in reports["paper"].layers)


def grouped_weight(seed: int) -> torch.Tensor:
    """A weight whose groups of 64 inputs have different magnitudes (what per-group scales exploit)."""
    generator = torch.Generator().manual_seed(seed)
    magnitudes = (torch.rand(1, 4, generator=generator) * 3 + 0.2).repeat_interleave(64, dim=1)
    return torch.randn(48, 256, generator=generator) * magnitudes


@pytest.mark.parametrize("seed", range(3))
def test_two_level_groups_dequantize_through_int8_integers(seed):
    weight = grouped_weight(seed)
    two = quantize_weight(weight, 4, "two_level", 64)
    assert two.scale.shape == (48, 1) and two.group_scale.shape == two.zero.shape == (48, 4)
    assert int(two.codes.max()) <= 15 and int(two.group_scale.min()) >= 1
    codes = two.codes.reshape(48, 4, 64).to(torch.int32)
    in_int8 = (codes - two.zero.to(torch.int32)[..., None]) * two.group_scale.to(torch.int32)[..., None]
    assert int(in_int8.min()) >= -128 and int(in_int8.max()) <= 127  # an int8 GEMM operand after unpacking
    torch.testing.assert_close(two.dequantize(), (in_int8.reshape(48, 256).float() * two.scale), rtol=0, atol=0)
    error = {g: float(torch.linalg.norm(weight - quantize_weight(weight, 4, g, 64).dequantize()))
             for g in ("per_channel", "per_group", "two_level")}
    assert error["two_level"] < error["per_channel"] and error["two_level"] < 1.15 * error["per_group"]


def test_compensated_rounding_keeps_two_level_codes_inside_int8():
    x = correlated_inputs(512, 256, 0)
    weight = grouped_weight(0)
    grid = quantize_weight(weight, 4, "two_level", 64)
    compensated = compensated_codes(weight, inverse_cholesky(damped_cholesky(x.T @ x, 0.01)), grid)
    low, high = grid.code_bounds()
    codes = compensated.codes.reshape(48, 4, 64)
    assert bool((codes >= low[..., None]).all() and (codes <= high[..., None]).all())
    assert torch.equal(compensated.group_scale, grid.group_scale)
    assert output_error(weight, compensated.dequantize(), x) < output_error(weight, grid.dequantize(), x)


def test_a_two_level_model_saves_and_loads_and_the_kernels_cover_it(tmp_path):
    from quant.checkpoint import load_quantized, save_quantized
    from quant.modules import QuantLinear
    from quant.triton_modules import kernel_unsupported_reason

    spec = ModelSpec(dit_kwargs=dict(TINY_PIXEL_KWARGS), vae=None)
    config = QuantConfig(weight_granularity="two_level", weight_group_size=32, lora_rank=4, alpha_grid=(0.5,))
    model, _ = quantize_dit(randomize(spec.build(), std=0.1), config,
                            CalibrationRun(tuple(range(10)), 1.5, 2, 0), torch.device("cpu"), progress=False)
    loaded, loaded_config, _, _ = load_quantized(save_quantized(tmp_path / "q", model, config, spec), "cpu")
    assert loaded_config == config
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 900]), torch.tensor([0, 9])
    assert torch.equal(model(x, t, y), loaded(x, t, y))
    qkv = loaded.blocks[0].attn.qkv
    assert isinstance(qkv, QuantLinear) and qkv.weight_group_scale.dtype == torch.uint8
    assert kernel_unsupported_reason(qkv) is None  # the int8 kernels run two-level groups


def test_a_model_whose_layers_chose_no_smoothing_saves_and_loads(tmp_path, monkeypatch):
    import quant.pipeline
    from quant.checkpoint import load_quantized, save_quantized

    monkeypatch.setattr(quant.pipeline, "best_candidate", lambda losses: len(losses) - 1)  # the identity
    spec = ModelSpec(dit_kwargs=dict(TINY_PIXEL_KWARGS), vae=None)
    config = QuantConfig(lora_rank=4, alpha_grid=(0.5,), identity_candidate=True)
    model, report = quantize_dit(randomize(spec.build(), std=0.1), config,
                                 CalibrationRun(tuple(range(10)), 1.5, 2, 0), torch.device("cpu"), progress=False)
    assert all(layer.alpha is None for layer in report.layers)
    fc2 = model.blocks[0].mlp.fc2
    assert torch.equal(fc2.smooth_inv, torch.ones_like(fc2.smooth_inv))  # s = 1, kept on the fly like any fc2
    loaded, _, _, _ = load_quantized(save_quantized(tmp_path / "q", model, config, spec), "cpu")
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 900]), torch.tensor([0, 9])
    assert torch.equal(model(x, t, y), loaded(x, t, y))


# QuantConfig's field defaults before the recipes existed: "paper" must keep every one of them.
PUBLISHED_METHOD = dict(weight_bits=4, act_bits=8, weight_granularity="per_channel", weight_group_size=128,
                        weight_symmetric=False, act_granularity="per_tensor", act_dynamic=True, smooth=True,
                        lora_rank=32, lora_iters=10, low_rank_method="randomized", search_lora_iters=0,
                        search_rows_per_step=512, adaln_weight_bits=None, rounding="nearest", lora_weighting="plain",
                        identity_candidate=False, hessian_damping=0.01)


def quantdit_config(*argv: str) -> QuantConfig:
    import QuantDiT

    return QuantDiT.quant_config_from_args(QuantDiT.parse_args(["--ckpt", "x.pt", *argv]))


def test_the_paper_recipe_is_the_published_method_and_best_is_the_default():
    paper = quantdit_config("--recipe", "paper")
    assert {name: getattr(paper, name) for name in PUBLISHED_METHOD} == PUBLISHED_METHOD
    assert paper.alpha_grid == tuple(round(0.05 * i, 2) for i in range(21))
    assert DEFAULT_RECIPE == "best"
    best = quantdit_config()
    assert (best.rounding, best.lora_weighting, best.identity_candidate, best.act_granularity) == (
        "compensated", "activation", True, "per_token")
    assert quantdit_config("--recipe", "best") == best


def test_explicit_flags_override_the_recipe():
    config = quantdit_config("--rounding", "nearest", "--no-identity-candidate")
    assert (config.rounding, config.lora_weighting, config.identity_candidate) == ("nearest", "activation", False)
    config = quantdit_config("--recipe", "paper", "--lora-weighting", "activation")
    assert (config.rounding, config.lora_weighting, config.identity_candidate) == ("nearest", "activation", False)
    assert config.act_granularity == "per_tensor"
    assert quantdit_config("--act-granularity", "per_tensor").act_granularity == "per_tensor"


def test_the_paper_recipe_reproduces_the_published_codes_bit_for_bit():
    """The same tiny model quantized with "paper" and with the published settings spelled out field
    by field: identical integer codes, scales, zero points and LoRA factors."""
    spec = ModelSpec(dit_kwargs=dict(TINY_PIXEL_KWARGS), vae=None)
    run = CalibrationRun(tuple(range(10)), 1.5, 3, 0)
    small = dict(lora_rank=4, lora_iters=2, alpha_grid=(0.0, 0.5), search_rows_per_step=0)
    models = []
    for config in (QuantConfig(**RECIPES["paper"], **small), QuantConfig(**(PUBLISHED_METHOD | small))):
        torch.manual_seed(0)
        model, _ = quantize_dit(randomize(spec.build(), std=0.1), config, run, torch.device("cpu"), progress=False)
        models.append(model.state_dict())
    assert models[0].keys() == models[1].keys()
    for name, tensor in models[0].items():
        assert torch.equal(tensor, models[1][name]), name


def test_every_rounding_and_lora_weighting_the_config_accepts_has_its_part():
    from quant.config import LORA_WEIGHTINGS, ROUNDINGS
    from quant.layers import LORA_METRICS, ROUNDERS

    assert set(ROUNDERS) == set(ROUNDINGS) and set(LORA_METRICS) == set(LORA_WEIGHTINGS)


def test_the_calibration_run_accumulates_h_exactly_when_a_chosen_part_reads_it():
    from quant.layers import needs_input_gram

    assert not needs_input_gram(QuantConfig(**RECIPES["paper"]))
    assert needs_input_gram(QuantConfig(**RECIPES["best"]))
    assert needs_input_gram(QuantConfig(rounding="compensated")) and needs_input_gram(
        QuantConfig(lora_weighting="activation"))
    assert not needs_input_gram(QuantConfig(identity_candidate=True, act_granularity="per_token"))
