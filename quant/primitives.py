"""Pure quantize / dequantize / fake-quant functions over tensors; no modules, no state.

One storage format serves every setting: unsigned integer codes q in [0, 2^b − 1] and, per
group, a float scale and an integer zero point z, with  x ≈ scale · (q − z).  Symmetric
quantization is the special case z = 2^(b−1) with codes in [1, 2^b − 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-8


#################################################################################
#                                 Weights                                       #
#################################################################################


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, packed: bool,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ŵ = scale · (codes − zero) of a QuantizedWeight's tensors (a plain function of tensors, so
    that torch.compile traces it without building the dataclass)."""
    codes = unpack_int4(codes) if packed else codes
    *lead, out, inp = codes.shape
    groups = scale.shape[-1]
    codes = codes.reshape(*lead, out, groups, inp // groups).to(dtype)
    return ((codes - zero.to(dtype).unsqueeze(-1)) * scale.to(dtype).unsqueeze(-1)).reshape(*lead, out, inp)


@dataclass(frozen=True)
class QuantizedWeight:
    """b-bit codes of a (…, out, in) weight with one (scale, zero) per group of `group_size`
    consecutive input channels of a row (group_size = in: per channel), or one per tensor
    (`per_tensor`, scale of shape (…, 1, 1))."""

    codes: torch.Tensor  # uint8 (…, out, in), or (…, out, in / 2) when packed
    scale: torch.Tensor  # float32 (…, out, in / group_size) or (…, 1, 1)
    zero: torch.Tensor  # uint8, same shape as scale
    bits: int
    group_size: int
    packed: bool = False  # two 4-bit codes per byte (pack_int4)

    def unpacked_codes(self) -> torch.Tensor:
        return unpack_int4(self.codes) if self.packed else self.codes

    def pack(self) -> QuantizedWeight:
        """The same weight with its codes two per byte (bits ≤ 4), half the memory."""
        if self.packed or self.bits > 4:
            return self
        return QuantizedWeight(pack_int4(self.codes), self.scale, self.zero, self.bits, self.group_size, True)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scale, self.zero, self.packed, dtype)

    def select(self, index: int) -> QuantizedWeight:
        """Candidate `index` of a weight with a leading candidate dimension."""
        return QuantizedWeight(self.codes[index], self.scale[index], self.zero[index], self.bits, self.group_size,
                               self.packed)

    def scale_rows(self, factor: torch.Tensor) -> QuantizedWeight:
        """The weight diag(factor) · W, exactly: codes and zero points are unchanged, row scales
        are multiplied (only possible with per-row scales)."""
        if self.scale.shape[-2] != self.codes.shape[-2]:
            raise ValueError("row scaling needs per-channel or per-group weight scales")
        return QuantizedWeight(self.codes, self.scale * factor.to(self.scale).unsqueeze(-1), self.zero, self.bits,
                               self.group_size, self.packed)


def _grouped(w: torch.Tensor, granularity: str, group_size: int) -> tuple[torch.Tensor, int]:
    """w viewed as (…, out, groups, group) for the granularity, and the group size used."""
    *lead, out, inp = w.shape
    if granularity == "per_tensor":
        return w.reshape(*lead, 1, 1, out * inp), inp
    if granularity == "per_channel":
        return w.reshape(*lead, out, 1, inp), inp
    if granularity == "per_group":
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
    qmax = 2**bits - 1
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


#################################################################################
#                               Activations                                     #
#################################################################################


def activation_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, integer zero point) mapping [min(lo, 0), max(hi, 0)] onto [0, 2^b − 1]."""
    qmax = 2**bits - 1
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


def quantize_activation(x: torch.Tensor, bits: int, lo: torch.Tensor, hi: torch.Tensor):
    """(codes as float, scale, zero) of x in the range [lo, hi] (asymmetric, round to nearest)."""
    scale, zero = activation_qparams(lo, hi, bits)
    codes = (torch.round(x.float() / scale) + zero).clamp(0, 2**bits - 1)
    return codes, scale, zero


def fake_quant_activation(x: torch.Tensor, bits: int, granularity: str = "per_tensor",
                          static_range: tuple[torch.Tensor, torch.Tensor] | None = None,
                          batch_dims: int = 0) -> torch.Tensor:
    """x rounded to its b-bit asymmetric grid: dynamic range unless `static_range` is given."""
    lo, hi = static_range if static_range is not None else activation_range(x, granularity, batch_dims)
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
) -> torch.Tensor:
    """y = Q_a(x ⊙ smooth_inv) · (Ŵ + L·R)ᵀ + b, the reference numerics of a DiTAS layer.

    `weight` is the dequantized weight Ŵ (…, out, in); the activation is quantized once and feeds
    both the integer GEMM and the LoRA down-projection. With batch_dims = 1 every tensor carries
    a leading candidate dimension (the grid search scores all α at once), and the per-tensor
    activation range is taken per candidate.
    """
    if smooth_inv is not None:
        x = x * smooth_inv.unsqueeze(-2) if batch_dims else x * smooth_inv
    x_q = fake_quant_activation(x, act_bits, act_granularity, static_range, batch_dims)
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

    def select(self, index: int) -> QuantizedLayer:
        """Candidate `index` of a layer whose tensors carry a leading candidate dimension."""

        return QuantizedLayer(
            self.weight.select(index), self.bias, self.act_bits, self.act_granularity,
            None if self.smooth_inv is None else self.smooth_inv[index],
            None if self.lora_left is None else self.lora_left[index],
            None if self.lora_right is None else self.lora_right[index],
            None if self.static_range is None else (self.static_range[0][index], self.static_range[1][index]),
        )

    def __call__(self, x: torch.Tensor, dtype: torch.dtype = torch.float32, batch_dims: int = 0) -> torch.Tensor:
        def cast(t):
            return None if t is None else t.to(dtype)

        return quantized_linear(
            x.to(dtype), self.weight.dequantize(dtype), cast(self.bias), self.act_bits, self.act_granularity,
            cast(self.smooth_inv), cast(self.lora_left), cast(self.lora_right),
            None if self.static_range is None else tuple(cast(t) for t in self.static_range), batch_dims,
        )
