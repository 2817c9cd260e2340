"""The warp-specialised Gluon GEMM (quant/hopper_gemm.py): it compiles for sm_90a on any machine
(Triton's own ptxas, no GPU), and on a Hopper GPU it equals the Triton GEMM to the last bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, test_backends runs the Triton kernels in the CPU interpreter, which must be chosen
# before Triton first reads it: whichever of the two files pytest imports first.
if not torch.cuda.is_available() and "quant.kernels" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon._runtime")

from quant import hopper_gemm  # noqa: E402
from quant.split_lora import split_lora  # noqa: E402

COMPILE_CONFIGS = {"ping-pong": hopper_gemm.DEFAULT_CONFIG,
                   "one-math-partition": hopper_gemm.TileConfig(consumers=1, stages=5),
                   "small calls' 64-row tiles": hopper_gemm.SMALL_CALL_CONFIG}
# (LoRA rank, GELU + range, per-row ranges, gated residual update, partial tiles, the update's row
# moments): qkv's epilogue in a block, fc1's, fc2's and proj's; without the LoRA; with partial tiles
COMPILE_EPILOGUES = [(32, False, False, False, False, False), (32, True, True, False, False, False),
                     (32, False, True, True, False, False), (32, False, True, True, False, True),
                     (0, True, True, False, False, False), (32, True, True, False, True, False),
                     (32, False, True, True, True, True)]


@pytest.fixture(scope="module")
def compiled_for_hopper() -> dict:
    """{(config name, *epilogue): {"ptx", "shared", "spill_stores"}}, compiled by tests/hopper_compile.py
    in a process without Triton's CPU interpreter (test_backends turns it on in this one)."""
    cases = [(name, *epilogue) for name in COMPILE_CONFIGS for epilogue in COMPILE_EPILOGUES]
    arguments = [[COMPILE_CONFIGS[name]._asdict(), *epilogue] for name, *epilogue in cases]
    return dict(zip(cases, compile_in_own_process("gluon", arguments)))


def compile_in_own_process(kind: str, cases: list) -> list[dict]:
    """tests/hopper_compile.py's output for these cases, run without Triton's CPU interpreter."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("hopper_compile.py")), kind,
                           json.dumps(cases)], env=env, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(done.stdout)


# Variants of the Triton kernels that the CPU interpreter runs but never compiles: the GEMM with
# per-row ranges, GELU and an output range per row, the quantize pass with small row blocks (and
# with or without W4 weights to unpack, its qparams from a GEMM's bounds, filling the next GEMM's
# bounds), the one taking its own per-token ranges (and LayerNorm + modulation too), the LoRA's
# down-projection apart from it, and the weight-only kernel of the 8-bit adaLN.
TRITON_VARIANTS = {
    "gemm per row, GELU + range": ["gemm", {"PER_ROW": True, "GELU": True, "BOUNDS": True, "BOUNDS_SCALED": True,
                                             "BOUNDS_PER_ROW": True, "SPLITS": 3}, {}],
    "gemm with the gated residual update": ["gemm", {"GATED": True, "PER_ROW": True}, {}],
    "… and its row moments": ["gemm", {"GATED": True, "PER_ROW": True, "MOMENTS": True}, {}],
    "… 256-wide tiles": ["gemm", {"GATED": True, "PER_ROW": True, "MOMENTS": True, "BLOCK_M": 128, "BLOCK_N": 256}, {}],
    "LayerNorm + modulation + quantize pass": ["ranged_quantize", {}, {}],
    "… its mean and variance from row moments": ["ranged_quantize", {"HAS_MOMENTS": True}, {}],
    "… 512-wide tiles": ["ranged_quantize", {"BLOCK_M": 16, "BLOCK_K": 512}, {}],
    "… 2 rows a program": ["ranged_quantize", {"BLOCK_M": 2, "BLOCK_K": 256}, {}],
    "quantize pass taking its own per-token ranges (no norm)": ["ranged_quantize", {"NORM": False}, {}],
    "… of fc2's input, smoothed on the fly": ["ranged_quantize", {"NORM": False, "HAS_SMOOTH": True, "K": 4608}, {}],
    "the LoRA's down-projection apart from a ranged pass, 128 rows a program": ["lora_down", {}, {}],
    "… 64 rows": ["lora_down", {"BLOCK_M": 64}, {}],
    "quantize pass, 4 rows a program": ["quantize", {"BLOCK_M": 4, "BLOCK_K": 256}, {}],
    "… no weights to unpack beside the rows": ["quantize", {"UNPACK": False}, {}],
    "… its qparams from the bounds fc1's epilogue left (fc2's), per row": ["quantize", {"FROM_BOUNDS": True}, {}],
    "… from the bounds per tensor": ["quantize", {"FROM_BOUNDS": True, "PER_ROW": False}, {}],
    "… filling the next GEMM's bounds, per row": ["quantize", {"INIT_BOUNDS": True, "INIT_PER_ROW": True}, {}],
    "LayerNorm + modulation + quantize pass filling the next GEMM's bounds, per row": [
        "ranged_quantize", {"INIT_BOUNDS": True, "INIT_PER_ROW": True}, {}],
    "… filling them per tensor": ["ranged_quantize", {"INIT_BOUNDS": True}, {}],
    "8-bit weight-only layer (adaLN), 16 rows": ["weight_only", {}, {}],
    "… 128 rows": ["weight_only", {"BLOCK_M": 128}, {}],
}


def test_triton_kernel_variants_compile_for_hopper():
    compiled = compile_in_own_process("triton", list(TRITON_VARIANTS.values()))
    for name, result in zip(TRITON_VARIANTS, compiled):
        assert ".target sm_90a" in result["ptx"], name
        assert result["shared"] <= 232448, name


@pytest.mark.parametrize("config", list(COMPILE_CONFIGS))
@pytest.mark.parametrize("epilogue", COMPILE_EPILOGUES)
def test_the_kernel_compiles_for_hopper_with_warp_specialised_partitions(compiled_for_hopper, config, epilogue):
    compiled = compiled_for_hopper[(config, *epilogue)]
    ptx = compiled["ptx"]
    assert ".target sm_90a" in ptx
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx  # tensor cores fed by TMA
    assert "setmaxnreg" in ptx  # partitions with their own register budgets
    assert compiled["shared"] <= 232448  # fits the H100's 227 KB of shared memory per block


@pytest.mark.parametrize("config", list(COMPILE_CONFIGS))
def test_the_math_partitions_keep_their_values_in_registers(compiled_for_hopper, config):
    """Spilled registers cost the epilogue a round trip to local memory per value: before the
    whole-tile loads and the prefetched epilogue inputs, ptxas spilled 196 bytes a thread in the
    plain epilogue (~10 % of the GEMM's rate at batch 64, benchmarks/RESULTS.md)."""
    spills = {epilogue: compiled_for_hopper[(config, *epilogue)]["spill_stores"] for epilogue in COMPILE_EPILOGUES}
    with_lora_whole_tiles = [spills[epilogue] for epilogue in COMPILE_EPILOGUES if epilogue[0] and not epilogue[4]]
    assert max(with_lora_whole_tiles) <= 8, spills  # the blocks' epilogues: at most one 2-register spill
    assert max(spills.values()) <= 128, spills


# The small calls' tiles with the LoRA's down-projection in the main loop, for the epilogues of a
# block's four layers (qkv's, fc1's, fc2's gated update with its row moments, proj's per tensor)
# and with partial tiles
DOWN_IN_LOOP_EPILOGUES = [(32, False, True, False, False, False), (32, True, True, False, False, False),
                          (32, False, True, True, False, True), (32, False, False, False, False, False),
                          (32, True, True, False, True, False)]


def test_a_main_loop_with_the_lora_down_projection_compiles_within_shared_memory_and_registers():
    config = hopper_gemm.tile_config(512, down_in_loop=True)
    compiled = compile_in_own_process("gluon", [[config._asdict(), *epilogue, True]
                                                for epilogue in DOWN_IN_LOOP_EPILOGUES])
    for epilogue, result in zip(DOWN_IN_LOOP_EPILOGUES, compiled):
        ptx = result["ptx"]
        # per partition and K step (K = 128), four m64n32k32 int8 wgmmas per half of R̃, the codes
        # straight from shared memory
        assert ptx.count("wgmma.mma_async.sync.aligned.m64n32k32.s32.s8.s8") == 8 * config.consumers, epilogue
        assert "ld.shared.v2.b8" not in ptx, epilogue
        assert ptx.count("cp.async.bulk.tensor") >= 3, epilogue  # codes, weights and R̃ by TMA
        assert result["shared"] <= 232448, epilogue
        assert result["spill_stores"] == 0, epilogue


def test_fc2_at_batch_1_keeps_its_values_in_registers_with_the_down_projection_in_the_main_loop():
    """fc2's gated epilogue with its row moments at 512 rows, whose quantize pass splits K into 12
    chunks (kernels.quantize_splits): loading the 12 partial `down`s before the main loop spills
    (804 bytes a thread: the layout before the nineteenth session); with the down-projection in
    the main loop nothing does."""
    fc2 = DOWN_IN_LOOP_EPILOGUES[2]
    kept, spilled = compile_in_own_process("gluon", [
        [hopper_gemm.tile_config(512, down_in_loop)._asdict(), *fc2, down_in_loop, 12]
        for down_in_loop in (True, False)])
    assert kept["shared"] <= 232448 and kept["spill_stores"] == 0
    assert spilled["spill_stores"] > 0


def test_instruction_width_divides_the_tile():
    for block_n in (64, 128, 192, 256):
        n = hopper_gemm.wgmma_instr_n(block_n)
        assert block_n % n == 0 and n % 16 == 0 and n <= 224


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper GPU")
@pytest.mark.parametrize(("per_token", "gated"), [(False, False), (True, False), (True, True)])
# 128-row tiles, a small call's 64-row tiles, and partial tiles in both directions (the masked loads)
@pytest.mark.parametrize(("rows", "out_features"), [(8192, 3456), (512, 3456), (8000, 1000)])
def test_on_hopper_the_gluon_gemm_equals_the_triton_gemm(per_token, gated, rows, out_features):
    from benchmarks.synthetic import outlier_input, quantized_layer_pair
    from quant.kernels import GatedResidual, int8_gemm, quantize_rows, row_moments

    if gated and rows % 256:
        pytest.skip("a gated update needs whole samples of 256 rows")
    device = torch.device("cuda")
    _, layer = quantized_layer_pair(1152, out_features, 8, False, device,
                                    act_granularity="per_token" if per_token else "per_tensor")
    x = outlier_input(rows, 1152, device, torch.bfloat16, seed=0)
    qparams = layer.qparams(x)
    codes, rowsum, down = quantize_rows(x, qparams, 8, layer.smooth_inv, layer.split_right)
    tail = (layer.column_sums, layer.weight_zero, layer.weight_scale, layer.bias, down, layer.lora_left, torch.bfloat16)
    update = None
    if gated:  # a block's residual update: samples of 256 tokens, the gate a chunk of the adaLN output
        update = GatedResidual(outlier_input(rows, out_features, device, torch.bfloat16, seed=1),
                               torch.randn(rows // 256, 6 * out_features, device=device,
                                           dtype=torch.bfloat16)[:, out_features:2 * out_features], 256)
    expected = int8_gemm(codes, rowsum, qparams, layer.weight, False, *tail, warp_specialised=False, gated=update)
    assert torch.equal(hopper_gemm.int8_gemm_ws(codes, rowsum, qparams, layer.weight, *tail, gated=update), expected)
    if gated:  # and the updated rows' moments, up to the order of their float32 sums
        triton_moments, gluon_moments = row_moments(rows, out_features, device), row_moments(rows, out_features, device)
        expected = int8_gemm(codes, rowsum, qparams, layer.weight, False, *tail, warp_specialised=False,
                             gated=update._replace(moments=triton_moments))
        got = hopper_gemm.int8_gemm_ws(codes, rowsum, qparams, layer.weight, *tail, gated=update._replace(
            moments=gluon_moments))
        assert torch.equal(got, expected)
        chunks = expected.float().unflatten(1, (-1, 128))
        torch.testing.assert_close(gluon_moments[0], chunks.mean(dim=2).T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gluon_moments, triton_moments, rtol=1e-4, atol=1e-4)


def test_large_calls_on_hopper_go_to_the_gluon_gemm_where_it_measured_faster(monkeypatch):
    from quant import kernels

    monkeypatch.setattr(kernels, "_is_hopper", lambda device: True)
    cuda = torch.device("cuda")

    def suits(m, n, k, out_dtype=torch.bfloat16, device=cuda):
        return kernels.warp_specialised_suits(m, n, k, 32, False, out_dtype, device)

    assert suits(32768, 3456, 1152) and suits(32768, 1152, 4608) and suits(4096, 3456, 1152)  # qkv, fc2, batch 8
    assert suits(32768, 1152, 1152) and suits(4096, 4608, 1152)  # proj; fc1, with its GELU and fc2's range too
    assert suits(512, 3456, 1152) and suits(512, 1152, 4608) and suits(512, 1152, 1152)  # batch 1, on 64-row tiles
    assert suits(512, 4608, 1152)  # … fc1 too (its epilogue since the seventeenth session)
    assert not suits(256, 3456, 1152)  # smaller calls
    assert not suits(512_000, 768, 256)  # the demo's narrow layers: not measured there
    assert not suits(32768, 3456, 1152, out_dtype=torch.float32)  # its staging tile would not fit
    assert not suits(32768, 3456, 1152, device=torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper GPU")
@pytest.mark.parametrize(("per_token", "gated"), [(False, False), (True, False), (True, True)])
# a batch-1 call and partial tiles in both directions; fc2's K (36 steps)
@pytest.mark.parametrize(("rows", "in_features", "out_features"), [(512, 1152, 3456), (500, 1040, 1000),
                                                                   (512, 4608, 1152)])
def test_on_hopper_the_down_projection_in_the_main_loop_equals_the_quantize_pass_one(per_token, gated, rows,
                                                                                     in_features, out_features):
    """The same integer products (q − 128)·halfᵀ less the same zero points' share, recombined in
    float32 in another order (the pass's K chunks): equal up to that rounding, which the outputs'
    bf16 rounding turns into rare one-ulp differences."""
    from benchmarks.synthetic import outlier_input, quantized_layer_pair
    from quant.kernels import GatedResidual, quantize_rows

    if gated and rows % 256:
        pytest.skip("a gated update needs whole samples of 256 rows")
    device = torch.device("cuda")
    _, layer = quantized_layer_pair(in_features, out_features, 8, False, device,
                                    act_granularity="per_token" if per_token else "per_tensor")
    x = outlier_input(rows, in_features, device, torch.bfloat16, seed=0)
    qparams = layer.qparams(x)
    codes, rowsum, down = quantize_rows(x, qparams, 8, layer.smooth_inv, layer.split_right)
    head = (codes, rowsum, qparams, layer.weight, layer.column_sums, layer.weight_zero, layer.weight_scale, layer.bias)
    update = None
    if gated:
        update = GatedResidual(outlier_input(rows, out_features, device, torch.bfloat16, seed=1),
                               torch.randn(rows // 256, 6 * out_features, device=device,
                                           dtype=torch.bfloat16)[:, out_features:2 * out_features], 256)
    config = hopper_gemm.tile_config(rows, down_in_loop=True)
    expected = hopper_gemm.int8_gemm_ws(*head, down, layer.lora_left, torch.bfloat16, gated=update, config=config)
    got = hopper_gemm.int8_gemm_ws(*head, None, layer.lora_left, torch.bfloat16, gated=update, config=config,
                                   right=layer.split_right)
    lora_only = hopper_gemm.int8_gemm_ws(*head, torch.zeros_like(down), layer.lora_left, torch.bfloat16,
                                         gated=update, config=config)
    assert not torch.equal(lora_only, expected)  # the LoRA changes the output: the comparison sees it
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
    assert (got != expected).float().mean() < 0.01  # all but rare one-ulp roundings agree


def test_the_down_projection_in_the_main_loop_is_refused_off_the_gluon_gemm_and_without_its_factors():
    from quant.kernels import int8_gemm

    m, k, n, rank = 64, 64, 64, 16
    codes, weight = torch.zeros(m, k, dtype=torch.int8), torch.zeros(n, k, dtype=torch.int8)
    ints, floats = torch.zeros(n, dtype=torch.int32), torch.ones(n)
    left, right = split_lora(torch.zeros(n, rank), torch.randn(rank, k))
    head = (codes, torch.zeros(1, m, dtype=torch.int32), torch.ones(2, 1))
    with pytest.raises(ValueError, match="only the warp-specialised GEMM"):
        int8_gemm(*head, weight, False, ints, ints, floats, None, None, left, torch.bfloat16, right=right)
    refused = r"takes R̃'s int8 halves \(2·rank, K\) beside L"
    with pytest.raises(ValueError, match=refused):
        hopper_gemm.int8_gemm_ws(*head, weight, ints, ints, floats, None, None, None, torch.bfloat16, right=right)
    with pytest.raises(ValueError, match=refused):  # R̃ of another rank than L
        hopper_gemm.int8_gemm_ws(*head, weight, ints, ints, floats, None, None, left[:, :8], torch.bfloat16,
                                 right=right)
    with pytest.raises(ValueError, match=refused):  # bf16 R, not its halves
        hopper_gemm.int8_gemm_ws(*head, weight, ints, ints, floats, None, None, left, torch.bfloat16,
                                 right=right._replace(codes=right.codes.to(torch.bfloat16)))


def test_small_calls_on_hopper_compute_the_lora_down_projection_in_the_gemm(monkeypatch):
    from quant import kernels

    monkeypatch.setattr(kernels, "_is_hopper", lambda device: True)
    cuda = torch.device("cuda")

    def in_gemm(m, n, k, rank=32, packed=False):
        return kernels.lora_down_in_gemm(m, n, k, rank, packed, torch.bfloat16, cuda)

    assert in_gemm(512, 3456, 1152) and in_gemm(512, 1152, 4608) and in_gemm(512, 4608, 1152)  # batch 1
    assert in_gemm(1024, 3456, 1152)  # batch 2
    assert not in_gemm(2048, 3456, 1152) and not in_gemm(4096, 3456, 1152)  # batch 4 and 8: in the passes
    assert not in_gemm(32768, 3456, 1152)
    assert not in_gemm(512, 3456, 1152, rank=0) and not in_gemm(512, 3456, 1152, rank=64)
    assert not in_gemm(512, 3456, 1152, packed=True)  # the Gluon GEMM takes int8 codes only
    assert not in_gemm(256, 3456, 1152)  # not on the Gluon GEMM
    monkeypatch.setattr(kernels, "LORA_DOWN_IN_GEMM_BELOW_ROWS", None)
    assert not in_gemm(512, 3456, 1152)


def test_the_gluon_gemm_refuses_a_gated_update_whose_samples_split_its_row_tiles():
    """Its epilogue reads one gate row per 128-row tile: 100 tokens per sample would mix samples."""
    from quant.kernels import GatedResidual

    m, k, n = 256, 64, 64
    codes, weight = torch.zeros(m, k, dtype=torch.int8), torch.zeros(n, k, dtype=torch.int8)
    ints, floats = torch.zeros(n, dtype=torch.int32), torch.ones(n)
    update = GatedResidual(torch.zeros(m, n, dtype=torch.bfloat16), torch.zeros(3, n, dtype=torch.bfloat16), 100)
    with pytest.raises(ValueError, match="whole row tiles per sample"):
        hopper_gemm.int8_gemm_ws(codes, torch.zeros(1, m, dtype=torch.int32), torch.ones(2, 1), weight, ints, ints,
                                 floats, None, None, None, torch.bfloat16, gated=update)
