"""The sparse-delta logic of the core against plain dense math (PyTorch reference kernels, CPU)."""

import math

import pytest
import torch
import torch.nn.functional as F

from chipmunk_pack.chipmunk_core.attention import SparseDeltaAttention, selects_keys
from chipmunk_pack.chipmunk_core.config import resolve_config
from chipmunk_pack.chipmunk_core.layout import joint_layout
from chipmunk_pack.chipmunk_core.mlp import SparseDeltaMLP
from chipmunk_pack.kernels.attention_reference import sampled_column_sums_reference
from chipmunk_pack.kernels.index_lists import build_index_lists_reference
from chipmunk_pack.kernels.mlp_reference import block_means_reference
from chipmunk_pack.chipmunk_core.schedule import DenseSchedule, step_index


def _seeds(batch, first=1):
    return torch.arange(first, first + batch, dtype=torch.int64)


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
    out = state.dense_step(q, k, v, layout, config, _seeds(batch))
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
    torch.testing.assert_close(state.block_mean, block_means_reference(F.linear(x, w1, b1), order, config.mlp_block))
    # Same input: nothing changes.
    torch.testing.assert_close(state.sparse_step(x, w1, b1, w2, order, config, _seeds(batch)), y,
                               atol=1e-5, rtol=1e-5)
    x2 = x + 0.5 * torch.randn(batch, n, din)
    old_hidden = state.hidden_in_token_order().clone()
    out = state.sparse_step(x2, w1, b1, w2, order, config, _seeds(batch, 5))
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
    out = state.sparse_step(x2, w1, b1, w2, order, config, _seeds(1))
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
        state.sparse_step(x + (step + 1) * torch.randn(1, 32, 16), w1, b1, w2, order, config, _seeds(1))
        picks.append(state._selection[0].clone())
    assert torch.equal(picks[0], picks[1]) and torch.equal(picks[2], picks[3])
    assert not torch.equal(picks[1], picks[2])


# --- batch independence --------------------------------------------------------------------------

def test_attention_batch_row_is_computed_as_if_alone():
    """A row's random keys depend on its own seed only: row 0 of a batch of two is bit-identical
    to the same row computed alone (dense step, key lists, cache and sparse step)."""
    config = resolve_config("flux", attention_sparsity=0.6, attention_random_fraction=0.1, query_group=16,
                            selection_tile=16)
    grid, n_text, heads, dim = (6, 8), 4, 2, 16
    n = math.prod(grid) + n_text
    layout = joint_layout(n_text, grid, math.prod(grid), True, config.query_group, "cpu")
    q, k, v = (t[:1].expand(2, -1, -1, -1) for t in _qkv(1, heads, n, dim, 3))  # two identical rows
    q2, k2, v2 = _qkv(2, heads, n, dim, 4)
    seeds = torch.tensor([11, 12], dtype=torch.int64)
    pair, alone = SparseDeltaAttention(), SparseDeltaAttention()
    dense_pair = pair.dense_step(q, k, v, layout, config, seeds)
    dense_alone = alone.dense_step(q[:1], k[:1], v[:1], layout, config, seeds[:1])
    assert torch.equal(dense_pair[:1], dense_alone)
    assert torch.equal(pair.indices[:1], alone.indices) and torch.equal(pair.counts[:1], alone.counts)
    assert not torch.equal(pair.indices[0], pair.indices[1])  # same inputs, another seed: other random keys
    assert torch.equal(pair.sparse_step(q2, k2, v2, layout, config)[:1],
                       alone.sparse_step(q2[:1], k2[:1], v2[:1], layout, config))


def test_mlp_batch_row_is_computed_as_if_alone():
    config = resolve_config("flux", mlp_sparsity=0.5, mlp_random_fraction=0.1, mlp_block=16, selection_tile=8,
                            mlp_selection_interval=1)
    n, din, hidden, dout = 40, 24, 64, 24
    w1, b1, w2, b2 = _mlp(din, hidden, dout, 4)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(5)).to(torch.int32)
    gen = torch.Generator().manual_seed(6)
    x, x2 = torch.randn(2, n, din, generator=gen), torch.randn(2, n, din, generator=gen)
    seeds = torch.tensor([21, 22], dtype=torch.int64)
    pair, _ = _primed_mlp(x, w1, b1, w2, b2, order, config)
    alone, _ = _primed_mlp(x[:1], w1, b1, w2, b2, order, config)
    out_pair = pair.sparse_step(x2, w1, b1, w2, order, config, seeds)
    out_alone = alone.sparse_step(x2[:1], w1, b1, w2, order, config, seeds[:1])
    assert torch.equal(pair._selection[0][:1], alone._selection[0])
    assert not torch.equal(pair._selection[0][0], pair._selection[0][1])
    assert torch.equal(out_pair[:1], out_alone)
    assert torch.equal(pair.hidden[:1], alone.hidden)


# --- dense steps that keep their key lists -------------------------------------------------------

def _attention_case(batch=1, **changes):
    config = resolve_config("flux", attention_sparsity=0.6, query_group=16, selection_tile=16, **changes)
    grid, n_text, heads, dim = (6, 8), 4, 2, 16
    n = math.prod(grid) + n_text
    layout = joint_layout(n_text, grid, math.prod(grid), True, config.query_group, "cpu")
    return config, layout, _qkv(batch, heads, n, dim, 8), _qkv(batch, heads, n, dim, 9)


def test_dense_step_without_selection_keeps_the_lists_and_rebuilds_the_cache():
    config, layout, (q, k, v), (q2, k2, v2) = _attention_case()
    state = SparseDeltaAttention()
    state.dense_step(q, k, v, layout, config, _seeds(1))
    indices, counts = state.indices.clone(), state.counts.clone()
    buffers = (state.indices.data_ptr(), state.delta.data_ptr())
    out = state.dense_step(q2, k2, v2, layout, config, _seeds(1), select=False)
    dense = F.scaled_dot_product_attention(q2, k2, v2)
    torch.testing.assert_close(out.view(1, -1, 2, 16).transpose(1, 2), dense, atol=1e-5, rtol=1e-5)
    assert torch.equal(state.indices, indices) and torch.equal(state.counts, counts)
    assert (state.indices.data_ptr(), state.delta.data_ptr()) == buffers
    # the new cache is exact for the new inputs with the old lists
    torch.testing.assert_close(state.sparse_step(q2, k2, v2, layout, config), out, atol=1e-5, rtol=1e-5)
    # selecting again on new inputs changes the lists, in the same buffers
    state.dense_step(q, k, v, layout, config, _seeds(1), select=True)
    assert state.indices.data_ptr() == buffers[0]


def test_dense_step_without_lists_selects_even_when_told_not_to():
    config, layout, (q, k, v), _ = _attention_case()
    state = SparseDeltaAttention()
    state.dense_step(q, k, v, layout, config, _seeds(1), select=False)
    assert state.indices is not None and state.ready_for(q, k)


def test_paged_key_lists_give_the_steps_of_plain_lists(monkeypatch):
    """Past int16's range the state keeps paged lists (here with pages of 32 ids, so that 52 keys
    need them): dense and sparse steps are those of plain lists, and the lists are refilled in
    place."""
    from chipmunk_pack.kernels import index_lists

    config, layout, (q, k, v), (q2, k2, v2) = _attention_case(batch=2)
    plain = SparseDeltaAttention()
    expected = (plain.dense_step(q, k, v, layout, config, _seeds(2)), plain.sparse_step(q2, k2, v2, layout, config))
    monkeypatch.setattr(index_lists, "PAGE_BITS", 5)
    paged = SparseDeltaAttention()
    got = (paged.dense_step(q, k, v, layout, config, _seeds(2)), paged.sparse_step(q2, k2, v2, layout, config))
    assert (paged.indices.dtype, paged.counts.dtype) == (torch.int16, torch.int32)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    ids, counts = index_lists.read_lists(paged.indices, paged.counts)
    listed = torch.arange(ids.shape[-1]) < counts[..., None]
    assert torch.equal(ids[listed], plain.indices.long()[listed]) and (ids[listed] >= 32).any()
    address = paged.indices.data_ptr()
    paged.dense_step(q2, k2, v2, layout, config, _seeds(2), select=True)
    assert paged.indices.data_ptr() == address


def test_a_folded_delta_is_handed_back_and_sparse_steps_return_the_restricted_attention_alone():
    """fold=True: the dense step returns (dense, C) and keeps the lists only; a sparse step
    returns A_S, so that C + A_S is the unfolded state's sparse step, for any linear map of it."""
    config, layout, (q, k, v), (q2, k2, v2) = _attention_case(batch=2)
    plain, folded = SparseDeltaAttention(), SparseDeltaAttention()
    expected = plain.dense_step(q, k, v, layout, config, _seeds(2))
    out, delta = folded.dense_step(q, k, v, layout, config, _seeds(2), fold=True)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert folded.delta is None and folded.folded and torch.equal(folded.indices, plain.indices)
    assert folded.nbytes() < plain.nbytes()
    torch.testing.assert_close(delta, plain.delta.flatten(2), atol=0, rtol=0)
    assert folded.ready_for(q, k, fold=True) and not folded.ready_for(q, k)
    assert plain.ready_for(q, k) and not plain.ready_for(q, k, fold=True)
    w = torch.randn(delta.shape[-1], 24, generator=torch.Generator().manual_seed(3))
    restricted = folded.sparse_step(q2, k2, v2, layout, config)
    torch.testing.assert_close(restricted @ w + delta @ w, plain.sparse_step(q2, k2, v2, layout, config) @ w,
                               atol=1e-4, rtol=1e-4)


def test_selection_schedule():
    every = resolve_config("flux", attention_selection="every_dense_step")
    warmup = resolve_config("flux")  # the reference's FLUX choice
    assert resolve_config("wan").attention_selection == "warmup_steps"
    assert resolve_config("hunyuan_video").attention_selection == "every_dense_step"
    assert [selects_keys(every, s) for s in (0, 1, 10, 20)] == [True] * 4
    assert [selects_keys(warmup, s) for s in (0, 1, 10, 20)] == [True, True, False, False]
    with pytest.raises(ValueError, match="attention_selection"):
        resolve_config("flux", attention_selection="sometimes")
    with pytest.raises(ValueError, match="attention_score_queries"):
        resolve_config("flux", attention_score_queries=12)


def test_sampled_scores_choose_the_lists_and_the_dense_output_stays_exact():
    config, layout, (q, k, v), (q2, k2, v2) = _attention_case(attention_score_queries=4)
    state = SparseDeltaAttention()
    out = state.dense_step(q, k, v, layout, config, _seeds(1))
    torch.testing.assert_close(out.view(1, -1, 2, 16).transpose(1, 2), F.scaled_dot_product_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)
    scores = sampled_column_sums_reference(q, k, layout.query_order, config.query_group, 4)
    expected, _ = build_index_lists_reference(scores, round(config.attention_keep * k.shape[2]),
                                              forced=layout.forced_keys, pad_to=config.selection_tile)
    assert torch.equal(state.indices, expected)
    assert state.lse is None  # no exact statistics were computed
    torch.testing.assert_close(state.sparse_step(q, k, v, layout, config), out, atol=1e-5, rtol=1e-5)


def test_mlp_rank_can_be_told_and_then_leaves_the_step_counter_alone():
    config = resolve_config("flux", mlp_sparsity=0.6, mlp_block=16, selection_tile=8, mlp_selection_interval=2)
    w1, b1, w2, b2 = _mlp(16, 64, 16, 2)
    order = torch.arange(32, dtype=torch.int32)
    x = torch.randn(1, 32, 16)
    state, _ = _primed_mlp(x, w1, b1, w2, b2, order, config)
    assert state.ranks_next_step(config)
    state.sparse_step(x + torch.randn(1, 32, 16), w1, b1, w2, order, config, _seeds(1), rank=True)
    first, address = state._selection[0].clone(), state._selection[0].data_ptr()
    state.sparse_step(x + 3 * torch.randn(1, 32, 16), w1, b1, w2, order, config, _seeds(1), rank=False)
    assert torch.equal(state._selection[0], first) and state._sparse_steps == 0
    state.sparse_step(x + 5 * torch.randn(1, 32, 16), w1, b1, w2, order, config, _seeds(1), rank=True)
    assert state._selection[0].data_ptr() == address and not torch.equal(state._selection[0], first)


# --- no host synchronisation once the state exists (what CUDA graph capture needs) -------------

aten = torch.ops.aten
# Operations that make a CUDA stream wait for the host or the host for the device, or that draw
# from generator state: none may run inside a step once its state exists.
_SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.is_nonzero, aten.equal,
            aten._unique2, aten.unique_consecutive, aten.unique_dim, aten.lift_fresh, aten.allclose}
_RANDOM = {aten.rand, aten.randn, aten.randint, aten.randperm, aten.bernoulli, aten.normal, aten.uniform_,
           aten.multinomial, aten.random_, aten.exponential_, aten.rand_like, aten.randn_like}


class NoHostSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails any operation that would synchronise the host with a CUDA device (item/bool/int of a
    tensor, nonzero, boolean-mask indexing, unique, tensors built from host data) or use a
    generator. Kernel launches are opaque on a GPU: inside ``opaque`` nothing is checked."""

    def __init__(self):
        super().__init__()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            packet = func._overloadpacket
            if packet in _SYNCING or packet in _RANDOM:
                raise AssertionError(f"{func} in a step: host synchronisation or generator state")
            if packet in (aten.index, aten.index_put, aten.index_put_):
                indices = args[1]
                if any(i is not None and i.dtype == torch.bool for i in indices):
                    raise AssertionError(f"{func} with a boolean mask in a step (a hidden nonzero)")
        return func(*args, **kwargs)

    def opaque(self, fn):
        def call(*args, **kwargs):
            self.paused += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused -= 1
        return call


_KERNEL_OPS = ("attention_with_column_sums", "sampled_column_sums", "column_sparse_attention", "sparse_mlp_delta",
               "block_means")  # single Triton launches on a GPU; build_index_lists/rank_units run checked


@pytest.fixture
def no_host_sync(monkeypatch):
    from chipmunk_pack import kernels
    mode = NoHostSync()
    for name in _KERNEL_OPS:
        monkeypatch.setattr(kernels, name, mode.opaque(getattr(kernels, name)))
    return mode


def test_probe_catches_what_a_graph_cannot_hold(no_host_sync):
    t = torch.arange(6.0)
    for bad in (lambda: t.sum().item(), lambda: bool(t.sum() > 0), lambda: t[t > 2], lambda: torch.rand(3),
                lambda: torch.tensor([1, 2])):
        with no_host_sync, pytest.raises(AssertionError):
            bad()


@pytest.mark.parametrize("score_queries", [0, 4])
def test_attention_steps_do_not_synchronise_once_the_state_exists(no_host_sync, score_queries):
    config, layout, (q, k, v), (q2, k2, v2) = _attention_case(batch=2, attention_random_fraction=0.1,
                                                              attention_score_queries=score_queries)
    state = SparseDeltaAttention()
    seeds = _seeds(2)
    state.dense_step(q, k, v, layout, config, seeds)  # creates the state (and caches the forced keys)
    with no_host_sync:
        state.sparse_step(q2, k2, v2, layout, config)
        state.dense_step(q2, k2, v2, layout, config, seeds, select=True)
        state.dense_step(q, k, v, layout, config, seeds, select=False)
        state.sparse_step(q2, k2, v2, layout, config)


def test_mlp_steps_do_not_synchronise_once_the_state_exists(no_host_sync):
    config = resolve_config("flux", mlp_sparsity=0.5, mlp_random_fraction=0.1, mlp_block=16, selection_tile=8)
    w1, b1, w2, b2 = _mlp(24, 64, 24, 3)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(1)).to(torch.int32)
    x = torch.randn(2, 40, 24)
    state, _ = _primed_mlp(x, w1, b1, w2, b2, order, config)
    state.sparse_step(x, w1, b1, w2, order, config, _seeds(2))  # first ranking: buffers appear
    with no_host_sync:
        for rank in (True, False, None):
            state.sparse_step(x + 0.1, w1, b1, w2, order, config, _seeds(2), rank=rank)
        y = F.linear(state.dense_step(x, F.linear(x, w1, b1), order, config), w2, b2)
        state.store_output(y)
        state.sparse_step(x, w1, b1, w2, order, config, _seeds(2))


class _StubKernel:
    """Stands in for a @triton.jit kernel: counts launches, runs nothing."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
        return launch


def test_triton_launchers_do_not_synchronise(no_host_sync, monkeypatch):
    """The launchers' host code (argument checks, scratch buffers, strides) is what runs on the
    CPU when a step is captured: with the kernels stubbed out, every torch operation is checked."""
    pytest.importorskip("triton")
    from chipmunk_pack.kernels import attention_triton, forced_columns, index_lists_triton, mlp_triton
    stubs = {}
    for module, names in ((attention_triton, ("_column_sparse_attention_kernel", "_attention_with_column_sums_kernel",
                                              "_sampled_column_sums_kernel")),
                          (mlp_triton, ("_mlp_delta_up_kernel", "_mlp_delta_down_kernel", "_block_means_kernel")),
                          (index_lists_triton, ("_select_columns_kernel",))):
        for name in names:
            stubs[name] = _StubKernel()
            monkeypatch.setattr(module, name, stubs[name])
    b, h, n, d, group = 2, 2, 150, 64, 64
    q, k, v = (t.bfloat16() for t in _qkv(b, h, n, d, 1))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(2)).int()
    lists = torch.zeros(b, h, 3, 64, dtype=torch.int32), torch.full((b, h, 3), 64, dtype=torch.int32)
    out = torch.empty_like(q)
    x, w1, b1, w2 = torch.randn(b, n, 32).bfloat16(), torch.randn(96, 32).bfloat16(), None, torch.randn(32, 96).bfloat16()
    units = torch.zeros(b, 3, 64, dtype=torch.int32), torch.full((b, 3), 64, dtype=torch.int32)
    hidden, mlp_out, result = torch.empty(b, 96, n).bfloat16().transpose(1, 2), torch.empty(b, n, 32).bfloat16(), \
        torch.empty(b, n, 32).bfloat16()
    forced = forced_columns(torch.arange(5), n)
    mean = torch.zeros(b, 3, 96)
    key_scores, unit_scores = torch.rand(b, h, 3, n), torch.randn(b, 3, 96).bfloat16()
    with no_host_sync:
        attention_triton.column_sparse_attention_triton(q, k, v, *lists, order, group, out, out, 1.0)
        attention_triton.attention_with_column_sums_triton(q, k, v, order, group, out, torch.zeros(b, h, n))
        attention_triton.sampled_column_sums_triton(q, k, order, group, 16)
        mlp_triton.sparse_mlp_delta_triton(x, w1, b1, w2, *units, order, group, hidden, mlp_out,
                                           hidden_in_block_order=True, result=result)
        mlp_triton.block_means_triton(x, order, group, out=torch.empty(b, 3, 32).bfloat16())
        index_lists_triton.build_index_lists_triton(key_scores, 40, 4, forced, _seeds(b), 8,
                                                    out=(torch.empty(b, h, 3, 40, dtype=torch.int32),
                                                         torch.empty(b, h, 3, dtype=torch.int32)))
        index_lists_triton.rank_units_triton(unit_scores, mean, 30, 4, _seeds(b), 8,
                                             out=(torch.empty(b, 3, 32, dtype=torch.int32),
                                                  torch.empty(b, 3, dtype=torch.int32)))
    assert all(stub.launches for stub in stubs.values()), {name: s.launches for name, s in stubs.items()}


def test_fc2_is_transposed_from_the_weight_as_it_is_at_each_sparse_step():
    """ComfyUI patches weights in place (hook keyframes): the sparse step reads fc2 as it is then,
    through one scratch buffer of the run per weight shape; no copy outlives the step."""
    from chipmunk_pack.chipmunk_core.mlp import TransposeScratch

    config = resolve_config("flux", mlp_sparsity=0.5, mlp_random_fraction=0.1, mlp_block=16, selection_tile=8)
    w1, b1, w2, b2 = _mlp(24, 64, 24, 3)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(1)).to(torch.int32)
    x = torch.randn(1, 40, 24)
    scratch = TransposeScratch()
    runs = []
    for patched in (False, True):
        state, _ = _primed_mlp(x, w1, b1, w2, b2, order, config)
        state.fc2_scratch = scratch
        state.reserve_fc2(w2)
        buffer = scratch.buffers()[0]
        weight = w2 * 2 if patched else w2
        runs.append(state.sparse_step(x + 0.1, w1, b1, weight, order, config, _seeds(1), rank=True))
        assert scratch.buffers() == [buffer] and torch.equal(buffer, weight.t())
    fresh, _ = _primed_mlp(x, w1, b1, w2, b2, order, config)
    expected = fresh.sparse_step(x + 0.1, w1, b1, w2 * 2, order, config, _seeds(1), rank=True)
    assert torch.equal(runs[1], expected) and not torch.equal(runs[0], runs[1])
    assert scratch.nbytes() == w2.numel() * w2.element_size()

