"""The int8 GEMM of large calls on Hopper, in Gluon: persistent and warp-specialised.

`kernels.int8_gemm` (Triton) runs each output tile's main loop and then its epilogue in the same
warps, so with K = 1,152 (nine 128-wide steps) the tensor cores idle through every epilogue
(zero-point corrections, scales, a rank-32 LoRA product, bias, GELU, the next layer's range).
Here one program per multiprocessor walks its tiles in grouped order, split into partitions:

- CONSUMERS *math* partitions take alternate tiles of the program. With two (one warpgroup
  each, "ping-pong") their main loops take turns on the tensor cores, so one partition's
  epilogue runs while the other's main loop does (the default: 1.1–1.3× the rate of one
  partition at K = 1,152, benchmarks/RESULTS.md). With one, two warpgroups share each 128×128
  tile (no register spills, 5 slots) and the tensor cores wait through its epilogue;
- one *loader* warp streams the activation and weight tiles of the program's tiles, in order, by
  TMA into one ring of STAGES shared-memory slots (`ready[s]`: the slot is full, `free[s]`: its
  reader is done with it), running ahead into the next tile during an epilogue;
- the epilogue writes its bf16 tile to shared memory and stores it by TMA, which finishes while
  the next tile's main loop runs.

For the ping-pong to hide it, an epilogue must end within the other partition's main loop, which
at K = 1,152 it did not while it waited on its own global loads (in waves: the registers do not
hold every vector at once) and spilled registers. So each tile's inputs to the epilogue are on
their way before its main loop: column vectors and rows of L copied into shared memory
(_prefetch_columns), row values and the LoRA's operand loaded into registers (_load_rows); and
calls whose tiles are all whole load without predicates (WHOLE_M, WHOLE_N).

Small calls (`kernels.lora_down_in_gemm`) also compute the LoRA's down-projection (q − z)·R̃ᵀ in
the main loop (DOWN_IN_LOOP), and their quantize pass leaves it out: each ring slot holds the
step's columns of R̃'s two int8 halves (quant/split_lora.py) beside the codes and weights, and
after the step's main wgmma two int8 wgmmas multiply the codes in place by them. At 512 rows the
GEMM's tiles wait on their loads more than on the tensor cores; bf16 R as a wgmma's register
operand instead (the codes through the registers) made batch 1's step 3.61 ms against 2.95-3.04
with the down-projection in the passes and 2.74-2.77 with the halves (benchmarks/RESULTS.md,
nineteenth session).

`kernels.int8_gemm` sends it the calls it measured faster on (`kernels.warp_specialised_suits`).

Same arithmetic as `kernels.int8_gemm` (the module docstring there derives the corrections):
int32 accumulation, then out = s_x s_w (Σ q'c' − z'_x Σ c' − z'_w Σ q' + K z'_x z'_w)
+ s_x·down·Lᵀ (bf16 tensor cores) + b, optionally GELU and the [min, −max] reduction of the
stored output, or a DiT block's gated residual update. Only unpacked int8 weights: packed and
two-level codes are unpacked to int8 first, as `int8_gemm` does at these row counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .split_lora import LOW_SCALE, SplitRight

if TYPE_CHECKING:
    from .kernels import GatedResidual

ACT_SHIFT = gl.constexpr(128)  # activation codes are stored as q − 128 (kernels.ACT_SHIFT)
SPLIT_LOW_SCALE = gl.constexpr(LOW_SCALE)  # the LoRA's R̃ ≈ high + low / SPLIT_LOW_SCALE (split_lora)
LOADER_REGISTERS = gl.constexpr(40)  # the loader only issues TMA copies; the math warpgroups get the rest
# Slots of a math partition's column vectors in shared memory (_prefetch_columns writes them, the
# epilogue reads them): int32 ones, and float32 ones (slot counts are powers of 2: one spare)
COLUMN_SUMS, WEIGHT_ZEROS, INT_COLUMNS = gl.constexpr(0), gl.constexpr(1), gl.constexpr(2)
WEIGHT_SCALES, BIASES, RANGE_SCALES, FLOAT_COLUMNS = gl.constexpr(0), gl.constexpr(1), gl.constexpr(2), gl.constexpr(4)


class TileConfig(NamedTuple):
    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    stages: int = 4  # slots of the ring (shared memory also holds one staging tile per math partition)
    consumers: int = 2  # math partitions taking alternate tiles (2: ping-pong; 1: two warpgroups share each tile)
    group_m: int = 8
    consumer_registers: int = 232


DEFAULT_CONFIG = TileConfig()
# Calls of fewer rows take 64-row tiles (twice the tiles for the multiprocessors; 6 slots fit):
# at 512 rows (batch 1 with CFG), graphed, 1.5x (qkv's shape) and 2.4x (fc2's) the rate of the
# 128-row tiles, which lose there to kernels.int8_gemm (benchmarks/RESULTS.md, eighth session);
# in the model at 4,096 rows (batch 8) sampling took 1.7 % (W4A8) and 2.1 % (W8A8) less time
# with them (eleventh session); at 32,768 rows they were slower (751 against 917 TOPS on qkv's
# shape). Between 4,096 and 32,768 rows nothing was measured.
SMALL_CALL_CONFIG = TileConfig(block_m=64, stages=6)
# With the LoRA's down-projection in the main loop each slot also holds a step's columns of R̃
# (rank 32: 8 KB), and six slots no longer fit beside the staging tiles (246 KB of 227).
SMALL_CALL_DOWN_IN_LOOP_CONFIG = TileConfig(block_m=64, stages=5)
LARGE_TILES_FROM_ROWS = 8192


def tile_config(m: int, down_in_loop: bool = False) -> TileConfig:
    """The tiles of a call of m rows (down_in_loop: whose main loop computes the LoRA's down-projection)."""
    if m >= LARGE_TILES_FROM_ROWS:
        return DEFAULT_CONFIG
    return SMALL_CALL_DOWN_IN_LOOP_CONFIG if down_in_loop else SMALL_CALL_CONFIG


def gate_tiles_fit(tokens: int, config: TileConfig) -> bool:
    """Whether a gated update's samples of `tokens` rows leave every row tile in one sample: the
    epilogue reads one gate row per tile."""
    return tokens % config.block_m == 0


@gluon.jit
def _tile_origin(tile, tiles_m, tiles_n, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
    """First row and column of a tile, GROUP_M row tiles sharing each column tile while it is in L2."""
    group = tile // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_rows = gl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (tile % (GROUP_M * tiles_n)) % group_rows
    pid_n = (tile % (GROUP_M * tiles_n)) // group_rows
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@gluon.jit
def _loader(a_desc, b_desc, right_desc, a_bufs, b_bufs, right_bufs, ready, free, M, N, K: gl.constexpr,
            STAGES: gl.constexpr, GROUP_M: gl.constexpr, DOWN_IN_LOOP: gl.constexpr):
    """Loads the program's tiles, in order, K step by K step, into the ring of STAGES slots (with
    DOWN_IN_LOOP, each step's columns of the LoRA's R̃ too)."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    tiles_m = gl.cdiv(M, BLOCK_M)
    tiles_n = gl.cdiv(N, BLOCK_N)
    step = 0
    for tile in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
        off_m, off_n = _tile_origin(tile, tiles_m, tiles_n, BLOCK_M, BLOCK_N, GROUP_M)
        for k in range(0, K, BLOCK_K):
            slot = step % STAGES
            # a slot's first use waits for parity 1 of a fresh barrier, which passes at once
            mbarrier.wait(free.index(slot), ((step // STAGES) & 1) ^ 1)
            if DOWN_IN_LOOP:
                mbarrier.expect(ready.index(slot), a_desc.block_type.nbytes + b_desc.block_type.nbytes
                                + right_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(right_desc, [0, k], ready.index(slot), right_bufs.index(slot))
            else:
                mbarrier.expect(ready.index(slot), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [off_m, k], ready.index(slot), a_bufs.index(slot))
            tma.async_copy_global_to_shared(b_desc, [off_n, k], ready.index(slot), b_bufs.index(slot))
            step += 1


@gluon.jit
def _load(pointers, mask, other, WHOLE: gl.constexpr):
    """gl.load(pointers, mask, other); WHOLE: the mask is known to be all true, so the load has no
    predicates (it vectorises, and the epilogue keeps no mask bits in its registers)."""
    if WHOLE:
        return gl.load(pointers)
    else:
        return gl.load(pointers, mask=mask, other=other)


@gluon.jit
def _gelu_tanh(y):
    """nn.GELU(approximate="tanh") with the GPU's one-instruction tanh (kernels._gelu_tanh)."""
    u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
    t = gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [u], dtype=gl.float32, is_pure=True, pack=1)
    return 0.5 * y * (1 + t)


@gluon.jit
def _prefetch_columns(columns_i32, columns_f32, left_smem, off_n, N, colsum_ptr, wzero_ptr, wscale_ptr, bias_ptr,
                      bounds_scale_ptr, left_ptr, HAS_BIAS: gl.constexpr, RANK: gl.constexpr,
                      BOUNDS_SCALED: gl.constexpr, WARPS: gl.constexpr, WHOLE_N: gl.constexpr):
    """Starts the copies of a tile's column vectors (column sums, weight zero points and scales,
    bias, the next layer's range scales) and of its rows of L into the partition's shared memory,
    to land during the tile's main loop: loaded in the epilogue, their latency came in waves (the
    registers do not hold them all at once) and outlasted the other partition's main loop."""
    gl.thread_barrier()  # every warp of the partition has read the previous tile's
    BLOCK_N: gl.constexpr = columns_i32.shape[0] // INT_COLUMNS
    vector_layout: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    cols = off_n + gl.arange(0, BLOCK_N, layout=vector_layout)
    _copy(_column(columns_i32, COLUMN_SUMS), colsum_ptr + cols, cols < N, WHOLE_N)
    _copy(_column(columns_i32, WEIGHT_ZEROS), wzero_ptr + cols, cols < N, WHOLE_N)
    _copy(_column(columns_f32, WEIGHT_SCALES), wscale_ptr + cols, cols < N, WHOLE_N)
    if HAS_BIAS:
        _copy(_column(columns_f32, BIASES), bias_ptr + cols, cols < N, WHOLE_N)
    if BOUNDS_SCALED:
        _copy(_column(columns_f32, RANGE_SCALES), bounds_scale_ptr + cols, cols < N, WHOLE_N)
    if RANK > 0:
        left_layout: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [WARPS, 1], [1, 0])
        ranks = gl.arange(0, RANK, layout=gl.SliceLayout(0, left_layout))
        left_cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, left_layout))
        _copy(left_smem, left_ptr + left_cols[:, None] * RANK + ranks[None, :], (left_cols < N)[:, None], WHOLE_N)
    async_copy.commit_group()


@gluon.jit
def _copy(smem, pointers, mask, WHOLE: gl.constexpr):
    """async_copy_global_to_shared, masked unless WHOLE (masked-off elements are zero-filled)."""
    if WHOLE:
        async_copy.async_copy_global_to_shared(smem, pointers)
    else:
        async_copy.async_copy_global_to_shared(smem, pointers, mask=mask)


@gluon.jit
def _column(vectors, slot: gl.constexpr):
    """The column vector in `slot` of a partition's int32 or float32 vectors (COLUMN_SUMS, …)."""
    count: gl.constexpr = INT_COLUMNS if vectors.dtype == gl.int32 else FLOAT_COLUMNS
    BLOCK_N: gl.constexpr = vectors.shape[0] // count
    return vectors.slice(slot * BLOCK_N, BLOCK_N)


@gluon.jit
def _load_rows(off_m, M, qparams_ptr, rowsum_ptr, down_ptr, layout: gl.constexpr, lora_operand: gl.constexpr,
               BLOCK_M: gl.constexpr, PER_ROW: gl.constexpr, SPLITS: gl.constexpr, RANK: gl.constexpr,
               DOWN_IN_LOOP: gl.constexpr, WHOLE_M: gl.constexpr):
    """A tile's row values, loaded into registers before its main loop (which they outlast, for
    the same reason as _prefetch_columns): the activation scales and zero points, the row sums of
    the codes, and for the LoRA, `down` in the register-operand layout of its wgmma (unless the
    main loop computes it: DOWN_IN_LOOP) with the scales of its rows."""
    rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
    if PER_ROW:
        scale_x = _load(qparams_ptr + rows, rows < M, 1.0, WHOLE_M)[:, None]
        zero_x = _load(qparams_ptr + M + rows, rows < M, 0.0, WHOLE_M).to(gl.int32)[:, None] - ACT_SHIFT
    else:
        scale_x = gl.load(qparams_ptr)
        zero_x = gl.load(qparams_ptr + 1).to(gl.int32) - ACT_SHIFT
    rowsum = gl.zeros([BLOCK_M], gl.int32, gl.SliceLayout(1, layout))
    for split in gl.static_range(SPLITS):
        rowsum += _load(rowsum_ptr + split * M + rows, rows < M, 0, WHOLE_M)
    down = 0.0
    down_scale = 0.0
    if RANK > 0:
        ranks = gl.arange(0, RANK, layout=gl.SliceLayout(0, lora_operand))
        down_rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, lora_operand))
        row_ok = (down_rows < M)[:, None]
        down = gl.zeros([BLOCK_M, RANK], gl.float32, lora_operand)
        if not DOWN_IN_LOOP:
            for split in gl.static_range(SPLITS):
                down += _load(down_ptr + (split * M + down_rows[:, None]) * RANK + ranks[None, :], row_ok, 0.0,
                              WHOLE_M)
        if PER_ROW:
            down_scale = _load(qparams_ptr + down_rows, down_rows < M, 1.0, WHOLE_M)[:, None]
        else:
            down_scale = gl.load(qparams_ptr)
    return scale_x, zero_x, rowsum, down, down_scale


@gluon.jit
def _lora_update(y, down, down_scale, left_smem, lora_layout: gl.constexpr):
    """y + s_x·down·Lᵀ for one tile: down (the quantize pass's partial sums, added in a fixed
    order, times s_x) as the register operand of a bf16 wgmma, the tile's rows of L in shared
    memory (_prefetch_columns)."""
    fence_async_shared()  # the rows of L, copied by the generic proxy, are read by the wgmma's
    summed = warpgroup_mma((down * down_scale).to(gl.bfloat16), left_smem.permute((1, 0)),
                           gl.convert_layout(y, lora_layout))
    return gl.convert_layout(summed, y.type.layout)


@gluon.jit
def _epilogue(acc, off_m, off_n, M, N, scale_x, zero_x, rowsum, down, down_scale, columns_i32, columns_f32,
              out_desc, out_smem, bounds_ptr, left_smem, loaded, phase, gate_ptr, stride_gate, GATE_TOKENS, moments_ptr,
              lora_layout: gl.constexpr, K: gl.constexpr, HAS_BIAS: gl.constexpr, RANK: gl.constexpr,
              GELU: gl.constexpr, BOUNDS: gl.constexpr, BOUNDS_SCALED: gl.constexpr, BOUNDS_PER_ROW: gl.constexpr,
              GATED: gl.constexpr, MOMENTS: gl.constexpr, WHOLE_M: gl.constexpr, WHOLE_N: gl.constexpr):
    layout: gl.constexpr = acc.type.layout
    BLOCK_M: gl.constexpr = acc.shape[0]
    BLOCK_N: gl.constexpr = acc.shape[1]
    column_layout: gl.constexpr = gl.SliceLayout(0, layout)
    rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
    cols = off_n + gl.arange(0, BLOCK_N, layout=column_layout)
    row_ok = rows < M
    col_ok = cols < N
    async_copy.wait_group(0)  # this tile's columns (_prefetch_columns) ...
    gl.thread_barrier()  # ... copied by every thread of the partition
    colsum = _column(columns_i32, COLUMN_SUMS).load(column_layout)[None, :]
    zero_w = _column(columns_i32, WEIGHT_ZEROS).load(column_layout)[None, :]
    exact = acc - zero_x * colsum - zero_w * rowsum[:, None] + K * zero_x * zero_w
    y = exact.to(gl.float32) * scale_x * _column(columns_f32, WEIGHT_SCALES).load(column_layout)[None, :]
    if RANK > 0:
        y = _lora_update(y, down, down_scale, left_smem, lora_layout)
    if HAS_BIAS:
        y += _column(columns_f32, BIASES).load(column_layout)[None, :]
    if GELU:
        y = _gelu_tanh(y)
    if GATED:
        # residual + gate ⊙ y (kernels._gated_residual): the residual tile, prefetched into
        # out_smem (_prefetch_residual); the tile's rows are in one sample (GATE_TOKENS is a
        # multiple of BLOCK_M), whose gate is one row
        gate = _load(gate_ptr + (off_m // GATE_TOKENS) * stride_gate + cols, col_ok, 0.0, WHOLE_N)
        mbarrier.wait(loaded, phase)
        y = out_smem.load(layout).to(gl.float32) + gate.to(gl.float32)[None, :] * y
        gl.thread_barrier()  # every warp has read the residual before out_smem is overwritten
    out = y.to(out_desc.dtype)
    tma.store_wait(0)  # this partition's previous tile has left out_smem
    out_smem.store(out)
    fence_async_shared()
    tma.async_copy_shared_to_global(out_desc, [off_m, off_n], out_smem)
    if MOMENTS:
        _row_moments(out, rows, row_ok, col_ok, off_n, M, N, moments_ptr, WHOLE_N)
    if BOUNDS:
        v = out.to(gl.float32)  # the next layer's range, as kernels.int8_gemm reduces it
        if BOUNDS_SCALED:
            v = v * _column(columns_f32, RANGE_SCALES).load(column_layout)[None, :]
        if WHOLE_M and WHOLE_N:
            low = gl.min(v, axis=1)
            high = gl.max(v, axis=1)
        else:
            in_bounds = row_ok[:, None] & col_ok[None, :]
            low = gl.min(gl.where(in_bounds, v, float("inf")), axis=1)
            high = gl.max(gl.where(in_bounds, v, float("-inf")), axis=1)
        # relaxed: only a later kernel reads the bounds (acq_rel, the default, fences every atomic)
        if BOUNDS_PER_ROW:
            gl.atomic_min(bounds_ptr + rows, low, mask=row_ok, sem="relaxed")
            gl.atomic_min(bounds_ptr + M + rows, -high, mask=row_ok, sem="relaxed")
        else:
            gl.atomic_min(bounds_ptr, gl.min(low, axis=0), sem="relaxed")
            gl.atomic_min(bounds_ptr + 1, -gl.max(high, axis=0), sem="relaxed")


@gluon.jit
def _row_moments(out, rows, row_ok, col_ok, off_n, M, N, moments_ptr, WHOLE_N: gl.constexpr):
    """kernels._row_moments for a tile one chunk wide (BLOCK_N = kernels.MOMENT_COLUMNS): each
    row's mean and sum of squared deviations of the stored values, into chunk off_n // BLOCK_N."""
    BLOCK_N: gl.constexpr = out.shape[1]
    v = out.to(gl.float32)
    if WHOLE_N:
        mean = gl.sum(v, axis=1) / BLOCK_N
        centered = v - mean[:, None]
    else:
        v = gl.where(col_ok[None, :], v, 0.0)
        mean = gl.sum(v, axis=1) / gl.minimum(N - off_n, BLOCK_N).to(gl.float32)
        centered = gl.where(col_ok[None, :], v - mean[:, None], 0.0)
    chunks = gl.cdiv(N, BLOCK_N)
    offsets = (off_n // BLOCK_N) * M + rows
    gl.store(moments_ptr + offsets, mean, mask=row_ok)
    gl.store(moments_ptr + chunks * M + offsets, gl.sum(centered * centered, axis=1), mask=row_ok)


@gluon.jit
def _prefetch_residual(residual_desc, out_smem, loaded, off_m, off_n):
    """Starts the TMA load of a tile's residual into the partition's staging tile, once the
    previous tile's output has left it, to land during the tile's main loop (a tile of pointers
    would not fit in the registers, nor another 32 KB tile beside the ring)."""
    tma.store_wait(0)
    mbarrier.expect(loaded, residual_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(residual_desc, [off_m, off_n], loaded, out_smem)


@gluon.jit
def _split_down(acc_high, acc_low, off_m, M, qparams_ptr, right_sums_ptr, PER_ROW: gl.constexpr,
                WHOLE_M: gl.constexpr):
    """(q − z)·R̃ᵀ of a tile from the codes' products with R̃'s halves (as kernels._lora_down): per
    half the exact integer codes·halfᵀ − (z − 128)·Σhalf (codes − (z − 128) = q − z), then high +
    low / LOW_SCALE in float32."""
    layout: gl.constexpr = acc_high.type.layout
    HALF: gl.constexpr = acc_high.shape[1]
    ranks = gl.arange(0, HALF, layout=gl.SliceLayout(0, layout))
    if PER_ROW:
        rows = off_m + gl.arange(0, acc_high.shape[0], layout=gl.SliceLayout(1, layout))
        zero = (_load(qparams_ptr + M + rows, rows < M, 0.0, WHOLE_M) - ACT_SHIFT).to(gl.int32)[:, None]
    else:
        zero = (gl.load(qparams_ptr + 1) - ACT_SHIFT).to(gl.int32)
    high = (acc_high - zero * gl.load(right_sums_ptr + ranks)[None, :]).to(gl.float32)
    low = (acc_low - zero * gl.load(right_sums_ptr + HALF + ranks)[None, :]).to(gl.float32)
    return high + low * (1.0 / SPLIT_LOW_SCALE)


@gluon.jit
def _math(a_bufs, b_bufs, right_bufs, right_sums_ptr, ready, free, turn, left_smem, columns_i32,
          columns_f32, rowsum_ptr, colsum_ptr, wzero_ptr, wscale_ptr, bias_ptr, qparams_ptr, down_ptr, left_ptr,
          out_desc, out_smem, bounds_ptr, bounds_scale_ptr, residual_desc, loaded, gate_ptr, moments_ptr, M, N,
          stride_gate, GATE_TOKENS,
          K: gl.constexpr, HAS_BIAS: gl.constexpr, RANK: gl.constexpr, GELU: gl.constexpr, BOUNDS: gl.constexpr,
          BOUNDS_SCALED: gl.constexpr, PER_ROW: gl.constexpr, BOUNDS_PER_ROW: gl.constexpr, SPLITS: gl.constexpr,
          GATED: gl.constexpr, MOMENTS: gl.constexpr, DOWN_IN_LOOP: gl.constexpr, STAGES: gl.constexpr,
          GROUP_M: gl.constexpr, CONSUMERS: gl.constexpr, FIRST: gl.constexpr, WARPS: gl.constexpr,
          INSTR_N: gl.constexpr, WHOLE_M: gl.constexpr, WHOLE_N: gl.constexpr):
    """Tiles FIRST, FIRST + CONSUMERS, … of this program: main loop, then epilogue. left_smem,
    columns_i32, columns_f32, out_smem and loaded hold every partition's: this one takes part FIRST.
    With DOWN_IN_LOOP the main loop also computes the LoRA's down-projection: two int8 wgmmas a
    step, finished by _split_down."""
    BLOCK_M: gl.constexpr = a_bufs.shape[1]
    BLOCK_K: gl.constexpr = a_bufs.shape[2]
    BLOCK_N: gl.constexpr = b_bufs.shape[1]
    left_smem = left_smem.index(FIRST)
    columns_i32 = columns_i32.slice(FIRST * INT_COLUMNS * BLOCK_N, INT_COLUMNS * BLOCK_N)
    columns_f32 = columns_f32.slice(FIRST * FLOAT_COLUMNS * BLOCK_N, FLOAT_COLUMNS * BLOCK_N)
    out_smem = out_smem.index(FIRST)
    loaded = loaded.index(FIRST)
    K_STEPS: gl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                     instr_shape=[16, INSTR_N, 32])
    lora_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                          instr_shape=[16, INSTR_N, 16])
    # down is loaded straight into the register-operand layout of the LoRA's wgmma
    lora_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=lora_layout, k_width=2)
    # DOWN_IN_LOOP: the codes times R̃'s two int8 halves, each rank columns
    HALF: gl.constexpr = right_bufs.shape[1] // 2
    split_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                           instr_shape=[16, HALF, 32])
    tiles_m = gl.cdiv(M, BLOCK_M)
    tiles_n = gl.cdiv(N, BLOCK_N)
    programs = gl.num_programs(0)
    step = FIRST * K_STEPS  # the ring's step of this tile's first K step (the loader's count)
    turns = 0
    for tile in range(gl.program_id(0) + FIRST * programs, tiles_m * tiles_n, CONSUMERS * programs):
        off_m, off_n = _tile_origin(tile, tiles_m, tiles_n, BLOCK_M, BLOCK_N, GROUP_M)
        if GATED:
            _prefetch_residual(residual_desc, out_smem, loaded, off_m, off_n)
        _prefetch_columns(columns_i32, columns_f32, left_smem, off_n, N, colsum_ptr, wzero_ptr, wscale_ptr, bias_ptr,
                          bounds_scale_ptr, left_ptr, HAS_BIAS, RANK, BOUNDS_SCALED, WARPS, WHOLE_N)
        scale_x, zero_x, rowsum, down, down_scale = _load_rows(off_m, M, qparams_ptr, rowsum_ptr, down_ptr, layout,
                                                               lora_operand, BLOCK_M, PER_ROW, SPLITS, RANK,
                                                               DOWN_IN_LOOP, WHOLE_M)
        if DOWN_IN_LOOP:
            acc_high = gl.zeros([BLOCK_M, HALF], gl.int32, split_layout)
            acc_low = gl.zeros([BLOCK_M, HALF], gl.int32, split_layout)
        if CONSUMERS == 2:
            # Main loops take turns (partition 0 first: parity 1 of a fresh barrier passes at
            # once). Besides keeping the tensor cores for one main loop at a time, this keeps
            # the ring's parity waits unambiguous: a partition waits on a slot only once every
            # earlier step of the ring has been waited on.
            mbarrier.wait(turn.index(FIRST), (turns & 1) ^ (1 - FIRST))
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout)
        for kk in range(K_STEPS):
            slot = step % STAGES
            mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot).permute((1, 0)), acc, is_async=True)
            if DOWN_IN_LOOP:
                right_slot = right_bufs.index(slot)
                acc_high = warpgroup_mma(a_bufs.index(slot), right_slot.slice(0, HALF).permute((1, 0)), acc_high,
                                         is_async=True)
                acc_low = warpgroup_mma(a_bufs.index(slot), right_slot.slice(HALF, HALF).permute((1, 0)), acc_low,
                                        is_async=True)
                # this step's two down-projection wgmmas in flight: the previous step's are done with their slot
                acc, acc_high, acc_low = warpgroup_mma_wait(num_outstanding=2, deps=(acc, acc_high, acc_low))
            else:
                # one wgmma in flight: the previous step's has finished reading its slot
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            mbarrier.arrive(free.index((step + STAGES - 1) % STAGES), pred=kk > 0)
            step += 1
        if CONSUMERS == 2:
            mbarrier.arrive(turn.index(1 - FIRST))  # every step of this tile is issued: the other's turn
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(free.index((step + STAGES - 1) % STAGES))
        if DOWN_IN_LOOP:
            acc_high, acc_low = warpgroup_mma_wait(num_outstanding=0, deps=(acc_high, acc_low))
            down = gl.convert_layout(_split_down(acc_high, acc_low, off_m, M, qparams_ptr, right_sums_ptr, PER_ROW,
                                                 WHOLE_M), lora_operand)
        step += (CONSUMERS - 1) * K_STEPS  # the other partition's tile
        turns += 1
        _epilogue(acc, off_m, off_n, M, N, scale_x, zero_x, rowsum, down, down_scale, columns_i32, columns_f32,
                  out_desc, out_smem, bounds_ptr, left_smem, loaded, (turns + 1) & 1, gate_ptr, stride_gate,
                  GATE_TOKENS, moments_ptr, lora_layout, K, HAS_BIAS, RANK, GELU, BOUNDS, BOUNDS_SCALED, BOUNDS_PER_ROW,
                  GATED, MOMENTS, WHOLE_M, WHOLE_N)
    tma.store_wait(0)


@gluon.jit
def _int8_gemm_ws_kernel(
    a_desc, b_desc, right_desc, right_sums_ptr, rowsum_ptr, colsum_ptr, wzero_ptr, wscale_ptr,
    bias_ptr, qparams_ptr, down_ptr, left_ptr,
    out_desc, bounds_ptr, bounds_scale_ptr, residual_desc, gate_ptr, moments_ptr, M, N, stride_gate, GATE_TOKENS,
    K: gl.constexpr, HAS_BIAS: gl.constexpr, RANK: gl.constexpr, GELU: gl.constexpr, BOUNDS: gl.constexpr,
    BOUNDS_SCALED: gl.constexpr, PER_ROW: gl.constexpr, BOUNDS_PER_ROW: gl.constexpr, SPLITS: gl.constexpr,
    GATED: gl.constexpr, MOMENTS: gl.constexpr, DOWN_IN_LOOP: gl.constexpr,
    STAGES: gl.constexpr, GROUP_M: gl.constexpr, CONSUMERS: gl.constexpr, INSTR_N: gl.constexpr,
    LEFT_RANK: gl.constexpr, CONSUMER_REGISTERS: gl.constexpr, WHOLE_M: gl.constexpr, WHOLE_N: gl.constexpr,
    num_warps: gl.constexpr,
):
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.int8, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    if DOWN_IN_LOOP:  # each step's columns of R̃'s halves (2·rank, K)
        right_bufs = gl.allocate_shared_memory(right_desc.dtype, [STAGES] + right_desc.block_type.shape,
                                               right_desc.layout)
    else:  # never read
        right_bufs = a_bufs
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(free.index(i), count=1)
    loaded = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # a residual tile, per partition
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
        mbarrier.init(loaded.index(i), count=1)
    left_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, LEFT_RANK], gl.bfloat16)
    left_smem = gl.allocate_shared_memory(gl.bfloat16, [CONSUMERS, BLOCK_N, LEFT_RANK], left_layout)
    out_smem = gl.allocate_shared_memory(out_desc.dtype, [CONSUMERS] + out_desc.block_type.shape, out_desc.layout)
    # each partition's column vectors (_prefetch_columns)
    vector_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    columns_i32 = gl.allocate_shared_memory(gl.int32, [CONSUMERS * INT_COLUMNS * BLOCK_N], vector_layout)
    columns_f32 = gl.allocate_shared_memory(gl.float32, [CONSUMERS * FLOAT_COLUMNS * BLOCK_N], vector_layout)
    # (gluon.jit code builds no lists by comprehension, and a shared argument tuple extended by
    # `+ (index,)` loses its constexprs: the partitions are spelled out, differing in FIRST alone)
    if CONSUMERS == 2:
        gl.warp_specialize([
            (_math, (a_bufs, b_bufs, right_bufs, right_sums_ptr, ready, free, turn,
                     left_smem, columns_i32, columns_f32, rowsum_ptr, colsum_ptr, wzero_ptr, wscale_ptr, bias_ptr,
                     qparams_ptr, down_ptr, left_ptr,
                     out_desc, out_smem, bounds_ptr, bounds_scale_ptr, residual_desc, loaded, gate_ptr, moments_ptr,
                     M, N, stride_gate, GATE_TOKENS, K, HAS_BIAS, RANK, GELU, BOUNDS, BOUNDS_SCALED, PER_ROW,
                     BOUNDS_PER_ROW, SPLITS, GATED, MOMENTS, DOWN_IN_LOOP, STAGES,
                     GROUP_M, CONSUMERS, 0, num_warps, INSTR_N, WHOLE_M, WHOLE_N)),
            (_math, (a_bufs, b_bufs, right_bufs, right_sums_ptr, ready, free, turn,
                     left_smem, columns_i32, columns_f32, rowsum_ptr, colsum_ptr, wzero_ptr, wscale_ptr, bias_ptr,
                     qparams_ptr, down_ptr, left_ptr,
                     out_desc, out_smem, bounds_ptr, bounds_scale_ptr, residual_desc, loaded, gate_ptr, moments_ptr,
                     M, N, stride_gate, GATE_TOKENS, K, HAS_BIAS, RANK, GELU, BOUNDS, BOUNDS_SCALED, PER_ROW,
                     BOUNDS_PER_ROW, SPLITS, GATED, MOMENTS, DOWN_IN_LOOP, STAGES,
                     GROUP_M, CONSUMERS, 1, num_warps, INSTR_N, WHOLE_M, WHOLE_N)),
            (_loader, (a_desc, b_desc, right_desc, a_bufs, b_bufs, right_bufs, ready, free, M, N, K, STAGES,
                       GROUP_M, DOWN_IN_LOOP)),
        ], [num_warps, 1], [CONSUMER_REGISTERS, LOADER_REGISTERS])
    else:
        gl.warp_specialize([
            (_math, (a_bufs, b_bufs, right_bufs, right_sums_ptr, ready, free, turn,
                     left_smem, columns_i32, columns_f32, rowsum_ptr, colsum_ptr, wzero_ptr, wscale_ptr, bias_ptr,
                     qparams_ptr, down_ptr, left_ptr,
                     out_desc, out_smem, bounds_ptr, bounds_scale_ptr, residual_desc, loaded, gate_ptr, moments_ptr,
                     M, N, stride_gate, GATE_TOKENS, K, HAS_BIAS, RANK, GELU, BOUNDS, BOUNDS_SCALED, PER_ROW,
                     BOUNDS_PER_ROW, SPLITS, GATED, MOMENTS, DOWN_IN_LOOP, STAGES,
                     GROUP_M, CONSUMERS, 0, num_warps, INSTR_N, WHOLE_M, WHOLE_N)),
            (_loader, (a_desc, b_desc, right_desc, a_bufs, b_bufs, right_bufs, ready, free, M, N, K, STAGES,
                       GROUP_M, DOWN_IN_LOOP)),
        ], [1], [LOADER_REGISTERS])


_GLUON_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}


def math_warps(config: TileConfig) -> int:
    """Warps of a math partition: one warpgroup each in ping-pong, else a warpgroup per 64 tile rows."""
    return 4 if config.consumers == 2 else 4 * (config.block_m // 64)


def wgmma_instr_n(block_n: int) -> int:
    """The widest int8 wgmma N (a multiple of 16 up to 224 for 8-bit types) that divides the tile."""
    return next(n for n in range(224, 0, -16) if block_n % n == 0)


def int8_gemm_ws(codes: torch.Tensor, rowsum: torch.Tensor, qparams: torch.Tensor, weight: torch.Tensor,
                 colsum: torch.Tensor, zero_w: torch.Tensor, scale_w: torch.Tensor, bias: torch.Tensor | None,
                 down: torch.Tensor | None, left: torch.Tensor | None, out_dtype: torch.dtype, gelu: bool = False,
                 bounds: torch.Tensor | None = None, bounds_scale: torch.Tensor | None = None,
                 gated: GatedResidual | None = None, config: TileConfig | None = None,
                 right: SplitRight | None = None) -> torch.Tensor:
    """`kernels.int8_gemm` for int8 (N, K) weights on Hopper (same arguments, no packed codes);
    `config`: the tiles (None: tile_config's for the call's rows). `right`: the LoRA's R̃
    (split_lora), for a main loop that computes the down-projection (q − z)·R̃ᵀ from the codes
    itself, where `down` is None (the quantize pass then leaves it out)."""
    from .kernels import MOMENT_COLUMNS, check_row_moments, multiprocessors, per_row

    m, k = codes.shape
    down_in_loop = right is not None
    if down_in_loop and (down is not None or left is None or right.codes.shape != (2 * left.shape[1], k)
                         or right.codes.dtype != torch.int8):
        raise ValueError("a down-projection in the main loop takes R̃'s int8 halves (2·rank, K) beside L, "
                         "and no `down`")
    config = tile_config(m, down_in_loop) if config is None else config
    n = weight.shape[0]
    warps = math_warps(config)
    a_desc = TensorDescriptor.from_tensor(codes, [config.block_m, config.block_k],
                                          gl.NVMMASharedLayout.get_default_for([config.block_m, config.block_k], gl.int8))
    b_desc = TensorDescriptor.from_tensor(weight, [config.block_n, config.block_k],
                                          gl.NVMMASharedLayout.get_default_for([config.block_n, config.block_k], gl.int8))
    right_desc = a_desc if right is None else TensorDescriptor.from_tensor(  # a_desc: never read
        right.codes, [right.codes.shape[0], config.block_k],
        gl.NVMMASharedLayout.get_default_for([right.codes.shape[0], config.block_k], gl.int8))
    out = torch.empty(m, n, dtype=out_dtype, device=codes.device)
    out_desc = TensorDescriptor.from_tensor(out, [config.block_m, config.block_n], gl.NVMMASharedLayout.get_default_for(
        [config.block_m, config.block_n], _GLUON_DTYPES[out_dtype]))
    rank = 0 if left is None else left.shape[1]
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    placeholder = scale_w  # any float32 tensor, for pointers a kernel variant never reads
    moments = None if gated is None else gated.moments
    if moments is not None and config.block_n != MOMENT_COLUMNS:
        raise ValueError(f"row moments need {MOMENT_COLUMNS}-column tiles, not {config.block_n}")
    check_row_moments(moments, m, n)
    if gated is not None:  # the residual's tiles as the output's
        if not gate_tiles_fit(gated.tokens, config):
            raise ValueError(f"a gated update needs whole row tiles per sample: {gated.tokens} tokens per sample, "
                             f"{config.block_m}-row tiles")
        residual_desc = TensorDescriptor.from_tensor(gated.residual, out_desc.block_shape, out_desc.layout)
        gate, tokens = gated.gate, gated.tokens
    else:
        residual_desc, gate, tokens = out_desc, placeholder, config.block_m
    _int8_gemm_ws_kernel[(min(tiles, multiprocessors(codes.device)),)](
        a_desc, b_desc, right_desc, rowsum if right is None else right.sums, rowsum, colsum, zero_w, scale_w,
        placeholder if bias is None else bias, qparams,
        placeholder if down is None else down, placeholder if left is None else left, out_desc,
        placeholder if bounds is None else bounds, placeholder if bounds_scale is None else bounds_scale,
        residual_desc, gate, placeholder if moments is None else moments, m, n, gate.stride(0), tokens,
        K=k, HAS_BIAS=bias is not None, RANK=rank, GELU=gelu, BOUNDS=bounds is not None,
        BOUNDS_SCALED=bounds_scale is not None, PER_ROW=per_row(qparams),
        BOUNDS_PER_ROW=bounds is not None and per_row(bounds), SPLITS=rowsum.shape[0], GATED=gated is not None,
        MOMENTS=moments is not None, DOWN_IN_LOOP=down_in_loop, STAGES=config.stages, GROUP_M=config.group_m,
        CONSUMERS=config.consumers, INSTR_N=wgmma_instr_n(config.block_n), LEFT_RANK=max(rank, 16),
        CONSUMER_REGISTERS=config.consumer_registers,
        WHOLE_M=m % config.block_m == 0, WHOLE_N=n % config.block_n == 0, num_warps=warps,
    )
    return out
