"""Command-line plumbing shared by the scripts: model flags, device choice, error reporting."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from models import DiT_models
from runtime.checkpoints import OFFICIAL_CHECKPOINTS, VAE_CHOICES, ModelSpec, default_checkpoint, resolve_spec
from runtime.errors import UserError

EXIT_USER_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the scripts' error format: a bad flag gets one line, `error: …`, and exit
    status 2 (argparse's own would print the whole usage first)."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main(); a UserError becomes `error: <message>` on stderr and exit code 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def add_model_arguments(parser: argparse.ArgumentParser, default_image_size: int = 256) -> None:
    """The flags that say which DiT to load, as in the official scripts, plus --model-config."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", type=str, choices=list(DiT_models), default="DiT-XL/2",
                       help="registry name of the architecture (ignored when a model config JSON is found)")
    group.add_argument("--model-config", type=str, default=None,
                       help="JSON of DiT constructor arguments (plus \"vae\"); default: <ckpt>.json if it exists")
    group.add_argument("--image-size", type=int, default=default_image_size,
                       help="image side in pixels for --model (latents are 1/8 of it)")
    group.add_argument("--num-classes", type=int, default=1000, help="number of classes for --model")
    group.add_argument("--vae", type=str, choices=list(VAE_CHOICES), default="ema",
                       help="SD VAE decoder for --model (a model config may set \"vae\": null for pixel models)")
    group.add_argument("--ckpt", type=str, default=None,
                       help="checkpoint (.pt/.pth/.safetensors); default: the official DiT-XL/2 checkpoint for --image-size")


def spec_and_checkpoint(args: argparse.Namespace) -> tuple[ModelSpec, str]:
    """The architecture and checkpoint named by the model flags."""
    if args.ckpt and args.ckpt not in OFFICIAL_CHECKPOINTS and not Path(args.ckpt).is_file():
        raise UserError(f"checkpoint {args.ckpt} does not exist; check the path passed to --ckpt")
    spec = resolve_spec(args.model, args.model_config, args.ckpt, args.image_size, args.num_classes, args.vae)
    ckpt = args.ckpt or default_checkpoint(args.model, args.image_size)
    return spec, ckpt


def load_for_sampling(args: argparse.Namespace, device: torch.device, log=print):
    """(model ready to sample, spec, label "FP" or e.g. "W4A8", source name): the quantized
    checkpoint of --path prepared for --backend, else the FP model the model flags name. Bit-width
    flags (--weight-bit/--act-bit, where a script has them) must agree with the checkpoint."""
    from quant.backends import prepare_for_inference
    from quant.checkpoint import load_quantized
    from runtime.checkpoints import load_model

    if not args.path:
        spec, ckpt = spec_and_checkpoint(args)
        return load_model(spec, ckpt, device), spec, "FP", Path(ckpt).stem
    model, config, spec, _ = load_quantized(args.path, device)
    for flag, given, stored in (("--weight-bit", getattr(args, "weight_bit", None), config.weight_bits),
                                ("--act-bit", getattr(args, "act_bit", None), config.act_bits)):
        if given is not None and given != stored:
            raise UserError(f"{flag} {given} disagrees with the checkpoint ({config.label}); drop the flag or "
                            f"quantize again with QuantDiT.py {flag} {given}")
    prepare_for_inference(model, args.backend, log=log)
    return model, spec, config.label, Path(args.path).name


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """--compile and --cuda-graph: how the sampler runs the model (both default to on with CUDA)."""
    group = parser.add_argument_group("speed")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="regional torch.compile of the DiT blocks, once per batch shape (default: on with CUDA, "
                            "off on the CPU, where compiling costs more than it saves)")
    group.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                       help="replay each sampling step's model call from a CUDA graph captured at its first call "
                            "(default: on with CUDA; CUDA only)")


def speed_up_sampling(model: torch.nn.Module, args: argparse.Namespace, device: torch.device, log=print):
    """Apply --compile to `model` (in place) and return the StepGraphs of --cuda-graph (or None)."""
    from runtime.sampling import StepGraphs, compile_blocks

    on_cuda = device.type == "cuda"
    if args.cuda_graph and not on_cuda:
        raise UserError("--cuda-graph needs a CUDA device; drop it or pass --device cuda")
    compiled = on_cuda if args.compile is None else args.compile
    graphed = on_cuda if args.cuda_graph is None else args.cuda_graph
    if compiled:
        compile_blocks(model)
    log(f"model calls: {'compiled' if compiled else 'eager'}, {'CUDA graphs' if graphed else 'no CUDA graphs'}")
    return StepGraphs() if graphed else None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; pass cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; pass --device cpu")
    return device


def create_logger(name: str, enabled: bool = True) -> logging.Logger:
    """A logger that prints `[time] message` to stderr, or stays silent (for ranks other than 0)."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    if enabled:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun, a process group: NCCL with one GPU per local
    rank when `device_name` asks for CUDA, otherwise gloo on the CPU. A plain process is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, parse_device(device_name)
    import torch.distributed as dist

    use_cuda = device_name.startswith("cuda") and torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")
