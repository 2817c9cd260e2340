"""The LoRA's factors as the integer kernels hold them (quant/split_lora.py): what R̃'s two int8
halves keep of R, the scales moved into L, and the integer arithmetic the kernels do with them."""

from __future__ import annotations

import torch

from quant.split_lora import LOW_SCALE, representable, right_values, split_lora


def ranks_of_all_sizes(k: int = 1152, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(32, k, generator=generator) * torch.logspace(-4, 1, 32)[:, None]


def test_the_halves_keep_r_to_14_bits_of_each_ranks_largest_value_and_l_takes_the_scales_exactly():
    right, left = ranks_of_all_sizes(), torch.randn(100, 32)
    scaled_left, split = split_lora(left, right)
    scale = (scaled_left / left)[0].double()
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)  # powers of two: L's values, rescaled
    assert torch.equal(scaled_left, (left.double() * scale).float())
    restored = scale[:, None] * right_values(split)
    largest = right.abs().amax(dim=1, keepdim=True).double()
    assert ((restored - right.double()).abs() <= largest / (2 * 63.5 * LOW_SCALE)).all()
    high, low = split.codes.chunk(2)
    assert high.abs().max() <= 127 and low.abs().max() <= 64
    assert (high.abs().amax(dim=1) >= 63).all()  # each rank uses the high half's range
    assert torch.equal(split.sums, split.codes.sum(dim=1, dtype=torch.int32)) and split.rank == 32


def test_a_representable_r_comes_back_exactly_and_a_zero_rank_stays_zero():
    right = representable(ranks_of_all_sizes(seed=1))
    assert torch.equal(representable(right), right)
    scaled_left, split = split_lora(torch.ones(1, 32), right)
    assert torch.equal((scaled_left[0].double()[:, None] * right_values(split)).float(), right)
    padded = torch.cat([right[:4], torch.zeros(12, 1152)])  # a rank padded to 16, as the layers do
    scaled_left, split = split_lora(torch.ones(3, 16), padded)
    assert not any(half[4:].any() for half in split.codes.chunk(2)) and torch.isfinite(scaled_left).all()


def test_the_kernels_integer_sums_less_the_zero_points_share_give_the_down_projection():
    """kernels._lora_down and hopper_gemm._split_down in float64: per half, the products of the
    stored codes (q − 128) less (z − 128)·Σhalf, then high + low / LOW_SCALE, equal (q − z)·R̃ᵀ."""
    generator = torch.Generator().manual_seed(2)
    _, split = split_lora(torch.ones(1, 32), ranks_of_all_sizes(seed=2))
    codes = torch.randint(-128, 128, (64, 1152), generator=generator, dtype=torch.int8)  # q − 128
    zero = torch.randint(0, 256, (64, 1), generator=generator).double()
    high, low = split.codes.double().chunk(2)
    sums_high, sums_low = split.sums.double().chunk(2)
    down = (codes.double() @ high.T - (zero - 128) * sums_high
            + (codes.double() @ low.T - (zero - 128) * sums_low) / LOW_SCALE)
    expected = (codes.double() + 128 - zero) @ right_values(split).T
    torch.testing.assert_close(down, expected, rtol=1e-12, atol=1e-9)
    assert (codes.double() @ high.T).abs().max() < 2**31  # the int32 sums cannot overflow at DiT's K
