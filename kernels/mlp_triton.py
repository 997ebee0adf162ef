"""Triton kernels for the sparse-delta MLP update (see ``mlp_reference.py`` for the oracle).

Two launches per call:

1. ``_mlp_delta_up_kernel``: per row tile (rows taken in ``row_order``) and tile of listed hidden
   units, ``x[rows] @ w1[units]^T + b1`` (gathered rows of ``x`` and ``w1``: contiguous), the
   activation, the change against ``hidden_cache`` (updated in place), and that change written to
   a compact scratch ``[B, K, rows]``.
2. ``_mlp_delta_down_kernel``: per row tile and tile of output features, ``delta @ w2[:, units]^T``
   added into ``out_cache`` (and the updated rows copied into ``result`` when one is given: the
   caller's output without a separate copy).

Layouts the caller chooses (any strides work; these are the fast ones, measured in bench/NOTES.md):
- ``w2``: pass it as ``w2_t.t()``, the transposed view of a ``[M, Dout]`` copy cached once per
  model: every listed unit is then one contiguous row. A plain ``[Dout, M]`` weight works too but
  gathers each unit as a strided column (the second launch runs ~3x slower).
- ``hidden_cache``: in token order ``[B, N, M]`` each recomputed value is a scattered 2-byte store
  (half of the first launch's time at the FLUX shape). Stored unit-major (``[B, M, N]`` passed as
  its ``.transpose(1, 2)``) in block order (``hidden_in_block_order``: row ``p`` holds the token
  ``row_order[p]``), the rows of a tile are contiguous for every unit and the stores coalesce,
  while x and the output stay in token order (their rows are whole contiguous vectors, so loads
  through the row order stay coalesced, and no permuted copy of x or y is made).

``block_means_triton`` (the inputs of the unit ranking) is here too: one launch, rows taken
through the row order.

Programs are numbered row tile first: the same unit-tile position of different row blocks covers
nearby (sorted) units, so the weight rows they gather are shared through L2. With ``band_rows``
they go through bands of that many row tiles, row tile first within a band, so that the band's
rows of x (or of the scratch) are read from L2 by every unit (output) tile instead of being read
from memory again for each (see ``MLP_LONG_CONFIGS``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._device import capability_major, l2_bytes, note_fallback, row_tile, size_class
from .fp8 import check_scales
from .mlp_reference import sparse_mlp_delta_reference, transpose_into_reference

_ACTIVATION_IDS = {"gelu_tanh": 0}


@triton.jit
def _gelu_tanh(x):
    # 0.5 * x * (1 + tanh(y)) == x * sigmoid(2y), y = sqrt(2/pi) * (x + 0.044715 x^3)
    y2 = 1.5957691216057308 * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.math.exp2(-y2 * 1.4426950408889634))


@triton.jit
def _program_tiles(Cnt, s_cb, K_CAP, block_size, n_row_tiles, n_col_tiles, band, BLOCK_M: tl.constexpr):
    """This program's batch, column tile, first row position, row block and the block's unit count.

    Programs go through bands of ``band`` row tiles, and within a band row tile first (see the
    module docstring)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    per_band = band * n_col_tiles
    first_tile = (pid // per_band) * band
    band_rows = tl.minimum(n_row_tiles - first_tile, band)
    in_band = pid % per_band
    first_pos = (first_tile + in_band % band_rows) * BLOCK_M
    blk = first_pos // block_size
    count = tl.minimum(tl.load(Cnt + b * s_cb + blk), K_CAP)
    return b, in_band // band_rows, first_pos, blk, count


@triton.jit
def _e4m3_encode(x):
    """float32 values with |x| <= 448 -> (float8_e4m3fn bit patterns as int32, the values they hold),
    rounded to nearest (ties to even; subnormal ties away from zero), in integer arithmetic: no
    fp8 conversion instruction (those need sm_89, and in this kernel's tile layout they stored
    wrong values on an H100)."""
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    magnitude = bits & 0x7FFFFFFF
    # normal numbers: the 23-bit mantissa rounded to 3 bits (a carry bumps the exponent)
    rounded = (magnitude + 0x7FFFF + ((magnitude >> 20) & 1)) & 0x7FF00000
    normal_bits = (((rounded >> 23) - 120) << 3) | ((rounded >> 20) & 7)
    normal_value = rounded.to(tl.float32, bitcast=True)
    # subnormals (below 2^-6): multiples of 2^-9 (8 of them is 2^-6, the smallest normal's pattern)
    steps = tl.floor(magnitude.to(tl.float32, bitcast=True) * 512.0 + 0.5)
    small = magnitude < 0x3C800000  # 2^-6
    value = tl.where(small, steps * 0.001953125, normal_value)
    out_bits = tl.where(small, steps.to(tl.int32), normal_bits) | sign
    return out_bits, tl.where(sign != 0, -value, value)


@triton.jit
def _e4m3_decode(bits):
    """float8_e4m3fn bit patterns (as int32) -> float32, in integer arithmetic."""
    exponent = (bits >> 3) & 0xF
    mantissa = bits & 7
    normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    value = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)
    return tl.where((bits & 0x80) != 0, -value, value)


@triton.jit
def _up_epilogue(acc, units, slots, count, rows, pos, row_valid, hidden, s_hn, s_hm, delta_base, s_dk, hscale,
                 ACTIVATION: tl.constexpr, HIDDEN_OFFSET_TYPE: tl.constexpr, HIDDEN_FP8: tl.constexpr):
    """Activation, change against the hidden cache (updated), change into the scratch."""
    if ACTIVATION == 0:
        new = _gelu_tanh(acc)
    mask = row_valid[:, None] & (slots < count)[None, :]
    # 32-bit offsets where they fit (HIDDEN_OFFSET_TYPE): a tile of 64-bit offsets costs two
    # registers per element and made this epilogue spill more.
    h_offsets = rows.to(HIDDEN_OFFSET_TYPE)[:, None] * s_hn + units.to(HIDDEN_OFFSET_TYPE)[None, :] * s_hm
    if HIDDEN_FP8:
        # The cache holds value / unit scale as float8_e4m3fn bytes (a uint8 view); the change
        # pushed on is that of the stored values (mlp_reference).
        unit_scale = tl.load(hscale + units, mask=slots < count, other=1.0)[None, :]
        old = _e4m3_decode(tl.load(hidden + h_offsets, mask=mask, other=0).to(tl.int32)) * unit_scale
        scaled = tl.minimum(tl.maximum(new / unit_scale, -448.0), 448.0)
        stored_bits, stored = _e4m3_encode(scaled)
        tl.store(hidden + h_offsets, stored_bits.to(tl.uint8), mask=mask)
        new = stored * unit_scale
    else:
        old = tl.load(hidden + h_offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(hidden + h_offsets, new.to(hidden.dtype.element_ty), mask=mask)
    delta = new - old
    # The scratch is padded to whole tiles: unmasked (vectorised) stores; the slots past the
    # count hold finite values that the second kernel never reads.
    tl.store(delta_base + slots[None, :] * s_dk + pos[:, None], delta.to(delta_base.dtype.element_ty))


@triton.jit
def _mlp_delta_up_kernel(
    X, W1, B1, Hidden, Delta, Idx, Cnt, Order, HScale,
    s_xb, s_xn, s_w1m, s_hb, s_hn, s_hm, s_db, s_dk, s_ib, s_iblk, s_cb, s_sb,
    N, D_IN, K_CAP, block_size, n_row_tiles, n_col_tiles, band,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    HIDDEN_OFFSET_TYPE: tl.constexpr, HIDDEN_BY_POSITION: tl.constexpr, HIDDEN_FP8: tl.constexpr,
):
    b, unit_tile, first_pos, blk, count = _program_tiles(Cnt, s_cb, K_CAP, block_size, n_row_tiles, n_col_tiles,
                                                         band, BLOCK_M)
    first_slot = unit_tile * BLOCK_N
    if first_slot < count:
        pos = first_pos + tl.arange(0, BLOCK_M)
        row_valid = pos < N
        rows = tl.load(Order + pos, mask=row_valid, other=0).to(tl.int64)
        slots = first_slot + tl.arange(0, BLOCK_N)
        slot_valid = slots < count
        units = tl.load(Idx + b * s_ib + blk * s_iblk + slots, mask=slot_valid, other=0).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = X + b * s_xb + rows[:, None] * s_xn + ks[None, :]
        w_ptrs = W1 + units[:, None] * s_w1m + ks[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kk in range(0, D_IN, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs)
                w = tl.load(w_ptrs)
            else:
                k_valid = (kk + ks) < D_IN
                a = tl.load(x_ptrs, mask=k_valid[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_valid[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(w), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(B1 + units, mask=slot_valid, other=0.0).to(tl.float32)[None, :]
        # The hidden cache is addressed by token, or by position in the row order (block order).
        hidden_rows = pos if HIDDEN_BY_POSITION else rows
        _up_epilogue(acc, units, slots, count, hidden_rows, pos, row_valid, Hidden + b * s_hb, s_hn, s_hm,
                     Delta + b * s_db, s_dk, HScale + b * s_sb, ACTIVATION, HIDDEN_OFFSET_TYPE, HIDDEN_FP8)


@triton.jit
def _down_tile(acc, Delta, d_row, s_dk, W2, w2_col, s_w2m, units, kk, count,
               BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, col_valid, MASK_K: tl.constexpr):
    ks = kk + tl.arange(0, BLOCK_K)
    units = units.to(tl.int64)
    if MASK_K:
        k_valid = ks < count
        a = tl.load(Delta + d_row + ks[None, :].to(tl.int64) * s_dk, mask=k_valid[None, :], other=0.0)
        w_mask = k_valid[:, None]
    else:
        a = tl.load(Delta + d_row + ks[None, :].to(tl.int64) * s_dk)
        w_mask = ks[:, None] >= 0
    if EVEN_N:
        if MASK_K:
            w = tl.load(W2 + units[:, None] * s_w2m + w2_col[None, :], mask=w_mask, other=0.0)
        else:
            w = tl.load(W2 + units[:, None] * s_w2m + w2_col[None, :])
    else:
        w = tl.load(W2 + units[:, None] * s_w2m + w2_col[None, :], mask=w_mask & col_valid[None, :],
                    other=0.0)
    return tl.dot(a, w, acc)


@triton.jit
def _mlp_delta_down_kernel(
    Delta, W2, Out, Result, Idx, Cnt, Order,
    s_db, s_dk, s_w2o, s_w2m, s_ob, s_on, s_rb, s_rn, s_ib, s_iblk, s_cb,
    N, D_OUT, K_CAP, block_size, n_row_tiles, n_col_tiles, band,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr,
    HAS_RESULT: tl.constexpr,
):
    b, out_tile, first_pos, blk, count = _program_tiles(Cnt, s_cb, K_CAP, block_size, n_row_tiles, n_col_tiles,
                                                        band, BLOCK_M)
    # With a result buffer, blocks with an empty list still copy their rows into it.
    if HAS_RESULT:
        run = count >= 0
    else:
        run = count > 0
    if run:
        pos = first_pos + tl.arange(0, BLOCK_M)
        row_valid = pos < N
        rows = tl.load(Order + pos, mask=row_valid, other=0).to(tl.int64)
        cols = out_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_valid = cols < D_OUT
        # The scratch has whole row tiles, so its rows need no mask.
        d_row = b * s_db + pos[:, None]
        idx_row = b * s_ib + blk * s_iblk
        w2_col = cols.to(tl.int64) * s_w2o
        if EVEN_N:
            mask = row_valid[:, None]
        else:
            mask = row_valid[:, None] & col_valid[None, :]
        o_ptrs = Out + b * s_ob + rows[:, None] * s_on + cols[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        n_full = (count // BLOCK_K) * BLOCK_K
        # Unit ids are fetched one step ahead and carried in registers: the weight loads then do not
        # wait on a load of the same step, and Triton's pipeliner keeps two of them in flight.
        lanes = tl.arange(0, BLOCK_K)
        units = tl.load(Idx + idx_row + lanes, mask=lanes < n_full, other=0)
        for kk in range(0, n_full, BLOCK_K):
            ahead = kk + BLOCK_K + lanes
            units_next = tl.load(Idx + idx_row + ahead, mask=ahead < n_full, other=0)
            acc = _down_tile(acc, Delta, d_row, s_dk, W2, w2_col, s_w2m, units, kk, count, BLOCK_K, EVEN_N,
                             col_valid, False)
            units = units_next
        if n_full < count:
            tail = n_full + lanes
            units = tl.load(Idx + idx_row + tail, mask=tail < count, other=0)
            acc = _down_tile(acc, Delta, d_row, s_dk, W2, w2_col, s_w2m, units, n_full, count, BLOCK_K, EVEN_N,
                             col_valid, True)
        old = tl.load(o_ptrs, mask=mask, other=0.0)
        new = (old.to(tl.float32) + acc).to(Out.dtype.element_ty)
        tl.store(o_ptrs, new, mask=mask)
        if HAS_RESULT:
            tl.store(Result + b * s_rb + rows[:, None] * s_rn + cols[None, :], new.to(Result.dtype.element_ty),
                     mask=mask)


# Tile shapes measured on an H100 with bench/ (see bench/NOTES.md), for GPUs that give a block
# ~227 KB of shared memory (sm_80, sm_90); sm_86 / sm_89 (~100 KB) get the "small" entries.
MLP_CONFIGS = {
    "big": {"up": {"block_m": 128, "block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 4},
            "down": {"block_m": 128, "block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 3}},
    "small": {"up": {"block_m": 128, "block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 2},
              "down": {"block_m": 128, "block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 2}},
}
# Where one batch row of x is larger than the GPU's L2 (FLUX above ~1500x1500): 256-wide tiles, and
# programs in bands of a few row tiles, so that a band's rows of x (and of the scratch) stay in L2
# while every unit (output) tile passes over them; in plain row-tile-first order each tile position
# streams all of x again. Measured on the H200 at FLUX 2048x2048 (bench/results/
# kernels_mlp_bands_h200.json): up 1.31 -> 1.11 ms, down 0.92 -> 0.81 ms; at 1024x1024, where x
# fits in L2, the short configuration is as fast or faster.
# Hopper (sm_90) only: elsewhere these tiles are unmeasured (and spill more without wgmma).
MLP_LONG_CONFIGS = {
    "hopper": {"up": {"block_m": 128, "block_n": 256, "block_k": 64, "num_warps": 8, "num_stages": 3, "band_rows": 4},
            "down": {"block_m": 128, "block_n": 256, "block_k": 64, "num_warps": 8, "num_stages": 3, "band_rows": 8}},
}


def _default_config(x):
    """The tile configuration for x ([B, N, D_in]): ``MLP_LONG_CONFIGS`` where one batch row of x
    is larger than the GPU's L2 and the GPU has an entry there, else ``MLP_CONFIGS``."""
    long_rows = x.shape[1] * x.shape[2] * x.element_size() > l2_bytes(x.device) > 0
    if long_rows and capability_major(x.device) == 9:
        return MLP_LONG_CONFIGS["hopper"]
    return MLP_CONFIGS[size_class(x.device)]


def _band(cfg, n_row_tiles) -> int:
    """Row tiles per band of programs (``band_rows`` of the configuration; 0 = all of them, the
    plain row-tile-first order)."""
    rows = cfg.get("band_rows", 0)
    return n_row_tiles if rows <= 0 else min(rows, n_row_tiles)


def _fits_int32(t) -> bool:
    """Whether every element offset of ``t`` (any strides) fits in a signed 32-bit integer."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) < 2 ** 31


def sparse_mlp_delta_triton(x, w1, b1, w2, unit_indices, unit_counts, row_order, block_size,
                            hidden_cache, out_cache, activation="gelu_tanh", *, hidden_in_block_order=False,
                            result=None, hidden_scale=None, config=None):
    """Triton version of ``sparse_mlp_delta_reference`` (same arguments, same in-place updates).

    Pass ``w2`` as ``w2_t.t()`` of a cached contiguous ``[M, Dout]`` copy for coalesced loads of
    the listed units (see the module docstring); a plain ``[Dout, M]`` view works too.
    ``config`` (optional dict with "up"/"down" entries)
    overrides the defaults (``MLP_CONFIGS``, or ``MLP_LONG_CONFIGS`` for long rows); for benchmarks.
    """
    if activation not in _ACTIVATION_IDS:
        raise ValueError(f"unknown activation {activation!r}")
    defaults = _default_config(x)
    cfg = {part: {**defaults[part], **((config or {}).get(part) or {})} for part in ("up", "down")}
    batch, n_tokens, d_in = x.shape
    d_out = w2.shape[0]
    n_blocks = math.ceil(n_tokens / block_size)
    if unit_indices.shape[:2] != (batch, n_blocks) or unit_counts.shape != (batch, n_blocks):
        raise ValueError(f"unit_indices {tuple(unit_indices.shape)} / unit_counts {tuple(unit_counts.shape)} "
                         f"do not match [B, NB] = {(batch, n_blocks)}")
    check_scales(hidden_cache, hidden_scale, "hidden", (batch, w1.shape[0]))  # unit scales [B, M]
    fp8 = hidden_scale is not None
    if fp8 and hidden_scale.stride(1) != 1:
        raise ValueError("hidden_scale needs contiguous units (stride 1 along M)")
    reason = None
    if x.dtype not in (torch.bfloat16, torch.float16) or w1.dtype != x.dtype or w2.dtype != x.dtype:
        reason = f"dtype {x.dtype} (the kernels take bf16 or fp16, like the weights)"
    elif block_size % 16:
        reason = f"row block of {block_size} (the kernels need a multiple of 16)"
    elif x.stride(2) != 1 or w1.stride(1) != 1 or out_cache.stride(2) != 1:
        reason = "x, w1 or out_cache with a last dimension that is not contiguous"
    if reason is not None:
        note_fallback("sparse_mlp_delta", reason)
        return sparse_mlp_delta_reference(x, w1, b1, w2, unit_indices, unit_counts, row_order, block_size,
                                          hidden_cache, out_cache, activation,
                                          hidden_in_block_order=hidden_in_block_order, result=result,
                                          hidden_scale=hidden_scale)
    if result is not None and result.stride(2) != 1:
        raise ValueError("result needs a contiguous last dimension")
    k_cap = unit_indices.shape[2]
    if n_tokens == 0:
        return
    if k_cap == 0:
        if result is not None:
            result.copy_(out_cache)
        return
    order = (torch.arange(n_tokens, device=x.device, dtype=torch.int32) if row_order is None
             else row_order.to(device=x.device, dtype=torch.int32))
    unit_indices = unit_indices if unit_indices.stride(2) == 1 else unit_indices.contiguous()
    if unit_counts.dtype not in (torch.int16, torch.int32):
        unit_counts = unit_counts.to(torch.int32)
    if unit_counts.stride(1) != 1:
        unit_counts = unit_counts.contiguous()
    up, down = cfg["up"], cfg["down"]
    # Changes of the recomputed units, [B, K, rows] with rows in row-block order, padded to whole
    # tiles of both kernels so that neither needs masks along the contiguous dimension. Unit-major,
    # so that its stores do not share a layout with the gathered loads of hidden_cache (Triton
    # would then give those 8-element strips per thread: scattered across 8 units each).
    row_pad = max(row_tile(block_size, up["block_m"]), row_tile(block_size, down["block_m"]))
    delta = torch.empty(batch, triton.cdiv(k_cap, up["block_n"]) * up["block_n"],
                        triton.cdiv(n_tokens, row_pad) * row_pad, dtype=x.dtype, device=x.device)
    if delta[0].numel() >= 2 ** 31:  # the kernels address the scratch with 32-bit offsets
        raise ValueError("too many rows x listed units for one call: split the batch or the tokens")

    stages = (config or {}).get("stages", ("up", "down"))  # benchmarks time the two launches apart
    if "up" in stages:
        bm = row_tile(block_size, up["block_m"])
        n_row_tiles = math.ceil(n_tokens / bm)
        n_col_tiles = triton.cdiv(k_cap, up["block_n"])
        grid = (n_row_tiles * n_col_tiles, batch)
        _mlp_delta_up_kernel[grid](
            x, w1, b1 if b1 is not None else w1, hidden_cache.view(torch.uint8) if fp8 else hidden_cache, delta,
            unit_indices, unit_counts, order,
            hidden_scale if fp8 else delta,  # never read without HIDDEN_FP8
            x.stride(0), x.stride(1), w1.stride(0), hidden_cache.stride(0), hidden_cache.stride(1),
            hidden_cache.stride(2), delta.stride(0), delta.stride(1), unit_indices.stride(0),
            unit_indices.stride(1), unit_counts.stride(0), hidden_scale.stride(0) if fp8 else 0,
            n_tokens, d_in, k_cap, block_size, n_row_tiles, n_col_tiles, _band(up, n_row_tiles),
            HAS_BIAS=b1 is not None, ACTIVATION=_ACTIVATION_IDS[activation],
            BLOCK_M=bm, BLOCK_N=up["block_n"], BLOCK_K=up["block_k"], EVEN_K=d_in % up["block_k"] == 0,
            HIDDEN_OFFSET_TYPE=tl.int32 if _fits_int32(hidden_cache[0]) else tl.int64,
            HIDDEN_BY_POSITION=hidden_in_block_order, HIDDEN_FP8=fp8,
            num_warps=up["num_warps"], num_stages=up["num_stages"],
        )
    if "down" in stages:
        bm = row_tile(block_size, down["block_m"])
        n_row_tiles = math.ceil(n_tokens / bm)
        n_col_tiles = triton.cdiv(d_out, down["block_n"])
        grid = (n_row_tiles * n_col_tiles, batch)
        res = result if result is not None else out_cache  # never written when HAS_RESULT is False
        _mlp_delta_down_kernel[grid](
            delta, w2, out_cache, res, unit_indices, unit_counts, order,
            delta.stride(0), delta.stride(1), w2.stride(0), w2.stride(1), out_cache.stride(0), out_cache.stride(1),
            res.stride(0), res.stride(1), unit_indices.stride(0), unit_indices.stride(1), unit_counts.stride(0),
            n_tokens, d_out, k_cap, block_size, n_row_tiles, n_col_tiles, _band(down, n_row_tiles),
            BLOCK_M=bm, BLOCK_N=down["block_n"], BLOCK_K=down["block_k"], EVEN_N=d_out % down["block_n"] == 0,
            HAS_RESULT=result is not None,
            num_warps=down["num_warps"], num_stages=down["num_stages"],
        )


# ----------------------------------------------------------------------------------------------
# Block means (the inputs of the unit ranking, and the dense step's pre-activation means)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _block_means_kernel(T, Out, Order, s_tb, s_tn, s_ob, s_oblk, N, C, block_size,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    blk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    col_valid = cols < C
    first = blk * block_size
    last = tl.minimum(first + block_size, N)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(first, last, BLOCK_R):
        pos = p0 + tl.arange(0, BLOCK_R)
        row_valid = pos < last
        rows = tl.load(Order + pos, mask=row_valid, other=0).to(tl.int64)
        tile = tl.load(T + b * s_tb + rows[:, None] * s_tn + cols[None, :],
                       mask=row_valid[:, None] & col_valid[None, :], other=0.0)
        acc += tl.sum(tile.to(tl.float32), axis=0)
    mean = acc / (last - first).to(tl.float32)
    tl.store(Out + b * s_ob + blk.to(tl.int64) * s_oblk + cols, mean.to(Out.dtype.element_ty), mask=col_valid)


def block_means_triton(t, row_order, block_size, out=None):
    """Triton version of ``block_means_reference`` (same arguments and result); one launch."""
    batch, n_tokens, channels = t.shape
    n_blocks = triton.cdiv(n_tokens, block_size)
    if out is None:
        out = torch.empty(batch, n_blocks, channels, dtype=torch.float32, device=t.device)
    elif tuple(out.shape) != (batch, n_blocks, channels) or out.stride(2) != 1:
        raise ValueError(f"out must be [B, NB, C] = {(batch, n_blocks, channels)} with a contiguous last dimension")
    if t.stride(2) != 1:
        t = t.contiguous()
    if n_tokens == 0:
        return out
    order = (torch.arange(n_tokens, device=t.device, dtype=torch.int32) if row_order is None
             else row_order.to(device=t.device, dtype=torch.int32))
    block_c = 128
    _block_means_kernel[(n_blocks, triton.cdiv(channels, block_c), batch)](
        t, out, order, t.stride(0), t.stride(1), out.stride(0), out.stride(1), n_tokens, channels, block_size,
        BLOCK_R=32, BLOCK_C=block_c, num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------
# fc2 into the layout of the second launch ([Dout, M] -> [M, Dout]), once per sparse step
# ----------------------------------------------------------------------------------------------

@triton.jit
def _transpose_kernel(Src, Dst, R, C, s_sr, s_sc, s_dc, s_dr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                      EVEN: tl.constexpr):
    rs = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cs = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    src = Src + rs[:, None] * s_sr + cs[None, :] * s_sc
    # The tile goes through shared memory (tl.trans): reads coalesce along src's rows, writes
    # along dst's rows.
    dst = Dst + cs[:, None] * s_dc + rs[None, :] * s_dr
    if EVEN:
        tl.store(dst, tl.trans(tl.load(src)))
    else:
        mask = (rs < R)[:, None] & (cs < C)[None, :]
        tl.store(dst, tl.trans(tl.load(src, mask=mask, other=0.0)), mask=tl.trans(mask))


TRANSPOSE_CONFIG = {"block_r": 64, "block_c": 64, "num_warps": 4}


def transpose_into_triton(src, out, config=None):
    """Triton version of ``transpose_into_reference``: one launch of 64x64 tiles (any strides of
    ``src``; ``out`` contiguous). ``config`` overrides ``TRANSPOSE_CONFIG`` (benchmarks)."""
    if tuple(out.shape) != tuple(src.shape[::-1]) or out.dtype != src.dtype or out.device != src.device:
        raise ValueError(f"out must be {tuple(src.shape[::-1])} {src.dtype} on {src.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    if out.stride(1) != 1:
        note_fallback("transpose_into", "an output whose rows are not contiguous")
        return transpose_into_reference(src, out)
    cfg = {**TRANSPOSE_CONFIG, **(config or {})}
    rows, cols = src.shape
    if rows == 0 or cols == 0:
        return out
    grid = (triton.cdiv(rows, cfg["block_r"]), triton.cdiv(cols, cfg["block_c"]))
    _transpose_kernel[grid](src, out, rows, cols, src.stride(0), src.stride(1), out.stride(0), out.stride(1),
                            BLOCK_R=cfg["block_r"], BLOCK_C=cfg["block_c"],
                            EVEN=rows % cfg["block_r"] == 0 and cols % cfg["block_c"] == 0,
                            num_warps=cfg["num_warps"])
    return out
