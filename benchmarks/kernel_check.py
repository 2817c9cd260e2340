"""Every kernel against the `fake` backend on the same quantized layer (`python -m benchmarks.speed
--parts check`): relative error on fresh random inputs with channel outliers, float32 and bf16
inputs, at all DiT-XL/2 and demo shapes, each weight format and way of loading tiles, per-tensor
and per-token ranges, and the fused MLP."""

from __future__ import annotations

import torch

from benchmarks.synthetic import (
    GEMM_VARIANTS,
    HIDDEN,
    layer_shapes,
    outlier_input,
    quantized_layer_pair,
    quantized_mlp_pair,
)
from quant.modules import WeightOnlyLinear
from quant.triton_modules import (
    EVERY_CALL,
    KernelOptions,
    TritonWeightOnlyLinear,
    fuse_mlps,
    install_kernel_blocks,
)

CHECK_TOLERANCES = ((torch.float32, 2e-3), (torch.bfloat16, 8e-3))  # input dtype, relative error
# A large call: more than batch 8's 4,096 rows (bf16 calls of DiT-XL/2's qkv, proj and fc2 run the
# Gluon GEMM on Hopper, here and at 512 rows on its 64-row tiles: hopper_gemm.tile_config), and a
# multiple of no tile height (the last tile is partial).
LARGE_ROWS = 4196


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return ((got.float() - reference).norm() / reference.norm()).item()


@torch.no_grad()
def check_kernels(device, models: list[str], layers: list[str], emit) -> bool:
    from quant.kernels import UNPACK_FROM_ROWS

    torch.backends.cuda.matmul.allow_tf32 = False  # the fake reference in true float32
    ok = True

    def record(case: dict, kernel_module, fake_module) -> None:
        nonlocal ok
        rows, features = case["shape"][:2]
        for dtype, tolerance in CHECK_TOLERANCES:
            x = outlier_input(rows, features, device, dtype, seed=case["weight_bits"] * 7 + features)
            try:  # a variant that fails to compile is reported as failed, not fatal
                error = relative_error(kernel_module(x), fake_module(x.float()).float())
            except Exception as failure:  # noqa: BLE001
                error = float("nan")
                print(f"check {case}: {str(failure).splitlines()[0]}")
            passed = error < tolerance
            ok &= passed
            emit({"part": "check", **case, "input": str(dtype).removeprefix("torch."), "relative_error": error,
                  "tolerance": tolerance, "passed": passed})

    # Each weight format with each way of loading tiles, and per-token ranges; packed formats
    # also below UNPACK_FROM_ROWS rows, where the GEMM unpacks them in its main loop; 512 rows
    # (batch 1 with CFG), where the quantize pass splits K over programs.
    layer_variants = ({(bits, tuple(options.items()), "per_tensor", "per_channel")
                       for bits, options, _ in GEMM_VARIANTS.values()}
                      | {(3, (), "per_tensor", "per_channel"), (8, (), "per_token", "per_channel"),
                         (4, (), "per_token", "per_channel"), (4, (), "per_tensor", "two_level")})
    for model_name in models:
        hidden = HIDDEN[model_name]
        for role, (k, n) in layer_shapes(hidden).items():
            if role not in layers:
                continue
            for bits, options, granularity, weights in sorted(layer_variants):
                fake, kernel = quantized_layer_pair(k, n, bits, role == "fc2", device, act_granularity=granularity,
                                                    weight_granularity=weights, **dict(options))
                for rows in (LARGE_ROWS, 512, UNPACK_FROM_ROWS - 24) if kernel.packed else (LARGE_ROWS, 512):
                    record({"model": model_name, "layer": role, "shape": [rows, k, n], "weight_bits": bits,
                            "options": dict(options), "act": granularity, "weights": weights}, kernel, fake)
        if "adaln" in layers:  # the 8-bit weight-only adaLN on kernels.weight_only_linear, 2 × batch rows
            fake = WeightOnlyLinear.from_linear(torch.nn.Linear(hidden, 6 * hidden, device=device), 8)
            kernel = TritonWeightOnlyLinear(fake)
            for rows in (2, 16, 128):
                record({"model": model_name, "layer": "adaln", "shape": [rows, hidden, 6 * hidden], "weight_bits": 8,
                        "options": {}, "act": "float", "weights": "per_channel"}, kernel, fake)
        if "mlp" in layers:
            for bits, granularity in ((8, "per_tensor"), (4, "per_tensor"), (4, "per_token")):
                for dtype, tolerance in CHECK_TOLERANCES:
                    row = check_fused_mlp(hidden, bits, dtype, tolerance, device, granularity)
                    ok &= row["passed"]
                    emit({"part": "check", "model": model_name, **row})
        if "model" in layers and model_name == "DiT-XL/2":  # the whole model: the synthetic one of speed.py
            for row in check_kernel_model(model_name, device):
                ok &= row["passed"]
                emit({"part": "check", "model": model_name, **row})
        if "block" in layers:  # KernelDiTBlock; 2 images: batch 1 with CFG, on the Triton GEMM
            for images in (2, LARGE_ROWS // 256):
                for layout in BLOCK_LAYOUTS:
                    for dtype, tolerance in CHECK_TOLERANCES:
                        row = check_kernel_block(hidden, dtype, tolerance, device, images, layout)
                        ok &= row["passed"]
                        emit({"part": "check", "model": model_name, **row})
    return ok


# Layouts of the whole-model check: install_kernels's default, and one adaLN call per block
MODEL_LAYOUTS = {"default": KernelOptions(), "adaLN per block": KernelOptions(adaln_in_one_call=False)}
# The whole model on the kernels may be this much further from its float32 fake numerics than the
# fake numerics in bf16 are (the kernels round where bf16 layers would, and a few places more)
MODEL_ERROR_RATIO = 1.25


@torch.no_grad()
def check_kernel_model(name: str, device, images: int = 16) -> list[dict]:
    """The synthetic W4A8 model of speed.py (per-token ranges, 8-bit adaLN) laid out on the kernels
    as each of MODEL_LAYOUTS, one forward of `images` (batch 8 with CFG), against its fake numerics
    in float32; the fake numerics in bf16 set the tolerance (MODEL_ERROR_RATIO times their error).
    The model and both references are made once for all layouts."""
    import copy

    from benchmarks.synthetic import synthetic_quantized_dit
    from quant.backends import cast_float_parts, prepare_for_inference
    from quant.triton_modules import install_kernels

    quantized = synthetic_quantized_dit(name, 256, device, 4, 8, "per_token")
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(images, 4, 32, 32, generator=generator).to(device)
    t = torch.randint(0, 1000, (images,), generator=generator).to(device)
    y = torch.randint(0, 1001, (images,), generator=generator).to(device)
    reference = prepare_for_inference(copy.deepcopy(quantized), "fake", torch.float32, log=lambda _: None)(x, t, y)
    bf16 = prepare_for_inference(copy.deepcopy(quantized), "fake", torch.bfloat16, log=lambda _: None)
    fake_error = relative_error(bf16(x.bfloat16(), t, y), reference)
    del bf16
    tolerance = MODEL_ERROR_RATIO * fake_error
    cast_float_parts(quantized, torch.bfloat16)
    rows = []
    for layout, options in MODEL_LAYOUTS.items():
        kernels = copy.deepcopy(quantized)
        install_kernels(kernels, lambda _: None, options)
        error = relative_error(kernels(x.bfloat16(), t, y), reference)
        del kernels
        rows.append({"layer": f"model ({layout})", "shape": [images * 256, 1152, 1152], "weight_bits": 4,
                     "act": "per_token", "input": "bfloat16", "fake_bf16_relative_error": fake_error,
                     "relative_error": error, "tolerance": tolerance, "passed": error < tolerance})
    return rows


# KernelDiTBlock layouts the block check runs (install_kernels's default, and batch 64's)
BLOCK_LAYOUTS = {"norms fused, proj's own ranges, gated residuals": KernelOptions(
                     fuse_norms_below_rows=EVERY_CALL, gate_residuals_below_rows=EVERY_CALL),
                 "proj's own ranges, gated residuals": KernelOptions(fuse_norms_below_rows=0,
                                                                     gate_residuals_below_rows=EVERY_CALL)}


@torch.no_grad()
def check_kernel_block(hidden: int, dtype, tolerance: float, device, images: int, layout: str,
                       heads: int = 16) -> dict:
    """A DiT block on the kernels (W4A8, per-token ranges) laid out as a KernelDiTBlock
    (BLOCK_LAYOUTS[layout]) against the plain block of the same layers, over `images` of 256
    tokens: both quantize the same activations, up to the float rounding of the norm and of the
    residual update."""
    from models import DiTBlock

    with torch.random.fork_rng(devices=[]):  # the global generator as it was, for the checks after this one
        torch.manual_seed(0)
        block = DiTBlock(hidden, heads).to(device)
    for seed, (parent, name, k, n, on_the_fly) in enumerate(
            [("attn", "qkv", hidden, 3 * hidden, False), ("attn", "proj", hidden, hidden, True),
             ("mlp", "fc1", hidden, 4 * hidden, False), ("mlp", "fc2", 4 * hidden, hidden, True)]):
        setattr(getattr(block, parent), name,
                quantized_layer_pair(k, n, 4, on_the_fly, device, seed=seed, act_granularity="per_token")[1])
    model = torch.nn.ModuleDict({"block": block}).to(dtype)
    fuse_mlps(model)
    x = outlier_input(images * 256, hidden, device, dtype, seed=5).reshape(images, 256, hidden)
    c = torch.randn(images, hidden, generator=torch.Generator().manual_seed(6)).to(device, dtype)
    row = {"layer": f"block ({layout})", "shape": [images * 256, hidden, hidden], "weight_bits": 4,
           "act": "per_token", "input": str(dtype).removeprefix("torch."), "tolerance": tolerance}
    try:
        plain = model["block"](x, c).float()
        row["blocks_swapped"] = install_kernel_blocks(model, BLOCK_LAYOUTS[layout])
        row["relative_error"] = relative_error(model["block"](x, c), plain)
    except Exception as failure:  # noqa: BLE001
        print(f"check {row}: {str(failure).splitlines()[0]}")
        return row | {"passed": False}
    row["passed"] = row["blocks_swapped"] == 1 and row["relative_error"] < tolerance
    return row


@torch.no_grad()
def check_fused_mlp(hidden: int, bits: int, dtype, tolerance: float, device, act_granularity: str) -> dict:
    """fc1 -> GELU -> fc2 with GELU and fc2's range in fc1's epilogue, in three parts: fc1 + GELU
    against fake (the single-layer tolerance), the range against torch's reduction of the same
    stored output (exact), and the whole MLP against fake, which may not exceed 1.25× the error
    of the unfused kernel chain: two quantized layers in a row amplify small differences (an
    fc1 output that differs in the last bit can move an fc2 code by one step)."""
    from quant.kernels import range_bounds

    fake_mlp, fused = quantized_mlp_pair(hidden, bits, device, act_granularity)
    fc1, fc2 = fused.fc1, fused.fc2
    x = outlier_input(LARGE_ROWS, hidden, device, dtype, seed=bits)
    row = {"layer": "mlp (fused)", "shape": [LARGE_ROWS, hidden, hidden], "weight_bits": bits, "act": act_granularity,
           "input": str(dtype).removeprefix("torch."), "tolerance": tolerance}
    try:
        stored, bounds = torch.ops.ditas.int8_linear_gelu(x, fc1.qparams(x), **fc1.kernel_tensors()._asdict(),
                                                          bounds_scale=fc2.smooth_inv, with_bounds=True,
                                                          bounds_per_row=fc2.per_token)
        reference = fake_mlp(x.float()).float()
        unfused = fc2(torch.nn.functional.gelu(fc1(x), approximate="tanh"))
        row |= {"fc1_gelu_error": relative_error(stored, fake_mlp.act(fake_mlp.fc1(x.float())).float()),
                "range_exact": bool(torch.equal(bounds, range_bounds(stored.float() * fc2.smooth_inv, fc2.per_token))),
                "relative_error": relative_error(fused(x), reference),
                "unfused_chain_error": relative_error(unfused, reference)}
    except Exception as failure:  # noqa: BLE001
        print(f"check {row}: {str(failure).splitlines()[0]}")
        return row | {"passed": False}
    row["passed"] = (row["fc1_gelu_error"] < tolerance and row["range_exact"]
                     and row["relative_error"] <= 1.25 * row["unfused_chain_error"])
    return row
