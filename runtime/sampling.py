"""Reproducible class-conditional sampling: sample i's label, initial noise and per-step noise come
from its own generator, seeded by (global seed, i) alone, so a sample does not depend on the batch
it lands in, the batch size, or the number of processes."""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence

import numpy as np
import torch


def sample_seed(global_seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample `index` under `global_seed`."""
    state = np.random.SeedSequence([global_seed, index]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class SampleNoise:
    """One CPU generator per sample. Draw order per sample: label (if drawn), initial noise,
    then one noise tensor per sampling step."""

    def __init__(self, global_seed: int, indices: Sequence[int], shape: tuple[int, ...], device: torch.device | str):
        self.generators = [torch.Generator().manual_seed(sample_seed(global_seed, i)) for i in indices]
        self.shape = tuple(shape)
        self.device = device

    def labels(self, num_classes: int) -> torch.Tensor:
        """Each sample's class label, uniform over the classes."""
        return torch.cat([torch.randint(num_classes, (1,), generator=g) for g in self.generators]).to(self.device)

    def draw(self) -> torch.Tensor:
        """(n, *shape) standard normal noise, one row per sample."""
        noise = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        if torch.device(self.device).type == "cuda":  # from pinned memory, queued: no wait for the GPU at every step
            return noise.pin_memory().to(self.device, non_blocking=True)
        return noise.to(self.device)

    def noise_fn(self, x: torch.Tensor) -> torch.Tensor:
        """Per-step noise for a batch that holds the samples once, or twice (CFG halves)."""
        noise = self.draw().to(x.dtype)
        return noise.repeat(x.shape[0] // noise.shape[0], *([1] * (x.ndim - 1)))


class StepGraphs:
    """CUDA graphs of the sampler's model call, captured once per input signature and replayed.

    Sampling calls the model with one shape at every step, so after the first call each step is
    one graph replay: the launch cost of every kernel (and of the Python, Triton and
    torch.compile layers above it) is paid once, at capture, instead of at every step. A graph
    replays fixed kernels on fixed memory, so the captured function must not synchronise with
    the host and must allocate only inside the capture (the int8 kernels do both). It is run
    `warmup_calls` times on a side stream before capture, where compilation and autotuning happen.
    Each signature keeps its own memory pool (about one forward's activations). Use one
    StepGraphs per model: the key does not name the model."""

    def __init__(self, warmup_calls: int = 2):
        self.warmup_calls = warmup_calls
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(self, fn: Callable[..., torch.Tensor], key: Hashable, *inputs: torch.Tensor) -> torch.Tensor:
        """fn(*inputs); `key` names what else fn depends on (the caller promises that the same key
        and input shapes mean the same computation)."""
        signature = (key, *((tuple(t.shape), t.dtype, t.device) for t in inputs))
        if signature not in self._graphs:
            self._graphs[signature] = self._capture(fn, inputs)
        graph, static_inputs, static_output = self._graphs[signature]
        for static, value in zip(static_inputs, inputs):
            static.copy_(value)
        graph.replay()
        return static_output.clone()  # the next replay overwrites the static output

    def _capture(self, fn, inputs):
        static_inputs = [t.clone() for t in inputs]
        side = warmup_stream(static_inputs[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_calls):
                fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = fn(*static_inputs)
        return graph, static_inputs, static_output


@functools.cache
def warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream of every capture's warm-up calls on `device`. One for all: cuBLAS keeps a
    workspace (32 MiB on Hopper) for each stream it has run on, for the process's life, so a new
    stream per capture would hold one more per graph (speed.py's peak memory grew by about that
    much with every timed row of one model, 0.03 GiB: benchmarks/RESULTS.md, seventeenth session)."""
    return torch.cuda.Stream(device=device)


def compile_blocks(model: torch.nn.Module) -> None:
    """Regional torch.compile: one compiled DiT block serves all of them (compiled once per batch
    shape; static shapes; three times for the kernel blocks, whose first takes a tensor and whose
    last returns one, triton_modules.ResidualStream), and the final layer."""
    # Every compiled module shares the cache of nn.Module._call_impl, and each batch shape adds
    # an entry per module class; past the recompile limit (8) dynamo silently runs eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in model.blocks:
        block.compile(dynamic=False)
    model.final_layer.compile(dynamic=False)


def denoiser_step(model, cfg_scale: float) -> tuple[Callable[..., torch.Tensor], Hashable]:
    """(step, key): step(x, t, y) is the model call of one sampling step (with CFG when
    cfg_scale > 1) in the model's dtype, returning float32; key names it for StepGraphs."""
    forward = functools.partial(model.forward_with_cfg, cfg_scale=cfg_scale) if cfg_scale > 1.0 else model.forward
    dtype = next(model.parameters()).dtype  # a bf16 model (quantized backends) gets bf16 inputs

    def step(x, t, y):
        return forward(x.to(dtype), t, y).float()

    return step, ("cfg", cfg_scale)


def guided_batch(model, x_T: torch.Tensor, labels: torch.Tensor, cfg_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, y), the model's batch for sampling x_T under `labels`: with classifier-free guidance
    (cfg_scale > 1) doubled, the second half conditioned on the null class."""
    if cfg_scale > 1.0:
        null = torch.full_like(labels, model.y_embedder.num_classes)
        return torch.cat([x_T, x_T]), torch.cat([labels, null])
    return x_T, labels


@torch.no_grad()
def generate(model, diffusion, labels: torch.Tensor, noise: SampleNoise, cfg_scale: float, progress: bool = False,
             graphs: StepGraphs | None = None) -> torch.Tensor:
    """Ancestral sampling of one model-space sample per label, with classifier-free guidance when
    cfg_scale > 1 (the batch is doubled; the second half uses the null class). With `graphs`,
    every model call is a CUDA graph replay (captured at the first call of each batch shape)."""
    z, y = guided_batch(model, noise.draw(), labels, cfg_scale)
    step, key = denoiser_step(model, cfg_scale)

    def model_fn(x, t, y):
        return step(x, t, y) if graphs is None else graphs(step, key, x, t, y)

    samples = diffusion.p_sample_loop(
        model_fn, z.shape, z, clip_denoised=False, model_kwargs=dict(y=y), progress=progress, device=z.device,
        noise_fn=noise.noise_fn,
    )
    return samples[: len(labels)]


def sample_uint8(model, diffusion, vae, spec, indices: Sequence[int], global_seed: int, cfg_scale: float,
                 labels: torch.Tensor | None = None, device: torch.device | str = "cpu",
                 graphs: StepGraphs | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Samples `indices` as (N, H, W, 3) uint8 images and their (N,) labels (drawn from each
    sample's generator unless given)."""
    from runtime.images import to_rgb, to_uint8
    from runtime.vae import decode

    noise = SampleNoise(global_seed, indices, (spec.in_channels, spec.input_size, spec.input_size), device)
    drawn = noise.labels(spec.num_classes)  # drawn first in any case, so the noise stream is the same
    labels = drawn if labels is None else labels.to(device)
    images = decode(vae, generate(model, diffusion, labels, noise, cfg_scale, graphs=graphs))
    return to_rgb(to_uint8(images)), labels.cpu().numpy()
