"""The warp-specialised Gluon GEMM (quant/hopper_gemm.py): it compiles for sm_90a on any machine
(Triton's own ptxas, no GPU), and on a Hopper GPU it equals the Triton GEMM to the last bit."""

from __future__ import annotations

import inspect
import os
import sys

import pytest
import torch

# Without a GPU, test_backends runs the Triton kernels in the CPU interpreter, which must be chosen
# before Triton first reads it: whichever of the two files pytest imports first.
if not torch.cuda.is_available() and "quant.kernels" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
gluon_runtime = pytest.importorskip("triton.experimental.gluon._runtime")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

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
    warps = 4 if config.consumers == 2 else 4 * (config.block_m // 64)
    constants = dict(K=k, HAS_BIAS=True, RANK=rank, GELU=gelu, BOUNDS=gelu, BOUNDS_SCALED=gelu, PER_ROW=per_row,
                     BOUNDS_PER_ROW=gelu and per_row, SPLITS=1, STAGES=config.stages, GROUP_M=config.group_m,
                     CONSUMERS=config.consumers, INSTR_N=hopper_gemm.wgmma_instr_n(config.block_n),
                     LEFT_RANK=max(rank, 16), CONSUMER_REGISTERS=config.consumer_registers, num_warps=warps)
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {name: mangle_type(value) for name, value in values.items()} | dict.fromkeys(constants, "constexpr")
    source = gluon_runtime.GluonASTSource(kernel, signature=signature,
                                          constexprs={(names.index(name),): v for name, v in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))


@pytest.mark.parametrize("config", [hopper_gemm.DEFAULT_CONFIG, hopper_gemm.TileConfig(consumers=2, stages=2)],
                         ids=["one-math-partition", "two-math-partitions"])
@pytest.mark.parametrize("rank,gelu,per_row", [(32, False, False), (0, True, True)])
def test_the_kernel_compiles_for_hopper_with_warp_specialised_partitions(config, rank, gelu, per_row):
    compiled = compile_for_hopper(config, rank, gelu, per_row)
    ptx = compiled.asm["ptx"]
    assert ".target sm_90a" in ptx
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx  # tensor cores fed by TMA
    assert "setmaxnreg" in ptx  # partitions with their own register budgets
    assert compiled.metadata.shared <= 232448  # fits the H100's 227 KB of shared memory per block


def test_instruction_width_divides_the_tile():
    for block_n in (64, 128, 192, 256):
        n = hopper_gemm.wgmma_instr_n(block_n)
        assert block_n % n == 0 and n % 16 == 0 and n <= 224


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper GPU")
@pytest.mark.parametrize("per_token", [False, True])
def test_on_hopper_the_gluon_gemm_equals_the_triton_gemm(per_token):
    from benchmarks.synthetic import outlier_input, quantized_layer_pair
    from quant.kernels import int8_gemm, quantize_rows

    device = torch.device("cuda")
    _, layer = quantized_layer_pair(1152, 3456, 8, False, device, act_granularity="per_token" if per_token else
                                    "per_tensor")
    x = outlier_input(4096, 1152, device, torch.bfloat16, seed=0)
    qparams = layer.qparams(x)
    codes, rowsum, down = quantize_rows(x, qparams, 8, layer.smooth_inv, layer.lora_right)
    tail = (layer.column_sums, layer.weight_zero, layer.weight_scale, layer.bias, down, layer.lora_left, torch.bfloat16)
    expected = int8_gemm(codes, rowsum, qparams, layer.weight, False, *tail, warp_specialised=False)
    assert torch.equal(hopper_gemm.int8_gemm_ws(codes, rowsum, qparams, layer.weight, *tail), expected)


def test_large_calls_on_hopper_go_to_the_gluon_gemm_where_it_measured_faster(monkeypatch):
    from quant import kernels

    monkeypatch.setattr(kernels, "_is_hopper", lambda device: True)
    cuda = torch.device("cuda")

    def suits(m, n, k, gelu=False, out_dtype=torch.bfloat16, device=cuda):
        return kernels.warp_specialised_suits(m, n, k, 32, False, gelu, None, out_dtype, device)

    assert suits(32768, 3456, 1152) and suits(32768, 1152, 4608) and suits(4096, 3456, 1152)  # qkv, fc2, batch 8
    assert not suits(32768, 1152, 1152)  # proj: slower there
    assert not suits(32768, 4608, 1152, gelu=True)  # fc1 with GELU + range: slower there
    assert not suits(512, 3456, 1152)  # small calls
    assert not suits(32768, 3456, 1152, out_dtype=torch.float32)  # its staging tile would not fit
    assert not suits(32768, 3456, 1152, device=torch.device("cpu"))
