"""The row passes of a DiT-XL/2 block on the kernels, each alone, replayed from a CUDA graph.

    python -m benchmarks.row_passes --batches 8 64

Per batch (M = batch × 2 (CFG) × 256 rows), with the synthetic per-token W4A8 layers of
`benchmarks.synthetic` (rank-32 LoRA): GPU µs per call of
- `norm`: qkv's and fc1's pass (LayerNorm + adaLN modulation + per-token ranges + codes, K =
  1,152), taking the rows' mean and variance itself or (`norm from moments`) from the moments a
  gated epilogue leaves (KernelOptions.norm_moments_from_update);
- `proj`: proj's ranged pass (its own per-token ranges, K = 1,152);
- `fc2 from bounds`: fc2's quantize pass as the model runs it, its qparams taken from the
  per-token bounds fc1's epilogue leaves (quantize_rows's `bounds`; smoothed on the fly; K =
  4,608; the rows named `fc2`, to the seventeenth session, gave it the qparams);
- `proj gated GEMM`: proj's pass and its Gluon/Triton GEMM with the gated residual update,
  writing the moments or not (what the norm's moments cost where they are made).
The ranged passes (`norm`, `proj`) run with the LoRA's down-projection where
kernels.LORA_DOWN_APART_FROM_ROWS puts it, and with `--lora-placements inside apart` also
inside the pass and apart at every size. Effective GB/s counts the activation's bytes read once
and the codes written. Rows are appended, as measured, to --output
(benchmarks/results/quantize_pass.jsonl) with the call id, card, date and commit.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.hopper_gemm import graphed_ms
from benchmarks.rowlog import RowLog, card_of, provenance
from benchmarks.synthetic import HIDDEN, TOKENS, layer_shapes, outlier_input, quantized_layer_pair
from quant import kernels
from quant.triton_modules import register_kernel_op
from runtime.cli import run_cli
from runtime.errors import UserError

# where the ranged passes' LoRA down-projection runs: as the kernels decide, or forced
LORA_PLACEMENTS = ("default", "inside", "apart")


def lora_threshold(placement: str, default: int | None) -> int | None:
    """kernels.LORA_DOWN_APART_FROM_ROWS for a placement (`default`: the kernels' own threshold)."""
    return {"default": default, "inside": None, "apart": 0}[placement]


def row_passes(rows: int, device) -> dict[str, tuple[Callable[[], object], int, int]]:
    """{name: (call, K, bytes moved)} of one block's row passes at `rows` rows."""
    hidden = HIDDEN["DiT-XL/2"]
    shapes = layer_shapes(hidden)
    proj = quantized_layer_pair(*shapes["proj"], 4, False, device, act_granularity="per_token")[1]
    fc1 = quantized_layer_pair(*shapes["fc1"], 4, False, device, seed=1, act_granularity="per_token")[1]
    fc2 = quantized_layer_pair(*shapes["fc2"], 4, True, device, seed=2, act_granularity="per_token")[1]
    attended = outlier_input(rows, hidden, device, torch.bfloat16, seed=5)
    residual = (outlier_input(rows, hidden, device, torch.bfloat16, seed=6) * 4).reshape(-1, TOKENS, hidden)
    adaln = torch.randn(rows // TOKENS, 6 * hidden, device=device, dtype=torch.bfloat16) * 0.3
    gate, shift, scale = adaln[:, :hidden], adaln[:, hidden:2 * hidden], adaln[:, 2 * hidden:3 * hidden]
    x, moments = proj.gated_2d(attended, None, residual, gate, with_moments=True)
    hidden_4x = outlier_input(rows, 4 * hidden, device, torch.bfloat16, seed=7)
    fc2_bounds = kernels.range_bounds(hidden_4x.float() * fc2.smooth_inv, per_row=True)  # as fc1's epilogue leaves them
    fc2_qparams = torch.empty_like(fc2_bounds)  # the pass writes them

    def moved(k: int) -> int:  # bf16 read once, int8 codes written
        return rows * k * 3

    return {
        "norm": (lambda: kernels.norm_quantize_rows(x, shift, scale, TOKENS, 1e-6, 8, fc1.split_right),
                 hidden, moved(hidden)),
        "norm from moments": (lambda: kernels.norm_quantize_rows(x, shift, scale, TOKENS, 1e-6, 8, fc1.split_right,
                                                                 moments=moments), hidden, moved(hidden)),
        "proj": (lambda: kernels.ranged_quantize_rows(attended, 8, proj.split_right), hidden, moved(hidden)),
        "fc2 from bounds": (lambda: kernels.quantize_rows(hidden_4x, fc2_qparams, 8, fc2.smooth_inv,
                                                          fc2.split_right, bounds=fc2_bounds), 4 * hidden,
                            moved(4 * hidden)),
        "proj gated GEMM, moments written": (lambda: proj.gated_2d(attended, None, residual, gate, True),
                                             hidden, 0),
        "proj gated GEMM, no moments": (lambda: proj.gated_2d(attended, None, residual, gate, False), hidden, 0),
    }


RANGED = ("norm", "norm from moments", "proj")  # the passes the LoRA placement applies to


def measure(batches: list[int], placements: list[str], log: RowLog, device) -> None:
    default = kernels.LORA_DOWN_APART_FROM_ROWS
    for batch in batches:
        rows = 2 * batch * TOKENS
        for name, (run, k, moved) in row_passes(rows, device).items():
            for placement in placements if name in RANGED else ["default"]:
                kernels.LORA_DOWN_APART_FROM_ROWS = lora_threshold(placement, default)
                try:
                    us = 1000 * graphed_ms(run)
                finally:
                    kernels.LORA_DOWN_APART_FROM_ROWS = default
                log.add({"kernel": name, "batch": batch, "M": rows, "K": k, "lora_down": placement,
                         "us (graphed)": round(us, 1), "GB_per_s": round(moved / us / 1000, 1) if moved else None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64],
                        help="images per batch; each pass has 2 × batch × 256 rows")
    parser.add_argument("--lora-placements", nargs="+", default=["default"], choices=LORA_PLACEMENTS,
                        help="where the ranged passes' LoRA down-projection runs: as kernels.LORA_DOWN_APART_FROM_ROWS "
                             "decides (default), inside the pass, or apart (kernels.lora_down) at every size")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "quantize_pass.jsonl"),
                        help="JSON lines file every row is appended to as it is measured")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise UserError("benchmarks.row_passes times CUDA kernels: run it on a machine with a CUDA GPU")
    device = torch.device("cuda")
    register_kernel_op()
    measure(args.batches, args.lora_placements, RowLog(args.output, common=provenance(card_of(device))), device)


if __name__ == "__main__":
    run_cli(main)
