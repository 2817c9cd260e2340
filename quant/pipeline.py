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
from .layers import needs_input_gram, quantize_layer
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

    @property
    def chose_no_smoothing(self) -> bool:
        """The grid search ran and the identity candidate (s = 1) won."""
        return self.alpha is None and bool(self.search_errors)


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


@dataclass
class _Job:
    """What every stage reads: the model being quantized, its settings and the run."""

    model: nn.Module
    config: QuantConfig
    run: CalibrationRun
    device: torch.device
    compute_dtype: torch.dtype
    progress: bool
    targets: list[LayerTarget]
    linears: dict[str, nn.Linear]
    generator: torch.Generator  # the randomized SVD's, consumed in the stages' order

    @property
    def plain(self) -> QuantConfig:
        """The settings of the grid search and the report's baseline: rounding to nearest, the
        plain LoRA, whatever the final weights use (scoring every α with compensated rounding
        would cost a rounding pass per candidate: a stand-in, like search_lora_iters)."""
        return dataclasses.replace(self.config, rounding="nearest", lora_weighting="plain")

    def quantized(self, target: LayerTarget, factors: torch.Tensor | None, lora_iters: int,
                  stats: dict[str, ChannelStats], settings: QuantConfig | None = None):
        """(layers, LoRA errors): the target quantized with its inputs divided by `factors`: one
        vector (in,) or None (no smoothing) gives a batch of one, (candidates, in) a candidate each."""
        linear = self.linears[target.name]
        factors = torch.ones(linear.in_features, device=self.device) if factors is None else factors
        return quantize_layer(linear, factors.reshape(-1, linear.in_features), settings or self.config, lora_iters,
                              stats.get(target.name), self.generator)


@dataclass
class _Search:
    factors: dict[str, torch.Tensor | None]  # the chosen smoothing factors; None: not smoothed
    chosen: dict[str, int]  # index of the chosen candidate
    errors: dict[str, tuple[float, ...]]  # relative error of every candidate


def _needs_statistics(config: QuantConfig) -> bool:
    """Whether any stage reads the calibration statistics (smoothing, static ranges, H)."""
    return config.smooth or not config.act_dynamic or needs_input_gram(config)


def _calibrate(job: _Job) -> dict[str, ChannelStats]:
    return collect_channel_stats(job.model, job.targets, job.run, job.device, job.progress,
                                 with_gram=needs_input_gram(job.config))


def _candidates(job: _Job, stats: dict[str, ChannelStats]) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """(factors of every candidate, the candidates to score) per layer."""
    alphas = torch.tensor(job.config.alpha_grid, device=job.device)
    all_factors = {t.name: candidate_factors(stats[t.name].absmax, weight_channel_absmax(job.linears[t.name].weight),
                                             alphas, job.config.identity_candidate)
                   for t in job.targets}

    def build(t: LayerTarget) -> QuantizedLayer:
        return job.quantized(t, all_factors[t.name], job.config.search_lora_iters, stats, job.plain)[0]

    # Without LoRA a candidate is cheap to rebuild, so it is built at every timestep and never
    # stored (memory independent of depth); with LoRA the fits are done once and kept, compactly.
    candidates = {t.name: [functools.partial(build, t) if job.config.search_lora_iters == 0
                           else compact(build(t), job.compute_dtype)]
                  for t in job.targets}
    return all_factors, candidates


def _grid_search(job: _Job, all_factors: dict[str, torch.Tensor], candidates: dict[str, list]) -> _Search:
    sums = score_candidates(job.model, job.targets, candidates, job.run, job.device, job.compute_dtype,
                            job.config.search_rows_per_step, job.progress)
    chosen = {t.name: best_candidate(sums[t.name].squared_error) for t in job.targets}
    grid = len(job.config.alpha_grid)  # the identity candidate (last, when offered) means no smoothing
    return _Search(factors={t.name: None if chosen[t.name] == grid else all_factors[t.name][chosen[t.name]]
                            for t in job.targets},
                   chosen=chosen,
                   errors={t.name: tuple(sums[t.name].relative().tolist()) for t in job.targets})


def _quantize_weights(job: _Job, stats: dict[str, ChannelStats], factors: dict[str, torch.Tensor | None]):
    """(final layers, their LoRA error histories) with the full LoRA."""
    from tqdm.auto import tqdm

    lora_iters = job.config.lora_iters if job.config.lora_rank else 0
    fitted = {t.name: job.quantized(t, factors[t.name], lora_iters, stats)
              for t in tqdm(job.targets, desc="weights + LoRA", disable=not job.progress)}
    return ({name: layer for name, (layer, _) in fitted.items()},
            {name: errors for name, (_, errors) in fitted.items()})


def _measure(job: _Job, stats: dict[str, ChannelStats], finals: dict[str, QuantizedLayer]) -> dict:
    """Each layer's output error over the run: plain round-to-nearest (no smoothing, no LoRA) and final."""
    rtn = {t.name: job.quantized(t, None, 0, stats, job.plain)[0] for t in job.targets}
    return score_candidates(job.model, job.targets, {t.name: [rtn[t.name], finals[t.name]] for t in job.targets},
                            job.run, job.device, job.compute_dtype, job.config.search_rows_per_step, job.progress,
                            desc="layer errors")


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
    model.eval()
    targets = quant_targets(model)
    job = _Job(model, config, run, device, compute_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32),
               progress, targets, {t.name: get_module(model, t.name) for t in targets},
               torch.Generator().manual_seed(run.seed))
    report = QuantizationReport()
    stage = functools.partial(_timed_stage, device=device, seconds=report.seconds, log=log)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    stats: dict[str, ChannelStats] = {}
    if _needs_statistics(config):
        with stage("calibration (TAS statistics)"):
            stats = _calibrate(job)
    search = _Search(factors=dict.fromkeys(job.linears), chosen={}, errors={})
    if config.smooth:
        with stage("candidates"):
            all_factors, candidates = _candidates(job, stats)
        with stage("grid search"):
            search = _grid_search(job, all_factors, candidates)
        del candidates
    with stage("weight quantization + LoRA"):
        finals, lora_errors = _quantize_weights(job, stats, search.factors)
    with stage("measuring layer errors"):
        sums = _measure(job, stats, finals)

    for t in targets:
        relative = sums[t.name].relative()
        alpha = float(config.alpha_grid[search.chosen[t.name]]) if search.factors[t.name] is not None else None
        report.layers.append(LayerReport(t.name, t.role, alpha, float(relative[0]), float(relative[1]),
                                         lora_errors[t.name], search.errors.get(t.name, ())))

    with stage("install + fold"):
        install(model, targets, {t.name: finals[t.name].select(0) for t in targets}, search.factors, config)
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
