"""FP8 e4m3 activations (QuantConfig.act_format): the reference rounding, the settings' checks, the
`fp8` backend's scaled GEMM (torch._scaled_mm runs on the CPU too) against the fake numerics, and
a quantized checkpoint in that format end to end."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_PIXEL_KWARGS, randomize
from quant.backends import prepare_for_inference
from quant.calibrate import CalibrationRun
from quant.checkpoint import load_quantized, save_quantized
from quant.config import QuantConfig
from quant.fp8_modules import Fp8QuantLinear, fp8_unsupported_reason
from quant.modules import QuantLinear
from quant.pipeline import quantize_dit
from quant.primitives import FP8_E4M3_MAX, QuantizedLayer, fake_quant_activation, quantize_weight, unpack_int4
from runtime.checkpoints import ModelSpec

E4M3_STEP = 2.0**-3  # e4m3 keeps 3 mantissa bits: normal values round within half of 1/8 relative


def test_fp8_rounding_keeps_each_ranges_largest_value_and_three_mantissa_bits():
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 2, 6).unsqueeze(1)
    for granularity in ("per_token", "per_tensor"):
        q = fake_quant_activation(x, 8, granularity, act_format="fp8_e4m3")
        amax = x.abs().amax(dim=-1 if granularity == "per_token" else None, keepdim=granularity == "per_token")
        scale = amax / FP8_E4M3_MAX
        at_max = x.abs() == amax
        assert torch.allclose(q[at_max].abs(), x[at_max].abs(), rtol=1e-6)  # 448 · scale is the range's max
        normal = x.abs() >= scale * 2.0**-6  # e4m3's smallest normal value is 2^-6
        relative = ((q - x).abs() / x.abs())[normal]
        assert relative.max() <= E4M3_STEP / 2 + 1e-6
        codes = q / scale  # e4m3 values, up to float32 rounding of the scale's product and quotient
        assert torch.allclose(codes.to(torch.float8_e4m3fn).float(), codes, rtol=1e-5, atol=0)


def test_fp8_needs_8_bits_and_old_settings_read_as_integer_activations():
    assert QuantConfig(act_format="fp8_e4m3").label == "W4A8-fp8_e4m3"
    assert QuantConfig().label == "W4A8"
    with pytest.raises(ValueError, match="8-bit"):
        QuantConfig(act_format="fp8_e4m3", act_bits=6)
    with pytest.raises(ValueError, match="activation format"):
        QuantConfig(act_format="fp4")
    stored = QuantConfig().to_dict()
    del stored["act_format"]  # a checkpoint written before the field existed
    assert QuantConfig.from_dict(stored).act_format == "int"


def fp8_layer(in_features, out_features, weight_bits=4, granularity="per_token", rank=4, smooth=True, static=False,
              weight_granularity="per_channel", seed=0) -> QuantLinear:
    config = QuantConfig(weight_bits=weight_bits, act_format="fp8_e4m3", act_granularity=granularity,
                         act_dynamic=not static, lora_rank=rank, weight_granularity=weight_granularity,
                         weight_group_size=16)
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    weight = quantize_weight(randn(out_features, in_features) * 0.05, weight_bits, weight_granularity, 16)
    layer = QuantizedLayer(
        weight, randn(out_features) * 0.1, 8, granularity,
        smooth_inv=torch.rand(in_features, generator=generator) + 0.5 if smooth else None,
        lora_left=randn(out_features, rank) * 0.01 if rank else None,
        lora_right=randn(rank, in_features) * 0.01 if rank else None,
        static_range=(torch.tensor(-3.0), torch.tensor(4.0)) if static else None, act_format="fp8_e4m3")
    return QuantLinear.from_layer(layer, config)


@pytest.mark.parametrize("granularity,rank,smooth,static", [
    ("per_token", 4, True, False),  # fc2-like: smoothed on the fly, LoRA
    ("per_token", 0, False, False),
    ("per_tensor", 4, False, False),
    ("per_tensor", 0, True, True),  # a calibrated range
])
def test_scaled_gemm_layer_computes_the_fake_numerics(granularity, rank, smooth, static):
    fake = fp8_layer(64, 48, granularity=granularity, rank=rank, smooth=smooth, static=static)
    layer = Fp8QuantLinear(fake)
    codes = unpack_int4(fake.weight_codes).float() - fake.weight_zero.float()
    assert layer.weight.dtype == torch.float8_e4m3fn and torch.equal(layer.weight.float(), codes)  # exact
    x = torch.randn(3, 10, 64, generator=torch.Generator().manual_seed(1)) * 2 + 0.3
    expected, got = fake(x), layer(x)
    assert got.shape == expected.shape and got.dtype == x.dtype
    # the same products; what differs is the bf16 output (and LoRA) rounding, 2^-9 relative
    assert ((got - expected).norm() / expected.norm()).item() < 4e-3


def test_layers_the_fp8_gemm_cannot_run_are_named():
    assert fp8_unsupported_reason(fp8_layer(32, 16)) is None
    assert "8-bit weights" in fp8_unsupported_reason(fp8_layer(32, 16, weight_bits=8))
    assert "per-group" in fp8_unsupported_reason(fp8_layer(32, 16, weight_granularity="per_group"))
    integer = QuantLinear.from_layer(
        QuantizedLayer(quantize_weight(torch.randn(16, 32), 4, "per_channel"), None, 8), QuantConfig(lora_rank=0))
    assert "int activations" in fp8_unsupported_reason(integer)
    with pytest.raises(ValueError, match="cannot run"):
        Fp8QuantLinear(integer)


@pytest.fixture(scope="module")
def fp8_dit():
    spec = ModelSpec(dit_kwargs=dict(TINY_PIXEL_KWARGS), vae=None)
    config = QuantConfig(act_format="fp8_e4m3", act_granularity="per_token", lora_rank=4, alpha_grid=(0.25, 0.5))
    model, _ = quantize_dit(randomize(spec.build(), std=0.1), config, CalibrationRun(tuple(range(10)), 1.5, 2, 0),
                            torch.device("cpu"), progress=False)
    return model, config, spec


@torch.no_grad()
def test_an_fp8_checkpoint_reloads_and_runs_on_the_fp8_backend_as_on_fake(tmp_path, fp8_dit):
    model, config, spec = fp8_dit
    save_quantized(tmp_path / "q", model, config, spec)
    fake, fp8 = load_quantized(tmp_path / "q"), load_quantized(tmp_path / "q")
    assert fp8.config == config
    lines = []
    prepare_for_inference(fake.model, "fake", torch.bfloat16)  # the same bf16 around the quantized layers
    prepare_for_inference(fp8.model, "fp8", log=lines.append)
    assert lines == []  # every quantized layer is covered
    layers = [m for m in fp8.model.modules() if isinstance(m, (QuantLinear, Fp8QuantLinear))]
    assert layers and all(isinstance(m, Fp8QuantLinear) for m in layers)
    inputs = torch.randn(2, 1, 8, 8, dtype=torch.bfloat16), torch.tensor([10, 500]), torch.tensor([1, 2])
    expected, got = fake.model(*inputs).float(), fp8.model(*inputs).float()
    # Each layer's bf16 output moves the next layer's e4m3 codes by a step here and there (1/16
    # relative): measured 2.4 % here, where running the fake model in bf16 instead of float32
    # alone moves its output by 2.7 %. A wrong scale or weight would be off by far more.
    assert ((got - expected).norm() / expected.norm()).item() < 5e-2


def test_the_int8_kernels_leave_fp8_layers_to_the_fake_numerics():
    triton_modules = pytest.importorskip("quant.triton_modules")
    assert "fp8_e4m3 activations" in triton_modules.kernel_unsupported_reason(fp8_layer(32, 16))


def test_the_fp8_backend_leaves_integer_layers_fake_with_one_log_line():
    from quant.pipeline import install
    from quant.targets import quant_targets

    model = randomize(ModelSpec(dit_kwargs=dict(TINY_PIXEL_KWARGS), vae=None).build())
    targets = quant_targets(model)
    config = QuantConfig(lora_rank=0)
    layers = {t.name: QuantizedLayer(quantize_weight(model.get_submodule(t.name).weight.detach(), 4, "per_channel"),
                                     None, 8) for t in targets}
    install(model, targets, layers, {t.name: None for t in targets}, config)
    lines = []
    prepare_for_inference(model, "fp8", log=lines.append)
    assert len(lines) == 1 and f"{len(targets)} of {len(targets)} quantized layers use the fake backend" in lines[0]
    assert "int activations" in lines[0]


def test_the_fp8_layer_traces_in_one_graph():
    layer = Fp8QuantLinear(fp8_layer(64, 48))
    x = torch.randn(2, 7, 64)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")  # fullgraph: a graph break fails
    assert torch.equal(compiled(x), layer(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLAS's FP8 GEMM needs a CUDA GPU")
@pytest.mark.parametrize("in_features,out_features,granularity,smooth", [
    (1152, 3456, "per_token", False), (4608, 1152, "per_token", True), (1152, 4608, "per_tensor", False)])
def test_on_the_gpu_the_fp8_layer_computes_the_fake_numerics(in_features, out_features, granularity, smooth):
    fake = fp8_layer(in_features, out_features, granularity=granularity, rank=32, smooth=smooth).cuda()
    layer = Fp8QuantLinear(fake)
    x = torch.randn(2, 300, in_features, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    x = x.to(torch.bfloat16)  # both sides see the same input, as in a bf16 model
    expected, got = fake(x.float()), layer(x).float()
    assert ((got - expected).norm() / expected.norm()).item() < 4e-3  # bf16 output and LoRA
