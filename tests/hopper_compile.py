"""Compiles the Gluon GEMM (quant/hopper_gemm.py), and variants of the Triton kernels
(quant/kernels.py), for sm_90a on any machine, with Triton's own ptxas (no GPU). Run as a script
by test_hopper_gemm in a process of its own: Triton decides at import time whether its jit
functions (its own library's included) are interpreted, and the tests of the Triton kernels run
the interpreter, which neither compiler can use (and which does not compile at all).

    python tests/hopper_compile.py gluon '[[{"consumers": 1, "stages": 5}, 32, false, false, false, false], ...]'
    python tests/hopper_compile.py triton '[["gemm", {"GELU": true}, {}], ["quantize", {"BLOCK_M": 4}, {}]]'

prints, per case, the PTX, the shared memory the kernel takes and, for the Gluon GEMM, the bytes
ptxas spills to local memory, as JSON.
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from triton.experimental.gluon import _runtime as gluon_runtime
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import mangle_type

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant import hopper_gemm, kernels  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


def compile_for_hopper(config: hopper_gemm.TileConfig, rank: int, gelu: bool, per_row: bool, gated: bool,
                       partial: bool = False, moments: bool = False, down_in_loop: bool = False, splits: int = 1):
    """triton.compile of the kernel for sm_90a with DiT-XL/2's qkv shape, or with `partial`, one
    whose last row and column tiles are partial (host tensors stand in for the device ones: only
    dtypes and alignment enter the signature); `moments`: the gated update's row moments too;
    `down_in_loop`: the LoRA's down-projection in the main loop; `splits`: the quantize pass's K
    chunks whose partial sums the GEMM adds up."""
    m, k, n = (4000, 1152, 3400) if partial else (4096, 1152, 3456)
    kernel = hopper_gemm._int8_gemm_ws_kernel
    descriptors = {
        "a_desc": TensorDescriptor.from_tensor(torch.empty(m, k, dtype=torch.int8), [config.block_m, config.block_k],
                                               gl.NVMMASharedLayout.get_default_for([config.block_m, config.block_k],
                                                                                    gl.int8)),
        "b_desc": TensorDescriptor.from_tensor(torch.empty(n, k, dtype=torch.int8), [config.block_n, config.block_k],
                                               gl.NVMMASharedLayout.get_default_for([config.block_n, config.block_k],
                                                                                    gl.int8)),
        "right_desc": TensorDescriptor.from_tensor(  # R̃'s halves (2·rank, K)
            torch.empty(2 * max(rank, 16), k, dtype=torch.int8), [2 * max(rank, 16), config.block_k],
            gl.NVMMASharedLayout.get_default_for([2 * max(rank, 16), config.block_k], gl.int8)),
        "out_desc": TensorDescriptor.from_tensor(torch.empty(m, n, dtype=torch.bfloat16), [config.block_m, config.block_n],
                                                 gl.NVMMASharedLayout.get_default_for([config.block_m, config.block_n],
                                                                                      gl.bfloat16)),
    }
    f32, i32, bf16 = torch.float32, torch.int32, torch.bfloat16
    values = descriptors | dict(right_sums_ptr=i32, rowsum_ptr=i32, colsum_ptr=i32,
                                wzero_ptr=i32, wscale_ptr=f32, bias_ptr=f32, qparams_ptr=f32, down_ptr=f32,
                                left_ptr=bf16, bounds_ptr=f32,
                                bounds_scale_ptr=f32, residual_desc=descriptors["out_desc"], gate_ptr=bf16,
                                moments_ptr=f32, M=m, N=n, stride_gate=6 * n, GATE_TOKENS=256)
    warps = hopper_gemm.math_warps(config)
    constants = dict(K=k, HAS_BIAS=True, RANK=rank, GELU=gelu, BOUNDS=gelu, BOUNDS_SCALED=gelu, PER_ROW=per_row,
                     BOUNDS_PER_ROW=gelu and per_row, SPLITS=splits, GATED=gated, MOMENTS=moments,
                     DOWN_IN_LOOP=down_in_loop, STAGES=config.stages,
                     GROUP_M=config.group_m, CONSUMERS=config.consumers, INSTR_N=hopper_gemm.wgmma_instr_n(config.block_n),
                     LEFT_RANK=max(rank, 16), CONSUMER_REGISTERS=config.consumer_registers,
                     WHOLE_M=m % config.block_m == 0, WHOLE_N=n % config.block_n == 0, num_warps=warps)
    source = gluon_runtime.GluonASTSource(kernel, **_signature(kernel.fn, values, constants))
    return triton.compile(source, target=HOPPER, options=dict(num_warps=warps))


def _signature(python_fn, values: dict, constants: dict) -> dict:
    """An AST source's `signature`, `constexprs` and `attrs` for a kernel's arguments: values (a
    dtype stands for a pointer of that dtype; host tensors do, as only dtypes enter the signature)
    and constants (its constexprs, num_warps included). As at a launch on the GPU, pointers (CUDA
    allocations are 256-byte aligned) and integers divisible by 16 are specialised as such, which
    decides whether loads vectorise."""
    names = list(inspect.signature(python_fn).parameters)
    types = {name: mangle_type(torch.empty(8, dtype=value) if isinstance(value, torch.dtype) else value)
             for name, value in values.items()}
    aligned = [name for name, value in values.items()
               if isinstance(value, torch.dtype) or (type(value) is int and value % 16 == 0)]
    return dict(signature=types | dict.fromkeys(constants, "constexpr"),
                constexprs={(names.index(name),): value for name, value in constants.items()},
                attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned})


# DiT-XL/2-like arguments of quant/kernels.py's kernels, a case's constexprs overriding the defaults
TRITON_KERNELS = {
    "gemm": (kernels._int8_gemm_kernel, dict(
        a_ptr=torch.int8, b_ptr=torch.int8, rowsum_ptr=torch.int32, colsum_ptr=torch.int32, wzero_ptr=torch.int32,
        wscale_ptr=torch.float32, bias_ptr=torch.float32, qparams_ptr=torch.float32, down_ptr=torch.float32,
        left_ptr=torch.bfloat16, out_ptr=torch.bfloat16, bounds_ptr=torch.float32, bounds_scale_ptr=torch.float32,
        residual_ptr=torch.bfloat16, gate_ptr=torch.bfloat16, moments_ptr=torch.float32, M=512, N=3456, stride_om=3456,
        stride_rm=3456, stride_gate=6 * 3456, GATE_TOKENS=256),
        dict(K=1152, PACKED_K=1152, PACKED=False, USE_TMA=False, HAS_BIAS=True, RANK=32, GELU=False, BOUNDS=False,
             BOUNDS_SCALED=False, PER_ROW=False, BOUNDS_PER_ROW=False, SPLITS=1, GATED=False, MOMENTS=False, BLOCK_M=64,
             BLOCK_N=128, BLOCK_K=128, GROUP_M=8)),
    "quantize": (kernels._quantize_rows_kernel, dict(
        x_ptr=torch.bfloat16, smooth_ptr=torch.float32, qparams_ptr=torch.float32, right_ptr=torch.int8,
        right_sums_ptr=torch.int32, codes_ptr=torch.int8, rowsum_ptr=torch.int32, down_ptr=torch.float32,
        packed_ptr=torch.uint8, unpacked_ptr=torch.int8, bounds_ptr=torch.float32, init_bounds_ptr=torch.float32, M=4096, stride_xm=4608,
        UNPACK_N=1152),
        dict(K=4608, K_PER_SPLIT=4608, QMAX=255.0, HAS_SMOOTH=True, RANK=32, PER_ROW=True, UNPACK=True,
             PACKED_K=2304, FROM_BOUNDS=False, INIT_BOUNDS=False, INIT_PER_ROW=False, BLOCK_M=32, BLOCK_K=128)),
    "ranged_quantize": (kernels._ranged_quantize_rows_kernel, dict(
        x_ptr=torch.bfloat16, smooth_ptr=torch.float32, shift_ptr=torch.bfloat16, scale_ptr=torch.bfloat16,
        moments_ptr=torch.float32, qparams_ptr=torch.float32, right_ptr=torch.int8, right_sums_ptr=torch.int32,
        codes_ptr=torch.int8, rowsum_ptr=torch.int32, down_ptr=torch.float32, packed_ptr=torch.uint8,
        unpacked_ptr=torch.int8,
        init_bounds_ptr=torch.float32, M=4096, stride_xm=1152, stride_mod=6912, TOKENS=256, EPS_NORM=1e-6,
        UNPACK_N=3456),
        dict(K=1152, QMAX=255.0, RANK=32, NORM=True, HAS_MOMENTS=False, ROUND_BF16=True, HAS_SMOOTH=False, UNPACK=True,
             PACKED_K=576, INIT_BOUNDS=False, INIT_PER_ROW=False, BLOCK_M=32, BLOCK_K=128)),
    "lora_down": (kernels._lora_down_kernel, dict(
        codes_ptr=torch.int8, qparams_ptr=torch.float32, right_ptr=torch.int8, right_sums_ptr=torch.int32,
        down_ptr=torch.float32, M=32768),
        dict(K=1152, RANK=32, BLOCK_M=128, BLOCK_K=128)),
    "weight_only": (kernels._weight_only_kernel, dict(
        x_ptr=torch.bfloat16, codes_ptr=torch.uint8, zero_ptr=torch.uint8, scale_ptr=torch.float32,
        bias_ptr=torch.float32, out_ptr=torch.bfloat16, M=16, N=6912),
        dict(K=1152, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128)),
}


def compile_triton_kernel(name: str, constants: dict, tensor_dtypes: dict):
    """triton.compile of one variant of quant/kernels.py's `name` kernel for sm_90a (4 warps).
    tensor_dtypes: pointer arguments whose dtype differs from the defaults (e.g. a float a_ptr)."""
    autotuned, arguments, defaults = TRITON_KERNELS[name]
    jit = autotuned.fn
    arguments = arguments | {key: getattr(torch, value) for key, value in tensor_dtypes.items()}
    source = ASTSource(jit, **_signature(jit.fn, arguments, defaults | constants))
    return triton.compile(source, target=HOPPER, options=dict(num_warps=4))


def spill_stores(ptx: str) -> int:
    """Bytes of registers that ptxas (Triton's own, as at a launch) spills to local memory in the
    kernel: its `-v` report, which triton.compile does not keep."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        report = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(source), "-o",
                                 str(Path(folder) / "kernel.cubin")], capture_output=True, text=True, check=True).stderr
    return sum(int(found) for found in re.findall(r"(\d+) bytes spill stores", report))


def main(kind: str, cases: list) -> None:
    if kind == "gluon":
        compiled = [compile_for_hopper(hopper_gemm.TileConfig(**config), *epilogue) for config, *epilogue in cases]
    else:
        compiled = [compile_triton_kernel(name, constants, dtypes) for name, constants, dtypes in cases]
    results = [{"ptx": c.asm["ptx"], "shared": c.metadata.shared} for c in compiled]
    if kind == "gluon":
        for result in results:
            result["spill_stores"] = spill_stores(result["ptx"])
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
