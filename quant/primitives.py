"""Pure quantize / dequantize / fake-quant functions over tensors; no modules, no state.

One storage format serves every setting: unsigned integer codes q in [0, 2^b − 1] and, per
group, a float scale and an integer zero point z, with  x ≈ scale · (q − z).  Symmetric
quantization is the special case z = 2^(b−1) with codes in [1, 2^b − 1].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

EPS = 1e-8
INT8_MIN, INT8_MAX = -128, 127
FP8_E4M3_MAX = 448.0  # the largest finite float8 e4m3fn value


def largest_code(bits: int) -> int:
    """The largest unsigned b-bit code, 2^b − 1: the top of every grid here."""
    return 2**bits - 1


#################################################################################
#                                 Weights                                       #
#################################################################################


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, packed: bool,
                     dtype: torch.dtype = torch.float32, group_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Ŵ = scale · (codes − zero) of a QuantizedWeight's tensors, or with two-level groups
    Ŵ = scale_row · group_scale · (codes − zero) (a plain function of tensors, so that
    torch.compile traces it without building the dataclass)."""
    codes = unpack_int4(codes) if packed else codes
    *lead, out, inp = codes.shape
    groups = zero.shape[-1]
    centered = codes.reshape(*lead, out, groups, inp // groups).to(dtype) - zero.to(dtype).unsqueeze(-1)
    if group_scale is None:
        return (centered * scale.to(dtype).unsqueeze(-1)).reshape(*lead, out, inp)
    # the int8 integers (codes − z)·k first, exact in float, then the row scale: as an int8 GEMM does
    return (centered * group_scale.to(dtype).unsqueeze(-1)).reshape(*lead, out, inp) * scale.to(dtype)


@dataclass(frozen=True)
class QuantizedWeight:
    """b-bit codes of a (…, out, in) weight with one (scale, zero) per group of `group_size`
    consecutive input channels of a row (group_size = in: per channel), or one per tensor
    (`per_tensor`, scale of shape (…, 1, 1)).

    Two-level groups (`group_scale` set): `scale` is one float per row (…, out, 1) and each group
    has an integer scale k and zero point z with (codes − z)·k inside int8, so a group dequantizes
    to int8 integers by integer arithmetic and Ŵ = scale_row · k · (codes − z) (the progressive
    group quantization of QServe): an int8 GEMM runs it with the row scale in its epilogue."""

    codes: torch.Tensor  # uint8 (…, out, in), or (…, out, in / 2) when packed
    scale: torch.Tensor  # float32 (…, out, in / group_size) or (…, 1, 1); (…, out, 1) with group_scale
    zero: torch.Tensor  # uint8 (…, out, in / group_size) or (…, 1, 1)
    bits: int
    group_size: int
    packed: bool = False  # two 4-bit codes per byte (pack_int4)
    group_scale: torch.Tensor | None = None  # uint8 (…, out, in / group_size): two-level groups

    def group_scales(self) -> torch.Tensor:
        """The float scale of every group, (…, out, groups) (or (…, 1, 1) per tensor)."""
        return self.scale if self.group_scale is None else self.scale * self.group_scale.float()

    def code_bounds(self, symmetric: bool = False) -> tuple[torch.Tensor | int, torch.Tensor | int]:
        """The codes a group may take: [0 (1 if symmetric), 2^b − 1], and for two-level groups also
        (codes − z)·k within int8's [−128, 127]."""
        low, high = (1 if symmetric else 0), 2**self.bits - 1
        if self.group_scale is None:
            return low, high
        k, z = self.group_scale.to(torch.int32), self.zero.to(torch.int32)
        return (z - torch.div(-INT8_MIN, k, rounding_mode="floor")).clamp(min=low), (z + INT8_MAX // k).clamp(max=high)

    def unpacked_codes(self) -> torch.Tensor:
        return unpack_int4(self.codes) if self.packed else self.codes

    def pack(self) -> QuantizedWeight:
        """The same weight with its codes two per byte (bits ≤ 4), half the memory."""
        if self.packed or self.bits > 4:
            return self
        return dataclasses.replace(self, codes=pack_int4(self.codes), packed=True)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scale, self.zero, self.packed, dtype, self.group_scale)

    def select(self, index: int) -> QuantizedWeight:
        """Candidate `index` of a weight with a leading candidate dimension."""
        return dataclasses.replace(self, codes=self.codes[index], scale=self.scale[index], zero=self.zero[index],
                                   group_scale=None if self.group_scale is None else self.group_scale[index])


def _grouped(w: torch.Tensor, granularity: str, group_size: int) -> tuple[torch.Tensor, int]:
    """w viewed as (…, out, groups, group) for the granularity, and the group size used."""
    *lead, out, inp = w.shape
    if granularity == "per_tensor":
        return w.reshape(*lead, 1, 1, out * inp), inp
    if granularity == "per_channel":
        return w.reshape(*lead, out, 1, inp), inp
    if granularity in ("per_group", "two_level"):
        if inp % group_size:
            raise ValueError(f"input size {inp} is not a multiple of the group size {group_size}")
        return w.reshape(*lead, out, inp // group_size, group_size), group_size
    raise ValueError(f"unknown weight granularity {granularity!r}")


def quantize_weight(
    w: torch.Tensor, bits: int, granularity: str = "per_channel", group_size: int = 128, symmetric: bool = False
) -> QuantizedWeight:
    """Round-to-nearest min-max quantization of a (…, out, in) weight.

    Asymmetric: the group range [min(w, 0), max(w, 0)] maps onto [0, 2^b − 1] with an integer zero
    point. Symmetric: max|w| maps onto 2^(b−1) − 1 around the fixed zero point 2^(b−1).
    """
    qmax = largest_code(bits)
    if granularity == "two_level":
        return quantize_two_level(w, bits, group_size)
    grouped, used_group = _grouped(w.float(), granularity, group_size)
    if symmetric:
        half = 2 ** (bits - 1)
        scale = (grouped.abs().amax(dim=-1) / (half - 1)).clamp(min=EPS)
        zero = torch.full_like(scale, half)
        codes = (torch.round(grouped / scale.unsqueeze(-1)) + half).clamp(1, qmax)
    else:
        lo = grouped.amin(dim=-1).clamp(max=0)
        hi = grouped.amax(dim=-1).clamp(min=0)
        scale = ((hi - lo) / qmax).clamp(min=EPS)
        zero = torch.round(-lo / scale).clamp(0, qmax)
        codes = (torch.round(grouped / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, qmax)
    codes = codes.to(torch.uint8).reshape(w.shape)
    return QuantizedWeight(codes, scale, zero.to(torch.uint8), bits, used_group)


def quantize_two_level(w: torch.Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """Two-level group quantization of a (…, out, in) weight: each row on a symmetric int8 grid
    (scale = max|w| / 127), then each group of the int8 row on a b-bit grid with an integer scale
    k = ⌈range / (2^b − 1)⌉ ≥ 1 and zero point z, codes chosen from the float weight and bounded
    so that (codes − z)·k stays inside int8."""
    qmax = largest_code(bits)
    grouped, used_group = _grouped(w.float(), "two_level", group_size)  # (…, out, groups, group)
    row_scale = (grouped.abs().amax(dim=(-1, -2)) / INT8_MAX).clamp(min=EPS).unsqueeze(-1)  # (…, out, 1)
    in_int8 = grouped / row_scale.unsqueeze(-1)  # the row in int8 units, within ±127
    lo = in_int8.amin(dim=-1).clamp(max=0)
    hi = in_int8.amax(dim=-1).clamp(min=0)
    k = torch.ceil((hi - lo) / qmax).clamp(min=1, max=INT8_MAX)
    zero = torch.round(-lo / k).clamp(0, qmax)
    weight = QuantizedWeight(torch.zeros(0), row_scale, zero.to(torch.uint8), bits, used_group,
                             group_scale=k.to(torch.uint8))
    low, high = weight.code_bounds()
    codes = torch.round(in_int8 / k.unsqueeze(-1)) + zero.unsqueeze(-1)
    codes = torch.maximum(torch.minimum(codes, high.unsqueeze(-1).float()), low.unsqueeze(-1).float())
    return dataclasses.replace(weight, codes=codes.to(torch.uint8).reshape(w.shape))


#################################################################################
#                               Activations                                     #
#################################################################################


def activation_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, integer zero point) mapping [min(lo, 0), max(hi, 0)] onto [0, 2^b − 1]."""
    qmax = largest_code(bits)
    lo, hi = lo.float().clamp(max=0), hi.float().clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=EPS)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def activation_range(x: torch.Tensor, granularity: str, batch_dims: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic (min, max) of x: over everything but the first `batch_dims` dimensions
    ("per_tensor"), or over the last dimension ("per_token"); shaped to broadcast against x."""
    if granularity == "per_token":
        return x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    if granularity != "per_tensor":
        raise ValueError(f"unknown activation granularity {granularity!r}")
    flat = x.reshape(*x.shape[:batch_dims], -1)
    shape = (*x.shape[:batch_dims], *([1] * (x.ndim - batch_dims)))
    return flat.amin(dim=-1).reshape(shape), flat.amax(dim=-1).reshape(shape)


def row_first_range(x2d: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """activation_range of 2-D x as (rows, 1) columns per token or (1, 1) per tensor, the
    whole-tensor range taken from the row ranges: a reduction along the rows' axis, which
    torch.compile fuses into the producer's row kernel (LayerNorm + modulation), instead of a slow
    whole-tensor reduction."""
    lo, hi = x2d.amin(dim=1, keepdim=True), x2d.amax(dim=1, keepdim=True)
    if granularity == "per_token":
        return lo, hi
    return lo.amin(dim=0, keepdim=True), hi.amax(dim=0, keepdim=True)


def quantize_activation(x: torch.Tensor, bits: int, lo: torch.Tensor, hi: torch.Tensor):
    """(codes as float, scale, zero) of x in the range [lo, hi] (asymmetric, round to nearest)."""
    scale, zero = activation_qparams(lo, hi, bits)
    codes = (torch.round(x.float() / scale) + zero).clamp(0, largest_code(bits))
    return codes, scale, zero


def fp8_activation_scale(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The scale mapping max(|lo|, |hi|) onto e4m3's largest value. FP8 codes are symmetric (no
    zero point): a lopsided range leaves the codes of its shorter side partly unused."""
    return (torch.maximum(-lo.float(), hi.float()) / FP8_E4M3_MAX).clamp(min=EPS)


def to_fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest float8 e4m3fn value, saturating at ±448 (the cast alone does not
    promise to saturate on every device)."""
    return x.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def fake_quant_activation(x: torch.Tensor, bits: int, granularity: str = "per_tensor",
                          static_range: tuple[torch.Tensor, torch.Tensor] | None = None,
                          batch_dims: int = 0, act_format: str = "int") -> torch.Tensor:
    """x rounded to its b-bit asymmetric integer grid, or to FP8 e4m3 codes times one scale
    (`act_format` "fp8_e4m3", 8 bits): dynamic range unless `static_range` is given."""
    lo, hi = static_range if static_range is not None else activation_range(x, granularity, batch_dims)
    if act_format == "fp8_e4m3":
        scale = fp8_activation_scale(lo, hi)
        return (to_fp8_e4m3(x.float() / scale).float() * scale).to(x.dtype)
    codes, scale, zero = quantize_activation(x, bits, lo, hi)
    return ((codes - zero) * scale).to(x.dtype)


#################################################################################
#                                 Packing                                       #
#################################################################################


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(…, n) uint8 codes in [0, 15] -> (…, n/2) bytes, element 2j in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError("int4 packing needs an even number of columns")
    low, high = codes[..., 0::2], codes[..., 1::2]
    return (low | (high << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


#################################################################################
#                        The quantized linear map                               #
#################################################################################


def quantized_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act_bits: int,
    act_granularity: str = "per_tensor",
    smooth_inv: torch.Tensor | None = None,
    lora_left: torch.Tensor | None = None,
    lora_right: torch.Tensor | None = None,
    static_range: tuple[torch.Tensor, torch.Tensor] | None = None,
    batch_dims: int = 0,
    act_format: str = "int",
) -> torch.Tensor:
    """y = Q_a(x ⊙ smooth_inv) · (Ŵ + L·R)ᵀ + b, the reference numerics of a DiTAS layer.

    `weight` is the dequantized weight Ŵ (…, out, in); the activation is quantized once and feeds
    both the integer GEMM and the LoRA down-projection. With batch_dims = 1 every tensor carries
    a leading candidate dimension (the grid search scores all α at once), and the per-tensor
    activation range is taken per candidate.
    """
    if smooth_inv is not None:
        x = x * smooth_inv.unsqueeze(-2) if batch_dims else x * smooth_inv
    x_q = fake_quant_activation(x, act_bits, act_granularity, static_range, batch_dims, act_format)
    y = torch.matmul(x_q, weight.transpose(-1, -2))
    if lora_left is not None:
        y = y + torch.matmul(torch.matmul(x_q, lora_right.transpose(-1, -2)), lora_left.transpose(-1, -2))
    if bias is not None:
        y = y + bias
    return y


@dataclass(frozen=True)
class QuantizedLayer:
    """Everything a quantized linear layer computes with, as plain data (optionally with a
    leading candidate dimension on every tensor, for the grid search)."""

    weight: QuantizedWeight
    bias: torch.Tensor | None
    act_bits: int
    act_granularity: str = "per_tensor"
    smooth_inv: torch.Tensor | None = None  # multiplies the input (1 / smoothing factor)
    lora_left: torch.Tensor | None = None
    lora_right: torch.Tensor | None = None
    static_range: tuple[torch.Tensor, torch.Tensor] | None = None
    act_format: str = "int"  # or "fp8_e4m3" (QuantConfig.act_format)

    def select(self, index: int) -> QuantizedLayer:
        """Candidate `index` of a layer whose tensors carry a leading candidate dimension."""

        return QuantizedLayer(
            self.weight.select(index), self.bias, self.act_bits, self.act_granularity,
            None if self.smooth_inv is None else self.smooth_inv[index],
            None if self.lora_left is None else self.lora_left[index],
            None if self.lora_right is None else self.lora_right[index],
            None if self.static_range is None else (self.static_range[0][index], self.static_range[1][index]),
            self.act_format,
        )

    def __call__(self, x: torch.Tensor, dtype: torch.dtype = torch.float32, batch_dims: int = 0) -> torch.Tensor:
        def cast(t):
            return None if t is None else t.to(dtype)

        return quantized_linear(
            x.to(dtype), self.weight.dequantize(dtype), cast(self.bias), self.act_bits, self.act_granularity,
            cast(self.smooth_inv), cast(self.lora_left), cast(self.lora_right),
            None if self.static_range is None else tuple(cast(t) for t in self.static_range), batch_dims,
            self.act_format,
        )
