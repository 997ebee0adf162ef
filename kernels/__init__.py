"""Column-sparse tensor operations for the sparse-delta method: the one interface the core uses.

Pure tensor code: nothing here knows about models, sampling steps or ComfyUI. Each operation has a
PyTorch reference (``*_reference``) and, where it pays, a Triton kernel; ``backend_for`` picks the
Triton kernel for CUDA tensors and the reference everywhere else, and says once in the log why
Triton is not used when it cannot be.

Contract shared by the attention operations
- ``q, k, v``: ``[B, H, N, D]`` views (any strides, last dimension contiguous), bf16/fp16/fp32.
- ``query_order``: int32 ``[N]`` permutation of the tokens; query group ``g`` is the tokens at
  positions ``[g * group_size, (g + 1) * group_size)`` of it (the last group may be shorter).
  Token reordering lives in this table, so q/k/v/out stay in the model's token order.
- Key index lists: ``indices`` int32 ``[B, H, G, K]`` (ascending within each count),
  ``counts`` int32 ``[B, H, G]``; entries past a group's count are ignored.
- Outputs go into caller-provided views in token order (``out`` may be a transposed view of a
  ``[B, N, H, D]`` buffer so that no copy is needed to hand the result back to the model).
"""

from __future__ import annotations

from ._dispatch import backend_for
from .attention_reference import attention_with_column_sums_reference, column_sparse_attention_reference
from .index_lists import build_index_lists, selection_size
from .mlp_reference import sparse_mlp_delta_reference

__all__ = [
    "attention_with_column_sums",
    "column_sparse_attention",
    "sparse_mlp_delta",
    "build_index_lists",
    "selection_size",
    "backend_for",
]


def attention_with_column_sums(q, k, v, query_order, group_size, out, lse_hint=None):
    """Dense attention into ``out``; returns ``(column_sums [B,H,G,N] fp32, lse [B,H,N] fp32)``.

    See ``attention_with_column_sums_reference`` for the exact definition.
    """
    if backend_for(q) == "triton":
        from .attention_triton import attention_with_column_sums_triton
        return attention_with_column_sums_triton(q, k, v, query_order, group_size, out, lse_hint)
    return attention_with_column_sums_reference(q, k, v, query_order, group_size, out, lse_hint)


def column_sparse_attention(q, k, v, indices, counts, query_order, group_size, base, out, sign):
    """``out = base + sign * (attention restricted to each group's key list)``; returns ``out``.

    Sparse step: ``base`` is the delta cache, ``sign`` +1. Dense step: ``base`` is the dense
    output, ``out`` the delta cache, ``sign`` -1 (``cache = dense - restricted``).
    """
    if backend_for(q) == "triton":
        from .attention_triton import column_sparse_attention_triton
        return column_sparse_attention_triton(q, k, v, indices, counts, query_order, group_size, base, out, sign)
    return column_sparse_attention_reference(q, k, v, indices, counts, query_order, group_size, base, out, sign)


def sparse_mlp_delta(x, w1, b1, w2, unit_indices, unit_counts, row_order, block_size,
                     hidden_cache, out_cache, activation="gelu_tanh"):
    """Recompute the listed hidden units per row block and push the change into ``out_cache``.

    Updates ``hidden_cache`` and ``out_cache`` in place; see ``sparse_mlp_delta_reference``.
    """
    if backend_for(x) == "triton":
        from .mlp_triton import sparse_mlp_delta_triton
        return sparse_mlp_delta_triton(x, w1, b1, w2, unit_indices, unit_counts, row_order, block_size,
                                       hidden_cache, out_cache, activation)
    return sparse_mlp_delta_reference(x, w1, b1, w2, unit_indices, unit_counts, row_order, block_size,
                                      hidden_cache, out_cache, activation)
