"""Triton kernels for the two attention operations (see ``attention_reference.py`` for the oracle).

Both are flash-attention loops (online softmax in exp2 units, fp32 accumulators) over tiles of
rows taken in ``query_order``; q rows are gathered through the permutation and outputs scattered
back, so q/k/v/out stay in the model's token order (any strides, last dimension contiguous).

- ``column_sparse_attention_triton``: one program per row tile of a query group (Triton tiles are
  powers of two: a group of 192 is three programs of 64 rows, numbered next to each other so that
  they run together and share the gathered key/value rows through L2). Each program walks the
  group's key list, gathering key and value rows straight into dense tiles; the key ids of the
  next step are fetched one step ahead, which lets Triton's pipeliner keep two tiles of gathered
  rows in flight. The delta-cache update ``out = base + sign * attention`` is the epilogue, so the
  cache is read and written once.
- ``attention_with_column_sums_triton``: dense attention over row tiles of 128 (independent of
  the group size) that also accumulates, per query group and key, the softmax probabilities of
  the group's rows. The per-group sums of a tile are a small tensor-core product (see
  ``_add_group_column_sums``) added into fp32 ``column_sums`` with atomics. With ``lse_hint`` the
  probabilities are normalised by the hint in the single pass; without it a second pass over the
  keys uses the exact row log-sum-exp from the first. The sums carry bf16 rounding (relative error
  ~1e-3): they only rank keys for the top-k selection.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._device import fp8_supported, note_fallback, row_tile, size_class, tensor_descriptors
from .attention_reference import (attention_with_column_sums_reference, column_sparse_attention_reference,
                                  sampled_column_sums_reference)
from . import index_lists
from .fp8 import check_scales
from .index_lists import is_paged

_LOG2E = 1.4426950408889634  # the kernels write it (and ln 2) as literals: Triton needs constexpr globals


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------

@triton.jit
def _load_query_rows(Q, q_head, s_qn, Order, first_pos, N, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Token ids and q rows of one sub-tile (rows past the end of the sequence are zero)."""
    pos = first_pos + tl.arange(0, BLOCK_M)
    row_valid = pos < N
    rows = tl.load(Order + pos, mask=row_valid, other=0)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + q_head + rows[:, None].to(tl.int64) * s_qn + dims[None, :], mask=row_valid[:, None], other=0.0)
    return rows, row_valid, q


@triton.jit
def _online_softmax_step(q, k, v, acc, m_i, l_i, qk_scale, col_valid, MASK_COLS: tl.constexpr):
    """One key tile of the flash-attention recurrence (scores in log2 units)."""
    qk = tl.dot(q, tl.trans(k)) * qk_scale
    if MASK_COLS:
        qk = tl.where(col_valid[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i, p


# ----------------------------------------------------------------------------------------------
# Column-sparse attention with the delta-cache epilogue
# ----------------------------------------------------------------------------------------------

@triton.jit
def _key_ids(stored, slots, first_page, PAGED: tl.constexpr, PAGE_BITS: tl.constexpr):
    """Key ids (int64) of list entries at ``slots``: as stored, or from the paged form (the low
    bits, plus one page from the slot ``first_page`` on; see ``index_lists.page_lists``)."""
    ids = stored.to(tl.int64)
    if PAGED:
        ids = (ids & ((1 << PAGE_BITS) - 1)) + tl.where(slots >= first_page, 1 << PAGE_BITS, 0).to(tl.int64)
    return ids


@triton.jit
def _sparse_last_key_tile(q, acc, m_i, l_i, K, V, k_head, v_head, s_kn, s_vn, Idx, idx_row, start, count, first_page,
                          qk_scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PAGED: tl.constexpr,
                          PAGE_BITS: tl.constexpr):
    """The partial key tile at the end of a list (slots past the count are masked out)."""
    slots = start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    col_valid = slots < count
    keys = _key_ids(tl.load(Idx + idx_row + slots, mask=col_valid, other=0), slots, first_page, PAGED, PAGE_BITS)
    keys = tl.where(col_valid, keys, 0)
    k = tl.load(K + k_head + keys[:, None] * s_kn + dims[None, :])
    v = tl.load(V + v_head + keys[:, None] * s_vn + dims[None, :])
    acc, m_i, l_i, p = _online_softmax_step(q, k, v, acc, m_i, l_i, qk_scale, col_valid, True)
    return acc, m_i, l_i


@triton.jit
def _column_sparse_attention_kernel(
    Q, K, V, Base, Out, Idx, Cnt, Order, BaseScale, OutScale,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    s_bb, s_bh, s_bn, s_ob, s_oh, s_on, s_ib, s_ih, s_ig, s_cb, s_ch, s_cg,
    s_bsb, s_bsh, s_bsn, s_osb, s_osh, s_osn,
    H, N, K_CAP, group_size, tiles_per_group, sign, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BASE: tl.constexpr, STREAM: tl.constexpr, BASE_FP8: tl.constexpr, OUT_FP8: tl.constexpr,
    PAGED: tl.constexpr, PAGE_BITS: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    group = pid // tiles_per_group
    first_pos = group * group_size + (pid % tiles_per_group) * BLOCK_M

    count = tl.load(Cnt + b * s_cb + h * s_ch + group * s_cg)
    first_page = count * 0
    if PAGED:  # the count's low 16 bits, the first page's size above them
        first_page = (count >> 16) & 0xFFFF
        count = count & 0xFFFF
    count = tl.minimum(count, K_CAP)
    n_full = (count // BLOCK_N) * BLOCK_N
    idx_row = b * s_ib + h * s_ih + group.to(tl.int64) * s_ig
    k_head = b * s_kb + h * s_kh
    v_head = b * s_vb + h * s_vh
    dims = tl.arange(0, HEAD_DIM)

    rows, row_valid, q = _load_query_rows(Q, b * s_qb + h * s_qh, s_qn, Order, first_pos, N, BLOCK_M, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # The key ids of the next tile are fetched one step ahead and carried in registers: when the
    # gathers' addresses come from a load of the same step, Triton's pipeliner waits for every
    # copy in flight at the top of each step (seen in the TTGIR: async_wait num = 0).
    lanes = tl.arange(0, BLOCK_N)
    keys = tl.load(Idx + idx_row + lanes, mask=lanes < n_full, other=0)
    for start in range(0, n_full, BLOCK_N):
        ahead = start + BLOCK_N + lanes
        keys_next = tl.load(Idx + idx_row + ahead, mask=ahead < n_full, other=0)
        keys64 = _key_ids(keys, start + lanes, first_page, PAGED, PAGE_BITS)
        k = tl.load(K + k_head + keys64[:, None] * s_kn + dims[None, :])
        v = tl.load(V + v_head + keys64[:, None] * s_vn + dims[None, :])
        acc, m_i, l_i, p = _online_softmax_step(q, k, v, acc, m_i, l_i, qk_scale, lanes >= 0, False)
        keys = keys_next
    if n_full < count:
        acc, m_i, l_i = _sparse_last_key_tile(q, acc, m_i, l_i, K, V, k_head, v_head, s_kn, s_vn, Idx, idx_row,
                                              n_full, count, first_page, qk_scale, BLOCK_N, HEAD_DIM, PAGED, PAGE_BITS)
    # An empty key list leaves l_i == 0 and acc == 0: the group contributes nothing.
    result = sign * (acc / tl.where(l_i > 0, l_i, 1.0)[:, None])
    rows64 = rows[:, None].to(tl.int64)
    if HAS_BASE:
        base = tl.load(Base + b * s_bb + h * s_bh + rows64 * s_bn + dims[None, :], mask=row_valid[:, None], other=0.0,
                       eviction_policy=STREAM)
        base = base.to(tl.float32)
        if BASE_FP8:  # one float32 scale per row (see fp8.quantize_rows)
            base *= tl.load(BaseScale + b * s_bsb + h * s_bsh + rows.to(tl.int64) * s_bsn, mask=row_valid,
                            other=1.0)[:, None]
        result += base
    if OUT_FP8:
        amax = tl.max(tl.abs(result), 1)
        row_scale = tl.where(amax > 0, amax / 448.0, 1.0)
        tl.store(OutScale + b * s_osb + h * s_osh + rows.to(tl.int64) * s_osn, row_scale, mask=row_valid)
        result = tl.minimum(tl.maximum(result / row_scale[:, None], -448.0), 448.0)
    tl.store(Out + b * s_ob + h * s_oh + rows64 * s_on + dims[None, :], result.to(Out.dtype.element_ty),
             mask=row_valid[:, None], eviction_policy=STREAM)


# ----------------------------------------------------------------------------------------------
# Dense attention with per-group column sums
# ----------------------------------------------------------------------------------------------

@triton.jit
def _add_group_column_sums(p, weight, pos, first_pos, last_pos, group_size, ColSum, colsum_head, s_cg, cols64,
                           col_valid):
    """ColSum[g, cols] += sum over the tile's rows t of group g of weight[t] * p[t, cols].

    A row tile may straddle query groups (its size is a tile size, not the group size), so the
    sum is a small matrix product on the tensor cores: a [16, BLOCK_M] matrix whose lane s holds
    the weights of the rows of group g0 + s, times p. A reduction down the columns of p in
    registers would need a block-wide barrier in every key step, which costs far more.
    """
    first_group = first_pos // group_size
    lane = tl.arange(0, 16)
    member = (pos[None, :] // group_size - first_group) == lane[:, None]
    weights = tl.where(member, weight[None, :], 0.0).to(tl.bfloat16)
    sums = tl.dot(weights, p.to(tl.bfloat16))
    n_here = last_pos // group_size - first_group + 1
    ptrs = ColSum + colsum_head + (first_group + lane)[:, None].to(tl.int64) * s_cg + cols64[None, :]
    tl.atomic_add(ptrs, sums, mask=(lane[:, None] < n_here) & col_valid[None, :], sem="relaxed")


@triton.jit
def _load_key_rows(K, k_head, s_kn, cols64, col_valid, start, HEAD_DIM: tl.constexpr, MASK_COLS: tl.constexpr,
                   BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """Rows ``cols`` of one head of K (or V); rows past the end read as zeros when masked.

    With TMA, ``K`` is a tensor descriptor over [B, H, N, D] (block [1, 1, BLOCK_N, D]) and
    ``k_head`` the flat batch-head index; the copy engine zero-fills rows past the end.
    """
    if TMA:
        heads = K.shape[1]
        block = K.load([(k_head // heads).to(tl.int32), (k_head % heads).to(tl.int32), start, 0])
        rows = tl.reshape(block, [BLOCK_N, HEAD_DIM])
    else:
        dims = tl.arange(0, HEAD_DIM)
        ptrs = K + k_head + cols64[:, None] * s_kn + dims[None, :]
        if MASK_COLS:
            rows = tl.load(ptrs, mask=col_valid[:, None], other=0.0)
        else:
            rows = tl.load(ptrs)
    return rows


@triton.jit
def _dense_key_tile(q, acc, m_i, l_i, K, V, k_head, v_head, s_kn, s_vn, start, N, qk_scale, hint2,
                    pos, first_pos, last_pos, group_size, ColSum, colsum_head, s_cg,
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_COLS: tl.constexpr,
                    SUM_WITH_HINT: tl.constexpr, FIXED_MAX: tl.constexpr, TMA: tl.constexpr):
    cols = start + tl.arange(0, BLOCK_N)
    col_valid = cols < N
    cols64 = cols.to(tl.int64)
    k = _load_key_rows(K, k_head, s_kn, cols64, col_valid, start, HEAD_DIM, MASK_COLS, BLOCK_N, TMA)
    v = _load_key_rows(V, v_head, s_vn, cols64, col_valid, start, HEAD_DIM, MASK_COLS, BLOCK_N, TMA)
    if FIXED_MAX:
        # The hint stands in for the running row maximum: p = exp(s - L_hint) is both the term of
        # the output sum and the column-sum probability, with no rescaling of acc between tiles.
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - hint2[:, None])
        if MASK_COLS:
            p = tl.where(col_valid[None, :], p, 0.0)
        l_i += tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc)
        if SUM_WITH_HINT:
            _add_group_column_sums(p, tl.full(hint2.shape, 1.0, tl.float32), pos, first_pos, last_pos, group_size,
                                   ColSum, colsum_head, s_cg, cols64, col_valid)
    else:
        acc, m_i, l_i, p = _online_softmax_step(q, k, v, acc, m_i, l_i, qk_scale, col_valid, MASK_COLS)
        if SUM_WITH_HINT:
            # exp(s - L_hint) = p * exp(m - L_hint): one weight per row.
            _add_group_column_sums(p, tl.math.exp2(m_i - hint2), pos, first_pos, last_pos, group_size, ColSum,
                                   colsum_head, s_cg, cols64, col_valid)
    return acc, m_i, l_i


@triton.jit
def _dense_pass(q, m_i, K, V, k_head, v_head, s_kn, s_vn, N_KEYS, n_full, qk_scale, hint2,
                pos, first_pos, last_pos, group_size, ColSum, colsum_head, s_cg,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                SUM_WITH_HINT: tl.constexpr, FIXED_MAX: tl.constexpr, TMA: tl.constexpr):
    """All key tiles for one row tile: (acc, m, l). With FIXED_MAX, ``m_i`` is the hint and stays."""
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _dense_key_tile(q, acc, m_i, l_i, K, V, k_head, v_head, s_kn, s_vn, start, N_KEYS, qk_scale,
                                        hint2, pos, first_pos, last_pos, group_size, ColSum, colsum_head, s_cg,
                                        BLOCK_N, HEAD_DIM, False, SUM_WITH_HINT, FIXED_MAX, TMA)
    if n_full < N_KEYS:
        acc, m_i, l_i = _dense_key_tile(q, acc, m_i, l_i, K, V, k_head, v_head, s_kn, s_vn, n_full, N_KEYS,
                                        qk_scale, hint2, pos, first_pos, last_pos, group_size, ColSum, colsum_head,
                                        s_cg, BLOCK_N, HEAD_DIM, True, SUM_WITH_HINT, FIXED_MAX, TMA)
    return acc, m_i, l_i


@triton.jit
def _exact_column_sum_tile(q, K, k_head, s_kn, start, N, qk_scale, lse2, pos, first_pos, last_pos, group_size,
                           ColSum, colsum_head, s_cg, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                           MASK_COLS: tl.constexpr, TMA: tl.constexpr):
    cols = start + tl.arange(0, BLOCK_N)
    col_valid = cols < N
    cols64 = cols.to(tl.int64)
    k = _load_key_rows(K, k_head, s_kn, cols64, col_valid, start, HEAD_DIM, MASK_COLS, BLOCK_N, TMA)
    qk = tl.dot(q, tl.trans(k)) * qk_scale
    if MASK_COLS:
        qk = tl.where(col_valid[None, :], qk, float("-inf"))
    p = tl.math.exp2(qk - lse2[:, None])
    ones = tl.full(lse2.shape, 1.0, tl.float32)
    _add_group_column_sums(p, ones, pos, first_pos, last_pos, group_size, ColSum, colsum_head, s_cg, cols64,
                           col_valid)


@triton.jit
def _attention_with_column_sums_kernel(
    Q, K, V, Out, Order, ColSum, Lse, LseHint,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
    s_cb, s_ch, s_cg, s_lb, s_lh, s_hb, s_hh, s_hn,
    H, N, N_KEYS, group_size, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_HINT: tl.constexpr, COLUMN_SUMS: tl.constexpr, FIXED_MAX: tl.constexpr, TMA: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    first_pos = tl.program_id(0) * BLOCK_M
    last_pos = tl.minimum(first_pos + BLOCK_M, N) - 1
    pos = first_pos + tl.arange(0, BLOCK_M)
    n_full = (N_KEYS // BLOCK_N) * BLOCK_N
    if TMA:  # K and V are tensor descriptors, addressed by (batch, head)
        k_head = bh
        v_head = bh
    else:
        k_head = b * s_kb + h * s_kh
        v_head = b * s_vb + h * s_vh
    colsum_head = b * s_cb + h * s_ch
    dims = tl.arange(0, HEAD_DIM)
    sum_in_pass = COLUMN_SUMS and HAS_HINT

    rows, row_valid, q = _load_query_rows(Q, b * s_qb + h * s_qh, s_qn, Order, first_pos, N, BLOCK_M, HEAD_DIM)
    rows64 = rows.to(tl.int64)
    if HAS_HINT:
        # Rows past the end get an infinite hint, so they add nothing to the sums.
        hint = tl.load(LseHint + b * s_hb + h * s_hh + rows64 * s_hn, mask=row_valid, other=float("inf"))
        hint2 = hint.to(tl.float32) * 1.4426950408889634
    else:
        hint2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if FIXED_MAX:
        acc, m_i, l_i = _dense_pass(q, hint2, K, V, k_head, v_head, s_kn, s_vn, N_KEYS, n_full, qk_scale, hint2,
                                    pos, first_pos, last_pos, group_size, ColSum, colsum_head, s_cg,
                                    BLOCK_M, BLOCK_N, HEAD_DIM, sum_in_pass, True, TMA)
        # A hint far from the true log-sum-exp (or not finite) would under- or overflow the sums of
        # the output: such a tile is recomputed with the running maximum. The column sums keep
        # their definition, exp(s - L_hint), either way.
        bad = row_valid & ((l_i < 1e-18) | (l_i > 1e18) | (l_i != l_i))
        if tl.max(bad.to(tl.int32), 0) > 0:
            acc, m_i, l_i = _dense_pass(q, tl.full([BLOCK_M], float("-inf"), dtype=tl.float32), K, V, k_head,
                                        v_head, s_kn, s_vn, N_KEYS, n_full, qk_scale, hint2, pos, first_pos,
                                        last_pos, group_size, ColSum, colsum_head, s_cg,
                                        BLOCK_M, BLOCK_N, HEAD_DIM, False, False, TMA)
    else:
        acc, m_i, l_i = _dense_pass(q, tl.full([BLOCK_M], float("-inf"), dtype=tl.float32), K, V, k_head, v_head,
                                    s_kn, s_vn, N_KEYS, n_full, qk_scale, hint2, pos, first_pos, last_pos,
                                    group_size, ColSum, colsum_head, s_cg, BLOCK_M, BLOCK_N, HEAD_DIM,
                                    sum_in_pass, False, TMA)
    lse2 = m_i + tl.math.log2(l_i)
    tl.store(Lse + b * s_lb + h * s_lh + rows64, lse2 * 0.6931471805599453, mask=row_valid)
    out = acc / l_i[:, None]
    tl.store(Out + b * s_ob + h * s_oh + rows64[:, None] * s_on + dims[None, :], out.to(Out.dtype.element_ty),
             mask=row_valid[:, None])
    if COLUMN_SUMS and not HAS_HINT:
        # Exact sums need the final row log-sum-exp: a second pass over the keys.
        lse2 = tl.where(row_valid, lse2, float("inf"))
        for start in range(0, n_full, BLOCK_N):
            _exact_column_sum_tile(q, K, k_head, s_kn, start, N_KEYS, qk_scale, lse2, pos, first_pos, last_pos,
                                   group_size, ColSum, colsum_head, s_cg, BLOCK_N, HEAD_DIM, False, TMA)
        if n_full < N_KEYS:
            _exact_column_sum_tile(q, K, k_head, s_kn, n_full, N_KEYS, qk_scale, lse2, pos, first_pos, last_pos,
                                   group_size, ColSum, colsum_head, s_cg, BLOCK_N, HEAD_DIM, True, TMA)


# ----------------------------------------------------------------------------------------------
# Key scores from a sample of each group's queries
# ----------------------------------------------------------------------------------------------

@triton.jit
def _sampled_column_sums_kernel(
    Q, K, Order, ColSum,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_cb, s_ch, s_cg,
    H, N, N_KEYS, n_groups, group_size, stride, qk_scale,
    SAMPLES: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per BLOCK_M sampled queries (BLOCK_M // SAMPLES whole groups) of one head: the
    exact row log-sum-exp of each sampled query (first pass over the keys), then the per-group sums
    of exp(s - lse) (second pass), stored directly: no other program touches these groups."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    first_group = tl.program_id(0) * (BLOCK_M // SAMPLES)
    lanes = tl.arange(0, BLOCK_M)
    group = first_group + lanes // SAMPLES
    pos = group * group_size + (lanes % SAMPLES) * stride
    row_valid = (group < n_groups) & (pos < N)
    rows = tl.load(Order + pos, mask=row_valid, other=0)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None].to(tl.int64) * s_qn + dims[None, :], mask=row_valid[:, None],
                other=0.0)
    k_head = K + b * s_kb + h * s_kh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, N_KEYS, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_valid = cols < N_KEYS
        k = tl.load(k_head + cols[:, None].to(tl.int64) * s_kn + dims[None, :], mask=col_valid[:, None], other=0.0)
        qk = tl.where(col_valid[None, :], tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(qk - m_new[:, None]), 1)
        m_i = m_new
    lse2 = tl.where(row_valid, m_i + tl.math.log2(l_i), float("inf"))  # invalid rows add nothing
    slot = tl.arange(0, 16)
    # [16, BLOCK_M]: lane s marks the rows of group first_group + s
    member = tl.where((lanes[None, :] // SAMPLES) == slot[:, None], 1.0, 0.0).to(tl.bfloat16)
    out_groups = first_group + slot
    out_valid = (slot < BLOCK_M // SAMPLES) & (out_groups < n_groups)
    out_head = ColSum + b * s_cb + h * s_ch + out_groups[:, None].to(tl.int64) * s_cg
    for start in range(0, N_KEYS, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_valid = cols < N_KEYS
        k = tl.load(k_head + cols[:, None].to(tl.int64) * s_kn + dims[None, :], mask=col_valid[:, None], other=0.0)
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
        sums = tl.dot(member, p.to(tl.bfloat16))
        tl.store(out_head + cols[None, :], sums, mask=out_valid[:, None] & col_valid[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_HEAD_DIMS = (64, 128)  # the head dims these kernels are tuned and tested for
_DTYPES = (torch.bfloat16, torch.float16)  # fp32 tiles would not fit the tuned shared-memory budget


def _row_strides(scale) -> tuple[int, int, int]:
    return (0, 0, 0) if scale is None else tuple(scale.stride())


def _unsupported(q, k, v, *outputs) -> str | None:
    """Why these kernels do not take q/k/v/outputs (the launchers then use the reference)."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q, k, v as [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[3] not in _HEAD_DIMS:
        return f"head dim {q.shape[3]} (the kernels take {_HEAD_DIMS})"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype} (the kernels take one of bf16, fp16)"
    if any(t is not None and t.stride(3) != 1 for t in (q, k, v, *outputs)):
        return "a tensor whose last dimension is not contiguous"
    return None


# Tile shapes measured on an H100 with bench/ (see bench/NOTES.md), for GPUs that give a block
# ~227 KB of shared memory (sm_80, sm_90); sm_86 / sm_89 (~100 KB) get the "small" entries.
# Sparse kernel: by rows per tile (<= 64 for group sizes like 192, 128 when the group size allows).
SPARSE_CONFIGS = {
    "big": {64: {"block_n": 64, "num_warps": 4, "num_stages": 3},
            128: {"block_n": 128, "num_warps": 8, "num_stages": 2},
            256: {"block_n": 64, "num_warps": 16, "num_stages": 2}},
    "small": {64: {"block_n": 64, "num_warps": 4, "num_stages": 2},
              128: {"block_n": 64, "num_warps": 8, "num_stages": 2}},
}
# Largest row tile per size class: one program per tile gathers the group's key/value rows, so
# bigger tiles share each gathered row among more queries.
SPARSE_MAX_ROWS = {"big": 128, "small": 128}
DENSE_CONFIGS = {
    # sm_90+ with tensor descriptors: keys and values through the copy engine (TMA)
    "tma": {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 4},
    "big": {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3},
    "small": {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 2},
}


def _launch_options(cfg):
    """Warps, pipeline stages and, where a configuration caps it, registers per thread."""
    options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if cfg.get("maxnreg"):
        options["maxnreg"] = cfg["maxnreg"]
    return options


def _tma_possible(device, *tensors) -> bool:
    """Whether the copy engine can load these [B, H, N, D] tensors: the device and Triton allow
    it, and base and strides are 16-byte aligned."""
    return tensor_descriptors(device) and all(
        t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:3]) for t in tensors)


def _key_descriptor(t, block_n):
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, t.shape[3]])


def column_sparse_attention_triton(q, k, v, indices, counts, query_order, group_size, base, out, sign,
                                   base_scale=None, out_scale=None, *, config=None):
    """Triton version of ``column_sparse_attention_reference`` (same arguments and result; fp8
    rows may round one step apart, where the two roundings of a tie differ).

    ``config`` (optional dict) overrides ``SPARSE_CONFIGS`` (and ``block_m``); for benchmarks.
    """
    config = config or {}
    batch, heads, n_tokens, head_dim = q.shape
    n_groups = math.ceil(n_tokens / group_size)
    if indices.shape[:3] != (batch, heads, n_groups) or counts.shape != (batch, heads, n_groups):
        raise ValueError(f"indices {tuple(indices.shape)} / counts {tuple(counts.shape)} do not match "
                         f"[B, H, G] = {(batch, heads, n_groups)}")
    for t, scale, name in ((base, base_scale, "base"), (out, out_scale, "out")):  # row scales [B, H, N]
        check_scales(t, scale, name, () if t is None else t.shape[:3])
    reason = _unsupported(q, k, v, out, base)
    if reason is None and group_size % 16:
        reason = f"group size {group_size} (the kernel needs a multiple of 16)"
    if reason is None and (base_scale is not None or out_scale is not None) and not fp8_supported(q.device):
        reason = "fp8 rows on a GPU before compute capability 8.9"
    if reason is not None:
        note_fallback("column_sparse_attention", reason)
        return column_sparse_attention_reference(q, k, v, indices, counts, query_order, group_size, base, out, sign,
                                                 base_scale, out_scale)
    size = size_class(q.device)
    block_m = config.get("block_m") or row_tile(group_size, SPARSE_MAX_ROWS[size])
    if group_size % block_m:
        raise ValueError(f"block_m {block_m} does not divide the group size {group_size}")
    tuned = SPARSE_CONFIGS[size]
    cfg = {"stream_hint": True, **tuned[min((t for t in tuned if t >= block_m), default=max(tuned))], **config}
    tiles_per_group = group_size // block_m
    order = query_order.to(device=q.device, dtype=torch.int32)
    paged = is_paged(indices, counts)
    indices = indices if indices.stride(-1) == 1 else indices.contiguous()
    counts = counts if counts.dtype in (torch.int16, torch.int32) else counts.to(torch.int32)
    base_t = base if base is not None else out  # never read when HAS_BASE is False
    base_s = base_scale if base_scale is not None else order  # never read without BASE_FP8
    out_s = out_scale if out_scale is not None else order  # never written without OUT_FP8
    grid = (n_groups * tiles_per_group, batch * heads)
    _column_sparse_attention_kernel[grid](
        q, k, v, base_t, out, indices, counts, order, base_s, out_s,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), base_t.stride(0), base_t.stride(1), base_t.stride(2),
        out.stride(0), out.stride(1), out.stride(2), indices.stride(0), indices.stride(1), indices.stride(2),
        counts.stride(0), counts.stride(1), counts.stride(2),
        *_row_strides(base_scale), *_row_strides(out_scale),
        heads, n_tokens, indices.shape[3], group_size, tiles_per_group, float(sign),
        head_dim ** -0.5 * _LOG2E,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=cfg["block_n"],
        HAS_BASE=base is not None, STREAM="evict_first" if cfg["stream_hint"] else "",
        BASE_FP8=base_scale is not None, OUT_FP8=out_scale is not None, PAGED=paged, PAGE_BITS=index_lists.PAGE_BITS,
        **_launch_options(cfg),
    )
    return out


def attention_with_column_sums_triton(q, k, v, query_order, group_size, out, lse_hint=None, *, config=None):
    """Triton version of ``attention_with_column_sums_reference`` (same arguments and results).

    ``config`` (optional dict) overrides ``DENSE_CONFIGS``; ``column_sums=False`` in it skips the
    sums (benchmarks use that to price them) and then returns ``None`` in their place.
    """
    overrides = config or {}
    batch, heads, n_tokens, head_dim = q.shape
    if lse_hint is not None and lse_hint.shape != (batch, heads, n_tokens):
        raise ValueError(f"lse_hint {tuple(lse_hint.shape)} is not [B, H, N] = {(batch, heads, n_tokens)}")
    reason = _unsupported(q, k, v, out)
    if reason is None and group_size < 16:  # a row tile may span at most 16 groups
        reason = f"group size {group_size} (the kernel needs at least 16)"
    if reason is not None:
        note_fallback("attention_with_column_sums", reason)
        return attention_with_column_sums_reference(q, k, v, query_order, group_size, out, lse_hint)
    # TMA by default on CUDA where the GPU and the layout allow it; under the interpreter only on request
    use_tma = overrides.get("tma", q.is_cuda) and _tma_possible(q.device, k, v)
    cfg = {**DENSE_CONFIGS["tma" if use_tma else size_class(q.device)], **overrides}
    n_groups = math.ceil(n_tokens / group_size)
    want_sums = cfg.get("column_sums", True)
    order = query_order.to(device=q.device, dtype=torch.int32)
    if want_sums:
        column_sums = torch.zeros(batch, heads, n_groups, k.shape[2], dtype=torch.float32, device=q.device)
    else:
        column_sums = torch.empty(1, 1, 1, 1, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, heads, n_tokens, dtype=torch.float32, device=q.device)
    hint = lse_hint if lse_hint is not None else lse  # never read when HAS_HINT is False
    grid = (triton.cdiv(n_tokens, cfg["block_m"]), batch * heads)
    k_arg, v_arg = k, v
    if use_tma:
        k_arg, v_arg = (_key_descriptor(t, cfg["block_n"]) for t in (k, v))
    _attention_with_column_sums_kernel[grid](
        q, k_arg, v_arg, out, order, column_sums, lse, hint,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        column_sums.stride(0), column_sums.stride(1), column_sums.stride(2), lse.stride(0), lse.stride(1),
        hint.stride(0), hint.stride(1), hint.stride(2),
        heads, n_tokens, k.shape[2], group_size, head_dim ** -0.5 * _LOG2E,
        HEAD_DIM=head_dim, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
        HAS_HINT=lse_hint is not None, COLUMN_SUMS=want_sums,
        FIXED_MAX=lse_hint is not None and cfg.get("fixed_max", True), TMA=use_tma,
        **_launch_options(cfg),
    )
    return (column_sums if want_sums else None), lse


SAMPLED_CONFIG = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}


def sampled_column_sums_triton(q, k, query_order, group_size, samples, *, config=None):
    """Triton version of ``sampled_column_sums_reference`` (same arguments and result).

    ``samples`` must divide the 64-row tile (a power of two from 4 to 64); the sums carry bf16
    rounding of the probabilities (~1e-3 relative), like the dense kernel's.
    """
    cfg = {**SAMPLED_CONFIG, **(config or {})}
    batch, heads, n_tokens, head_dim = q.shape
    reason = _unsupported(q, k, k)
    if reason is None and (samples < 4 or cfg["block_m"] % samples or samples > group_size):
        reason = f"{samples} sampled queries per group (the kernel takes a power of two from 4 to 64, <= the group)"
    if reason is not None:
        note_fallback("sampled_column_sums", reason)
        return sampled_column_sums_reference(q, k, query_order, group_size, samples)
    n_groups = math.ceil(n_tokens / group_size)
    sums = torch.empty(batch, heads, n_groups, k.shape[2], dtype=torch.float32, device=q.device)
    order = query_order.to(device=q.device, dtype=torch.int32)
    groups_per_tile = cfg["block_m"] // samples
    grid = (triton.cdiv(n_groups, groups_per_tile), batch * heads)
    _sampled_column_sums_kernel[grid](
        q, k, order, sums,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        sums.stride(0), sums.stride(1), sums.stride(2),
        heads, n_tokens, k.shape[2], n_groups, group_size, max(1, group_size // samples), head_dim ** -0.5 * _LOG2E,
        SAMPLES=samples, HEAD_DIM=head_dim, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return sums
