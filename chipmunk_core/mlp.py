"""Sparse-delta MLP for one layer: hidden-unit caches and the choice of units to recompute.

Dense step: the caller computes the MLP normally; we keep the post-activation hidden matrix H, the
output Y and, per row block, the mean of fc1's pre-activation. Sparse step: per row block, rank
hidden units by |fc1(mean of the block's inputs) - cached block mean| (fc1 is linear, so that is
exactly the change of the block's mean pre-activation), recompute the top ones plus a few random
ones, and update H and Y by the delta. The block mean of the recomputed units is refreshed, so the
next ranking measures change since each unit was last recomputed. Like the reference, the
ranking is redone every ``mlp_selection_interval`` sparse steps; in between, the same units are
recomputed (ranking costs a dozen small operations per layer, which matters when the GPU work per
layer is small).
"""

from __future__ import annotations

import torch

from .. import kernels
from ..kernels.mlp_reference import ACTIVATIONS
from .config import ChipmunkConfig
from .layout import inverse_permutation
from .memory import to_compute, to_storage

ACTIVATION = "gelu_tanh"


def block_means(t: torch.Tensor, row_order: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over each row block (consecutive ``block`` positions of ``row_order``): [B, NB, C]."""
    return _ordered_block_means(t.index_select(1, row_order.long()), block)


def _ordered_block_means(ordered: torch.Tensor, block: int) -> torch.Tensor:
    batch, n_rows, channels = ordered.shape
    full = n_rows // block
    parts = []
    if full:
        parts.append(ordered[:, : full * block].reshape(batch, full, block, channels).float().mean(2))
    if n_rows % block:
        parts.append(ordered[:, full * block:].float().mean(1, keepdim=True))
    return torch.cat(parts, dim=1)


class SparseDeltaMLP:
    """Per-layer, per-conditioning MLP caches; x is [B, N, Din].

    The caches are kept in block order (rows permuted by ``row_order``, so a row block is
    contiguous) and the hidden cache unit-major ([B, M, N]): the layouts the Triton kernel reads
    and writes with coalesced accesses (scattered 2-byte stores into a token-major cache cost half
    the sparse MLP's time on an H100). fc2's weight is handed to the kernel transposed
    (``w2_t.t()``), made once per run when the weight is the layer's own parameter.
    """

    def __init__(self, storage: torch.device | None = None):
        self.storage = storage  # where the hidden/output caches live (None: with the computation)
        self.reset()

    def reset(self):
        self.hidden = None      # [B, M, N] post-activation, block order, unit-major
        self.out = None         # [B, N, Dout] MLP output as last computed, block order
        self.block_mean = None  # [B, NB, M] fp32 pre-activation mean per row block
        self.signature = None
        self._order = None      # row order of the last dense step (int64) and its inverse
        self._inverse = None
        self._w2_t = None       # (key, fc2 weight transposed to [M, Dout])
        self._selection = None  # (indices, counts) of the last ranking
        self._sparse_steps = 0  # sparse steps since the last dense step

    def ready_for(self, x) -> bool:
        return self.hidden is not None and self.signature == (tuple(x.shape), x.dtype, x.device)

    def nbytes(self) -> int:
        tensors = (self.hidden, self.out, self.block_mean, self._w2_t[1] if self._w2_t else None)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def hidden_in_token_order(self) -> torch.Tensor:
        """The hidden cache as [B, N, M] in the model's token order (for inspection and tests)."""
        return self.hidden.transpose(1, 2).index_select(1, self._inverse.to(self.hidden.device))

    def dense_step(self, x, pre_activation, row_order, config: ChipmunkConfig) -> torch.Tensor:
        """Record a dense step from fc1's output; returns the activation for the caller's fc2."""
        hidden = ACTIVATIONS[ACTIVATION](pre_activation)
        self._order = row_order.long()
        self._inverse = inverse_permutation(self._order)
        blocked = hidden.index_select(1, self._order).transpose(1, 2).contiguous()
        self.hidden = to_storage(blocked, self.storage or hidden.device)
        self.block_mean = block_means(pre_activation, row_order, config.mlp_block)
        self.signature = (tuple(x.shape), x.dtype, x.device)
        self._selection, self._sparse_steps = None, 0
        return hidden

    def store_output(self, y: torch.Tensor):
        self.out = to_storage(y.index_select(1, self._order), self.storage or y.device)

    def _transposed_fc2(self, w2, w2_key):
        if w2_key is not None and self._w2_t is not None and self._w2_t[0] == w2_key:
            return self._w2_t[1]
        w2_t = w2.t().contiguous()
        self._w2_t = (w2_key, w2_t) if w2_key is not None else None
        return w2_t

    def units(self) -> int:
        """Hidden units of the MLP (0 before the first dense step)."""
        return 0 if self.hidden is None else self.hidden.shape[1]

    def sparse_step(self, x, w1, b1, w2, row_order, config: ChipmunkConfig, seeds, w2_key=None) -> torch.Tensor:
        """The MLP output (a new tensor) after recomputing the chosen units of every row block.

        ``w2_key`` identifies fc2's weight when it is the layer's own parameter (its transpose is
        then reused across steps); None means the weight may differ per call (LoRA, casting).
        """
        x_ordered = x.index_select(1, row_order.long())
        if self._selection is None or self._sparse_steps % config.mlp_selection_interval == 0:
            generator = torch.Generator(device=x.device).manual_seed(int(seeds[0]))
            self._selection = self._rank_units(x_ordered, w1, b1, config, generator)
        self._sparse_steps += 1
        indices, counts = self._selection
        hidden, out = to_compute(self.hidden, x.device), to_compute(self.out, x.device)
        w2_t = self._transposed_fc2(w2, w2_key)
        kernels.sparse_mlp_delta(x_ordered, w1, b1, w2_t.t(), indices, counts, None,
                                 config.mlp_block, hidden.transpose(1, 2), out, ACTIVATION)
        if hidden is not self.hidden:  # caches kept off the device: write the updates back
            self.hidden.copy_(hidden, non_blocking=True)
            self.out.copy_(out, non_blocking=True)
        return out.index_select(1, self._inverse)

    def _rank_units(self, x_ordered, w1, b1, config: ChipmunkConfig, generator):
        """Units to recompute per row block; refreshes the block means of the chosen units."""
        n_units = w1.shape[0]
        x_mean = _ordered_block_means(x_ordered, config.mlp_block)
        current = torch.nn.functional.linear(x_mean.to(w1.dtype), w1, b1).float()
        indices, counts = kernels.build_index_lists(
            (current - self.block_mean).abs(), keep_count=round(config.mlp_keep * n_units),
            random_count=round(config.mlp_random_fraction * n_units), generator=generator,
            pad_to=config.selection_tile)
        chosen = indices.long()
        recomputed = torch.arange(chosen.shape[-1], device=chosen.device) < counts[..., None]
        refreshed = torch.where(recomputed, current.gather(2, chosen), self.block_mean.gather(2, chosen))
        self.block_mean.scatter_(2, chosen, refreshed)
        return indices, counts
