"""The PyTorch references against plain dense math, and the index-list builder's contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from chipmunk_pack.kernels import build_index_lists, forced_columns, selection_size
from chipmunk_pack.kernels.attention_reference import (attention_with_column_sums_reference,
                                                       column_sparse_attention_reference, sampled_column_sums_reference)
from chipmunk_pack.kernels.index_lists import column_noise, hash32, rank_units_reference
from chipmunk_pack.kernels.mlp_reference import block_means_reference, sparse_mlp_delta_reference


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
        assert indices.dtype == torch.int16 and counts.dtype == torch.int16  # the narrowest that holds 300 columns
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

    def test_random_columns_come_from_the_row_seeds(self):
        scores = torch.rand(3, 6, 500, generator=torch.Generator().manual_seed(8))
        seeds = torch.tensor([9, -2, 2 ** 62], dtype=torch.int64)

        def build(row_seeds, rows=scores):
            return build_index_lists(rows, keep_count=64, random_count=10, row_seeds=row_seeds)

        first, second = build(seeds), build(seeds.clone())
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
        top = torch.topk(scores, 54, dim=-1).indices
        for b in range(3):
            for row in range(6):
                assert set(top[b, row].tolist()) <= set(first[0][b, row].tolist())  # 54 best + 10 random
        other = build(torch.tensor([10, -2, 2 ** 62]))
        assert not torch.equal(first[0][0], other[0][0]) and torch.equal(first[0][1:], other[0][1:])
        # a batch row's lists depend on its own seed and scores only
        alone = build(seeds[1:2], scores[1:2])
        assert torch.equal(alone[0][0], first[0][1])
        with pytest.raises(ValueError, match="row_seeds"):
            build(None)

    def test_ties_go_to_the_lower_column(self):
        scores = torch.zeros(2, 40)
        scores[:, 30:] = 1.0
        indices, counts = build_index_lists(scores, keep_count=16, pad_to=16)
        assert indices[0].tolist() == list(range(6)) + list(range(30, 40))

    def test_forced_keys_past_the_columns_are_dropped(self):
        """Text keys cut off by a padding mask: the forced list still names them."""
        scores = torch.rand(3, 50)
        forced = torch.tensor([[1, 48, 60, -1], [2, 3, 70, 71], [-1, -1, -1, -1]])
        indices, counts = build_index_lists(scores, keep_count=8, forced=forced, pad_to=8)
        assert counts.tolist() == [8, 8, 8] and indices.shape == (3, 8)  # width: the forced lists' width
        assert {1, 48} <= set(indices[0].tolist()) and {2, 3} <= set(indices[1].tolist())
        assert 60 not in indices.tolist()

    def test_forced_columns_object_equals_index_lists(self):
        scores = torch.rand(2, 4, 90)
        forced = torch.tensor([[5, 6, -1], [7, -1, -1], [80, 81, 82], [-1, -1, -1]])
        expected = build_index_lists(scores, keep_count=20, forced=forced, pad_to=8)
        got = build_index_lists(scores, keep_count=20, forced=forced_columns(forced, 90), pad_to=8)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])

    def test_into_given_buffers(self):
        scores = torch.rand(2, 3, 60)
        indices, counts = torch.full((2, 3, 16), -7, dtype=torch.int32), torch.empty(2, 3, dtype=torch.int32)
        result = build_index_lists(scores, keep_count=10, pad_to=16, out=(indices, counts))
        assert result[0] is indices and result[1] is counts
        assert torch.equal(indices, build_index_lists(scores, keep_count=10, pad_to=16)[0])

    def test_integer_width_follows_the_column_count(self):
        from chipmunk_pack.kernels import index_dtype

        assert index_dtype(4608) == index_dtype(12288) == index_dtype(32767) == torch.int16  # FLUX keys and units
        assert index_dtype(32768) == index_dtype(75600) == torch.int32  # WAN 720p
        indices, counts = build_index_lists(torch.rand(1, 2, 40000), keep_count=3000, pad_to=64)
        assert indices.dtype == counts.dtype == torch.int32 and int(indices.max()) > 32767
        with pytest.raises(ValueError, match="int32"):
            build_index_lists(torch.rand(1, 2, 40000), keep_count=64, pad_to=64,
                              out=(torch.empty(1, 2, 64, dtype=torch.int16), torch.empty(1, 2, dtype=torch.int16)))

    def test_paged_lists_hold_two_pages_in_16_bits(self):
        """Past int16's range, attention lists stay 16-bit: ids modulo 2**16, and the int32 count
        says, above its low 16 bits, where the second page starts. WAN 720p (75,600 keys) and
        HunyuanVideo 720p (119,056) take that form; past 131,072 keys, int32."""
        from chipmunk_pack.kernels import index_lists

        assert index_lists.list_dtypes(75600, 8384, paged=True) == (torch.int16, torch.int32)
        assert index_lists.list_dtypes(119056, 7168, paged=True) == (torch.int16, torch.int32)
        assert index_lists.list_dtypes(4608, 768, paged=True) == (torch.int16, torch.int16)  # one page: int16
        assert index_lists.list_dtypes(140000, 8384, paged=True) == (torch.int32, torch.int32)
        assert index_lists.list_dtypes(75600, 8384) == (torch.int32, torch.int32)  # a reader of plain lists only
        ids = torch.tensor([[3, 40000, 65535, 65536, 70001, 131071, 0, 0]])
        counts = torch.tensor([6])
        stored, packed = index_lists.page_lists(ids, counts)
        assert stored.dtype == torch.int16 and packed.dtype == torch.int32
        assert int(packed) & 0xFFFF == 6 and (int(packed) >> 16) & 0xFFFF == 3  # three ids in the first page
        back, n = index_lists.read_lists(stored, packed)
        assert torch.equal(back[:, :6], ids[:, :6]) and int(n) == 6
        scores = torch.rand(2, 3, 70000, generator=torch.Generator().manual_seed(1))
        paged = build_index_lists(scores, keep_count=3000, pad_to=64, paged=True)
        plain = build_index_lists(scores, keep_count=3000, pad_to=64)
        assert (paged[0].dtype, paged[1].dtype) == (torch.int16, torch.int32) and plain[0].dtype == torch.int32
        back, n = index_lists.read_lists(*paged)
        assert torch.equal(back, plain[0].long()) and torch.equal(n, plain[1].long())
        with pytest.raises(ValueError, match="buffers given"):  # plain buffers for paged lists
            build_index_lists(scores, keep_count=3000, pad_to=64, paged=True, out=plain)
        into = build_index_lists(scores, keep_count=3000, pad_to=64, paged=True,
                                 out=(torch.empty_like(paged[0]), torch.empty_like(paged[1])))
        assert torch.equal(into[0], paged[0]) and torch.equal(into[1], paged[1])

    def test_keep_more_than_exists(self):
        indices, counts = build_index_lists(torch.rand(2, 30), keep_count=1000, pad_to=64)
        assert (counts == 30).all() and torch.equal(indices.long(), torch.arange(30).expand(2, -1))


def test_hash_is_a_pinned_bijection_without_overflow():
    values = torch.tensor([0, 1, 2, 0xFFFFFFFF, 0x80000000], dtype=torch.int64)
    # pinned: the random columns of a seed must not change between versions of the pack
    assert hash32(values).tolist() == PINNED_HASHES
    sample = torch.randint(0, 2 ** 32, (20000,), generator=torch.Generator().manual_seed(1), dtype=torch.int64)
    mixed = hash32(sample.unique())
    assert mixed.unique().numel() == sample.unique().numel() and (mixed >= 0).all() and (mixed < 2 ** 32).all()
    noise = column_noise(torch.tensor([-1, 2 ** 63 - 1]), 3, 1000)
    assert noise.shape == (2, 3, 1000) and (noise >= 0).all() and (noise < 2 ** 32).all()
    assert 0.45 < (noise < 2 ** 31).double().mean() < 0.55  # no visible bias


PINNED_HASHES = [0, 1753845952, 3507691905, 1734902346, 3427483940]


def test_block_means_reference():
    t = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    order = torch.tensor([4, 0, 3, 1, 2], dtype=torch.int32)
    means = block_means_reference(t, order, 2)
    assert means.shape == (2, 3, 3)
    torch.testing.assert_close(means[1, 0], (t[1, 4] + t[1, 0]) / 2)
    torch.testing.assert_close(means[0, 2], t[0, 2])  # a short last block
    out = torch.empty(2, 3, 3, dtype=torch.float64)
    assert block_means_reference(t, None, 2, out) is out and torch.allclose(out[0, 0], (t[0, 0] + t[0, 1]).double() / 2)


def test_rank_units_refreshes_the_means_of_the_chosen_units_only():
    gen = torch.Generator().manual_seed(12)
    current = torch.randn(2, 3, 40, generator=gen)
    mean = torch.randn(2, 3, 40, generator=gen)
    before = mean.clone()
    indices, counts = rank_units_reference(current, mean, keep_count=10, random_count=2,
                                           row_seeds=torch.tensor([1, 2]), pad_to=8)
    assert (counts == 16).all()
    chosen = torch.zeros(2, 3, 40, dtype=torch.bool).scatter_(-1, indices.long(), True)
    assert torch.equal(mean[chosen], current[chosen]) and torch.equal(mean[~chosen], before[~chosen])
    top = torch.topk((current - before).abs(), 14, dim=-1).indices  # 16 kept: 2 random + 14 best
    assert chosen.gather(-1, top).all()


@pytest.mark.parametrize("samples", [32, 8, 3])
def test_sampled_column_sums_reference(samples):
    gen = torch.Generator().manual_seed(13)
    b, h, n, d, group = 1, 2, 75, 16, 32
    q, k = (torch.randn(b, h, n, d, generator=gen) for _ in range(2))
    order = torch.randperm(n, generator=gen).int()
    sums = sampled_column_sums_reference(q, k, order, group, samples)
    scores = q.double() @ k.double().transpose(-1, -2) * d ** -0.5
    probs = torch.softmax(scores, -1)
    stride = group // samples
    for g in range(math.ceil(n / group)):
        pos = [g * group + j * stride for j in range(samples) if g * group + j * stride < n]
        rows = order[torch.tensor(pos)].long()
        torch.testing.assert_close(sums[:, :, g].double(), probs[:, :, rows].sum(2), rtol=1e-5, atol=1e-5)
    if samples == group:  # every query samples: the exact column sums
        exact, _ = attention_with_column_sums_reference(q, k, k, order, group, torch.empty_like(q))
        torch.testing.assert_close(sums, exact, rtol=1e-5, atol=1e-5)


def test_mlp_update_with_the_hidden_cache_in_block_order_and_a_result_copy():
    gen = torch.Generator().manual_seed(14)
    b, n, d_in, m, d_out, block = 2, 30, 8, 20, 6, 16
    x = torch.randn(b, n, d_in, generator=gen, dtype=torch.float64)
    w1, w2 = torch.randn(m, d_in, generator=gen, dtype=torch.float64), torch.randn(d_out, m, generator=gen,
                                                                                  dtype=torch.float64)
    order = torch.randperm(n, generator=gen).int()
    hidden = torch.randn(b, n, m, generator=gen, dtype=torch.float64)
    out = hidden @ w2.T
    units = torch.tensor([[[1, 5, 7], [2, 3, 0]]] * b, dtype=torch.int32)
    counts = torch.tensor([[3, 0]] * b, dtype=torch.int32)
    token_hidden, token_out = hidden.clone(), out.clone()
    sparse_mlp_delta_reference(x, w1, None, w2, units, counts, order, block, token_hidden, token_out)
    block_hidden, block_out = hidden[:, order.long()].clone(), out.clone()
    result = torch.full_like(out, float("nan"))
    sparse_mlp_delta_reference(x, w1, None, w2, units, counts, order, block, block_hidden, block_out,
                               hidden_in_block_order=True, result=result)
    assert torch.equal(block_hidden, token_hidden[:, order.long()]) and torch.equal(block_out, token_out)
    assert torch.equal(result, block_out)  # every row, also those of the block with an empty list
