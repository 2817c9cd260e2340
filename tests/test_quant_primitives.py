"""Quantizers, packing, the low-rank correction, smoothing factors and folding."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from quant.config import QuantConfig
from quant.lowrank import exact_low_rank, quantize_with_low_rank, randomized_low_rank
from quant.primitives import (
    fake_quant_activation,
    pack_int4,
    quantize_activation,
    quantize_weight,
    unpack_int4,
)
from quant.smooth import best_candidate, smoothing_factors, static_activation_range


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_weight_codes_are_b_bit_integers_and_round_to_nearest(bits, granularity, symmetric):
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.rand(16, 1)
    q = quantize_weight(w, bits, granularity, group_size=16, symmetric=symmetric)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    assert q.zero.dtype == torch.uint8 and int(q.zero.max()) <= 2**bits - 1
    expected_scales = {"per_tensor": (1, 1), "per_channel": (16, 1), "per_group": (16, 4)}[granularity]
    assert tuple(q.scale.shape) == expected_scales
    # every value inside the grid's range is within half a step of its code
    error = (q.dequantize() - w).abs()
    step = q.scale.repeat_interleave(64 // q.scale.shape[1], dim=1).expand_as(w)
    assert torch.all(error <= step / 2 + 1e-6)


def test_asymmetric_grid_spans_the_row_range_exactly():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    q = quantize_weight(w, 2, "per_channel")
    assert q.scale.item() == pytest.approx(1.0) and q.zero.item() == 1
    # 0.5 / 1 rounds half to even: code 0 + zero point 1
    assert torch.equal(q.codes, torch.tensor([[0, 1, 1, 3]], dtype=torch.uint8))


def test_symmetric_zero_point_is_the_midpoint():
    w = torch.tensor([[-7.0, 2.0, 7.0]])  # max |w| = 7 = (2^3 - 1) steps of 1
    q = quantize_weight(w, 4, "per_channel", symmetric=True)
    assert q.zero.item() == 8 and q.scale.item() == pytest.approx(1.0)
    assert torch.equal(q.codes, torch.tensor([[1, 10, 15]], dtype=torch.uint8))
    assert torch.allclose(q.dequantize(), w)


def test_row_scaling_of_quantized_weights_is_exact():
    torch.manual_seed(1)
    w = torch.randn(8, 32)
    d = torch.rand(8) + 0.5
    q = quantize_weight(w, 4)
    scaled = dataclasses.replace(q, scale=q.scale * d[:, None])  # what fold_into_value_rows does to V's rows
    assert torch.allclose(scaled.dequantize(), d[:, None] * quantize_weight(w, 4).dequantize(), atol=1e-6)
    # ... and equals quantizing the scaled weight directly (codes unchanged)
    assert torch.equal(quantize_weight(d[:, None] * w, 4).codes, scaled.codes)


def test_int4_packing_round_trip():
    codes = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 6) and torch.equal(unpack_int4(packed), codes)
    assert packed[0, 0] == codes[0, 0] | (codes[0, 1] << 4)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
def test_activation_quantization(granularity):
    torch.manual_seed(2)
    x = torch.randn(4, 10, 32) * 3 + 1
    bits = 8
    xq = fake_quant_activation(x, bits, granularity)
    if granularity == "per_tensor":
        lo, hi = x.min(), x.max()
        codes, scale, zero = quantize_activation(x, bits, lo, hi)
        assert codes.min() >= 0 and codes.max() <= 255 and codes.eq(codes.round()).all()
        assert torch.all((xq - x).abs() <= scale / 2 + 1e-6)
    assert (xq - x).abs().max() < (x.max() - x.min()) / 255
    # a range computed per candidate: the candidate dimension is not mixed
    stacked = torch.stack([x, 100 * x])
    assert torch.allclose(fake_quant_activation(stacked, bits, granularity, batch_dims=1)[0], xq)


def test_static_range_clips():
    x = torch.tensor([-2.0, 0.0, 1.0, 5.0])
    out = fake_quant_activation(x, 8, static_range=(torch.tensor(-1.0), torch.tensor(1.0)))
    half_step = 2.0 / 255 / 2  # the integer zero point shifts the grid by at most half a step
    assert out.min() >= -1.0 - half_step and out.max() <= 1.0 + half_step


def test_smoothing_factor_formula_and_endpoints():
    a, w = torch.tensor([4.0, 1.0, 0.25]), torch.tensor([1.0, 2.0, 0.5])
    s = smoothing_factors(a, w, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(s[0], 1 / w) and torch.allclose(s[2], a)
    assert torch.allclose(s[1], a.sqrt() / w.sqrt())


def test_static_range_of_smoothed_inputs_is_exact():
    torch.manual_seed(3)
    x = torch.randn(100, 6)
    s = torch.rand(6) + 0.1
    lo, hi = static_activation_range(x.amin(0), x.amax(0), s)
    assert lo.item() == pytest.approx((x / s).min().item()) and hi.item() == pytest.approx((x / s).max().item())


def test_best_candidate_is_the_argmin():
    assert best_candidate(torch.tensor([3.0, 1.0, 2.0, 1.0])) == 1


def test_low_rank_fits():
    torch.manual_seed(4)
    a = torch.randn(40, 6) @ torch.randn(6, 30) + 0.01 * torch.randn(40, 30)
    left, right = exact_low_rank(a, 6)
    s = torch.linalg.svdvals(a)
    assert torch.linalg.norm(a - left @ right) == pytest.approx(s[6:].norm().item(), rel=1e-4)
    left, right = randomized_low_rank(a, 6, torch.Generator().manual_seed(0))
    assert torch.linalg.norm(a - left @ right) <= 1.01 * s[6:].norm()


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_lora_iterations_never_increase_the_error(method):
    torch.manual_seed(5)
    w = torch.randn(48, 64) + torch.randn(48, 1) * torch.randn(1, 64)  # a spread of row ranges
    config = QuantConfig()

    def quantize(m):
        return quantize_weight(m, 3, config.weight_granularity)

    fitted = quantize_with_low_rank(w, quantize, rank=8, iters=10, method=method,
                                    generator=torch.Generator().manual_seed(0))
    errors = fitted.errors
    assert all(later <= earlier for earlier, later in zip(errors, errors[1:]))
    final = torch.linalg.norm(w - fitted.weight.dequantize() - fitted.left @ fitted.right)
    assert final.item() == pytest.approx(errors[-1], rel=1e-4)
    rtn_only = torch.linalg.norm(w - quantize(w).dequantize())
    assert final < rtn_only  # the correction helps


def test_config_validation_and_round_trip():
    config = QuantConfig(weight_bits=3, act_bits=6, alpha_grid=(0.5,))
    assert QuantConfig.from_dict(config.to_dict()) == config
    for bad in [dict(weight_bits=1), dict(weight_bits=9), dict(act_bits=3), dict(act_bits=17),
                dict(weight_granularity="per_tensor"), dict(act_granularity="per_token", act_dynamic=False),
                dict(alpha_grid=(1.5,)), dict(low_rank_method="qr")]:
        with pytest.raises(ValueError):
            dataclasses.replace(config, **bad)
    with pytest.raises(ValueError, match="unknown"):
        QuantConfig.from_dict({"bits": 4})
