"""PyTorch references for the two attention operations of the sparse-delta method.

These are the test oracle for the Triton kernels and the path used where Triton cannot run (CPU,
other accelerators). They compute in float32 and work through query groups in chunks so that memory
stays bounded at video sizes; they make no attempt to be fast.

Shared conventions (see ``kernels/__init__.py`` for the full contract):
- ``q, k, v`` are ``[B, H, N, D]`` views with any strides.
- ``query_order`` is an int32 permutation of ``range(N)``: query group ``g`` is the tokens
  ``query_order[g * group_size : (g + 1) * group_size]`` (the last group may be shorter).
- Outputs are written in token order into caller-provided ``[B, H, N, D]`` views.
"""

from __future__ import annotations

import math

import torch

from .fp8 import quantize_rows
from .index_lists import read_lists

# Rows of scores materialised at once by the references: bounded memory, not speed.
_CHUNK_ELEMENTS = 1 << 24


def _group_chunks(n_tokens: int, group_size: int, n_keys: int):
    """Yield (first_position, last_position) ranges made of whole query groups."""
    groups_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, group_size * n_keys))
    step = groups_per_chunk * group_size
    for start in range(0, n_tokens, step):
        yield start, min(start + step, n_tokens)


def attention_with_column_sums_reference(q, k, v, query_order, group_size, out, lse_hint=None):
    """Dense attention that also scores every key column for every query group.

    Writes ``softmax(q k^T / sqrt(D)) v`` into ``out`` and returns ``(column_sums, lse)``:
    ``column_sums[b, h, g, j] = sum over queries t of group g of exp(s_tj - L_t)`` (float32,
    ``[B, H, G, N]``) where ``L`` is ``lse_hint`` when given (the previous dense step's row
    log-sum-exp, which lets a one-pass kernel normalise on the fly) and the exact row log-sum-exp
    otherwise; ``lse`` is the exact row log-sum-exp (float32, ``[B, H, N]``, token order).
    """
    batch, heads, n_tokens, head_dim = q.shape
    n_keys = k.shape[2]
    n_groups = math.ceil(n_tokens / group_size)
    scale = head_dim ** -0.5
    order = query_order.long().to(q.device)
    column_sums = torch.zeros(batch, heads, n_groups, n_keys, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, heads, n_tokens, dtype=torch.float32, device=q.device)
    kf = k.float()
    vf = v.float()
    for start, stop in _group_chunks(n_tokens, group_size, n_keys):
        rows = order[start:stop]
        scores = torch.matmul(q[:, :, rows].float(), kf.transpose(-1, -2)) * scale
        row_lse = torch.logsumexp(scores, dim=-1)
        lse[:, :, rows] = row_lse
        out[:, :, rows] = torch.matmul(torch.exp(scores - row_lse[..., None]), vf).to(out.dtype)
        norm = row_lse if lse_hint is None else lse_hint[:, :, rows].float()
        probs = torch.exp(scores - norm[..., None])
        first_group = start // group_size
        for g in range(first_group, math.ceil(stop / group_size)):
            lo = g * group_size - start
            hi = min((g + 1) * group_size, stop) - start
            column_sums[:, :, g] = probs[:, :, lo:hi].sum(dim=2)
    return column_sums, lse


def column_sparse_attention_reference(q, k, v, indices, counts, query_order, group_size, base, out, sign,
                                      base_scale=None, out_scale=None):
    """Attention restricted to each query group's key list, added onto ``base``.

    ``out[b, h, t] = base[b, h, t] + sign * softmax_S(q_t k_S^T / sqrt(D)) v_S`` where ``S`` is
    ``indices[b, h, g, :counts[b, h, g]]`` for the group ``g`` holding token ``t``. A group with a
    count of zero contributes nothing. ``base`` may be ``None`` (zero) and ``out`` may alias
    ``base``. Sparse step: ``base`` = delta cache, ``sign`` = +1. Dense step: ``base`` = dense
    output, ``out`` = delta cache, ``sign`` = -1.

    fp8 delta caches: with ``base_scale`` ([B, H, N] float32) ``base`` is float8_e4m3fn and each of
    its rows is multiplied by its scale; with ``out_scale`` ``out`` is float8_e4m3fn and receives
    ``quantize_rows`` of the result, its scales going into ``out_scale``.
    """
    batch, heads, n_tokens, head_dim = q.shape
    scale = head_dim ** -0.5
    order = query_order.long().to(q.device)
    indices, counts = read_lists(indices, counts)  # (either form: plain or paged)
    capacity = indices.shape[-1]
    valid = torch.arange(capacity, device=q.device) < counts[..., None]  # [B, H, G, K]
    for g in range(indices.shape[2]):
        rows = order[g * group_size: min((g + 1) * group_size, n_tokens)]
        idx = torch.where(valid[:, :, g], indices[:, :, g], 0)  # [B, H, K]; entries past the count may be junk
        gather = idx[..., None].expand(-1, -1, -1, head_dim)
        k_sel = torch.gather(k.float(), 2, gather)
        v_sel = torch.gather(v.float(), 2, gather)
        scores = torch.matmul(q[:, :, rows].float(), k_sel.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~valid[:, :, g, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0
        delta = torch.matmul(probs, v_sel) * sign
        if base is None:
            result = delta
        elif base_scale is None:
            result = base[:, :, rows].float() + delta
        else:
            result = base[:, :, rows].float() * base_scale[:, :, rows, None] + delta
        if out_scale is None:
            out[:, :, rows] = result.to(out.dtype)
        else:
            out[:, :, rows], out_scale[:, :, rows] = quantize_rows(result)
    return out


def sampled_positions(n_tokens: int, group_size: int, samples: int, device=None) -> torch.Tensor:
    """Positions (in the query order) of the queries that score the keys for each group: ``samples``
    evenly spaced ones per group, int64 ``[G, samples]``; -1 where a short last group has none."""
    n_groups = math.ceil(n_tokens / group_size)
    stride = max(1, group_size // samples)
    pos = (torch.arange(n_groups, device=device)[:, None] * group_size
           + torch.arange(samples, device=device)[None, :] * stride)
    return torch.where(pos < n_tokens, pos, -1)


def sampled_column_sums_reference(q, k, query_order, group_size, samples):
    """Key scores per query group from a sample of its queries: ``[B, H, G, N_keys]`` float32.

    ``scores[b, h, g, j] = sum over the sampled queries t of group g of exp(s_tj - L_t)``, with
    ``s = q k^T / sqrt(D)`` and ``L_t`` the exact row log-sum-exp; the sampled queries are
    ``sampled_positions(N, group_size, samples)`` of ``query_order``. No output and no previous
    step's statistics are needed, so a dense step can take its output from any attention backend.
    """
    batch, heads, n_tokens, head_dim = q.shape
    positions = sampled_positions(n_tokens, group_size, samples, q.device)
    n_groups = positions.shape[0]
    order = query_order.long().to(q.device)
    scale = head_dim ** -0.5
    sums = torch.zeros(batch, heads, n_groups, k.shape[2], dtype=torch.float32, device=q.device)
    kf = k.float()
    for g in range(n_groups):
        pos = positions[g][positions[g] >= 0]
        scores = torch.matmul(q[:, :, order[pos]].float(), kf.transpose(-1, -2)) * scale
        sums[:, :, g] = torch.exp(scores - torch.logsumexp(scores, -1, keepdim=True)).sum(2)
    return sums
