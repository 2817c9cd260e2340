"""What the GPU benchmarks share: DiT-XL/2's and the demo's layer shapes, the int8 GEMM's variants,
random quantized layers, Mlps and whole DiTs (the same tensors and kernels as a DiTAS checkpoint,
whose values do not change the speed), and inputs with channel outliers."""

from __future__ import annotations

import dataclasses

import torch

from benchmarks.quantize_speed import random_dit
from quant.config import QuantConfig
from quant.layers import quantize_layer
from quant.modules import QuantLinear
from quant.pipeline import install
from quant.targets import get_module, quant_targets
from quant.triton_modules import TritonQuantLinear, TritonQuantMlp

TWO_LEVEL_GROUP = 64
HIDDEN = {"DiT-XL/2": 1152, "demo": 256}


# GEMM variants: name -> (weight bits, TritonQuantLinear options, extra int8_gemm options).
# The defaults: W8 tiles by pointer loads; packed W4 codes unpacked to int8 once per call at
# these row counts, then the W8 GEMM. Also: W8 through TMA, and W4 unpacked inside the GEMM's
# main loop (TMA or pointer loads), the path of calls with fewer rows.
IN_KERNEL = dict(unpack_from_rows=2**62)
GEMM_VARIANTS = {
    "w8a8": (8, {}, {}),
    "w8a8-tma": (8, dict(use_tma=True), {}),
    "w4a8": (4, {}, {}),
    "w4a8-in-kernel": (4, {}, IN_KERNEL),
    "w4a8-in-kernel-no-tma": (4, dict(use_tma=False), IN_KERNEL),
}


TOKENS = 256  # DiT-XL/2 at 256² (32² latents, patch 2)


def layer_shapes(hidden: int) -> dict[str, tuple[int, int]]:
    """(in, out) of the four quantized layers of a block."""
    return {"qkv": (hidden, 3 * hidden), "proj": (hidden, hidden), "fc1": (hidden, 4 * hidden),
            "fc2": (4 * hidden, hidden)}


def random_quantized_layer(linear: torch.nn.Linear, config: QuantConfig, on_the_fly: bool,
                           generator: torch.Generator):
    """(layer, factors): `linear` quantized by round-to-nearest with a one-iteration LoRA; with
    `on_the_fly`, smoothed by random factors kept in the layer (fc2's kind), else unsmoothed (None)."""
    factors = torch.rand(linear.in_features, generator=generator) * 2 + 0.5 if on_the_fly else None
    used = torch.ones(linear.in_features) if factors is None else factors
    device = linear.weight.device
    layer = quantize_layer(linear, used.to(device).unsqueeze(0), config, 1, generator=generator)[0].select(0)
    if factors is None:
        return dataclasses.replace(layer, smooth_inv=None), None
    return layer, factors.to(device)


def quantized_layer_pair(in_features: int, out_features: int, weight_bits: int, on_the_fly: bool, device,
                         seed: int = 0, act_granularity: str = "per_tensor", weight_granularity: str = "per_channel",
                         **kernel_options) -> tuple[QuantLinear, TritonQuantLinear]:
    """One random layer quantized (rank-32 LoRA, optional on-the-fly smoothing) as fake and kernel modules."""
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features).to(device)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) * 0.02)
    config = QuantConfig(weight_bits=weight_bits, act_bits=8, act_granularity=act_granularity,
                         weight_granularity=weight_granularity, weight_group_size=TWO_LEVEL_GROUP)
    fake = QuantLinear.from_layer(random_quantized_layer(linear, config, on_the_fly, generator)[0], config)
    return fake, TritonQuantLinear(fake, **kernel_options)


def outlier_input(rows: int, features: int, device, dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    spread = 1 + 20 * (torch.rand(features, generator=generator) > 0.98)  # a few outlier channels
    x = torch.randn(rows, features, generator=generator) * spread + 0.1
    return x.to(device=device, dtype=dtype)


def quantized_mlp_pair(hidden: int, weight_bits: int, device,
                       act_granularity: str = "per_tensor") -> tuple[torch.nn.Module, TritonQuantMlp]:
    """A DiT Mlp with random quantized fc1 and fc2 (fc2 smoothed on the fly), as fake and fused kernel modules."""
    from models import Mlp

    mlp = Mlp(hidden, 4 * hidden)
    mlp.fc1 = quantized_layer_pair(hidden, 4 * hidden, weight_bits, False, device, seed=1,
                                   act_granularity=act_granularity)[0]
    mlp.fc2 = quantized_layer_pair(4 * hidden, hidden, weight_bits, True, device, seed=2,
                                   act_granularity=act_granularity)[0]
    return mlp, TritonQuantMlp(TritonQuantLinear(mlp.fc1), TritonQuantLinear(mlp.fc2))


def synthetic_quantized_dit(name: str, image_size: int, device, weight_bits: int, adaln_bits: int | None,
                            act_granularity: str = "per_tensor", weight_granularity: str = "per_channel",
                            act_format: str = "int"):
    model = random_dit(name, image_size, device)
    config = QuantConfig(weight_bits=weight_bits, act_bits=8, adaln_weight_bits=adaln_bits,
                         act_granularity=act_granularity, weight_granularity=weight_granularity,
                         weight_group_size=TWO_LEVEL_GROUP, act_format=act_format)
    generator = torch.Generator().manual_seed(0)
    targets = quant_targets(model)
    layers, factors = {}, {}
    for target in targets:
        layers[target.name], factors[target.name] = random_quantized_layer(
            get_module(model, target.name), config, target.role == "fc2", generator)
    install(model, targets, layers, factors, config)
    return model


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
