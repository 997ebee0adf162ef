"""Triton kernels for the per-token work around a block's matrix products (oracle:
``block_ops_reference.py``). Each is one pass over its tensors:

- ``_layer_norm_modulate_kernel``: one program per row of ``ROWS`` rows; mean and variance in
  float32, the norm rounded to x's dtype, then ``* scale1 + shift``.
- ``_qk_norm_rope_kernel``: one program per batch row and tile of tokens, walking the heads: the
  tile's rotary table (float32, ``D/2 x 2 x 2`` per token) is read once for all heads and both of
  queries and keys, which come straight out of the fused projection (no strided copies).
- ``_gated_residual_kernel``: ``x + gate * (a + b)`` per row, into x or another tensor.

Rows wider than ``MAX_WIDTH`` channels (none of the supported models) go to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import note_fallback
from .block_ops_reference import gated_residual_reference_, layer_norm_modulate_reference, qk_norm_rope_reference

MAX_WIDTH = 16384


def _vector_strides(t, batch, channels):
    """(batch stride, channel stride) of a [1 or B, 1, C] modulation vector (0 where broadcast)."""
    if t.dim() != 3 or t.shape[1] != 1 or t.shape[2] != channels or t.shape[0] not in (1, batch):
        return None
    return (t.stride(0) if t.shape[0] == batch and batch > 1 else 0), t.stride(2)


@triton.jit
def _batch_and_token(row, n_tokens):
    """(batch, token) of a row of the flattened [B * N, C] view, as 64-bit offsets. The row kernels
    below take ROWS consecutive rows per program."""
    return (row // n_tokens).to(tl.int64), (row % n_tokens).to(tl.int64)


@triton.jit
def _layer_norm_modulate_kernel(X, Scale, Shift, Out, n_rows, n_tokens, C, eps,
                                s_xb, s_xn, s_sb, s_sc, s_hb, s_hc, s_ob, s_on,
                                BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    c = tl.arange(0, BLOCK_C)
    cm = c < C
    for r in range(ROWS):
        row = tl.program_id(0) * ROWS + r
        if row < n_rows:
            b, n = _batch_and_token(row, n_tokens)
            x = tl.load(X + b * s_xb + n * s_xn + c, mask=cm, other=0.0).to(tl.float32)
            mean = tl.sum(x, 0) / C
            centred = tl.where(cm, x - mean, 0.0)
            var = tl.sum(centred * centred, 0) / C
            normed = (centred * tl.math.rsqrt(var + eps)).to(Out.dtype.element_ty).to(tl.float32)
            scale = tl.load(Scale + b * s_sb + c * s_sc, mask=cm, other=0.0).to(tl.float32)
            shift = tl.load(Shift + b * s_hb + c * s_hc, mask=cm, other=0.0).to(tl.float32)
            y = normed * scale + shift
            tl.store(Out + b * s_ob + n * s_on + c, y.to(Out.dtype.element_ty), mask=cm)


def layer_norm_modulate_triton(x, scale1, shift, eps):
    batch, n_tokens, channels = x.shape
    s_scale, s_shift = _vector_strides(scale1, batch, channels), _vector_strides(shift, batch, channels)
    if channels > MAX_WIDTH or s_scale is None or s_shift is None or x.stride(-1) != 1:
        note_fallback("layer_norm_modulate", f"x {tuple(x.shape)}, scale {tuple(scale1.shape)}, "
                                             f"shift {tuple(shift.shape)}")
        return layer_norm_modulate_reference(x, scale1, shift, eps)
    out = torch.empty((batch, n_tokens, channels), dtype=x.dtype, device=x.device)
    rows, per_program = batch * n_tokens, 2
    block_c = triton.next_power_of_2(channels)
    _layer_norm_modulate_kernel[(triton.cdiv(rows, per_program),)](
        x, scale1, shift, out, rows, n_tokens, channels, float(eps),
        x.stride(0), x.stride(1), *s_scale, *s_shift, out.stride(0), out.stride(1),
        BLOCK_C=block_c, ROWS=per_program, num_warps=8 if block_c >= 4096 else 4)
    return out


@triton.jit
def _qk_norm_rope_kernel(QKV, Wq, Wk, PE, Q, K, V, n_tokens, heads, q_eps, k_eps,
                         s_b, s_n, s_pb, s_pn, s_pi, s_pr, s_pc, s_qb, s_qh, s_qn, s_kb, s_kh, s_kn,
                         s_vb, s_vh, s_vn,
                         D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_PE: tl.constexpr, COPY_V: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < n_tokens
    n64 = n.to(tl.int64)
    half = tl.arange(0, D // 2)
    d = tl.arange(0, D)
    # weights as (even, odd) channel pairs
    wq_e, wq_o = tl.split(tl.reshape(tl.load(Wq + d).to(tl.float32), (D // 2, 2)))
    wk_e, wk_o = tl.split(tl.reshape(tl.load(Wk + d).to(tl.float32), (D // 2, 2)))
    if HAS_PE:
        table = PE + b * s_pb + n64[:, None] * s_pn + half[None, :] * s_pi
        f00 = tl.load(table, mask=nm[:, None], other=0.0).to(tl.float32)
        f01 = tl.load(table + s_pc, mask=nm[:, None], other=0.0).to(tl.float32)
        f10 = tl.load(table + s_pr, mask=nm[:, None], other=0.0).to(tl.float32)
        f11 = tl.load(table + s_pr + s_pc, mask=nm[:, None], other=0.0).to(tl.float32)
    width = heads * D
    for h in range(heads):
        for part in tl.static_range(2):
            src = QKV + b * s_b + n64[:, None] * s_n + (part * width + h * D) + d[None, :]
            x = tl.load(src, mask=nm[:, None], other=0.0).to(tl.float32)
            mean_square = tl.sum(x * x, 1) / D
            if part == 0:
                e, o = tl.split(tl.reshape(x * tl.math.rsqrt(mean_square + q_eps)[:, None], (BLOCK_N, D // 2, 2)))
                e = e * wq_e[None, :]
                o = o * wq_o[None, :]
            else:
                e, o = tl.split(tl.reshape(x * tl.math.rsqrt(mean_square + k_eps)[:, None], (BLOCK_N, D // 2, 2)))
                e = e * wk_e[None, :]
                o = o * wk_o[None, :]
            e = e.to(Q.dtype.element_ty).to(tl.float32)
            o = o.to(Q.dtype.element_ty).to(tl.float32)
            if HAS_PE:
                re = f00 * e + f01 * o
                ro = f10 * e + f11 * o
            else:
                re = e
                ro = o
            y = tl.reshape(tl.join(re, ro), (BLOCK_N, D)).to(Q.dtype.element_ty)
            if part == 0:
                tl.store(Q + b * s_qb + h * s_qh + n64[:, None] * s_qn + d[None, :], y, mask=nm[:, None])
            else:
                tl.store(K + b * s_kb + h * s_kh + n64[:, None] * s_kn + d[None, :], y, mask=nm[:, None])
        if COPY_V:  # the values, unchanged, into their own view (e.g. rows of a joint sequence)
            values = tl.load(QKV + b * s_b + n64[:, None] * s_n + (2 * width + h * D) + d[None, :], mask=nm[:, None])
            tl.store(V + b * s_vb + h * s_vh + n64[:, None] * s_vn + d[None, :], values.to(V.dtype.element_ty),
                     mask=nm[:, None])


def qk_norm_rope_triton(qkv, heads, q_weight, k_weight, q_eps, k_eps, pe, out=None):
    batch, n_tokens, columns = qkv.shape
    head_dim = q_weight.shape[0]
    copy_v = out is not None and len(out) == 3
    problem = None
    if out is not None and any(t.shape != (batch, heads, n_tokens, head_dim) or t.stride(-1) != 1 for t in out):
        problem = "output views of another shape, or strided in the head dim"
    if head_dim not in (64, 128) or k_weight.shape != q_weight.shape or columns < (3 if copy_v else 2) * heads * head_dim:
        problem = f"head dim {head_dim}, projection width {columns}"
    elif qkv.stride(-1) != 1:
        problem = "the projection's last dimension is strided"
    elif pe is not None and (pe.dim() != 6 or pe.shape[0] not in (1, batch) or pe.shape[2] < n_tokens
                             or tuple(pe.shape[3:]) != (head_dim // 2, 2, 2)):
        problem = f"rotary table {tuple(pe.shape)}"
    if problem is not None:
        note_fallback("qk_norm_rope", problem)
        return qk_norm_rope_reference(qkv, heads, q_weight, k_weight, q_eps, k_eps, pe, out)
    if out is None:
        q = torch.empty((batch, heads, n_tokens, head_dim), dtype=qkv.dtype, device=qkv.device)
        k = torch.empty_like(q)
    else:
        q, k = out[:2]
    v = out[2] if copy_v else q  # never written without COPY_V
    weights = [w.to(device=qkv.device, dtype=qkv.dtype).contiguous() for w in (q_weight, k_weight)]
    if pe is None:
        pe_args, table = (0, 0, 0, 0, 0), q
    else:
        table = pe
        pe_args = ((pe.stride(0) if pe.shape[0] == batch and batch > 1 else 0), pe.stride(2), pe.stride(3),
                   pe.stride(4), pe.stride(5))
    block_n = 16
    _qk_norm_rope_kernel[(triton.cdiv(n_tokens, block_n), batch)](
        qkv, *weights, table, q, k, v, n_tokens, heads, float(q_eps), float(k_eps),
        qkv.stride(0), qkv.stride(1), *pe_args, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        D=head_dim, BLOCK_N=block_n, HAS_PE=pe is not None, COPY_V=copy_v, num_warps=4)
    return (q, k) if out is None else out


@triton.jit
def _gated_residual_kernel(X, Gate, A, Bt, Out, n_rows, n_tokens, C,
                           s_xb, s_xn, s_gb, s_gc, s_ab, s_an, s_bb, s_bn, s_ob, s_on,
                           BLOCK_C: tl.constexpr, ROWS: tl.constexpr, HAS_B: tl.constexpr):
    c = tl.arange(0, BLOCK_C)
    cm = c < C
    for r in range(ROWS):
        row = tl.program_id(0) * ROWS + r
        if row < n_rows:
            b, n = _batch_and_token(row, n_tokens)
            total = tl.load(A + b * s_ab + n * s_an + c, mask=cm, other=0.0).to(tl.float32)
            if HAS_B:
                total += tl.load(Bt + b * s_bb + n * s_bn + c, mask=cm, other=0.0).to(tl.float32)
                total = total.to(X.dtype.element_ty).to(tl.float32)
            gate = tl.load(Gate + b * s_gb + c * s_gc, mask=cm, other=0.0).to(tl.float32)
            step = (total * gate).to(X.dtype.element_ty).to(tl.float32)
            x = tl.load(X + b * s_xb + n * s_xn + c, mask=cm, other=0.0).to(tl.float32)
            tl.store(Out + b * s_ob + n * s_on + c, (x + step).to(X.dtype.element_ty), mask=cm)


def gated_residual_triton_(x, gate, a, b=None, out=None):
    batch, n_tokens, channels = x.shape
    s_gate = _vector_strides(gate, batch, channels)
    same = all(t is None or (t.shape == x.shape and t.stride(-1) == 1) for t in (a, b, out))
    if channels > MAX_WIDTH or s_gate is None or not same or x.stride(-1) != 1:
        note_fallback("gated_residual", f"x {tuple(x.shape)}, gate {tuple(gate.shape)}")
        return gated_residual_reference_(x, gate, a, b, out)
    out = x if out is None else out
    rows, per_program = batch * n_tokens, 2
    block_c = triton.next_power_of_2(channels)
    other = b if b is not None else a
    _gated_residual_kernel[(triton.cdiv(rows, per_program),)](
        x, gate, a, other, out, rows, n_tokens, channels, x.stride(0), x.stride(1), *s_gate,
        a.stride(0), a.stride(1), other.stride(0), other.stride(1), out.stride(0), out.stride(1),
        BLOCK_C=block_c, ROWS=per_program, HAS_B=b is not None, num_warps=8 if block_c >= 4096 else 4)
    return out
