"""Benchmark plumbing that runs without a GPU: the row log every benchmark script writes, and the
FP8 benchmark's rounding."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from benchmarks.rowlog import RowLog
from runtime.cli import run_cli


def test_row_log_appends_each_row_at_once_with_the_common_fields_first(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"old": 1}\n')
    log = RowLog(path, common={"card": "X"})
    log.add({"a": 1})
    assert path.read_text().splitlines() == ['{"old": 1}', '{"card": "X", "a": 1}']  # appended, written at once
    log.add({"a": 2, "card": "Y"})  # a row's own field wins
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == log.rows[-2:]
    assert log.rows == [{"card": "X", "a": 1}, {"card": "Y", "a": 2}]


def test_row_log_can_start_the_file_empty_or_print_only(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"old": 1}\n')
    RowLog(path, start_empty=True).add({"b": 3})
    assert path.read_text() == '{"b": 3}\n'
    assert RowLog().add({"c": 4}) == {"c": 4}


def test_fp8_rows_map_their_amax_to_e4m3s_largest_value_and_w4_codes_are_exact():
    """benchmarks/fp8_gemm.py's pricing of the FP8 format: each activation row scaled so its
    largest magnitude is e4m3's 448, rounded to 3 mantissa bits (half a step: 1/16 of a value,
    or half the smallest subnormal), and W4 codes minus zero points exact in e4m3."""
    from benchmarks.fp8_gemm import E4M3_MAX, rowwise_e4m3

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=generator) * torch.tensor([1.0, 10.0, 100.0, 0.01, 1e-3])[:, None]
    codes, scale = rowwise_e4m3(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (5, 1)
    assert torch.equal(codes.float().abs().amax(dim=1), torch.full((5,), E4M3_MAX))
    error = (codes.float() * scale - x).abs()
    assert (error <= x.abs() / 16 + scale * 2.0**-10 * 1.0001).all()
    signed = torch.arange(-15, 16).float()
    assert torch.equal(signed.to(torch.float8_e4m3fn).float(), signed)


def test_row_pass_benchmark_refuses_a_machine_without_a_gpu_in_one_line(monkeypatch, capsys):
    """benchmarks/row_passes.py times CUDA graphs: without a GPU it says so and exits with status 2,
    and its LoRA placements map to kernels.LORA_DOWN_APART_FROM_ROWS (inside: never apart; apart:
    from any size)."""
    from benchmarks import row_passes

    assert row_passes.lora_threshold("default", 32768) == 32768
    assert row_passes.lora_threshold("inside", 32768) is None and row_passes.lora_threshold("apart", 32768) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["row_passes", "--batches", "8"])
    with pytest.raises(SystemExit) as stopped:
        run_cli(row_passes.main)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_the_timeline_splits_graphed_steps_into_gpu_work_and_the_gaps_before_it():
    """benchmarks/speed.py's timeline part: from a trace's events (µs), per step, the GPU's window,
    its kernels' and copies' own time and the idle time before each, by kind; host events and
    overlapping activities count no gap."""
    from benchmarks.speed import gpu_timeline

    events = [
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500},  # host work: not the GPU's
        {"cat": "kernel", "name": "nvjet_sm90_tst_bias", "ts": 100, "dur": 10},
        {"cat": "kernel", "name": "_ranged_quantize_rows_kernel", "ts": 114, "dur": 6},  # 4 idle before
        {"cat": "kernel", "name": "_int8_gemm_ws_kernel", "ts": 118, "dur": 12},  # overlaps: no gap
        {"cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 140, "dur": 2},  # 10 idle before
        {"cat": "kernel", "name": "_ranged_quantize_rows_kernel", "ts": 143, "dur": 5},  # 1 idle
    ]
    timeline = gpu_timeline(events, steps=2)
    assert timeline["activities_per_step"] == 2.5
    assert timeline["window_ms_per_step"] == 0.024  # 100 … 148 µs over 2 steps
    assert timeline["busy_ms_per_step"] == 0.0175 and timeline["gap_ms_per_step"] == 0.0075
    assert timeline["gap_ms_per_step_by_kind"] == {"gpu_memcpy": 0.005, "quantize pass": 0.0025,
                                                   "float GEMM (cuBLAS)": 0.0, "int8 GEMM + epilogue": 0.0}
    assert timeline["busy_ms_per_step_by_kind"]["quantize pass"] == 0.0055
    assert gpu_timeline([], steps=1)["activities_per_step"] == 0


def test_cutlass_benchmark_refuses_a_machine_without_a_hopper_gpu_in_one_line(monkeypatch, capsys, tmp_path):
    """benchmarks/cutlass_gemm.py builds and times sm90 kernels: without a Hopper GPU it says so and
    exits with status 2, and it finds no nvcc or CUTLASS tree where there is none."""
    from benchmarks import cutlass_gemm

    assert cutlass_gemm.find_nvcc(str(tmp_path / "nvcc")) is None
    assert cutlass_gemm.cutlass_root(str(tmp_path)) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["cutlass_gemm"])
    with pytest.raises(SystemExit) as stopped:
        run_cli(cutlass_gemm.main)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
