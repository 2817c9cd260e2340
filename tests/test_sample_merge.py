"""sample_merge_TAS.py: the npz format, process-count independence, resuming, bit-width checks."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from checkpoints import ModelSpec, write_spec_json
from conftest import ROOT, TINY_PIXEL_KWARGS, randomize
from diffusion import create_diffusion
from npzio import load_samples_npz
from quant.calibrate import CalibrationRun
from quant.checkpoint import save_quantized
from quant.config import QuantConfig
from quant.pipeline import quantize_dit

COUNT = 6


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    spec = ModelSpec(dit_kwargs=dict(TINY_PIXEL_KWARGS), vae=None)
    torch.save(randomize(spec.build(), std=0.1).state_dict(), folder / "tiny.pt")
    write_spec_json(spec, folder / "tiny.json")
    return folder / "tiny.pt"


def sampler(*args, nproc=None, env_extra=None):
    command = [sys.executable, "sample_merge_TAS.py", *args, "--device", "cpu", "--num-sampling-steps", "5"]
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=29517",
                   *command[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    return result


def fp_run(tiny_ckpt, sample_dir, *extra, nproc=None):
    result = sampler("--fp", "--ckpt", str(tiny_ckpt), "--num-fid-samples", str(COUNT), "--per-proc-batch-size", "4",
                     "--cfg-scale", "1.5", "--sample-dir", str(sample_dir), *extra, nproc=nproc)
    assert result.returncode == 0, result.stderr
    npz = result.stdout.strip().splitlines()[-1]  # the path is printed last
    return npz


def test_npz_format(tiny_ckpt, tmp_path):
    images, labels = load_samples_npz(fp_run(tiny_ckpt, tmp_path))
    assert images.shape == (COUNT, 8, 8, 3) and images.dtype == np.uint8
    assert np.array_equal(images[..., 0], images[..., 2])  # grayscale repeated to 3 channels
    assert labels.shape == (COUNT,) and labels.min() >= 0 and labels.max() < 10


def test_two_processes_give_the_same_npz_as_one(tiny_ckpt, tmp_path):
    one = load_samples_npz(fp_run(tiny_ckpt, tmp_path / "one"))
    two = load_samples_npz(fp_run(tiny_ckpt, tmp_path / "two", nproc=2))
    assert np.array_equal(one[1], two[1])
    assert np.abs(one[0].astype(int) - two[0].astype(int)).max() <= 1


def test_interrupted_run_resumes_to_the_same_npz(tiny_ckpt, tmp_path):
    npz = fp_run(tiny_ckpt, tmp_path)
    reference = load_samples_npz(npz)
    folder = npz[: -len(".npz")]
    kept = os.path.join(folder, "000000.png")
    kept_mtime = os.stat(kept).st_mtime_ns
    os.remove(npz)
    os.remove(os.path.join(folder, "000004.png"))  # as if the run had stopped there
    with open(os.path.join(folder, "000003.png"), "r+b") as f:  # a truncated image is redone
        f.truncate(20)
    resumed = load_samples_npz(fp_run(tiny_ckpt, tmp_path))
    assert np.array_equal(resumed[0], reference[0]) and np.array_equal(resumed[1], reference[1])
    assert os.stat(kept).st_mtime_ns == kept_mtime  # finished samples were not redrawn


def test_quantized_checkpoint_samples_and_refuses_other_bit_widths(tiny_ckpt, tmp_path):
    spec = ModelSpec(dit_kwargs=dict(TINY_PIXEL_KWARGS), vae=None)
    model = spec.build()
    model.load_state_dict(torch.load(tiny_ckpt, weights_only=True))
    config = QuantConfig(lora_rank=4, alpha_grid=(0.5,))
    quantized, _ = quantize_dit(model, create_diffusion("2"), config, CalibrationRun(tuple(range(10)), 1.5, 2, 0),
                                torch.device("cpu"), progress=False)
    save_quantized(tmp_path / "q", quantized, config, spec)
    ok = sampler("--path", str(tmp_path / "q"), "--num-fid-samples", "2", "--sample-dir", str(tmp_path / "s"))
    assert ok.returncode == 0, ok.stderr
    assert load_samples_npz(ok.stdout.strip().splitlines()[-1])[0].shape == (2, 8, 8, 3)
    bad = sampler("--path", str(tmp_path / "q"), "--act-bit", "6", "--num-fid-samples", "2")
    assert bad.returncode == 2 and "--act-bit 6 disagrees with the checkpoint (W4A8)" in bad.stderr
