"""Index lists for the column-sparse kernels, built on the device with no host round trip.

One operation serves attention (rows = query groups, columns = keys) and the MLP (rows = token
blocks, columns = hidden units): per row, keep the forced columns, the top-scoring columns and a
few random ones, and hand back a padded, ascending list plus a count.
"""

from __future__ import annotations

import torch


def selection_size(n_columns: int, keep_count: int, pad_to: int) -> int:
    """Columns kept per row once rounded up to the kernels' tile (never more than exist)."""
    kept = max(0, min(keep_count, n_columns))
    if pad_to > 1 and kept:
        kept = -(-kept // pad_to) * pad_to
    return min(kept, n_columns)


def build_index_lists(scores, keep_count, random_count=0, forced=None, generator=None, pad_to=64):
    """Pick, per row of ``scores`` ([..., R, C], higher = more important), the columns to recompute.

    Every row keeps ``selection_size(C, keep_count, pad_to)`` columns (or all of its forced
    columns, when there are more of those): first the forced columns (``forced``: int [R, F] or
    [F], -1 = padding), then ``random_count`` columns drawn uniformly among the rest with
    ``generator``, then the best-scoring remaining columns. Returns ``(indices, counts)``: int32
    ``[..., R, K]`` sorted ascending within each row's count (entries past the count are valid
    column ids that the kernels ignore) and int32 ``[..., R]``.
    """
    n_cols = scores.shape[-1]
    total = selection_size(n_cols, keep_count, pad_to)
    device = scores.device
    priority = scores.detach().float().clone()
    n_forced = torch.zeros(scores.shape[-2], dtype=torch.long, device=device)
    if forced is not None and forced.numel():
        forced = forced.to(device).long()
        if forced.dim() == 1:
            forced = forced[None].expand(scores.shape[-2], -1)
        present = forced >= 0
        n_forced = present.sum(-1)
        mark = torch.zeros(forced.shape[0], n_cols + 1, dtype=torch.bool, device=device)
        mark.scatter_(1, torch.where(present, forced, n_cols), True)
        priority = priority.masked_fill(mark[:, :n_cols], float("inf"))
        max_forced = int(forced.shape[-1])
    else:
        max_forced = 0
    capacity = min(n_cols, max(total, max_forced))
    if capacity == 0:
        shape = scores.shape[:-1]
        return (torch.zeros(*shape, 0, dtype=torch.int32, device=device),
                torch.zeros(shape, dtype=torch.int32, device=device))
    n_random = max(0, min(random_count, total - max_forced))
    if n_random:
        # Random columns outrank every scored one but not the forced ones.
        noise = torch.rand(priority.shape, generator=generator, device=device, dtype=torch.float32)
        finite = torch.isfinite(priority)
        random_pick = torch.topk(torch.where(finite, noise, -1.0), n_random, dim=-1).indices
        priority.scatter_(-1, random_pick, float("3e38"))
    chosen = torch.topk(priority, capacity, dim=-1, sorted=max_forced > total).indices
    if max_forced <= total:  # every row keeps exactly `total` columns: no tail to push back
        counts = torch.full(chosen.shape[:-1], total, dtype=torch.int32, device=device)
        return torch.sort(chosen, dim=-1).values.to(torch.int32), counts
    counts = torch.maximum(torch.full_like(n_forced, total), n_forced).clamp(max=capacity)
    counts = counts.expand(chosen.shape[:-1]).to(torch.int32)
    # Sort the kept prefix (topk gave it first, by priority); the tail beyond each row's count is
    # pushed after it.
    slot = torch.arange(capacity, device=device)
    keyed = torch.where(slot < counts[..., None].long(), chosen, chosen + n_cols)
    indices = torch.sort(keyed, dim=-1).values
    indices = torch.where(indices >= n_cols, indices - n_cols, indices)
    return indices.to(torch.int32), counts.contiguous()
