"""The run plan's memory part: cache sizes, the order in which caches are given up, host streaming
only where the cost model says it pays, and budgets that do not move the plan by small amounts."""

import pytest
import torch

from chipmunk_pack.chipmunk_core import plan as run_plan
from chipmunk_pack.chipmunk_core.config import resolve_config
from chipmunk_pack.chipmunk_core.memory import ModelDims
from chipmunk_pack.kernels import selection_size
from chipmunk_pack.chipmunk_core.plan import (
    ATTENTION, DEVICE, HOST, MLP, OFF, CostModel, cache_bytes, folded_bytes, layer_items, plan_memory, quantised,
    stock_reason)

HUNYUAN = ModelDims(60, 24, 128, 12288, 3072)
FLUX = ModelDims(57, 24, 128, 12288, 3072)
FLUX_TOKENS = 4096 + 512


def test_cache_size_follows_the_method_formula():
    config = resolve_config("hunyuan_video")
    size = cache_bytes(config, HUNYUAN, 1, 119056, torch.bfloat16)
    delta = 58 * 119056 * 24 * 128 * 2  # 58 Chipmunk layers, one bf16 value per head and token
    assert delta < size < 2 * delta
    with_mlp = cache_bytes(config.replace(mlp_sparsity=0.7), HUNYUAN, 1, 119056, torch.bfloat16)
    assert with_mlp - size >= 58 * 119056 * (12288 + 3072) * 2
    assert cache_bytes(config.replace(attention_sparsity=0.0), HUNYUAN, 1, 119056, torch.bfloat16) == 0
    assert cache_bytes(config, HUNYUAN, 2, 1000, torch.bfloat16) == 2 * cache_bytes(config, HUNYUAN, 1, 1000, torch.bfloat16)


FLUX_IMAGE_TOKENS = 4096  # 1024x1024; the double blocks' MLPs see these only (the text has its own MLP)


FLUX_SINGLE = frozenset(range(19, 57))  # single blocks: their attention delta folds into the MLP's output cache


def _flux_items(rows=1, config=None):
    return layer_items(config or resolve_config("flux"), FLUX, rows, FLUX_TOKENS, 2, range(57),
                       image_tokens=FLUX_IMAGE_TOKENS, image_mlp_layers=frozenset(range(19)), folded_layers=FLUX_SINGLE)


def test_everything_on_the_device_when_it_fits_and_without_a_known_budget():
    items = _flux_items()
    wanted = folded_bytes(items)
    for budget in (None, wanted):
        plan = plan_memory(items, budget)
        assert set(plan.placement.values()) == {DEVICE}
        assert plan.device_bytes == wanted and not plan.given_up()


def test_memory_is_given_up_where_it_buys_least_first():
    """MLP caches go first, attention caches last (time saved per byte); no weight copy is an item."""
    items = _flux_items()
    assert {i.kind for i in items} == {ATTENTION, MLP}
    total = {kind: sum(i.nbytes for i in items if i.kind == kind) for kind in (ATTENTION, MLP)}
    plan = plan_memory(items, total[ATTENTION] + total[MLP] // 2)
    given_up = plan.given_up()
    assert 0 < given_up[MLP] < 55 and ATTENTION not in given_up
    plan = plan_memory(items, total[ATTENTION] // 2)
    assert plan.given_up()[MLP] == 55 and 0 < plan.given_up()[ATTENTION] < 55
    assert plan.device_bytes <= total[ATTENTION] // 2
    assert "not free" in plan.describe() and "attention of" in plan.describe()


def test_flux_1024_caches_at_the_defaults_hold_no_weight_copy():
    """FLUX.1-dev 1024x1024, one conditioning, bf16: attention and MLP caches only (the transposed
    fc2 copies, 3.9 GiB, are gone; the single blocks' attention deltas live in their MLP output
    caches); the key and unit lists (int16) and row statistics are the rest. At most 8 GiB (fp8: 4.62 GiB;
    4.43 GiB at the 256 text tokens of a short prompt)."""
    items = _flux_items()
    total = folded_bytes(items)
    mlp_caches = (17 * FLUX_IMAGE_TOKENS + 38 * FLUX_TOKENS) * (12288 + 3072) * 2  # 17 double, 38 single blocks
    attention_deltas = 17 * FLUX_TOKENS * 24 * 128 * 2  # the double blocks' only
    assert mlp_caches + attention_deltas < total < 1.05 * (mlp_caches + attention_deltas)
    assert total < 8 * 2**30 and sum(i.nbytes for i in items) - total == 38 * FLUX_TOKENS * 24 * 128 * 2
    assert folded_bytes(_flux_items(config=resolve_config("flux", fp8_caches=True))) < 4.62 * 2**30
    joint = folded_bytes(layer_items(resolve_config("flux"), FLUX, 1, FLUX_TOKENS, 2, range(57),
                                     folded_layers=FLUX_SINGLE))
    fewer_rows, fewer_blocks = FLUX_TOKENS - FLUX_IMAGE_TOKENS, (FLUX_TOKENS - FLUX_IMAGE_TOKENS) // 128
    unit_lists = (3712 + 1) * 2  # per row block: 30% of 12288 units rounded up to the tile, and a count (int16)
    assert joint - total == 17 * (fewer_rows * (12288 + 3072) * 2 + fewer_blocks * (12288 * 4 + 3072 * 2 + unit_lists))


def test_a_folded_delta_is_counted_only_while_its_layer_keeps_no_mlp_cache():
    """A single block's attention item costs its lists alone next to its MLP cache, its delta too
    without it; the budget sees what is really allocated."""
    items = _flux_items()
    single = {i.kind: i for i in items if i.layer == 30}
    assert single[ATTENTION].folds == FLUX_TOKENS * 24 * 128 * 2 and single[MLP].folds == 0
    assert all(i.folds == 0 for i in items if i.layer < 19)
    full = plan_memory(items, None)
    assert full.device_bytes == full.wanted == folded_bytes(items)
    assert full.folded == 38 and "attention deltas of 38 layers folded" in full.describe()
    for gib in (2, 4, 6, 7.5):
        plan = plan_memory(items, int(gib * 2**30))
        expected = sum(i.nbytes - (i.folds if plan.where(i.layer, MLP) != OFF else 0)
                       for i in items if plan.where(i.layer, i.kind) == DEVICE)
        assert plan.device_bytes == expected <= gib * 2**30
        assert plan.given_up().get(MLP, 0) > 0 and ATTENTION not in plan.given_up()
        # a single block's MLP cache also spares its attention delta: the double blocks' go first
        kept = [layer for layer in range(2, 57) if plan.where(layer, MLP) != OFF]
        assert all(layer >= 19 for layer in kept) or all(plan.where(layer, MLP) != OFF for layer in FLUX_SINGLE)


def test_key_lists_take_the_narrowest_integer_type():
    """WAN2.1 at 480p 81 frames (32,760 tokens) keeps int16 key lists; at 720p (75,600) paged int16
    lists (int32 counts, which also say where the second page starts); past two pages, int32."""
    wan = ModelDims(30, 12, 128, 8960, 1536)
    config = resolve_config("wan")

    def list_bytes(n_tokens):
        attention = [i for i in layer_items(config, wan, 1, n_tokens, 2, ()) if i.kind == ATTENTION][0]
        delta = n_tokens * 12 * 128 * 2
        return attention.nbytes - delta - 12 * n_tokens * 4  # less the delta cache and fp32 row statistics

    for n_tokens, width, count_width in ((32760, 2, 2), (75600, 2, 4), (140000, 4, 4)):
        groups = -(-n_tokens // config.query_group)
        kept = selection_size(n_tokens, round(config.attention_keep * n_tokens), config.selection_tile)
        assert list_bytes(n_tokens) == 12 * groups * (kept * width + count_width)


def test_fp8_attention_caches_take_a_byte_per_value_and_a_scale_per_row():
    wan = ModelDims(30, 12, 128, 8960, 1536)
    config = resolve_config("wan")
    plain, fp8 = (sum(i.nbytes for i in layer_items(c, wan, 2, 32760, 2, ()))
                  for c in (config, config.replace(fp8_caches=True)))
    assert plain - fp8 == 28 * 2 * 32760 * 12 * (2 * 128 - (128 + 4))  # 28 sparse layers, 2 rows
    assert fp8 < 0.6 * plain
    flux = resolve_config("flux")
    plain, fp8 = ({i.kind: i.nbytes for i in layer_items(c, FLUX, 1, FLUX_TOKENS, 2, range(57)) if i.layer == 5}
                  for c in (flux, flux.replace(fp8_caches=True)))
    assert plain[MLP] - fp8[MLP] == FLUX_TOKENS * 12288 - 12288 * 4  # hidden: a byte per value, a scale per unit


def test_image_caches_are_never_streamed_but_long_video_layers_are():
    """FLUX's layers are too short to hide a copy over the host link; a 720p WAN-14B layer is not."""
    plan = plan_memory(_flux_items(), 0)
    assert HOST not in plan.placement.values() and set(plan.placement.values()) == {OFF}
    wan14 = ModelDims(40, 40, 128, 13824, 5120)
    items = layer_items(resolve_config("wan"), wan14, 2, 75600, 2, ())
    plan = plan_memory(items, 0)
    assert set(plan.placement.values()) == {HOST} and plan.host_bytes == sum(i.nbytes for i in items)
    slow_link = plan_memory(items, 0, CostModel(host_bandwidth=1e9))
    assert set(slow_link.placement.values()) == {OFF}


def test_streamed_caches_stay_within_the_host_memory_budget():
    """Pinned host memory is bounded too: a 720p WAN-14B run with CFG wants more caches than many
    machines have memory; what does not fit the host budget runs stock, and the report says so."""
    wan14 = ModelDims(40, 40, 128, 13824, 5120)
    items = layer_items(resolve_config("wan"), wan14, 2, 75600, 2, ())
    item = items[0].nbytes
    plan = plan_memory(items, 10 * item, host_budget=15 * item + 1)
    assert plan.device_bytes <= 10 * item - 2 * item  # room for the two copies in flight
    assert plan.host_bytes == 15 * item and plan.host_budget == 15 * item + 1
    assert list(plan.placement.values()).count(OFF) == len(items) - 15 - plan.device_bytes // item
    assert "host memory for streaming" in plan.describe() and "without caches attention of" in plan.describe()
    assert plan_memory(items, 10 * item).host_bytes == sum(i.nbytes for i in items) - plan.device_bytes


def test_small_differences_in_free_memory_give_the_same_plan():
    items = _flux_items()
    free = 6 * 2**30 + 5 * 2**20
    assert plan_memory(items, quantised(free)) == plan_memory(items, quantised(free + 100 * 2**20))
    assert quantised(None) is None and quantised(-5) == 0


def test_stock_reasons():
    config = resolve_config("flux")
    cuda = torch.device("cuda", 0)
    assert stock_reason(config, cuda, 4096, 2304, False) is None
    assert "below the 2304" in stock_reason(config, cuda, 1024, 2304, False).detail
    assert "dynamic VRAM" in stock_reason(config, cuda, 1024, 3840, True).detail
    assert stock_reason(config.replace(attention_sparsity=0.0, mlp_sparsity=0.0), cuda, 4096, 0, False)


def test_the_cpu_runs_stock_unless_asked(monkeypatch):
    config = resolve_config("flux")
    monkeypatch.delenv(run_plan.SPARSE_ON_CPU, raising=False)
    reason = stock_reason(config, torch.device("cpu"), 4096, 0, False)
    assert "needs a CUDA GPU" in reason.headline and "needs a CUDA GPU" in reason.detail
    monkeypatch.setenv(run_plan.SPARSE_ON_CPU, "1")
    assert stock_reason(config, torch.device("cpu"), 4096, 0, False) is None


def test_streaming_keeps_room_for_the_copies_in_flight():
    """Two of the largest streamed caches pass through device memory at once (in use, and the next
    one in flight): a plan that streams keeps that much of its budget free."""
    wan13 = ModelDims(30, 12, 128, 8960, 1536)
    items = layer_items(resolve_config("wan"), wan13, 2, 32760, 2, ())
    largest = max(i.nbytes for i in items)
    budget = sum(i.nbytes for i in items) // 2
    plan = plan_memory(items, budget)
    assert plan.host_bytes > 0 and plan.budget == budget
    assert plan.device_bytes + 2 * largest <= budget


def test_graph_verdict_of_a_call():
    """Which calls replay as CUDA graphs, which run eagerly and why, and which graphs are not for;
    the set-up is asked only where it decides."""
    from chipmunk_pack.chipmunk_core.plan import ADAPTIVE_CACHE, CONTROL, NESTED_TENSORS, CallFacts, graph_verdict
    from chipmunk_pack.chipmunk_core.schedule import DenseSchedule
    from chipmunk_pack.chipmunk_core.step_cache import StepCacheSchedule

    config = resolve_config("flux")
    schedule = StepCacheSchedule(config, 20, DenseSchedule(config, 20))
    sparse = CallFacts(dense=False, stock_layers=False, graph_device=True, has_control=False, nested_tensors=False)
    asked = []

    def setup(answer=None):
        def blocker():
            asked.append(1)
            return answer
        return blocker

    assert graph_verdict(config, schedule, 5, sparse, setup()) is True and asked
    asked.clear()
    for facts in (sparse.__class__(**{**sparse.__dict__, "dense": True}),
                  sparse.__class__(**{**sparse.__dict__, "graph_device": False})):
        assert graph_verdict(config, schedule, 5, facts, setup()) is None
    assert graph_verdict(config.replace(cuda_graphs=False), schedule, 5, sparse, setup()) is None
    assert not asked  # not a candidate: the set-up is not read
    assert graph_verdict(config, schedule, 5, sparse, setup("torch.compile is applied")) == "torch.compile is applied"
    control = sparse.__class__(**{**sparse.__dict__, "has_control": True})
    assert graph_verdict(config, schedule, 5, control, setup()) == CONTROL
    nested = sparse.__class__(**{**sparse.__dict__, "nested_tensors": True})
    assert graph_verdict(config, schedule, 5, nested, setup()) == NESTED_TENSORS
    adaptive = config.replace(step_cache="adaptive")
    assert graph_verdict(adaptive, StepCacheSchedule(adaptive, 20, DenseSchedule(adaptive, 20)), 5, sparse,
                         setup()) == ADAPTIVE_CACHE


@pytest.mark.parametrize("fp8", [False, True])
def test_the_plan_counts_every_byte_a_layer_keeps(fp8):
    """A layer's items equal what its states hold after dense and sparse steps (delta, key lists,
    row statistics; hidden and output caches, block means, unit lists and their scratch): the
    budget is spent on what is really allocated."""
    import math

    import torch.nn.functional as F

    from chipmunk_pack.chipmunk_core.attention import SparseDeltaAttention
    from chipmunk_pack.chipmunk_core.layout import joint_layout
    from chipmunk_pack.chipmunk_core.mlp import SparseDeltaMLP

    config = resolve_config("flux", attention_sparsity=0.6, query_group=16, selection_tile=16, mlp_sparsity=0.5,
                            mlp_block=16, first_dense_layers=0, fp8_caches=fp8)
    grid, n_text, batch = (6, 8), 4, 2
    dims = ModelDims(1, 2, 16, 64, 24)
    n = math.prod(grid) + n_text
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, dims.heads, n, dims.head_dim, generator=g) for _ in range(3))
    layout = joint_layout(n_text, grid, math.prod(grid), True, config.query_group, "cpu")
    seeds = torch.arange(1, batch + 1, dtype=torch.int64)
    attention = SparseDeltaAttention()
    attention.dense_step(q, k, v, layout, config, seeds)
    attention.sparse_step(q, k, v, layout, config)
    w1, b1 = torch.randn(dims.mlp_hidden, dims.mlp_out, generator=g), torch.randn(dims.mlp_hidden, generator=g)
    w2 = torch.randn(dims.mlp_out, dims.mlp_hidden, generator=g)
    x, order = torch.randn(batch, n, dims.mlp_out, generator=g), torch.randperm(n, generator=g).to(torch.int32)
    mlp = SparseDeltaMLP()
    mlp.store_output(F.linear(mlp.dense_step(x, F.linear(x, w1, b1), order, config), w2))
    mlp.sparse_step(x, w1, b1, w2, order, config, seeds)
    items = {i.kind: i.nbytes for i in layer_items(config, dims, batch, n, 4, range(1))}
    assert items == {ATTENTION: attention.nbytes(), MLP: mlp.nbytes()}


def test_a_streamed_mlp_cache_leaves_its_block_means_and_unit_lists_on_the_device():
    """An MLP's caches may live in host memory, but the ranking reads and refreshes its block means
    and unit lists on the device: the plan charges those to the device budget, and streams nothing
    where they do not fit."""
    wan14 = ModelDims(40, 40, 128, 13824, 5120)
    items = layer_items(resolve_config("wan", mlp_sparsity=0.7), wan14, 2, 75600, 2, range(40))
    mlp = next(i for i in items if i.kind == MLP)
    blocks = -(-75600 // 128)
    assert mlp.resident == 2 * blocks * (13824 * 4 + 5120 * 2 + (4160 + 1) * 2)  # fp32 means, x means, int16 lists
    assert all(i.resident == 0 for i in items if i.kind == ATTENTION)
    fast_link = CostModel(host_bandwidth=1e12)  # (at real link speeds an MLP cache costs more to copy than it saves)
    plan = plan_memory(items, 40 * 2**30, fast_link)
    streamed = [i for i in items if plan.where(i.layer, i.kind) == HOST]
    assert any(i.kind == MLP for i in streamed)
    on_device = sum(i.nbytes for i in items if plan.where(i.layer, i.kind) == DEVICE)
    assert plan.device_bytes == on_device + sum(i.resident for i in streamed) <= 40 * 2**30
    assert plan.host_bytes == sum(i.nbytes - i.resident for i in streamed)
    assert plan_memory(items, 0, fast_link).where(mlp.layer, MLP) == OFF  # no device room for its means
