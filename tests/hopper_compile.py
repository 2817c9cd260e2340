"""Compiles the Gluon GEMM (quant/hopper_gemm.py) for sm_90a on any machine, with Triton's own
ptxas (no GPU). Run as a script by test_hopper_gemm in a process of its own: Triton decides at
import time whether its jit functions (its own library's included) are interpreted, and the tests
of the Triton kernels run the interpreter, which the Gluon compiler cannot use.

    python tests/hopper_compile.py '[[{"consumers": 1, "stages": 5}, 32, false, false], ...]'

prints, per case, the PTX and the shared memory the kernel takes, as JSON.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import _runtime as gluon_runtime
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import mangle_type

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant import hopper_gemm  # noqa: E402


def compile_for_hopper(config: hopper_gemm.TileConfig, rank: int, gelu: bool, per_row: bool):
    """triton.compile of the kernel for sm_90a with DiT-XL/2's qkv shape (host tensors stand in
    for the device ones: only dtypes and alignment enter the signature)."""
    m, k, n = 4096, 1152, 3456
    kernel = hopper_gemm._int8_gemm_ws_kernel
    descriptors = {
        "a_desc": TensorDescriptor.from_tensor(torch.empty(m, k, dtype=torch.int8), [config.block_m, config.block_k],
                                               gl.NVMMASharedLayout.get_default_for([config.block_m, config.block_k],
                                                                                    gl.int8)),
        "b_desc": TensorDescriptor.from_tensor(torch.empty(n, k, dtype=torch.int8), [config.block_n, config.block_k],
                                               gl.NVMMASharedLayout.get_default_for([config.block_n, config.block_k],
                                                                                    gl.int8)),
        "out_desc": TensorDescriptor.from_tensor(torch.empty(m, n, dtype=torch.bfloat16), [config.block_m, config.block_n],
                                                 gl.NVMMASharedLayout.get_default_for([config.block_m, config.block_n],
                                                                                      gl.bfloat16)),
    }
    f32, i32, bf16 = torch.empty(8), torch.empty(8, dtype=torch.int32), torch.empty(8, dtype=torch.bfloat16)
    values = descriptors | dict(rowsum_ptr=i32, colsum_ptr=i32, wzero_ptr=i32, wscale_ptr=f32, bias_ptr=f32,
                                qparams_ptr=f32, down_ptr=f32, left_ptr=bf16, bounds_ptr=f32,
                                bounds_scale_ptr=f32, M=m, N=n)
    warps = hopper_gemm.math_warps(config)
    constants = dict(K=k, HAS_BIAS=True, RANK=rank, GELU=gelu, BOUNDS=gelu, BOUNDS_SCALED=gelu, PER_ROW=per_row,
                     BOUNDS_PER_ROW=gelu and per_row, SPLITS=1, STAGES=config.stages, GROUP_M=config.group_m,
                     CONSUMERS=config.consumers, INSTR_N=hopper_gemm.wgmma_instr_n(config.block_n),
                     LEFT_RANK=max(rank, 16), CONSUMER_REGISTERS=config.consumer_registers, num_warps=warps)
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {name: mangle_type(value) for name, value in values.items()} | dict.fromkeys(constants, "constexpr")
    source = gluon_runtime.GluonASTSource(kernel, signature=signature,
                                          constexprs={(names.index(name),): v for name, v in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))


def main(cases: list) -> None:
    compiled = [compile_for_hopper(hopper_gemm.TileConfig(**config), rank, gelu, per_row)
                for config, rank, gelu, per_row in cases]
    print(json.dumps([{"ptx": c.asm["ptx"], "shared": c.metadata.shared} for c in compiled]))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
