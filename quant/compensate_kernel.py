"""The column loop of error-compensating rounding as one Triton launch per block of columns.

`compensate.compensated_codes` rounds a weight column by column; written in torch, each column
costs about a dozen kernel launches, so on a GPU a DiT-XL/2 layer spends its time launching
(1,152 to 4,608 columns × 10 LoRA iterations × 112 layers). Rows are independent within a block
(the compensation moves a row's error only along that row), so here each program keeps a block
of rows × the block's columns in registers and walks the columns itself, reading the weight, the
grid and U in place. Same arithmetic as `compensate.column_loop`; the GPU may fuse a multiply and
a subtraction into one rounding (FMA), so a code can differ from the CPU's in a rare tie.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernels import INTERPRETED, ROUND_MAGIC

BLOCK_ROWS = 8 if INTERPRETED else 16
WARPS = 4


@triton.jit
def _compensate_columns_kernel(w_ptr, upper_ptr, scale_ptr, zero_ptr, low_ptr, high_ptr, codes_ptr, errors_ptr,
                               ROWS, COLUMNS, START, WIDTH: tl.constexpr, BLOCK: tl.constexpr,
                               BLOCK_ROWS: tl.constexpr):
    # w, scale … high and codes: (ROWS, COLUMNS) row-major; upper (COLUMNS, COLUMNS); errors (ROWS, WIDTH).
    # This launch walks columns START … START + WIDTH − 1 (WIDTH ≤ BLOCK).
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offsets = tl.arange(0, BLOCK)
    row_ok = rows < ROWS
    in_block = row_ok[:, None] & (offsets < WIDTH)[None, :]
    w = tl.load(w_ptr + rows[:, None] * COLUMNS + START + offsets[None, :], mask=in_block, other=0.0)
    codes = tl.zeros([BLOCK_ROWS, BLOCK], tl.float32)
    errors = tl.zeros([BLOCK_ROWS, BLOCK], tl.float32)
    for j in range(WIDTH):
        here = (offsets == j)[None, :]
        column = tl.sum(tl.where(here, w, 0.0), axis=1)
        at = rows * COLUMNS + START + j
        scale = tl.load(scale_ptr + at, mask=row_ok, other=1.0)
        zero = tl.load(zero_ptr + at, mask=row_ok, other=0.0)
        low = tl.load(low_ptr + at, mask=row_ok, other=0.0)
        high = tl.load(high_ptr + at, mask=row_ok, other=0.0)
        rounded = (tl.math.div_rn(column, scale) + ROUND_MAGIC) - ROUND_MAGIC
        q = tl.minimum(tl.maximum(rounded + zero, low), high)
        diagonal = (START + j) * COLUMNS + START + j
        error = tl.math.div_rn(column - (q - zero) * scale, tl.load(upper_ptr + diagonal))
        # U's row j from its diagonal on (U is upper triangular: nothing changes left of j)
        u = tl.load(upper_ptr + diagonal - j + offsets, mask=(offsets >= j) & (offsets < WIDTH), other=0.0)
        w -= error[:, None] * u[None, :]
        codes = tl.where(here, q[:, None], codes)
        errors = tl.where(here, error[:, None], errors)
    tl.store(codes_ptr + rows[:, None] * COLUMNS + START + offsets[None, :], codes, mask=in_block)
    tl.store(errors_ptr + rows[:, None] * WIDTH + offsets[None, :], errors, mask=in_block)


def compensate_columns(w: torch.Tensor, upper: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                       low: torch.Tensor, high: torch.Tensor, span: slice, codes: torch.Tensor,
                       warps: int = WARPS) -> torch.Tensor:
    """`compensate.column_loop` in one launch (w inside the span is not written back: only the
    errors matter to the later columns). Every tensor contiguous float32, as compensated_codes
    passes them."""
    rows, columns = w.shape
    width = span.stop - span.start
    errors = torch.empty(rows, width, dtype=torch.float32, device=w.device)
    _compensate_columns_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
        w, upper, scale, zero, low, high, codes, errors, rows, columns, span.start,
        WIDTH=width, BLOCK=triton.next_power_of_2(width), BLOCK_ROWS=BLOCK_ROWS, num_warps=warps)
    return errors
