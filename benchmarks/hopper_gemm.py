"""The warp-specialised Gluon int8 GEMM (quant/hopper_gemm.py) against the Triton one and cuBLAS bf16.

    python -m benchmarks.hopper_gemm --configs default ping-pong-m64

For each tile configuration and each of DiT-XL/2's four quantized layer shapes (M = --batch × 2
(CFG) × 256 tokens): the relative difference of its output from `kernels.int8_gemm` on the same
inputs (the integer part is exact in both; the bf16 LoRA product may round differently), then
TFLOP/s (2·M·N·K per second, `triton.testing.do_bench`) of both kernels and of cuBLAS bf16 on the
same shape, in the same process; the two int8 GEMMs also replayed from a CUDA graph (`graphed_ms`).
fc1 also with GELU alone and with GELU and fc2's range in the epilogue; one shape also with
per-token ranges and with a quantize pass split in three. Every row is appended, as
measured, to --output (benchmarks/results/gemm.jsonl) with the call id, card, date and commit.
Run one configuration per process (a kernel that deadlocks then costs one process, not the run).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch

from benchmarks.rowlog import RowLog, card_of, provenance
from benchmarks.speed import bench_ms
from benchmarks.synthetic import HIDDEN, TOKENS, layer_shapes, outlier_input, quantized_layer_pair
from quant.hopper_gemm import TileConfig, tile_config

CONFIGS = {  # each fits the 227 KB of shared memory with the output's staging tiles
    "default": None,  # the model's: hopper_gemm.tile_config of the call's rows
    "ping-pong": TileConfig(),  # two math partitions of one warpgroup taking turns, 128-row tiles, 4 slots
    "one-math-partition": TileConfig(consumers=1, stages=5),  # two warpgroups share each 128×128 tile
    "ping-pong-k64": TileConfig(consumers=2, block_k=64, stages=8),
    "ping-pong-m64": TileConfig(consumers=2, block_m=64, stages=6),
}
GRAPHED_CALLS = 10  # calls per CUDA graph in graphed_ms


def call(kernel, args: tuple, extra: dict, bounds_shape: tuple | None):
    """kernel(*args, **extra) with a fresh +inf bounds tensor of bounds_shape (None: no bounds)."""
    bounds = None if bounds_shape is None else torch.full(bounds_shape, float("inf"), device=args[0].device)
    return kernel(*args, **extra, bounds=bounds), bounds


def graphed_ms(fn) -> float:
    """Milliseconds per call of fn replayed from a CUDA graph of GRAPHED_CALLS calls: the GPU's time
    without the Python launch (which at 4,096 rows costs more than the GEMM), as in the samplers."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compilation, autotuning) off the capture
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPHED_CALLS):
            fn()
    return bench_ms(graph.replay) / GRAPHED_CALLS


def relative_difference(got: torch.Tensor, reference: torch.Tensor) -> float:
    return ((got.float() - reference.float()).norm() / reference.float().norm()).item()


@torch.no_grad()
def measure(config_name: str, batch: int, log: RowLog, device) -> None:
    from quant.hopper_gemm import int8_gemm_ws
    from quant.kernels import int8_gemm, quantize_rows

    m = 2 * batch * TOKENS
    config = CONFIGS[config_name] or tile_config(m)
    for role, (k, n) in layer_shapes(HIDDEN["DiT-XL/2"]).items():
        flops = 2 * m * n * k
        x = outlier_input(m, k, device, torch.bfloat16, seed=k)
        weight = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        _, layer = quantized_layer_pair(k, n, 8, role == "fc2", device)
        cases = [("per_tensor", None)]
        if role == "fc1":
            cases += [("per_tensor", "gelu"), ("per_tensor", "gelu_range")]
        if role == "qkv":
            cases += [("per_token", None), ("per_token", "gelu_range")]
        for granularity, epilogue in cases:
            row = {"config": config_name, "tile": config._asdict(), "layer": role, "M": m, "K": k, "N": n,
                   "act": granularity, "epilogue": epilogue or "plain"}
            if granularity == "per_token":
                layer.act_granularity = "per_token"
            qparams = layer.qparams(x)
            codes, rowsum, down = quantize_rows(x, qparams, 8, layer.smooth_inv, layer.split_right)
            extra, bounds_shape = {}, None
            if epilogue == "gelu":
                extra = dict(gelu=True)
            elif epilogue:
                bounds_shape = (2, m) if granularity == "per_token" else (2, 1)
                extra = dict(gelu=True, bounds_scale=layer.column_sums.float())
            inputs = (codes, rowsum, qparams, layer.weight)
            tail = (layer.column_sums, layer.weight_zero, layer.weight_scale, layer.bias, down, layer.lora_left,
                    torch.bfloat16)
            triton_call = functools.partial(call, functools.partial(int8_gemm, warp_specialised=False),
                                            inputs + (False,) + tail, extra, bounds_shape)
            ws_call = functools.partial(call, functools.partial(int8_gemm_ws, config=config), inputs + tail, extra,
                                        bounds_shape)
            try:
                reference, reference_bounds = triton_call()
                got, got_bounds = ws_call()
                torch.cuda.synchronize()
                row["relative_difference"] = relative_difference(got, reference)
                if bounds_shape:
                    row["bounds_difference"] = (got_bounds - reference_bounds).abs().max().item()
                row["ws_TFLOPs"] = flops / bench_ms(ws_call) / 1e9
                row["ws_graphed_TFLOPs"] = flops / graphed_ms(ws_call) / 1e9
            except Exception as error:  # noqa: BLE001 — a configuration that fails is a row, not the end
                row["error"] = str(error).splitlines()[0][:300]
                log.add(row)
                continue
            row["triton_TFLOPs"] = flops / bench_ms(triton_call) / 1e9
            row["triton_graphed_TFLOPs"] = flops / graphed_ms(triton_call) / 1e9
            if not epilogue and granularity == "per_tensor":
                row["bf16_cublas_TFLOPs"] = flops / bench_ms(
                    functools.partial(torch.nn.functional.linear, x, weight)) / 1e9
            log.add(row)
    # a quantize pass split in three (the partial sums the epilogue adds), at a small call
    k, n = layer_shapes(HIDDEN["DiT-XL/2"])["qkv"]
    x = outlier_input(512, k, device, torch.bfloat16, seed=3)
    _, layer = quantized_layer_pair(k, n, 8, False, device)
    qparams = layer.qparams(x)
    codes, rowsum, down = quantize_rows(x, qparams, 8, layer.smooth_inv, layer.split_right, splits=3)
    tail = (layer.column_sums, layer.weight_zero, layer.weight_scale, layer.bias, down, layer.lora_left,
            torch.bfloat16)
    reference = int8_gemm(codes, rowsum, qparams, layer.weight, False, *tail, warp_specialised=False)
    got = int8_gemm_ws(codes, rowsum, qparams, layer.weight, *tail, config=config)
    log.add({"config": config_name, "layer": "qkv", "M": 512, "K": k, "N": n, "act": "per_tensor",
             "epilogue": "split quantize pass (3)", "relative_difference": relative_difference(got, reference)})


@torch.no_grad()
def run_once(config_name: str, batch: int, device) -> None:
    """Two launches of the kernel per layer shape and nothing else, what a profiler (ncu) should
    see: the plain epilogue (per-tensor ranges, bias and LoRA), then the epilogue a KernelDiTBlock
    gives the layer with per-token ranges (qkv plain; fc1 GELU and fc2's per-token range, scaled by
    fc2's smoothing; proj and fc2 the gated residual update)."""
    from quant.hopper_gemm import int8_gemm_ws
    from quant.kernels import GatedResidual, quantize_rows

    m = 2 * batch * TOKENS
    for role, (k, n) in layer_shapes(HIDDEN["DiT-XL/2"]).items():
        x = outlier_input(m, k, device, torch.bfloat16, seed=k)
        _, layer = quantized_layer_pair(k, n, 8, role == "fc2", device)
        for granularity in ("per_tensor", "per_token"):
            layer.act_granularity = granularity
            qparams = layer.qparams(x)
            codes, rowsum, down = quantize_rows(x, qparams, 8, layer.smooth_inv, layer.split_right)
            extra = {}
            if granularity == "per_token" and role == "fc1":
                extra = dict(gelu=True, bounds=torch.full((2, m), float("inf"), device=device),
                             bounds_scale=layer.column_sums.float())
            elif granularity == "per_token" and role in ("proj", "fc2"):
                extra = dict(gated=GatedResidual(torch.randn(m, n, device=device, dtype=torch.bfloat16),
                                                 torch.randn(2 * batch, n, device=device, dtype=torch.bfloat16),
                                                 TOKENS))
            int8_gemm_ws(codes, rowsum, qparams, layer.weight, layer.column_sums, layer.weight_zero,
                         layer.weight_scale, layer.bias, down, layer.lora_left, torch.bfloat16,
                         config=CONFIGS[config_name], **extra)
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["default"], choices=list(CONFIGS))
    parser.add_argument("--batch", type=int, default=64, help="images; the GEMMs have 2 × batch × 256 rows")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "gemm.jsonl"),
                        help="JSON lines file every row is appended to as it is measured")
    parser.add_argument("--once", action="store_true",
                        help="launch each configuration's kernel twice per layer shape (run_once), no checks or timing (for ncu)")
    args = parser.parse_args()
    device = torch.device("cuda")
    if args.once:
        for name in args.configs:
            run_once(name, args.batch, device)
        return
    log = RowLog(args.output, common=provenance(card_of(device)))
    for name in args.configs:
        measure(name, args.batch, log, device)


if __name__ == "__main__":
    main()
