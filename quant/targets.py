"""Which linear layers DiTAS quantizes, and the one walker that finds them by name.

Each DiT block holds four: attn.qkv and mlp.fc1 read adaLN-modulated activations (their
smoothing folds into adaLN), attn.proj reads the attention output (its smoothing folds into the
V rows of qkv) and mlp.fc2 reads the GELU output (smoothed on the fly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

ROLE_PATHS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
# Roles whose input has no producer to fold the smoothing factor into: the quantized layer keeps
# 1/s and applies it on the fly (with smoothing on, also when the layer chose s = 1).
ON_THE_FLY_ROLES = ("fc2",)


@dataclass(frozen=True)
class LayerTarget:
    name: str  # fully qualified, e.g. "blocks.3.attn.qkv"
    block: int
    role: str  # one of ROLE_PATHS

    @property
    def smooths_on_the_fly(self) -> bool:
        return self.role in ON_THE_FLY_ROLES


def quant_targets(model: nn.Module) -> list[LayerTarget]:
    """The quantized layers of every block of `model`, in forward order."""
    return [
        LayerTarget(f"blocks.{index}.{path}", index, role)
        for index in range(len(model.blocks))
        for role, path in ROLE_PATHS.items()
    ]


def replace_adaln_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    """Replace each block's adaLN modulation linear layer by make(that layer)."""
    for block in model.blocks:
        block.adaLN_modulation[-1] = make(block.adaLN_modulation[-1])


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def swap_modules(model: nn.Module, matches: Callable[[nn.Module], bool],
                 build: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every submodule of `model` that `matches` by build(it) (in place); how many."""
    names = [name for name, module in model.named_modules() if matches(module)]
    for name in names:
        set_module(model, name, build(model.get_submodule(name)))
    return len(names)
