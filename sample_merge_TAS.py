"""Sample many images from a DiTAS-quantized (or full-precision) DiT for FID-style evaluation.

    torchrun --nnodes=1 --nproc_per_node=N sample_merge_TAS.py --image-size 256 --model DiT-XL/2 \
        --num-fid-samples 10000 --act-bit 8 --weight-bit 4 --path results/DiT-XL-2-256x256-W4A8
    python sample_merge_TAS.py --path results/demo-w4a8 --num-fid-samples 2000 --cfg-scale 1.5
    python sample_merge_TAS.py --fp --ckpt assets/demo/dit_fmnist.safetensors --num-fid-samples 2000 --cfg-scale 1.5

The quantized checkpoint from QuantDiT.py already holds the folded smoothing factors (qkv and fc1
in adaLN, proj in the V rows of qkv; fc2 smoothed on the fly). Writes one PNG per sample into a
folder under --sample-dir and, once all exist, `<folder>.npz` (arr_0: N×H×W×3 uint8, arr_1:
labels), the format of ADM's evaluation suite. The folder's manifest.json records what the
images depend on (the model's SHA-256, architecture, seed, cfg, steps; for quantized models the
backend and batch size): a folder of another model or other settings is refused, never mixed. Sample i's label and noise depend only on
--global-seed and i. Batch b holds samples b·B … b·B + B − 1 (B = --per-proc-batch-size) and runs
on process b mod N, so every batch holds the same samples whatever the number of processes: the
images are the same on 1 or N GPUs, also for quantized models, whose per-tensor dynamic activation
ranges are taken over the whole batch (a different B changes quantized images). A rerun skips the
batches whose PNGs all exist and read back, and redraws the others whole, so an interrupted run
resumes to the same images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from diffusion import create_diffusion
from quant.backends import BACKEND_HELP, BACKENDS
from runtime.checkpoints import ModelSpec
from runtime.cli import (
    ArgumentParser,
    add_model_arguments,
    add_speed_arguments,
    create_logger,
    default_device,
    load_for_sampling,
    positive_int,
    run_cli,
    setup_distributed,
    spec_and_checkpoint,
    speed_up_sampling,
)
from runtime.errors import UserError
from runtime.fileio import atomic_output, sha256_of
from runtime.images import save_png
from runtime.npzio import save_samples_npz
from runtime.sampling import SampleNoise, sample_uint8
from runtime.vae import load_vae


def png_is_complete(path: Path) -> bool:
    """True if the PNG exists and decodes fully (a truncated file is redone)."""
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except (OSError, SyntaxError):
        return False


def load_sampler_model(args: argparse.Namespace, device: torch.device, log=print):
    """(model, spec, label, source name) for --fp or --path (cli.load_for_sampling); the FP
    baseline must be asked for by name, and takes no quantized checkpoint's flags."""
    if args.fp:
        given = [flag for flag, value in (("--path", args.path), ("--weight-bit", args.weight_bit),
                                          ("--act-bit", args.act_bit)) if value is not None]
        if given:
            raise UserError(f"--fp samples the full-precision --ckpt; drop {' and '.join(given)} (they are for a "
                            "quantized checkpoint), or drop --fp")
    elif not args.path:
        raise UserError("pass --path to a quantized checkpoint directory from QuantDiT.py, or --fp for full precision")
    return load_for_sampling(args, device, log)


MANIFEST = "manifest.json"


def run_identity(args: argparse.Namespace, spec: ModelSpec, label: str) -> dict:
    """What the images in a sample folder depend on: the model's bytes (SHA-256 of the FP checkpoint,
    or of a quantized checkpoint's weights and quant.json), its architecture, and the sampling
    settings; for quantized models also the backend and the batch size (dynamic activation ranges
    are taken over a batch)."""
    from quant.checkpoint import META_FILE, WEIGHTS_FILE
    from runtime.checkpoints import find_checkpoint

    if args.fp:
        model = {"checkpoint_sha256": sha256_of(find_checkpoint(spec_and_checkpoint(args)[1]))}
    else:
        model = {"weights_sha256": sha256_of(Path(args.path) / WEIGHTS_FILE),
                 "quant_json_sha256": sha256_of(Path(args.path) / META_FILE),
                 "backend": args.backend, "per_proc_batch_size": args.per_proc_batch_size}
    return {"model": label, **model, "model_config": spec.to_json_dict(), "global_seed": args.global_seed,
            "cfg_scale": args.cfg_scale, "num_sampling_steps": args.num_sampling_steps}


def check_manifest(folder: Path, identity: dict) -> bool:
    """Refuse a sample folder that holds images of another model or other settings; True if its
    manifest is already there (and matches)."""
    path = folder / MANIFEST
    if not path.is_file():
        if any(folder.glob("*.png")):
            raise UserError(f"{folder} holds PNGs but no {MANIFEST}, so they cannot be told apart from another "
                            "model's; delete the folder or pass another --sample-dir")
        return False
    try:
        stored = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        raise UserError(f"{path} is unreadable ({error}); delete the folder or pass another --sample-dir") from None
    stored = stored if isinstance(stored, dict) else {}
    changed = [key for key in sorted(set(stored) | set(identity)) if stored.get(key) != identity.get(key)]
    if changed:
        raise UserError(f"{folder} holds samples of another model or settings (differs in {', '.join(changed)}); "
                        "delete the folder to start over, or pass another --sample-dir")
    return True


def sample_folder(args: argparse.Namespace, spec: ModelSpec, label: str, source: str) -> Path:
    name = f"{source}-{label}-size-{spec.image_size}-cfg-{args.cfg_scale}-steps-{args.num_sampling_steps}-seed-{args.global_seed}"
    return Path(args.sample_dir) / name


def main(args: argparse.Namespace) -> None:
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    rank, world, device = setup_distributed(args.device)
    logger = create_logger("sample_merge_TAS", enabled=rank == 0)
    torch.set_grad_enabled(False)
    model, spec, label, source = load_sampler_model(args, device, logger.info)
    graphs = speed_up_sampling(model, args, device, logger.info)
    vae = load_vae(spec.vae, device)
    diffusion = create_diffusion(str(args.num_sampling_steps))
    folder = sample_folder(args, spec, label, source)
    identity = run_identity(args, spec, label)
    manifest_written = folder.exists() and check_manifest(folder, identity)  # every rank refuses alike
    if rank == 0 and not manifest_written:
        with atomic_output(folder / MANIFEST) as tmp:  # creates the folder
            tmp.write_text(json.dumps(identity, indent=2) + "\n")
    if world > 1:
        dist.barrier()

    mine = rank_batches(args.num_fid_samples, args.per_proc_batch_size, rank, world)
    todo = [batch for batch in mine if not all(png_is_complete(folder / f"{i:06d}.png") for i in batch)]
    logger.info(f"{label} samples into {folder}: {args.num_fid_samples} in all, {world} process(es), "
                f"{len(mine) - len(todo)} of rank 0's {len(mine)} batches already done")
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(map(len, todo)), desc="sampling", unit="img", disable=rank != 0)
    finished = [time.perf_counter()]  # time after each batch
    for batch in todo:
        images, _ = sample_uint8(model, diffusion, vae, spec, batch, args.global_seed, args.cfg_scale, device=device,
                                 graphs=graphs)
        for index, image in zip(batch, images):
            save_png(image, folder / f"{index:06d}.png")
        finished.append(time.perf_counter())
        bar.update(len(batch))
    bar.close()
    log_sampling_rate(logger, todo, finished, world, device)

    if world > 1:
        dist.barrier()
    if rank == 0:
        npz_path = build_npz(folder, args.num_fid_samples, args.global_seed, spec.num_classes)
        logger.info(f"wrote {args.num_fid_samples} samples to {npz_path}")
        print(npz_path)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def rank_batches(count: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """The batches of sample indices that process `rank` of `world` draws: batch b is
    [b·batch_size, (b+1)·batch_size) ∩ [0, count) and belongs to process b mod world."""
    starts = range(rank * batch_size, count, world * batch_size)
    return [list(range(start, min(start + batch_size, count))) for start in starts]


def log_sampling_rate(logger, batches: list[list[int]], finished: list[float], world: int, device) -> None:
    """Log images per second summed over the processes. The first batch is left out when there are
    more (it carries the warm-up: autotuning, compilation, cuBLAS heuristics)."""
    skip = 1 if len(batches) > 1 else 0
    images = sum(len(b) for b in batches[skip:])
    seconds = finished[-1] - finished[skip]
    rate = torch.tensor([images / seconds if images else 0.0], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(rate)
    if rate.item() > 0:
        logger.info(f"sampling rate: {rate.item():.2f} img/s over {world} process(es)"
                    f"{' (first batch left out: warm-up)' if skip else ''}")


def build_npz(folder: Path, count: int, global_seed: int, num_classes: int) -> Path:
    """`<folder>.npz` from PNGs 0 … count-1; labels are recomputed from each sample's seed."""
    missing = [i for i in range(count) if not png_is_complete(folder / f"{i:06d}.png")]
    if missing:
        raise UserError(f"{len(missing)} samples are missing in {folder} (first: {missing[0]:06d}.png); run again to finish")
    images = np.stack([np.asarray(Image.open(folder / f"{i:06d}.png").convert("RGB")) for i in range(count)])
    labels = SampleNoise(global_seed, range(count), (1,), "cpu").labels(num_classes).numpy()
    npz_path = folder.parent / f"{folder.name}.npz"  # not with_suffix: the name holds dots (cfg-1.5)
    save_samples_npz(npz_path, images, labels)
    return npz_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--path", type=str, default=None, help="quantized checkpoint directory from QuantDiT.py")
    parser.add_argument("--backend", choices=BACKENDS, default="fake", help=BACKEND_HELP)
    parser.add_argument("--fp", action="store_true", help="sample the unquantized model (--ckpt/--model): the baseline")
    parser.add_argument("--weight-bit", type=int, default=None,
                        help="expected weight bits; refused if the checkpoint differs (default: the checkpoint's)")
    parser.add_argument("--act-bit", type=int, default=None,
                        help="expected activation bits; refused if the checkpoint differs (default: the checkpoint's)")
    parser.add_argument("--num-fid-samples", type=positive_int, default=50_000, help="samples in all, over all processes")
    parser.add_argument("--per-proc-batch-size", type=positive_int, default=32,
                        help="samples per forward batch per process; batches are dealt whole to processes, and "
                             "quantized images depend on it (activation ranges are taken over a batch)")
    parser.add_argument("--num-sampling-steps", type=positive_int, default=50, help="respaced diffusion steps")
    parser.add_argument("--global-seed", type=int, default=0, help="sample i's label and noise depend on it and i")
    parser.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (1 = none)")
    parser.add_argument("--sample-dir", type=str, default="samples", help="where the sample folder and npz go")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="allow TF32 matmuls on Ampere+ GPUs (--no-tf32 turns it off)")
    parser.add_argument("--device", type=str, default=default_device(), help="cuda or cpu")
    add_speed_arguments(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
