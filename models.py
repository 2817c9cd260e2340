"""The Diffusion Transformer (DiT) of Peebles & Xie, "Scalable Diffusion Models with Transformers".

State-dict compatible with the official checkpoints (`DiT-XL-2-256x256.pt`, `DiT-XL-2-512x512.pt`):
module names, parameter shapes and the layout of the fused qkv projection are the official ones, so
those files load with `strict=True`. The numerics follow the official model (fp32, same weights).

Every linear layer that DiTAS quantizes is a plain `nn.Linear` named as in the official model
(`blocks.N.attn.qkv`, `blocks.N.attn.proj`, `blocks.N.mlp.fc1`, `blocks.N.mlp.fc2`), so the
quantizer can find it by its fully qualified name and swap it for a quantized module.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# The official model applies classifier-free guidance to the first three output channels only,
# "for exact reproducibility" of its published numbers (with 4 latent channels the fourth epsilon
# channel is left unguided). We keep that convention so published FIDs reproduce; it is capped at
# the model's channel count so pixel-space models with 1–3 channels are guided fully.
OFFICIAL_CFG_CHANNELS = 3


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x * (1 + scale) + shift, with per-sample (N, D) shift/scale over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                 Embedding layers for patches, timesteps and labels            #
#################################################################################


class PatchEmbed(nn.Module):
    """Splits an image into non-overlapping p×p patches and projects each to `hidden_size`."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.patch_size = (patch_size, patch_size)
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (N, T, D), tokens in row-major order


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (possibly fractional) timestep, followed by a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(N,) timesteps -> (N, dim) features [cos(t·f_k), sin(t·f_k)], f_k = max_period^(-k/half)."""
        half = dim // 2
        exponents = torch.arange(half, dtype=torch.float32, device=t.device) / half
        freqs = torch.exp(-math.log(max_period) * exponents)
        angles = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        if dim % 2:
            embedding = F.pad(embedding, (0, 1))
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.timestep_embedding(t, self.frequency_embedding_size)  # float32, for any t
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # the model's dtype (bf16 inference)


class LabelEmbedder(nn.Module):
    """Class-label embedding table with one extra row, the null class used for classifier-free
    guidance. During training labels are replaced by the null class with `dropout_prob`."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        has_null_class = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + has_null_class, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                                 Core DiT model                                #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    `qkv.weight` rows are laid out as [q; k; v], each (hidden, hidden) with heads contiguous, the
    official (timm) layout: rows 2·D … 3·D are the V projection, into which DiTAS folds the
    smoothing factor of `proj`.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attend(self.qkv(x)))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """(N, T, 3·D) qkv projections -> (N, T, D) attention output, before `proj`."""
        n, t, _ = qkv.shape
        qkv = qkv.reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, T, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, head_dim)
        return x.transpose(1, 2).reshape(n, t, self.num_heads * self.head_dim)  # (N, T, D)


class Mlp(nn.Module):
    """fc1 -> tanh-approximated GELU -> fc2, as in the official DiT block."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Modulation(NamedTuple):
    """The six adaLN chunks of a DiT block, in the order `adaLN_modulation` produces them."""

    shift_msa: torch.Tensor
    scale_msa: torch.Tensor
    gate_msa: torch.Tensor
    shift_mlp: torch.Tensor
    scale_mlp: torch.Tensor
    gate_mlp: torch.Tensor

    @classmethod
    def of(cls, values: torch.Tensor) -> Modulation:
        """The chunks of an (N, 6D) adaLN output."""
        return cls(*values.chunk(6, dim=1))


class DiTBlock(nn.Module):
    """A transformer block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def modulation(self, c: torch.Tensor) -> Modulation:
        """(N, D) conditioning -> the six (N, D) adaLN chunks."""
        return Modulation.of(self.adaLN_modulation(c))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        m = self.modulation(c)
        x = x + m.gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), m.shift_msa, m.scale_msa))
        x = x + m.gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), m.shift_mlp, m.scale_mlp))
        return x  # (N, T, D)


class FinalLayer(nn.Module):
    """adaLN-modulated layer norm followed by a linear map from tokens back to patches."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone (the official constructor arguments)."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed 2-D sin-cos embedding; a (frozen) parameter because the official checkpoints hold it.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)

        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation: xavier linears, zero adaLN and output layers (adaLN-Zero)."""

        def xavier_linear(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(xavier_linear)
        grid = self.x_embedder.grid_size
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # The patch embedding is initialised like a linear layer over the flattened patch.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) tokens -> (N, C, H, W) image; each token's features are ordered (p, q, c)."""
        c = self.out_channels
        p = self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        if h * w != x.shape[1]:
            raise ValueError(f"{x.shape[1]} tokens do not form a square grid")
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def block_conditions(self, c: torch.Tensor) -> list:
        """What each block of `blocks` is called with besides x: the conditioning c, for all. An
        inference backend may set its own on the instance (the triton backend's
        quant.triton_modules.ModulationBank hands each block its adaLN output instead, computed
        for all blocks in one call: they all condition on the same c)."""
        return [c] * len(self.blocks)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) images or latents, t: (N,) timesteps, y: (N,) class labels."""
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = H * W / p²
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        for block, condition in zip(self.blocks, self.block_conditions(c)):
            x = block(x, condition)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p² · C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guided_channels: int | None = None,
    ) -> torch.Tensor:
        """Classifier-free guidance in one batched forward.

        The batch holds the conditional half followed by the unconditional half (labels = null
        class); only the first half of `x` is used for both. The guided prediction
        eps = eps_uncond + cfg_scale · (eps_cond − eps_uncond) replaces both halves. By default the
        first min(3, in_channels) channels are guided, the official convention
        (`OFFICIAL_CFG_CHANNELS`); pass `guided_channels=in_channels` for the standard one.
        """
        if guided_channels is None:
            guided_channels = min(OFFICIAL_CFG_CHANNELS, self.in_channels)
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = model_out[:, :guided_channels], model_out[:, guided_channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


#################################################################################
#                   Sine/cosine positional embeddings (fixed)                   #
#################################################################################


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size², embed_dim) embedding of a square grid, tokens in row-major order.

    The first half of the features encodes the column (x) coordinate and the second half the row
    (y) coordinate, as in the official model (MAE's convention).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by 4 for a 2-D sin-cos embedding")
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32), indexing="ij")
    emb_cols = get_1d_sincos_pos_embed(embed_dim // 2, cols.reshape(-1))
    emb_rows = get_1d_sincos_pos_embed(embed_dim // 2, rows.reshape(-1))
    return np.concatenate([emb_cols, emb_rows], axis=1)


def get_1d_sincos_pos_embed(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim) features [sin(pos·ω_k), cos(pos·ω_k)], ω_k = 10000^(-2k/D)."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    angles = np.outer(positions.astype(np.float64), omega)  # (M, D/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


#################################################################################
#                                   DiT configs                                 #
#################################################################################

# name -> (depth, hidden_size, patch_size, num_heads): the official family.
DIT_ARCHITECTURES: dict[str, tuple[int, int, int, int]] = {
    "DiT-XL/2": (28, 1152, 2, 16),
    "DiT-XL/4": (28, 1152, 4, 16),
    "DiT-XL/8": (28, 1152, 8, 16),
    "DiT-L/2": (24, 1024, 2, 16),
    "DiT-L/4": (24, 1024, 4, 16),
    "DiT-L/8": (24, 1024, 8, 16),
    "DiT-B/2": (12, 768, 2, 12),
    "DiT-B/4": (12, 768, 4, 12),
    "DiT-B/8": (12, 768, 8, 12),
    "DiT-S/2": (12, 384, 2, 6),
    "DiT-S/4": (12, 384, 4, 6),
    "DiT-S/8": (12, 384, 8, 6),
}


def architecture_kwargs(name: str) -> dict:
    """The constructor arguments that the registry name fixes."""
    depth, hidden_size, patch_size, num_heads = DIT_ARCHITECTURES[name]
    return dict(depth=depth, hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads)


def _constructor(name: str):
    def build(**kwargs) -> DiT:
        return DiT(**architecture_kwargs(name), **kwargs)

    build.__name__ = name.replace("-", "_").replace("/", "_")
    build.__doc__ = f"{name}: depth, hidden size, patch size and heads {DIT_ARCHITECTURES[name]}."
    return build


DiT_models = {name: _constructor(name) for name in DIT_ARCHITECTURES}
