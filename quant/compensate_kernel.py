"""The column loop of error-compensating rounding as one Triton launch per block of columns.

`compensate.compensated_codes` rounds a weight column by column; written in torch, each column
costs about a dozen kernel launches, so on a GPU a DiT-XL/2 layer spends its time launching
(1,152 to 4,608 columns × 10 LoRA iterations × 112 layers). Rows are independent within a block
(the compensation moves a row's error only along that row), so here each program keeps a block
of rows × the block's columns in registers and walks the columns itself. Same arithmetic as the
torch loop; the GPU may fuse a multiply and a subtraction into one rounding (FMA), so a code can
differ from the CPU's in a rare tie, never in kind.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 · 2^23: (v + M) − M rounds float32 |v| < 2^22 half to even
BLOCK_ROWS = 8 if INTERPRETED else 16


@triton.jit
def _compensate_columns_kernel(w_ptr, upper_ptr, scale_ptr, zero_ptr, low_ptr, high_ptr, codes_ptr, errors_ptr,
                               ROWS, WIDTH: tl.constexpr, BLOCK: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    # all tensors (rows, BLOCK) row-major, except upper (BLOCK, BLOCK); columns ≥ WIDTH are padding
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < ROWS
    tile = rows[:, None] * BLOCK + cols[None, :]
    w = tl.load(w_ptr + tile, mask=row_ok[:, None], other=0.0)
    codes = tl.zeros([BLOCK_ROWS, BLOCK], tl.float32)
    errors = tl.zeros([BLOCK_ROWS, BLOCK], tl.float32)
    for j in range(WIDTH):
        here = (cols == j)[None, :]
        column = tl.sum(tl.where(here, w, 0.0), axis=1)
        at = rows * BLOCK + j
        scale = tl.load(scale_ptr + at, mask=row_ok, other=1.0)
        zero = tl.load(zero_ptr + at, mask=row_ok, other=0.0)
        low = tl.load(low_ptr + at, mask=row_ok, other=0.0)
        high = tl.load(high_ptr + at, mask=row_ok, other=0.0)
        rounded = (tl.math.div_rn(column, scale) + ROUND_MAGIC) - ROUND_MAGIC
        q = tl.minimum(tl.maximum(rounded + zero, low), high)
        error = tl.math.div_rn(column - (q - zero) * scale, tl.load(upper_ptr + j * BLOCK + j))
        w -= error[:, None] * tl.load(upper_ptr + j * BLOCK + cols)[None, :]  # upper is 0 left of j
        codes = tl.where(here, q[:, None], codes)
        errors = tl.where(here, error[:, None], errors)
    tl.store(codes_ptr + tile, codes, mask=row_ok[:, None])
    tl.store(errors_ptr + tile, errors, mask=row_ok[:, None])


def compensate_columns(w: torch.Tensor, upper: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                       low: torch.Tensor, high: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scaled errors) of one block of columns: `compensate.column_loop`'s contract, in one launch.
    w, scale, zero, low, high: (rows, width) float32; upper: (width, width); width ≤ block, a power of 2."""
    rows, width = w.shape

    def padded(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        out = torch.zeros(size, dtype=torch.float32, device=w.device)
        out[: t.shape[0], : t.shape[1]] = t
        return out

    blocks = [padded(t, (rows, block)) for t in (w, scale, zero, low, high)]
    codes, errors = torch.empty_like(blocks[0]), torch.empty_like(blocks[0])
    _compensate_columns_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
        *blocks[:1], padded(upper, (block, block)), *blocks[1:], codes, errors, rows, width,
        BLOCK=block, BLOCK_ROWS=BLOCK_ROWS)
    return codes[:, :width], errors[:, :width]
