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

ACTIVATIONS = {
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}


def sparse_mlp_delta_reference(x, w1, b1, w2, unit_indices, unit_counts, row_order, block_size,
                               hidden_cache, out_cache, activation="gelu_tanh"):
    """Apply the sparse-delta update in place to ``hidden_cache`` and ``out_cache``.

    ``x``: [B, N, Din]; ``w1``: [M, Din]; ``b1``: [M] or None; ``w2``: [Dout, M] (any strides);
    ``unit_indices``: int32 [B, NB, K], ``unit_counts``: int32 [B, NB] (entries past the count are
    ignored); ``row_order``: int32 permutation of range(N) or None for identity;
    ``hidden_cache``: [B, N, M] and ``out_cache``: [B, N, Dout], token order.
    """
    act = ACTIVATIONS[activation]
    batch, n_tokens, _ = x.shape
    n_blocks = math.ceil(n_tokens / block_size)
    order = torch.arange(n_tokens, device=x.device) if row_order is None else row_order.long().to(x.device)
    w1f = w1.float()
    w2f = w2.float()
    for b in range(batch):
        for blk in range(n_blocks):
            rows = order[blk * block_size: min((blk + 1) * block_size, n_tokens)]
            units = unit_indices[b, blk, : int(unit_counts[b, blk])].long()
            if units.numel() == 0:
                continue
            pre = x[b, rows].float() @ w1f[units].T
            if b1 is not None:
                pre = pre + b1[units].float()
            new = act(pre)
            old = hidden_cache[b, rows[:, None], units[None, :]].float()
            hidden_cache[b, rows[:, None], units[None, :]] = new.to(hidden_cache.dtype)
            update = (new - old) @ w2f[:, units].T
            out_cache[b, rows] = (out_cache[b, rows].float() + update).to(out_cache.dtype)
