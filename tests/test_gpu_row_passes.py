"""The row passes compiled for a CUDA GPU, at DiT-XL/2's shapes: the pass that takes proj's per-token
ranges itself against torch's reduction + the plain pass, and the W4 unpack beside a pass against
the unpack kernel. Run alone on a CUDA machine (`python -m pytest tests/test_gpu_row_passes.py`):
in the full suite test_backends turns on Triton's CPU interpreter first, which these tests skip."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from quant.split_lora import right_values  # noqa: E402

GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
pytestmark = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU and Triton's compiler (not its interpreter)")

XL_HIDDEN = 1152


@pytest.mark.parametrize("rows", [512, 4096])
def test_on_the_gpu_the_ranged_pass_takes_the_layers_ranges_and_codes(rows):
    from benchmarks.synthetic import outlier_input, quantized_layer_pair
    from quant.kernels import quantize_rows, ranged_quantize_rows

    device = torch.device("cuda")
    _, layer = quantized_layer_pair(XL_HIDDEN, XL_HIDDEN, 4, False, device, act_granularity="per_token")
    x = outlier_input(rows, XL_HIDDEN, device, torch.bfloat16, seed=2)
    codes, rowsum, down, qparams = ranged_quantize_rows(x, 8, layer.split_right)
    expected = layer.qparams(x)
    # the same ranges: scales equal up to a division's last bit, so a zero point (−lo/scale rounded)
    # may take the other neighbour in the few rows where −lo/scale sits on a tie (a symmetric range
    # gives 127.5): torch on CUDA and the pass divide differently (scratch diagnosis, RESULTS)
    torch.testing.assert_close(qparams[0], expected[0], rtol=1e-6, atol=0)
    same_zero = qparams[1] == expected[1]
    assert (qparams[1] - expected[1]).abs().max() <= 1 and same_zero.float().mean() > 0.95
    reference = quantize_rows(x, qparams, 8, None, layer.split_right, splits=1)
    assert torch.equal(codes, reference[0]) and torch.equal(rowsum, reference[1])
    torch.testing.assert_close(down, reference[2], rtol=1e-3, atol=1e-2)
    plain = quantize_rows(x, expected, 8, None, layer.split_right, splits=1)[0]
    differ = (codes.int() - plain.int())[same_zero]
    assert differ.abs().max() <= 1 and (differ != 0).float().mean() < 1e-3


@pytest.mark.parametrize("role", ["qkv", "proj", "fc1", "fc2"])
def test_on_the_gpu_the_unpack_beside_a_pass_equals_the_unpack_kernel(role):
    from benchmarks.synthetic import layer_shapes, outlier_input, quantized_layer_pair
    from quant.kernels import PackedWeight, norm_quantize_rows, quantize_rows, unpack_signed

    device = torch.device("cuda")
    k, n = layer_shapes(XL_HIDDEN)[role]
    _, layer = quantized_layer_pair(k, n, 4, role == "fc2", device, act_granularity="per_token")
    assert layer.packed
    x = outlier_input(512, k, device, torch.bfloat16, seed=k)
    if role in ("qkv", "fc1"):  # the norm pass (2 samples of 256 tokens)
        modulation = torch.randn(2, 6 * k, device=device, dtype=torch.bfloat16) * 0.3
        run = lambda unpack: norm_quantize_rows(x, modulation[:, :k], modulation[:, k:2 * k], 256, 1e-6, 8,  # noqa: E731
                                                layer.split_right, unpack)
    else:
        qparams = layer.qparams(x)
        run = lambda unpack: quantize_rows(x, qparams, 8, layer.smooth_inv, layer.split_right, unpack=unpack)  # noqa: E731
    unpack = PackedWeight(layer.weight, torch.full((n, k), 99, dtype=torch.int8, device=device))
    beside, alone = run(unpack), run(None)
    assert all(torch.equal(a, b) for a, b in zip(beside, alone) if a is not None)
    assert torch.equal(unpack.unpacked, unpack_signed(layer.weight, k))


@pytest.mark.parametrize("norm", [True, False])
def test_on_the_gpu_the_lora_down_projection_apart_matches_the_pass(norm, monkeypatch):
    """kernels.LORA_DOWN_APART_FROM_ROWS at batch 64's 32,768 rows: lora_down gives the down-projection
    of the pass's own codes up to the order of its float32 sums, and the pass without its LoRA the
    codes, ranges and row sums of the pass with it: bit for bit without the norm; with it, the
    autotuner may give the LoRA-less pass other tile widths, and so other roundings of the rows'
    mean and variance (a code off by one in a few rows, as against torch's norm)."""
    from benchmarks.synthetic import outlier_input, quantized_layer_pair
    from quant import kernels

    device = torch.device("cuda")
    rows = 32768
    _, layer = quantized_layer_pair(XL_HIDDEN, XL_HIDDEN, 4, False, device, act_granularity="per_token")
    x = outlier_input(rows, XL_HIDDEN, device, torch.bfloat16, seed=4)
    modulation = torch.randn(rows // 256, 2 * XL_HIDDEN, device=device, dtype=torch.bfloat16) * 0.3
    if norm:
        run = lambda: kernels.norm_quantize_rows(x, modulation[:, :XL_HIDDEN], modulation[:, XL_HIDDEN:], 256,  # noqa: E731
                                                 1e-6, 8, layer.split_right)
    else:
        run = lambda: kernels.ranged_quantize_rows(x, 8, layer.split_right)  # noqa: E731
    monkeypatch.setattr(kernels, "LORA_DOWN_APART_FROM_ROWS", None)
    inside = run()
    monkeypatch.setattr(kernels, "LORA_DOWN_APART_FROM_ROWS", rows)
    codes, rowsum, down, qparams = run()
    centered = codes.double() + 128 - qparams[1].double()[:, None]
    expected = centered @ right_values(layer.split_right).T
    torch.testing.assert_close(down[0].double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    if norm:
        assert_nearly_the_same_pass(codes, qparams, inside[0], inside[3])
    else:
        assert torch.equal(codes, inside[0]) and torch.equal(rowsum, inside[1]) and torch.equal(qparams, inside[3])
        torch.testing.assert_close(down, inside[2], rtol=1e-4, atol=1e-3 * inside[2].abs().max().item())


def test_on_the_gpu_the_norm_pass_takes_its_moments_from_the_gated_epilogue():
    """proj's gated update at batch 64's 32,768 rows writes the rows' moments on the Gluon GEMM;
    fc1's norm pass from them gives the ranges and codes of the pass that reads the rows for them
    (a code off by one in a few rows: other float32 sums)."""
    from benchmarks.synthetic import outlier_input, quantized_layer_pair
    from quant import kernels
    from quant.triton_modules import register_kernel_op

    register_kernel_op()
    device = torch.device("cuda")
    rows = 32768
    _, proj = quantized_layer_pair(XL_HIDDEN, XL_HIDDEN, 4, False, device, act_granularity="per_token")
    _, fc1 = quantized_layer_pair(XL_HIDDEN, 4 * XL_HIDDEN, 4, False, device, act_granularity="per_token")
    attended = outlier_input(rows, XL_HIDDEN, device, torch.bfloat16, seed=5)
    residual = outlier_input(rows, XL_HIDDEN, device, torch.bfloat16, seed=6) * 4
    adaln = torch.randn(rows // 256, 6 * XL_HIDDEN, device=device, dtype=torch.bfloat16) * 0.3
    x, moments = proj.gated_2d(attended, None, residual.reshape(-1, 256, XL_HIDDEN), adaln[:, :XL_HIDDEN],
                               with_moments=True)
    shift, scale = adaln[:, XL_HIDDEN:2 * XL_HIDDEN], adaln[:, 2 * XL_HIDDEN:3 * XL_HIDDEN]
    itself = kernels.norm_quantize_rows(x, shift, scale, 256, 1e-6, 8, fc1.split_right)
    codes, _, down, qparams = kernels.norm_quantize_rows(x, shift, scale, 256, 1e-6, 8, fc1.split_right, moments=moments)
    assert_nearly_the_same_pass(codes, qparams, itself[0], itself[3])


def assert_nearly_the_same_pass(codes, qparams, expected_codes, expected_qparams):
    """Two norm passes whose means and variances were rounded differently: codes off by at most one
    in fewer than 0.1 % of them, and the same ranges but in fewer than 0.1 % of the rows (where a
    modulated value that sets a range rounds to the other bf16 neighbour)."""
    differ = codes.int() - expected_codes.int()
    assert differ.abs().max() <= 1 and (differ != 0).float().mean() < 1e-3
    same = torch.isclose(qparams, expected_qparams, rtol=1e-5, atol=1e-6).all(dim=0)
    assert (~same).float().mean() < 1e-3
    torch.testing.assert_close(qparams, expected_qparams, rtol=1e-2, atol=1e-6)
