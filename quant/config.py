"""The quantization settings, as one frozen, validated, serialisable dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

WEIGHT_GRANULARITIES = ("per_tensor", "per_channel", "per_group", "two_level")
ACT_GRANULARITIES = ("per_tensor", "per_token")
# How activations are coded: b-bit integers with a scale and zero point per range (the paper), or
# float8 e4m3 values times one scale per range (8 bits; the weights' integer codes minus their zero
# points, within ±15 for 4 bits, are exact e4m3 values, so a layer can run on an FP8 GEMM).
ACT_FORMATS = ("int", "fp8_e4m3")
LOW_RANK_METHODS = ("exact", "randomized")
# How weight codes are rounded: to the nearest grid point (the paper), or column by column with
# each column's rounding error pushed onto the columns not yet rounded through the inverse of the
# calibration inputs' H = Σ xᵀx (GPTQ / OBQ; quant/compensate.py).
ROUNDINGS = ("nearest", "compensated")
# What the low-rank correction minimises: ‖W − Q − L·R‖ (the paper), or ‖(W − Q − L·R)·H^½‖, the
# layer's output error over the calibration inputs.
LORA_WEIGHTINGS = ("plain", "activation")
WEIGHT_BITS_RANGE = (2, 8)
ACT_BITS_RANGE = (4, 16)
ADALN_WEIGHT_BITS = (8,)
# Named method settings on top of QuantConfig's field defaults, which are the published DiTAS
# ("paper": rounding to nearest, the plain LoRA, the α grid alone, one activation range per
# tensor). QuantDiT.py applies DEFAULT_RECIPE: the best measured on the demo (README, "Beyond the
# paper"; benchmarks/RESULTS.md), which also takes each token's activation range on its own.
RECIPES: dict[str, dict] = {
    "paper": {},
    "best": dict(rounding="compensated", lora_weighting="activation", identity_candidate=True,
                 act_granularity="per_token"),
}
DEFAULT_RECIPE = "best"


def recipe_settings(recipe: str, **overrides) -> dict:
    """The recipe's method settings, each overridden by a value given (None: the recipe's)."""
    return RECIPES[recipe] | {name: value for name, value in overrides.items() if value is not None}


def default_alpha_grid() -> tuple[float, ...]:
    """α ∈ {0, 0.05, …, 1}, the paper's grid."""
    return tuple(round(0.05 * i, 2) for i in range(21))


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides how a DiT is quantized; stored in the quantized checkpoint.

    Weights: `weight_bits`-bit integer codes with one scale and integer zero point per output
    channel ("per_channel"), per `weight_group_size` consecutive input channels of a row
    ("per_group"), per tensor, or "two_level": a float scale per row (int8 grid) and an integer
    scale and zero point per group (primitives.quantize_two_level). Activations: `act_bits`, asymmetric, one range per tensor (the
    paper) or per token, computed on the fly ("dynamic") or fixed from calibration ("static"),
    as integer codes (the paper) or FP8 e4m3 codes (`act_format`).
    """

    weight_bits: int = 4
    act_bits: int = 8
    weight_granularity: str = "per_channel"
    weight_group_size: int = 128
    weight_symmetric: bool = False
    act_granularity: str = "per_tensor"
    act_dynamic: bool = True
    act_format: str = "int"
    smooth: bool = True  # TAS smoothing; False gives round-to-nearest (+ LoRA if lora_rank > 0)
    alpha_grid: tuple[float, ...] = dataclasses.field(default_factory=default_alpha_grid)
    lora_rank: int = 32
    lora_iters: int = 10
    low_rank_method: str = "randomized"
    # The grid search scores each α with this many LoRA iterations (0: quantized weights alone),
    # a cheaper stand-in for the full `lora_iters` fit; README.md gives the measured effect
    # (0 was both the fastest and, on the demo, the best of 0, 1 and 10).
    search_lora_iters: int = 0
    # Rows (tokens) per timestep and layer used to score α, evenly strided; 0 uses all of them.
    # README.md gives the measured effect (512 of DiT-XL/2's 8,192 rows per step).
    search_rows_per_step: int = 512
    # Weight-only quantization of each block's adaLN modulation layer (symmetric, per output
    # channel) after the smoothing factors are folded into it; None keeps it in floating point
    # (the paper). It holds a third of DiT-XL/2's weights; README.md gives the measured effect.
    adaln_weight_bits: int | None = None
    rounding: str = "nearest"
    lora_weighting: str = "plain"
    # Offer each layer "no smoothing" (s = 1) beside the α grid in the grid search.
    identity_candidate: bool = False
    # Damping added to H's diagonal, as a fraction of its mean, before it is inverted or rooted.
    hessian_damping: float = 0.01

    def __post_init__(self):
        def check(condition: bool, message: str):
            if not condition:
                raise ValueError(message)

        lo, hi = WEIGHT_BITS_RANGE
        check(isinstance(self.weight_bits, int) and lo <= self.weight_bits <= hi,
              f"weight bits must be an integer in {lo}..{hi}, got {self.weight_bits}")
        lo, hi = ACT_BITS_RANGE
        check(isinstance(self.act_bits, int) and lo <= self.act_bits <= hi,
              f"activation bits must be an integer in {lo}..{hi}, got {self.act_bits}")
        check(self.weight_granularity in WEIGHT_GRANULARITIES,
              f"weight granularity must be one of {WEIGHT_GRANULARITIES}, got {self.weight_granularity!r}")
        check(self.weight_granularity != "per_tensor",
              "DiTAS folds proj's smoothing factor into the V rows of qkv, which needs per-row weight scales: "
              "use per_channel or per_group")
        check(self.weight_group_size > 0 and self.weight_group_size % 2 == 0,
              f"weight group size must be a positive even number, got {self.weight_group_size}")
        check(self.act_granularity in ACT_GRANULARITIES,
              f"activation granularity must be one of {ACT_GRANULARITIES}, got {self.act_granularity!r}")
        check(self.act_format in ACT_FORMATS,
              f"activation format must be one of {ACT_FORMATS}, got {self.act_format!r}")
        check(self.act_format == "int" or self.act_bits == 8,
              f"{self.act_format} activations are 8-bit: set the activation bits to 8, got {self.act_bits}")
        check(not (self.act_granularity == "per_token" and not self.act_dynamic),
              "per-token activation ranges depend on the input: they can only be dynamic")
        check(len(self.alpha_grid) > 0 and all(0.0 <= a <= 1.0 for a in self.alpha_grid),
              f"alpha grid values must lie in [0, 1], got {self.alpha_grid}")
        check(self.lora_rank >= 0 and self.lora_iters >= 1 and self.search_lora_iters >= 0,
              "lora rank must be >= 0, lora iterations >= 1 and search LoRA iterations >= 0")
        check(self.low_rank_method in LOW_RANK_METHODS,
              f"low-rank method must be one of {LOW_RANK_METHODS}, got {self.low_rank_method!r}")
        check(self.search_rows_per_step >= 0, "search rows per step must be >= 0")
        check(self.adaln_weight_bits is None or self.adaln_weight_bits in ADALN_WEIGHT_BITS,
              f"adaLN weight bits must be one of {ADALN_WEIGHT_BITS} or None, got {self.adaln_weight_bits}")
        check(self.rounding in ROUNDINGS, f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        check(self.lora_weighting in LORA_WEIGHTINGS,
              f"LoRA weighting must be one of {LORA_WEIGHTINGS}, got {self.lora_weighting!r}")
        check(self.hessian_damping > 0, f"hessian damping must be > 0, got {self.hessian_damping}")
        object.__setattr__(self, "alpha_grid", tuple(float(a) for a in self.alpha_grid))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "alpha_grid": list(self.alpha_grid)}

    @classmethod
    def from_dict(cls, data: dict) -> QuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown quantization settings {sorted(unknown)}")
        data = dict(data)
        if "alpha_grid" in data:
            data["alpha_grid"] = tuple(data["alpha_grid"])
        return cls(**data)

    @property
    def label(self) -> str:
        return f"W{self.weight_bits}A{self.act_bits}" + ("" if self.act_format == "int" else f"-{self.act_format}")
