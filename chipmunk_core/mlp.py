"""Sparse-delta MLP for one layer: hidden-unit caches and the choice of units to recompute.

Dense step: the caller computes the MLP normally; we keep the post-activation hidden matrix H, the
output Y and, per row block, the mean of fc1's pre-activation. Sparse step: per row block, rank
hidden units by |fc1(mean of the block's inputs) - cached block mean| (fc1 is linear, so that is
exactly the change of the block's mean pre-activation), recompute the top ones plus a few random
ones, and update H and Y by the delta. The block mean of the recomputed units is refreshed, so the
next ranking measures change since each unit was last recomputed.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..kernels.mlp_reference import ACTIVATIONS
from .config import ChipmunkConfig
from .memory import to_compute, to_storage

ACTIVATION = "gelu_tanh"


def block_means(t: torch.Tensor, row_order: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over each row block (consecutive ``block`` positions of ``row_order``): [B, NB, C]."""
    batch, n_rows, channels = t.shape
    ordered = t.index_select(1, row_order.long())
    full = n_rows // block
    parts = []
    if full:
        parts.append(ordered[:, : full * block].reshape(batch, full, block, channels).float().mean(2))
    if n_rows % block:
        parts.append(ordered[:, full * block:].float().mean(1, keepdim=True))
    return torch.cat(parts, dim=1)


class SparseDeltaMLP:
    """Per-layer, per-conditioning MLP caches; x is [B, N, Din]."""

    def __init__(self, storage: torch.device | None = None):
        self.storage = storage  # where the hidden/output caches live (None: with the computation)
        self.reset()

    def reset(self):
        self.hidden = None      # [B, N, M] post-activation, token order
        self.out = None         # [B, N, Dout] MLP output as last computed
        self.block_mean = None  # [B, NB, M] fp32 pre-activation mean per row block
        self.signature = None

    def ready_for(self, x) -> bool:
        return self.hidden is not None and self.signature == (tuple(x.shape), x.dtype, x.device)

    def nbytes(self) -> int:
        tensors = (self.hidden, self.out, self.block_mean)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def dense_step(self, x, pre_activation, row_order, config: ChipmunkConfig) -> torch.Tensor:
        """Record a dense step from fc1's output; returns the activation for the caller's fc2."""
        hidden = ACTIVATIONS[ACTIVATION](pre_activation)
        self.hidden = to_storage(hidden.clone(), self.storage or hidden.device)
        self.block_mean = block_means(pre_activation, row_order, config.mlp_block)
        self.signature = (tuple(x.shape), x.dtype, x.device)
        return hidden

    def store_output(self, y: torch.Tensor):
        self.out = to_storage(y.clone(), self.storage or y.device)

    def sparse_step(self, x, w1, b1, w2, row_order, config: ChipmunkConfig, generator) -> torch.Tensor:
        """The MLP output (a new tensor) after recomputing the chosen units of every row block."""
        n_units = w1.shape[0]
        x_mean = block_means(x, row_order, config.mlp_block)
        current = torch.nn.functional.linear(x_mean.to(w1.dtype), w1, b1).float()
        indices, counts = kernels.build_index_lists(
            (current - self.block_mean).abs(), keep_count=round(config.mlp_keep * n_units),
            random_count=round(config.mlp_random_fraction * n_units), generator=generator,
            pad_to=config.selection_tile)
        hidden, out = to_compute(self.hidden, x.device), to_compute(self.out, x.device)
        kernels.sparse_mlp_delta(x, w1, b1, w2, indices, counts, row_order, config.mlp_block, hidden, out, ACTIVATION)
        if hidden is not self.hidden:  # caches kept off the device: write the updates back
            self.hidden.copy_(hidden, non_blocking=True)
            self.out.copy_(out, non_blocking=True)
        chosen = indices.long()
        recomputed = torch.arange(chosen.shape[-1], device=chosen.device) < counts[..., None]
        refreshed = torch.where(recomputed, current.gather(2, chosen), self.block_mean.gather(2, chosen))
        self.block_mean.scatter_(2, chosen, refreshed)
        return out.clone()
