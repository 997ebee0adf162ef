"""Index lists for the column-sparse kernels: which columns each row recomputes (the reference).

One operation serves attention (rows = query groups, columns = keys) and the MLP (rows = token
blocks, columns = hidden units): per row, keep the forced columns, a few random ones and the
top-scoring rest, and hand back an ascending list padded to a fixed width plus a count. This file
holds the definition (a PyTorch reference, also the path off CUDA); ``index_lists_triton.py``
computes the same lists, bit for bit, in one launch.

The random columns come from a counter-based hash of (row seed, row, column): no generator state,
nothing drawn on the host, so a batch row picks the same columns whatever else is in the batch,
and the lists can be built inside a CUDA graph.

Ties are broken towards the lower column (order: key descending, then column ascending), so the
lists are fully determined by their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF
# The two multipliers of a 32-bit integer finaliser (xor-shift / multiply rounds); the Triton
# kernel uses the same constants.
HASH_MUL1 = 0x7FEB352D
HASH_MUL2 = 0x846CA68B


def selection_size(n_columns: int, keep_count: int, pad_to: int) -> int:
    """Columns kept per row once rounded up to the kernels' tile (never more than exist)."""
    kept = max(0, min(keep_count, n_columns))
    if pad_to > 1 and kept:
        kept = -(-kept // pad_to) * pad_to
    return min(kept, n_columns)


@dataclass(frozen=True)
class ForcedColumns:
    """Columns every row keeps, as a mask: ``mask`` bool ``[F_rows, C]`` (``F_rows`` is 1, shared by
    every row, or the number of rows R of the last row dimension: row ``r`` uses mask row
    ``r % F_rows``); ``width`` the most forced columns a row can have (a Python int, so that the list
    width is known without reading the device)."""

    mask: torch.Tensor
    width: int


def forced_columns(forced: torch.Tensor, n_columns: int) -> ForcedColumns:
    """``ForcedColumns`` from index lists: int ``[F]`` (every row) or ``[R, F]``, -1 = padding.

    Entries ``>= n_columns`` are dropped (keys cut off by a padding mask), so one list serves every
    key count. ``width`` is the lists' width ``F`` (an upper bound of any row's count).
    """
    lists = forced.long()
    if lists.dim() == 1:
        lists = lists[None]
    keep = (lists >= 0) & (lists < n_columns)
    mark = torch.zeros(lists.shape[0], n_columns + 1, dtype=torch.bool, device=lists.device)
    mark.scatter_(1, torch.where(keep, lists, n_columns), True)
    return ForcedColumns(mark[:, :n_columns].contiguous(), int(lists.shape[-1]))


def index_dtype(n_columns: int) -> torch.dtype:
    """The narrowest integer type of the lists over ``n_columns`` columns: int16 while every column
    id and count (at most ``n_columns``) fits, int32 beyond (WAN at 720p, long videos). The kernels
    read either; a list of 4,608 FLUX keys or 12,288 hidden units takes half the bytes."""
    return torch.int16 if n_columns <= torch.iinfo(torch.int16).max else torch.int32


# Paged lists: key lists past int16's range (WAN at 720p: 75,600 keys; HunyuanVideo at 720p:
# 119,056) stay 16-bit. Each id is stored modulo ``2**PAGE_BITS`` (its low bits, as an int16 bit
# pattern), and the int32 count of a row carries, above its low 16 bits, how many of the row's ids
# (ascending) lie in the first page: the ids from that slot on are in the second. So ids below
# ``2**(PAGE_BITS + 1)`` fit in half the bytes of int32 lists (which at 720p take two thirds of the
# bytes of the bf16 delta cache). The paged form is recognised by its dtypes: int16 ids with int32 counts.
# (Tests lower PAGE_BITS to reach it at tiny sizes.)
PAGE_BITS = 16
_COUNT_BITS = 16


def paged_form(n_columns: int, capacity: int) -> bool:
    """Whether lists over ``n_columns`` columns of ``capacity`` slots take the paged form."""
    return 2 ** (PAGE_BITS - 1) <= n_columns <= 2 ** (PAGE_BITS + 1) and capacity < 2 ** _COUNT_BITS


def list_dtypes(n_columns: int, capacity: int, paged: bool = False) -> tuple[torch.dtype, torch.dtype]:
    """(ids, counts) dtypes of lists over ``n_columns`` columns: ``index_dtype`` for both, or with
    ``paged`` (the reader takes the paged form) int16 ids and int32 counts where ``paged_form``."""
    if paged and paged_form(n_columns, capacity):
        return torch.int16, torch.int32
    return index_dtype(n_columns), index_dtype(n_columns)


def list_bytes(n_columns: int, capacity: int, paged: bool = False) -> int:
    """Bytes of one row's list of ``capacity`` slots and its count (``list_dtypes``)."""
    ids, counts = list_dtypes(n_columns, capacity, paged)
    return capacity * ids.itemsize + counts.itemsize


def is_paged(indices: torch.Tensor, counts: torch.Tensor) -> bool:
    return indices.dtype == torch.int16 and counts.dtype == torch.int32


def page_lists(indices: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paged form of ascending lists (``indices`` [..., K] ids below ``2**(PAGE_BITS + 1)``,
    ``counts`` [...], any integer type): (int16 ids modulo ``2**PAGE_BITS``, int32 counts with the
    first page's size above their low 16 bits)."""
    ids, n = indices.long(), counts.long()
    page = 2 ** PAGE_BITS
    listed = torch.arange(ids.shape[-1], device=ids.device) < n[..., None]
    first = ((ids < page) & listed).sum(-1)
    low = ids % page
    low = torch.where(low >= 2 ** 15, low - 2 ** 16, low)  # the low 16 bits as an int16 bit pattern
    packed = n | (first << _COUNT_BITS)
    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed)
    return low.to(torch.int16), packed.to(torch.int32)


def read_lists(indices: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and counts as int64, from lists in either form."""
    if not is_paged(indices, counts):
        return indices.long(), counts.long()
    packed = counts.long() & 0xFFFFFFFF
    n, first = packed & (2 ** _COUNT_BITS - 1), packed >> _COUNT_BITS
    slots = torch.arange(indices.shape[-1], device=indices.device)
    ids = (indices.long() & (2 ** PAGE_BITS - 1)) + torch.where(slots >= first[..., None], 2 ** PAGE_BITS, 0)
    return ids, n


def check_index_dtype(t: torch.Tensor, n_columns: int) -> None:
    """Raise unless ``t`` (given lists or counts) can hold ids and counts of ``n_columns`` columns."""
    if t.dtype not in (torch.int16, torch.int32) or torch.iinfo(t.dtype).max < n_columns:
        raise ValueError(f"index lists over {n_columns} columns need {index_dtype(n_columns)} or int32 "
                         f"buffers, got {t.dtype}")


def check_list_buffers(indices: torch.Tensor, counts: torch.Tensor, n_columns: int, paged: bool) -> None:
    """Raise unless buffers given for lists over ``n_columns`` columns hold them in their form:
    paged (int16 ids, int32 counts) or plain (each wide enough, ``check_index_dtype``)."""
    if is_paged(indices, counts) != paged:  # (int16 ids with int32 counts are read as paged)
        raise ValueError(f"lists over {n_columns} columns are {'' if paged else 'not '}paged: the buffers given "
                         f"are {indices.dtype} and {counts.dtype}")
    if not paged:
        check_index_dtype(indices, n_columns)
        check_index_dtype(counts, n_columns)


def list_width(n_columns: int, keep_count: int, pad_to: int, forced_width: int = 0) -> int:
    """Width K of the index lists (the rows' largest possible count)."""
    return min(n_columns, max(selection_size(n_columns, keep_count, pad_to), forced_width))


def random_budget(n_columns: int, keep_count: int, random_count: int, pad_to: int, forced_width: int = 0) -> int:
    """Random columns per row: what the keep count leaves after the widest forced set."""
    return max(0, min(random_count, selection_size(n_columns, keep_count, pad_to) - forced_width))


# --------------------------------------------------------------------------------------------
# The counter-based hash (int64 tensors holding 32-bit values; no overflow anywhere)
# --------------------------------------------------------------------------------------------

def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2^32 for 0 <= x < 2^32, in 16-bit halves so that int64 never overflows."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective mix of 32-bit values (int64 tensors in [0, 2^32))."""
    x = x ^ (x >> 16)
    x = _mul32(x, HASH_MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, HASH_MUL2)
    return x ^ (x >> 16)


def row_keys(row_seeds: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per (batch row, row) 32-bit keys: ``[B, n_rows]`` int64 from int64 seeds ``[B]``."""
    seeds = row_seeds.long()
    low, high = seeds & _MASK32, (seeds >> 32) & _MASK32
    batch_key = hash32(low ^ hash32(high))
    rows = torch.arange(n_rows, device=seeds.device, dtype=torch.int64)
    return hash32(batch_key[:, None] ^ rows[None, :])


def column_noise(row_seeds: torch.Tensor, n_rows: int, n_columns: int) -> torch.Tensor:
    """The random priority of every (batch row, row, column): int64 ``[B, n_rows, C]`` in [0, 2^32)."""
    columns = torch.arange(n_columns, device=row_seeds.device, dtype=torch.int64)
    return hash32(row_keys(row_seeds, n_rows)[..., None] ^ columns)


def score_keys(scores: torch.Tensor) -> torch.Tensor:
    """Order-preserving 32-bit keys of float scores (int64 in [0, 2^32); larger score, larger key)."""
    bits = scores.float().contiguous().view(torch.int32).long() & _MASK32
    negative = bits >> 31
    return torch.where(negative == 1, bits ^ _MASK32, bits | 0x80000000)


# --------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------

def _first_by_key(keys: torch.Tensor, eligible: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Mask of the ``wanted`` ([rows]) eligible columns with the largest keys, ties to the lower column."""
    ranked = torch.where(eligible, keys, -1)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(keys.shape[-1], device=keys.device).expand_as(order))
    return eligible & (rank < wanted[..., None])


def split_rows(shape) -> tuple[int, int, int]:
    """(batch rows B, rows per batch row R', columns C) of a ``[..., R, C]`` score shape."""
    if len(shape) < 2:
        raise ValueError(f"scores must be [..., R, C], got {tuple(shape)}")
    batch = shape[0] if len(shape) >= 3 else 1
    rows = 1
    for s in shape[1 if len(shape) >= 3 else 0:-1]:
        rows *= s
    return batch, rows, shape[-1]


def _check_seeds(row_seeds, batch, n_random):
    if n_random and row_seeds is None:
        raise ValueError("random columns need row_seeds (int64, one seed per batch row)")
    if row_seeds is not None and tuple(row_seeds.shape) != (batch,):
        raise ValueError(f"row_seeds must be [B] = [{batch}], got {tuple(row_seeds.shape)}")


def as_forced(forced, n_columns: int) -> ForcedColumns | None:
    if forced is None or isinstance(forced, ForcedColumns):
        return forced
    if forced.numel() == 0:
        return None
    return forced_columns(forced, n_columns)


def build_index_lists_reference(scores, keep_count, random_count=0, forced=None, row_seeds=None, pad_to=64,
                                paged=False):
    """Pick, per row of ``scores`` ([..., R, C], higher = more important), the columns to recompute.

    Every row keeps ``selection_size(C, keep_count, pad_to)`` columns (or all of its forced
    columns, when there are more of those): its forced columns (``forced``: ``ForcedColumns`` or
    int index lists ``[R, F]`` / ``[F]``, -1 = padding, entries >= C ignored), then
    ``random_budget(...)`` columns chosen among the rest by the hash of (``row_seeds[b]``, row,
    column) (``row_seeds``: int64 ``[B]``, B = ``scores.shape[0]`` for 3+ dimensions, else 1; the
    row index counts every row dimension after the first), then the best-scoring remaining columns.
    Returns ``(indices, counts)``: ``[..., R, K]`` ascending within each row's count (entries past
    it are 0) and ``[..., R]``, both ``index_dtype(C)``, with ``K = list_width(C, keep_count, pad_to,
    forced width)``; with ``paged`` (the reader takes that form), ``page_lists`` of them where
    ``paged_form(C, K)``.
    """
    batch, n_rows, n_cols = split_rows(scores.shape)
    forced = as_forced(forced, n_cols)
    width = forced.width if forced is not None else 0
    total = selection_size(n_cols, keep_count, pad_to)
    capacity = list_width(n_cols, keep_count, pad_to, width)
    n_random = random_budget(n_cols, keep_count, random_count, pad_to, width)
    _check_seeds(row_seeds, batch, n_random)
    device = scores.device
    lead = scores.shape[:-1]
    dtype = index_dtype(n_cols)
    if capacity == 0:
        id_dtype, count_dtype = list_dtypes(n_cols, capacity, paged)
        return (torch.zeros(*lead, 0, dtype=id_dtype, device=device),
                torch.zeros(lead, dtype=count_dtype, device=device))
    keys = score_keys(scores.reshape(batch, n_rows, n_cols))
    if forced is not None:
        mask_rows = forced.mask.shape[0]
        pick = torch.arange(n_rows, device=device) % mask_rows
        is_forced = forced.mask.to(device)[pick][None].expand(batch, -1, -1)
    else:
        is_forced = torch.zeros(batch, n_rows, n_cols, dtype=torch.bool, device=device)
    n_forced = is_forced.sum(-1)
    counts = torch.clamp(torch.clamp(n_forced, min=total), max=capacity)
    chosen = is_forced
    taken_random = torch.zeros_like(n_forced)
    if n_random:
        taken_random = torch.clamp(n_cols - n_forced, max=n_random)
        chosen = chosen | _first_by_key(column_noise(row_seeds.to(device), n_rows, n_cols), ~is_forced, taken_random)
    wanted_top = torch.clamp(counts - n_forced - taken_random, min=0)
    chosen = chosen | _first_by_key(keys, ~chosen, wanted_top)
    # ascending compaction: slot of each chosen column = how many chosen columns precede it
    slot = torch.where(chosen, torch.cumsum(chosen, -1) - 1, capacity)
    columns = torch.arange(n_cols, device=device, dtype=dtype).expand(batch, n_rows, -1)
    indices = torch.zeros(batch, n_rows, capacity + 1, dtype=dtype, device=device)
    indices.scatter_(-1, slot, columns)
    indices, counts = indices[..., :capacity].reshape(*lead, capacity), counts.to(dtype).reshape(lead)
    return page_lists(indices, counts) if paged and paged_form(n_cols, capacity) else (indices, counts)


def rank_units_reference(current, block_mean, keep_count, random_count=0, row_seeds=None, pad_to=64):
    """The MLP's unit lists: ``build_index_lists_reference`` of ``|current - block_mean|`` (both
    ``[B, NB, M]``; ``block_mean`` float32), then ``block_mean`` of every chosen unit set to
    ``current`` in place (the next ranking measures change since a unit was last recomputed)."""
    indices, counts = build_index_lists_reference((current.float() - block_mean).abs(), keep_count, random_count,
                                                  None, row_seeds, pad_to)
    n_units = current.shape[-1]
    listed = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    chosen = torch.zeros(*current.shape[:-1], n_units + 1, dtype=torch.bool, device=current.device)
    chosen.scatter_(-1, torch.where(listed, indices.long(), n_units), True)
    block_mean.copy_(torch.where(chosen[..., :n_units], current.float(), block_mean))
    return indices, counts
