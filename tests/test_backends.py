"""The inference backends: the int8 kernels (run by Triton's CPU interpreter here; the GPU check is
benchmarks/speed.py --parts check) against the fake reference, and model preparation."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from conftest import TINY_PIXEL_KWARGS, randomize

if "quant.kernels" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
triton = pytest.importorskip("triton")

from quant.backends import prepare_for_inference  # noqa: E402
from quant.config import QuantConfig  # noqa: E402
from quant.kernels import (  # noqa: E402
    INTERPRETED,
    PACK_SPAN,
    int8_gemm,
    pack_split,
    quantize_rows,
    range_bounds,
    unpack_signed,
)
from quant.modules import QuantLinear  # noqa: E402
from quant.primitives import QuantizedLayer, quantize_activation, quantize_weight  # noqa: E402
from quant.split_lora import SplitRight, representable, split_lora  # noqa: E402
from quant.triton_modules import (  # noqa: E402
    TritonQuantLinear,
    TritonQuantMlp,
    fuse_mlps,
    kernel_unsupported_reason,
    register_kernel_op,
)
from runtime.checkpoints import ModelSpec  # noqa: E402

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="the kernels were loaded without the interpreter")


def unpack_split(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of pack_split, by hand: (N, k) codes."""
    spans = packed.reshape(packed.shape[0], -1, PACK_SPAN // 2)
    return torch.stack([spans & 0xF, spans >> 4], dim=2).reshape(packed.shape[0], -1)[:, :k]


def random_split_right(right: torch.Tensor) -> SplitRight:
    """R's SplitRight, as a layer on the kernels holds it (split_lora)."""
    return split_lora(torch.ones(1, right.shape[0]), right)[1]


def random_quant_linear(in_features, out_features, weight_bits=4, act_bits=8, rank=4, smooth=False,
                        static=False, granularity="per_channel", act_granularity="per_tensor", seed=0):
    config = QuantConfig(weight_bits=weight_bits, act_bits=act_bits, lora_rank=rank, act_dynamic=not static,
                         weight_granularity=granularity, weight_group_size=16, act_granularity=act_granularity)
    return QuantLinear.from_layer(random_layer(in_features, out_features, config, smooth, static, seed), config)


def random_layer(in_features, out_features, config, smooth=False, static=False, seed=0) -> QuantizedLayer:
    """A QuantizedLayer of random weights and factors in `config`'s format; its LoRA's R holds what
    the kernels keep of it (split_lora.representable), so that they compute the same function."""
    generator = torch.Generator().manual_seed(seed)
    rank = config.lora_rank
    weight = quantize_weight(torch.randn(out_features, in_features, generator=generator), config.weight_bits,
                             config.weight_granularity, config.weight_group_size)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    return QuantizedLayer(
        weight, randn(out_features), config.act_bits, config.act_granularity,
        smooth_inv=torch.rand(in_features, generator=generator) + 0.5 if smooth else None,
        lora_left=randn(out_features, rank) * 0.1 if rank else None,
        lora_right=representable(randn(rank, in_features) * 0.1) if rank else None,
        static_range=(torch.tensor(-2.5), torch.tensor(3.0)) if static else None,
    )


@pytest.mark.parametrize("weight_bits,act_bits,rank,smooth,static,options,act_granularity", [
    (4, 8, 32, True, False, {}, "per_tensor"),  # W4A8 packed (TMA loads), LoRA, fc2's on-the-fly smoothing
    (4, 8, 32, True, False, dict(use_tma=False), "per_tensor"),  # the same with pointer loads
    (8, 8, 0, False, False, {}, "per_tensor"),  # W8A8 (pointer loads), no LoRA
    (8, 8, 4, False, False, dict(use_tma=True), "per_tensor"),
    (3, 6, 4, False, False, {}, "per_tensor"),  # 3-bit packed weights, 6-bit activations, rank padded to 16
    (8, 8, 4, True, True, {}, "per_tensor"),  # static activation range
    (4, 8, 32, True, False, {}, "per_token"),  # one activation range per row
    (8, 8, 4, False, False, {}, "per_token"),
    (4, 8, 32, True, False, dict(granularity="two_level"), "per_tensor"),  # two-level groups, unpacked first
    (8, 8, 4, False, False, dict(granularity="two_level"), "per_token"),  # two-level W8: plain int8 operand
])
def test_kernels_match_the_fake_reference(weight_bits, act_bits, rank, smooth, static, options, act_granularity):
    register_kernel_op()
    options = dict(options)
    granularity = options.pop("granularity", "per_channel")
    fake = random_quant_linear(48, 40, weight_bits, act_bits, rank, smooth, static, granularity=granularity,
                               act_granularity=act_granularity)
    kernel = TritonQuantLinear(fake, **options)
    x = torch.randn(3, 13, 48) * 2 + 0.3  # 39 rows: partial tiles in M, N (40) and K (48)
    expected = fake(x)
    got = kernel(x)
    assert got.shape == expected.shape == (3, 13, 40)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5


@pytest.mark.parametrize("static,act_granularity,granularity", [
    (False, "per_tensor", "per_channel"), (True, "per_tensor", "per_channel"), (False, "per_token", "per_channel"),
    (False, "per_tensor", "two_level")])
def test_fused_mlp_matches_fc1_gelu_fc2_of_the_fake_layers(static, act_granularity, granularity):
    from models import Mlp

    register_kernel_op()
    mlp = Mlp(48, 80)
    mlp.fc1 = random_quant_linear(48, 80, rank=8, static=static, seed=1, act_granularity=act_granularity,
                                  granularity=granularity)
    mlp.fc2 = random_quant_linear(80, 48, rank=8, smooth=True, static=static, seed=2, act_granularity=act_granularity,
                                  granularity=granularity)
    # 42 rows: partial tiles. Drawn from a fixed generator: on about 1 in 150 random draws an fc1
    # output that differs from fake's in its last bit (another summation order) moves one of fc2's
    # activation codes by a step, a 3e-4 relative error (speed.py's GPU check bounds that case).
    x = torch.randn(2, 21, 48, generator=torch.Generator().manual_seed(0)) * 2 + 0.3
    expected = mlp(x)
    assert fuse_mlps(mlp) == 0  # fake layers: nothing to fuse
    mlp.fc1, mlp.fc2 = TritonQuantLinear(mlp.fc1), TritonQuantLinear(mlp.fc2)
    model = torch.nn.ModuleDict({"mlp": mlp})
    assert fuse_mlps(model) == 1 and isinstance(model["mlp"], TritonQuantMlp)
    got = model["mlp"](x)
    assert got.shape == expected.shape
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5


def gemm_arguments(kernel: TritonQuantLinear, x: torch.Tensor) -> tuple:
    """int8_gemm's positional arguments for `x` through a LoRA-free, unsmoothed kernel layer."""
    qparams = kernel.qparams(x)
    codes, rowsum, _ = quantize_rows(x, qparams, 8, None, None)
    return (codes, rowsum, qparams, kernel.weight, kernel.packed, kernel.column_sums, kernel.weight_zero,
            kernel.weight_scale, kernel.bias, None, None, torch.float32)


@pytest.mark.parametrize("act_granularity", ["per_tensor", "per_token"])
def test_gemm_epilogue_reduces_the_range_of_its_scaled_output(act_granularity):
    layer = random_quant_linear(64, 40, rank=0, act_granularity=act_granularity)
    args = gemm_arguments(TritonQuantLinear(layer), torch.randn(37, 64))
    scale = torch.rand(40) + 0.5
    per_token = act_granularity == "per_token"
    bounds = torch.full((2, 37 if per_token else 1), float("inf"))
    out = int8_gemm(*args, gelu=True, bounds=bounds, bounds_scale=scale)
    plain = int8_gemm(*args)
    torch.testing.assert_close(out, torch.nn.functional.gelu(plain, approximate="tanh"), rtol=1e-5, atol=1e-6)
    assert torch.equal(bounds, range_bounds(out * scale, per_token))


def test_row_wise_range_equals_the_whole_tensor_range():
    kernel = TritonQuantLinear(random_quant_linear(64, 16, smooth=True))
    x = torch.randn(30, 64) * 3
    smoothed = x * kernel.smooth_inv
    expected = torch.stack(quantize_activation(smoothed, 8, smoothed.min(), smoothed.max())[1:])
    assert torch.equal(kernel.qparams(x), expected.reshape(2, 1))  # [scales; zeros], one range


def test_quantize_pass_writes_the_reference_codes_and_row_sums():
    x = torch.randn(37, 64) * 3
    lo, hi = x.min(), x.max()
    codes, scale, zero = quantize_activation(x, 8, lo, hi)
    qparams = torch.stack([scale, zero])
    kernel_codes, rowsum, down = quantize_rows(x, qparams, 8, None, None)
    assert down is None
    assert torch.equal(kernel_codes.to(torch.int32), codes.to(torch.int32) - 128)
    assert torch.equal(rowsum.sum(dim=0), (codes.to(torch.int32) - 128).sum(dim=1))


@pytest.mark.parametrize("splits", [2, 3])
def test_quantize_pass_split_over_k_gives_the_same_codes_sums_and_gemm(splits):
    kernel = TritonQuantLinear(random_quant_linear(96, 40, rank=8, smooth=True))
    x = torch.randn(37, 96) * 3
    qparams = kernel.qparams(x)
    whole = quantize_rows(x, qparams, 8, kernel.smooth_inv, kernel.split_right, splits=1)
    split = quantize_rows(x, qparams, 8, kernel.smooth_inv, kernel.split_right, splits=splits)
    assert whole[1].shape == (1, 37) and split[1].shape == (splits, 37) and split[2].shape == (splits, 37, 16)
    assert torch.equal(split[0], whole[0]) and torch.equal(split[1].sum(dim=0), whole[1][0])
    torch.testing.assert_close(split[2].sum(dim=0), whole[2][0], rtol=1e-6, atol=1e-5)

    def gemm(codes, rowsum, down):
        return int8_gemm(codes, rowsum, qparams, kernel.weight, kernel.packed, kernel.column_sums, kernel.weight_zero,
                         kernel.weight_scale, kernel.bias, down, kernel.lora_left, torch.float32)

    torch.testing.assert_close(gemm(*split), gemm(*whole), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("act_granularity,splits", [("per_token", 1), ("per_token", 3), ("per_tensor", 2)])
def test_quantize_pass_takes_its_qparams_from_the_bounds_a_gemm_left(act_granularity, splits):
    """quantize_rows's `bounds` ([min, −max] of x × smooth_inv, as fc1's epilogue leaves them for
    fc2): the qparams it writes are activation_qparams's of the range including 0, bit for bit, and
    the codes, row sums and down-projection those of the pass given them."""
    kernel = TritonQuantLinear(random_quant_linear(96, 40, rank=8, smooth=True, act_granularity=act_granularity))
    x = torch.randn(37, 96) * 0.5 + 3  # positive rows: the range's low end is clamped to 0
    qparams = kernel.qparams(x)
    bounds = range_bounds(x * kernel.smooth_inv, per_row=act_granularity == "per_token")
    written = torch.full_like(qparams, float("nan"))
    got = quantize_rows(x, written, 8, kernel.smooth_inv, kernel.split_right, splits=splits, bounds=bounds)
    expected = quantize_rows(x, qparams, 8, kernel.smooth_inv, kernel.split_right, splits=splits)
    assert torch.equal(written, qparams)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("per_token", [True, False])
def test_quantize_passes_fill_the_next_gemms_bounds(per_token):
    """`init_bounds` of every quantize pass: the bounds the GEMM after it reduces its output into
    (int8_gemm's `bounds`) hold +inf afterwards, whatever they held (every row, 37: a partial row
    block; per tensor, both entries); the pass's own results do not change."""
    from quant.kernels import norm_quantize_rows, ranged_quantize_rows

    x, right = torch.randn(37, 64) * 3, random_split_right(torch.randn(16, 64))
    shift, scale = torch.randn(3, 64) * 0.3, torch.randn(3, 64) * 0.3
    qparams = TritonQuantLinear(random_quant_linear(64, 16, act_granularity="per_token")).qparams(x)
    passes = (lambda **kw: quantize_rows(x, qparams, 8, None, right, splits=2, **kw),
              lambda **kw: ranged_quantize_rows(x, 8, right, **kw),
              lambda **kw: norm_quantize_rows(x, shift, scale, 13, 1e-6, 8, right, **kw))
    for run in passes:
        bounds = torch.full((2, 37 if per_token else 1), -7.0)
        filled = run(init_bounds=bounds)
        assert torch.equal(bounds, torch.full_like(bounds, float("inf")))
        for a, b in zip(filled, run()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("act_granularity", ["per_token", "per_tensor"])
def test_kernel_blocks_compute_the_same_as_the_plain_block(act_granularity, monkeypatch):
    """KernelDiTBlock: its gated residual updates (in proj's and fc2's epilogues) and, per token,
    qkv's and fc1's norms taken by the quantize pass, against the plain block of the same layers."""
    from models import DiTBlock
    from quant.kernels import norm_quantize_rows
    from quant.triton_modules import KernelDiTBlock, KernelOptions, install_kernel_blocks

    register_kernel_op()
    torch.manual_seed(0)
    block = DiTBlock(64, 4)
    # proj unsmoothed, as DiTAS folds its smoothing into V: its quantize pass can take its ranges
    for module, name, (k, n), smooth, seed in ((block.attn, "qkv", (64, 192), False, 1), (block.attn, "proj", (64, 64), False, 2),
                                               (block.mlp, "fc1", (64, 256), False, 3), (block.mlp, "fc2", (256, 64), True, 4)):
        setattr(module, name, TritonQuantLinear(random_quant_linear(k, n, rank=8, smooth=smooth, seed=seed,
                                                                    act_granularity=act_granularity)))
    model = torch.nn.ModuleDict({"block": block})
    fuse_mlps(model)
    x, c = torch.randn(3, 13, 64) * 2 + 0.3, torch.randn(3, 64)
    expected = model["block"](x, c)
    assert install_kernel_blocks(model, KernelOptions(fuse_norms_below_rows=40, gate_residuals_below_rows=40)) == 1
    kernel_block = model["block"]
    assert isinstance(kernel_block, KernelDiTBlock)
    # a whole-tensor range needs the activation first: per tensor, the norms and ranges stay outside the pass
    assert kernel_block.fuse_norms_below_rows == (40 if act_granularity == "per_token" else 0)
    assert kernel_block.proj_own_ranges == (act_granularity == "per_token")
    got = kernel_block(x, c)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4
    # the packed weights unpacked by the quantize passes (norm-fused ones included) instead of in the GEMMs
    monkeypatch.setattr("quant.kernels.UNPACK_FROM_ROWS", 0)
    assert torch.equal(kernel_block(x, c), got)
    monkeypatch.undo()
    kernel_block.fuse_norms_below_rows = 39  # x's rows: from there torch's norms, the residuals still gated
    assert ((kernel_block(x, c) - expected).norm() / expected.norm()).item() < 1e-5
    kernel_block.gate_residuals_below_rows = 39  # the residual updates by torch; proj's ranges by its pass
    assert torch.equal(kernel_block(x, c), expected)  # the same ranges as torch's reduction, bit for bit
    kernel_block.proj_own_ranges = False  # the plain block, on the same kernels
    assert torch.equal(kernel_block(x, c), expected)
    if act_granularity == "per_tensor":
        return
    # the pass itself: codes of LayerNorm(x)·(1 + scale) + shift with its per-token ranges
    shift, scale = torch.randn(3, 64) * 0.3, torch.randn(3, 64) * 0.3
    kernel = block.mlp.fc1
    codes, rowsum, down, qparams = norm_quantize_rows(x.reshape(-1, 64), shift, scale, 13, 1e-6, 8, kernel.split_right)
    modulated = (torch.nn.functional.layer_norm(x, (64,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]).reshape(-1, 64)
    torch.testing.assert_close(qparams, kernel.qparams(modulated), rtol=1e-5, atol=1e-6)
    reference = quantize_rows(modulated, qparams, 8, None, kernel.split_right, splits=1)
    assert (codes.int() - reference[0].int()).abs().max() <= 1 and (codes != reference[0]).float().mean() < 1e-3
    torch.testing.assert_close(down, reference[2], rtol=1e-3, atol=1e-2)
    # … of a layer smoothed on the fly: the modulated activation times its factors
    smooth_inv = torch.rand(64) + 0.5
    codes, _, _, qparams = norm_quantize_rows(x.reshape(-1, 64), shift, scale, 13, 1e-6, 8, None, smooth_inv=smooth_inv)
    torch.testing.assert_close(qparams, kernel.qparams(modulated * smooth_inv), rtol=1e-5, atol=1e-6)
    reference = quantize_rows(modulated, qparams, 8, smooth_inv, None, splits=1)
    assert (codes.int() - reference[0].int()).abs().max() <= 1 and (codes != reference[0]).float().mean() < 1e-3


def test_kernel_blocks_hand_the_next_block_their_rows_moments():
    """In a model's `blocks`, each KernelDiTBlock but the last returns a ResidualStream with its
    output's row moments (from fc2's gated epilogue), from which the next block's qkv pass takes
    its norm's mean and variance: three blocks compute what the plain ones do."""
    from models import DiTBlock
    from quant.triton_modules import KernelDiTBlock, ResidualStream, install_kernel_blocks

    register_kernel_op()
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList()
    for index in range(3):
        block = DiTBlock(64, 4)
        for module, name, (k, n), smooth in ((block.attn, "qkv", (64, 192), False), (block.attn, "proj", (64, 64), False),
                                             (block.mlp, "fc1", (64, 256), False), (block.mlp, "fc2", (256, 64), True)):
            setattr(module, name, TritonQuantLinear(random_quant_linear(
                k, n, rank=8, smooth=smooth, seed=10 * index + n, act_granularity="per_token")))
        blocks.append(block)
    model = torch.nn.Module()
    model.blocks = blocks
    fuse_mlps(model)
    x, c = torch.randn(2, 16, 64) * 2 + 0.3, torch.randn(2, 64)
    expected = x
    for block in model.blocks:
        expected = block(expected, c)
    assert install_kernel_blocks(model) == 3
    assert [block.hands_on_moments for block in model.blocks] == [True, True, False]
    got = x
    for block in model.blocks:
        got = block(got, c)
    assert isinstance(got, torch.Tensor)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4
    handed = model.blocks[0](x, c)
    assert isinstance(handed, ResidualStream) and isinstance(model.blocks[1], KernelDiTBlock)
    torch.testing.assert_close(handed.moments, chunk_moments(handed.x.reshape(-1, 64)), rtol=1e-5, atol=1e-5)
    # the next block reads them: the moments of other rows give another output
    other = ResidualStream(handed.x, chunk_moments(handed.x.flip(1).reshape(-1, 64)))
    assert not torch.allclose(model.blocks[1](other, c).x, model.blocks[1](handed, c).x, rtol=1e-3, atol=1e-3)


def kernel_dit(seed: int = 0):
    """A tiny DiT (64 wide, 3 blocks) laid out as install_kernels lays one out on a GPU, but for the
    adaLN bank: per-token W4A8 kernel layers with LoRA, fused MLPs, kernel blocks, 8-bit weight-only
    adaLN layers on their kernel."""
    from models import DiT
    from quant.modules import WeightOnlyLinear
    from quant.triton_modules import install_kernel_blocks, install_weight_only_kernels

    register_kernel_op()
    torch.manual_seed(seed)
    model = randomize(DiT(**{**TINY_PIXEL_KWARGS, "depth": 3}), seed=seed, std=0.2)
    for index, block in enumerate(model.blocks):
        for module, name, (k, n), smooth in ((block.attn, "qkv", (64, 192), False), (block.attn, "proj", (64, 64), False),
                                             (block.mlp, "fc1", (64, 256), False), (block.mlp, "fc2", (256, 64), True)):
            setattr(module, name, TritonQuantLinear(random_quant_linear(
                k, n, rank=8, smooth=smooth, seed=10 * index + n, act_granularity="per_token")))
        block.adaLN_modulation[1] = WeightOnlyLinear.from_linear(block.adaLN_modulation[1], 8)
    fuse_mlps(model)
    install_kernel_blocks(model)
    install_weight_only_kernels(model)
    return model.eval()


def test_the_adaln_bank_computes_every_blocks_modulation_in_one_call(monkeypatch):
    """ModulationBank: the blocks' adaLN layers stacked into one weight-only call give the model's
    output of one call per block, bit for bit (the same products under the interpreter), hold no
    second copy of the weights and leave the state dict as it was."""
    from quant.triton_modules import ModulationBank, install_modulation_bank

    model = kernel_dit()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        expected = model(x, t, y)
    keys = {name: (tensor.shape, tensor.dtype) for name, tensor in model.state_dict().items()}
    assert install_modulation_bank(model) == 3 and isinstance(model.block_conditions, ModulationBank)
    assert {name: (tensor.shape, tensor.dtype) for name, tensor in model.state_dict().items()} == keys
    bank = model.block_conditions
    for index, block in enumerate(model.blocks):  # views of the stacked codes, in block order
        codes = block.adaLN_modulation[1].weight_codes
        assert codes.untyped_storage().data_ptr() == bank.weight_codes.untyped_storage().data_ptr()
        assert torch.equal(codes, bank.weight_codes[index * 384:(index + 1) * 384])
    calls = []
    weight_only = torch.ops.ditas.weight_only_linear
    monkeypatch.setattr(torch.ops.ditas, "weight_only_linear", lambda *a: calls.append(a[1].shape) or weight_only(*a))
    with torch.no_grad():
        got = model(x, t, y)
    assert calls == [(3 * 384, 64)]  # one call, for the three blocks
    assert torch.equal(got, expected)
    with pytest.raises(RuntimeError, match="move the model before preparing it"):  # a model moved after the install
        bank(torch.empty(2, 64, device="meta"))


def test_the_adaln_bank_is_left_out_where_a_block_is_not_on_the_kernels():
    """A block whose adaLN is not on the weight-only kernel (or a model without `blocks`) keeps one
    call per block: the bank is not installed and the model's own block_conditions stay."""
    from quant.triton_modules import install_modulation_bank

    model = kernel_dit()
    model.blocks[1].adaLN_modulation[1] = torch.nn.Linear(64, 384)
    assert install_modulation_bank(model) == 0 and "block_conditions" not in vars(model)
    assert install_modulation_bank(torch.nn.Linear(3, 3)) == 0


@pytest.mark.parametrize("splits", [1, 3])
def test_quantize_passes_unpack_a_layers_packed_weights_beside_their_rows(splits):
    """PackedWeight: the programs past a pass's row blocks unpack the W4 codes as unpack_signed
    does (70 rows and 200 columns: partial blocks of rows and of a span; with 3 splits, grid slots
    past the last block), and the pass's own outputs stay as they are without them."""
    from quant.kernels import PackedWeight, norm_quantize_rows, ranged_quantize_rows

    generator = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (70, 200), dtype=torch.uint8, generator=generator)
    x = torch.randn(37, 200, generator=generator) * 3
    right = random_split_right(torch.randn(16, 200, generator=generator))
    qparams = torch.stack([torch.full((37,), 0.05), torch.full((37,), 120.0)])
    norm = (torch.randn(3, 200, generator=generator), torch.randn(3, 200, generator=generator) * 0.3, 13, 1e-6, 8)
    passes = (lambda unpack: quantize_rows(x, qparams, 8, None, right, splits=splits, unpack=unpack),
              lambda unpack: norm_quantize_rows(x, *norm, right, unpack=unpack),
              lambda unpack: ranged_quantize_rows(x, 8, right, unpack))
    for run in passes:
        unpack = PackedWeight(pack_split(codes), torch.full((70, 200), 99, dtype=torch.int8))
        beside, alone = run(unpack), run(None)
        assert all(torch.equal(a, b) for a, b in zip(beside, alone))
        assert torch.equal(unpack.unpacked, unpack_signed(unpack.packed, 200))


def test_ranged_pass_takes_the_per_token_ranges_the_layer_would_and_the_same_codes():
    """The quantize pass that takes its own per-token ranges: the same qparams as the layer's
    reduction (bit for bit), then the same codes, sums and LoRA down-projection as the plain pass."""
    from quant.kernels import ranged_quantize_rows

    kernel = TritonQuantLinear(random_quant_linear(200, 40, rank=8, act_granularity="per_token"))
    x = torch.randn(37, 200) * 3 + 0.5
    x[5] = x[5].abs()  # a row without negatives: its range starts at 0
    bound = 255 / 64  # a symmetric range whose scale is 2^-5: −lo/scale is exactly the tie 127.5
    x[6] = x[6].clamp(-bound, bound)
    x[6, :2] = torch.tensor([-bound, bound])
    codes, rowsum, down, qparams = ranged_quantize_rows(x, 8, kernel.split_right)
    assert qparams[1, 6] == 128  # rounded half to even, as activation_qparams (torch.round)
    assert torch.equal(qparams, kernel.qparams(x))
    expected = quantize_rows(x, qparams, 8, None, kernel.split_right, splits=1)
    assert torch.equal(codes, expected[0]) and torch.equal(rowsum, expected[1])
    torch.testing.assert_close(down, expected[2], rtol=1e-6, atol=1e-5)
    # a layer smoothed on the fly (as fc2 is): the ranges and codes of x × smooth_inv
    smoothed = TritonQuantLinear(random_quant_linear(200, 40, rank=8, smooth=True, act_granularity="per_token"))
    codes, rowsum, down, qparams = ranged_quantize_rows(x, 8, smoothed.split_right, smooth_inv=smoothed.smooth_inv)
    assert torch.equal(qparams, smoothed.qparams(x))
    expected = quantize_rows(x, qparams, 8, smoothed.smooth_inv, smoothed.split_right, splits=1)
    assert torch.equal(codes, expected[0]) and torch.equal(rowsum, expected[1])
    torch.testing.assert_close(down, expected[2], rtol=1e-6, atol=1e-5)


def test_ranged_passes_give_the_same_down_projection_with_the_lora_apart(monkeypatch):
    """kernels.LORA_DOWN_APART_FROM_ROWS: the pass without its LoRA, then lora_down over its codes,
    gives the pass's codes, ranges and row sums bit for bit and its down-projection up to the
    float32 sums' order (37 rows: a partial row block of the interpreted 16)."""
    from quant import kernels

    generator = torch.Generator().manual_seed(11)
    x = torch.randn(37, 200, generator=generator) * 3 + 0.5
    right = random_split_right(torch.randn(16, 200, generator=generator))
    shift, scale = torch.randn(3, 200, generator=generator) * 0.3, torch.randn(3, 200, generator=generator) * 0.3
    passes = (lambda: kernels.norm_quantize_rows(x, shift, scale, 13, 1e-6, 8, right),
              lambda: kernels.ranged_quantize_rows(x, 8, right))
    for run in passes:
        monkeypatch.setattr(kernels, "LORA_DOWN_APART_FROM_ROWS", None)
        inside = run()
        monkeypatch.setattr(kernels, "LORA_DOWN_APART_FROM_ROWS", 37)
        apart = run()
        for got, expected in zip(apart, inside):
            if got.dtype == torch.float32 and got.dim() == 3:  # down
                torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-4)
            else:
                assert torch.equal(got, expected)
        monkeypatch.setattr(kernels, "LORA_DOWN_APART_FROM_ROWS", 38)  # fewer rows than that: inside again
        assert torch.equal(run()[2], inside[2])


def test_a_layer_refuses_own_ranges_its_pass_would_compute_wrongly():
    """The ranged pass takes per-token ranges of x (times the smoothing factors) itself: asking it
    of a per-tensor (possibly static) layer fails loudly rather than quantizing with other ranges;
    per token, smoothed or not, it gives the layer's output to the bit."""
    register_kernel_op()
    x = torch.randn(2, 5, 48)
    for fake in (random_quant_linear(48, 40, static=True), random_quant_linear(48, 40)):
        kernel = TritonQuantLinear(fake)
        assert not kernel.ranges_in_pass
        with pytest.raises(ValueError, match="own_ranges"):
            kernel(x, own_ranges=True)
    for smooth in (False, True):
        kernel = TritonQuantLinear(random_quant_linear(48, 40, smooth=smooth, act_granularity="per_token"))
        assert kernel.ranges_in_pass
        torch.testing.assert_close(kernel(x, own_ranges=True), kernel(x), rtol=0, atol=0)


def test_norm_pass_statistics_hold_for_a_partial_last_tile_and_a_large_mean():
    """The one-pass (merged per tile) mean and variance: 80 columns are two and a half interpreted
    tiles, and a mean 100× the spread is where a plain sum-of-squares variance would cancel."""
    from quant.kernels import norm_quantize_rows

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 80, generator=generator) * 0.5 + 50 * torch.rand(2, 7, 1, generator=generator)
    shift, scale = torch.randn(2, 80, generator=generator) * 0.3, torch.randn(2, 80, generator=generator) * 0.3
    right = random_split_right(torch.randn(16, 80, generator=generator))
    codes, rowsum, down, qparams = norm_quantize_rows(x.reshape(-1, 80), shift, scale, 7, 1e-6, 8, right)
    modulated = (torch.nn.functional.layer_norm(x, (80,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None])
    modulated = modulated.reshape(-1, 80)
    lo, hi = modulated.amin(dim=1).clamp(max=0), modulated.amax(dim=1).clamp(min=0)
    torch.testing.assert_close(qparams[0], (hi - lo) / 255, rtol=1e-5, atol=0)
    reference = quantize_rows(modulated, qparams, 8, None, right, splits=1)
    assert (codes.int() - reference[0].int()).abs().max() <= 1 and (codes != reference[0]).float().mean() < 1e-2
    assert torch.equal(rowsum, codes.int().sum(dim=1)[None])


@pytest.mark.parametrize(("weight_bits", "act_granularity", "rows"), [(4, "per_token", 30), (8, "per_tensor", 26)])
def test_gated_layer_applies_the_residual_update_in_its_epilogue(weight_bits, act_granularity, rows):
    """residual + gate ⊙ layer(x), the gate per sample (10 or 13 tokens each, so sample borders
    fall inside the GEMM's row tiles), from a gate with the adaLN chunk's row stride."""
    register_kernel_op()
    kernel = TritonQuantLinear(random_quant_linear(48, 40, weight_bits=weight_bits, rank=8, smooth=True,
                                                   act_granularity=act_granularity))
    samples = 2
    x = torch.randn(samples, rows // samples, 48) * 2
    residual = torch.randn(samples, rows // samples, 40)
    gate = torch.randn(samples, 6 * 40)[:, 40:80]  # a chunk: row stride 240
    expected = residual + gate.unsqueeze(1) * kernel(x)
    out, moments = kernel.gated(x, residual, gate)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert moments is None
    # with the output's row moments for the next norm: per 16-column chunk under the interpreter
    # (16, 16 and 8 of the 40 columns), of the values as stored
    with_moments, moments = kernel.gated(x, residual, gate, with_moments=True)
    assert torch.equal(with_moments, out)
    torch.testing.assert_close(moments, chunk_moments(out.reshape(rows, 40)), rtol=1e-5, atol=1e-5)


def chunk_moments(rows: torch.Tensor) -> torch.Tensor:
    """kernels.row_moments of 2-D rows, in float64 from the rows' values, as float32."""
    from quant.kernels import MOMENT_COLUMNS

    chunks = rows.double().split(MOMENT_COLUMNS, dim=1)
    means = [chunk.mean(dim=1) for chunk in chunks]
    squares = [((chunk - mean[:, None]) ** 2).sum(dim=1) for chunk, mean in zip(chunks, means)]
    return torch.stack([torch.stack(means), torch.stack(squares)]).float()


def test_norm_pass_takes_its_mean_and_variance_from_the_row_moments():
    """norm_quantize_rows with x's row moments (as a gated epilogue leaves them: 80 columns, chunks
    of 16) gives the ranges and codes of the pass that takes them itself, up to the float32 sums'
    order; moments of other rows give other codes (they are read), and moments of the wrong shape
    are refused."""
    from quant.kernels import norm_quantize_rows

    generator = torch.Generator().manual_seed(5)
    x = torch.randn(21, 80, generator=generator) * 2 + 0.7
    shift, scale = torch.randn(3, 80, generator=generator) * 0.3, torch.randn(3, 80, generator=generator) * 0.3
    right = random_split_right(torch.randn(16, 80, generator=generator))
    itself = norm_quantize_rows(x, shift, scale, 7, 1e-6, 8, right)
    codes, rowsum, down, qparams = norm_quantize_rows(x, shift, scale, 7, 1e-6, 8, right, moments=chunk_moments(x))
    torch.testing.assert_close(qparams, itself[3], rtol=1e-5, atol=1e-6)
    differ = codes.int() - itself[0].int()
    assert differ.abs().max() <= 1 and (differ != 0).float().mean() < 1e-2
    assert torch.equal(rowsum, codes.int().sum(dim=1)[None])
    torch.testing.assert_close(down, itself[2], rtol=1e-3, atol=1e-2)
    other = norm_quantize_rows(x, shift, scale, 7, 1e-6, 8, right, moments=chunk_moments(x.flip(0)))
    assert (other[0] != codes).float().mean() > 0.5
    with pytest.raises(ValueError, match="row moments"):
        norm_quantize_rows(x, shift, scale, 7, 1e-6, 8, right, moments=chunk_moments(x[:, :64]))


def test_quantize_pass_configs_keep_to_their_program_chunk():
    """A tile wider than a program's K chunk would also write the next program's columns and
    count them twice in the partial sums: such configs are pruned."""
    import triton

    from quant.kernels import _whole_chunk_tiles

    configs = [triton.Config(dict(BLOCK_M=4, BLOCK_K=width)) for width in (128, 256)]
    assert [c.kwargs["BLOCK_K"] for c in _whole_chunk_tiles(configs, {}, K_PER_SPLIT=384)] == [128]
    assert len(_whole_chunk_tiles(configs, {}, K_PER_SPLIT=1280)) == 2


def test_small_calls_split_the_quantize_pass_and_large_ones_do_not():
    from quant.kernels import SPLIT_K_CHUNK, quantize_splits

    assert quantize_splits(4096 * 8, 1152, torch.device("cpu")) == 1
    assert 1 < quantize_splits(64, 1152, torch.device("cpu")) <= -(-1152 // SPLIT_K_CHUNK)


def test_kernel_op_schema_and_fake_tensor_rule():
    register_kernel_op()
    for granularity in ("per_channel", "two_level"):
        kernel = TritonQuantLinear(random_quant_linear(32, 16, rank=4, smooth=True, granularity=granularity))
        x = torch.randn(20, 32)
        args = (x, kernel.qparams(x), *kernel.kernel_tensors())
        torch.library.opcheck(torch.ops.ditas.int8_linear.default, args,
                              test_utils=("test_schema", "test_faketensor"))
        # by name, as the modules call them
        torch.library.opcheck(torch.ops.ditas.int8_linear.default, args[:2], kernel.kernel_tensors()._asdict(),
                              test_utils=("test_schema", "test_faketensor"))
        # no qparams (an unsmoothed per-token layer): LayerNorm + modulation + per-token ranges taken
        # by the pass (5 samples of 4 tokens), or x's own per-token ranges taken by the pass
        ranged = TritonQuantLinear(random_quant_linear(32, 16, rank=4, granularity=granularity,
                                                       act_granularity="per_token")).kernel_tensors()._asdict()
        norm = dict(norm_shift=torch.randn(5, 32), norm_scale=torch.randn(5, 32), norm_tokens=4, norm_eps=1e-6)
        torch.library.opcheck(torch.ops.ditas.int8_linear.default, (x, None), ranged | norm,
                              test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(torch.ops.ditas.int8_linear.default, (x, None), ranged,
                              test_utils=("test_schema", "test_faketensor"))
        moments = dict(norm_moments=torch.zeros(2, 2, 20))  # 32 columns: two chunks of 16
        moments["norm_moments"][1] = 16.0
        torch.library.opcheck(torch.ops.ditas.int8_linear.default, (x, None), ranged | norm | moments,
                              test_utils=("test_schema", "test_faketensor"))
        for with_moments in (False, True):
            update = dict(residual=torch.randn(20, 16), gate=torch.randn(5, 16), gate_tokens=4,
                          with_moments=with_moments)
            torch.library.opcheck(torch.ops.ditas.int8_linear_gated.default, args[:2],
                                  kernel.kernel_tensors()._asdict() | update,
                                  test_utils=("test_schema", "test_faketensor"))
        for per_row in (False, True):
            torch.library.opcheck(torch.ops.ditas.int8_linear_gelu.default,
                                  (*args, torch.rand(16) + 0.5, True, per_row),
                                  test_utils=("test_schema", "test_faketensor"))
            torch.library.opcheck(torch.ops.ditas.int8_linear_gelu.default, (x, None),
                                  ranged | norm | dict(bounds_scale=None, with_bounds=True, bounds_per_row=per_row),
                                  test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("rows", [3, 20])
def test_weight_only_kernel_computes_the_8_bit_adaln_layer(rows):
    from quant.modules import WeightOnlyLinear
    from quant.triton_modules import TritonWeightOnlyLinear, install_weight_only_kernels

    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(48, 72)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(72, 48, generator=generator))
        linear.bias.copy_(torch.randn(72, generator=generator))
    model = torch.nn.Sequential(torch.nn.SiLU(), WeightOnlyLinear.from_linear(linear, 8))
    x = torch.randn(rows, 48, generator=generator)
    expected = model(x)
    assert install_weight_only_kernels(model) == 1 and isinstance(model[1], TritonWeightOnlyLinear)
    model.to(torch.bfloat16)  # the scales stay float32
    assert model[1].weight_scale.dtype == torch.float32 and model[1].weight_codes.dtype == torch.uint8
    got = model(x)
    assert got.shape == expected.shape
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
    torch.library.opcheck(torch.ops.ditas.weight_only_linear.default,
                          (x, model[1].weight_codes, model[1].weight_zero, model[1].weight_scale, model[1].bias),
                          test_utils=("test_schema", "test_faketensor"))


def test_kernel_layer_keeps_float32_scales_when_the_model_is_cast():
    kernel = TritonQuantLinear(random_quant_linear(32, 16))
    scale = kernel.weight_scale.clone()
    kernel.to(torch.bfloat16)
    assert kernel.weight_scale.dtype == torch.float32 and torch.equal(kernel.weight_scale, scale)
    assert kernel.weight.dtype == torch.uint8 and kernel.weight.shape == (16, 64)  # packed, K padded to 128


@pytest.mark.parametrize("k", [32, 128, 200])
def test_split_packing_round_trips_and_pairs_k_with_k_plus_half_span(k):
    codes = torch.randint(0, 16, (5, k), dtype=torch.uint8)
    packed = pack_split(codes)
    assert packed.shape == (5, -(-k // PACK_SPAN) * PACK_SPAN // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_split(packed, k), codes)
    half = PACK_SPAN // 2
    if k >= PACK_SPAN:
        assert torch.equal(packed[:, 3], codes[:, 3] | (codes[:, 3 + half] << 4))
    padded = unpack_split(packed, packed.shape[1] * 2)
    assert (padded[:, k:] == 8).all()  # padding codes are zero after the shift


@pytest.mark.parametrize("k", [200, 256])
def test_unpacking_to_int8_gives_the_signed_codes(k):
    codes = torch.randint(0, 16, (70, k), dtype=torch.uint8)
    assert torch.equal(unpack_signed(pack_split(codes), k), (codes.to(torch.int16) - 8).to(torch.int8))


def test_packed_gemm_unpacked_first_equals_unpacking_in_the_main_loop():
    kernel = TritonQuantLinear(random_quant_linear(200, 40, weight_bits=4, rank=0))
    assert kernel.packed
    args = gemm_arguments(kernel, torch.randn(37, 200))
    torch.testing.assert_close(int8_gemm(*args, unpack_from_rows=0), int8_gemm(*args, unpack_from_rows=10**9),
                               rtol=0, atol=0)


def test_two_level_codes_unpack_to_their_int8_values():
    from quant.kernels import unpack_two_level

    fake = random_quant_linear(200 - 8, 24, granularity="two_level")  # 192 inputs: groups of 16, K padded
    kernel = TritonQuantLinear(fake)
    codes = fake.quantized_weight().unpacked_codes().to(torch.int32).reshape(24, 12, 16)
    expected = (codes - fake.weight_zero.to(torch.int32)[..., None]) * fake.weight_group_scale.to(torch.int32)[..., None]
    unpacked = unpack_two_level(kernel.weight, kernel.group_table, 192)
    assert unpacked.dtype == torch.int8 and torch.equal(unpacked.to(torch.int32), expected.reshape(24, 192))
    assert torch.equal(kernel.column_sums, expected.reshape(24, 192).sum(dim=1))


def test_layers_the_kernels_do_not_cover_are_named():
    assert kernel_unsupported_reason(random_quant_linear(32, 16)) is None
    assert kernel_unsupported_reason(random_quant_linear(32, 16, granularity="two_level")) is None
    assert "per-group" in kernel_unsupported_reason(random_quant_linear(32, 16, granularity="per_group"))
    assert kernel_unsupported_reason(random_quant_linear(32, 16, act_granularity="per_token")) is None
    assert "12-bit" in kernel_unsupported_reason(random_quant_linear(32, 16, act_bits=12))


def test_triton_backend_on_cpu_falls_back_to_fake_with_one_log_line():
    from quant.pipeline import install
    from quant.targets import quant_targets

    model = randomize(ModelSpec(dit_kwargs=dict(TINY_PIXEL_KWARGS), vae=None).build())
    targets = quant_targets(model)
    config = QuantConfig(lora_rank=4, weight_group_size=16)
    layers = {t.name: random_layer(*reversed(model.get_submodule(t.name).weight.shape), config) for t in targets}
    install(model, targets, layers, {t.name: None for t in targets}, config)
    lines = []
    prepare_for_inference(model, "triton", torch.bfloat16, log=lines.append)
    assert len(lines) == 1 and "needs a CUDA device" in lines[0] and "fake" in lines[0]
    assert all(not isinstance(m, TritonQuantLinear) for m in model.modules())
    assert model.x_embedder.proj.weight.dtype == torch.bfloat16
    assert model.blocks[0].attn.qkv.weight_scale.dtype == torch.float32
    out = model(torch.randn(2, 1, 8, 8, dtype=torch.bfloat16), torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    with pytest.raises(ValueError, match="unknown backend"):
        prepare_for_inference(model, "cuda-magic")


@pytest.mark.parametrize("granularity,symmetric,width", [("per_channel", False, 23), ("per_group", False, 16),
                                                         ("per_channel", True, 16)])
def test_the_compensation_kernel_walks_a_block_of_columns_as_the_torch_loop_does(granularity, symmetric, width):
    from quant.compensate import column_loop, damped_cholesky, inverse_cholesky
    from quant.compensate_kernel import compensate_columns

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(256, width, generator=generator) @ (torch.eye(width) + 0.3 * torch.randn(width, width,
                                                                                         generator=generator))
    weight = torch.randn(37, width, generator=generator)  # rows not a multiple of the kernel's row block
    grid = quantize_weight(weight, 4, granularity, 4, symmetric)
    scale = grid.group_scales().float().repeat_interleave(grid.group_size, dim=-1).expand(37, width)
    zero = grid.zero.float().repeat_interleave(grid.group_size, dim=-1).expand(37, width)
    low, high = (torch.full((37, width), float(b)) if not isinstance(b, torch.Tensor)
                 else b.float().repeat_interleave(grid.group_size, dim=-1).expand(37, width)
                 for b in grid.code_bounds(symmetric))
    upper = inverse_cholesky(damped_cholesky(x.T @ x, 0.01)).contiguous()
    span = slice(4, width)  # a block that starts inside the matrix
    expected_codes, codes = torch.zeros(37, width), torch.zeros(37, width)
    expected_errors = column_loop(weight.clone(), upper, scale, zero, low, high, span, expected_codes)
    errors = compensate_columns(weight.clone(), upper, *(t.contiguous() for t in (scale, zero, low, high)), span,
                                codes)
    assert torch.equal(codes, expected_codes)
    torch.testing.assert_close(errors, expected_errors, rtol=1e-5, atol=1e-6)
    assert not torch.equal(codes[:, span], grid.codes.float()[:, span])  # compensation moved some codes
