"""Error-compensating rounding of one layer: the Triton column kernel against the torch loop.

    python -m benchmarks.compensate_speed

For each of DiT-XL/2's four quantized layer shapes: a random weight, H from correlated random
inputs, the round-to-nearest W4 grid, then `compensated_codes` with each way of walking the
columns (median seconds of --repeats calls) and the smallest share of codes on which a kernel variant agrees with the torch loop. Rows
are appended, as measured, to --output (benchmarks/results/compensate_speed.jsonl).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import torch

from benchmarks.rowlog import RowLog, card_of, provenance
from benchmarks.synthetic import HIDDEN, layer_shapes
from quant.compensate import column_loop, compensated_codes, damped_cholesky, inverse_cholesky
from quant.primitives import quantize_weight


def seconds(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(args: argparse.Namespace) -> None:
    from quant.compensate_kernel import compensate_columns

    device = torch.device(args.device)
    log = RowLog(args.output, common=provenance(card_of(device)))
    generator = torch.Generator().manual_seed(0)
    for role, (k, n) in layer_shapes(HIDDEN[args.model]).items():
        x = torch.randn(4096, k, generator=generator)
        x = x + 0.5 * x.roll(1, dims=1)  # neighbouring channels correlated
        upper = inverse_cholesky(damped_cholesky((x.T @ x).to(device), 0.01))
        weight = (torch.randn(n, k, generator=generator) * 0.02).to(device)
        grid = quantize_weight(weight, args.weight_bit)
        ways = {f"triton_{w}_warps": functools.partial(compensate_columns, warps=w) for w in args.warps}
        ways["torch"] = column_loop
        codes = {name: compensated_codes(weight, upper, grid, columns=way).codes for name, way in ways.items()}
        row = {"model": args.model, "layer": role, "out": n, "in": k, "weight_bits": args.weight_bit,
               "codes_equal_share": min(float((c == codes["torch"]).float().mean()) for c in codes.values())}
        for name, way in ways.items():
            call = functools.partial(compensated_codes, weight, upper, grid, columns=way)
            row[f"{name}_s"] = round(seconds(call, args.repeats, device), 4)
        log.add(row)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-XL/2", choices=list(HIDDEN))
    parser.add_argument("--weight-bit", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warps", type=int, nargs="+", default=[4], help="warps per program of the kernel")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "compensate_speed.jsonl"),
                        help="JSON lines file the rows are appended to")
    return parser.parse_args()


if __name__ == "__main__":
    main(parse_args())
