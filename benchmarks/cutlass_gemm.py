"""CUTLASS's own sm90 int8 GEMMs at DiT-XL/2's batch-64 shapes, beside our Gluon GEMM and cuBLAS: what
bounds an int8 GEMM with an epilogue on this card (issue 13's 1,400 TOPS goal).

    python -m benchmarks.cutlass_gemm

Builds benchmarks/cutlass/scaled_int8_gemm.cu at first use (nvcc, a few minutes) into --build-dir, then
for each layer shape (M = --rows; K = 1,152 or 4,608) and each CUTLASS variant (VARIANTS: ping-pong or
cooperative schedules, 128- or 256-wide tiles, with and without TMA multicast across a 2-CTA cluster)
measures TOPS (2·M·N·K per second, `triton.testing.do_bench`, and replayed from a CUDA graph) with the
same simple epilogue for all: D = bf16(s_x[m]·(s_w[n]·acc) + b[n]). Beside them: our Gluon GEMM
(quant/hopper_gemm.py) computing the same (per-row scales, zero points that cancel, bias, no LoRA),
cuBLAS's bf16 GEMM and its plain int8 GEMM (torch._int_mm). Each output's relative error against the
exact product is recorded. Rows are appended, as measured, to --output
(benchmarks/results/cutlass.jsonl) with the call id, card, date and commit.

Needs a CUDA GPU of compute capability 9.0, nvcc (--nvcc, else $CUDA_HOME/bin/nvcc, else on PATH) and
CUTLASS 3's headers (--cutlass, else those of the `nvidia-cutlass` wheel: pip install nvidia-cutlass).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from benchmarks.hopper_gemm import graphed_ms
from benchmarks.rowlog import RowLog, card_of, provenance
from benchmarks.speed import bench_ms
from benchmarks.synthetic import HIDDEN, layer_shapes
from runtime.cli import run_cli
from runtime.errors import UserError

SOURCE = Path(__file__).parent / "cutlass" / "scaled_int8_gemm.cu"
VARIANTS = {  # the source's variant numbers
    0: "ping-pong 128x128x128, no cluster",
    1: "ping-pong 128x128x128, cluster 2x1 (weight tiles multicast)",
    2: "cooperative 256x128x128, cluster 2x1",
    3: "cooperative 128x256x128, cluster 2x1",
    4: "ping-pong 128x128x128, cluster 1x2 (activation tiles multicast)",
    5: "ping-pong 128x128x64, cluster 2x1",
}
STATUS = {1: "CUTLASS cannot implement this shape", 2: "workspace allocation failed", 3: "initialisation failed",
          4: "launch failed", -1: "unknown variant"}


def find_nvcc(given: str | None) -> str | None:
    """nvcc: `given`, else $CUDA_HOME/bin/nvcc, else the one on PATH (None: none)."""
    if given:
        return given if Path(given).is_file() else None
    home = os.environ.get("CUDA_HOME")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cutlass_root(given: str | None) -> Path | None:
    """The CUTLASS source tree holding include/cute and tools/util/include: `given`, else the
    nvidia-cutlass wheel's (its cutlass_library package); None: not found."""
    if given:
        root = Path(given)
    else:
        try:
            import cutlass_library
        except ImportError:
            return None
        root = Path(cutlass_library.__file__).parent / "source"
    return root if (root / "include" / "cute").is_dir() else None


def build(nvcc: str, cutlass: Path, build_dir: Path) -> Path:
    """The compiled library, rebuilt when the source is newer; written to a temporary name first,
    so an interrupted build leaves no broken library behind."""
    library = build_dir / "scaled_int8_gemm.so"
    if library.is_file() and library.stat().st_mtime >= SOURCE.stat().st_mtime:
        return library
    build_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=build_dir, suffix=".so", delete=False) as partial:
        pass
    command = [nvcc, "-std=c++17", "-O3", "-arch=sm_90a", "--expt-relaxed-constexpr", "-DNDEBUG", "-shared",
               "-Xcompiler", "-fPIC", f"-I{cutlass / 'include'}", f"-I{cutlass / 'tools' / 'util' / 'include'}",
               "-o", partial.name, str(SOURCE)]
    print(f"[cutlass_gemm] building {library} (nvcc, a few minutes)", flush=True)
    try:
        subprocess.run(command, check=True)
        os.replace(partial.name, library)
    finally:
        Path(partial.name).unlink(missing_ok=True)
    return library


def load(library: Path):
    """The library's C entry point, typed for ctypes."""
    gemm = ctypes.CDLL(str(library)).scaled_int8_gemm
    gemm.restype = ctypes.c_int
    gemm.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 6 + [ctypes.c_int] * 3 + [ctypes.c_void_p]
    return gemm


def run_variant(gemm, variant: int, a, b, scale_x, scale_w, bias, out) -> None:
    """One call of CUTLASS variant `variant` on the current stream (RuntimeError naming a failure)."""
    status = gemm(variant, a.data_ptr(), b.data_ptr(), scale_x.data_ptr(), scale_w.data_ptr(), bias.data_ptr(),
                  out.data_ptr(), a.shape[0], b.shape[0], a.shape[1], torch.cuda.current_stream().cuda_stream)
    if status:
        raise RuntimeError(STATUS.get(status, f"status {status}"))


@torch.no_grad()
def measure_shape(gemm, layer: str, rows: int, k: int, n: int, device, generator: torch.Generator) -> dict:
    """One layer shape's row: every variant's TOPS and error, beside the Gluon GEMM and cuBLAS."""
    from quant.hopper_gemm import int8_gemm_ws

    a = torch.randint(-128, 128, (rows, k), dtype=torch.int8, device=device, generator=generator)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device, generator=generator)
    scale_x = torch.rand(rows, device=device, generator=generator) * 1e-3 + 1e-4
    scale_w = torch.rand(n, device=device, generator=generator) * 1e-3 + 1e-4
    bias = torch.randn(n, device=device, generator=generator)
    exact = torch._int_mm(a, b.t()).double() * scale_w.double()[None, :] * scale_x.double()[:, None]
    exact += bias.double()[None, :]
    flops = 2 * rows * n * k
    row = {"layer": layer, "M": rows, "K": k, "N": n, "variants": VARIANTS}
    x16 = torch.randn(rows, k, device=device, dtype=torch.bfloat16, generator=generator)
    w16 = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=generator)
    row["bf16_cublas_graphed_TOPS"] = flops / graphed_ms(functools.partial(torch.nn.functional.linear, x16, w16)) / 1e9
    row["int8_cublas_TOPS"] = flops / bench_ms(functools.partial(torch._int_mm, a, b.t())) / 1e9
    # the Gluon GEMM's arithmetic with zero points that cancel (activation zero point 128 = its code
    # shift, weight zero points 0): s_x·s_w·acc + b
    qparams = torch.stack([scale_x, torch.full_like(scale_x, 128.0)])
    zeros = torch.zeros(n, dtype=torch.int32, device=device)
    gluon = functools.partial(int8_gemm_ws, a, torch.zeros(1, rows, dtype=torch.int32, device=device), qparams, b,
                              zeros, zeros, scale_w, bias, None, None, torch.bfloat16)
    row["gluon_relative_error"] = relative_error(gluon(), exact)
    row["gluon_graphed_TOPS"] = flops / graphed_ms(gluon) / 1e9
    for variant in VARIANTS:
        out = torch.empty(rows, n, dtype=torch.bfloat16, device=device)
        call = functools.partial(run_variant, gemm, variant, a, b, scale_x, scale_w, bias, out)
        try:
            call()
            row[f"v{variant}_relative_error"] = relative_error(out, exact)
            row[f"v{variant}_TOPS"] = flops / bench_ms(call) / 1e9
            row[f"v{variant}_graphed_TOPS"] = flops / graphed_ms(call) / 1e9
        except RuntimeError as failure:  # one variant failing is reported, not fatal
            row[f"v{variant}_error"] = str(failure)
    return row


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return ((out.double() - exact).norm() / exact.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32768, help="M of every GEMM (batch 64 with CFG: 32,768)")
    parser.add_argument("--nvcc", help="the nvcc to build with (default: $CUDA_HOME/bin/nvcc, else nvcc on PATH)")
    parser.add_argument("--cutlass", help="a CUTLASS source tree (default: the nvidia-cutlass wheel's headers)")
    parser.add_argument("--library", help="a library built from the source already (skips the build)")
    parser.add_argument("--build-dir", default=str(Path.home() / ".cache" / "ditas" / "cutlass"),
                        help="where the library is built and kept")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "cutlass.jsonl"),
                        help="JSON lines file every row is appended to as it is measured")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise UserError("benchmarks.cutlass_gemm times sm90 kernels: run it on a Hopper GPU (H100, H200)")
    if args.library:
        library = Path(args.library)
        if not library.is_file():
            raise UserError(f"--library {library}: no such file; build it by leaving --library out")
    else:
        nvcc, cutlass = find_nvcc(args.nvcc), cutlass_root(args.cutlass)
        if nvcc is None:
            raise UserError("no nvcc found: pass --nvcc, set CUDA_HOME, or put the CUDA toolkit's bin on PATH")
        if cutlass is None:
            raise UserError("no CUTLASS headers found: pip install nvidia-cutlass, or pass --cutlass <source tree>")
        try:
            library = build(nvcc, cutlass, Path(args.build_dir))
        except subprocess.CalledProcessError as failure:
            raise UserError(f"nvcc could not build {SOURCE.name} (its messages above): the source was written for "
                            "CUTLASS 4.2's headers and nvcc 13.0; pass --cutlass with such a tree") from failure
    device = torch.device("cuda")
    gemm, log = load(library), RowLog(args.output, common=provenance(card_of(device)))
    generator = torch.Generator(device=device).manual_seed(0)
    for layer, (k, n) in layer_shapes(HIDDEN["DiT-XL/2"]).items():
        log.add(measure_shape(gemm, layer, args.rows, k, n, device, generator))


if __name__ == "__main__":
    run_cli(main)
