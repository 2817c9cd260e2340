"""Reproduce the small-batch slowdown of issue 13 (W4A8 at batch 8 slower than at batch 1): run
speed.py's sampling rows as the code before the fix compiled them, in one process, with no reset
between rows: `block.compile()` with automatic dynamic shapes and dynamo's default recompile limit.

    TORCH_LOGS=recompiles python -m benchmarks.recompile_repro --rows bf16-compile w8a8-compile w4a8-compile \
        --batches 64 8 1 --cuda-graph off --output /tmp/repro.jsonl

Every row and batch compiles DiTBlock.forward and FinalLayer.forward again (other module types,
other shapes); once a code object has 8 cache entries, dynamo stops compiling it and later rows
run those modules eagerly, which is what made the last rows of a long call slow.
"""

from __future__ import annotations

import torch

from benchmarks import speed


def compile_as_before(model: torch.nn.Module) -> None:
    for block in model.blocks:
        block.compile()
    model.final_layer.compile()


if __name__ == "__main__":
    speed.compile_blocks = compile_as_before
    torch._dynamo.reset = lambda: None  # rows share one process's compile caches, as before
    speed.main(speed.parse_args())
