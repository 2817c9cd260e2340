"""Bad input and faults, as a user meets them on the command line: every case exits with status 2
and one `error:` line (no traceback) and writes nothing; plus the sample-folder manifest, the
crash-safe checkpoint replacement and the refusal of non-finite weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_PIXEL_KWARGS, randomize
from quant.calibrate import CalibrationRun
from quant.checkpoint import META_FILE, WEIGHTS_FILE, save_quantized
from quant.config import QuantConfig
from quant.pipeline import quantize_dit
from runtime.checkpoints import ModelSpec, check_finite, write_spec_json
from runtime.errors import UserError
from runtime.fileio import backup_name, recover_directory, replace_directory, staging_prefix
from runtime.npzio import save_samples_npz

FAST_QUANT = ("--num-sampling-steps", "2", "--alpha-grid", "0.5", "--lora-rank", "4", "--lora-iters", "1",
              "--device", "cpu")


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)


def tiny_spec(**changes) -> ModelSpec:
    return ModelSpec(dit_kwargs=dict(TINY_PIXEL_KWARGS, **changes), vae=None)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny FP checkpoint (with its sidecar), one with a NaN weight, one whose sidecar is broken,
    a quantized checkpoint, and npz files."""
    folder = tmp_path_factory.mktemp("bad-input")
    spec = tiny_spec()
    model = randomize(spec.build(), std=0.1)
    torch.save(model.state_dict(), folder / "tiny.pt")
    write_spec_json(spec, folder / "tiny.json")
    poisoned = model.state_dict()
    poisoned["blocks.1.mlp.fc2.weight"] = poisoned["blocks.1.mlp.fc2.weight"].clone()
    poisoned["blocks.1.mlp.fc2.weight"][3, 5] = float("nan")
    torch.save(poisoned, folder / "nan.pt")
    write_spec_json(spec, folder / "nan.json")
    torch.save(model.state_dict(), folder / "heads.pt")
    (folder / "heads.json").write_text(json.dumps(dict(TINY_PIXEL_KWARGS, num_heads=3, vae=None)))
    config = QuantConfig(lora_rank=4, alpha_grid=(0.5,))
    quantized, _ = quantize_dit(model, config, CalibrationRun(tuple(range(10)), 1.5, 2, 0),
                                torch.device("cpu"), progress=False)
    save_quantized(folder / "q", quantized, config, spec)
    listed = folder / "q-list"
    listed.mkdir()
    (listed / WEIGHTS_FILE).write_bytes((folder / "q" / WEIGHTS_FILE).read_bytes())
    (listed / META_FILE).write_text("[1, 2]")
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    save_samples_npz(folder / "four.npz", images, np.array([0, 1, 2, 3]))
    save_samples_npz(folder / "three.npz", images[:3], np.array([0, 1, 2]))
    save_samples_npz(folder / "one.npz", images[:1], np.array([0]))
    save_samples_npz(folder / "labels.npz", images, np.array([0, 1, 2, 11]))
    np.save(folder / "array.npy", images)
    (folder / "a-file").write_text("not a folder")
    return folder


# (script, arguments with {d} for the fixture folder, words the one error line must hold, a path
# under {d} that must not exist afterwards)
CASES = {
    "nan weights, no LoRA": ("QuantDiT.py", ["--ckpt", "{d}/nan.pt", "--lora-rank", "0", "--output", "{d}/out1",
                                             "--num-sampling-steps", "2", "--device", "cpu"],
                             "non-finite values (NaN or Inf) in blocks.1.mlp.fc2.weight", "out1"),
    "nan weights, default LoRA": ("QuantDiT.py", ["--ckpt", "{d}/nan.pt", "--output", "{d}/out2",
                                                  "--num-sampling-steps", "2", "--device", "cpu"],
                                  "non-finite values", "out2"),
    "nan weights, FP sampling": ("sample.py", ["--ckpt", "{d}/nan.pt", "--output", "{d}/nan.png",
                                               "--num-sampling-steps", "2", "--device", "cpu"],
                                 "non-finite values", "nan.png"),
    "output under a file": ("QuantDiT.py", ["--ckpt", "{d}/tiny.pt", "--output", "{d}/a-file/q", *FAST_QUANT],
                            "is a file, not a folder", "a-file/q"),
    "a file in the output's place": ("QuantDiT.py", ["--ckpt", "{d}/tiny.pt", "--output", "{d}/a-file",
                                                     *FAST_QUANT], "a file of that name is in the way", None),
    "group size not dividing the inputs": ("QuantDiT.py", ["--ckpt", "{d}/tiny.pt", "--weight-granularity",
                                                           "per_group", "--weight-group-size", "48", "--output",
                                                           "{d}/out3", *FAST_QUANT],
                                           "--weight-group-size 48 does not divide the 64 inputs", "out3"),
    "missing checkpoint without sidecar": ("QuantDiT.py", ["--ckpt", "{d}/missing.pt", "--output", "{d}/out4"],
                                           "missing.pt does not exist", "out4"),
    "sidecar with num_heads 3": ("sample.py", ["--ckpt", "{d}/heads.pt", "--output", "{d}/heads.png",
                                               "--device", "cpu"], "not a multiple of num_heads 3", "heads.png"),
    "quant.json holding a list": ("sample.py", ["--path", "{d}/q-list", "--output", "{d}/list.png",
                                                "--device", "cpu"], "must hold a JSON object", "list.png"),
    "zero sampling steps": ("sample_merge_TAS.py", ["--fp", "--ckpt", "{d}/tiny.pt", "--num-sampling-steps", "0",
                                                    "--sample-dir", "{d}/s0"], "must be at least 1", "s0"),
    "zero batch size": ("sample_merge_TAS.py", ["--fp", "--ckpt", "{d}/tiny.pt", "--per-proc-batch-size", "0",
                                                "--sample-dir", "{d}/s1"], "must be at least 1", "s1"),
    "zero samples": ("sample_merge_TAS.py", ["--fp", "--ckpt", "{d}/tiny.pt", "--num-fid-samples", "0",
                                             "--sample-dir", "{d}/s2"], "must be at least 1", "s2"),
    "--device gpu": ("sample_merge_TAS.py", ["--fp", "--ckpt", "{d}/tiny.pt", "--device", "gpu",
                                             "--sample-dir", "{d}/s3"], "unknown --device 'gpu'", "s3"),
    "--fp with --path": ("sample_merge_TAS.py", ["--fp", "--ckpt", "{d}/tiny.pt", "--path", "{d}/q",
                                                 "--sample-dir", "{d}/s4", "--device", "cpu"], "drop --path", "s4"),
    "--fp with --weight-bit": ("sample_merge_TAS.py", ["--fp", "--ckpt", "{d}/tiny.pt", "--weight-bit", "4",
                                                       "--sample-dir", "{d}/s5", "--device", "cpu"],
                               "drop --weight-bit", "s5"),
    "an .npy to evaluate": ("evaluate.py", ["{d}/array.npy"], "is a single array, not an npz", None),
    "one sample to evaluate": ("evaluate.py", ["{d}/one.npz"], "needs at least 2", None),
    "paired with another count": ("evaluate.py", ["{d}/four.npz", "{d}/four.npz", "--paired", "{d}/three.npz"],
                                  "pair samples of the same seeds and count", None),
    "labels outside the classes": ("evaluate.py", ["{d}/labels.npz", "{d}/four.npz"], "must lie in 0..9", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_one_line_exit_2_and_writes_nothing(files, case):
    script, arguments, words, must_not_exist = CASES[case]
    before = sorted(p.name for p in files.iterdir())
    result = run(script, *(a.format(d=files) for a in arguments))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert words in lines[0] and "Traceback" not in result.stderr
    assert sorted(p.name for p in files.iterdir()) == before  # nothing new beside the inputs
    if must_not_exist:
        assert not (files / must_not_exist).exists()


def test_non_finite_state_is_refused_naming_the_tensor():
    state = {"a": torch.ones(3), "b": torch.tensor([1.0, float("inf")]), "c": torch.tensor([float("nan")])}
    with pytest.raises(UserError, match=r"in b \(1 of 2\)"):
        check_finite(state, "checkpoint x")
    check_finite({"a": torch.ones(2), "codes": torch.zeros(2, dtype=torch.uint8)}, "checkpoint x")


def sampler_run(files, sample_dir, *extra):
    return run("sample_merge_TAS.py", "--path", str(files / "q"), "--num-fid-samples", "4", "--per-proc-batch-size",
               "2", "--num-sampling-steps", "2", "--sample-dir", str(sample_dir), "--device", "cpu", *extra)


def test_a_sample_folder_never_mixes_models_or_batch_sizes(files, tmp_path):
    first = sampler_run(files, tmp_path)
    assert first.returncode == 0, first.stderr
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["weights_sha256"]) == 64 and manifest["per_proc_batch_size"] == 2
    pngs = sorted(folder.glob("*.png"))
    stamps = [p.stat().st_mtime_ns for p in pngs]
    again = sampler_run(files, tmp_path)  # same model and settings: resumes (nothing to redo)
    assert again.returncode == 0, again.stderr
    other_batch = sampler_run(files, tmp_path, "--per-proc-batch-size", "4")
    assert other_batch.returncode == 2 and "differs in per_proc_batch_size" in other_batch.stderr
    (folder / "manifest.json").write_text(json.dumps(dict(manifest, weights_sha256="0" * 64)))  # another model
    other_model = sampler_run(files, tmp_path)
    assert other_model.returncode == 2 and "differs in weights_sha256" in other_model.stderr
    assert "delete the folder" in other_model.stderr
    (folder / "manifest.json").unlink()
    unmarked = sampler_run(files, tmp_path)
    assert unmarked.returncode == 2 and "no manifest.json" in unmarked.stderr
    assert [p.stat().st_mtime_ns for p in pngs] == stamps  # no image was touched


def test_replacing_a_directory_keeps_the_old_or_the_new_one_under_its_name(tmp_path):
    target, new = tmp_path / "ckpt", tmp_path / ".ckpt.tmp.1"
    target.mkdir()
    (target / "x").write_text("old")
    new.mkdir()
    (new / "x").write_text("new")
    replace_directory(new, target)
    assert (target / "x").read_text() == "new" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_an_interrupted_replacement_is_restored_and_its_leftovers_removed(tmp_path):
    target = tmp_path / "ckpt"
    backup = backup_name(target)  # killed between the two renames of the fallback path
    backup.mkdir()
    (backup / "x").write_text("old")
    staging = tmp_path / f"{staging_prefix(target)}abc"  # killed while writing the new one
    staging.mkdir()
    (staging / "x").write_text("half")
    done = recover_directory(target)
    assert (target / "x").read_text() == "old" and not backup.exists() and not staging.exists()
    assert len(done) == 2 and "restored" in done[0]


def test_a_failed_checkpoint_write_is_one_error_and_leaves_nothing(tmp_path, monkeypatch, tiny_pixel_model):
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(UserError, match="No space left on device.*nothing was saved"):
        save_quantized(tmp_path / "q", tiny_pixel_model, QuantConfig(), tiny_spec())
    assert list(tmp_path.iterdir()) == []


def test_a_non_finite_quantized_state_is_never_saved(tmp_path, tiny_pixel_model):
    with torch.no_grad():
        tiny_pixel_model.final_layer.linear.bias[0] = float("inf")
    with pytest.raises(UserError, match="non-finite values"):
        save_quantized(tmp_path / "q", tiny_pixel_model, QuantConfig(), tiny_spec())
    assert list(tmp_path.iterdir()) == []
