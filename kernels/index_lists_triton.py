"""Triton kernel for the index lists (see ``index_lists.py`` for the definition and the oracle).

One program per row. The k-th largest key of a row is found bit by bit (32 counting passes over
the row: is the count of keys >= T | bit still at least k?), ties at that key are cut at a column
found the same way, and a last pass writes the chosen columns in ascending order (a running
prefix sum gives each its slot), so nothing is sorted and no scratch memory is needed. Rows of
up to 16384 columns (FLUX's keys and MLP units) are held in registers through the passes, so a
pass is a compare and one block-wide sum; longer rows (video lengths) are re-read from L1/L2,
chunk by chunk, in every pass.

Two score sources (one kernel, a constexpr switch):
- column scores ``S[row, c]`` (attention: column sums of a query group);
- ``|current - mean|`` of the MLP's block means, where the chosen units' ``mean`` is refreshed to
  ``current`` in the same pass (so the next ranking measures change since a unit was recomputed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import index_lists
from .index_lists import (ForcedColumns, as_forced, check_list_buffers, list_dtypes, list_width, paged_form,
                          random_budget, selection_size, split_rows)


@triton.jit
def _hash32(x):
    # index_lists.hash32 on uint32 (products wrap mod 2^32); the multipliers are HASH_MUL1 and
    # HASH_MUL2, written as literals because Triton reads only constexpr globals.
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _score_keys(Scores, Current, Mean, row_s, row_c, row_m, cols, valid, ABS_DIFF: tl.constexpr):
    """Order-preserving uint32 keys of the row's scores at ``cols``."""
    if ABS_DIFF:
        cur = tl.load(Current + row_c + cols, mask=valid, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row_m + cols, mask=valid, other=0.0)
        score = tl.abs(cur - mean)
    else:
        score = tl.load(Scores + row_s + cols, mask=valid, other=0.0).to(tl.float32)
    bits = score.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) == 1, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _chunk(Scores, Current, Mean, Forced, row_s, row_c, row_m, row_f, c0, C, row_key, t_rand, cut_rand,
           STAGE: tl.constexpr, ABS_DIFF: tl.constexpr, HAS_FORCED: tl.constexpr, HAS_RANDOM: tl.constexpr,
           BLOCK_C: tl.constexpr):
    """(columns, keys, eligible, forced, random) for one chunk of the row.

    STAGE 0: keys are the random priorities, eligible = not forced; STAGE 1: keys are the scores,
    eligible = neither forced nor among the random picks (``t_rand``/``cut_rand``)."""
    cols = c0 + tl.arange(0, BLOCK_C)
    valid = cols < C
    if HAS_FORCED:
        forced = valid & (tl.load(Forced + row_f + cols, mask=valid, other=0) != 0)
    else:
        forced = cols < 0
    if HAS_RANDOM:
        noise = _hash32(row_key ^ cols.to(tl.uint32))
        rand = valid & ~forced & ((noise > t_rand) | ((noise == t_rand) & (cols < cut_rand)))
    else:
        noise = cols.to(tl.uint32)
        rand = cols < 0
    if STAGE == 0:
        keys = noise
        eligible = valid & ~forced
    else:
        keys = _score_keys(Scores, Current, Mean, row_s, row_c, row_m, cols, valid, ABS_DIFF)
        eligible = valid & ~forced & ~rand
    return cols, keys, eligible, forced, rand


@triton.jit
def _hits(keys, eligible, cols, threshold, col_cut, MODE: tl.constexpr):
    """Eligible columns with key >= threshold (MODE 0), key > threshold (MODE 1) or
    key == threshold and column < col_cut (MODE 2)."""
    if MODE == 0:
        hit = eligible & (keys >= threshold)
    elif MODE == 1:
        hit = eligible & (keys > threshold)
    else:
        hit = eligible & (keys == threshold) & (cols < col_cut)
    return tl.sum(hit.to(tl.int32), axis=0)


@triton.jit
def _count(row_keys, row_eligible, Scores, Current, Mean, Forced, row_s, row_c, row_m, row_f, C, row_key, t_rand,
           cut_rand, threshold, col_cut, MODE: tl.constexpr, STAGE: tl.constexpr, ABS_DIFF: tl.constexpr,
           HAS_FORCED: tl.constexpr, HAS_RANDOM: tl.constexpr, BLOCK_C: tl.constexpr, IN_REGISTERS: tl.constexpr):
    """``_hits`` over the row: from the keys held in registers (the row is one block), or chunk by
    chunk from memory (rows longer than a block)."""
    if IN_REGISTERS:
        total = _hits(row_keys, row_eligible, tl.arange(0, BLOCK_C), threshold, col_cut, MODE)
    else:
        total = tl.zeros([], dtype=tl.int32)
        for c0 in range(0, C, BLOCK_C):
            cols, keys, eligible, forced, rand = _chunk(Scores, Current, Mean, Forced, row_s, row_c, row_m, row_f, c0,
                                                        C, row_key, t_rand, cut_rand, STAGE, ABS_DIFF, HAS_FORCED,
                                                        HAS_RANDOM, BLOCK_C)
            total += _hits(keys, eligible, cols, threshold, col_cut, MODE)
    return total


@triton.jit
def _kth_key(row_keys, row_eligible, Scores, Current, Mean, Forced, row_s, row_c, row_m, row_f, C, C_BITS, row_key,
             t_rand, cut_rand, wanted, STAGE: tl.constexpr, ABS_DIFF: tl.constexpr, HAS_FORCED: tl.constexpr,
             HAS_RANDOM: tl.constexpr, BLOCK_C: tl.constexpr, IN_REGISTERS: tl.constexpr):
    """(threshold, column cut) such that the eligible columns with key > threshold, or key ==
    threshold and column < cut, are exactly the ``wanted`` best (key descending, column ascending)."""
    threshold = tl.zeros([], dtype=tl.uint32)
    for i in range(32):
        candidate = threshold | (tl.full([], 1, tl.uint32) << (31 - i))
        n = _count(row_keys, row_eligible, Scores, Current, Mean, Forced, row_s, row_c, row_m, row_f, C, row_key,
                   t_rand, cut_rand, candidate, 0, 0, STAGE, ABS_DIFF, HAS_FORCED, HAS_RANDOM, BLOCK_C, IN_REGISTERS)
        if n >= wanted:
            threshold = candidate
    above = _count(row_keys, row_eligible, Scores, Current, Mean, Forced, row_s, row_c, row_m, row_f, C, row_key,
                   t_rand, cut_rand, threshold, 0, 1, STAGE, ABS_DIFF, HAS_FORCED, HAS_RANDOM, BLOCK_C, IN_REGISTERS)
    need = wanted - above
    at = _count(row_keys, row_eligible, Scores, Current, Mean, Forced, row_s, row_c, row_m, row_f, C, row_key,
                t_rand, cut_rand, threshold, C, 2, STAGE, ABS_DIFF, HAS_FORCED, HAS_RANDOM, BLOCK_C, IN_REGISTERS)
    cut = C
    if need < at:  # ties at the threshold: keep the lowest columns among them
        cut = 0
        if need > 0:
            last = 0  # the largest column bound that still holds fewer than `need` tied columns
            for i in range(C_BITS):
                candidate = last | (1 << (C_BITS - 1 - i))
                if candidate <= C:
                    n = _count(row_keys, row_eligible, Scores, Current, Mean, Forced, row_s, row_c, row_m, row_f, C,
                               row_key, t_rand, cut_rand, threshold, candidate, 2, STAGE, ABS_DIFF, HAS_FORCED,
                               HAS_RANDOM, BLOCK_C, IN_REGISTERS)
                    if n < need:
                        last = candidate
            cut = last + 1
    return threshold, cut


@triton.jit
def _select_columns_kernel(
    Scores, Current, Mean, Forced, Seeds, Idx, Cnt,
    s_srow, s_crow, s_mrow, s_frow, s_irow,
    ROWS, FORCED_ROWS, C, C_BITS, total, capacity, n_random,
    ABS_DIFF: tl.constexpr, HAS_FORCED: tl.constexpr, HAS_RANDOM: tl.constexpr, BLOCK_C: tl.constexpr,
    IN_REGISTERS: tl.constexpr, PAGED: tl.constexpr, PAGE_BITS: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // ROWS
    r = row % ROWS
    row64 = row.to(tl.int64)
    row_s = row64 * s_srow
    row_c = row64 * s_crow
    row_m = row64 * s_mrow
    row_f = (r % FORCED_ROWS).to(tl.int64) * s_frow

    row_key = tl.zeros([], dtype=tl.uint32)
    if HAS_RANDOM:
        seed = tl.load(Seeds + b)
        low = (seed & 0xFFFFFFFF).to(tl.uint32)
        high = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        row_key = _hash32(_hash32(low ^ _hash32(high)) ^ r.to(tl.uint32))
    t_rand = tl.full([], 0xFFFFFFFF, tl.uint32)  # until the random picks are known: none (> max)
    cut_rand = tl.zeros([], dtype=tl.int32)

    # Stage 0 (random priorities): the whole row in registers, or nothing (read chunk by chunk).
    if IN_REGISTERS:
        cols, row_keys, row_eligible, forced, rand = _chunk(Scores, Current, Mean, Forced, row_s, row_c, row_m, row_f,
                                                            0, C, row_key, t_rand, cut_rand, 0, ABS_DIFF, HAS_FORCED,
                                                            HAS_RANDOM, BLOCK_C)
        n_forced = tl.sum(forced.to(tl.int32), axis=0)
    else:
        row_keys = tl.arange(0, BLOCK_C).to(tl.uint32)  # placeholders: the chunked passes read memory
        row_eligible = row_keys < 0
        n_forced = tl.zeros([], dtype=tl.int32)
        if HAS_FORCED:
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                valid = cols < C
                n_forced += tl.sum((tl.load(Forced + row_f + cols, mask=valid, other=0) != 0).to(tl.int32), axis=0)
    count = tl.minimum(tl.maximum(n_forced, total), capacity)

    taken_random = tl.zeros([], dtype=tl.int32)
    if HAS_RANDOM:
        taken_random = tl.minimum(C - n_forced, n_random)
        if taken_random > 0:
            t_rand, cut_rand = _kth_key(row_keys, row_eligible, Scores, Current, Mean, Forced, row_s, row_c, row_m,
                                        row_f, C, C_BITS, row_key, t_rand, cut_rand, taken_random, 0, ABS_DIFF,
                                        HAS_FORCED, HAS_RANDOM, BLOCK_C, IN_REGISTERS)
    # Stage 1 (scores, among the columns neither forced nor random)
    if IN_REGISTERS:
        cols, row_keys, row_eligible, forced, rand = _chunk(Scores, Current, Mean, Forced, row_s, row_c, row_m, row_f,
                                                            0, C, row_key, t_rand, cut_rand, 1, ABS_DIFF, HAS_FORCED,
                                                            HAS_RANDOM, BLOCK_C)
    wanted_top = tl.maximum(count - n_forced - taken_random, 0)
    t_top = tl.full([], 0xFFFFFFFF, tl.uint32)
    cut_top = tl.zeros([], dtype=tl.int32)
    if wanted_top > 0:
        t_top, cut_top = _kth_key(row_keys, row_eligible, Scores, Current, Mean, Forced, row_s, row_c, row_m, row_f, C,
                                  C_BITS, row_key, t_rand, cut_rand, wanted_top, 1, ABS_DIFF, HAS_FORCED, HAS_RANDOM,
                                  BLOCK_C, IN_REGISTERS)

    # Compaction: the chosen columns in ascending order; the MLP's block means refreshed.
    idx_row = Idx + row64 * s_irow
    written = tl.zeros([], dtype=tl.int32)
    first_page = tl.zeros([], dtype=tl.int32)  # paged lists: how many chosen columns lie below 2**PAGE_BITS
    for c0 in range(0, C, BLOCK_C):
        cols, keys, eligible, forced, rand = _chunk(Scores, Current, Mean, Forced, row_s, row_c, row_m, row_f, c0, C,
                                                    row_key, t_rand, cut_rand, 1, ABS_DIFF, HAS_FORCED, HAS_RANDOM,
                                                    BLOCK_C)
        top = eligible & ((keys > t_top) | ((keys == t_top) & (cols < cut_top)))
        chosen = forced | rand | top
        slots = written + tl.cumsum(chosen.to(tl.int32), axis=0) - 1
        if PAGED:  # the low bits, stored as the int16 bit pattern (index_lists.page_lists)
            in_page = cols & ((1 << PAGE_BITS) - 1)
            tl.store(idx_row + slots, tl.where(in_page >= 32768, in_page - 65536, in_page), mask=chosen)
            first_page += tl.sum((chosen & (cols < (1 << PAGE_BITS))).to(tl.int32), axis=0)
        else:
            tl.store(idx_row + slots, cols, mask=chosen)
        written += tl.sum(chosen.to(tl.int32), axis=0)
        if ABS_DIFF:
            cur = tl.load(Current + row_c + cols, mask=chosen, other=0.0).to(tl.float32)
            tl.store(Mean + row_m + cols, cur, mask=chosen)
    for s0 in range(0, capacity, BLOCK_C):
        slots = s0 + tl.arange(0, BLOCK_C)
        tl.store(idx_row + slots, tl.zeros([BLOCK_C], dtype=tl.int32), mask=(slots >= count) & (slots < capacity))
    if PAGED:  # the first page's size above the count's low 16 bits (as an int32 bit pattern)
        tl.store(Cnt + row64, (count | (first_page.to(tl.uint32) << 16).to(tl.int32, bitcast=True)))
    else:
        tl.store(Cnt + row64, count)


# Rows up to this many columns stay in registers across the counting passes (16 warps: 32 keys a
# thread); longer rows (video lengths) are read chunk by chunk in every pass.
_MAX_ROW_IN_REGISTERS = 16384
_CHUNK = 4096


def _launch_config(n_cols, config):
    block = triton.next_power_of_2(max(n_cols, 128))
    in_registers = config.get("in_registers", block <= _MAX_ROW_IN_REGISTERS)
    block_c = config.get("block_c", block if in_registers else _CHUNK)
    if in_registers and block_c < n_cols:
        raise ValueError(f"a row of {n_cols} columns does not fit one block of {block_c}")
    warps = config.get("num_warps", 16 if block_c >= 8192 else 8 if block_c >= 2048 else 4)
    return in_registers, block_c, warps


def _launch(scores, current, mean, n_rows_total, rows, n_cols, keep_count, random_count, forced, row_seeds, pad_to,
            out, lead_shape, device, config, paged=False):
    forced = as_forced(forced, n_cols)
    width = forced.width if forced is not None else 0
    total = selection_size(n_cols, keep_count, pad_to)
    capacity = list_width(n_cols, keep_count, pad_to, width)
    n_random = random_budget(n_cols, keep_count, random_count, pad_to, width)
    if n_random and row_seeds is None:
        raise ValueError("random columns need row_seeds (int64, one seed per batch row)")
    paged = paged and paged_form(n_cols, capacity)
    if out is not None:
        indices, counts = out
        if tuple(indices.shape) != (*lead_shape, capacity) or tuple(counts.shape) != tuple(lead_shape):
            raise ValueError(f"out buffers {tuple(indices.shape)}, {tuple(counts.shape)} do not fit "
                             f"{(*lead_shape, capacity)}, {tuple(lead_shape)}")
        check_list_buffers(indices, counts, n_cols, paged)
    else:
        id_dtype, count_dtype = list_dtypes(n_cols, capacity, paged)
        indices = torch.empty(*lead_shape, capacity, dtype=id_dtype, device=device)
        counts = torch.empty(lead_shape, dtype=count_dtype, device=device)
    if capacity == 0 or n_rows_total == 0:
        counts.zero_()
        return indices, counts
    in_registers, block_c, warps = _launch_config(n_cols, config or {})
    mask = forced.mask.to(device).view(torch.uint8) if forced is not None else None
    if mask is not None and mask.shape[0] not in (1, lead_shape[-1]):
        raise ValueError(f"forced mask rows {mask.shape[0]} must be 1 or the rows of the last row dimension")
    seeds = row_seeds.to(device=device, dtype=torch.int64) if n_random else None
    placeholder = indices  # for pointers a configuration never reads
    abs_diff = current is not None
    _select_columns_kernel[(n_rows_total,)](
        scores if scores is not None else placeholder, current if abs_diff else placeholder,
        mean if abs_diff else placeholder, mask if mask is not None else placeholder,
        seeds if seeds is not None else placeholder, indices, counts,
        scores.stride(-2) if scores is not None else 0, current.stride(-2) if abs_diff else 0,
        mean.stride(-2) if abs_diff else 0, mask.stride(0) if mask is not None else 0, capacity,
        rows, mask.shape[0] if mask is not None else 1, n_cols, n_cols.bit_length(), total, capacity, n_random,
        ABS_DIFF=abs_diff, HAS_FORCED=mask is not None, HAS_RANDOM=n_random > 0, BLOCK_C=block_c,
        IN_REGISTERS=in_registers, PAGED=paged, PAGE_BITS=index_lists.PAGE_BITS, num_warps=warps,
    )
    return indices, counts


def _rows_view(t, batch, rows, n_cols):
    """``t`` as [B * R', C] with one row stride (a copy only if its row dimensions do not merge)."""
    flat = t.reshape(batch * rows, n_cols)
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def build_index_lists_triton(scores, keep_count, random_count=0, forced=None, row_seeds=None, pad_to=64, out=None,
                             *, config=None, paged=False):
    """Triton version of ``build_index_lists_reference`` (same arguments and results); ``out``
    optionally gives the ``(indices, counts)`` buffers to fill. ``config`` (tests, benchmarks):
    ``in_registers``, ``block_c``, ``num_warps``."""
    batch, rows, n_cols = split_rows(scores.shape)
    flat = _rows_view(scores, batch, rows, n_cols)
    return _launch(flat, None, None, batch * rows, rows, n_cols, keep_count, random_count, forced, row_seeds, pad_to,
                   out, scores.shape[:-1], scores.device, config, paged)


def rank_units_triton(current, block_mean, keep_count, random_count=0, row_seeds=None, pad_to=64, out=None, *,
                      config=None):
    """Triton version of ``rank_units_reference``: lists from ``|current - block_mean|``, and the
    chosen units' ``block_mean`` set to ``current`` (in place)."""
    batch, rows, n_cols = split_rows(current.shape)
    if block_mean.dtype != torch.float32 or block_mean.shape != current.shape:
        raise ValueError("block_mean must be float32 of current's shape")
    if not block_mean.is_contiguous():
        raise ValueError("block_mean must be contiguous (it is updated in place)")
    flat_current = _rows_view(current, batch, rows, n_cols)
    return _launch(None, flat_current, block_mean.view(batch * rows, n_cols), batch * rows, rows, n_cols, keep_count,
                   random_count, None, row_seeds, pad_to, out, current.shape[:-1], current.device, config)


__all__ = ["build_index_lists_triton", "rank_units_triton", "ForcedColumns"]
