"""The per-token block kernels (one pass each) == their PyTorch references, under Triton's
interpreter on the CPU; and the references == the stock operations they stand for."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chipmunk_pack.kernels.block_ops_reference import (gated_residual_reference_, layer_norm_modulate_reference,
                                                       qk_norm_rope_reference)

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def close(actual, expected, dtype, what):
    actual, expected = actual.float(), expected.float()
    assert torch.isfinite(actual).all(), f"{what}: not finite (an element was not written?)"
    err = float((actual - expected).norm() / expected.norm().clamp_min(1e-12))
    assert err < TOLERANCE[dtype], f"{what}: relative error {err:.2e}"


def rotary_table(batch, n_tokens, head_dim, gen):
    """A table shaped like FLUX's: per token and channel pair a 2x2 rotation, float32."""
    angles = torch.rand(batch, 1, n_tokens, head_dim // 2, generator=gen) * 6.28
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([cos, -sin, sin, cos], dim=-1).view(batch, 1, n_tokens, head_dim // 2, 2, 2)


@pytest.mark.parametrize("batch, n_tokens, channels, dtype, per_row", [
    (1, 37, 192, torch.bfloat16, True), (2, 20, 320, torch.float16, True), (2, 9, 64, torch.bfloat16, False)])
def test_layer_norm_modulate(interpreted, batch, n_tokens, channels, dtype, per_row):
    gen = torch.Generator().manual_seed(channels)
    x = (3 * torch.randn(batch, n_tokens, channels, generator=gen) + 1).to(dtype)
    rows = batch if per_row else 1
    scale1 = (1 + 0.3 * torch.randn(rows, 1, channels, generator=gen)).to(dtype)
    shift = (0.5 * torch.randn(rows, 1, channels, generator=gen)).to(dtype)
    expected = layer_norm_modulate_reference(x, scale1, shift, 1e-6)
    actual = interpreted["block_ops_triton"].layer_norm_modulate_triton(x, scale1, shift, 1e-6)
    close(actual, expected, dtype, "layer norm + modulation")


@pytest.mark.parametrize("batch, n_tokens, heads, head_dim, extra, dtype, rope, pe_rows", [
    (1, 23, 2, 64, 40, torch.bfloat16, True, 1),       # a projection with more columns (the MLP's) after q, k, v
    (2, 17, 3, 128, 0, torch.float16, True, 2),
    (2, 16, 1, 64, 0, torch.bfloat16, False, 1)])
def test_qk_norm_rope(interpreted, batch, n_tokens, heads, head_dim, extra, dtype, rope, pe_rows):
    gen = torch.Generator().manual_seed(heads * head_dim + n_tokens)
    width = heads * head_dim
    qkv = (2 * torch.randn(batch, n_tokens, 3 * width + extra, generator=gen)).to(dtype)
    q_weight = (1 + 0.2 * torch.randn(head_dim, generator=gen)).to(dtype)
    k_weight = (1 + 0.2 * torch.randn(head_dim, generator=gen)).to(dtype)
    pe = rotary_table(pe_rows, n_tokens + 5, head_dim, gen) if rope else None  # longer tables are cut, as stock does
    expected = qk_norm_rope_reference(qkv, heads, q_weight, k_weight, 1e-6, 1e-2, pe)
    actual = interpreted["block_ops_triton"].qk_norm_rope_triton(qkv, heads, q_weight, k_weight, 1e-6, 1e-2, pe)
    for got, want, name in zip(actual, expected, "qk"):
        assert got.shape == (batch, heads, n_tokens, head_dim) and got.is_contiguous()
        close(got, want, dtype, name)


@pytest.mark.parametrize("with_values", [False, True], ids=["qk", "qkv"])
def test_qk_norm_rope_into_views_of_a_joint_buffer(interpreted, with_values):
    """Text and image rows written into one [B, H, T + N, D] buffer (no concatenation after); with a
    third view the values are copied there too, bit for bit."""
    gen = torch.Generator().manual_seed(11)
    batch, text, image, heads, head_dim, dtype = 2, 5, 19, 2, 64, torch.bfloat16
    weights = [(1 + 0.2 * torch.randn(head_dim, generator=gen)).to(dtype) for _ in range(2)]
    pe = rotary_table(1, text + image, head_dim, gen)
    q = torch.full((batch, heads, text + image, head_dim), float("nan"), dtype=dtype)
    k, v = torch.full_like(q, float("nan")), torch.full_like(q, float("nan"))
    for rows, table in ((slice(0, text), pe[:, :, :text]), (slice(text, None), pe[:, :, text:])):
        qkv = torch.randn(batch, text if rows.start == 0 else image, 3 * heads * head_dim, generator=gen).to(dtype)
        expected = qk_norm_rope_reference(qkv, heads, *weights, 1e-6, 1e-6, table)
        views = (q[:, :, rows], k[:, :, rows]) + ((v[:, :, rows],) if with_values else ())
        got = interpreted["block_ops_triton"].qk_norm_rope_triton(qkv, heads, *weights, 1e-6, 1e-6, table,
                                                                  out=views)
        assert got[0].data_ptr() == q[:, :, rows].data_ptr() and len(got) == len(views)
        close(q[:, :, rows], expected[0], dtype, "queries")
        close(k[:, :, rows], expected[1], dtype, "keys")
        values = qkv[..., 2 * heads * head_dim:].unflatten(-1, (heads, head_dim)).transpose(1, 2)
        if with_values:
            assert torch.equal(v[:, :, rows], values)
            reference_v = torch.empty_like(values)
            qk_norm_rope_reference(qkv, heads, *weights, 1e-6, 1e-6, table,
                                   out=(torch.empty_like(values), torch.empty_like(values), reference_v))
            assert torch.equal(reference_v, values)
    assert v.isnan().all() != with_values


@pytest.mark.parametrize("with_b, gate_rows", [(True, 2), (False, 1)])
def test_gated_residual(interpreted, with_b, gate_rows):
    gen = torch.Generator().manual_seed(7)
    dtype = torch.bfloat16
    x = torch.randn(2, 13, 200, generator=gen).to(dtype)
    a = torch.randn(2, 13, 200, generator=gen).to(dtype)
    b = torch.randn(2, 13, 200, generator=gen).to(dtype) if with_b else None
    gate = torch.randn(gate_rows, 1, 200, generator=gen).to(dtype)
    expected = gated_residual_reference_(x.clone(), gate, a, b)
    actual = x.clone()
    assert interpreted["block_ops_triton"].gated_residual_triton_(actual, gate, a, b) is actual
    close(actual, expected, dtype, "gated residual")
    into = torch.full_like(x, float("nan"))
    kept = x.clone()
    assert interpreted["block_ops_triton"].gated_residual_triton_(kept, gate, a, b, out=into) is into
    close(into, expected, dtype, "gated residual into another tensor")
    assert torch.equal(kept, x)


def test_references_are_the_stock_operations():
    """What the references stand for, written the way FLUX's stock block computes it."""
    gen = torch.Generator().manual_seed(3)
    batch, n_tokens, heads, head_dim = 2, 11, 2, 64
    x = torch.randn(batch, n_tokens, heads * head_dim, generator=gen)
    scale, shift = torch.randn(batch, 1, heads * head_dim, generator=gen), torch.randn(batch, 1, heads * head_dim, generator=gen)
    stock = F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift
    assert torch.allclose(layer_norm_modulate_reference(x, 1 + scale, shift, 1e-6), stock, atol=1e-5)

    qkv = torch.randn(batch, n_tokens, 3 * heads * head_dim, generator=gen)
    w_q, w_k = torch.rand(head_dim, generator=gen) + 0.5, torch.rand(head_dim, generator=gen) + 0.5
    pe = rotary_table(batch, n_tokens, head_dim, gen)
    q, k, _ = qkv.view(batch, n_tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    rms = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    def rotate(t):  # complex multiplication by e^(i angle) of each (even, odd) channel pair
        pairs = torch.view_as_complex(t.reshape(*t.shape[:-1], -1, 2).contiguous())
        rotation = torch.complex(pe[..., 0, 0], pe[..., 1, 0])
        return torch.view_as_real(pairs * rotation).flatten(-2)
    ours_q, ours_k = qk_norm_rope_reference(qkv, heads, w_q, w_k, 1e-6, 1e-6, pe)
    assert torch.allclose(ours_q, rotate(rms(q, w_q)), atol=1e-5)
    assert torch.allclose(ours_k, rotate(rms(k, w_k)), atol=1e-5)

    base, a, b, gate = (torch.randn(batch, n_tokens, 8, generator=gen) for _ in range(4))
    gate = gate[:, :1]
    assert torch.allclose(gated_residual_reference_(base.clone(), gate, a, b), base + gate * (a + b), atol=1e-6)
