"""The PyTorch references against plain dense math, and the index-list builder's contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from chipmunk_pack.kernels import build_index_lists, selection_size
from chipmunk_pack.kernels.attention_reference import attention_with_column_sums_reference, column_sparse_attention_reference
from chipmunk_pack.kernels.mlp_reference import sparse_mlp_delta_reference


def dense_attention(q, k, v):
    scores = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    return torch.softmax(scores, -1) @ v.double(), torch.logsumexp(scores, -1), torch.softmax(scores, -1)


@pytest.mark.parametrize("n_tokens, group_size", [(100, 32), (96, 32), (7, 16)])
def test_keep_all_selection_is_dense_attention(n_tokens, group_size):
    gen = torch.Generator().manual_seed(n_tokens)
    b, h, d = 2, 3, 16
    q, k, v = (torch.randn(b, h, n_tokens, d, generator=gen) for _ in range(3))
    order = torch.randperm(n_tokens, generator=gen).int()
    n_groups = math.ceil(n_tokens / group_size)
    indices = torch.arange(n_tokens, dtype=torch.int32).expand(b, h, n_groups, n_tokens).contiguous()
    counts = torch.full((b, h, n_groups), n_tokens, dtype=torch.int32)
    expected, _, _ = dense_attention(q, k, v)

    out = torch.full_like(q, float("nan"))
    column_sparse_attention_reference(q, k, v, indices, counts, order, group_size, None, out, 1.0)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)

    base = torch.randn(b, h, n_tokens, d, generator=gen)
    cache = torch.full_like(q, float("nan"))
    column_sparse_attention_reference(q, k, v, indices, counts, order, group_size, base, cache, -1.0)
    torch.testing.assert_close(cache.double(), base.double() - expected, rtol=1e-5, atol=1e-5)


def test_empty_selection_leaves_the_base():
    gen = torch.Generator().manual_seed(1)
    q, k, v, base = (torch.randn(1, 2, 40, 8, generator=gen) for _ in range(4))
    indices = torch.zeros(1, 2, 2, 5, dtype=torch.int32)
    counts = torch.zeros(1, 2, 2, dtype=torch.int32)
    out = column_sparse_attention_reference(q, k, v, indices, counts, torch.arange(40).int(), 32, base,
                                            torch.empty_like(q), 1.0)
    torch.testing.assert_close(out, base)


def test_selection_is_softmax_over_the_listed_keys_only():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 48, 8, generator=gen) for _ in range(3))
    keys = torch.tensor([3, 10, 11, 40])
    indices = torch.cat([keys, torch.tensor([0, 0])]).int().view(1, 1, 1, 6)  # padding past the count
    out = column_sparse_attention_reference(q, k, v, indices, torch.tensor([[[4]]]).int(), torch.arange(48).int(),
                                            48, None, torch.empty_like(q), 1.0)
    expected, _, _ = dense_attention(q, k[:, :, keys], v[:, :, keys])
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_hint", [False, True])
def test_column_sums_reference_is_dense_math(with_hint):
    gen = torch.Generator().manual_seed(3)
    b, h, n, d, group = 1, 2, 70, 16, 32
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    order = torch.randperm(n, generator=gen).int()
    expected_out, expected_lse, _ = dense_attention(q, k, v)
    hint = expected_lse.float() + 0.3 * torch.randn(b, h, n, generator=gen) if with_hint else None
    out = torch.full_like(q, float("nan"))
    sums, lse = attention_with_column_sums_reference(q, k, v, order, group, out, hint)
    torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-5, atol=1e-5)
    scores = q.double() @ k.double().transpose(-1, -2) * d ** -0.5
    norm = expected_lse if hint is None else hint.double()
    probs = torch.exp(scores - norm[..., None])
    for g in range(math.ceil(n / group)):
        rows = order[g * group:(g + 1) * group].long()
        torch.testing.assert_close(sums[:, :, g].double(), probs[:, :, rows].sum(2), rtol=1e-5, atol=1e-5)
    if hint is None:  # each row's probabilities sum to one
        sizes = torch.tensor([min(group, n - g * group) for g in range(math.ceil(n / group))], dtype=torch.float64)
        torch.testing.assert_close(sums.double().sum(-1), sizes.expand(b, h, -1), rtol=1e-5, atol=1e-5)


def _dense_mlp(x, w1, b1, w2):
    hidden = F.gelu(x.double() @ w1.double().T + b1.double(), approximate="tanh")
    return hidden, hidden @ w2.double().T


@pytest.mark.parametrize("block_size, row_order", [(16, "random"), (24, None)])
def test_keep_all_mlp_update_is_dense_mlp(block_size, row_order):
    gen = torch.Generator().manual_seed(4)
    b, n, d_in, m, d_out = 2, 50, 12, 40, 10
    x = torch.randn(b, n, d_in, generator=gen, dtype=torch.float64)
    w1, b1, w2 = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((m, d_in), (m,), (d_out, m)))
    old_hidden = torch.randn(b, n, m, generator=gen, dtype=torch.float64)
    hidden_cache = old_hidden.clone()
    out_cache = old_hidden @ w2.T  # consistent caches, as a dense step leaves them
    n_blocks = math.ceil(n / block_size)
    units = torch.arange(m, dtype=torch.int32).expand(b, n_blocks, m).contiguous()
    counts = torch.full((b, n_blocks), m, dtype=torch.int32)
    order = torch.randperm(n, generator=gen).int() if row_order else None
    sparse_mlp_delta_reference(x, w1, b1, w2, units, counts, order, block_size, hidden_cache, out_cache)
    expected_hidden, expected_out = _dense_mlp(x, w1, b1, w2)
    torch.testing.assert_close(hidden_cache, expected_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_cache, expected_out, rtol=1e-5, atol=1e-5)


def test_partial_mlp_update_touches_only_the_listed_units():
    gen = torch.Generator().manual_seed(5)
    b, n, d_in, m, d_out, block = 1, 32, 8, 20, 6, 16
    x = torch.randn(b, n, d_in, generator=gen, dtype=torch.float64)
    w1, w2 = torch.randn(m, d_in, generator=gen, dtype=torch.float64), torch.randn(d_out, m, generator=gen,
                                                                                  dtype=torch.float64)
    hidden_cache = torch.randn(b, n, m, generator=gen, dtype=torch.float64)
    before = hidden_cache.clone()
    out_cache = hidden_cache @ w2.T
    units = torch.tensor([[[1, 5, 7, 99], [2, 3, 0, 0]]], dtype=torch.int32)  # entries past the count ignored
    counts = torch.tensor([[3, 0]], dtype=torch.int32)
    sparse_mlp_delta_reference(x, w1, None, w2, units, counts, None, block, hidden_cache, out_cache)
    changed = (hidden_cache != before).any(1)[0]
    assert changed.nonzero().flatten().tolist() == [1, 5, 7]
    assert torch.equal(hidden_cache[:, 16:], before[:, 16:])
    torch.testing.assert_close(out_cache, hidden_cache @ w2.T, rtol=1e-5, atol=1e-5)


class TestBuildIndexLists:
    def test_counts_sorted_and_top_scores(self):
        gen = torch.Generator().manual_seed(6)
        scores = torch.rand(2, 3, 5, 300, generator=gen)
        indices, counts = build_index_lists(scores, keep_count=70, pad_to=64)
        assert indices.dtype == torch.int32 and counts.dtype == torch.int32
        assert counts.shape == (2, 3, 5) and (counts == selection_size(300, 70, 64)).all() and counts[0, 0, 0] == 128
        assert (indices[..., 1:] > indices[..., :-1]).all()  # strictly ascending within the count
        expected = torch.topk(scores, 128, dim=-1).indices.sort(-1).values
        assert torch.equal(indices.long(), expected)

    def test_forced_columns_are_kept(self):
        gen = torch.Generator().manual_seed(7)
        scores = torch.rand(4, 200, generator=gen)
        forced = torch.tensor([199, 0, 57, -1])
        scores[:, forced[:3]] = -1.0  # the worst scores: kept only because they are forced
        indices, counts = build_index_lists(scores, keep_count=64, forced=forced, pad_to=64)
        for row in range(4):
            kept = indices[row, :counts[row]].tolist()
            assert {0, 57, 199} <= set(kept)

    def test_more_forced_columns_than_the_budget(self):
        scores = torch.rand(2, 100)
        forced = torch.arange(80).expand(2, -1)
        indices, counts = build_index_lists(scores, keep_count=16, forced=forced, pad_to=16)
        assert (counts == 80).all()
        assert torch.equal(indices[:, :80].long(), forced)

    def test_random_columns_are_deterministic_with_a_seeded_generator(self):
        scores = torch.rand(3, 6, 500, generator=torch.Generator().manual_seed(8))

        def build():
            return build_index_lists(scores, keep_count=64, random_count=10, generator=torch.Generator().manual_seed(9))

        first, second = build(), build()
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
        top = torch.topk(scores, 54, dim=-1).indices
        kept = first[0][..., :64]
        for row in range(6):
            assert set(top[0, row].tolist()) <= set(kept[0, row].tolist())  # 54 best + 10 random
        other = build_index_lists(scores, keep_count=64, random_count=10, generator=torch.Generator().manual_seed(10))
        assert not torch.equal(first[0], other[0])

    def test_keep_more_than_exists(self):
        indices, counts = build_index_lists(torch.rand(2, 30), keep_count=1000, pad_to=64)
        assert (counts == 30).all() and torch.equal(indices.long(), torch.arange(30).expand(2, -1))
