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
- Key index lists: ``indices`` ``[B, H, G, K]``, ``counts`` ``[B, H, G]``, int16 or int32 (the
  lists built here take ``index_dtype(N_keys)``, the narrowest that holds them); entries past a
  group's count are ignored. The kernels take the entries in any order; the lists built
  here are ascending (a free by-product of how they are built, and it keeps gathers local).
  Past int16's range, attention lists built with ``paged=True`` take the paged form (int16 ids,
  int32 counts; ascending by definition): see ``index_lists.page_lists``.
- Outputs go into caller-provided views in token order (``out`` may be a transposed view of a
  ``[B, N, H, D]`` buffer so that no copy is needed to hand the result back to the model).
"""

from __future__ import annotations

from ._dispatch import backend_for
from ._device import fp8_supported
from .attention_reference import (attention_with_column_sums_reference, column_sparse_attention_reference,
                                  sampled_column_sums_reference)
from .fp8 import FP8, quantize_rows
from .block_ops_reference import gated_residual_reference_, layer_norm_modulate_reference, qk_norm_rope_reference
from .index_lists import (ForcedColumns, build_index_lists_reference, check_list_buffers, forced_columns, index_dtype,
                          is_paged, list_bytes, list_dtypes, list_width, rank_units_reference, read_lists,
                          selection_size)
from .mlp_reference import HIDDEN_HEADROOM, block_means_reference, sparse_mlp_delta_reference, transpose_into_reference

__all__ = [
    "attention_with_column_sums",
    "sampled_column_sums",
    "column_sparse_attention",
    "sparse_mlp_delta",
    "block_means",
    "transpose_into",
    "build_index_lists",
    "rank_units",
    "forced_columns",
    "ForcedColumns",
    "list_width",
    "quantize_rows",
    "FP8",
    "HIDDEN_HEADROOM",
    "fp8_supported",
    "index_dtype",
    "list_bytes",
    "list_dtypes",
    "read_lists",
    "selection_size",
    "backend_for",
    "layer_norm_modulate",
    "qk_norm_rope",
    "gated_residual_",
]


def attention_with_column_sums(q, k, v, query_order, group_size, out, lse_hint=None):
    """Dense attention into ``out``; returns ``(column_sums [B,H,G,N] fp32, lse [B,H,N] fp32)``.

    See ``attention_with_column_sums_reference`` for the exact definition.
    """
    if backend_for(q) == "triton":
        from .attention_triton import attention_with_column_sums_triton
        return attention_with_column_sums_triton(q, k, v, query_order, group_size, out, lse_hint)
    return attention_with_column_sums_reference(q, k, v, query_order, group_size, out, lse_hint)


def sampled_column_sums(q, k, query_order, group_size, samples):
    """Key scores per query group from ``samples`` of its queries: ``[B, H, G, N_keys]`` fp32.

    See ``sampled_column_sums_reference``; needs no output and no previous statistics.
    """
    if backend_for(q) == "triton":
        from .attention_triton import sampled_column_sums_triton
        return sampled_column_sums_triton(q, k, query_order, group_size, samples)
    return sampled_column_sums_reference(q, k, query_order, group_size, samples)


def column_sparse_attention(q, k, v, indices, counts, query_order, group_size, base, out, sign,
                            base_scale=None, out_scale=None):
    """``out = base + sign * (attention restricted to each group's key list)``; returns ``out``.

    Sparse step: ``base`` is the delta cache, ``sign`` +1. Dense step: ``base`` is the dense
    output, ``out`` the delta cache, ``sign`` -1 (``cache = dense - restricted``). An fp8 delta
    cache (float8_e4m3fn) comes with its row scales (``base_scale`` / ``out_scale``, float32
    ``[B, H, N]``); see ``quantize_rows``.
    """
    if backend_for(q) == "triton":
        from .attention_triton import column_sparse_attention_triton
        return column_sparse_attention_triton(q, k, v, indices, counts, query_order, group_size, base, out, sign,
                                              base_scale, out_scale)
    return column_sparse_attention_reference(q, k, v, indices, counts, query_order, group_size, base, out, sign,
                                             base_scale, out_scale)


def sparse_mlp_delta(x, w1, b1, w2, unit_indices, unit_counts, row_order, block_size,
                     hidden_cache, out_cache, activation="gelu_tanh", *, hidden_in_block_order=False, result=None,
                     hidden_scale=None):
    """Recompute the listed hidden units per row block and push the change into ``out_cache``.

    Updates ``hidden_cache`` and ``out_cache`` in place and, if given, copies the updated output
    rows into ``result``. An fp8 hidden cache comes with one float32 scale per unit
    (``hidden_scale`` [B, M]). See ``sparse_mlp_delta_reference``.
    """
    if backend_for(x) == "triton":
        from .mlp_triton import sparse_mlp_delta_triton
        return sparse_mlp_delta_triton(x, w1, b1, w2, unit_indices, unit_counts, row_order, block_size,
                                       hidden_cache, out_cache, activation, hidden_in_block_order=hidden_in_block_order,
                                       result=result, hidden_scale=hidden_scale)
    return sparse_mlp_delta_reference(x, w1, b1, w2, unit_indices, unit_counts, row_order, block_size,
                                      hidden_cache, out_cache, activation, hidden_in_block_order=hidden_in_block_order,
                                      result=result, hidden_scale=hidden_scale)


def block_means(t, row_order, block_size, out=None):
    """Mean of each row block of ``t`` ([B, N, C], rows taken in ``row_order``): [B, NB, C].

    See ``block_means_reference``; ``out`` (optional) may be any float dtype.
    """
    if backend_for(t) == "triton":
        from .mlp_triton import block_means_triton
        return block_means_triton(t, row_order, block_size, out)
    return block_means_reference(t, row_order, block_size, out)


def transpose_into(src, out):
    """``out[c, r] = src[r, c]`` for ``src`` [R, C] (any strides) into ``out`` [C, R]; returns ``out``.

    See ``transpose_into_reference``."""
    if backend_for(src) == "triton":
        from .mlp_triton import transpose_into_triton
        return transpose_into_triton(src, out)
    return transpose_into_reference(src, out)


def build_index_lists(scores, keep_count, random_count=0, forced=None, row_seeds=None, pad_to=64, out=None,
                      paged=False):
    """Per row of ``scores`` ([..., R, C]): forced + random + top-scoring columns, ascending.

    Returns ``(indices [..., R, K], counts [..., R])``, ``index_dtype(C)`` (into ``out`` if given); see
    ``build_index_lists_reference`` for the exact definition (ties go to the lower column; random
    columns come from a hash of ``row_seeds[b]``, the row and the column). ``paged``: the reader
    takes the paged form (``column_sparse_attention`` does), used where ``paged_form(C, K)``.
    """
    if backend_for(scores) == "triton":
        from .index_lists_triton import build_index_lists_triton
        return build_index_lists_triton(scores, keep_count, random_count, forced, row_seeds, pad_to, out, paged=paged)
    indices, counts = build_index_lists_reference(scores, keep_count, random_count, forced, row_seeds, pad_to, paged)
    return _into(out, indices, counts, scores.shape[-1])


def rank_units(current, block_mean, keep_count, random_count=0, row_seeds=None, pad_to=64, out=None):
    """The MLP's unit lists from ``|current - block_mean|`` ([B, NB, M]); refreshes ``block_mean``
    (float32, in place) of the chosen units. See ``rank_units_reference``."""
    if backend_for(current) == "triton":
        from .index_lists_triton import rank_units_triton
        return rank_units_triton(current, block_mean, keep_count, random_count, row_seeds, pad_to, out)
    indices, counts = rank_units_reference(current, block_mean, keep_count, random_count, row_seeds, pad_to)
    return _into(out, indices, counts, current.shape[-1])


def layer_norm_modulate(x, scale1, shift, eps):
    """``LayerNorm(x) * scale1 + shift`` in one pass (x [B, N, C]; scale1, shift [1 or B, 1, C]).

    See ``block_ops_reference`` for the exact definition (and where it rounds)."""
    if backend_for(x) == "triton":
        from .block_ops_triton import layer_norm_modulate_triton
        return layer_norm_modulate_triton(x, scale1, shift, eps)
    return layer_norm_modulate_reference(x, scale1, shift, eps)


def qk_norm_rope(qkv, heads, q_weight, k_weight, q_eps, k_eps, pe, out=None):
    """Queries and keys ([B, H, N, D] each, contiguous, or into the views ``out``) from a fused
    projection: RMS norm per head, then the rotary embedding ``pe`` (None: none). ``out`` of three
    views also receives the values, unchanged. See ``block_ops_reference``."""
    if backend_for(qkv) == "triton":
        from .block_ops_triton import qk_norm_rope_triton
        return qk_norm_rope_triton(qkv, heads, q_weight, k_weight, q_eps, k_eps, pe, out)
    return qk_norm_rope_reference(qkv, heads, q_weight, k_weight, q_eps, k_eps, pe, out)


def gated_residual_(x, gate, a, b=None, out=None):
    """``x += gate * (a + b)`` in place (or into ``out``, x unchanged), one pass; returns the
    result. See ``block_ops_reference``."""
    if backend_for(x) == "triton":
        from .block_ops_triton import gated_residual_triton_
        return gated_residual_triton_(x, gate, a, b, out)
    return gated_residual_reference_(x, gate, a, b, out)


def _into(out, indices, counts, n_columns):
    if out is None:
        return indices, counts
    check_list_buffers(*out, n_columns, is_paged(indices, counts))
    out[0].copy_(indices)
    out[1].copy_(counts)
    return out
