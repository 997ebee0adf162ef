"""The sparse-delta logic of the core against plain dense math (PyTorch reference kernels, CPU)."""

import math

import pytest
import torch
import torch.nn.functional as F

from chipmunk_pack.chipmunk_core.attention import SparseDeltaAttention
from chipmunk_pack.chipmunk_core.config import resolve_config
from chipmunk_pack.chipmunk_core.layout import joint_layout
from chipmunk_pack.chipmunk_core.mlp import SparseDeltaMLP, block_means
from chipmunk_pack.chipmunk_core.schedule import DenseSchedule, step_index


def _qkv(batch, heads, n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, dim, generator=g) for _ in range(3)]


def _restricted(q, k, v, keys):
    """Attention of every query over the key set ``keys`` (one list per token), plain math."""
    scale = q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for t, cols in enumerate(keys):
        s = (q[..., t:t + 1, :] @ k[..., cols, :].transpose(-1, -2)) * scale
        out[..., t:t + 1, :] = torch.softmax(s, -1) @ v[..., cols, :]
    return out


@pytest.mark.parametrize("n_text,grid,batch", [(5, (6, 9), 1), (0, (7, 7), 2)])
def test_attention_dense_step_is_exact_and_sparse_step_is_cache_plus_restricted(n_text, grid, batch):
    config = resolve_config("flux", attention_sparsity=0.6, query_group=16, selection_tile=16)
    heads, dim = 2, 32
    n = math.prod(grid) + n_text
    layout = joint_layout(n_text, grid, math.prod(grid), True, config.query_group, "cpu")
    q, k, v = _qkv(batch, heads, n, dim, 0)
    state = SparseDeltaAttention()
    out = state.dense_step(q, k, v, layout, config, torch.Generator().manual_seed(1))
    dense = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out.view(batch, n, heads, dim).transpose(1, 2), dense, atol=1e-5, rtol=1e-5)
    # Every group keeps the text keys and the planned number of keys.
    kept = state.counts
    assert (kept >= min(n, round(0.4 * n))).all() and (kept <= n).all()
    for b in range(batch):
        for h in range(heads):
            for g in range(state.indices.shape[2]):
                cols = state.indices[b, h, g, : kept[b, h, g]]
                assert set(range(n_text)) <= set(cols.tolist())
                assert torch.equal(cols, torch.sort(cols).values)
    # Right after the dense step, a sparse step on the same inputs reproduces dense attention.
    again = state.sparse_step(q, k, v, layout, config)
    torch.testing.assert_close(again, out, atol=1e-5, rtol=1e-5)
    # On new inputs: cache + attention restricted to each group's keys (softmax over them only).
    q2, k2, v2 = _qkv(batch, heads, n, dim, 7)
    sparse = state.sparse_step(q2, k2, v2, layout, config).view(batch, n, heads, dim).transpose(1, 2)
    group_of = torch.empty(n, dtype=torch.long)
    group_of[layout.query_order.long()] = torch.arange(n) // config.query_group
    for b in range(batch):
        for h in range(heads):
            keys = [state.indices[b, h, group_of[t], : kept[b, h, group_of[t]]].long() for t in range(n)]
            cache = dense[b, h] - _restricted(q[b, h], k[b, h], v[b, h], keys)
            expected = cache + _restricted(q2[b, h], k2[b, h], v2[b, h], keys)
            torch.testing.assert_close(sparse[b, h], expected, atol=1e-5, rtol=1e-5)


def _mlp(din, hidden, dout, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(hidden, din, generator=g) / din ** 0.5, torch.randn(hidden, generator=g),
            torch.randn(dout, hidden, generator=g) / hidden ** 0.5, torch.randn(dout, generator=g))


def _primed_mlp(x, w1, b1, w2, b2, order, config):
    """A sparse-delta MLP state after one dense step on ``x``; also returns that step's output."""
    state = SparseDeltaMLP()
    y = F.linear(state.dense_step(x, F.linear(x, w1, b1), order, config), w2, b2)
    state.store_output(y)
    return state, y


def test_mlp_delta_is_exact_for_recomputed_units_and_keeps_the_cache_consistent():
    config = resolve_config("flux", mlp_sparsity=0.5, mlp_random_fraction=0.1, mlp_block=16, selection_tile=8,
                            mlp_selection_interval=1)
    batch, n, din, hidden, dout = 2, 40, 24, 64, 24
    w1, b1, w2, b2 = _mlp(din, hidden, dout, 0)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(3)).to(torch.int32)
    x = torch.randn(batch, n, din)
    state, y = _primed_mlp(x, w1, b1, w2, b2, order, config)
    torch.testing.assert_close(state.block_mean, block_means(F.linear(x, w1, b1), order, config.mlp_block))
    # Same input: nothing changes.
    torch.testing.assert_close(state.sparse_step(x, w1, b1, w2, order, config, torch.Generator()), y,
                               atol=1e-5, rtol=1e-5)
    x2 = x + 0.5 * torch.randn(batch, n, din)
    old_hidden = state.hidden_in_token_order().clone()
    out = state.sparse_step(x2, w1, b1, w2, order, config, torch.Generator().manual_seed(5))
    fresh = F.gelu(F.linear(x2, w1, b1), approximate="tanh")
    hidden = state.hidden_in_token_order()
    recomputed = ~torch.isclose(hidden, old_hidden, atol=0, rtol=0)
    # Recomputed units hold exactly the fresh activation; the others kept their cached value.
    torch.testing.assert_close(hidden[recomputed], fresh[recomputed], atol=1e-6, rtol=1e-6)
    changed_share = recomputed.float().mean().item()
    assert 0.3 < changed_share < 0.8
    # The output is consistent with whatever the hidden cache holds.
    torch.testing.assert_close(out, F.linear(hidden, w2, b2), atol=1e-4, rtol=1e-4)
    assert out.data_ptr() != state.out.data_ptr()


def test_mlp_with_all_units_kept_equals_the_dense_mlp():
    config = resolve_config("flux", mlp_sparsity=0.0, mlp_random_fraction=0.0, mlp_block=16, selection_tile=8)
    w1, b1, w2, b2 = _mlp(8, 32, 8, 1)
    order = torch.arange(20, dtype=torch.int32)
    state, _ = _primed_mlp(torch.randn(1, 20, 8), w1, b1, w2, b2, order, config)
    x2 = torch.randn(1, 20, 8)
    out = state.sparse_step(x2, w1, b1, w2, order, config, torch.Generator())
    torch.testing.assert_close(out, F.linear(F.gelu(F.linear(x2, w1, b1), approximate="tanh"), w2, b2),
                               atol=1e-5, rtol=1e-5)


def test_schedule_dense_steps_and_step_index():
    flux = DenseSchedule(resolve_config("flux"), 28)
    assert sorted(flux.dense_steps) == [0, 1, 10, 20]
    hunyuan = DenseSchedule(resolve_config("hunyuan_video"), 50)
    assert sorted(hunyuan.dense_steps) == [0, 1, 10, 40]
    sigmas = torch.linspace(1, 0, 11)
    assert step_index(sigmas, torch.tensor([0.7])) == 3
    assert step_index(sigmas, torch.tensor([0.66])) == 3  # an in-between evaluation maps to the nearest step


def test_bad_settings_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="attention_sparsity"):
        resolve_config("flux", attention_sparsity=1.0)
    with pytest.raises(ValueError, match="supports"):
        resolve_config("sd15")


def test_mlp_reranks_units_every_selection_interval():
    config = resolve_config("flux", mlp_sparsity=0.6, mlp_block=16, selection_tile=8, mlp_selection_interval=2)
    w1, b1, w2, b2 = _mlp(16, 64, 16, 2)
    order = torch.arange(32, dtype=torch.int32)
    x = torch.randn(1, 32, 16)
    state, _ = _primed_mlp(x, w1, b1, w2, b2, order, config)
    picks = []
    for step in range(4):
        state.sparse_step(x + (step + 1) * torch.randn(1, 32, 16), w1, b1, w2, order, config, torch.Generator())
        picks.append(state._selection[0].clone())
    assert torch.equal(picks[0], picks[1]) and torch.equal(picks[2], picks[3])
    assert not torch.equal(picks[1], picks[2])
