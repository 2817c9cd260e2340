"""Train a class-conditional DiT, in the spirit of the official train.py (AdamW, EMA, DDP).

    # the demo model: pixel-space DiT on Fashion-MNIST padded to 32×32
    python train.py --data fashion-mnist --model-config configs/demo_fmnist.json --max-steps 20000 \
        --export assets/demo/dit_fmnist.safetensors
    # several GPUs
    torchrun --nproc_per_node=8 train.py --data folder --data-path /imagenet/train --model DiT-XL/2

Checkpoints (`<results>/checkpoints/NNNNNNN.pt`) hold the model, EMA and optimizer states and load
with `torch.load(weights_only=True)`; the architecture JSON is written beside each, so sample.py
and QuantDiT.py find it. `--export` writes the final EMA weights as bf16 safetensors plus JSON.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from diffusion import create_diffusion
from evaluation.data import FASHION_MNIST_DIR, ImageFolder, fashion_mnist_tensors
from models import DiT_models
from runtime.checkpoints import ModelSpec, read_spec_json, spec_from_name, write_spec_json
from runtime.cli import ArgumentParser, create_logger, default_device, positive_int, run_cli, setup_distributed
from runtime.errors import UserError
from runtime.fileio import atomic_output
from runtime.vae import LATENT_SCALE, load_vae


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · model, over the trainable parameters."""
    ema_params = dict(ema.named_parameters())
    for name, param in model.named_parameters():
        if param.requires_grad:
            ema_params[name].lerp_(param.detach(), 1 - decay)


def _any_rank(flag: bool, device: torch.device, world: int) -> bool:
    """True on every rank if `flag` is true on any, so all ranks stop at the same step."""
    if world == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value)
    return bool(value.item() > 0)


def resolve_training_spec(args: argparse.Namespace) -> ModelSpec:
    if args.model_config:
        return read_spec_json(args.model_config)
    if args.model is None:
        raise UserError("pass --model NAME or --model-config PATH")
    spec = spec_from_name(args.model, args.image_size, args.num_classes, args.vae)
    return ModelSpec(dit_kwargs=spec.dit_kwargs, vae=None if args.pixel_space else spec.vae)


class InMemoryBatches:
    """Random batches from tensors already on the device (Fashion-MNIST fits in GPU memory):
    no loader processes, no host-to-device copies. Each rank draws its own batches."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, device: torch.device):
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size = batch_size
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __iter__(self):
        while True:
            index = torch.randint(len(self.images), (self.batch_size,), generator=self.generator, device=self.images.device)
            flip = torch.rand(self.batch_size, generator=self.generator, device=self.images.device) < 0.5
            x = self.images[index]
            yield torch.where(flip[:, None, None, None], x.flip(3), x), self.labels[index]


def folder_batches(dataset, batch_size: int, rank: int, world: int, seed: int, workers: int):
    """Endless shuffled batches of a map-style dataset, sharded over ranks, with random flips."""
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                         pin_memory=True, drop_last=True)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for x, y in loader:
            flip = torch.rand(len(x)) < 0.5
            yield torch.where(flip[:, None, None, None], x.flip(3), x), y
        epoch += 1


def save_checkpoint(path: Path, model, ema, optimizer, step: int, args: argparse.Namespace, spec: ModelSpec) -> None:
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": optimizer.state_dict(), "step": step,
             "args": {k: v for k, v in vars(args).items()}}
    with atomic_output(path) as tmp:
        torch.save(state, tmp)
    write_spec_json(spec, path.with_suffix(".json"))


def export_ema(path: Path, ema: torch.nn.Module, spec: ModelSpec, step: int) -> None:
    """The EMA weights as bf16 safetensors, with the architecture JSON beside them."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in ema.state_dict().items()}
    with atomic_output(path) as tmp:
        save_file(state, str(tmp), metadata={"step": str(step), "format": "DiT state dict (EMA), bf16"})
    write_spec_json(spec, path.with_suffix(".json"))


def main(args: argparse.Namespace) -> None:
    rank, world, device = setup_distributed(args.device)
    logger = create_logger("train", enabled=rank == 0)
    if args.global_batch_size % world:
        raise UserError(f"--global-batch-size {args.global_batch_size} must be divisible by the {world} processes")
    seed = args.global_seed * world + rank
    torch.manual_seed(seed)
    spec = resolve_training_spec(args)
    results = Path(args.results_dir)
    if rank == 0:
        (results / "checkpoints").mkdir(parents=True, exist_ok=True)
    logger.info(f"spec {spec.to_json_dict()}, {world} process(es) on {device}")

    model = spec.build().to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    logger.info(f"DiT parameters: {sum(p.numel() for p in model.parameters()):,}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    diffusion = create_diffusion(timestep_respacing="")
    forward = torch.compile(model) if args.compile else model
    if world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)

    local_batch = args.global_batch_size // world
    if args.data == "fashion-mnist":
        if spec.vae is not None or spec.in_channels != 1 or spec.input_size != 32:
            raise UserError("Fashion-MNIST is 1×32×32 pixels: use a config with in_channels 1, input_size 32, \"vae\": null")
        images, labels = fashion_mnist_tensors("train", args.data_path)
        batches = iter(InMemoryBatches(images, labels, local_batch, seed, device))
    else:
        size = spec.image_size
        dataset = ImageFolder(args.data_path, size, channels=3 if spec.vae else spec.in_channels)
        batches = folder_batches(dataset, local_batch, rank, world, args.global_seed, args.num_workers)
    vae = load_vae(spec.vae, device)

    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    steps = args.max_steps
    model.train()
    running, log_steps, start = 0.0, 0, time.time()
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else math.inf
    for step in range(1, steps + 1):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if vae is not None:
            with torch.no_grad():
                x = vae.encode(x).latent_dist.sample() * LATENT_SCALE
        lr = args.lr * min(1.0, step / max(1, args.warmup_steps))
        if args.cosine:
            lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
        with autocast:
            loss = diffusion.training_losses(forward, x, t, dict(y=y))["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
        optimizer.step()
        update_ema(ema, model, args.ema_decay)

        running += loss.detach()
        log_steps += 1
        if step % args.log_every == 0 or step == steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            average = running / log_steps
            if world > 1:
                dist.all_reduce(average)  # SUM: the one reduction every backend (gloo too) offers
                average /= world
            elapsed = time.time() - start
            logger.info(f"step {step:07d}/{steps}: loss {average.item():.4f}, lr {lr:.2e}, "
                        f"{log_steps / elapsed:.2f} steps/s, {log_steps * args.global_batch_size / elapsed:.0f} img/s")
            running, log_steps, start = 0.0, 0, time.time()
        out_of_time = _any_rank(time.time() > deadline, device, world)
        if rank == 0 and (step % args.ckpt_every == 0 or step == steps or out_of_time):
            path = results / "checkpoints" / f"{step:07d}.pt"
            save_checkpoint(path, model, ema, optimizer, step, args, spec)
            logger.info(f"saved checkpoint {path}")
        if out_of_time:
            logger.info(f"stopping at step {step}: --max-minutes {args.max_minutes} reached")
            break

    if rank == 0 and args.export:
        export_ema(Path(args.export), ema, spec, step)
        logger.info(f"exported EMA weights to {args.export} (+ .json)")
    if world > 1:
        dist.destroy_process_group()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["fashion-mnist", "folder"], default="fashion-mnist",
                        help="Fashion-MNIST from the Debian package, or an image folder of class subfolders")
    parser.add_argument("--data-path", type=str, default=str(FASHION_MNIST_DIR), help="where the data lies")
    parser.add_argument("--model", type=str, choices=list(DiT_models), default=None, help="registry architecture")
    parser.add_argument("--model-config", type=str, default=None, help="JSON of DiT constructor arguments (+ \"vae\")")
    parser.add_argument("--image-size", type=int, default=256, help="image side for --model")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes for --model")
    parser.add_argument("--vae", type=str, choices=["ema", "mse"], default="ema", help="SD VAE for --model latents")
    parser.add_argument("--pixel-space", action="store_true", help="train --model on pixels (no VAE)")
    parser.add_argument("--results-dir", type=str, default="results", help="checkpoints go to <dir>/checkpoints")
    parser.add_argument("--max-steps", type=positive_int, default=400_000, help="optimisation steps")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop (checkpoint and export) once this much wall time has passed")
    parser.add_argument("--global-batch-size", type=positive_int, default=256, help="batch over all processes")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (after warm-up)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up")
    parser.add_argument("--cosine", action="store_true", help="cosine learning-rate decay to 0 at --max-steps")
    parser.add_argument("--grad-clip", type=float, default=0.0, help="gradient-norm clip (0 = off)")
    parser.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay per step")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="bf16 autocast or fp32 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--global-seed", type=int, default=0, help="seed; rank r uses seed * world + r")
    parser.add_argument("--num-workers", type=int, default=4, help="loader processes for --data folder")
    parser.add_argument("--log-every", type=positive_int, default=100, help="steps between log lines")
    parser.add_argument("--ckpt-every", type=positive_int, default=50_000, help="steps between checkpoints")
    parser.add_argument("--export", type=str, default=None, help="write the final EMA as bf16 safetensors + JSON here")
    parser.add_argument("--device", type=str, default=default_device(), help="cuda or cpu")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
