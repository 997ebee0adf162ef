"""Sparse-delta attention for one layer: the delta cache, the key lists, and the two kinds of step.

Dense step: full attention O and the cache C = O - A_S (A_S: attention with the softmax taken over
each query group's key list S_g only). A dense step that selects (``select=True``) also scores the
keys per query group (exact column sums, or sums over a sample of the group's queries) and
chooses S_g = forced keys + random keys + top-k; one that does not keeps the stored lists and
takes O from the fastest dense attention (``scaled_dot_product_attention``: cuDNN on Hopper).
Sparse step: O ~= C + A_S from the current q, k, v. Exact on the dense step by construction.

Folded (``fold=True``): a block that feeds O through a linear map before adding it to another cache
of its own (FLUX's single blocks: ``linear2`` takes attention and MLP together) keeps ``W C`` there
instead of C. The dense step hands C back without keeping it, and the sparse steps return A_S alone.

Once the state holds caches for a shape, neither step synchronises with the host or draws from a
generator, and the long-lived tensors (delta cache, key lists) are refilled in place: the steps can
be captured in a CUDA graph. Outputs are allocated per call: under a graph they come from its
memory pool, and a buffer kept per layer would hold the memory of one output per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from .config import ChipmunkConfig
from .layout import JointLayout
from .memory import HostPrefetch, Rows, reuse_buffer, to_compute, to_storage


def selects_keys(config: ChipmunkConfig, step: int) -> bool:
    """Whether a dense step at sampling step ``step`` re-selects the key lists (``select=``).

    A dense step whose layer holds no lists for the shape selects whatever this says.
    """
    return config.attention_selection == "every_dense_step" or step < config.dense_warmup_steps


class SparseDeltaAttention(Rows):
    """Per-layer, per-conditioning state; q/k/v are [B, H, N, D] and results [B, N, H * D]."""

    BATCHED = ("indices", "counts", "delta", "delta_scale", "lse")

    def __init__(self, storage: torch.device | None = None, prefetch: HostPrefetch | None = None):
        self.storage = storage  # where the delta cache lives (None: with the computation)
        self.prefetch = prefetch  # brings a host-resident cache to the device ahead of its use
        if prefetch is not None:
            prefetch.register(self)
        self.reset()

    def reset(self):
        self.indices = None
        self.counts = None
        self.delta = None  # [B, N, H, D] buffer, token order (the model's dtype, or fp8)
        self.delta_scale = None  # [B, N, H] float32 row scales of an fp8 delta cache (else None)
        self.lse = None    # row log-sum-exp of the last dense step that computed exact column sums
        self.signature = None
        self.kept = 0
        self.folded = False  # the delta went to the caller's cache (``dense_step(fold=True)``): no delta here

    def batch(self) -> int:
        return 0 if self.indices is None else self.indices.shape[0]

    @staticmethod
    def _signature(q, k):
        return (tuple(q.shape), k.shape[2], q.dtype, q.device)

    def _lists_fit(self, q, k) -> bool:
        """Whether the stored key lists were made at this shape."""
        return self.indices is not None and self.signature == self._signature(q, k)

    def ready_for(self, q, k, fold: bool = False) -> bool:
        """Whether a sparse step can follow at this shape, with the delta kept here (``fold`` False)
        or folded into the caller's cache (True)."""
        held = self.folded if fold else self.delta is not None
        return held and self._lists_fit(q, k)

    def nbytes(self) -> int:
        tensors = (self.indices, self.counts, self.delta, self.delta_scale, self.lse)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def buffers(self) -> list[torch.Tensor]:
        """The long-lived tensors a sparse step reads (the dense steps' log-sum-exp is not one)."""
        return [t for t in (self.delta, self.indices, self.counts, self.delta_scale) if t is not None]

    def host_tensors(self) -> tuple:
        """What a sparse step reads, where it lives in host memory (else ())."""
        tensors = (self.delta, self.indices, self.counts)
        if any(t is None for t in tensors) or self.delta.device.type != "cpu":
            return ()
        return tensors + ((self.delta_scale,) if self.delta_scale is not None else ())

    def kept_keys(self) -> int:
        """Keys each query group recomputes on sparse steps (the selection size, random keys in)."""
        return self.kept

    @staticmethod
    def _output(q) -> torch.Tensor:
        """A [B, N, H, D] output (token-major: the model's layout), seen as [B, H, N, D]."""
        batch, heads, n_tokens, head_dim = q.shape
        return torch.empty(batch, n_tokens, heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)

    def dense_step(self, q, k, v, layout: JointLayout, config: ChipmunkConfig, seeds: torch.Tensor,
                   select: bool = True, forced: torch.Tensor | None = None, fold: bool = False):
        """Dense attention (returned) and a fresh delta cache.

        ``seeds``: int64 [B] on q's device, one per batch row (the random keys of a row depend on
        its seed only). ``select=False`` keeps the stored key lists when they fit this shape.
        ``forced``: the key columns every group keeps, when not the layout's (keys a mask dropped
        are renumbered). ``fold``: the delta is the caller's to keep: returns (dense, delta), both
        [B, N, H * D] in the model's dtype, and keeps the key lists only.
        """
        batch, heads, n_tokens, head_dim = q.shape
        ready = self._lists_fit(q, k)
        if select or not ready:
            dense = self._dense_and_new_lists(q, k, v, layout, config, seeds, ready, forced)
        else:
            dense = F.scaled_dot_product_attention(q, k, v)
        indices, counts = to_compute(self.indices, q.device), to_compute(self.counts, q.device)
        fp8 = config.fp8_caches and not fold  # a folded delta is handed over at once, never stored here
        if fold:
            delta = torch.empty((batch, n_tokens, heads, head_dim), dtype=q.dtype, device=q.device)
        else:
            delta = reuse_buffer(self.delta, (batch, n_tokens, heads, head_dim), kernels.FP8 if fp8 else q.dtype,
                                 q.device)
        scale = reuse_buffer(self.delta_scale, (batch, n_tokens, heads), torch.float32, q.device) if fp8 else None
        kernels.column_sparse_attention(q, k, v, indices, counts, layout.query_order, config.query_group,
                                        base=dense, out=delta.transpose(1, 2), sign=-1.0,
                                        out_scale=None if scale is None else scale.transpose(1, 2))
        storage = self.storage or delta.device
        if self.prefetch is not None:
            self.prefetch.drop(self)  # a copy in flight holds the old cache
        self.delta = None if fold else to_storage(delta, storage)
        self.delta_scale = None if scale is None else to_storage(scale, storage)
        self.folded = fold
        self.indices, self.counts = to_storage(indices, storage), to_storage(counts, storage)
        self.signature = self._signature(q, k)
        dense = dense.transpose(1, 2).reshape(batch, n_tokens, heads * head_dim)
        return (dense, delta.view(batch, n_tokens, heads * head_dim)) if fold else dense

    def _dense_and_new_lists(self, q, k, v, layout, config, seeds, ready, forced_keys=None):
        """Dense attention ([B, H, N, D] view) and new key lists in self.indices / self.counts."""
        n_keys = k.shape[2]
        if config.attention_score_queries:
            dense = F.scaled_dot_product_attention(q, k, v)
            scores = kernels.sampled_column_sums(q, k, layout.query_order, config.query_group,
                                                 config.attention_score_queries)
        else:
            dense = self._output(q)
            lse_hint = to_compute(self.lse, q.device) if ready and self.lse is not None else None
            scores, lse = kernels.attention_with_column_sums(q, k, v, layout.query_order, config.query_group,
                                                             dense, lse_hint)
            self.lse = to_storage(lse, self.storage or lse.device)  # with the layer's caches (the plan counts it there)
        keep_count = round(config.attention_keep * n_keys)
        forced_keys = layout.forced_keys if forced_keys is None else forced_keys
        forced = kernels.forced_columns(forced_keys, n_keys) if forced_keys.numel() else None
        self.kept = kernels.selection_size(n_keys, keep_count, config.selection_tile)
        width = kernels.list_width(n_keys, keep_count, config.selection_tile, forced.width if forced else 0)
        out = None
        if (ready and self.indices.device == q.device and self.indices.shape[-1] == width
                and (self.indices.dtype, self.counts.dtype) == kernels.list_dtypes(n_keys, width, paged=True)):
            out = (self.indices, self.counts)  # refill the lists in place (stable addresses)
        self.indices, self.counts = kernels.build_index_lists(
            scores, keep_count=keep_count, random_count=round(config.attention_random_fraction * n_keys),
            forced=forced, row_seeds=seeds, pad_to=config.selection_tile, out=out, paged=True)
        return dense

    def sparse_step(self, q, k, v, layout: JointLayout, config: ChipmunkConfig) -> torch.Tensor:
        """C + A_S, or A_S alone where the delta was folded into the caller's cache."""
        batch, heads, n_tokens, head_dim = q.shape
        host = self.host_tensors() if self.prefetch is not None else ()
        if host:
            delta, indices, counts, *scales = self.prefetch.take(self, host, q.device)
            scale = scales[0] if scales else None
        else:
            delta = None if self.delta is None else to_compute(self.delta, q.device)
            indices, counts = to_compute(self.indices, q.device), to_compute(self.counts, q.device)
            scale = None if self.delta_scale is None else to_compute(self.delta_scale, q.device)
        out = self._output(q)
        kernels.column_sparse_attention(
            q, k, v, indices, counts, layout.query_order, config.query_group,
            base=None if delta is None else delta.transpose(1, 2), out=out, sign=1.0,
            base_scale=None if scale is None else scale.transpose(1, 2))
        return out.transpose(1, 2).view(batch, n_tokens, heads * head_dim)
