"""The DiT: official parameter counts and names, and each component against its definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import DIT_ARCHITECTURES, DiT, DiT_models, get_2d_sincos_pos_embed


def expected_parameter_count(depth, hidden, patch, *, in_channels=4, num_classes=1000, input_size=32, mlp_ratio=4):
    """Parameters of a DiT counted by hand from the architecture description."""
    d, out_channels = hidden, 2 * in_channels
    tokens = (input_size // patch) ** 2
    embed = in_channels * patch * patch * d + d + (256 * d + d) + (d * d + d) + (num_classes + 1) * d + tokens * d
    mlp_hidden = int(d * mlp_ratio)
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * mlp_hidden + mlp_hidden) + (mlp_hidden * d + d) + (d * 6 * d + 6 * d)
    final = (d * patch * patch * out_channels + patch * patch * out_channels) + (d * 2 * d + 2 * d)
    return embed + depth * block + final


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_dit_xl2_has_the_official_parameter_count():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32)
    assert count(model) == 675_129_632


@pytest.mark.parametrize("name", [n for n in DIT_ARCHITECTURES if not n.startswith(("DiT-XL", "DiT-L"))])
def test_parameter_counts_of_the_smaller_configs(name):
    depth, hidden, patch, _ = DIT_ARCHITECTURES[name]
    assert count(DiT_models[name](input_size=32)) == expected_parameter_count(depth, hidden, patch)


@pytest.mark.parametrize("name", [n for n in DIT_ARCHITECTURES if n.startswith(("DiT-XL", "DiT-L"))])
def test_parameter_counts_of_the_large_configs(name):
    depth, hidden, patch, heads = DIT_ARCHITECTURES[name]
    with torch.device("meta"):  # no memory for the weights, same shapes
        model = DiT(input_size=32, depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads)
    assert count(model) == expected_parameter_count(depth, hidden, patch)


def test_state_dict_uses_the_official_names():
    model = DiT(input_size=8, depth=2, hidden_size=64, patch_size=2, num_heads=4, num_classes=10)
    keys = set(model.state_dict())
    per_block = [
        "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
        "adaLN_modulation.1.weight", "adaLN_modulation.1.bias",
    ]
    expected = {
        "pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight", "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
    } | {f"blocks.{i}.{k}" for i in range(2) for k in per_block}
    assert keys == expected


def test_timestep_embedding_matches_its_formula():
    from models import TimestepEmbedder

    t = torch.tensor([0.0, 3.0, 999.0])
    emb = TimestepEmbedder.timestep_embedding(t, 8)
    for row, tv in enumerate(t.tolist()):
        freqs = [math.exp(-math.log(10000) * k / 4) for k in range(4)]
        expected = [math.cos(tv * f) for f in freqs] + [math.sin(tv * f) for f in freqs]
        assert torch.allclose(emb[row], torch.tensor(expected), atol=1e-4)


def test_position_embedding_encodes_column_then_row():
    grid, dim = 4, 16
    emb = get_2d_sincos_pos_embed(dim, grid)
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    for row in range(grid):
        for col in range(grid):
            token = emb[row * grid + col]
            expected = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
            np.testing.assert_allclose(token, expected, atol=1e-12)


def test_attention_uses_the_q_k_v_row_layout_with_contiguous_heads(tiny_pixel_model):
    attn = tiny_pixel_model.blocks[0].attn
    x = torch.randn(2, 5, 64)
    d, heads, hd = 64, attn.num_heads, attn.head_dim
    w, b = attn.qkv.weight, attn.qkv.bias
    q, k, v = (x @ w[i * d : (i + 1) * d].T + b[i * d : (i + 1) * d] for i in range(3))
    outs = []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd)
        outs.append(scores.softmax(-1) @ v[..., sl])
    expected = attn.proj(torch.cat(outs, dim=-1))
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_unpatchify_inverts_the_patch_layout(tiny_pixel_model):
    model = tiny_pixel_model
    p, c = model.patch_size, model.out_channels
    image = torch.randn(3, c, 8, 8)
    # tokens in row-major patch order, each patch's features ordered (p, q, c)
    tokens = image.reshape(3, c, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(3, 16, p * p * c)
    assert torch.equal(model.unpatchify(tokens), image)


def test_label_dropout_uses_the_null_class_only_when_training_or_forced(tiny_pixel_model):
    embedder = tiny_pixel_model.y_embedder
    labels = torch.tensor([1, 2, 3])
    table = embedder.embedding_table.weight
    assert torch.equal(embedder(labels, train=False), table[labels])
    forced = embedder(labels, train=False, force_drop_ids=torch.tensor([1, 0, 1]))
    assert torch.equal(forced, table[torch.tensor([10, 2, 10])])


def test_cfg_guides_the_first_three_channels_like_the_official_model(tiny_latent_model):
    model = tiny_latent_model
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    y = torch.tensor([3, 7])
    null = torch.full_like(y, 10)
    cond, uncond = model(x, t, y), model(x, t, null)
    scale = 2.5
    out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), scale)
    guided = uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3])
    assert torch.allclose(out[:2, :3], guided, atol=1e-5)
    assert torch.equal(out[:2, :3], out[2:, :3])  # both halves carry the guided eps
    assert torch.allclose(out[:2, 3:], cond[:, 3:], atol=1e-5)  # channel 4 and sigma: unguided
    assert torch.allclose(out[2:, 3:], uncond[:, 3:], atol=1e-5)


def test_cfg_with_all_channels_and_scale_one_is_the_conditional_model(tiny_latent_model):
    model = tiny_latent_model
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 6]), torch.tensor([1, 2])
    null = torch.full_like(y, 10)
    out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 1.0, guided_channels=4)
    assert torch.allclose(out[:2, :4], model(x, t, y)[:, :4], atol=1e-5)


def test_pixel_models_guide_all_their_channels(tiny_pixel_model):
    model = tiny_pixel_model
    x, t, y = torch.randn(1, 1, 8, 8), torch.tensor([5]), torch.tensor([1])
    null = torch.full_like(y, 10)
    out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 3.0)
    cond, uncond = model(x, t, y), model(x, t, null)
    assert torch.allclose(out[:1, :1], uncond[:, :1] + 3.0 * (cond[:, :1] - uncond[:, :1]), atol=1e-5)


def test_official_initialisation_zeroes_adaln_and_output():
    model = DiT(input_size=8, depth=1, hidden_size=32, patch_size=2, num_heads=2, num_classes=3)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert torch.count_nonzero(out) == 0
