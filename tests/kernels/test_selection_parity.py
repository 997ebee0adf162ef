"""Triton == PyTorch reference for the kernels of the selecting and ranking steps, on the CPU
through Triton's interpreter: index lists (bit for bit), the MLP's unit ranking with its block-mean
refresh (bit for bit), block means, key scores from sampled queries, and the MLP update with the
hidden cache in block order and a result copy.

Rows are few (the selection kernel makes ~70 counting passes per row; the interpreter runs each
as numpy code).
"""

from __future__ import annotations

import math

import pytest
import torch

from chipmunk_pack.kernels.attention_reference import sampled_column_sums_reference
from chipmunk_pack.kernels.index_lists import build_index_lists_reference, rank_units_reference
from chipmunk_pack.kernels.mlp_reference import block_means_reference, sparse_mlp_delta_reference

from test_triton_parity import assert_matches, mlp_inputs

INDEX_CASES = [
    # scores shape, keep, random, pad, forced, ties, kernel configuration
    ((1, 2, 2, 100), 20, 6, 8, "per_group", False, None),  # attention: per-group forced keys (some past C), random
    ((2, 1, 2, 70), 16, 4, 16, "shared", True, None),      # batch 2, shared forced keys, many tied scores
    ((1, 3, 150), 40, 0, 8, None, False, None),            # signed scores, no forced, no random
    ((1, 2, 40), 8, 0, 8, "wide", False, None),            # more forced columns than the budget
    # rows longer than a block: read chunk by chunk in every pass (what video lengths take)
    ((1, 1, 2, 150), 30, 5, 8, "per_group", True, {"in_registers": False, "block_c": 64}),
]


def _forced(kind, rows, n_cols):
    if kind == "per_group":
        return torch.tensor([[3, 97, 120, -1], [0, 1, 2, 50]])[:rows]
    if kind == "shared":
        return torch.tensor([0, 1, 69])
    if kind == "wide":
        return torch.arange(20)
    return None


@pytest.mark.parametrize("case", INDEX_CASES,
                         ids=lambda c: f"{c[0]}-keep{c[1]}-rand{c[2]}-{c[4]}-ties{c[5]}-{'chunks' if c[6] else 'regs'}")
def test_index_lists_match_bit_for_bit(interpreted, case):
    shape, keep, n_random, pad, forced_kind, ties, config = case
    gen = torch.Generator().manual_seed(sum(shape) + keep)
    scores = torch.randn(*shape, generator=gen)
    if ties:
        scores = (scores * 2).round().abs()
    forced = _forced(forced_kind, shape[-2], shape[-1])
    seeds = torch.tensor([5, -6], dtype=torch.int64)[: shape[0] if len(shape) >= 3 else 1]
    expected = build_index_lists_reference(scores, keep, n_random, forced, seeds, pad)
    kernel = interpreted["index_lists_triton"]
    buffers = (torch.full_like(expected[0], -9), torch.full_like(expected[1], -9))
    got = kernel.build_index_lists_triton(scores, keep, n_random, forced, seeds, pad, out=buffers, config=config)
    assert got[0] is buffers[0]
    assert torch.equal(got[1], expected[1]), "counts"
    assert torch.equal(got[0], expected[0]), "indices"


def test_unit_ranking_and_block_mean_refresh_match_bit_for_bit(interpreted):
    gen = torch.Generator().manual_seed(31)
    current = torch.randn(2, 1, 96, generator=gen).bfloat16()
    mean = torch.randn(2, 1, 96, generator=gen)
    mean[1, 0] = current[1, 0].float()  # a block that did not change: every score ties at zero
    seeds = torch.tensor([3, 4], dtype=torch.int64)
    ref_mean, kernel_mean = mean.clone(), mean.clone()
    expected = rank_units_reference(current, ref_mean, 30, 5, seeds, 8)
    got = interpreted["index_lists_triton"].rank_units_triton(current, kernel_mean, 30, 5, seeds, 8)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(kernel_mean, ref_mean)


@pytest.mark.parametrize("dtype, order", [(torch.bfloat16, True), (torch.float32, False)])
def test_block_means_match(interpreted, dtype, order):
    gen = torch.Generator().manual_seed(32)
    t = torch.randn(2, 150, 200, generator=gen).to(dtype)
    row_order = torch.randperm(150, generator=gen).int() if order else None
    expected = block_means_reference(t, row_order, 64)
    out = torch.full((2, 3, 200), float("nan"), dtype=torch.bfloat16 if order else torch.float32)
    got = interpreted["mlp_triton"].block_means_triton(t, row_order, 64, out=out)
    assert got is out
    assert_matches(got, expected, torch.bfloat16 if order else torch.float16, "block means")


@pytest.mark.parametrize("n, group, samples, d", [(200, 64, 16, 64), (300, 192, 32, 128), (100, 48, 4, 64)])
def test_sampled_column_sums_match(interpreted, n, group, samples, d):
    gen = torch.Generator().manual_seed(n + samples)
    q, k = (torch.randn(1, n, 2, d, generator=gen).bfloat16().transpose(1, 2) for _ in range(2))
    k = k[:, :, : n - 7]  # fewer keys than queries (key padding)
    order = torch.randperm(n, generator=gen).int()
    expected = sampled_column_sums_reference(q, k, order, group, samples)
    got = interpreted["attention_triton"].sampled_column_sums_triton(q, k, order, group, samples)
    assert got.shape == (1, 2, math.ceil(n / group), n - 7)
    assert_matches(got, expected, torch.bfloat16, "sampled column sums")


def test_sparse_mlp_delta_with_hidden_in_block_order_and_result(interpreted):
    b, n, d_in, m, d_out, block, capacity, dtype = 2, 150, 64, 160, 64, 64, 90, torch.bfloat16
    gen = torch.Generator().manual_seed(33)
    x, w1, b1, w2, units = mlp_inputs(gen, b, n, d_in, m, d_out, block, capacity, dtype)
    n_blocks = units.shape[1]
    counts = torch.randint(1, capacity + 1, (b, n_blocks), generator=gen).int()
    counts[0, 1] = 0  # its rows still reach the result
    order = torch.randperm(n, generator=gen).int()
    hidden = torch.randn(b, m, n, generator=gen).to(dtype).transpose(1, 2)  # unit-major, block order
    out = torch.randn(b, n, d_out, generator=gen).to(dtype)
    ref_hidden, ref_out = hidden.float(), out.float()
    sparse_mlp_delta_reference(x, w1, b1, w2, units, counts, order, block, ref_hidden, ref_out,
                               hidden_in_block_order=True)
    kernel_hidden, kernel_out = hidden.clone(), out.clone()
    result = torch.full_like(out, float("nan"))
    interpreted["mlp_triton"].sparse_mlp_delta_triton(
        x, w1, b1, w2.t().contiguous().t(), units, counts, order, block, kernel_hidden, kernel_out,
        hidden_in_block_order=True, result=result)
    assert_matches(kernel_hidden, ref_hidden, dtype, "hidden cache")
    assert_matches(kernel_out.float() - out.float(), ref_out - out.float(), dtype, "output update")
    assert torch.equal(result, kernel_out)
