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
from typing import NamedTuple

import torch

from runtime.checkpoints import ModelSpec, check_finite
from runtime.errors import UserError
from runtime.fileio import recover_directory, replace_directory, staging_prefix

from .config import QuantConfig
from .modules import QuantLinear, WeightOnlyLinear
from .targets import quant_targets, replace_adaln_linears, set_module

WEIGHTS_FILE = "model.safetensors"
META_FILE = "quant.json"
FORMAT_VERSION = 1


def package_versions() -> dict[str, str]:
    import numpy
    import safetensors

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__}


# Quantization parameters that stay float32 whatever the storage dtype: a rounded weight scale
# or smoothing factor would change every dequantized weight or activation code of its row.
FLOAT32_BUFFERS = ("weight_scale", "smooth_inv", "act_range")


def storage_state(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict as saved: floating-point tensors in `dtype` (the source checkpoint's; the
    int8 kernels compute those parts in bf16 anyway), except FLOAT32_BUFFERS."""
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if value.is_floating_point() and not key.endswith(FLOAT32_BUFFERS):
            value = value.to(dtype)
        state[key] = value.contiguous()
    return state


def save_quantized(directory: str | os.PathLike, model: torch.nn.Module, config: QuantConfig, spec: ModelSpec,
                   extra: dict | None = None, storage_dtype: torch.dtype = torch.float32) -> Path:
    """Write the checkpoint directory atomically: built beside it under a hidden name, then put in
    place (replace_directory: an existing checkpoint of that name is swapped out in one step). A
    state with a non-finite value is refused, and a failed write leaves nothing behind.
    Floating-point parts are stored in `storage_dtype` (storage_state); loading casts them back."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(directory)
    state = storage_state(model, storage_dtype)
    check_finite(state, "the quantized model")
    meta = {"format": "ditas-quantized", "format_version": FORMAT_VERSION, "quant_config": config.to_dict(),
            "model_config": spec.to_json_dict(), "storage_dtype": str(storage_dtype).removeprefix("torch."),
            "versions": package_versions(), **(extra or {})}
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=staging_prefix(directory)))
    try:
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": "ditas-quantized"})
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")
        for path in (staging / WEIGHTS_FILE, staging / META_FILE):
            path.chmod(0o644)
        staging.chmod(0o755)
        replace_directory(staging, directory)
    except OSError as error:
        raise UserError(f"could not write the checkpoint {directory} ({error.strerror or error}); nothing was "
                        "saved: free space or choose another --output") from None
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
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{meta_path} is corrupt ({error}); re-run QuantDiT.py") from None
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path} must hold a JSON object, not {type(meta).__name__}; re-run QuantDiT.py")
    if meta.get("format") != "ditas-quantized" or meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{meta_path} is not a version-{FORMAT_VERSION} DiTAS checkpoint; re-run QuantDiT.py")
    return meta


def build_quantized_shell(spec: ModelSpec, config: QuantConfig):
    """The quantized architecture on the meta device: a DiT whose target layers are QuantLinear
    shells (no memory, no computation) ready for load_state_dict(assign=True)."""
    with torch.device("meta"):
        model = spec.build()
        for target in quant_targets(model):
            linear = model.get_submodule(target.name)
            shell = QuantLinear(linear.in_features, linear.out_features, config,
                                has_smooth=config.smooth and target.smooths_on_the_fly,
                                has_bias=linear.bias is not None)
            set_module(model, target.name, shell)
        if config.adaln_weight_bits is not None:
            replace_adaln_linears(model, lambda linear: WeightOnlyLinear(linear.in_features, linear.out_features,
                                                                         config.adaln_weight_bits))
    return model


class QuantizedCheckpoint(NamedTuple):
    model: torch.nn.Module  # the quantized DiT, in eval mode on the device asked for
    config: QuantConfig
    spec: ModelSpec  # its architecture, as stored
    meta: dict  # the whole quant.json


def load_quantized(directory: str | os.PathLike, device: str | torch.device = "cpu") -> QuantizedCheckpoint:
    """A quantized checkpoint directory, loaded and checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_meta(directory)
    try:
        config = QuantConfig.from_dict(meta["quant_config"])
        spec = ModelSpec.from_json_dict(meta["model_config"])
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise UserError(f"{directory / META_FILE} has invalid settings ({error}); re-run QuantDiT.py") from None
    try:
        state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{directory / WEIGHTS_FILE} is corrupt or truncated ({error}); re-run QuantDiT.py") from None
    check_finite(state, f"quantized checkpoint {directory / WEIGHTS_FILE}")
    model = build_quantized_shell(spec, config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        first = (missing or unexpected or mismatched)[0]
        raise UserError(f"{directory / WEIGHTS_FILE} does not match its {META_FILE} (first bad key: {first}); "
                        "re-run QuantDiT.py")
    # parts stored narrower (storage_dtype) come back in the dtype the modules compute in
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, assign=True)
    return QuantizedCheckpoint(model.to(device).eval(), config, spec, meta)
