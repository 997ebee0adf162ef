"""PyTorch reference for the sparse-delta MLP update (the oracle for the Triton kernel).

Rows (tokens) are taken in blocks of ``block_size`` consecutive positions of ``row_order``; each
row block owns a list of hidden units. For those units only, the activation is recomputed from the
current input and the change is pushed through the second matrix:

    new   = act(x[R] @ w1[S]^T + b1[S])
    delta = new - hidden_cache[R][:, S]
    hidden_cache[R][:, S] = new
    out_cache[R] += delta @ w2[:, S]^T

so ``out_cache`` stays equal to ``act(hidden) @ w2^T`` for whatever ``hidden_cache`` holds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .fp8 import FP8_MAX

ACTIVATIONS = {
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}


# An fp8 hidden cache's unit scales leave room for values up to this many times the largest one
# of the dense step (sparse steps write new values with the same scale).
HIDDEN_HEADROOM = 8.0


def sparse_mlp_delta_reference(x, w1, b1, w2, unit_indices, unit_counts, row_order, block_size,
                               hidden_cache, out_cache, activation="gelu_tanh", *, hidden_in_block_order=False,
                               result=None, hidden_scale=None):
    """Apply the sparse-delta update in place to ``hidden_cache`` and ``out_cache``.

    ``x``: [B, N, Din]; ``w1``: [M, Din]; ``b1``: [M] or None; ``w2``: [Dout, M] (any strides);
    ``unit_indices``: int32 [B, NB, K], ``unit_counts``: int32 [B, NB] (entries past the count are
    ignored); ``row_order``: int32 permutation of range(N) or None for identity;
    ``hidden_cache``: [B, N, M], in token order, or in block order (row ``p`` holds the token
    ``row_order[p]``) with ``hidden_in_block_order``; ``out_cache``: [B, N, Dout], token order.
    ``result`` ([B, N, Dout], optional) receives a copy of every row of ``out_cache`` the update
    writes (rows of a block with no listed unit are copied unchanged).

    fp8 hidden cache: with ``hidden_scale`` (float32 [B, M], one scale per unit) ``hidden_cache`` is
    float8_e4m3fn holding ``value / scale``; new values are stored with their unit's scale (clamped
    to fp8's range), and the change pushed into ``out_cache`` is that of the stored values, so the
    output cache stays ``act(stored hidden) @ w2^T`` plus the dense step's own rounding: fp8's
    rounding does not add up over steps.
    """
    act = ACTIVATIONS[activation]
    batch, n_tokens, _ = x.shape
    n_blocks = math.ceil(n_tokens / block_size)
    order = torch.arange(n_tokens, device=x.device) if row_order is None else row_order.long().to(x.device)
    w1f = w1.float()
    w2f = w2.float()
    for b in range(batch):
        for blk in range(n_blocks):
            positions = torch.arange(blk * block_size, min((blk + 1) * block_size, n_tokens), device=x.device)
            rows = order[positions]
            hidden_rows = positions if hidden_in_block_order else rows
            units = unit_indices[b, blk, : int(unit_counts[b, blk])].long()
            if units.numel():
                pre = x[b, rows].float() @ w1f[units].T
                if b1 is not None:
                    pre = pre + b1[units].float()
                new = act(pre)
                old = hidden_cache[b, hidden_rows[:, None], units[None, :]].float()
                if hidden_scale is None:
                    hidden_cache[b, hidden_rows[:, None], units[None, :]] = new.to(hidden_cache.dtype)
                else:
                    unit_scale = hidden_scale[b, units].float()
                    old = old * unit_scale
                    stored = (new / unit_scale).clamp(-FP8_MAX, FP8_MAX).to(hidden_cache.dtype)
                    hidden_cache[b, hidden_rows[:, None], units[None, :]] = stored
                    new = stored.float() * unit_scale
                update = (new - old) @ w2f[:, units].T
                out_cache[b, rows] = (out_cache[b, rows].float() + update).to(out_cache.dtype)
            if result is not None:
                result[b, rows] = out_cache[b, rows].to(result.dtype)


def transpose_into_reference(src, out):
    """``out[c, r] = src[r, c]`` (``src`` [R, C] with any strides; ``out`` [C, R], same dtype); returns
    ``out``. The sparse MLP's second launch reads fc2 as [M, Dout] rows, one per listed unit, and
    the model stores it [Dout, M]: a sparse step transposes it into one scratch buffer."""
    if tuple(out.shape) != tuple(src.shape[::-1]) or out.dtype != src.dtype:
        raise ValueError(f"out must be {tuple(src.shape[::-1])} {src.dtype}, got {tuple(out.shape)} {out.dtype}")
    return out.copy_(src.t())


def block_means_reference(t, row_order, block_size, out=None):
    """Mean over each row block of ``t`` ([B, N, C]; block ``i`` = the tokens at positions
    ``[i * block_size, (i + 1) * block_size)`` of ``row_order``, None = identity; the last block may
    be shorter): [B, NB, C], float32 unless ``out`` (any float dtype) is given."""
    batch, n_tokens, channels = t.shape
    ordered = t if row_order is None else t.index_select(1, row_order.to(t.device).long())
    full = n_tokens // block_size
    parts = []
    if full:
        parts.append(ordered[:, : full * block_size].reshape(batch, full, block_size, channels).float().mean(2))
    if n_tokens % block_size:
        parts.append(ordered[:, full * block_size:].float().mean(1, keepdim=True))
    means = torch.cat(parts, dim=1)
    if out is None:
        return means
    out.copy_(means)
    return out
