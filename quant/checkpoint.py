"""The quantized checkpoint: a directory with `model.safetensors` (integer codes, scales, zero
points, LoRA factors, folded adaLN weights and the remaining FP weights) and `quant.json`
(bit-widths, method settings, chosen α per layer, the model config, the source checkpoint's
SHA-256 and package versions). It loads without the FP checkpoint and without re-quantizing."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import torch

from checkpoints import ModelSpec
from errors import UserError

from .config import QuantConfig
from .modules import QuantLinear, WeightOnlyLinear
from .targets import quant_targets, set_module

WEIGHTS_FILE = "model.safetensors"
META_FILE = "quant.json"
FORMAT_VERSION = 1


def package_versions() -> dict[str, str]:
    import numpy
    import safetensors

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__}


def save_quantized(directory: str | os.PathLike, model: torch.nn.Module, config: QuantConfig, spec: ModelSpec,
                   extra: dict | None = None) -> Path:
    """Write the checkpoint directory atomically: built beside it, then renamed into place (an
    existing directory of that name is replaced only once the new one is complete)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "ditas-quantized", "format_version": FORMAT_VERSION, "quant_config": config.to_dict(),
            "model_config": spec.to_json_dict(), "versions": package_versions(), **(extra or {})}
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": "ditas-quantized"})
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for path in (staging / WEIGHTS_FILE, staging / META_FILE):
            path.chmod(0o644)
        staging.chmod(0o755)
        if directory.exists():
            backup = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            directory.rename(backup)
            staging.rename(directory)
            shutil.rmtree(backup)
        else:
            staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def read_meta(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise UserError(f"{directory} is not a quantized checkpoint (needs {META_FILE} and {WEIGHTS_FILE}); "
                        "create one with QuantDiT.py --output DIR")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{meta_path} is corrupt ({error}); re-run QuantDiT.py") from None
    if meta.get("format") != "ditas-quantized" or meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{meta_path} is not a version-{FORMAT_VERSION} DiTAS checkpoint; re-run QuantDiT.py")
    return meta


def build_quantized_shell(spec: ModelSpec, config: QuantConfig, on_the_fly_roles: tuple[str, ...] = ("fc2",)):
    """The quantized architecture on the meta device: a DiT whose target layers are QuantLinear
    shells (no memory, no computation) ready for load_state_dict(assign=True)."""
    with torch.device("meta"):
        model = spec.build()
        for target in quant_targets(model):
            linear = model.get_submodule(target.name)
            shell = QuantLinear(linear.in_features, linear.out_features, config,
                                has_smooth=config.smooth and target.role in on_the_fly_roles,
                                has_bias=linear.bias is not None)
            set_module(model, target.name, shell)
        if config.adaln_weight_bits is not None:
            for block in model.blocks:
                linear = block.adaLN_modulation[-1]
                block.adaLN_modulation[-1] = WeightOnlyLinear(linear.in_features, linear.out_features,
                                                              config.adaln_weight_bits)
    return model


def load_quantized(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model, config, meta) from a quantized checkpoint directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_meta(directory)
    try:
        config = QuantConfig.from_dict(meta["quant_config"])
        spec = ModelSpec.from_json_dict(meta["model_config"])
    except (KeyError, ValueError, TypeError) as error:
        raise UserError(f"{directory / META_FILE} has invalid settings ({error}); re-run QuantDiT.py") from None
    try:
        state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{directory / WEIGHTS_FILE} is corrupt or truncated ({error}); re-run QuantDiT.py") from None
    model = build_quantized_shell(spec, config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        first = (missing or unexpected or mismatched)[0]
        raise UserError(f"{directory / WEIGHTS_FILE} does not match its {META_FILE} (first bad key: {first}); "
                        "re-run QuantDiT.py")
    model.load_state_dict(state, assign=True)
    return model.to(device).eval(), config, meta
