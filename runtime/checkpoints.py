"""Finding, downloading and safely loading full-precision DiT checkpoints.

* Official names (`DiT-XL-2-256x256.pt`, `DiT-XL-2-512x512.pt`) are downloaded once from the
  official URL into `pretrained_models/`, atomically, with a progress bar.
* Local `.pt`/`.pth` files (a plain state dict, or a training checkpoint holding `ema`/`model`)
  load with `torch.load(weights_only=True)`: no pickled code is ever executed.
* `.safetensors` files load through safetensors.

The architecture is a `ModelSpec`: from a registry name (`--model DiT-XL/2 --image-size 256`) or
from a JSON file of the DiT constructor arguments (`--model-config`, or found beside the
checkpoint as `<checkpoint without extension>.json`). The JSON may carry `"vae": null` for a
pixel-space model, or `"vae": "ema"`/`"mse"` for a latent one (the default).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import pickle
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import torch

from models import DiT, DiT_models, architecture_kwargs
from runtime.errors import UserError
from runtime.fileio import atomic_output

OFFICIAL_CHECKPOINTS = ("DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt")
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/DiT/models/{name}"
PRETRAINED_DIR = Path("pretrained_models")
VAE_CHOICES = ("ema", "mse")
LATENT_DOWNSAMPLING = 8  # the SD VAE maps an image of side S to latents of side S / 8
DIT_ARGUMENTS = tuple(p for p in inspect.signature(DiT.__init__).parameters if p != "self")
DIT_DEFAULTS = {name: p.default for name, p in inspect.signature(DiT.__init__).parameters.items() if name != "self"}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A DiT architecture and how its samples become images.

    `dit_kwargs` are DiT constructor arguments; `vae` is "ema"/"mse" (SD VAE, latents scaled by
    0.18215) or None for a model that works on pixels directly.
    """

    dit_kwargs: dict
    vae: str | None = "ema"

    def __post_init__(self):
        unknown = set(self.dit_kwargs) - set(DIT_ARGUMENTS)
        if unknown:
            raise UserError(f"unknown DiT arguments {sorted(unknown)}; the constructor takes {list(DIT_ARGUMENTS)}")
        if self.vae is not None and self.vae not in VAE_CHOICES:
            raise UserError(f"vae must be one of {VAE_CHOICES} or null, got {self.vae!r}")
        kwargs = {**DIT_DEFAULTS, **self.dit_kwargs}
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            if not isinstance(kwargs[name], int) or isinstance(kwargs[name], bool) or kwargs[name] < 1:
                raise UserError(f"model config: {name} must be a whole number ≥ 1, got {kwargs[name]!r}")
        if kwargs["hidden_size"] % kwargs["num_heads"]:
            raise UserError(f"model config: hidden_size {kwargs['hidden_size']} is not a multiple of num_heads "
                            f"{kwargs['num_heads']}; fix the model config JSON")
        if kwargs["input_size"] % kwargs["patch_size"]:
            raise UserError(f"model config: input_size {kwargs['input_size']} is not a multiple of patch_size "
                            f"{kwargs['patch_size']}; fix the model config JSON")

    @property
    def input_size(self) -> int:
        return self.dit_kwargs.get("input_size", 32)

    @property
    def in_channels(self) -> int:
        return self.dit_kwargs.get("in_channels", 4)

    @property
    def num_classes(self) -> int:
        return self.dit_kwargs.get("num_classes", 1000)

    @property
    def image_size(self) -> int:
        """Side of the generated images in pixels."""
        return self.input_size * (LATENT_DOWNSAMPLING if self.vae else 1)

    def build(self) -> DiT:
        return DiT(**self.dit_kwargs)

    def to_json_dict(self) -> dict:
        return {**self.dit_kwargs, "vae": self.vae}

    @classmethod
    def from_json_dict(cls, data: dict) -> ModelSpec:
        data = dict(data)
        vae = data.pop("vae", "ema")
        return cls(dit_kwargs=data, vae=vae)


def spec_from_name(name: str, image_size: int = 256, num_classes: int = 1000, vae: str = "ema") -> ModelSpec:
    """A latent-space model from the registry, e.g. DiT-XL/2 at 256² (32² latents)."""
    if name not in DiT_models:
        raise UserError(f"unknown model {name!r}; choose one of {list(DiT_models)} or pass --model-config")
    if image_size % LATENT_DOWNSAMPLING:
        raise UserError(f"--image-size {image_size} must be a multiple of {LATENT_DOWNSAMPLING} for a latent model")
    kwargs = dict(architecture_kwargs(name), input_size=image_size // LATENT_DOWNSAMPLING, num_classes=num_classes)
    return ModelSpec(dit_kwargs=kwargs, vae=vae)


def read_spec_json(path: str | os.PathLike) -> ModelSpec:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model config {path} does not exist; pass --model-config PATH to a JSON of DiT constructor arguments")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"model config {path} is not valid JSON ({error}); fix or regenerate it") from None
    if not isinstance(data, dict):
        raise UserError(f"model config {path} must hold a JSON object of DiT constructor arguments")
    return ModelSpec.from_json_dict(data)


def write_spec_json(spec: ModelSpec, path: str | os.PathLike) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(spec.to_json_dict(), indent=2) + "\n")


def config_path_beside(checkpoint: str | os.PathLike) -> Path:
    """`<checkpoint without extension>.json`, where a checkpoint's architecture is looked up."""
    return Path(checkpoint).with_suffix(".json")


def resolve_spec(
    model: str | None,
    model_config: str | None = None,
    ckpt: str | None = None,
    image_size: int = 256,
    num_classes: int = 1000,
    vae: str = "ema",
) -> ModelSpec:
    """The architecture: --model-config, else the JSON beside --ckpt, else --model NAME."""
    if model_config:
        return read_spec_json(model_config)
    if ckpt and config_path_beside(ckpt).is_file():
        return read_spec_json(config_path_beside(ckpt))
    if model is None:
        raise UserError("no architecture given: pass --model NAME or --model-config PATH (or put <ckpt>.json beside --ckpt)")
    return spec_from_name(model, image_size=image_size, num_classes=num_classes, vae=vae)


def default_checkpoint(spec_model: str, image_size: int) -> str:
    """The official checkpoint name for DiT-XL/2 at this resolution (what the official scripts use)."""
    name = f"DiT-XL-2-{image_size}x{image_size}.pt"
    if spec_model != "DiT-XL/2" or name not in OFFICIAL_CHECKPOINTS:
        raise UserError(f"no official checkpoint for {spec_model} at {image_size}px; pass --ckpt PATH")
    return name


#################################################################################
#                                   Downloading                                 #
#################################################################################


def download_official(name: str, directory: Path = PRETRAINED_DIR) -> Path:
    """Path of an official checkpoint, downloading it first if it is not in `directory`."""
    target = directory / name
    if target.is_file():
        return target
    url = OFFICIAL_URL.format(name=name)
    from tqdm.auto import tqdm

    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_output(target) as tmp:
            total = int(response.headers.get("Content-Length", 0)) or None
            with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}") as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
            if total is not None and tmp.stat().st_size != total:
                raise UserError(f"download of {name} was cut short; run again to retry")
    except (urllib.error.URLError, OSError) as error:
        raise UserError(
            f"cannot download {url} ({error}); fetch it elsewhere and put it at {target}, or pass --ckpt PATH"
        ) from None
    return target


#################################################################################
#                                    Loading                                    #
#################################################################################


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` or `.pt/.pth` (plain, or a training checkpoint whose
    `ema` weights, else `model` weights, are taken). Never executes pickled code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path passed to --ckpt")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise UserError(f"checkpoint {path} is corrupt or truncated ({error}); re-download or re-save it") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(
            f"checkpoint {path} is corrupt or holds objects other than tensors ({_first_sentence(error)}); "
            "re-download it, or re-save it as a plain state dict or .safetensors"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise UserError(f"checkpoint {path} is corrupt or truncated ({_first_sentence(error)}); re-download or re-save it") from None
    if isinstance(data, dict):
        for key in ("ema", "model"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"checkpoint {path} is not a state dict of tensors; save model.state_dict() instead")
    return data


def _first_sentence(error: Exception) -> str:
    """The first sentence of an exception's message, to keep error reports on one line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text.split(". ")[0].rstrip(".")


def find_checkpoint(name_or_path: str) -> Path:
    """An official checkpoint name (downloaded if needed) or a local path."""
    if name_or_path in OFFICIAL_CHECKPOINTS and not Path(name_or_path).is_file():
        return download_official(name_or_path)
    return Path(name_or_path)


def load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load with strict key and shape checks; a mismatch names the first offending key."""
    expected = model.state_dict()
    for key, tensor in state_dict.items():
        if key in expected and expected[key].shape != tensor.shape:
            raise UserError(
                f"{source} does not fit the architecture: {key} has shape {tuple(tensor.shape)} in the checkpoint "
                f"but {tuple(expected[key].shape)} in the model; pass the matching --model/--image-size or --model-config"
            )
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(
            f"{source} does not fit the architecture ({len(missing)} missing, {len(unexpected)} unexpected keys; "
            f"first {detail}); pass the matching --model or --model-config"
        )
    model.load_state_dict(state_dict, strict=True)


def check_finite(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a state dict with a NaN or infinite value, naming the first such tensor: a model
    with one cannot be quantized or sampled (every output would be NaN)."""
    for key, tensor in state_dict.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise UserError(f"{source} holds non-finite values (NaN or Inf) in {key} ({bad} of {tensor.numel()}); "
                                "use an intact checkpoint (re-download, or an earlier training checkpoint)")


def load_model_and_dtype(spec: ModelSpec, ckpt: str, device: str | torch.device = "cpu") -> tuple[DiT, torch.dtype]:
    """(model, the checkpoint's floating-point dtype): read `ckpt` (refusing non-finite weights),
    build `spec`, load the weights into it (fp32), and put it in eval mode on `device`. The
    checkpoint is read first, so a missing or broken one is reported before the (possibly large)
    model is built."""
    path = find_checkpoint(ckpt)
    raw = read_state_dict(path)
    stored = next((v.dtype for v in raw.values() if v.is_floating_point()), torch.float32)
    state = {k: v.float() for k, v in raw.items()}
    check_finite(state, f"checkpoint {path}")
    model = spec.build()
    load_weights(model, state, source=f"checkpoint {path}")
    return model.to(device).eval(), stored


def load_model(spec: ModelSpec, ckpt: str, device: str | torch.device = "cpu") -> DiT:
    """The model of `ckpt` in fp32 (load_model_and_dtype without the dtype)."""
    return load_model_and_dtype(spec, ckpt, device)[0]
