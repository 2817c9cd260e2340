"""The `triton` backend's modules: a QuantLinear computed by the int8 kernels (quant/kernels.py),
DiT's Mlp with GELU and fc2's range fused into fc1's epilogue, DiT blocks whose qkv and fc1 take
their LayerNorm + modulation in the quantize pass, whose proj's pass takes its own ranges and whose
proj and fc2 apply the gated residual update in their epilogues (with the updated rows' moments
for the next norm), the 8-bit adaLN on a weight-only kernel (all blocks' in one call), the kernels
as torch custom ops (opaque to torch.compile), and the swap of a model's layers for them
(install_kernels, laid out by KernelOptions)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import DiTBlock, Modulation, modulate

from .backends import swap_covered_layers
from .modules import KeepsDtypes, QuantLinear, WeightOnlyLinear
from .primitives import activation_qparams, row_first_range, unpack_int4
from .split_lora import SplitRight, split_lora
from .targets import swap_modules

MAX_KERNEL_ACT_BITS = 8
KERNEL_ACT_GRANULARITIES = ("per_tensor", "per_token")


class KernelTensors(NamedTuple):
    """A TritonQuantLinear's arguments of the ditas ops after (x, qparams). Passed by name
    (`**tensors._asdict()`), so only the ops' signatures fix an order."""

    smooth_inv: torch.Tensor | None
    lora_right: torch.Tensor | None
    weight: torch.Tensor
    packed: bool
    column_sums: torch.Tensor
    weight_zero: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    lora_left: torch.Tensor | None
    act_bits: int
    use_tma: bool
    group_table: torch.Tensor | None
    lora_right_sums: torch.Tensor | None


def kernel_unsupported_reason(layer: QuantLinear) -> str | None:
    """Why the integer kernels cannot run `layer` (None: they can)."""
    if layer.group_size != layer.in_features and layer.weight_group_scale is None:
        return "per-group weight scales"
    if layer.act_format != "int":
        return f"{layer.act_format} activations (backend fp8)"
    if layer.act_granularity not in KERNEL_ACT_GRANULARITIES:
        return f"{layer.act_granularity} activation ranges"
    if layer.act_bits > MAX_KERNEL_ACT_BITS:
        return f"{layer.act_bits}-bit activations"
    return None


class TritonQuantLinear(KeepsDtypes):
    """The same function as a QuantLinear, computed by the int8 kernels. Built from a QuantLinear;
    holds only what the kernels read (codes signed or packed, int32 column sums and zero points,
    float32 scales and bias, the LoRA's factors as split_lora holds them: L·diag(s) in bf16 and R̃
    in two int8 halves, padded to a rank multiple of 16)."""

    def __init__(self, source: QuantLinear, use_tma: bool | None = None):
        super().__init__()
        from .kernels import BYTE_SHIFT, LORA_MULTIPLE, LORA_TORCH_DTYPE, PACKED_SHIFT, pack_split

        self.in_features, self.out_features = source.in_features, source.out_features
        self.act_bits, self.weight_bits, self.packed = source.act_bits, source.weight_bits, source.packed
        self.act_granularity = source.act_granularity
        # TMA tile loads: 1.1-1.2x faster for packed weights on an H100, slower for int8 codes
        # except at fc2's shape (benchmarks/RESULTS.md). TMA needs 16-byte aligned row strides.
        self.use_tma = (self.packed and self.in_features % 16 == 0) if use_tma is None else use_tma
        codes = unpack_int4(source.weight_codes) if self.packed else source.weight_codes
        table = None
        if source.weight_group_scale is not None:
            # two-level groups: the GEMM's weight operand is the int8 (c − z)·k, zero point 0
            k, z = source.weight_group_scale, source.weight_zero
            signed = ((codes.reshape(*k.shape, -1).to(torch.int32) - z.to(torch.int32).unsqueeze(-1))
                      * k.to(torch.int32).unsqueeze(-1)).reshape(codes.shape)
            weight = pack_split(codes) if self.packed else signed.to(torch.int8)
            table = torch.stack([k, z], dim=-1).contiguous() if self.packed else None
            weight_zero = torch.zeros(self.out_features, dtype=torch.int32, device=codes.device)
            self.use_tma = False  # unpacked before every GEMM
        else:
            shift = PACKED_SHIFT.value if self.packed else BYTE_SHIFT
            signed = codes.to(torch.int32) - shift
            weight = pack_split(codes) if self.packed else signed.to(torch.int8)
            weight_zero = source.weight_zero.reshape(-1).to(torch.int32) - shift
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("group_table", table)
        self.register_buffer("column_sums", signed.sum(dim=1, dtype=torch.int32))
        self.register_buffer("weight_zero", weight_zero)
        self.register_buffer("weight_scale", source.weight_scale.reshape(-1).float().contiguous())
        self.register_buffer("bias", None if source.bias is None else source.bias.float().contiguous())
        self.register_buffer("smooth_inv", None if source.smooth_inv is None else source.smooth_inv.float())
        self.register_buffer("act_range", None if source.act_range is None else source.act_range.float())
        left, right = source.lora_left, None
        if left is not None:
            missing = -left.shape[1] % LORA_MULTIPLE  # zero ranks up to the padded rank
            left, right = split_lora(F.pad(left.float(), (0, missing)),
                                     F.pad(source.lora_right.float(), (0, 0, 0, missing)))
            left = left.to(LORA_TORCH_DTYPE).contiguous()
        self.register_buffer("lora_left", left)
        self.register_buffer("lora_right", None if right is None else right.codes)
        self.register_buffer("lora_right_sums", None if right is None else right.sums)

    @property
    def split_right(self) -> SplitRight | None:
        """The LoRA's R̃ as the kernels take it (quant/split_lora.py), or None without a LoRA."""
        return None if self.lora_right is None else SplitRight(self.lora_right, self.lora_right_sums)

    @property
    def per_token(self) -> bool:
        return self.act_granularity == "per_token"

    def qparams(self, x2d: torch.Tensor) -> torch.Tensor:
        """[scales; zeros] of the activation codes, (2, 1) or per token (2, rows), as a float32
        device tensor (no host sync)."""
        if self.act_range is not None:
            return self.qparams_of_range(self.act_range[:1], self.act_range[1:])
        smoothed = x2d if self.smooth_inv is None else x2d * self.smooth_inv
        return self.qparams_of_range(*row_first_range(smoothed, self.act_granularity))

    def qparams_of_range(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """(2, R) [scales; zeros] of R ranges (lo, hi: (R,), (R, 1) or scalars)."""
        return torch.stack(activation_qparams(lo, hi, self.act_bits)).reshape(2, -1)

    def kernel_tensors(self) -> KernelTensors:
        """The layer's arguments of the ditas ops, after (x, qparams): its attributes of those names."""
        return KernelTensors(**{name: getattr(self, name) for name in KernelTensors._fields})

    def linear_2d(self, x2d: torch.Tensor, qparams: torch.Tensor | None,
                  input_bounds: torch.Tensor | None = None) -> torch.Tensor:
        """The layer of 2-D x with these qparams (None: per-token ranges taken by the quantize pass,
        where ranges_in_pass, or with input_bounds from those: int8_linear's)."""
        return torch.ops.ditas.int8_linear(x2d, qparams, **self.kernel_tensors()._asdict(), input_bounds=input_bounds)

    def gated_2d(self, x2d: torch.Tensor, qparams: torch.Tensor | None, residual: torch.Tensor, gate: torch.Tensor,
                 with_moments: bool = False, input_bounds: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """residual + gate ⊙ linear_2d(x2d, qparams, input_bounds) as 2-D rows, for residual (N, T,
        out) and the per-sample gate (N, out), row r of x in sample r // T; with_moments: and the
        output's row moments for the next LayerNorm (kernels.row_moments; else None)."""
        gate = gate if gate.stride(-1) == 1 else gate.contiguous()
        out, moments = torch.ops.ditas.int8_linear_gated(
            x2d, qparams, **self.kernel_tensors()._asdict(), residual=rows_of(residual, self.out_features),
            gate=gate, gate_tokens=residual.shape[1], with_moments=with_moments, input_bounds=input_bounds)
        return out, moments if with_moments else None

    def input_qparams(self, x2d: torch.Tensor, own_ranges: bool) -> torch.Tensor | None:
        """qparams(x2d), or None with own_ranges: the quantize pass takes the per-token ranges itself
        (only where ranges_in_pass: the pass computes no whole-tensor and no static range)."""
        if own_ranges and not self.ranges_in_pass:
            raise ValueError("own_ranges needs dynamic per-token ranges (ranges_in_pass)")
        return None if own_ranges else self.qparams(x2d)

    def gated(self, x: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor, own_ranges: bool = False,
              with_moments: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """residual + gate.unsqueeze(1) ⊙ layer(x) for x (N, T, in), residual (N, T, out) and the
        per-sample gate (N, out): DiT's gated residual update in the GEMM's epilogue (own_ranges:
        see input_qparams), and with_moments its rows' moments (gated_2d; else None)."""
        x2d = rows_of(x, self.in_features)
        out, moments = self.gated_2d(x2d, self.input_qparams(x2d, own_ranges), residual, gate, with_moments)
        return out.reshape(residual.shape), moments

    def forward(self, x: torch.Tensor, own_ranges: bool = False) -> torch.Tensor:
        x2d = rows_of(x, self.in_features)
        return self.linear_2d(x2d, self.input_qparams(x2d, own_ranges)).reshape(*x.shape[:-1], self.out_features)

    def normed(self, x: torch.Tensor, norm: NormModulation) -> torch.Tensor:
        """The layer of LayerNorm(x)·(1 + scale) + shift for the residual stream x (N, T, D), with
        the norm, the modulation and the per-token quantization in one pass over x."""
        return torch.ops.ditas.int8_linear(rows_of(x, self.in_features), None, **self.kernel_tensors()._asdict(),
                                           **norm.op_arguments(x)).reshape(*x.shape[:-1], self.out_features)

    @property
    def ranges_in_pass(self) -> bool:
        """Whether the quantize pass can take this layer's input ranges itself (`normed`, or qparams
        None): dynamic per-token ranges (of the input times smooth_inv, where it has one)."""
        return self.per_token and self.act_range is None

    def extra_repr(self) -> str:
        rank = 0 if self.lora_left is None else self.lora_left.shape[1]
        return (f"in={self.in_features}, out={self.out_features}, W{self.weight_bits}A{self.act_bits} int8 GEMM, "
                f"packed={self.packed}, tma={self.use_tma}, act={self.act_granularity}, lora_rank(padded)={rank}, "
                f"smooth_on_the_fly={self.smooth_inv is not None}")


EVERY_CALL = 1 << 40  # a row threshold of KernelOptions that no call reaches: that layout at every batch


class KernelOptions(NamedTuple):
    """How install_kernels lays a model onto the kernels. The defaults measured fastest on an H100
    at batch 1, 8 and 64 (benchmarks/RESULTS.md); benchmarks/speed.py's rows vary them."""

    weight_only_adaln: bool = True  # 8-bit adaLN layers on kernels.weight_only_linear, not dequantised per call
    # calls of fewer rows take per-token qkv's and fc1's LayerNorm + modulation in their quantize pass
    # (KernelDiTBlock; 0: never). At 32,768 rows (batch 64) torch.compile's fusion of the norms
    # with the ranges measured faster in the seventh session; with the Gluon epilogues' prefetch
    # (twelfth) the kernels' layout is faster there too (53.5 against 57.0 ms/step, thirteenth).
    fuse_norms_below_rows: int = EVERY_CALL
    # calls of fewer rows have proj's and fc2's epilogues apply the block's gated residual update
    # (KernelDiTBlock; 0: never). Every call: with the norms in the quantize passes nothing else
    # would fuse the update.
    gate_residuals_below_rows: int = EVERY_CALL
    # proj's quantize pass takes its per-token ranges itself (KernelDiTBlock), not a reduction beforehand
    proj_own_ranges: bool = True
    # where both are on, fc1's norm pass takes its rows' mean and variance from proj's gated
    # epilogue (kernels.GatedResidual.moments) instead of a pass of its own over them, and qkv's
    # from the previous block's fc2 (install_kernel_blocks, in a model's `blocks`)
    norm_moments_from_update: bool = True
    # with weight_only_adaln, the adaLN layers of all kernel blocks in one weight-only call
    # (ModulationBank) rather than one call per block (9 µs each at batch 1): sampling took 3.15
    # against 3.34 ms/step at batch 1, 8.78 against 8.94 at 8, 51.73 against 51.81 at 64 (W4A8,
    # fifteenth session)
    adaln_in_one_call: bool = True


DEFAULT_KERNEL_OPTIONS = KernelOptions()


class TritonWeightOnlyLinear(KeepsDtypes):
    """A WeightOnlyLinear (the 8-bit adaLN) computed by kernels.weight_only_linear: its codes
    read once per call instead of dequantised to a bf16 copy of the weight first."""

    def __init__(self, source: WeightOnlyLinear):
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.register_buffer("weight_codes", source.weight_codes.contiguous())
        self.register_buffer("weight_zero", source.weight_zero.reshape(-1).contiguous())
        self.register_buffer("weight_scale", source.weight_scale.reshape(-1).float().contiguous())
        self.register_buffer("bias", source.bias.float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return weight_only_rows(self, rows_of(x, self.in_features)).reshape(*x.shape[:-1], self.out_features)


def weight_only_rows(layer: TritonWeightOnlyLinear | ModulationBank, x2d: torch.Tensor) -> torch.Tensor:
    """The weight-only op on 2-D rows with the codes, zero points, scales and bias `layer` holds."""
    return torch.ops.ditas.weight_only_linear(x2d, layer.weight_codes, layer.weight_zero, layer.weight_scale,
                                              layer.bias)


class BlockModulation(NamedTuple):
    """What a KernelDiTBlock is called with in place of the conditioning c where a ModulationBank
    computed its adaLN output: that output, (N, 6D)."""

    values: torch.Tensor


class ModulationBank:
    """The adaLN modulations of all of a model's kernel blocks in one weight-only call. Every DiT
    block conditions on the same c, so their 8-bit adaLN layers stacked make one (depth·6D, D)
    layer, read by one launch instead of one per block. The blocks' TritonWeightOnlyLinear buffers
    become views of the stacked ones (no second copy). Called as the model's block_conditions
    (models.DiT.forward); not an nn.Module, so the model's state-dict keys and buffers stay the
    blocks' own. Install it after the model's last move or cast (install_kernels does)."""

    def __init__(self, layers: list[TritonWeightOnlyLinear]):
        self.width = layers[0].out_features  # every block's adaLN output, (N, width)
        for name in ("weight_codes", "weight_zero", "weight_scale", "bias"):
            stacked = torch.cat([getattr(layer, name) for layer in layers])
            setattr(self, name, stacked)
            for layer, rows in zip(layers, stacked.split(self.width)):
                setattr(layer, name, rows)

    def __call__(self, c: torch.Tensor) -> list[BlockModulation]:
        if c.device != self.weight_codes.device:  # the model moved after install_kernels: the views did not
            raise RuntimeError(f"the adaLN bank's weights are on {self.weight_codes.device}, the model's input on "
                               f"{c.device}: move the model before preparing it for the triton backend")
        out = weight_only_rows(self, rows_of(F.silu(c), c.shape[-1]))
        return [BlockModulation(values) for values in out.split(self.width, dim=1)]


def bankable_adaln(block: nn.Module) -> TritonWeightOnlyLinear | None:
    """A kernel block's adaLN layer, where it is SiLU then a TritonWeightOnlyLinear (else None)."""
    adaln = getattr(block, "adaLN_modulation", None)
    if (isinstance(block, KernelDiTBlock) and isinstance(adaln, nn.Sequential) and len(adaln) == 2
            and isinstance(adaln[0], nn.SiLU) and isinstance(adaln[1], TritonWeightOnlyLinear)):
        return adaln[1]
    return None


def install_modulation_bank(model: nn.Module) -> int:
    """Make a ModulationBank the model's block_conditions, where every block of its `blocks` is a
    KernelDiTBlock with a bankable adaLN layer of one shape (else leave the model as it is); how
    many blocks it serves."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not hasattr(model, "block_conditions"):
        return 0
    layers = [bankable_adaln(block) for block in blocks]
    if not layers or any(layer is None for layer in layers) or len(
            {(layer.in_features, layer.out_features) for layer in layers}) != 1:
        return 0
    model.block_conditions = ModulationBank(layers)
    return len(layers)


def install_weight_only_kernels(model: nn.Module) -> int:
    """Swap every WeightOnlyLinear for a TritonWeightOnlyLinear (in place); how many."""
    register_kernel_op()
    return swap_modules(model, lambda module: isinstance(module, WeightOnlyLinear), TritonWeightOnlyLinear)


class NormModulation(NamedTuple):
    """DiT's LayerNorm (no affine) + adaLN modulation of a layer's input: per-sample (N, D) shift and
    scale; `moments`: the input's row moments where the GEMM that wrote it left them (gated_2d)."""

    shift: torch.Tensor
    scale: torch.Tensor
    eps: float
    moments: torch.Tensor | None = None

    def op_arguments(self, x: torch.Tensor) -> dict:
        """The ditas ops' norm arguments for the residual stream x (N, T, D)."""
        return dict(norm_shift=self.shift, norm_scale=self.scale, norm_tokens=x.shape[1], norm_eps=self.eps,
                    norm_moments=self.moments)


def rows_of(x: torch.Tensor, features: int) -> torch.Tensor:
    """x as (rows, features) with stride 1 along the features, as the kernels read it."""
    x2d = x.reshape(-1, features)
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


NORM_ARGUMENTS = ("norm_shift", "norm_scale", "norm_tokens", "norm_eps", "norm_moments")  # of the ops


class TritonQuantMlp(nn.Module):
    """DiT's Mlp (fc1 -> tanh GELU -> fc2) on the kernels with fewer passes over the hidden
    activations: fc1's GEMM epilogue applies GELU and, where fc2's input range is dynamic, takes
    it (per tensor or per token, of GELU output × fc2's smoothing factors) while it stores the
    output."""

    def __init__(self, fc1: TritonQuantLinear, fc2: TritonQuantLinear):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x: torch.Tensor, norm: NormModulation | None = None) -> torch.Tensor:
        """The Mlp of x, or with `norm` of LayerNorm(x)·(1 + scale) + shift (TritonQuantLinear.normed)."""
        hidden, qparams, bounds = self.hidden(x, norm)
        return self.fc2.linear_2d(hidden, qparams, bounds).reshape(*x.shape[:-1], self.fc2.out_features)

    def gated(self, x: torch.Tensor, norm: NormModulation | None, residual: torch.Tensor, gate: torch.Tensor,
              with_moments: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """residual + gate.unsqueeze(1) ⊙ forward(x, norm), and with_moments its rows' moments
        (TritonQuantLinear.gated)."""
        hidden, qparams, bounds = self.hidden(x, norm)
        out, moments = self.fc2.gated_2d(hidden, qparams, residual, gate, with_moments, bounds)
        return out.reshape(residual.shape), moments

    def hidden(self, x: torch.Tensor, norm: NormModulation | None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(GELU(fc1(…)) as 2-D rows, fc2's qparams, fc2's input bounds): for a static fc2 range its
        qparams and None, for a dynamic one None and the bounds fc1's epilogue reduced, from which
        fc2's quantize pass takes its qparams (int8_linear's input_bounds)."""
        x2d = rows_of(x, self.fc1.in_features)
        dynamic = self.fc2.act_range is None
        first = dict(qparams=None, **norm.op_arguments(x)) if norm else dict(qparams=self.fc1.qparams(x2d))
        hidden, bounds = torch.ops.ditas.int8_linear_gelu(x2d, **first, **self.fc1.kernel_tensors()._asdict(),
                                                          bounds_scale=self.fc2.smooth_inv, with_bounds=dynamic,
                                                          bounds_per_row=self.fc2.per_token)
        return (hidden, None, bounds) if dynamic else (hidden, self.fc2.qparams(hidden), None)


class ResidualStream(NamedTuple):
    """What a KernelDiTBlock hands the next one (hands_on_moments): the residual stream x (N, T,
    D) and its rows' moments, as fc2's gated epilogue left them (None: none), for qkv's norm."""

    x: torch.Tensor
    moments: torch.Tensor | None


class KernelDiTBlock(DiTBlock):
    """A DiT block laid out on the kernels, with fewer passes over its activations than the plain
    block (benchmarks/RESULTS.md says what measured faster where):
    - in calls of fewer than `fuse_norms_below_rows` rows (by default every call), qkv's and
      fc1's quantize passes take their LayerNorm + modulation (TritonQuantLinear.normed: the
      modulated activations are never stored); larger calls leave the norms to torch.compile,
      which fuses them with the range reductions;
    - in calls of fewer than `gate_residuals_below_rows` rows (by default every call), proj's and
      fc2's GEMM epilogues apply the gated residual update x + gate ⊙ y
      (TritonQuantLinear.gated), so y is never stored either; larger calls leave it to
      torch.compile, which fuses it into the next norm;
    - with `proj_own_ranges`, proj's quantize pass takes its per-token ranges itself (qparams
      None), instead of a reduction over the attention's output first;
    - with both of the first two and `norm_moments_from_update`, proj's epilogue also writes the
      updated rows' moments, from which fc1's pass takes its norm's mean and variance; with
      `hands_on_moments` (set by install_kernel_blocks where the next block is a KernelDiTBlock)
      fc2's does too, and the block returns a ResidualStream for the next block's qkv (which
      takes a ResidualStream or a tensor);
    - called with a BlockModulation in place of c (ModulationBank), it takes its adaLN output from it.
    Same submodules (and state-dict keys) as the DiTBlock it is built from."""

    def __init__(self, block: nn.Module, options: KernelOptions):
        nn.Module.__init__(self)  # not DiTBlock's: the block's own submodules, not new ones
        for name in ("norm1", "attn", "norm2", "mlp", "adaLN_modulation"):
            setattr(self, name, getattr(block, name))
        takes_norms = self.attn.qkv.ranges_in_pass and self.mlp.fc1.ranges_in_pass
        self.fuse_norms_below_rows = options.fuse_norms_below_rows if takes_norms else 0
        self.gate_residuals_below_rows = options.gate_residuals_below_rows
        self.proj_own_ranges = options.proj_own_ranges and self.attn.proj.ranges_in_pass
        self.norm_moments_from_update = options.norm_moments_from_update
        self.hands_on_moments = False

    def forward(self, x: torch.Tensor | ResidualStream, c: torch.Tensor | BlockModulation
                ) -> torch.Tensor | ResidualStream:
        x, moments = x if isinstance(x, ResidualStream) else (x, None)
        m = Modulation.of(c.values) if isinstance(c, BlockModulation) else self.modulation(c)
        rows = x.shape[0] * x.shape[1]
        fuse_norms, gated = rows < self.fuse_norms_below_rows, rows < self.gate_residuals_below_rows
        with_moments = fuse_norms and self.norm_moments_from_update
        if fuse_norms:
            qkv = self.attn.qkv.normed(x, NormModulation(m.shift_msa, m.scale_msa, self.norm1.eps, moments))
        else:
            qkv = self.attn.qkv(modulate(self.norm1(x), m.shift_msa, m.scale_msa))
        attended = self.attn.attend(qkv)
        moments = None
        if gated:
            x, moments = self.attn.proj.gated(attended, x, m.gate_msa, self.proj_own_ranges, with_moments)
        else:
            x = x + m.gate_msa.unsqueeze(1) * self.attn.proj(attended, self.proj_own_ranges)
        if fuse_norms:
            mlp_input, norm = x, NormModulation(m.shift_mlp, m.scale_mlp, self.norm2.eps, moments)
        else:
            mlp_input, norm = modulate(self.norm2(x), m.shift_mlp, m.scale_mlp), None
        moments = None
        if gated:
            x, moments = self.mlp.gated(mlp_input, norm, x, m.gate_mlp, with_moments and self.hands_on_moments)
        else:
            x = x + m.gate_mlp.unsqueeze(1) * self.mlp(mlp_input, norm)
        return ResidualStream(x, moments) if self.hands_on_moments else x


def kernel_block(module: nn.Module) -> bool:
    """Whether `module` is a DiT block whose four layers run on the kernels, the MLP fused (KernelDiTBlock)."""
    attn = getattr(module, "attn", None)
    return (hasattr(module, "adaLN_modulation") and isinstance(getattr(attn, "qkv", None), TritonQuantLinear)
            and isinstance(getattr(attn, "proj", None), TritonQuantLinear)
            and isinstance(getattr(module, "mlp", None), TritonQuantMlp))


def install_kernel_blocks(model: nn.Module, options: KernelOptions = DEFAULT_KERNEL_OPTIONS) -> int:
    """Swap every DiT block whose layers run on the kernels for a KernelDiTBlock laid out by
    `options` (in place; after fuse_mlps); how many. In a model's `blocks` (DiT's: each block's
    output is the next one's input), a KernelDiTBlock followed by one that takes its norms in the
    pass hands it its output's row moments (hands_on_moments)."""
    swapped = swap_modules(model, kernel_block, lambda block: KernelDiTBlock(block, options))
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList) and options.norm_moments_from_update:
        for block, following in zip(blocks, list(blocks)[1:]):
            if isinstance(block, KernelDiTBlock):
                block.hands_on_moments = isinstance(following, KernelDiTBlock) and following.fuse_norms_below_rows > 0
    return swapped


def fusable_mlp(module: nn.Module) -> bool:
    """Whether `module` is a DiT Mlp whose two layers both run on the kernels."""
    act = getattr(module, "act", None)
    return (isinstance(getattr(module, "fc1", None), TritonQuantLinear)
            and isinstance(getattr(module, "fc2", None), TritonQuantLinear)
            and isinstance(act, nn.GELU) and act.approximate == "tanh")


def fuse_mlps(model: nn.Module) -> int:
    """Swap every Mlp whose two layers run on the kernels for a TritonQuantMlp (in place); how many."""
    return swap_modules(model, fusable_mlp, lambda mlp: TritonQuantMlp(mlp.fc1, mlp.fc2))


_registered = False


def register_kernel_op() -> None:
    """torch.ops.ditas.int8_linear, int8_linear_gated, int8_linear_gelu and weight_only_linear: the kernels as custom
    ops, opaque to torch.compile (which still fuses the range reductions and everything around them)."""
    global _registered
    if _registered:
        return
    from .kernels import (
        GatedResidual,
        int8_gemm,
        lora_down_in_gemm,
        norm_quantize_rows,
        quantize_rows,
        ranged_quantize_rows,
        row_moments,
        row_moments_shape,
        stays_packed,
        unpacked_alongside,
        weight_only_linear,
    )

    def run(x, qparams, *, smooth_inv, lora_right, weight, packed, column_sums, weight_zero, weight_scale, bias,
            lora_left, act_bits, use_tma, group_table, lora_right_sums, norm_shift=None, norm_scale=None,
            norm_tokens=0, norm_eps=0.0, norm_moments=None, input_bounds=None, **epilogue):
        unpack = unpacked_alongside(weight, packed, group_table, *x.shape)
        init_bounds = epilogue.get("bounds")  # the GEMM's output range: the pass fills it with +inf
        right = None if lora_right is None else SplitRight(lora_right, lora_right_sums)
        # where the GEMM computes the LoRA's down-projection itself, the pass leaves it out
        rank = 0 if right is None else right.rank
        down_in_gemm = lora_down_in_gemm(x.shape[0], weight.shape[0], x.shape[1], rank,
                                         stays_packed(packed, group_table, x.shape[0]), x.dtype, x.device,
                                         epilogue.get("gated"))
        gemm_right, right = (right, None) if down_in_gemm else (None, right)
        if norm_shift is not None:  # x: the residual stream; LayerNorm + modulation + quantize in one pass
            codes, rowsum, down, qparams = norm_quantize_rows(x, norm_shift, norm_scale, norm_tokens, norm_eps,
                                                              act_bits, right, unpack, smooth_inv, norm_moments,
                                                              init_bounds)
        elif qparams is None and input_bounds is None:  # per-token ranges taken by the pass
            codes, rowsum, down, qparams = ranged_quantize_rows(x, act_bits, right, unpack, smooth_inv,
                                                                init_bounds)
        else:  # qparams given, or taken by the pass from the bounds of x that the GEMM before it left
            if input_bounds is not None:
                qparams = torch.empty_like(input_bounds)
            codes, rowsum, down = quantize_rows(x, qparams, act_bits, smooth_inv, right, unpack=unpack,
                                                bounds=input_bounds, init_bounds=init_bounds)
        if unpack is not None:
            weight, packed, use_tma = unpack.unpacked, False, False
        return int8_gemm(codes, rowsum, qparams, weight, packed, column_sums, weight_zero, weight_scale, bias, down,
                         lora_left, x.dtype, use_tma, group_table=group_table, right=gemm_right, **epilogue)

    def tensors_of(arguments: dict) -> dict:
        """An op's KernelTensors arguments, its norm + modulation and its input bounds where it has
        them, by name."""
        return {name: arguments[name] for name in (*KernelTensors._fields, *NORM_ARGUMENTS, "input_bounds")
                if name in arguments}

    def fake_rule(op, shapes):
        """A fake-tensor rule reading the op's arguments by name, however they were passed."""
        signature = inspect.signature(op)

        def rule(*args, **kwargs):
            return shapes(signature.bind(*args, **kwargs).arguments)

        return rule

    def int8_linear(x: torch.Tensor, qparams: torch.Tensor | None, smooth_inv: torch.Tensor | None,
                    lora_right: torch.Tensor | None, weight: torch.Tensor, packed: bool, column_sums: torch.Tensor,
                    weight_zero: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                    lora_left: torch.Tensor | None, act_bits: int, use_tma: bool,
                    group_table: torch.Tensor | None, lora_right_sums: torch.Tensor | None,
                    norm_shift: torch.Tensor | None = None, norm_scale: torch.Tensor | None = None,
                    norm_tokens: int = 0, norm_eps: float = 0.0, norm_moments: torch.Tensor | None = None,
                    input_bounds: torch.Tensor | None = None) -> torch.Tensor:
        """The layer of 2-D x; qparams None: with per-token ranges taken by the quantize pass, or
        with input_bounds ([min, −max] of x × smooth_inv, (2, 1) or (2, M), as int8_linear_gelu
        returns them) from those; with norm_shift (and qparams None), the layer of
        LayerNorm(x)·(1 + norm_scale) + norm_shift (TritonQuantLinear.normed), its mean and
        variance from norm_moments where given."""
        return run(x, qparams, **tensors_of(locals()))

    torch.library.custom_op("ditas::int8_linear", mutates_args=())(int8_linear).register_fake(
        fake_rule(int8_linear, lambda a: a["x"].new_empty(a["x"].shape[0], a["weight"].shape[0])))

    def int8_linear_gated(x: torch.Tensor, qparams: torch.Tensor | None, smooth_inv: torch.Tensor | None,
                          lora_right: torch.Tensor | None, weight: torch.Tensor, packed: bool,
                          column_sums: torch.Tensor, weight_zero: torch.Tensor, weight_scale: torch.Tensor,
                          bias: torch.Tensor | None, lora_left: torch.Tensor | None, act_bits: int, use_tma: bool,
                          group_table: torch.Tensor | None, lora_right_sums: torch.Tensor | None,
                          residual: torch.Tensor, gate: torch.Tensor,
                          gate_tokens: int, with_moments: bool, input_bounds: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """residual + gate ⊙ the layer of 2-D x (TritonQuantLinear.gated_2d), and with_moments the
        output's row moments (kernels.row_moments; else an empty tensor); input_bounds: as
        int8_linear's."""
        moments = row_moments(x.shape[0], weight.shape[0], x.device) if with_moments else x.new_empty(0)
        gated = GatedResidual(residual, gate, gate_tokens, moments if with_moments else None)
        return run(x, qparams, **tensors_of(locals()), gated=gated), moments

    torch.library.custom_op("ditas::int8_linear_gated", mutates_args=())(int8_linear_gated).register_fake(
        fake_rule(int8_linear_gated, lambda a: (
            a["x"].new_empty(a["x"].shape[0], a["weight"].shape[0]),
            a["x"].new_empty(row_moments_shape(a["x"].shape[0], a["weight"].shape[0]), dtype=torch.float32)
            if a["with_moments"] else a["x"].new_empty(0))))

    def int8_linear_gelu(x: torch.Tensor, qparams: torch.Tensor | None, smooth_inv: torch.Tensor | None,
                         lora_right: torch.Tensor | None, weight: torch.Tensor, packed: bool,
                         column_sums: torch.Tensor, weight_zero: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None, lora_left: torch.Tensor | None, act_bits: int, use_tma: bool,
                         group_table: torch.Tensor | None, lora_right_sums: torch.Tensor | None,
                         bounds_scale: torch.Tensor | None, with_bounds: bool,
                         bounds_per_row: bool, norm_shift: torch.Tensor | None = None,
                         norm_scale: torch.Tensor | None = None, norm_tokens: int = 0, norm_eps: float = 0.0,
                         norm_moments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """GELU(linear(x)), and [min, −max] of its output × bounds_scale, (2, 1) or per row (2, M)
        (+inf when not with_bounds; else the quantize pass fills them with +inf before the GEMM)."""
        tensors = tensors_of(locals())
        shape = (2, x.shape[0] if bounds_per_row else 1)
        bounds = (torch.empty(shape, dtype=torch.float32, device=x.device) if with_bounds
                  else torch.full(shape, float("inf"), dtype=torch.float32, device=x.device))
        out = run(x, qparams, **tensors, gelu=True, bounds=bounds if with_bounds else None,
                  bounds_scale=bounds_scale)
        return out, bounds

    torch.library.custom_op("ditas::int8_linear_gelu", mutates_args=())(int8_linear_gelu).register_fake(
        fake_rule(int8_linear_gelu, lambda a: (
            a["x"].new_empty(a["x"].shape[0], a["weight"].shape[0]),
            a["x"].new_empty(2, a["x"].shape[0] if a["bounds_per_row"] else 1, dtype=torch.float32))))

    def weight_only(x: torch.Tensor, codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor) -> torch.Tensor:
        """kernels.weight_only_linear."""
        return weight_only_linear(x, codes, zero, scale, bias)

    torch.library.custom_op("ditas::weight_only_linear", mutates_args=())(weight_only).register_fake(
        lambda x, codes, zero, scale, bias: x.new_empty(x.shape[0], codes.shape[0]))

    _registered = True


def install_kernels(model: nn.Module, log: Callable[[str], None],
                    options: KernelOptions = DEFAULT_KERNEL_OPTIONS) -> None:
    """Swap every quantized layer the kernels cover for a TritonQuantLinear, fuse the Mlps and, as
    `options` say, the blocks' norms, and put the weight-only layers on their kernel (in place);
    the others keep the fake numerics, said in one log line. CUDA models only."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        count = sum(isinstance(m, QuantLinear) for m in model.modules())
        log(f"backend triton needs a CUDA device (the model is on {device}): all {count} quantized layers "
            "use the fake backend")
        return
    register_kernel_op()
    swap_covered_layers(model, "triton", kernel_unsupported_reason, TritonQuantLinear, log)
    fuse_mlps(model)
    install_kernel_blocks(model, options)
    if options.weight_only_adaln:
        install_weight_only_kernels(model)
        if options.adaln_in_one_call:
            install_modulation_bank(model)
