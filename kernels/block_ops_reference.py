"""PyTorch references for the per-token work around a transformer block's matrix products.

A sparse step leaves the matrix products small; what is left of a block is per-token work that
stock code does in many passes over memory (a norm, then the modulation; two query/key norms on
strided views, each with its own copy, then the rotary embedding of each; a sum, a gated product
and a residual add). Each operation here is one pass in its Triton kernel. The references are
the same arithmetic in the stock order, including where stock code rounds to the input's dtype
between operations, so that the kernels can be held to them:

- ``layer_norm_modulate``: ``LayerNorm(x) * scale1 + shift`` (no affine part of its own; the norm
  is rounded to x's dtype before the modulation, as a separate norm module returns it).
- ``qk_norm_rope``: from a fused ``[B, N, >= 2 * H * D]`` projection whose first ``H * D`` columns
  are the queries and the next ``H * D`` the keys: RMS norm over each head's ``D`` with a weight,
  rounded, then the rotary embedding ``pe`` (``[1 or B, 1, >= N, D/2, 2, 2]``, float32:
  ``out[2i + r] = pe[i, r, 0] * x[2i] + pe[i, r, 1] * x[2i + 1]``). Returns ``q, k`` as
  contiguous ``[B, H, N, D]``, or writes them into ``out`` (two ``[B, H, N, D]`` views, e.g. the
  text or image rows of a joint sequence's buffers; a third view receives the values, the next
  ``H * D`` columns, unchanged).
- ``gated_residual_``: ``x += gate * (a + b)`` in place (``b`` may be None), or
  ``out = x + gate * (a + b)``, each sum and product rounded to x's dtype as separate operations
  would be.

Modulation vectors (``scale1``, ``shift``, ``gate``) are ``[1 or B, 1, C]``: one per batch row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm_modulate_reference(x, scale1, shift, eps):
    return torch.addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=eps), scale1)


def qk_norm_rope_reference(qkv, heads, q_weight, k_weight, q_eps, k_eps, pe, out=None):
    batch, n_tokens, _ = qkv.shape
    width = q_weight.shape[0] * heads
    head_dim = q_weight.shape[0]
    result = []
    for part, weight, eps in ((0, q_weight, q_eps), (1, k_weight, k_eps)):
        t = qkv[..., part * width:(part + 1) * width].reshape(batch, n_tokens, heads, head_dim).transpose(1, 2)
        t = F.rms_norm(t, (head_dim,), weight=weight.to(t.dtype), eps=eps)
        if pe is not None:
            t = _rope(t, pe[:, :, :n_tokens])
        result.append(t.contiguous())
    if out is not None:
        out[0].copy_(result[0])
        out[1].copy_(result[1])
        if len(out) == 3:  # the values too, unchanged
            out[2].copy_(qkv[..., 2 * width:3 * width].reshape(batch, n_tokens, heads, head_dim).transpose(1, 2))
        return out
    return result[0], result[1]


def _rope(t, pe):
    pairs = t.float().reshape(*t.shape[:-1], -1, 1, 2)
    rotated = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
    return rotated.reshape(*t.shape).to(t.dtype)


def gated_residual_reference_(x, gate, a, b=None, out=None):
    total = a if b is None else a + b
    if out is None:
        x += total * gate
        return x
    torch.add(x, total * gate, out=out)
    return out
