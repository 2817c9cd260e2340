"""Inference backends of a quantized DiT, chosen when it is loaded: one table, one dispatch.

- `fake`: QuantLinear as saved; dequantizes and computes in float32 (the reference numerics).
- `triton`: int8 GEMMs on CUDA (quant/triton_modules.py, quant/kernels.py): W8A8, and W4A8 with
  the 4-bit codes kept packed on the GPU (two-level group codes too, unpacked to int8 before each
  GEMM), with per-tensor or per-token activation ranges; every layer a kernel does not cover
  (plain per-group weights, > 8-bit activations, FP8 activations) and every CPU run keep `fake`,
  said in one log line.
- `fp8`: layers with FP8 e4m3 activations (QuantConfig.act_format) on one row-scaled FP8 GEMM,
  torch._scaled_mm (quant/fp8_modules.py; cuBLAS on CUDA, also on the CPU); weights of at most 4
  bits per output channel. Other layers keep `fake`, said in one log line.

`prepare_for_inference` also casts the model's floating-point parts to the backend's dtype; the
quantized layers keep their scales in float32 whatever that dtype is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn

from .modules import QuantLinear, WeightOnlyLinear


class Backend(NamedTuple):
    dtype: torch.dtype  # what the model's unquantized parts run in
    install: Callable[[nn.Module, Callable[[str], None]], None]  # swaps in its layers (in place)


def _keep_fake_layers(model: nn.Module, log: Callable[[str], None]) -> None:
    """The fake backend runs QuantLinear as saved."""


def _install_kernels(model: nn.Module, log: Callable[[str], None]) -> None:
    from .triton_modules import install_kernels  # imports Triton only when chosen

    install_kernels(model, log)


def _install_fp8(model: nn.Module, log: Callable[[str], None]) -> None:
    from .fp8_modules import Fp8QuantLinear, fp8_unsupported_reason

    swap_covered_layers(model, "fp8", fp8_unsupported_reason, Fp8QuantLinear, log)


BACKEND_TABLE = {
    "fake": Backend(torch.float32, _keep_fake_layers),
    "triton": Backend(torch.bfloat16, _install_kernels),
    "fp8": Backend(torch.bfloat16, _install_fp8),
}
BACKENDS = tuple(BACKEND_TABLE)
BACKEND_HELP = ("how quantized layers run: fake (simulated, float32: the reference numerics), triton (int8 "
                "GEMM kernels on CUDA, the rest of the model in bf16; falls back to fake elsewhere) or fp8 "
                "(checkpoints with FP8 activations: cuBLAS FP8 GEMMs, the rest in bf16)")


def swap_covered_layers(model: nn.Module, backend: str, unsupported_reason: Callable[[QuantLinear], str | None],
                        build: Callable[[QuantLinear], nn.Module], log: Callable[[str], None]) -> int:
    """Swap every QuantLinear that `backend` covers (unsupported_reason None) for build(layer), in
    place; the others keep the fake numerics, counted by reason in one log line. Returns how many
    were swapped."""
    from .targets import set_module

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    fallbacks: dict[str, int] = {}
    for name, layer in layers:
        reason = unsupported_reason(layer)
        if reason:
            fallbacks[reason] = fallbacks.get(reason, 0) + 1
            continue
        set_module(model, name, build(layer))
    if fallbacks:
        log(f"backend {backend}: {sum(fallbacks.values())} of {len(layers)} quantized layers use the fake backend "
            f"(not covered: {', '.join(f'{n} with {r}' for r, n in fallbacks.items())})")
    return len(layers) - sum(fallbacks.values())


def cast_float_parts(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point parameters of every module except the quantized ones."""
    for module in model.modules():
        if isinstance(module, (QuantLinear, WeightOnlyLinear)):
            continue
        for parameter in module.parameters(recurse=False):
            if parameter.is_floating_point():
                parameter.data = parameter.data.to(dtype)


def prepare_for_inference(model: nn.Module, backend: str = "fake", dtype: torch.dtype | None = None,
                          log: Callable[[str], None] = print) -> nn.Module:
    """The model ready to run with `backend`, its float parts in `dtype` (default: the backend's)
    (in place; returned)."""
    if backend not in BACKEND_TABLE:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    chosen = BACKEND_TABLE[backend]
    cast_float_parts(model, chosen.dtype if dtype is None else dtype)
    chosen.install(model, log)
    return model
