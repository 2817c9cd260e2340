"""DiTAS end to end: the one place that runs the stages in order.

calibrate (TAS statistics) → candidates per layer (α grid) → score every candidate over the
calibration run (grid search) → final quantization with the full LoRA → measure → install
quantized modules and fold the smoothing factors.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .calibrate import CalibrationRun, ChannelStats, collect_channel_stats
from .config import QuantConfig
from .fold import MODULATION_OF, fold_into_modulation, fold_into_value_rows
from .layers import quantize_layer
from .modules import QuantLinear, WeightOnlyLinear
from .primitives import QuantizedLayer
from .scoring import score_candidates
from .smooth import best_candidate, candidate_factors, weight_channel_absmax
from .targets import LayerTarget, get_module, quant_targets, replace_adaln_linears, set_module


@dataclass
class LayerReport:
    name: str
    role: str
    alpha: float | None  # None: not smoothed (smoothing off, or the identity candidate won)
    rtn_error: float  # relative output error of plain round-to-nearest (no smoothing, no LoRA)
    final_error: float  # relative output error of the quantized layer as installed
    lora_errors: tuple[float, ...] = ()
    search_errors: tuple[float, ...] = ()  # the grid search's relative error for each α of the grid


@dataclass
class QuantizationReport:
    layers: list[LayerReport] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    peak_gpu_bytes: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@contextmanager
def _timed_stage(name: str, device: torch.device, seconds: dict[str, float], log: Callable[[str], None]):
    """Record a stage's wall time (synchronising the GPU so asynchronous work is counted)."""
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds[name] = time.perf_counter() - start
    log(f"{name}: {seconds[name]:.1f} s")


@torch.no_grad()
def quantize_dit(
    model: nn.Module,
    config: QuantConfig,
    run: CalibrationRun,
    device: torch.device,
    compute_dtype: torch.dtype | None = None,
    progress: bool = True,
    logger: logging.Logger | None = None,
) -> tuple[nn.Module, QuantizationReport]:
    """Quantize `model` in place (its target layers become QuantLinear, adaLN and V rows absorb
    the smoothing factors) and return it with a per-layer report."""
    log = logger.info if logger else (lambda message: None)
    compute_dtype = compute_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.eval()
    targets = quant_targets(model)
    report = QuantizationReport()
    stage = functools.partial(_timed_stage, device=device, seconds=report.seconds, log=log)
    generator = torch.Generator().manual_seed(run.seed)
    linears = {t.name: get_module(model, t.name) for t in targets}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    stats: dict[str, ChannelStats] = {}
    if config.smooth or not config.act_dynamic or config.needs_input_gram:
        with stage("calibration (TAS statistics)"):
            stats = collect_channel_stats(model, targets, run, device, progress,
                                          with_gram=config.needs_input_gram)
    # The grid search and the report's baseline round to nearest with the plain LoRA, whatever the
    # final weights use: scoring every α with compensated rounding would cost a rounding pass per
    # candidate (a stand-in, like search_lora_iters).
    plain = dataclasses.replace(config, rounding="nearest", lora_weighting="plain")

    def one_candidate(target: LayerTarget, f: torch.Tensor | None, lora_iters: int, settings: QuantConfig = config):
        """The layer quantized with factors f (None: no smoothing) as a batch of one."""
        f = torch.ones(linears[target.name].in_features, device=device) if f is None else f
        return quantize_layer(linears[target.name], f.unsqueeze(0), settings, lora_iters, stats.get(target.name),
                              generator)

    def rtn(target: LayerTarget) -> QuantizedLayer:
        """Plain round-to-nearest: no smoothing, no LoRA; the "before" of the report."""
        return one_candidate(target, None, 0, plain)[0]

    factors: dict[str, torch.Tensor | None] = {t.name: None for t in targets}
    chosen: dict[str, int] = {}
    search_errors: dict[str, tuple[float, ...]] = {}
    alphas = torch.tensor(config.alpha_grid, device=device)
    if config.smooth:
        with stage("candidates"):
            all_factors = {
                t.name: candidate_factors(stats[t.name].absmax, weight_channel_absmax(linears[t.name].weight), alphas,
                                          config.identity_candidate)
                for t in targets
            }

            def build(t: LayerTarget) -> QuantizedLayer:
                return quantize_layer(linears[t.name], all_factors[t.name], plain, config.search_lora_iters,
                                      stats[t.name], generator)[0]

            # Without LoRA a candidate is cheap to rebuild, so it is built at every timestep and
            # never stored (memory independent of depth); with LoRA the fits are done once and
            # kept, compactly.
            candidates = {
                t.name: [functools.partial(build, t) if config.search_lora_iters == 0 else compact(build(t), compute_dtype)]
                for t in targets
            }
        with stage("grid search"):
            sums = score_candidates(model, targets, candidates, run, device, compute_dtype,
                                    config.search_rows_per_step, progress)
        del candidates
        chosen = {t.name: best_candidate(sums[t.name].squared_error) for t in targets}
        search_errors = {t.name: tuple(sums[t.name].relative().tolist()) for t in targets}
        # the identity candidate (last, when offered) means no smoothing: nothing to fold
        factors = {t.name: None if chosen[t.name] == len(config.alpha_grid) else all_factors[t.name][chosen[t.name]]
                   for t in targets}

    with stage("weight quantization + LoRA"):
        from tqdm.auto import tqdm

        lora_iters = config.lora_iters if config.lora_rank else 0
        fitted = {t.name: one_candidate(t, factors[t.name], lora_iters)
                  for t in tqdm(targets, desc="weights + LoRA", disable=not progress)}
        finals = {name: layer for name, (layer, _) in fitted.items()}
        lora_errors = {name: errors for name, (_, errors) in fitted.items()}

    with stage("measuring layer errors"):
        sums = score_candidates(model, targets, {t.name: [rtn(t), finals[t.name]] for t in targets}, run,
                                device, compute_dtype, config.search_rows_per_step, progress, desc="layer errors")

    for t in targets:
        relative = sums[t.name].relative()
        alpha = float(config.alpha_grid[chosen[t.name]]) if factors[t.name] is not None else None
        report.layers.append(LayerReport(t.name, t.role, alpha, float(relative[0]), float(relative[1]),
                                         lora_errors[t.name], search_errors.get(t.name, ())))

    with stage("install + fold"):
        install(model, targets, {t.name: finals[t.name].select(0) for t in targets}, factors, config)
    if device.type == "cuda":
        report.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
    return model, report


def compact(layer: QuantizedLayer, dtype: torch.dtype) -> QuantizedLayer:
    """A candidate kept for scoring in less memory: packed codes, LoRA factors in the compute dtype."""
    def cast(t):
        return None if t is None else t.to(dtype)

    return dataclasses.replace(layer, weight=layer.weight.pack(), lora_left=cast(layer.lora_left),
                               lora_right=cast(layer.lora_right))


def install(model: nn.Module, targets: list[LayerTarget], layers: dict[str, QuantizedLayer],
            factors: dict[str, torch.Tensor | None], config: QuantConfig, fold: bool = True) -> None:
    """Swap each target for its QuantLinear and fold its smoothing factors: qkv and fc1 into adaLN,
    proj into the V rows of qkv, fc2 kept on the fly. fold=False keeps every factor on the fly
    (the same function, computed less cheaply; the tests compare the two)."""
    for t in targets:
        layer = layers[t.name]
        s = factors[t.name]
        folded = fold and s is not None and not t.smooths_on_the_fly
        # on-the-fly layers keep their 1/s whenever smoothing is on (ones where s = 1 won), so
        # that every checkpoint of a config has the same tensors
        keeps = config.smooth and (t.smooths_on_the_fly or not fold) and not folded
        if not keeps:
            layer = dataclasses.replace(layer, smooth_inv=None)
        set_module(model, t.name, QuantLinear.from_layer(layer, config))
        if not folded:
            continue
        block = model.blocks[t.block]
        if t.role in MODULATION_OF:
            fold_into_modulation(block.adaLN_modulation[-1], t.role, s)
        elif t.role == "proj":
            fold_into_value_rows(block.attn.qkv, s)
    if config.adaln_weight_bits is not None:
        # after folding, so that the integer weights include the smoothing factors
        replace_adaln_linears(model, lambda linear: WeightOnlyLinear.from_linear(linear, config.adaln_weight_bits))
