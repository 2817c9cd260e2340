"""Inference speed, memory and model size of DiT-XL/2: floating point against the quantized backends.

    python -m benchmarks.speed                      # check the kernels, GEMM microbenchmark, sampling rows
    python -m benchmarks.speed --parts check        # only the kernel-vs-fake correctness check
    python -m benchmarks.speed --parts sample --cuda-graph on off   # batch 1, 8, 64; bf16, W8A8, W4A8

Parts (--parts):
- check: every kernel against the `fake` backend on the same quantized layer (relative error, fresh
  random inputs with channel outliers, float32 and bf16 inputs), at all DiT-XL/2 and demo shapes.
- gemm: the quantized layers' GEMMs at DiT-XL/2 shapes (M = batch × 2 (CFG) × 256 tokens) in
  TFLOP/s (2·M·N·K per second) against bf16 cuBLAS and cuBLAS's plain int8 GEMM (torch._int_mm):
  the int8 GEMM with its epilogue alone (default tile loads and the other kind: TMA or pointers),
  and the whole layer eagerly (range reduction, quantize pass, GEMM).
- profile: GPU kernel time of one forward per --rows entry and --batches entry, by kind of
  kernel (torch profiler), the kernels launched per forward and the longest ones with their
  launch counts, beside the host's wall time per eager forward.
- timeline: 10 sampling steps replayed from CUDA graphs, profiled, per --rows and --batches entry:
  the GPU's window per step, the time its kernels and copies take, and the idle gaps between
  them (counted against the kind of the activity after each gap), by kind. Whether a row loses
  to another in its kernels or between them (launch latency the graphs do not remove).
- sample: 50-step sampling with CFG through the samplers' own `sampling.generate` (2 × batch
  rows), random weights, no VAE, for every --rows and --batches entry, with and/or without CUDA
  graphs (--cuda-graph): ms per step, images per second, peak GPU memory, model bytes, and for
  graphed rows the largest difference between a replay and an eager call on fresh inputs. Each
  is warmed up by a 3-step run (compilation, autotuning, graph capture) before --repeats timed
  runs, whose median is reported.
  "compile" rows use the samplers' regional torch.compile (`sampling.compile_blocks`).

Quantized rows use a synthetic quantized model: random N(0, 0.02²) weights quantized by
round-to-nearest with a rank-32 LoRA of one iteration and random fc2 smoothing factors — the
same tensors and kernels as a DiTAS checkpoint, whose values do not change the speed.
Every row is printed as a JSON line and appended, as measured, to --output
(benchmarks/results/speed.jsonl) with the call id, card, date and commit; markdown tables last.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch

from benchmarks.kernel_check import check_kernels
from benchmarks.quantize_speed import random_dit
from benchmarks.rowlog import RowLog, provenance
from benchmarks.synthetic import (
    GEMM_VARIANTS,
    HIDDEN,
    TOKENS,
    layer_shapes,
    model_bytes,
    outlier_input,
    quantized_layer_pair,
    synthetic_quantized_dit,
)
from diffusion import create_diffusion
from quant.backends import cast_float_parts, prepare_for_inference
from quant.triton_modules import KernelOptions, install_kernels, register_kernel_op
from runtime.checkpoints import spec_from_name
from runtime.sampling import StepGraphs, compile_blocks, denoiser_step, generate


class Row(NamedTuple):
    weight_bits: int | None  # None: floating point
    backend: str | None
    dtype: torch.dtype
    compiled: bool
    act_granularity: str = "per_tensor"
    weight_granularity: str = "per_channel"  # two_level: groups of TWO_LEVEL_GROUP
    kernels: KernelOptions = KernelOptions()  # the triton backend's layout (default: the samplers')
    act_format: str = "int"


ROWS = {
    "fp32": Row(None, None, torch.float32, False),
    "bf16": Row(None, None, torch.bfloat16, False),
    "bf16-compile": Row(None, None, torch.bfloat16, True),
    "fake-w4a8": Row(4, "fake", torch.bfloat16, False),
    "fake-w4a8-compile": Row(4, "fake", torch.bfloat16, True),
    "w8a8": Row(8, "triton", torch.bfloat16, False),
    "w8a8-compile": Row(8, "triton", torch.bfloat16, True),
    "w4a8": Row(4, "triton", torch.bfloat16, False),
    "w4a8-compile": Row(4, "triton", torch.bfloat16, True),
    "w8a8-token-compile": Row(8, "triton", torch.bfloat16, True, "per_token"),
    "w4a8-token-compile": Row(4, "triton", torch.bfloat16, True, "per_token"),
    # the layout before the adaLN's weight-only kernel, the norm-fused blocks, the gated residuals and
    # proj's own ranges
    "w4a8-token-unfused-compile": Row(4, "triton", torch.bfloat16, True, "per_token",
                                      kernels=KernelOptions(weight_only_adaln=False, fuse_norms_below_rows=0,
                                                            gate_residuals_below_rows=0, proj_own_ranges=False)),
    # the residual updates after the GEMMs, by torch.compile (kernels of their own beside the norm passes)
    "w4a8-token-ungated-compile": Row(4, "triton", torch.bfloat16, True, "per_token",
                                      kernels=KernelOptions(gate_residuals_below_rows=0)),
    # batch 64's layout before the thirteenth session: its norms and residual updates by torch.compile
    "w4a8-token-compiled-norms-compile": Row(4, "triton", torch.bfloat16, True, "per_token",
                                             kernels=KernelOptions(fuse_norms_below_rows=32768,
                                                                   gate_residuals_below_rows=32768)),
    # the norm passes take their own mean and variance, not the moments of the gated epilogues
    "w4a8-token-own-moments-compile": Row(4, "triton", torch.bfloat16, True, "per_token",
                                          kernels=KernelOptions(norm_moments_from_update=False)),
    # one adaLN call per block, not all blocks' in one (ModulationBank)
    "w4a8-token-adaln-per-block-compile": Row(4, "triton", torch.bfloat16, True, "per_token",
                                              kernels=KernelOptions(adaln_in_one_call=False)),
    # proj's per-token ranges by a reduction before its quantize pass, not taken by the pass
    "w4a8-token-proj-reduced-compile": Row(4, "triton", torch.bfloat16, True, "per_token",
                                           kernels=KernelOptions(proj_own_ranges=False)),
    "w4a8-2level-compile": Row(4, "triton", torch.bfloat16, True, "per_tensor", "two_level"),
    # issue 13's optional format: FP8 e4m3 activations on cuBLAS's row-scaled FP8 GEMM (backend fp8)
    "w4a8-fp8-token-compile": Row(4, "fp8", torch.bfloat16, True, "per_token", act_format="fp8_e4m3"),
}


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100)


@torch.no_grad()
def gemm_microbenchmark(device, batch: int, variants: list[str], emit) -> None:
    from quant.kernels import gemm_tile_choice, int8_gemm, quantize_rows

    m = 2 * batch * TOKENS
    for role, (k, n) in layer_shapes(HIDDEN["DiT-XL/2"]).items():
        flops = 2 * m * n * k
        x = outlier_input(m, k, device, torch.bfloat16, seed=k)
        weight = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        row = {"part": "gemm", "layer": role, "M": m, "K": k, "N": n,
               "bf16_cublas_TFLOPs": flops / bench_ms(functools.partial(torch.nn.functional.linear, x, weight)) / 1e9}
        # cuBLAS's int8 GEMM (no epilogue): the int8 ceiling of this card at this shape
        a8 = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
        b8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device)
        try:
            row["int8_cublas_TFLOPs"] = flops / bench_ms(functools.partial(torch._int_mm, a8, b8.t())) / 1e9
        except RuntimeError as error:  # a private op: its layout rules change between releases
            row["int8_cublas_TFLOPs"], row["int8_cublas_error"] = float("nan"), str(error).splitlines()[0]
        for variant in variants:
            bits, options, gemm_options = GEMM_VARIANTS[variant]
            _, kernel = quantized_layer_pair(k, n, bits, role == "fc2", device, **options)
            qparams = kernel.qparams(x)
            codes, rowsum, down = quantize_rows(x, qparams, 8, kernel.smooth_inv, kernel.split_right)
            gemm = functools.partial(int8_gemm, codes, rowsum, qparams, kernel.weight, kernel.packed,
                                     kernel.column_sums, kernel.weight_zero, kernel.weight_scale, kernel.bias, down,
                                     kernel.lora_left, torch.bfloat16, kernel.use_tma, **gemm_options)
            try:  # a variant that fails to compile is reported, not fatal
                row[f"{variant}_gemm_TFLOPs"] = flops / bench_ms(gemm) / 1e9
                row[f"{variant}_config"] = gemm_tile_choice()
            except Exception as error:  # noqa: BLE001
                row[f"{variant}_gemm_TFLOPs"], row[f"{variant}_error"] = float("nan"), str(error).splitlines()[0]
                continue
            if role == "fc1" and not options and not gemm_options:  # + GELU and fc2's range in the epilogue
                bounds = torch.full((2,), float("inf"), device=device)
                fused = functools.partial(gemm, gelu=True, bounds=bounds, bounds_scale=kernel.column_sums.float())
                row[f"w{bits}a8_gelu_range_gemm_TFLOPs"] = flops / bench_ms(fused) / 1e9
            if not options and not gemm_options:  # the defaults: also the whole layer
                row[f"w{bits}a8_layer_TFLOPs"] = flops / bench_ms(functools.partial(kernel, x)) / 1e9
            row[f"quantize_ms_w{bits}"] = bench_ms(functools.partial(quantize_rows, x, qparams, 8, kernel.smooth_inv,
                                                                     kernel.split_right))
        emit(row)


def build_row(name: str, args, device) -> torch.nn.Module:
    row = ROWS[name]
    if row.weight_bits is None:
        model = random_dit(args.model, args.image_size, device).to(row.dtype)
    else:
        model = synthetic_quantized_dit(args.model, args.image_size, device, row.weight_bits, args.adaln_bit,
                                        row.act_granularity, row.weight_granularity, row.act_format)
        if row.backend == "triton":  # as prepare_for_inference, with the row's kernel layout
            cast_float_parts(model, row.dtype)
            install_kernels(model, print, row.kernels)
        else:
            prepare_for_inference(model, row.backend, row.dtype)
    if row.compiled:  # as the samplers compile: one compiled block serves all 28
        compile_blocks(model)
    return model


class DeviceNoise:
    """The samplers' noise interface (sampling.SampleNoise) drawn on the GPU from one generator:
    the benchmark times the model, not the samplers' per-sample CPU generators."""

    def __init__(self, shape: tuple[int, ...], device, seed: int = 0):
        self.shape, self.device = shape, device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def draw(self) -> torch.Tensor:
        return torch.randn(self.shape, device=self.device, generator=self.generator)

    def noise_fn(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, device=x.device, generator=self.generator, dtype=x.dtype)


WARMUP_STEPS = 3  # a short sampling run before timing: compilation, autotuning, graph capture
CFG_SCALE = 1.5


@torch.no_grad()
def warmed_up(model, args, device, batch: int, graphs: StepGraphs | None) -> tuple[DeviceNoise, torch.Tensor]:
    """(noise, labels) of `batch` images, after a WARMUP_STEPS sampling run with them (compilation,
    autotuning and, with `graphs`, the capture), finished on the GPU."""
    spec = spec_from_name(args.model, image_size=args.image_size)
    noise = DeviceNoise((batch, spec.in_channels, spec.input_size, spec.input_size), device)
    labels = torch.randint(0, spec.num_classes, (batch,), device=device, generator=noise.generator)
    generate(model, create_diffusion(str(WARMUP_STEPS)), labels, noise, CFG_SCALE, graphs=graphs)
    torch.cuda.synchronize()
    return noise, labels


@torch.no_grad()
def time_sampling(model, args, device, batch: int, graphs: StepGraphs | None) -> dict:
    """Sampling of `batch` images with CFG through sampling.generate, as the samplers run it."""
    noise, labels = warmed_up(model, args, device, batch, graphs)
    torch.cuda.reset_peak_memory_stats()
    diffusion = create_diffusion(str(args.num_sampling_steps))
    runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        generate(model, diffusion, labels, noise, CFG_SCALE, graphs=graphs)
        torch.cuda.synchronize()
        runs.append(1000 * (time.perf_counter() - start) / args.num_sampling_steps)
    ms = statistics.median(runs)
    row = {"ms_per_step": ms, "images_per_s": 1000 * batch / (ms * args.num_sampling_steps),
           "ms_per_step_runs": runs, "peak_GiB": torch.cuda.max_memory_allocated() / 2**30}
    if graphs is not None:  # a replay on fresh inputs computes what the model computes eagerly
        row["graph_vs_eager_max_abs"] = graph_vs_eager(model, graphs, noise, labels)
    return row


def graph_vs_eager(model, graphs: StepGraphs, noise: DeviceNoise, labels: torch.Tensor) -> float:
    """Largest difference between a graph replay and an eager call of the model on new inputs."""
    x = torch.cat([noise.draw()] * 2)
    t = torch.randint(0, 1000, (len(x),), device=x.device, generator=noise.generator)
    y = torch.cat([labels, torch.full_like(labels, model.y_embedder.num_classes)])
    step, key = denoiser_step(model, CFG_SCALE)  # what generate() captured
    captured = len(graphs)
    replayed = graphs(step, key, x, t, y)
    assert len(graphs) == captured, "the check must replay the graph generate() captured"
    return (replayed - step(x, t, y)).abs().max().item()


# GPU kernel name patterns -> the share of a forward they are counted in (first match wins)
KERNEL_KINDS = (
    ("int8 GEMM + epilogue", ("_int8_gemm_kernel", "_int8_gemm_ws_kernel")),
    ("quantize pass", ("_quantize_rows_kernel", "_lora_down_kernel")),
    ("W4 unpack", ("_unpack_kernel", "_unpack_two_level_kernel")),
    ("adaLN weight-only kernel", ("_weight_only_kernel",)),
    ("attention", ("flash", "fmha", "attention", "sdpa")),  # before GEMMs: cuDNN's names hold "sm90" too
    ("float GEMM (cuBLAS)", ("gemm", "nvjet", "xmma", "cutlass", "sm90")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, patterns in KERNEL_KINDS:
        if any(p.lower() in lowered for p in patterns):
            return kind
    return "other (norms, modulation, GELU, ranges, casts)"


TOP_KERNELS = 24  # (ms per forward, launches per forward, name) of the longest kernels, per profile row


@torch.no_grad()
def profile_forward(model, dtype, args, device, batch: int, forwards: int = 2) -> dict:
    """GPU kernel time of one CFG forward of `batch` images, by kind of kernel (ms), and the host's
    wall time per forward (launch-bound when it exceeds the GPU time)."""
    from torch.profiler import ProfilerActivity, profile

    spec = spec_from_name(args.model, image_size=args.image_size)
    rows = 2 * batch
    x = torch.randn(rows, spec.in_channels, spec.input_size, spec.input_size, device=device, dtype=dtype)
    t = torch.full((rows,), 500, device=device)
    y = torch.randint(0, 1000, (rows,), device=device)
    for _ in range(3):
        model(x, t, y)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(forwards):
        model(x, t, y)
    torch.cuda.synchronize()
    wall_ms = 1000 * (time.perf_counter() - start) / forwards
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(forwards):
            model(x, t, y)
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    top = []
    for event in prof.key_averages():
        micros = getattr(event, "self_device_time_total", 0.0)
        if micros <= 0 or event.key.startswith(("aten::", "cuda", "Memcpy", "Memset")):
            continue
        kind = kernel_kind(event.key)
        totals[kind] = totals.get(kind, 0.0) + micros / 1000 / forwards
        top.append((micros / 1000 / forwards, event.count // forwards, event.key[:90]))
    top.sort(reverse=True)
    return {"ms_per_forward": {k: round(v, 2) for k, v in sorted(totals.items())},
            "gpu_ms_per_forward": round(sum(totals.values()), 2), "wall_ms_per_forward": round(wall_ms, 2),
            "kernels_per_forward": sum(calls for _, calls, _ in top), "top_kernels": top[:TOP_KERNELS]}


TIMELINE_STEPS = 10  # sampling steps the timeline part profiles
GPU_ACTIVITIES = ("kernel", "gpu_memcpy", "gpu_memset")  # trace event categories that occupy the GPU


def gpu_timeline(events: list[dict], steps: int) -> dict:
    """Where `steps` sampling steps' GPU time goes, from a Chrome trace's events (name, cat, ts and
    dur in µs): the window from the first GPU activity to the end of the last, the activities' own
    time and the idle gaps before them, in ms per step, in all and by kind (kernel_kind; copies and
    fills by category)."""
    gpu = sorted((e for e in events if e.get("cat") in GPU_ACTIVITIES and "dur" in e), key=lambda e: e["ts"])
    busy, gaps = Counter(), Counter()
    end = gpu[0]["ts"] if gpu else 0.0
    for event in gpu:
        kind = kernel_kind(event["name"]) if event["cat"] == "kernel" else event["cat"]
        gaps[kind] += max(0.0, event["ts"] - end)
        busy[kind] += event["dur"]
        end = max(end, event["ts"] + event["dur"])

    def per_step(micros: float) -> float:
        return round(micros / 1000 / steps, 4)

    return {"activities_per_step": len(gpu) / steps,
            "window_ms_per_step": per_step(end - gpu[0]["ts"]) if gpu else 0.0,
            "busy_ms_per_step": per_step(sum(busy.values())), "gap_ms_per_step": per_step(sum(gaps.values())),
            "busy_ms_per_step_by_kind": {kind: per_step(v) for kind, v in busy.most_common()},
            "gap_ms_per_step_by_kind": {kind: per_step(v) for kind, v in gaps.most_common()}}


@torch.no_grad()
def step_timeline(model, args, device, batch: int) -> dict:
    """gpu_timeline of TIMELINE_STEPS sampling steps with CFG, each model call a CUDA graph replay
    (captured by a WARMUP_STEPS run first), with the profiled run's wall ms per step (the
    profiler's own host work included)."""
    from torch.profiler import ProfilerActivity, profile

    graphs = StepGraphs()
    noise, labels = warmed_up(model, args, device, batch, graphs)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        generate(model, create_diffusion(str(TIMELINE_STEPS)), labels, noise, CFG_SCALE, graphs=graphs)
        torch.cuda.synchronize()
        wall_ms = 1000 * (time.perf_counter() - start) / TIMELINE_STEPS
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return {"steps": TIMELINE_STEPS, "profiled_wall_ms_per_step": round(wall_ms, 4),
            **gpu_timeline(events, TIMELINE_STEPS)}


def main(args: argparse.Namespace) -> None:
    device = torch.device("cuda")
    register_kernel_op()
    log = RowLog(args.output, common=provenance(torch.cuda.get_device_name()))

    if "check" in args.parts:
        passed = check_kernels(device, args.check_models, args.check_layers, log.add)
        print(f"kernel check: {'all passed' if passed else 'FAILED'}", flush=True)
    if "gemm" in args.parts:
        gemm_microbenchmark(device, args.gemm_batch, args.gemm_variants, log.add)
    if {"profile", "timeline", "sample"} & set(args.parts):
        torch.backends.cuda.matmul.allow_tf32 = True  # the published sampler's setting (fp32 row)
        for name in args.rows:  # one model per row serves every batch and part
            # each row compiles from scratch, as in a fresh process, and its peak memory holds
            # nothing of the row before (the seventeenth session's final call: W8A8's peak 1.44
            # GiB at batch 1, the row after W4A8's, 1.01 at batch 8): the compiled code that refers
            # to the last model goes, then the model itself
            torch._dynamo.reset()
            gc.collect()
            torch.cuda.empty_cache()
            model = build_row(name, args, device)
            row = ROWS[name]
            settings = {"row": name, "model": args.model, "compiled": row.compiled, "act": row.act_granularity,
                        "weights": row.weight_granularity,
                        "adaln_bit": args.adaln_bit if row.weight_bits else None, "model_MB": model_bytes(model) / 1e6}
            for batch in args.batches:
                if "profile" in args.parts:
                    log.add({"part": "profile", **settings, "batch": batch,
                             **profile_forward(model, row.dtype, args, device, batch)})
                if "timeline" in args.parts:
                    log.add({"part": "timeline", **settings, "batch": batch, "cuda_graph": True,
                             **step_timeline(model, args, device, batch)})
                if "sample" in args.parts:
                    for graph in args.cuda_graph:
                        start = time.perf_counter()
                        result = time_sampling(model, args, device, batch, StepGraphs() if graph == "on" else None)
                        log.add({"part": "sample", **settings, "batch": batch, "cuda_graph": graph == "on",
                                 "steps": args.num_sampling_steps, **result, "wall_s": time.perf_counter() - start})
            del model
        # which tiles the autotuners chose, per call shape: small calls' timings move with them
        log.add({"part": "autotuned", "configs": autotuned_configs()})
    print_tables(log.rows)


def autotuned_configs() -> dict[str, dict[str, str]]:
    """Each autotuned kernel of quant/kernels.py: its tuning key (the call's shape and flags) -> the
    config it chose in this process."""
    import triton

    from quant import kernels

    tuned = {name: getattr(kernels, name) for name in dir(kernels)
             if isinstance(getattr(kernels, name), triton.runtime.Autotuner)}
    return {name: {str(key): str(config) for key, config in tuner.cache.items()}
            for name, tuner in sorted(tuned.items()) if tuner.cache}


def print_tables(rows: list[dict]) -> None:
    sample = [r for r in rows if r["part"] == "sample"]
    if sample:
        def baseline(r):  # bf16 compiled at the same batch and with the same CUDA-graph setting
            return next((b for b in sample if b["row"] == "bf16-compile" and b["batch"] == r["batch"]
                         and b["cuda_graph"] == r["cuda_graph"]), None)

        print("\n| batch | CUDA graph | row | ms / step | images / s | vs bf16 compile | peak GPU memory (GiB) "
              "| model bytes (MB) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in sorted(sample, key=lambda r: (r["batch"], not r["cuda_graph"])):
            base = baseline(r)
            ratio = f"{r['images_per_s'] / base['images_per_s']:.2f}×" if base else "-"
            print(f"| {r['batch']} | {'on' if r['cuda_graph'] else 'off'} | {r['row']} | {r['ms_per_step']:.1f} | "
                  f"{r['images_per_s']:.2f} | {ratio} | {r['peak_GiB']:.2f} | {r['model_MB']:.0f} |")
    gemm = [r for r in rows if r["part"] == "gemm"]
    if gemm:
        columns = ["bf16_cublas", "int8_cublas", *(f"{v}_gemm" for v in GEMM_VARIANTS), "w8a8_layer", "w4a8_layer",
                   "w8a8_gelu_range_gemm", "w4a8_gelu_range_gemm"]
        print("\n| layer | M×K×N | " + " | ".join(c.replace("_", " ") for c in columns) + " |  (TFLOP/s)")
        print("|---|---|" + "---|" * len(columns))
        for r in gemm:
            print(f"| {r['layer']} | {r['M']}×{r['K']}×{r['N']} | "
                  + " | ".join(f"{r.get(c + '_TFLOPs', float('nan')):.0f}" for c in columns) + " |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["check", "gemm", "sample"],
                        choices=["check", "gemm", "profile", "timeline", "sample"])
    parser.add_argument("--rows", nargs="+",
                        default=["bf16-compile", "w8a8-token-compile", "w4a8-token-compile", "w4a8-compile"],
                        choices=list(ROWS),
                        help="models of the profile, timeline and sample parts (default: bf16, the default recipe's "
                             "per-token W8A8 and W4A8, and W4A8 with the paper's per-tensor ranges)")
    parser.add_argument("--check-models", nargs="+", default=list(HIDDEN), choices=list(HIDDEN),
                        help="whose layer shapes the check part runs, in this order")
    parser.add_argument("--check-layers", nargs="+", default=[*layer_shapes(1), "mlp", "adaln", "block", "model"],
                        choices=[*layer_shapes(1), "mlp", "adaln", "block", "model"],
                        help="which layers the check part runs (mlp: fused fc1 -> fc2; adaln: the 8-bit weight-only "
                             "kernel; block: a KernelDiTBlock, with and without qkv's and fc1's norms in the "
                             "quantize pass, against the plain block; model: the whole synthetic W4A8 DiT-XL/2 on "
                             "the kernels against its fake numerics in float32, within 1.25 times the error of "
                             "the fake numerics in bf16). All of DiT-XL/2's take over 10 minutes on an "
                             "H100 (qkv alone: 41 checks in about 4 minutes); split them across calls by layer")
    parser.add_argument("--gemm-variants", nargs="+", default=list(GEMM_VARIANTS), choices=list(GEMM_VARIANTS),
                        help="int8 GEMM variants of the gemm part")
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64],
                        help="images per batch of the profile, timeline and sample parts (2× rows with CFG)")
    parser.add_argument("--gemm-batch", type=int, default=64, help="images whose rows the gemm part multiplies")
    parser.add_argument("--cuda-graph", nargs="+", default=["on"], choices=["on", "off"],
                        help="sample part: model calls replayed from CUDA graphs (on), eager launches (off), or both")
    parser.add_argument("--num-sampling-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed sampling runs per row and batch; the median is reported (all are kept)")
    parser.add_argument("--adaln-bit", type=int, default=8, choices=[8, 0],
                        help="weight-only bits of the adaLN layers in the quantized rows (0: bf16)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "speed.jsonl"),
                        help="JSON lines file every row is appended to as it is measured")
    args = parser.parse_args()
    args.adaln_bit = args.adaln_bit or None
    return args


if __name__ == "__main__":
    main(parse_args())
