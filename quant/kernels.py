"""Triton kernels of the integer inference path: a quantize pass (also one that takes per-token
ranges itself, with or without DiT's LayerNorm + modulation, and either can unpack the layer's W4
weights beside its rows), an int8 GEMM, the W4 unpack and the 8-bit adaLN's weight-only GEMM.

A DiTAS layer computes  y = Q_a(x ⊙ smooth_inv) · (Ŵ + L·R)ᵀ + b  with
    x̂ = s_x · (q − z_x)            (activation codes q in [0, 2^a − 1], a ≤ 8; one (s_x, z_x)
                                    per tensor, or per row with per-token ranges)
    Ŵ = s_w[n] · (c − z_w[n])       (per-output-channel weight codes c in [0, 2^b − 1]).
Both sides are stored shifted to signed int8 (q' = q − 128, c' = c − 128, or c − 8 for packed
codes of b ≤ 4 bits), so that with z' = z − shift
    Σ_k (q − z_x)(c − z_w) = Σ_k q'c' − z'_w Σ_k q' − z'_x Σ_k c' + K z'_x z'_w,
an int8 tensor-core GEMM plus per-row (Σ_k q') and per-column (Σ_k c') corrections, all in int32.

`quantize_rows` reads x once: it applies fc2's on-the-fly smoothing, writes the int8 codes and
their row sums, and computes the LoRA down-projection (q − z_x)·R̃ᵀ from the same tile (the
reference feeds the quantized activation to the LoRA branch too), as int8 products with R̃'s two
halves (quant/split_lora.py: the kernels' L·R is (L·diag(s))·R̃). With few rows it also splits
K over programs (each writes partial row sums and down-projections, which the GEMM epilogue adds
up in a fixed order: deterministic, unlike atomics), so that a small call still fills the GPU.
`int8_gemm` runs the GEMM and, in its epilogue, the zero-point corrections, both scales, the LoRA
up-projection and the bias (and optionally GELU with the next layer's range, or a DiT block's
gated residual update). The ranges (`qparams`, [scale, zero] of shape (2, 1), or (2, M) per
row) are computed beforehand by torch, where torch.compile fuses them into the producer of x; they
are passed as a device tensor, so nothing synchronises with the host.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .primitives import EPS, largest_code, row_first_range
from .split_lora import LOW_SCALE, SplitRight

# Kernels read module globals only as tl.constexpr objects.
ACT_SHIFT = tl.constexpr(128)  # activation codes are stored as q − 128 (int8)
SPLIT_LOW_SCALE = tl.constexpr(LOW_SCALE)  # the LoRA's R̃ ≈ high + low / SPLIT_LOW_SCALE (split_lora)
PACKED_SHIFT = tl.constexpr(8)  # packed (≤ 4-bit) weight codes are used as c − 8
BYTE_SHIFT = 128  # unpacked weight codes are stored as c − 128
SCALE_FLOOR = tl.constexpr(EPS)  # activation_qparams's smallest scale
ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 · 2^23: (v + M) − M rounds float32 |v| < 2^22 half to even
LORA_MULTIPLE = 16  # tl.dot needs every dimension ≥ 16: the LoRA rank is zero-padded to a multiple
# Packed ≤ 4-bit weights, "split" layout: K is cut into spans of PACK_SPAN; byte j of a span holds
# k = j in its low nibble and k = j + PACK_SPAN/2 in its high nibble, so a span unpacks into two
# ready-made [N, PACK_SPAN/2] operands (two dots) with no register shuffle. K is padded to whole
# spans with code 8 (0 after the shift), which adds nothing to the products.
PACK_SPAN = 128
HALF_SPAN = tl.constexpr(PACK_SPAN // 2)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# The LoRA products run on bf16 tensor cores; Triton's CPU interpreter (numpy) has no bf16, so
# under it they run in float32 (tests check the kernels' logic there, not bf16 rounding).
LORA_TORCH_DTYPE = torch.float32 if INTERPRETED else torch.bfloat16
LORA_DTYPE = tl.constexpr(tl.float32 if INTERPRETED else tl.bfloat16)
# GELU's tanh by the GPU's one-instruction approximation (max relative error 2^-11, below the
# bf16 rounding of the output); the interpreter has no inline PTX and uses exp instead.
FAST_TANH = tl.constexpr(not INTERPRETED)
# Packed weights of a layer called with at least this many rows are unpacked to int8 once per
# call and multiplied by the int8 GEMM: unpacking inside the GEMM's main loop cost more at every
# DiT-XL/2 batch measured, down to 512 rows (batch 1 with CFG; benchmarks/RESULTS.md). Fewer
# rows: the GEMM reads the packed bytes itself.
UNPACK_FROM_ROWS = 256
# Calls of fewer rows unpack in programs beside their quantize pass's row blocks (PackedWeight):
# at 512 rows the passes with the unpack took 0.95 ms per DiT-XL/2 forward, against 1.16 for the
# passes and the unpack kernel (two calls). Larger calls (and direct int8_gemm calls) unpack by a
# kernel of its own: in the model at batch 8 the norm pass with the unpack beside took 36 µs a
# call (19-20 alone, with the weights in L2), its programs sharing the slots that the pass's
# 255-register row blocks leave (benchmarks/RESULTS.md).
UNPACK_BESIDE_PASS_BELOW_ROWS = 4096
# Calls of at least this many rows on a Hopper GPU go to the persistent, warp-specialised Gluon
# GEMM (quant/hopper_gemm.py), which measured faster than the GEMM here at all four DiT-XL/2
# shapes at 4,096 and 32,768 rows, timed as the samplers run them (CUDA graphs;
# benchmarks/RESULTS.md), and at 512 rows on its 64-row tiles (hopper_gemm.tile_config) 1.13x
# (qkv's shape) and 1.18x (fc2's), proj's equal. fc1's GELU + fc2's range in the epilogue too:
# with the epilogue's inputs prefetched (twelfth session), graphed, at 4,096 rows GELU + range per
# tensor 657 against 453 TOPS, per row (qkv's shape) 664 against 412, GELU alone 695 against 532
# (thirteenth session); at 32,768 rows 864 against 573 per tensor; at 512 rows fc1 took 13.7
# against 17.9 µs a call in the model, and sampling at batch 1 3.06-3.07 against 3.18-3.26
# ms/step (W4A8), 2.92 against 3.07 (W8A8; seventeenth session; before the prefetch GELU was
# 0.9x there). Not there: layers narrower than WARP_SPECIALISED_MIN_SIDE in N or K (the demo's
# 256-wide ones: not measured there, and the Triton GEMM is what the demo's FD was checked with),
# float32 output (its staging tiles do not fit beside the slots) and packed weights unpacked in
# the main loop.
WARP_SPECIALISED_FROM_ROWS = 512
WARP_SPECIALISED_MIN_SIDE = 1152  # DiT-XL/2's narrowest layer (proj)
# The quantize pass splits K into chunks of this many columns over programs when its rows alone
# give fewer than QUANTIZE_PROGRAMS_PER_SM programs per multiprocessor.
SPLIT_K_CHUNK = 32 if INTERPRETED else 128
# A gated GEMM's epilogue can write each row's moments (mean, sum of squared deviations) of its
# stored output per chunk of this many columns (GatedResidual.moments): the Gluon GEMM's tile
# width, one chunk per tile (the interpreter's tiles are 16 wide). The next norm pass merges them
# instead of reading its rows once more for them.
MOMENT_COLUMNS = 16 if INTERPRETED else 128
MOMENT_WIDTH = tl.constexpr(MOMENT_COLUMNS)
QUANTIZE_PROGRAMS_PER_SM = 2


def _configs(options: list[dict], interpreted: dict) -> list[triton.Config]:
    """Autotuning candidates; one small tile under the CPU interpreter (tests), where timing is moot."""
    chosen = [interpreted] if INTERPRETED else options
    return [triton.Config({k: v for k, v in o.items() if k.startswith("BLOCK") or k == "GROUP_M"},
                          num_warps=o.get("warps", 4), num_stages=o.get("stages", 3)) for o in chosen]


# Row passes (quantize, LayerNorm + modulation + quantize): their loops wait on each tile's load,
# so besides wide row blocks, small ones (many programs per multiprocessor hide that latency; the
# LoRA's tl.dot pads M < 16 on the tensor cores) and wide tiles (fewer serial steps).
QUANTIZE_CONFIGS = _configs(
    [dict(BLOCK_M=4, BLOCK_K=256, warps=4), dict(BLOCK_M=8, BLOCK_K=128, warps=4),
     dict(BLOCK_M=16, BLOCK_K=128, warps=4), dict(BLOCK_M=32, BLOCK_K=128, warps=4),
     dict(BLOCK_M=64, BLOCK_K=128, warps=4)],
    dict(BLOCK_M=16, BLOCK_K=32),
)


def _whole_chunk_tiles(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The quantize pass's configs whose BLOCK_K tiles cover a program's K chunk exactly: a wider
    tile would also write the next program's columns and count them twice in its partial sums."""
    return [c for c in configs if kwargs["K_PER_SPLIT"] % c.kwargs["BLOCK_K"] == 0]


def _whole_moment_chunks(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The GEMM's configs whose column tiles hold whole MOMENT_COLUMNS chunks, where it writes row moments."""
    return [c for c in configs if not kwargs["MOMENTS"] or c.kwargs["BLOCK_N"] % MOMENT_COLUMNS == 0]


GEMM_CONFIGS = _configs(
    [dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, warps=8, stages=3),
     dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, warps=8, stages=3),
     dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, warps=8, stages=4),
     dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, warps=4, stages=4),
     # small calls (batch 1 and 8): more tiles for the multiprocessors
     dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, warps=4, stages=4),
     dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, warps=4, stages=4)],
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2),
)
UNPACK_ROWS = tl.constexpr(64)  # weight rows per program of the W4 unpack

RANGED_QUANTIZE_CONFIGS = _configs(
    [dict(BLOCK_M=2, BLOCK_K=256, warps=2), dict(BLOCK_M=4, BLOCK_K=256, warps=4),
     dict(BLOCK_M=8, BLOCK_K=128, warps=4), dict(BLOCK_M=16, BLOCK_K=128, warps=4),
     dict(BLOCK_M=16, BLOCK_K=512, warps=8), dict(BLOCK_M=32, BLOCK_K=128, warps=4)],
    dict(BLOCK_M=16, BLOCK_K=32),
)

# The LoRA down-projection of a ranged pass's codes in a kernel of its own (lora_down): row blocks
# as large as an MMA's, so that R is read once per 64 or 128 rows rather than per pass row block.
LORA_DOWN_CONFIGS = _configs(
    [dict(BLOCK_M=64, BLOCK_K=128, warps=4, stages=3), dict(BLOCK_M=128, BLOCK_K=128, warps=4, stages=3),
     dict(BLOCK_M=128, BLOCK_K=64, warps=4, stages=4), dict(BLOCK_M=128, BLOCK_K=128, warps=8, stages=3)],
    dict(BLOCK_M=16, BLOCK_K=32),
)
# Ranged passes of at least this many rows leave the LoRA down-projection to lora_down (None:
# none): in the pass every program of 8–16 rows reads all of R (32 × 1,152 bf16, 74 KB; 302 MB of
# L2 reads a call at 32,768 rows against x's 75 MB). At 32,768 rows (batch 64), graphed, the norm
# pass took 128 µs with its LoRA, 98 without it, 118 with lora_down after it; in the model there
# sampling took 52.47 against 53.38 ms/step (W4A8), 52.50 against 53.92 (W8A8); at 4,096 rows
# (batch 8) 9.51 against 9.09 (benchmarks/RESULTS.md, fourteenth session). Between the two
# nothing was measured.
LORA_DOWN_APART_FROM_ROWS: int | None = 32768
# Calls of fewer rows that go to the Gluon GEMM compute the LoRA's down-projection in its main loop,
# with two int8 wgmmas of the codes already in its ring against R̃'s halves (quant/hopper_gemm.py),
# and their quantize pass leaves it out (None: never). At batch 1 (512 rows) W4A8 sampling took
# 2.74-2.77 ms/step against 2.95-3.04 with it in the passes (bf16 2.81); at batch 8 (4,096 rows,
# where the tensor cores bound the GEMM) 9.18-9.21 against 8.71 (benchmarks/RESULTS.md, nineteenth
# session). Between the two (twentieth session, one process): 1,024 rows 3.71-3.73 against 3.80-3.84,
# 2,048 rows 5.49 against 5.39-5.41, so the crossover lies between them.
LORA_DOWN_IN_GEMM_BELOW_ROWS: int | None = 2048

WEIGHT_ONLY_CONFIGS = _configs(
    [dict(BLOCK_N=32, BLOCK_K=128, warps=4, stages=4), dict(BLOCK_N=64, BLOCK_K=128, warps=4, stages=4),
     dict(BLOCK_N=64, BLOCK_K=256, warps=4, stages=3), dict(BLOCK_N=128, BLOCK_K=128, warps=8, stages=3)],
    dict(BLOCK_N=16, BLOCK_K=32),
)
WEIGHT_ONLY_MAX_BLOCK_M = 128  # rows per program of the weight-only kernel (adaLN: 2 × batch rows)


@triton.jit
def _row_qparams(qparams_ptr, rows, row_ok, M, PER_ROW: tl.constexpr):
    """(scale, zero) of the activation codes: scalars, or [BLOCK_M, 1] columns with per-row
    ranges. qparams is (2, 1) or (2, M) row-major: scales first, then zero points."""
    if PER_ROW:
        scale = tl.load(qparams_ptr + rows, mask=row_ok, other=1.0)[:, None]
        zero = tl.load(qparams_ptr + M + rows, mask=row_ok, other=0.0)[:, None]
    else:
        scale = tl.load(qparams_ptr)
        zero = tl.load(qparams_ptr + 1)
    return scale, zero


@triton.autotune(configs=QUANTIZE_CONFIGS,
                 key=["M", "K", "K_PER_SPLIT", "RANK", "HAS_SMOOTH", "PER_ROW", "UNPACK", "FROM_BOUNDS", "INIT_BOUNDS"],
                 prune_configs_by=dict(early_config_prune=_whole_chunk_tiles))
@triton.jit
def _quantize_rows_kernel(
    x_ptr, smooth_ptr, qparams_ptr, right_ptr, right_sums_ptr, codes_ptr, rowsum_ptr, down_ptr, packed_ptr,
    unpacked_ptr, bounds_ptr, init_bounds_ptr, M, stride_xm, UNPACK_N,
    K: tl.constexpr, K_PER_SPLIT: tl.constexpr, QMAX: tl.constexpr, HAS_SMOOTH: tl.constexpr, RANK: tl.constexpr,
    PER_ROW: tl.constexpr, UNPACK: tl.constexpr, PACKED_K: tl.constexpr, FROM_BOUNDS: tl.constexpr,
    INIT_BOUNDS: tl.constexpr, INIT_PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # program (i, j): rows i·BLOCK_M … and columns j·K_PER_SPLIT …; its row sums and LoRA
    # down-projection are partial sums, written to slice j of rowsum (splits, M) and down (splits, M, rank).
    # With UNPACK, the programs past the row blocks unpack the layer's packed weights (_unpack_block).
    # FROM_BOUNDS: the qparams from bounds (_qparams_of_bounds); INIT_BOUNDS: _init_bounds.
    row_block, split = tl.program_id(0), tl.program_id(1)
    if row_block < tl.cdiv(M, BLOCK_M):
        if INIT_BOUNDS:
            _init_bounds(init_bounds_ptr, row_block, split, M, INIT_PER_ROW, BLOCK_M)
        _quantize_row_block(x_ptr, smooth_ptr, qparams_ptr, bounds_ptr, right_ptr, right_sums_ptr, codes_ptr,
                            rowsum_ptr, down_ptr, M,
                            stride_xm, row_block, split, K, K_PER_SPLIT, QMAX, HAS_SMOOTH, RANK, PER_ROW, FROM_BOUNDS,
                            BLOCK_M, BLOCK_K)
    elif UNPACK:
        _unpack_block((row_block - tl.cdiv(M, BLOCK_M)) * tl.num_programs(1) + split, packed_ptr, unpacked_ptr,
                      UNPACK_N, K, PACKED_K)


@triton.jit
def _quantize_row_block(x_ptr, smooth_ptr, qparams_ptr, bounds_ptr, right_ptr, right_sums_ptr, codes_ptr, rowsum_ptr,
                        down_ptr, M, stride_xm, row_block, split, K: tl.constexpr, K_PER_SPLIT: tl.constexpr,
                        QMAX: tl.constexpr, HAS_SMOOTH: tl.constexpr, RANK: tl.constexpr, PER_ROW: tl.constexpr,
                        FROM_BOUNDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The quantize pass of one row block's K chunk `split`."""
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    if FROM_BOUNDS:
        scale, zero = _qparams_of_bounds(bounds_ptr, qparams_ptr, rows, row_ok, M, split == 0, row_block == 0, PER_ROW,
                                         QMAX)
    else:
        scale, zero = _row_qparams(qparams_ptr, rows, row_ok, M, PER_ROW)
    rowsum = tl.zeros([BLOCK_M], dtype=tl.int32)
    if RANK > 0:
        acc_high = tl.zeros([BLOCK_M, RANK], dtype=tl.int32)
        acc_low = tl.zeros([BLOCK_M, RANK], dtype=tl.int32)
        ranks = tl.arange(0, RANK)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):  # columns past K (the last chunk's tail) are masked
        cols = split * K_PER_SPLIT + k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        mask = row_ok[:, None] & col_ok[None, :]
        x = _smoothed_tile(x_ptr, smooth_ptr, rows, cols, mask, col_ok, stride_xm, HAS_SMOOTH)
        shifted = _quantized_tile(x, scale, zero, mask, QMAX)
        codes = shifted.to(tl.int8)
        tl.store(codes_ptr + rows[:, None] * K + cols[None, :], codes, mask=mask)
        rowsum += tl.sum(shifted, axis=1)
        if RANK > 0:
            acc_high, acc_low = _lora_down_step(acc_high, acc_low, codes, right_ptr, ranks, cols, col_ok, K, RANK)
    tl.store(rowsum_ptr + split * M + rows, rowsum, mask=row_ok)
    if RANK > 0:
        down = _lora_down(acc_high, acc_low, zero, right_sums_ptr, ranks, RANK, split == 0)
        tl.store(down_ptr + (split * M + rows[:, None]) * RANK + ranks[None, :], down, mask=row_ok[:, None])


@triton.jit
def _smoothed_tile(x_ptr, smooth_ptr, rows, cols, mask, col_ok, stride_xm, HAS_SMOOTH: tl.constexpr):
    """x[rows, cols] in float32 (0 outside `mask`), times the smoothing factors with HAS_SMOOTH."""
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return _times_smoothing(x, smooth_ptr, cols, col_ok, HAS_SMOOTH)


@triton.jit
def _times_smoothing(x, smooth_ptr, cols, col_ok, HAS_SMOOTH: tl.constexpr):
    """A float32 tile times the layer's on-the-fly smoothing factors of its columns (HAS_SMOOTH), else itself."""
    if HAS_SMOOTH:
        x = x * tl.load(smooth_ptr + cols, mask=col_ok, other=0.0)[None, :]
    return x


@triton.jit
def _quantized_tile(x, scale, zero, mask, QMAX: tl.constexpr):
    """x's activation codes q − 128 as int32, 0 outside `mask` (q rounded half to even)."""
    q = tl.minimum(tl.maximum((x / scale + ROUND_MAGIC) - ROUND_MAGIC + zero, 0.0), QMAX)
    return tl.where(mask, q - ACT_SHIFT, 0.0).to(tl.int32)


@triton.jit
def _lora_down_step(acc_high, acc_low, codes, right_ptr, ranks, cols, col_ok, K: tl.constexpr, RANK: tl.constexpr):
    """The LoRA's down-projection over the columns `cols`: codes (q − 128, int8, 0 outside the
    tile) times each half of R̃ (split_lora), summed exactly in int32."""
    high = tl.load(right_ptr + ranks[None, :] * K + cols[:, None], mask=col_ok[:, None], other=0)
    low = tl.load(right_ptr + (RANK + ranks[None, :]) * K + cols[:, None], mask=col_ok[:, None], other=0)
    return tl.dot(codes, high, acc_high, out_dtype=tl.int32), tl.dot(codes, low, acc_low, out_dtype=tl.int32)


@triton.jit
def _lora_down(acc_high, acc_low, zero, right_sums_ptr, ranks, RANK: tl.constexpr, WITH_ZERO):
    """(q − z)·R̃ᵀ in float32 from _lora_down_step's sums: less the zero points' share (z − 128)·Σ
    of each half's row (once over all of K: WITH_ZERO in one K chunk of a split pass), then high +
    low / SPLIT_LOW_SCALE."""
    if WITH_ZERO:
        shift = (zero - ACT_SHIFT).to(tl.int32)  # zero points are integers
        acc_high -= shift * tl.load(right_sums_ptr + ranks)[None, :]
        acc_low -= shift * tl.load(right_sums_ptr + RANK + ranks)[None, :]
    return acc_high.to(tl.float32) + acc_low.to(tl.float32) * (1.0 / SPLIT_LOW_SCALE)


@triton.autotune(configs=LORA_DOWN_CONFIGS, key=["M", "K", "RANK"])
@triton.jit
def _lora_down_kernel(codes_ptr, qparams_ptr, right_ptr, right_sums_ptr, down_ptr, M, K: tl.constexpr,
                      RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(q − z)·R̃ᵀ of the activation codes (codes − 128, (M, K)) with per-row zero points (qparams
    (2, M)) into down (M, RANK): the down-projection a ranged pass leaves apart (lora_down)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    zero = tl.load(qparams_ptr + M + rows, mask=row_ok, other=0.0)[:, None]
    ranks = tl.arange(0, RANK)
    acc_high = tl.zeros([BLOCK_M, RANK], dtype=tl.int32)
    acc_low = tl.zeros([BLOCK_M, RANK], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        codes = _activation_tile(codes_ptr, rows, row_ok, k0, K, BLOCK_K)
        acc_high, acc_low = _lora_down_step(acc_high, acc_low, codes, right_ptr, ranks, cols, cols < K, K, RANK)
    down = _lora_down(acc_high, acc_low, zero, right_sums_ptr, ranks, RANK, True)
    tl.store(down_ptr + rows[:, None] * RANK + ranks[None, :], down, mask=row_ok[:, None])


@triton.jit
def _range_qparams(lo, hi, QMAX: tl.constexpr):
    """(scale, zero point) of per-row ranges [lo, hi] that include 0: activation_qparams's arithmetic
    with IEEE divisions (div_rn), bit-equal to it on the CPU (the reference numerics). Triton's `/`
    rounds differently, and so does torch on CUDA, which divides by 255 through its reciprocal: the
    scales then differ in the last bit, and where −lo/scale sits on a tie (a symmetric range: 127.5)
    the zero point takes the other neighbour (13 of the GPU test's 4,096 rows; RESULTS, tenth session)."""
    scale = tl.maximum(tl.math.div_rn(hi - lo, tl.full(lo.shape, QMAX, tl.float32)), SCALE_FLOOR)
    return scale, tl.minimum(tl.maximum((tl.math.div_rn(-lo, scale) + ROUND_MAGIC) - ROUND_MAGIC, 0.0), QMAX)


@triton.jit
def _qparams_of_bounds(bounds_ptr, qparams_ptr, rows, row_ok, M, first_split, first_block, PER_ROW: tl.constexpr,
                       QMAX: tl.constexpr):
    """_row_qparams of the range [min(lo, 0), max(hi, 0)] of bounds [lo; −hi], (2, 1) or per row
    (2, M), as a GEMM epilogue reduced them (int8_gemm's `bounds`): activation_qparams's arithmetic
    (_range_qparams). The programs of the first K chunk also store them into qparams (2, 1) or (2,
    M) for the GEMM's epilogue (per tensor, the first row block's)."""
    if PER_ROW:
        lo = tl.minimum(tl.load(bounds_ptr + rows, mask=row_ok, other=0.0), 0.0)
        hi = tl.maximum(-tl.load(bounds_ptr + M + rows, mask=row_ok, other=0.0), 0.0)
        scale, zero = _range_qparams(lo, hi, QMAX)
        if first_split:
            tl.store(qparams_ptr + rows, scale, mask=row_ok)
            tl.store(qparams_ptr + M + rows, zero, mask=row_ok)
        return scale[:, None], zero[:, None]
    else:
        lo = tl.minimum(tl.load(bounds_ptr), 0.0)
        hi = tl.maximum(-tl.load(bounds_ptr + 1), 0.0)
        scale, zero = _range_qparams(lo, hi, QMAX)
        if first_split and first_block:
            tl.store(qparams_ptr, scale)
            tl.store(qparams_ptr + 1, zero)
        return scale, zero


@triton.jit
def _init_bounds(bounds_ptr, row_block, split, M, PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr):
    """+inf into the [min, −max] bounds, (2, 1) or per row (2, M), that the GEMM after this pass
    reduces its output into (int8_gemm's `bounds`), so that they need no fill of their own: per
    row, the row block's own rows; per tensor, the first program's."""
    if split == 0:
        if PER_ROW:
            rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
            inf = tl.full([BLOCK_M], float("inf"), tl.float32)
            tl.store(bounds_ptr + rows, inf, mask=rows < M)
            tl.store(bounds_ptr + M + rows, inf, mask=rows < M)
        elif row_block == 0:
            tl.store(bounds_ptr + tl.arange(0, 2), tl.full([2], float("inf"), tl.float32))


@triton.autotune(configs=RANGED_QUANTIZE_CONFIGS,
                 key=["M", "K", "RANK", "NORM", "HAS_MOMENTS", "HAS_SMOOTH", "UNPACK", "INIT_BOUNDS"])
@triton.jit
def _ranged_quantize_rows_kernel(
    x_ptr, smooth_ptr, shift_ptr, scale_ptr, moments_ptr, qparams_ptr, right_ptr, right_sums_ptr, codes_ptr,
    rowsum_ptr, down_ptr, packed_ptr, unpacked_ptr, init_bounds_ptr, M, stride_xm, stride_mod, TOKENS, EPS_NORM,
    UNPACK_N,
    K: tl.constexpr, QMAX: tl.constexpr, RANK: tl.constexpr, NORM: tl.constexpr, HAS_MOMENTS: tl.constexpr,
    ROUND_BF16: tl.constexpr, HAS_SMOOTH: tl.constexpr, UNPACK: tl.constexpr, PACKED_K: tl.constexpr,
    INIT_BOUNDS: tl.constexpr, INIT_PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The quantize pass of an activation with per-token ranges that the pass takes itself: of x,
    or with NORM of LayerNorm(x)·(1 + scale) + shift (DiT's norm + adaLN modulation; no affine;
    shift and scale (N, K) per sample, row r of x in sample r // TOKENS), from x itself: the
    modulated activation is never stored. Passes over each row block: (with NORM) mean and
    variance, the range, the codes, the last two from L2; with HAS_MOMENTS the mean and variance
    come from x's moments per chunk (GatedResidual.moments, as the GEMM that wrote x left them)
    instead of the first pass. The modulated values are rounded to
    bf16 first with ROUND_BF16, as the model would store them. With HAS_SMOOTH the activation
    (modulated or not) is multiplied by the layer's on-the-fly smoothing factors in float32, as
    quantize_rows does, before its range and codes. Writes codes − 128, row sums, the LoRA
    down-projection (one split) and each row's [scale; zero] to qparams (2, M).
    With UNPACK, the programs past the row blocks unpack the layer's packed weights (_unpack_block);
    with INIT_BOUNDS, _init_bounds."""
    row_block = tl.program_id(0)
    if row_block < tl.cdiv(M, BLOCK_M):
        if INIT_BOUNDS:
            _init_bounds(init_bounds_ptr, row_block, 0, M, INIT_PER_ROW, BLOCK_M)
        _ranged_row_block(x_ptr, smooth_ptr, shift_ptr, scale_ptr, moments_ptr, qparams_ptr, right_ptr, right_sums_ptr,
                          codes_ptr, rowsum_ptr, down_ptr, M, stride_xm, stride_mod, TOKENS, EPS_NORM, row_block, K,
                          QMAX, RANK, NORM, HAS_MOMENTS, ROUND_BF16, HAS_SMOOTH, BLOCK_M, BLOCK_K)
    elif UNPACK:
        _unpack_block(row_block - tl.cdiv(M, BLOCK_M), packed_ptr, unpacked_ptr, UNPACK_N, K, PACKED_K)


@triton.jit
def _ranged_row_block(x_ptr, smooth_ptr, shift_ptr, scale_ptr, moments_ptr, qparams_ptr, right_ptr, right_sums_ptr,
                      codes_ptr, rowsum_ptr, down_ptr, M, stride_xm, stride_mod, TOKENS, EPS_NORM, row_block,
                      K: tl.constexpr, QMAX: tl.constexpr, RANK: tl.constexpr, NORM: tl.constexpr,
                      HAS_MOMENTS: tl.constexpr, ROUND_BF16: tl.constexpr, HAS_SMOOTH: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The ranged pass of one row block. Its tile loops stay loops: unrolled (tl.static_range) the
    pass ran 1.1-1.2x faster alone, but in the model at batch 8 sampling took 6 % longer (and a
    software-pipelined loop 1 % longer) than looped; at batch 1 the three were within 1 %
    (benchmarks/RESULTS.md, tenth session)."""
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    samples = rows // TOKENS
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    rstd = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    if NORM:
        # mean and sum of squared deviations: each tile's own (or each chunk's, with HAS_MOMENTS),
        # merged into the running ones (_merged_moments)
        squares = tl.zeros([BLOCK_M], dtype=tl.float32)
        if HAS_MOMENTS:
            CHUNKS: tl.constexpr = (K + MOMENT_WIDTH - 1) // MOMENT_WIDTH
            for chunk in range(CHUNKS):
                seen = chunk * MOMENT_WIDTH
                part_mean = tl.load(moments_ptr + chunk * M + rows, mask=row_ok, other=0.0)
                part_squares = tl.load(moments_ptr + (CHUNKS + chunk) * M + rows, mask=row_ok, other=0.0)
                mean, squares = _merged_moments(mean, squares, part_mean, part_squares, seen,
                                                tl.minimum(K - seen, MOMENT_WIDTH).to(tl.float32))
        else:
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                mask = row_ok[:, None] & (cols < K)[None, :]
                x = _smoothed_tile(x_ptr, x_ptr, rows, cols, mask, cols < K, stride_xm, False)
                width = tl.minimum(K - k0, BLOCK_K).to(tl.float32)
                tile_mean = tl.sum(x, axis=1) / width
                centered = tl.where(mask, x - tile_mean[:, None], 0.0)
                mean, squares = _merged_moments(mean, squares, tile_mean, tl.sum(centered * centered, axis=1), k0,
                                                width)
        rstd = 1.0 / tl.sqrt(squares / K + EPS_NORM)
    lo = tl.zeros([BLOCK_M], dtype=tl.float32)
    hi = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols < K)[None, :]
        y = _pass_input_tile(x_ptr, smooth_ptr, shift_ptr, scale_ptr, rows, samples, cols, mask, mean, rstd,
                             stride_xm, stride_mod, K, NORM, ROUND_BF16, HAS_SMOOTH)
        lo = tl.minimum(lo, tl.min(y, axis=1))
        hi = tl.maximum(hi, tl.max(y, axis=1))
    scale, zero = _range_qparams(lo, hi, QMAX)
    tl.store(qparams_ptr + rows, scale, mask=row_ok)
    tl.store(qparams_ptr + M + rows, zero, mask=row_ok)
    scale, zero = scale[:, None], zero[:, None]
    rowsum = tl.zeros([BLOCK_M], dtype=tl.int32)
    if RANK > 0:
        acc_high = tl.zeros([BLOCK_M, RANK], dtype=tl.int32)
        acc_low = tl.zeros([BLOCK_M, RANK], dtype=tl.int32)
        ranks = tl.arange(0, RANK)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        mask = row_ok[:, None] & col_ok[None, :]
        y = _pass_input_tile(x_ptr, smooth_ptr, shift_ptr, scale_ptr, rows, samples, cols, mask, mean, rstd,
                             stride_xm, stride_mod, K, NORM, ROUND_BF16, HAS_SMOOTH)
        shifted = _quantized_tile(y, scale, zero, mask, QMAX)
        codes = shifted.to(tl.int8)
        tl.store(codes_ptr + rows[:, None] * K + cols[None, :], codes, mask=mask)
        rowsum += tl.sum(shifted, axis=1)
        if RANK > 0:
            acc_high, acc_low = _lora_down_step(acc_high, acc_low, codes, right_ptr, ranks, cols, col_ok, K, RANK)
    tl.store(rowsum_ptr + rows, rowsum, mask=row_ok)
    if RANK > 0:
        down = _lora_down(acc_high, acc_low, zero, right_sums_ptr, ranks, RANK, True)
        tl.store(down_ptr + rows[:, None] * RANK + ranks[None, :], down, mask=row_ok[:, None])


@triton.jit
def _merged_moments(mean, squares, part_mean, part_squares, seen, width):
    """The running mean and sum of squared deviations of a row's first `seen` columns merged with
    those of its next `width` (Chan et al.'s pairwise update: as exact as two passes)."""
    delta = part_mean - mean
    return (mean + delta * (width / (seen + width)),
            squares + (part_squares + delta * delta * (seen * width / (seen + width))))


@triton.jit
def _row_moments(out, in_bounds, rows, row_ok, pid_n, M, N, moments_ptr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """GatedResidual.moments of a stored output tile: each row's mean and sum of squared deviations
    over each MOMENT_WIDTH chunk of the tile's columns (2, chunks, M)."""
    PARTS: tl.constexpr = BLOCK_N // MOMENT_WIDTH
    ok = tl.reshape(in_bounds, [BLOCK_M, PARTS, MOMENT_WIDTH])
    v = tl.where(ok, tl.reshape(out.to(tl.float32), [BLOCK_M, PARTS, MOMENT_WIDTH]), 0.0)
    mean = tl.sum(v, axis=2) / tl.maximum(tl.sum(ok.to(tl.float32), axis=2), 1.0)
    centered = tl.where(ok, v - mean[:, :, None], 0.0)
    chunks = pid_n * PARTS + tl.arange(0, PARTS)
    all_chunks = tl.cdiv(N, MOMENT_WIDTH)
    offsets = chunks[None, :] * M + rows[:, None]
    mask = row_ok[:, None] & (chunks < all_chunks)[None, :]
    tl.store(moments_ptr + offsets, mean, mask=mask)
    tl.store(moments_ptr + all_chunks * M + offsets, tl.sum(centered * centered, axis=2), mask=mask)


@triton.jit
def _pass_input_tile(x_ptr, smooth_ptr, shift_ptr, scale_ptr, rows, samples, cols, mask, mean, rstd, stride_xm,
                     stride_mod, K: tl.constexpr, NORM: tl.constexpr, ROUND_BF16: tl.constexpr,
                     HAS_SMOOTH: tl.constexpr):
    """The ranged pass's input for a tile in float32, 0 outside `mask`: x, or with NORM its
    LayerNorm + modulation (_modulated_tile); times the smoothing factors with HAS_SMOOTH."""
    if NORM:
        y = _modulated_tile(x_ptr, shift_ptr, scale_ptr, rows, samples, cols, mask, mean, rstd, stride_xm,
                            stride_mod, K, ROUND_BF16)
    else:
        y = _smoothed_tile(x_ptr, x_ptr, rows, cols, mask, cols < K, stride_xm, False)
    return _times_smoothing(y, smooth_ptr, cols, cols < K, HAS_SMOOTH)


@triton.jit
def _modulated_tile(x_ptr, shift_ptr, scale_ptr, rows, samples, cols, mask, mean, rstd, stride_xm, stride_mod,
                    K: tl.constexpr, ROUND_BF16: tl.constexpr):
    """((x − mean)·rstd)·(1 + scale[sample]) + shift[sample] for a tile, 0 outside `mask`."""
    x = _smoothed_tile(x_ptr, x_ptr, rows, cols, mask, cols < K, stride_xm, False)
    offsets = samples[:, None] * stride_mod + cols[None, :]
    scale = tl.load(scale_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = ((x - mean[:, None]) * rstd[:, None]) * (1.0 + scale) + shift
    if ROUND_BF16:
        y = y.to(tl.bfloat16).to(tl.float32)
    return tl.where(mask, y, 0.0)


@triton.jit
def _activation_tile(a_ptr, rows, row_ok, k0, K: tl.constexpr, WIDTH: tl.constexpr):
    ks = k0 + tl.arange(0, WIDTH)
    return tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :], other=0)


@triton.jit
def _unpack_span(packed):
    """The two signed [BLOCK_N, HALF_SPAN] operands of one split-packed span of bytes."""
    return (packed & 0xF).to(tl.int8) - PACKED_SHIFT, (packed >> 4).to(tl.int8) - PACKED_SHIFT


@triton.jit
def _gelu_tanh(y):
    """nn.GELU(approximate="tanh"): 0.5·y·(1 + tanh(√(2/π)·(y + 0.044715·y³)))."""
    u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
    if FAST_TANH:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [u], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        t = 2 * tl.sigmoid(2 * u) - 1
    return 0.5 * y * (1 + t)


@triton.autotune(configs=GEMM_CONFIGS,
                 key=["M", "N", "K", "PACKED", "USE_TMA", "RANK", "GELU", "BOUNDS", "PER_ROW", "BOUNDS_PER_ROW",
                      "SPLITS", "GATED", "MOMENTS"],
                 prune_configs_by=dict(early_config_prune=_whole_moment_chunks))
@triton.jit
def _int8_gemm_kernel(
    a_ptr, b_ptr, rowsum_ptr, colsum_ptr, wzero_ptr, wscale_ptr, bias_ptr, qparams_ptr, down_ptr, left_ptr,
    out_ptr, bounds_ptr, bounds_scale_ptr, residual_ptr, gate_ptr, moments_ptr, M, N, stride_om, stride_rm,
    stride_gate, GATE_TOKENS,
    K: tl.constexpr, PACKED_K: tl.constexpr, PACKED: tl.constexpr, USE_TMA: tl.constexpr,
    HAS_BIAS: tl.constexpr, RANK: tl.constexpr, GELU: tl.constexpr, BOUNDS: tl.constexpr,
    BOUNDS_SCALED: tl.constexpr, PER_ROW: tl.constexpr, BOUNDS_PER_ROW: tl.constexpr, SPLITS: tl.constexpr,
    GATED: tl.constexpr, MOMENTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped tile order: GROUP_M row tiles share each column tile while it is in L2
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_rows
    pid_n = (pid % (GROUP_M * tiles_n)) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    # With USE_TMA, tiles come through tensor descriptors; out-of-bounds rows and columns read as
    # 0 (a zero activation column adds nothing; rows and columns past M and N are not stored).
    if PACKED:  # split-packed ≤ 4-bit codes: each span gives two dots of HALF_SPAN
        if USE_TMA:
            a_desc = tl.make_tensor_descriptor(a_ptr, [M, K], [K, 1], [BLOCK_M, HALF_SPAN])
            b_desc = tl.make_tensor_descriptor(b_ptr, [N, PACKED_K], [PACKED_K, 1], [BLOCK_N, HALF_SPAN])
        for k0 in range(0, K, 2 * HALF_SPAN):
            if USE_TMA:
                low, high = _unpack_span(b_desc.load([pid_n * BLOCK_N, k0 // 2]))
                a_low = a_desc.load([pid_m * BLOCK_M, k0])
                a_high = a_desc.load([pid_m * BLOCK_M, k0 + HALF_SPAN])
            else:
                half = k0 // 2 + tl.arange(0, HALF_SPAN)
                low, high = _unpack_span(tl.load(b_ptr + cols[:, None] * PACKED_K + half[None, :],
                                                 mask=col_ok[:, None], other=PACKED_SHIFT * 17))
                a_low = _activation_tile(a_ptr, rows, row_ok, k0, K, HALF_SPAN)
                a_high = _activation_tile(a_ptr, rows, row_ok, k0 + HALF_SPAN, K, HALF_SPAN)
            acc = tl.dot(a_low, tl.trans(low), acc, out_dtype=tl.int32)
            acc = tl.dot(a_high, tl.trans(high), acc, out_dtype=tl.int32)
    else:
        if USE_TMA:
            a_desc = tl.make_tensor_descriptor(a_ptr, [M, K], [K, 1], [BLOCK_M, BLOCK_K])
            b_desc = tl.make_tensor_descriptor(b_ptr, [N, K], [K, 1], [BLOCK_N, BLOCK_K])
        for k0 in range(0, K, BLOCK_K):
            if USE_TMA:
                a = a_desc.load([pid_m * BLOCK_M, k0])
                w = b_desc.load([pid_n * BLOCK_N, k0])
            else:
                a = _activation_tile(a_ptr, rows, row_ok, k0, K, BLOCK_K)
                ks = k0 + tl.arange(0, BLOCK_K)
                w = tl.load(b_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & (ks < K)[None, :],
                            other=0)
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)

    scale_x, zero_x = _row_qparams(qparams_ptr, rows, row_ok, M, PER_ROW)
    zero_x = zero_x.to(tl.int32) - ACT_SHIFT
    rowsum = tl.zeros([BLOCK_M], dtype=tl.int32)
    for split in tl.static_range(SPLITS):  # the quantize pass's partial sums, in a fixed order
        rowsum += tl.load(rowsum_ptr + split * M + rows, mask=row_ok, other=0)
    colsum = tl.load(colsum_ptr + cols, mask=col_ok, other=0)
    zero_w = tl.load(wzero_ptr + cols, mask=col_ok, other=0)
    exact = acc - zero_x * colsum[None, :] - zero_w[None, :] * rowsum[:, None] + K * zero_x * zero_w[None, :]
    y = exact.to(tl.float32) * scale_x * tl.load(wscale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if RANK > 0:
        ranks = tl.arange(0, RANK)
        down = tl.zeros([BLOCK_M, RANK], dtype=tl.float32)
        for split in tl.static_range(SPLITS):
            down += tl.load(down_ptr + (split * M + rows[:, None]) * RANK + ranks[None, :], mask=row_ok[:, None],
                            other=0.0)
        y += tl.dot((down * scale_x).to(LORA_DTYPE), tl.trans(
            tl.load(left_ptr + cols[:, None] * RANK + ranks[None, :], mask=col_ok[:, None], other=0.0)))
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if GELU:
        y = _gelu_tanh(y)
    in_bounds = row_ok[:, None] & col_ok[None, :]
    if GATED:
        y = _gated_residual(y, residual_ptr, gate_ptr, rows, cols, in_bounds, stride_rm, stride_gate, GATE_TOKENS)
    out = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], out, mask=in_bounds)
    if MOMENTS:
        _row_moments(out, in_bounds, rows, row_ok, pid_n, M, N, moments_ptr, BLOCK_M, BLOCK_N)
    if BOUNDS:  # the next layer's range (per tensor, or per row), of the stored values × its factors
        v = out.to(tl.float32)
        if BOUNDS_SCALED:
            v = v * tl.load(bounds_scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
        # bounds = [min, −max] of shape (2, 1) or (2, M), kept by atomic min from +inf; relaxed: only a
        # later kernel reads them, and the default acq_rel made every atomic a memory fence
        low, high = tl.where(in_bounds, v, float("inf")), tl.where(in_bounds, v, float("-inf"))
        if BOUNDS_PER_ROW:
            tl.atomic_min(bounds_ptr + rows, tl.min(low, axis=1), mask=row_ok, sem="relaxed")
            tl.atomic_min(bounds_ptr + M + rows, -tl.max(high, axis=1), mask=row_ok, sem="relaxed")
        else:
            tl.atomic_min(bounds_ptr, tl.min(low), sem="relaxed")
            tl.atomic_min(bounds_ptr + 1, -tl.max(high), sem="relaxed")


@triton.jit
def _gated_residual(y, residual_ptr, gate_ptr, rows, cols, in_bounds, stride_rm, stride_gate, GATE_TOKENS):
    """residual + gate ⊙ y for a tile: DiT's adaLN-Zero residual update, the gate per sample
    (row r in sample r // GATE_TOKENS) and column, in float32 (one rounding where the unfused
    block rounds the layer's output, the product and the sum)."""
    residual = tl.load(residual_ptr + rows[:, None] * stride_rm + cols[None, :], mask=in_bounds, other=0.0)
    gate = tl.load(gate_ptr + (rows // GATE_TOKENS)[:, None] * stride_gate + cols[None, :], mask=in_bounds, other=0.0)
    return residual.to(tl.float32) + gate.to(tl.float32) * y


@triton.autotune(configs=WEIGHT_ONLY_CONFIGS, key=["M", "N", "K", "BLOCK_M"])
@triton.jit
def _weight_only_kernel(x_ptr, codes_ptr, zero_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = x · (s·(q − z))ᵀ + b for few rows (adaLN's per-sample conditioning): the uint8 codes are
    read once, (q − z) is exact in bf16 for the tensor cores, and s scales the float32 sums."""
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    zero = tl.load(zero_ptr + cols, mask=col_ok, other=0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = col_ok[:, None] & k_ok[None, :]
        q = tl.load(codes_ptr + cols[:, None] * K + ks[None, :], mask=w_ok, other=0).to(tl.float32)
        w = tl.where(w_ok, q - zero[:, None], 0.0).to(LORA_DTYPE)  # integers |v| ≤ 255: exact in bf16
        acc = tl.dot(x.to(LORA_DTYPE), tl.trans(w), acc)
    y = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], y.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _unpack_kernel(packed_ptr, out_ptr, N, K: tl.constexpr, PACKED_K: tl.constexpr):
    """unpack_signed's kernel: one _unpack_block per program."""
    _unpack_block(tl.program_id(0), packed_ptr, out_ptr, N, K, PACKED_K)


@triton.jit
def _unpack_block(program, packed_ptr, out_ptr, N, K: tl.constexpr, PACKED_K: tl.constexpr):
    """Split-packed codes -> signed int8 (c − 8), (N, K) row-major: block `program` of
    unpack_programs(N, K): one span of UNPACK_ROWS rows; past the last block, nothing."""
    spans: tl.constexpr = (K + 2 * HALF_SPAN - 1) // (2 * HALF_SPAN)
    rows = (program // spans) * UNPACK_ROWS + tl.arange(0, UNPACK_ROWS)
    k0 = (program % spans) * 2 * HALF_SPAN
    half = tl.arange(0, HALF_SPAN)
    row_ok = rows[:, None] < N
    low, high = _unpack_span(tl.load(packed_ptr + rows[:, None] * PACKED_K + k0 // 2 + half[None, :], mask=row_ok))
    low_k, high_k = k0 + half, k0 + HALF_SPAN + half
    tl.store(out_ptr + rows[:, None] * K + low_k[None, :], low, mask=row_ok & (low_k < K)[None, :])
    tl.store(out_ptr + rows[:, None] * K + high_k[None, :], high, mask=row_ok & (high_k < K)[None, :])


@triton.jit
def _store_two_level(codes, ks, rows, row_ok, table_ptr, out_ptr, K: tl.constexpr, GROUPS: tl.constexpr,
                     GROUP: tl.constexpr):
    """Store (codes − z)·k as int8 for the columns `ks`, with (k, z) of each element's group."""
    ok = row_ok & (ks < K)[None, :]
    entry = (rows[:, None] * GROUPS + (ks // GROUP)[None, :]) * 2
    scale = tl.load(table_ptr + entry, mask=ok, other=0).to(tl.int32)
    zero = tl.load(table_ptr + entry + 1, mask=ok, other=0).to(tl.int32)
    tl.store(out_ptr + rows[:, None] * K + ks[None, :], ((codes.to(tl.int32) - zero) * scale).to(tl.int8), mask=ok)


@triton.jit
def _unpack_two_level_kernel(packed_ptr, table_ptr, out_ptr, N, K: tl.constexpr, PACKED_K: tl.constexpr,
                             GROUPS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split-packed two-level codes -> int8 (c − z_g)·k_g, (N, K) row-major: one span of BLOCK_N
    rows per program; table is (N, GROUPS, 2) uint8 [k, z]."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * 2 * HALF_SPAN
    half = tl.arange(0, HALF_SPAN)
    row_ok = rows[:, None] < N
    packed = tl.load(packed_ptr + rows[:, None] * PACKED_K + k0 // 2 + half[None, :], mask=row_ok)
    _store_two_level(packed & 0xF, k0 + half, rows, row_ok, table_ptr, out_ptr, K, GROUPS, GROUP)
    _store_two_level(packed >> 4, k0 + HALF_SPAN + half, rows, row_ok, table_ptr, out_ptr, K, GROUPS, GROUP)


def gemm_tile_choice() -> str:
    """The int8 GEMM configuration the autotuner chose for its latest call (benchmark rows say it)."""
    return str(_int8_gemm_kernel.best_config)


def pack_split(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, K'/2) uint8 in the split layout, K' = K rounded up to PACK_SPAN."""
    n, k = codes.shape
    padded = -(-k // PACK_SPAN) * PACK_SPAN
    spans = F.pad(codes.to(torch.uint8), (0, padded - k), value=PACKED_SHIFT.value).reshape(n, -1, 2, PACK_SPAN // 2)
    return (spans[:, :, 0] | (spans[:, :, 1] << 4)).reshape(n, padded // 2).contiguous()


_allocator_set = False


def _ensure_descriptor_allocator() -> None:
    """Device-side tensor descriptors need scratch memory from an allocator Triton is given."""
    global _allocator_set
    if not _allocator_set:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _allocator_set = True


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The device's streaming multiprocessors (a stand-in 64 under the CPU interpreter)."""
    return 64 if INTERPRETED else torch.cuda.get_device_properties(device).multi_processor_count


def quantize_splits(m: int, k: int, device: torch.device) -> int:
    """Into how many K chunks the quantize pass of an (m, k) activation is split: enough programs
    for QUANTIZE_PROGRAMS_PER_SM per multiprocessor (counting 32-row programs), at most one per
    SPLIT_K_CHUNK columns; 1 for large calls, whose rows alone fill the GPU."""
    wanted = QUANTIZE_PROGRAMS_PER_SM * multiprocessors(device)
    return max(1, min(triton.cdiv(k, SPLIT_K_CHUNK), triton.cdiv(wanted, triton.cdiv(m, 32))))


@functools.cache
def _is_hopper(device: torch.device) -> bool:
    return not INTERPRETED and torch.cuda.get_device_capability(device) == (9, 0)


class GatedResidual(NamedTuple):
    """A GEMM epilogue's residual update out = residual + gate ⊙ y: residual (M, N), in the
    output's dtype, and gate (samples, N), each with stride 1 along N; row r belongs to sample
    r // tokens. `moments` (row_moments(M, N), or None): filled by the epilogue with the moments of
    out's rows that the next LayerNorm needs (norm_quantize_rows's `moments`)."""

    residual: torch.Tensor
    gate: torch.Tensor
    tokens: int
    moments: torch.Tensor | None = None


def row_moments_shape(m: int, n: int) -> tuple[int, int, int]:
    """(2, chunks, m): the moments of m rows of n columns, [0, c] the mean of columns
    c·MOMENT_COLUMNS … (c + 1)·MOMENT_COLUMNS − 1 of each row, [1, c] the sum of their
    squared deviations from it (float32)."""
    return 2, triton.cdiv(n, MOMENT_COLUMNS), m


def row_moments(m: int, n: int, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor for the moments of m rows of n columns (row_moments_shape)."""
    return torch.empty(row_moments_shape(m, n), dtype=torch.float32, device=device)


def check_row_moments(moments: torch.Tensor | None, m: int, n: int) -> None:
    """Raises unless `moments` is None or a contiguous float32 row_moments tensor of m rows of n columns."""
    shape = row_moments_shape(m, n)
    if moments is not None and (tuple(moments.shape) != shape or moments.dtype != torch.float32
                                or not moments.is_contiguous()):
        raise ValueError(f"row moments of {m} rows of {n} columns need a contiguous float32 tensor of shape "
                         f"{shape}, not {moments.dtype} {tuple(moments.shape)}")


def warp_specialised_suits(m: int, n: int, k: int, rank: int, packed: bool, out_dtype, device: torch.device,
                           gated: GatedResidual | None = None) -> bool:
    """Whether a call goes to quant/hopper_gemm.py's kernel (WARP_SPECIALISED_FROM_ROWS says why;
    a gated residual update only where each of its row tiles lies in one sample)."""
    if not (device.type == "cuda" and not packed and out_dtype in (torch.bfloat16, torch.float16)
            and m >= WARP_SPECIALISED_FROM_ROWS and min(n, k) >= WARP_SPECIALISED_MIN_SIDE
            and rank in (0, 16, 32, 64) and n % 8 == 0 and k % 16 == 0 and _is_hopper(device)):
        return False
    from .hopper_gemm import gate_tiles_fit, tile_config

    return gated is None or gate_tiles_fit(gated.tokens, tile_config(m))


def lora_down_in_gemm(m: int, n: int, k: int, rank: int, packed: bool, out_dtype, device: torch.device,
                      gated: GatedResidual | None = None) -> bool:
    """Whether a call's GEMM computes its LoRA's down-projection itself (LORA_DOWN_IN_GEMM_BELOW_ROWS)
    rather than its quantize pass; `packed`: whether the GEMM gets the weight codes still packed
    (stays_packed). Ranks of at most 32: at 64, R̃'s 16 KB a ring slot puts the five slots past the
    shared memory (277 KB compiled for sm_90a, of 227)."""
    return (rank in (16, 32) and LORA_DOWN_IN_GEMM_BELOW_ROWS is not None and m < LORA_DOWN_IN_GEMM_BELOW_ROWS
            and warp_specialised_suits(m, n, k, rank, packed, out_dtype, device, gated))


def stays_packed(packed: bool, group_table: torch.Tensor | None, m: int, unpack_from_rows: int = UNPACK_FROM_ROWS
                 ) -> bool:
    """Whether int8_gemm multiplies a call's weight codes as packed (else it unpacks them to int8 first)."""
    return packed and group_table is None and m < unpack_from_rows


def range_bounds(x2d: torch.Tensor, per_row: bool) -> torch.Tensor:
    """[min; −max] of 2-D x's rows (2, M), or of the whole of it (2, 1): the bounds a GEMM epilogue
    reduces its output into (int8_gemm's `bounds`) and a quantize pass takes qparams from
    (quantize_rows's `bounds`), from torch's reductions."""
    lo, hi = row_first_range(x2d, "per_token" if per_row else "per_tensor")
    return torch.stack([lo.reshape(-1), -hi.reshape(-1)])


def per_row(qparams: torch.Tensor) -> bool:
    """Whether (2, R) qparams (or bounds) hold one range per row (R > 1) rather than one per tensor."""
    return qparams.numel() > 2


class PackedWeight(NamedTuple):
    """A layer's split-packed weight codes (N, K'/2) and the (N, K) int8 tensor that a quantize
    pass of the same call unpacks them into (c − 8), in programs beside its row blocks: the unpack
    takes no launch of its own, and its loads overlap the pass's (unpacked_alongside)."""

    packed: torch.Tensor
    unpacked: torch.Tensor


def unpacked_alongside(weight: torch.Tensor, packed: bool, group_table: torch.Tensor | None, m: int,
                       k: int) -> PackedWeight | None:
    """Where a call of m rows unpacks its packed weights beside its quantize pass (UNPACK_FROM_ROWS,
    UNPACK_BESIDE_PASS_BELOW_ROWS), the unpack target the pass fills; None otherwise (int8 codes,
    two-level groups, few rows, or many: int8_gemm then unpacks them itself where it should)."""
    if not packed or group_table is not None or not UNPACK_FROM_ROWS <= m < UNPACK_BESIDE_PASS_BELOW_ROWS:
        return None
    return PackedWeight(weight, torch.empty(weight.shape[0], k, dtype=torch.int8, device=weight.device))


def unpack_programs(n: int, k: int) -> int:
    """Programs of the W4 unpack of an (n, k) weight: UNPACK_ROWS rows by one PACK_SPAN each."""
    return triton.cdiv(n, UNPACK_ROWS.value) * triton.cdiv(k, PACK_SPAN)


def _init_bounds_arguments(bounds: torch.Tensor | None, placeholder: torch.Tensor) -> dict:
    """A row pass's arguments that fill the next GEMM's `bounds` with +inf (none to fill: off)."""
    return dict(init_bounds_ptr=placeholder if bounds is None else bounds, INIT_BOUNDS=bounds is not None,
                INIT_PER_ROW=bounds is not None and per_row(bounds))


def _unpack_arguments(unpack: PackedWeight | None, placeholder: torch.Tensor) -> dict:
    """A row pass's unpack arguments (none to do: placeholder pointers, UNPACK off)."""
    if unpack is None:
        return dict(packed_ptr=placeholder, unpacked_ptr=placeholder, UNPACK_N=0, UNPACK=False, PACKED_K=0)
    return dict(packed_ptr=unpack.packed, unpacked_ptr=unpack.unpacked, UNPACK_N=unpack.packed.shape[0], UNPACK=True,
                PACKED_K=unpack.packed.shape[1])


def quantize_rows(x: torch.Tensor, qparams: torch.Tensor, act_bits: int, smooth_inv: torch.Tensor | None,
                  right: SplitRight | None, splits: int | None = None, unpack: PackedWeight | None = None,
                  bounds: torch.Tensor | None = None, init_bounds: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(int8 codes − 128 (M, K), int32 partial row sums (splits, M), fp32 partial (q − z)·R̃ᵀ
    (splits, M, rank) or None, `right` the LoRA's R̃: split_lora) of a 2-D x with stride 1 along K:
    each of the `splits` (default: quantize_splits) programs of a row block covers one K chunk,
    and the partial sums add up to the whole rows'. qparams: float32 (2, 1) or (2, M) [scales; zero
    points], on x's device; with `bounds` ([min, −max] of x × smooth_inv, of the same shape, as a
    GEMM epilogue reduced them) the pass computes them from the bounds (activation_qparams) and
    writes them into qparams.
    `unpack`: the layer's packed weights, unpacked by the same launch; `init_bounds`: the next
    GEMM's bounds, which the pass fills with +inf."""
    m, k = x.shape
    rank = 0 if right is None else right.rank
    splits = quantize_splits(m, k, x.device) if splits is None else splits
    k_per_split = triton.cdiv(triton.cdiv(k, SPLIT_K_CHUNK), splits) * SPLIT_K_CHUNK
    splits = triton.cdiv(k, k_per_split)  # no empty chunk
    codes = torch.empty(m, k, dtype=torch.int8, device=x.device)
    rowsum = torch.empty(splits, m, dtype=torch.int32, device=x.device)
    down = torch.empty(splits, m, max(rank, 1), dtype=torch.float32, device=x.device)
    # the unpack's programs follow the row blocks, `splits` to a row of the grid
    unpack_grid_rows = 0 if unpack is None else triton.cdiv(unpack_programs(unpack.packed.shape[0], k), splits)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) + unpack_grid_rows, splits)  # noqa: E731
    _quantize_rows_kernel[grid](
        x, smooth_inv if smooth_inv is not None else qparams, qparams, **_right_arguments(right, qparams),
        codes_ptr=codes, rowsum_ptr=rowsum, down_ptr=down, M=m, stride_xm=x.stride(0),
        bounds_ptr=qparams if bounds is None else bounds, K=k, K_PER_SPLIT=k_per_split,
        QMAX=float(largest_code(act_bits)), HAS_SMOOTH=smooth_inv is not None, RANK=rank, PER_ROW=per_row(qparams),
        FROM_BOUNDS=bounds is not None, **_unpack_arguments(unpack, codes), **_init_bounds_arguments(init_bounds, qparams),
    )
    return codes, rowsum, down if rank else None


def weight_only_linear(x: torch.Tensor, codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor) -> torch.Tensor:
    """x (M, K), stride 1 along K, times the 8-bit weight-only layer's Ŵ = scale·(codes − zero)
    (codes uint8 (N, K), zero uint8 (N,), scale and bias float32 (N,)), plus bias, in x's dtype."""
    m, k = x.shape
    n = codes.shape[0]
    block_m = min(WEIGHT_ONLY_MAX_BLOCK_M, max(16, triton.next_power_of_2(m)))
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m))  # noqa: E731
    _weight_only_kernel[grid](x, codes, zero, scale, bias, out, m, n, K=k, BLOCK_M=block_m)
    return out


def norm_quantize_rows(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, tokens: int, eps: float,
                       act_bits: int, right: SplitRight | None, unpack: PackedWeight | None = None,
                       smooth_inv: torch.Tensor | None = None, moments: torch.Tensor | None = None,
                       init_bounds: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """quantize_rows of LayerNorm(x)·(1 + scale) + shift (× smooth_inv) with per-token ranges, from
    x (M, K) and the per-sample shift and scale (N, K) (rows of sample i: i·tokens …): (codes −
    128, row sums (1, M), (q − z)·R̃ᵀ (1, M, rank) or None, qparams (2, M)). `unpack`: the layer's
    packed weights, unpacked by the same launch; `moments`: x's row moments (row_moments), as the
    GEMM that wrote x left them (GatedResidual.moments), or None: the pass takes them itself;
    `init_bounds`: as quantize_rows's."""
    check_row_moments(moments, *x.shape)
    return _ranged_pass(x, act_bits, right, unpack, smooth_inv, norm=dict(
        shift_ptr=shift, scale_ptr=scale, stride_mod=shift.stride(0), TOKENS=tokens, EPS_NORM=eps), moments=moments,
        init_bounds=init_bounds)


def ranged_quantize_rows(x: torch.Tensor, act_bits: int, right: SplitRight | None,
                         unpack: PackedWeight | None = None, smooth_inv: torch.Tensor | None = None,
                         init_bounds: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """quantize_rows of x (M, K) (× smooth_inv) with per-token ranges that the pass takes itself
    (the range from one read of x, the codes from a second, in L2), instead of a reduction
    beforehand: as norm_quantize_rows, without the norm."""
    return _ranged_pass(x, act_bits, right, unpack, smooth_inv, norm=None, init_bounds=init_bounds)


def _ranged_pass(x: torch.Tensor, act_bits: int, right: SplitRight | None, unpack: PackedWeight | None,
                 smooth_inv: torch.Tensor | None, norm: dict | None, moments: torch.Tensor | None = None,
                 init_bounds: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """_ranged_quantize_rows_kernel's launch; `norm`: its norm arguments, or None (no norm);
    `moments`: the norm's row moments (norm_quantize_rows); `init_bounds`: quantize_rows's."""
    m, k = x.shape
    rank = 0 if right is None else right.rank
    codes = torch.empty(m, k, dtype=torch.int8, device=x.device)
    rowsum = torch.empty(1, m, dtype=torch.int32, device=x.device)
    down = torch.empty(1, m, max(rank, 1), dtype=torch.float32, device=x.device)
    qparams = torch.empty(2, m, dtype=torch.float32, device=x.device)
    placeholders = dict(shift_ptr=x, scale_ptr=x, stride_mod=0, TOKENS=1, EPS_NORM=0.0)  # never read without NORM
    unpack_blocks = 0 if unpack is None else unpack_programs(unpack.packed.shape[0], k)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) + unpack_blocks,)  # noqa: E731
    apart = rank > 0 and LORA_DOWN_APART_FROM_ROWS is not None and m >= LORA_DOWN_APART_FROM_ROWS
    _ranged_quantize_rows_kernel[grid](
        x_ptr=x, smooth_ptr=qparams if smooth_inv is None else smooth_inv,
        moments_ptr=qparams if moments is None else moments, qparams_ptr=qparams,
        **_right_arguments(right, qparams), codes_ptr=codes, rowsum_ptr=rowsum, down_ptr=down, M=m,
        stride_xm=x.stride(0), K=k, QMAX=float(largest_code(act_bits)), RANK=0 if apart else rank,
        NORM=norm is not None, HAS_MOMENTS=moments is not None, ROUND_BF16=x.dtype == torch.bfloat16,
        HAS_SMOOTH=smooth_inv is not None, **(norm or placeholders), **_unpack_arguments(unpack, codes),
        **_init_bounds_arguments(init_bounds, qparams),
    )
    if apart:
        lora_down(codes, qparams, right, down[0])
    return codes, rowsum, down if rank else None, qparams


def lora_down(codes: torch.Tensor, qparams: torch.Tensor, right: SplitRight, out: torch.Tensor) -> torch.Tensor:
    """out (M, rank) = (q − z)·R̃ᵀ of a ranged pass's codes (codes − 128, (M, K)) with their
    per-row qparams (2, M) and the LoRA's R̃ (split_lora)."""
    m, k = codes.shape
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    _lora_down_kernel[grid](codes, qparams, right.codes, right.sums, out, M=m, K=k, RANK=right.rank)
    return out


def _right_arguments(right: SplitRight | None, placeholder: torch.Tensor) -> dict:
    """A pass's right_ptr and right_sums_ptr: R̃'s codes and row sums, or a placeholder never read (rank 0)."""
    codes, sums = (placeholder, placeholder) if right is None else right
    return dict(right_ptr=codes, right_sums_ptr=sums)


def unpack_signed(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Split-packed (N, K'/2) codes -> (N, k) int8 codes − 8, the int8 GEMM's weight operand."""
    n = packed.shape[0]
    out = torch.empty(n, k, dtype=torch.int8, device=packed.device)
    _unpack_kernel[(unpack_programs(n, k),)](packed, out, n, K=k, PACKED_K=packed.shape[1])
    return out


def unpack_two_level(packed: torch.Tensor, table: torch.Tensor, k: int) -> torch.Tensor:
    """Split-packed two-level codes (N, K'/2) and their group table (N, groups, 2) [k, z] ->
    (N, k) int8 (c − z)·k, the int8 GEMM's weight operand (zero point 0, the row scale apart)."""
    n, groups = table.shape[:2]
    out = torch.empty(n, k, dtype=torch.int8, device=packed.device)
    _unpack_two_level_kernel[(triton.cdiv(n, UNPACK_ROWS.value), triton.cdiv(k, PACK_SPAN))](
        packed, table, out, n, K=k, PACKED_K=packed.shape[1], GROUPS=groups, GROUP=k // groups,
        BLOCK_N=UNPACK_ROWS.value)
    return out


def int8_gemm(codes: torch.Tensor, rowsum: torch.Tensor, qparams: torch.Tensor, weight: torch.Tensor, packed: bool,
              colsum: torch.Tensor, zero_w: torch.Tensor, scale_w: torch.Tensor, bias: torch.Tensor | None,
              down: torch.Tensor | None, left: torch.Tensor | None, out_dtype: torch.dtype,
              use_tma: bool = False, gelu: bool = False, bounds: torch.Tensor | None = None,
              bounds_scale: torch.Tensor | None = None, unpack_from_rows: int = UNPACK_FROM_ROWS,
              group_table: torch.Tensor | None = None, warp_specialised: bool | None = None,
              gated: GatedResidual | None = None, right: SplitRight | None = None) -> torch.Tensor:
    """The GEMM with its epilogue: out (M, N) = s_x s_w (Σ q'c' − corrections) + s_x·down·Lᵀ + b,
    then GELU (tanh) with `gelu`.
    `weight` is int8 (N, K) signed codes, or (packed) uint8 codes in the split layout (pack_split);
    with M ≥ `unpack_from_rows`, packed codes are first unpacked to int8 (same shift, so the
    column sums and zero points hold), and the int8 GEMM runs with pointer loads.
    `use_tma` loads tiles with Hopper's tensor memory accelerator (device-side descriptors).
    `rowsum` and `down` are quantize_rows's partial sums, (splits, M[, rank]).
    `bounds`: a float32 (2, 1) tensor, or (2, M) for per-row ranges, holding +inf, into which the
    kernel reduces [min, −max] of its stored output (times `bounds_scale` per column when given):
    the next layer's activation range without another pass over `out`.
    `group_table` (N, groups, 2) uint8 [k, z]: packed two-level group codes, unpacked to int8
    (c − z)·k before the GEMM at any M (`zero_w` is then 0 and `scale_w` the row scale).
    `warp_specialised`: run quant/hopper_gemm.py's kernel (None: where warp_specialised_suits).
    `gated`: out = residual + gate ⊙ (the above), computed in the epilogue (no GELU then).
    `right`: the LoRA's R̃ (split_lora), where the GEMM computes the down-projection from the codes
    itself (lora_down_in_gemm; `down` None): only on quant/hopper_gemm.py's kernel."""
    m, k = codes.shape
    if group_table is not None:  # two-level groups: always unpacked first (zero point 0 after it)
        weight, packed, use_tma = unpack_two_level(weight, group_table, k), False, False
    elif packed and not stays_packed(packed, group_table, m, unpack_from_rows):
        weight, packed, use_tma = unpack_signed(weight, k), False, False
    n = weight.shape[0]
    rank = 0 if left is None else left.shape[1]
    if warp_specialised is None:
        warp_specialised = warp_specialised_suits(m, n, k, rank, packed, out_dtype, codes.device, gated)
    if warp_specialised:
        from .hopper_gemm import int8_gemm_ws

        return int8_gemm_ws(codes, rowsum, qparams, weight, colsum, zero_w, scale_w, bias, down, left, out_dtype,
                            gelu, bounds, bounds_scale, gated, right=right)
    if right is not None:
        raise ValueError("only the warp-specialised GEMM computes the LoRA's down-projection itself "
                         "(kernels.lora_down_in_gemm)")
    if use_tma:
        _ensure_descriptor_allocator()
    out = torch.empty(m, n, dtype=out_dtype, device=codes.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    placeholder = scale_w  # any float32 tensor, for pointers a kernel variant never reads
    residual, gate, tokens, moments = gated if gated is not None else (placeholder[None], placeholder[None], 1, None)
    check_row_moments(moments, m, n)
    _int8_gemm_kernel[grid](
        codes, weight, rowsum, colsum, zero_w, scale_w, placeholder if bias is None else bias, qparams,
        placeholder if down is None else down, placeholder if left is None else left, out,
        placeholder if bounds is None else bounds, placeholder if bounds_scale is None else bounds_scale,
        residual, gate, placeholder if moments is None else moments, m, n, out.stride(0), residual.stride(0),
        gate.stride(0), tokens,
        K=k, PACKED_K=weight.shape[1], PACKED=packed, USE_TMA=use_tma, HAS_BIAS=bias is not None, RANK=rank,
        GELU=gelu, BOUNDS=bounds is not None, BOUNDS_SCALED=bounds_scale is not None, PER_ROW=per_row(qparams),
        BOUNDS_PER_ROW=bounds is not None and per_row(bounds), SPLITS=rowsum.shape[0], GATED=gated is not None,
        MOMENTS=moments is not None,
    )
    return out
