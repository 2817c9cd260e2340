"""Checkpoint finding, safe loading and the errors a user sees."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import urllib.error

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, TINY_PIXEL_KWARGS
from runtime import checkpoints
from runtime.checkpoints import ModelSpec, load_model, read_state_dict, resolve_spec, spec_from_name, write_spec_json
from runtime.errors import UserError


def outputs_equal(a, b):
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 900]), torch.tensor([0, 9])
    return torch.equal(a(x, t, y), b(x, t, y))


@pytest.mark.parametrize("fmt", ["plain.pt", "train.pt", "weights.safetensors"])
def test_state_dict_round_trip(tmp_path, tiny_pixel_spec, tiny_pixel_model, fmt):
    path = tmp_path / fmt
    state = tiny_pixel_model.state_dict()
    if fmt == "plain.pt":
        torch.save(state, path)
    elif fmt == "train.pt":  # what train.py writes: the EMA weights are the ones to sample with
        torch.save({"model": {k: torch.zeros_like(v) for k, v in state.items()}, "ema": state, "step": 3}, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_model(tiny_pixel_spec, str(path))
    assert outputs_equal(loaded, tiny_pixel_model)


def test_architecture_json_beside_the_checkpoint_is_found(tmp_path, tiny_pixel_spec, tiny_pixel_model):
    ckpt = tmp_path / "demo.pt"
    torch.save(tiny_pixel_model.state_dict(), ckpt)
    write_spec_json(tiny_pixel_spec, tmp_path / "demo.json")
    spec = resolve_spec("DiT-XL/2", None, str(ckpt))
    assert spec == tiny_pixel_spec and spec.vae is None and spec.image_size == 8


def test_spec_from_name_is_a_latent_model():
    spec = spec_from_name("DiT-XL/2", image_size=512)
    assert spec.input_size == 64 and spec.vae == "ema" and spec.image_size == 512


def test_missing_checkpoint(tmp_path, tiny_pixel_spec):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tiny_pixel_spec, str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_checkpoint(tmp_path, tiny_pixel_spec, tiny_pixel_model, suffix):
    path = tmp_path / f"full{suffix}"
    if suffix == ".pt":
        torch.save(tiny_pixel_model.state_dict(), path)
    else:
        save_file(tiny_pixel_model.state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_model(tiny_pixel_spec, str(path))


class Payload:
    """An arbitrary object: a weights_only load must refuse to unpickle it."""


def test_pickled_objects_are_refused(tmp_path, tiny_pixel_spec):
    path = tmp_path / "evil.pt"
    torch.save({"ema": {"w": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(UserError, match="objects other than tensors"):
        read_state_dict(path)


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path, tiny_pixel_model):
    path = tmp_path / "m.pt"
    torch.save(tiny_pixel_model.state_dict(), path)
    wider = ModelSpec(dit_kwargs={**TINY_PIXEL_KWARGS, "hidden_size": 32}, vae=None)
    with pytest.raises(UserError, match=r"pos_embed has shape \(1, 16, 64\) in the checkpoint but \(1, 16, 32\)"):
        load_model(wider, str(path))


def test_missing_keys_are_reported(tmp_path, tiny_pixel_spec, tiny_pixel_model):
    path = tmp_path / "m.pt"
    state = tiny_pixel_model.state_dict()
    state.pop("blocks.1.mlp.fc2.bias")
    torch.save(state, path)
    with pytest.raises(UserError, match="first missing blocks.1.mlp.fc2.bias"):
        load_model(tiny_pixel_spec, str(path))


def test_bad_model_config(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        resolve_spec(None, str(bad))
    bad.write_text(json.dumps({"hidden": 3}))
    with pytest.raises(UserError, match="unknown DiT arguments"):
        resolve_spec(None, str(bad))


def test_download_without_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(checkpoints.urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match=f"put it at {tmp_path}/DiT-XL-2-256x256.pt"):
        checkpoints.download_official("DiT-XL-2-256x256.pt", tmp_path)
    assert list(tmp_path.iterdir()) == []


class ShortResponse(io.BytesIO):
    """A response that promises more bytes than it sends, like a dropped connection."""

    headers = {"Content-Length": "1000"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_cut_short_download_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints.urllib.request, "urlopen", lambda *a, **k: ShortResponse(b"x" * 10))
    with pytest.raises(UserError, match="cut short"):
        checkpoints.download_official("DiT-XL-2-256x256.pt", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_complete_download_lands_under_its_name(tmp_path, monkeypatch):
    response = ShortResponse(b"x" * 1000)
    monkeypatch.setattr(checkpoints.urllib.request, "urlopen", lambda *a, **k: response)
    path = checkpoints.download_official("DiT-XL-2-256x256.pt", tmp_path)
    assert path.read_bytes() == b"x" * 1000 and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_sample_script_reports_errors_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "sample.py", "--ckpt", str(tmp_path / "missing.pt"), "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
