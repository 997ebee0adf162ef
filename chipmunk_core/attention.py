"""Sparse-delta attention for one layer: the delta cache, the key lists, and the two kinds of step.

Dense step: full attention O, key scores per query group, S_g = forced keys + top-k + random keys,
and the cache C = O - A_S (A_S: attention with the softmax taken over S_g only).
Sparse step: O ~= C + A_S from the current q, k, v. Exact on the dense step by construction.
"""

from __future__ import annotations

import torch

from .. import kernels
from .config import ChipmunkConfig
from .layout import JointLayout
from .memory import to_compute, to_storage


class SparseDeltaAttention:
    """Per-layer, per-conditioning state; q/k/v are [B, H, N, D] and results [B, N, H * D]."""

    def __init__(self, storage: torch.device | None = None):
        self.storage = storage  # where the delta cache lives (None: with the computation)
        self.reset()

    def reset(self):
        self.indices = None
        self.counts = None
        self.delta = None  # [B, N, H, D] buffer, token order
        self.lse = None
        self.signature = None
        self.kept = 0

    @staticmethod
    def _signature(q, k):
        return (tuple(q.shape), k.shape[2], q.dtype, q.device)

    def ready_for(self, q, k) -> bool:
        return self.delta is not None and self.signature == self._signature(q, k)

    def nbytes(self) -> int:
        tensors = (self.indices, self.counts, self.delta, self.lse)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def kept_keys(self) -> int:
        """Keys each query group recomputes on sparse steps (the selection size)."""
        return self.kept

    def dense_step(self, q, k, v, layout: JointLayout, config: ChipmunkConfig, seeds, forced=None,
                   select: bool = True) -> torch.Tensor:
        """Dense attention, new key lists (``forced``: the keys every group keeps; default: the
        layout's), and the delta cache. ``seeds``: int64 [B], the random picks' seed per row."""
        batch, heads, n_tokens, head_dim = q.shape
        generator = torch.Generator(device=q.device).manual_seed(int(seeds[0]))
        out = torch.empty(batch, n_tokens, heads, head_dim, dtype=q.dtype, device=q.device)
        lse_hint = self.lse if self.ready_for(q, k) else None
        scores, lse = kernels.attention_with_column_sums(
            q, k, v, layout.query_order, config.query_group, out.transpose(1, 2), lse_hint)
        n_keys = k.shape[2]
        self.kept = kernels.selection_size(n_keys, round(config.attention_keep * n_keys), config.selection_tile)
        self.indices, self.counts = kernels.build_index_lists(
            scores, keep_count=round(config.attention_keep * n_keys),
            random_count=round(config.attention_random_fraction * n_keys),
            forced=layout.forced_below(n_keys) if forced is None else forced, generator=generator,
            pad_to=config.selection_tile)
        del scores
        delta = self.delta if self._delta_reusable(out) else torch.empty_like(out)
        kernels.column_sparse_attention(
            q, k, v, self.indices, self.counts, layout.query_order, config.query_group,
            base=out.transpose(1, 2), out=delta.transpose(1, 2), sign=-1.0)
        storage = self.storage or delta.device
        self.delta = to_storage(delta, storage)
        self.indices, self.counts = to_storage(self.indices, storage), to_storage(self.counts, storage)
        self.lse = lse
        self.signature = self._signature(q, k)
        return out.view(batch, n_tokens, heads * head_dim)

    def _delta_reusable(self, out) -> bool:
        """The old delta buffer can take the new cache in place (same shape, on the device)."""
        delta = self.delta
        return delta is not None and delta.shape == out.shape and delta.dtype == out.dtype and delta.device == out.device

    def sparse_step(self, q, k, v, layout: JointLayout, config: ChipmunkConfig) -> torch.Tensor:
        batch, heads, n_tokens, head_dim = q.shape
        delta = to_compute(self.delta, q.device)
        indices, counts = to_compute(self.indices, q.device), to_compute(self.counts, q.device)
        out = torch.empty_like(delta)
        kernels.column_sparse_attention(
            q, k, v, indices, counts, layout.query_order, config.query_group,
            base=delta.transpose(1, 2), out=out.transpose(1, 2), sign=1.0)
        return out.view(batch, n_tokens, heads * head_dim)
