"""One GPU against several: sample_merge_TAS.py under torchrun, the same images and the speed-up.

    python -m benchmarks.multi_gpu --nproc 2 --work work/multi_gpu --output multi_gpu.jsonl

For each case (demo FP and W4A8; DiT-XL/2 at 256² with random weights, FP and W4A8) the sampler
runs with `torchrun --nproc_per_node=1` and then `--nproc_per_node=N`, same seed and per-process
batch. The npz files are compared image by image, and the sampling rate each run logs (images per
second summed over processes, first batch left out) gives the scaling. The W4A8 checkpoints are
made here by QuantDiT.py; DiT-XL/2 and its SD VAE are random stand-ins (benchmarks/random_weights.py,
needs diffusers) because the official weights cannot be downloaded here. Rows are printed as JSON
lines, appended to --output as measured, and as a markdown table at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.rowlog import RowLog
from quant.backends import BACKENDS
from quant.checkpoint import META_FILE
from runtime.npzio import load_samples_npz

ROOT = Path(__file__).resolve().parents[1]
DEMO_CKPT = ROOT / "assets" / "demo" / "dit_fmnist.safetensors"
RATE = re.compile(r"sampling rate: ([0-9.]+) img/s")


@dataclass
class Case:
    name: str
    sampler_args: list[str]
    num_samples: int
    batch: int
    env: dict[str, str] = field(default_factory=dict)


def run(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def quantize(ckpt: Path, output: Path, env: dict[str, str], timeout: float) -> Path:
    """A W4A8 checkpoint of `ckpt` at `output`, made by QuantDiT.py unless one is there already."""
    if not (output / META_FILE).exists():
        run([sys.executable, "QuantDiT.py", "--ckpt", str(ckpt), "--weight-bit", "4", "--act-bit", "8",
             "--output", str(output)], env, timeout)
    return output


def build_cases(args: argparse.Namespace) -> list[Case]:
    work = args.work
    cases = []
    if "demo" in args.models:
        demo_q = quantize(DEMO_CKPT, work / "demo-w4a8", {}, args.timeout)
        cases += [Case("demo FP", ["--fp", "--ckpt", str(DEMO_CKPT)], args.demo_samples, args.demo_batch),
                  Case("demo W4A8", ["--path", str(demo_q), "--backend", args.backend], args.demo_samples,
                       args.demo_batch)]
    if "xl" in args.models:
        from benchmarks.random_weights import write_random_checkpoint, write_random_vae_cache

        hf_home = work / "hf"
        env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
        ckpt = work / "xl" / "DiT-XL-2-256-random.safetensors"
        if not ckpt.exists():
            write_random_checkpoint("DiT-XL/2", 256, ckpt.parent)
        if not (hf_home / "hub").exists():
            write_random_vae_cache(hf_home)
        xl_q = quantize(ckpt, work / "xl-w4a8", env, args.timeout)
        cases += [Case("DiT-XL/2 FP", ["--fp", "--ckpt", str(ckpt)], args.xl_samples, args.xl_batch, env),
                  Case("DiT-XL/2 W4A8", ["--path", str(xl_q), "--backend", args.backend], args.xl_samples,
                       args.xl_batch, env)]
    return cases


def sample(case: Case, nproc: int, args: argparse.Namespace) -> tuple[Path, float, float]:
    """(npz path, logged sampling rate, wall seconds of the whole torchrun call)."""
    sample_dir = args.work / "samples" / f"{case.name.replace(' ', '_').replace('/', '-')}-nproc{nproc}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "sample_merge_TAS.py", *case.sampler_args, "--num-fid-samples", str(case.num_samples),
               "--per-proc-batch-size", str(case.batch), "--num-sampling-steps", str(args.num_sampling_steps),
               "--global-seed", "0", "--sample-dir", str(sample_dir)]
    start = time.perf_counter()
    result = run(command, case.env, args.timeout)
    rates = RATE.findall(result.stderr)
    if not rates:
        raise RuntimeError(f"no sampling rate in the log of {' '.join(command)}:\n{result.stderr[-2000:]}")
    return Path(result.stdout.strip().splitlines()[-1]), float(rates[-1]), time.perf_counter() - start


def compare(one: Path, many: Path) -> dict:
    images_one, labels_one = load_samples_npz(one)
    images_many, labels_many = load_samples_npz(many)
    difference = np.abs(images_one.astype(np.int16) - images_many.astype(np.int16))
    identical = (difference.reshape(len(difference), -1).max(axis=1) == 0)
    return {"labels_equal": bool(np.array_equal(labels_one, labels_many)),
            "identical_images": int(identical.sum()), "images": len(identical),
            "max_abs_difference": int(difference.max())}


def main(args: argparse.Namespace) -> None:
    args.work.mkdir(parents=True, exist_ok=True)
    log = RowLog(args.output)

    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    cases = build_cases(args)
    if args.prepare_only:
        print(f"prepared {', '.join(c.name for c in cases)} in {args.work}")
        return
    for case in cases:
        npz_one, rate_one, wall_one = sample(case, 1, args)
        npz_many, rate_many, wall_many = sample(case, args.nproc, args)
        log.add({"card": card, "case": case.name, "samples": case.num_samples, "per_proc_batch": case.batch,
              "steps": args.num_sampling_steps, "nproc": args.nproc, "rate_1": rate_one, "rate_n": rate_many,
              "scaling": rate_many / rate_one, "wall_s_1": wall_one, "wall_s_n": wall_many,
              **compare(npz_one, npz_many)})
    print(f"\n| case | samples (batch / process) | img/s, 1 GPU | img/s, {args.nproc} GPUs | scaling "
          "| identical images | max pixel difference |")
    print("|---|---|---|---|---|---|---|")
    for r in log.rows:
        print(f"| {r['case']} | {r['samples']} ({r['per_proc_batch']}) | {r['rate_1']:.1f} | {r['rate_n']:.1f} "
              f"| {r['scaling']:.2f}× | {r['identical_images']} / {r['images']} | {r['max_abs_difference']} |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2, help="processes (GPUs) of the run compared with one")
    parser.add_argument("--models", nargs="+", default=["demo", "xl"], choices=["demo", "xl"])
    parser.add_argument("--backend", default="triton", choices=BACKENDS, help="backend of the W4A8 runs")
    parser.add_argument("--num-sampling-steps", type=int, default=50)
    parser.add_argument("--demo-samples", type=int, default=2048)
    parser.add_argument("--demo-batch", type=int, default=256)
    parser.add_argument("--xl-samples", type=int, default=256)
    parser.add_argument("--xl-batch", type=int, default=32)
    parser.add_argument("--work", type=Path, default=Path("work/multi_gpu"), help="checkpoints and samples")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed to each subprocess")
    parser.add_argument("--output", default=None, help="JSON lines file the rows are appended to")
    parser.add_argument("--prepare-only", action="store_true",
                        help="only write the checkpoints (random DiT-XL/2 and VAE, W4A8 by QuantDiT.py) into --work")
    return parser.parse_args()


if __name__ == "__main__":
    main(parse_args())
