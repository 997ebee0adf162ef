"""The run plan inside real ComfyUI samplings: the output depends on the inputs only.

- ComfyUI decides on every call whether cond and uncond run in one batch (from free memory): a flip
  mid-run keeps Chipmunk's caches (cut out of the batched set, or joined again), so the picture is
  the one of a run that never flipped, as close as stock's own two pictures are.
- A small memory budget gives up the caches worth least per byte; with no room at all the layers
  run stock (bit for bit the model without the node) and the report says why.
- On the CPU, where only the reference kernels exist, users get stock sampling and the reason on
  the report's first line (the rest of the suite sets CHIPMUNK_SPARSE_ON_CPU to study the method).
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch

from harness import chipmunk as cm
from test_accelerate import _relative, flux, hunyuan_with_padded_text  # noqa: F401 (flux: the narrow FLUX fixture)

pytestmark = [pytest.mark.comfyui, pytest.mark.chipmunk_node]


@pytest.fixture
def pack(chipmunk_pack_nodes):
    """The pack's package name as ComfyUI loaded it."""
    return chipmunk_pack_nodes["ChipmunkAccelerate"].__module__.split(".")[0]


def _free_memory_flips(monkeypatch, unbatched_calls: range):
    """ComfyUI's free-memory answers as seen by its cond/uncond batching: none on the calls in
    ``unbatched_calls`` (cond and uncond then run apart), plenty otherwise."""
    import comfy.model_management
    import comfy.model_patcher

    import comfy.samplers

    calls = {"n": 0}
    plenty = comfy.model_management.get_free_memory

    def free_memory(dev=None, torch_free_too=False):
        if torch_free_too:  # another asker (attention backends): the real answer
            return plenty(dev, torch_free_too)
        calls["n"] += 1
        return 0 if calls["n"] - 1 in unbatched_calls else plenty(dev)

    if hasattr(comfy.model_patcher.ModelPatcher, "get_free_memory"):  # v0.19: the sampler asks the patcher
        monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "get_free_memory",
                            lambda self, device: free_memory(device))
    else:
        monkeypatch.setattr(comfy.samplers.model_management, "get_free_memory", free_memory)
    return calls


def test_a_batching_flip_mid_run_keeps_the_caches(flux, monkeypatch, caplog):
    size, steps = flux.sizes[0], 12
    stock = flux.sample(flux.model, size, cfg=3.5, steps=steps)
    with caplog.at_level(logging.INFO):
        batched = flux.sample(flux.accelerate(), size, cfg=3.5, steps=steps)
    batched_report = cm.reports(caplog)[-1]
    calls = _free_memory_flips(monkeypatch, range(4, 8))
    stock_flipped = flux.sample(flux.model, size, cfg=3.5, steps=steps)
    assert calls["n"] >= steps
    calls["n"] = 0
    with caplog.at_level(logging.INFO):
        flipped = flux.sample(flux.accelerate(), size, cfg=3.5, steps=steps)
    flipped_report = cm.reports(caplog)[-1]
    assert cm.step_counts(flipped_report) == cm.step_counts(batched_report), flipped_report
    stock_gap = _relative(stock_flipped, stock)  # what the flip alone changes in stock ComfyUI
    gap = _relative(flipped, batched)
    print(f"batching flip: stock {stock_gap:.2e}, Chipmunk {gap:.2e}")
    assert gap <= max(10 * stock_gap, 1e-5), (gap, stock_gap)


def test_caches_dropped_on_a_flip_would_change_the_picture(flux, pack, monkeypatch):
    """The control of the test above: without re-slicing (caches started afresh on the flip) the
    same flip moves the output far more (4e-4 here against 2e-7 re-sliced), so that test does see a
    flip."""
    state = importlib.import_module(f"{pack}.chipmunk_core.state")
    size, steps = flux.sizes[0], 12
    batched = flux.sample(flux.accelerate(), size, cfg=3.5, steps=steps)
    _free_memory_flips(monkeypatch, range(4, 8))
    monkeypatch.setattr(state.CondCaches, "pieces", lambda self, rows: {})
    dropped = flux.sample(flux.accelerate(), size, cfg=3.5, steps=steps)
    assert _relative(dropped, batched) > 1e-4


def test_a_small_budget_gives_up_mlp_caches_first_and_none_means_stock(flux, pack, monkeypatch, caplog):
    hooks = importlib.import_module(f"{pack}.nodes.hooks")
    plan = importlib.import_module(f"{pack}.chipmunk_core.plan")
    monkeypatch.setattr(plan, "BUDGET_QUANTUM", 1)  # the tiny model's caches are far below the real quantum
    size = flux.sizes[0]
    stock = flux.sample(flux.model, size)
    wanted = {}

    def budget_of(share):
        def budget(patcher, x, rows, want):
            wanted["bytes"] = want
            return int(share * want)
        return budget

    # Part of the memory (the fc2 scratch of this small model takes much of what the plan asks
    # for): the caches worth least per byte are given up (which ones at real sizes is tested in
    # tests/core/test_memory.py), the rest of the layers stay sparse.
    monkeypatch.setattr(hooks, "cache_budget", budget_of(0.8))
    with caplog.at_level(logging.INFO):
        partial = flux.sample(flux.accelerate(), size)
    report = cm.reports(caplog)[-1]
    assert "was not free" in report and ("MLP of" in report or "attention of" in report), report
    assert cm.step_counts(report)["sparse"] > 0 and torch.isfinite(partial).all()
    assert not torch.equal(partial, stock)

    monkeypatch.setattr(hooks, "cache_budget", budget_of(0))
    with caplog.at_level(logging.INFO):
        none = flux.sample(flux.accelerate(), size)
    report = cm.reports(caplog)[-1]
    assert torch.equal(none, stock)
    first_line = report.split(" | ")[0]
    assert "ran stock: no device memory was free for caches" in first_line, report
    assert wanted["bytes"] > 0


def test_streamed_caches_take_at_most_a_share_of_the_host_memory_comfyui_finds(flux, pack, monkeypatch, caplog):
    """No device memory and a host link the cost model calls fast: caches are streamed from host
    memory, but only up to ``HOST_CACHE_SHARE`` of what ComfyUI finds available there (stand-in:
    as much as the run wants); the layers past it run stock and the report says why."""
    import comfy.model_management as mm

    hooks = importlib.import_module(f"{pack}.nodes.hooks")
    plan = importlib.import_module(f"{pack}.chipmunk_core.plan")
    monkeypatch.setattr(plan, "BUDGET_QUANTUM", 1)
    monkeypatch.setattr(plan, "DEFAULT_COST", plan.CostModel(host_bandwidth=1e15))
    wanted = {}

    def no_device_memory(patcher, x, rows, want):
        wanted["bytes"] = want
        return 0

    real_free = mm.get_free_memory

    def host_free(dev=None, torch_free_too=False):
        if dev is not None and torch.device(dev).type == "cpu" and not torch_free_too and wanted:
            return wanted["bytes"]
        return real_free(dev, torch_free_too)

    state = importlib.import_module(f"{pack}.chipmunk_core.state")
    plans = []

    def planned(*args, **kwargs):
        plans.append(plan.plan_memory(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(hooks, "cache_budget", no_device_memory)
    monkeypatch.setattr(mm, "get_free_memory", host_free)
    monkeypatch.setattr(state, "plan_memory", planned)
    with caplog.at_level(logging.INFO):
        out = flux.sample(flux.accelerate(), flux.sizes[0])
    report = cm.reports(caplog)[-1]
    assert "streamed from host memory" in report and "host memory for streaming" in report, report
    assert "without caches" in report and cm.step_counts(report)["sparse"] > 0, report
    memory = plans[-1]
    assert memory.host_budget == int(hooks.HOST_CACHE_SHARE * wanted["bytes"])
    assert 0 < memory.host_bytes <= memory.host_budget and memory.device_bytes == 0
    assert plan.OFF in memory.placement.values()
    assert torch.isfinite(out).all()


def test_the_cpu_runs_stock_and_says_so_first(flux, monkeypatch, caplog):
    monkeypatch.delenv("CHIPMUNK_SPARSE_ON_CPU", raising=False)
    size = flux.sizes[0]
    stock = flux.sample(flux.model, size, cfg=3.5)
    with caplog.at_level(logging.INFO):
        out = flux.sample(flux.accelerate(step_cache="off"), size, cfg=3.5)
    report = cm.reports(caplog)[-1]
    assert torch.equal(out, stock)
    first_line = report.split(" | ")[0]
    assert "ran stock: on the CPU" in first_line and "needs a CUDA GPU" in first_line, report


def test_hook_keyframes_change_the_weights_and_sparse_steps_read_them_as_they_are(flux, pack, monkeypatch,
                                                                                     caplog):
    """A LoRA hook on the conditioning whose keyframe turns it off halfway: ComfyUI patches the
    single blocks' fc2 weights in place mid-run. No copy of a weight is kept: every sparse step
    transposes fc2 as the block holds it at that moment (the patched weight in the first half, the
    original in the second), and the run's caches hold no weight (the report's cache size)."""
    import comfy.hooks

    kernels = importlib.import_module(f"{pack}.kernels")
    size, steps = flux.sizes[0], 12
    diffusion_model = flux.model.get_model_object("diffusion_model")
    blocks = list(diffusion_model.single_blocks)
    generator = torch.Generator().manual_seed(3)
    lora = {f"diffusion_model.single_blocks.{i}.linear2.diff":
            0.5 * torch.randn(block.linear2.weight.shape, generator=generator)
            for i, block in enumerate(blocks)}
    group = comfy.hooks.create_hook_lora(lora, strength_model=1.0, strength_clip=1.0)
    keyframes = comfy.hooks.HookKeyframeGroup()
    keyframes.add(comfy.hooks.HookKeyframe(strength=1.0, start_percent=0.0))
    keyframes.add(comfy.hooks.HookKeyframe(strength=0.0, start_percent=0.5))
    group.set_keyframes_on_hooks(keyframes)
    positive, negative, latent = flux.inputs(size)
    positive = comfy.hooks.set_hooks_for_conditioning(positive, group)
    original = [block.linear2.weight[:, block.hidden_size:].clone() for block in blocks]
    doubles = [block.img_mlp[2].weight for block in diffusion_model.double_blocks]

    seen, elsewhere = [], []  # per single block's transpose: whether its source is the original weight
    transpose_into = kernels.transpose_into

    def recording(src, out):
        single = any(torch.equal(src, block.linear2.weight[:, block.hidden_size:]) for block in blocks)
        if single:
            seen.append(any(torch.equal(src, weight) for weight in original))
        elif not any(torch.equal(src, weight) for weight in doubles):
            elsewhere.append(src)  # neither block kind's live weight
        return transpose_into(src, out)

    monkeypatch.setattr(kernels, "transpose_into", recording)

    def sample(model):
        return flux.comfy.ksampler(model, positive, negative, latent, seed=1, steps=steps, cfg=1.0,
                                   sampler_name="euler")

    with caplog.at_level(logging.INFO):
        hooked = sample(flux.accelerate(preset=cm.CUSTOM, first_dense_layers=0))
    report = cm.reports(caplog)[-1]
    assert cm.step_counts(report)["sparse"] > 0, report
    assert not elsewhere and any(seen) and not all(seen)  # the patched weights, then the original ones
    assert not torch.equal(hooked, sample(flux.model))  # (the hook did change the picture)


def test_out_of_memory_mid_run_runs_the_rest_stock_and_loses_no_run(flux, pack, caplog, monkeypatch):
    """The GPU runs out of memory in a sparse step (another program took memory after the plan was
    made): the run's layer caches are released, that call and the rest of the run's layers run
    stock, the step cache goes on, the report says so once, and the picture is finished."""
    kernels = importlib.import_module(f"{pack}.kernels")
    size = flux.sizes[0]
    sparse_mlp_delta, calls = kernels.sparse_mlp_delta, []

    def failing(*args, **kwargs):
        calls.append(None)
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return sparse_mlp_delta(*args, **kwargs)

    monkeypatch.setattr(kernels, "sparse_mlp_delta", failing)
    with caplog.at_level(logging.INFO):
        out = flux.sample(flux.accelerate(step_cache="fixed"), size, steps=14)
    report = cm.reports(caplog)[-1]
    counts = cm.step_counts(report)
    assert torch.isfinite(out).all()
    assert report.count("ran out of memory") == 1 and "Tried to allocate 2.00 GiB" in report, report
    assert counts["sparse"] >= 1 and counts["stock"] >= 1 and counts["skipped"] >= 1, report
    assert len(calls) == 3  # nothing sparse after it


def test_same_picture_whether_another_model_is_loaded_or_not(flux, pack, monkeypatch):
    """The plan asks ComfyUI to free what the caches need (as ComfyUI does for its own inference),
    so an idle model left loaded by an earlier workflow is unloaded and the plan, and the picture,
    are those of a fresh start. Stand-in: the CPU's free memory is a fixed amount less the models
    other than this one that ComfyUI has loaded. The control keeps the other model loaded (the
    pack's request to free memory dropped): the caches no longer fit and the picture changes."""
    import comfy.model_management as mm

    hooks = importlib.import_module(f"{pack}.nodes.hooks")
    plan = importlib.import_module(f"{pack}.chipmunk_core.plan")
    monkeypatch.setattr(plan, "BUDGET_QUANTUM", 1)
    monkeypatch.setattr(hooks, "BUDGET_DEVICES", ("cuda", "cpu"))
    size = flux.sizes[0]
    ours = flux.model.model
    limit = {"bytes": 1 << 50}

    def others():
        return sum(loaded.model_loaded_memory() for loaded in mm.current_loaded_models
                   if loaded.model.model is not ours)

    def free(dev=None, torch_free_too=False):
        amount = limit["bytes"] - others()
        return (amount, amount) if torch_free_too else amount

    monkeypatch.setattr(mm, "get_free_memory", free)
    real_budget, real_free_memory = hooks.cache_budget, mm.free_memory
    in_pack, asked, drop_the_packs_request = [], [], []

    def budget(*args, **kwargs):  # marks the pack's own calls into ComfyUI
        in_pack.append(True)
        try:
            return real_budget(*args, **kwargs)
        finally:
            in_pack.pop()

    def free_memory(memory_required, device, keep_loaded=[], **kwargs):
        if in_pack:
            asked.append(memory_required)  # caches plus working memory
            if drop_the_packs_request:
                return []
        return real_free_memory(memory_required, device, keep_loaded, **kwargs)

    monkeypatch.setattr(hooks, "cache_budget", budget)
    monkeypatch.setattr(mm, "free_memory", free_memory)
    alone = flux.sample(flux.accelerate(), size)
    assert asked, "the plan did not ask ComfyUI for memory"
    limit["bytes"] = asked[-1]  # just what the run needs, with nothing else loaded

    other = flux.comfy.narrow_flux()
    mm.load_models_gpu([other])
    assert others() > 0
    assert torch.equal(flux.sample(flux.accelerate(), size), alone)
    assert others() == 0  # unloaded for the caches

    mm.load_models_gpu([other])
    drop_the_packs_request.append(True)
    crowded = flux.sample(flux.accelerate(), size)
    assert others() > 0 and not torch.equal(crowded, alone)
    mm.unload_all_models()


SPARSE = dict(preset=cm.CUSTOM, attention_sparsity=0.8, mlp_sparsity=0.7, first_dense_layers=0)


def _folded_and_separate(pack, monkeypatch, caplog, sample):
    """``sample()`` with the plan's folded layers and with none folded, and each run's report."""
    adapters = importlib.import_module(f"{pack}.chipmunk_core.adapters")
    runs = []
    for folding in (True, False):
        if not folding:
            monkeypatch.setattr(adapters.ModelPlan, "folded_layers", property(lambda self: frozenset()))
        with caplog.at_level(logging.INFO):
            runs.append((sample(), cm.reports(caplog)[-1]))
    return runs


def test_single_blocks_keep_their_attention_delta_in_the_mlp_output_cache(flux, pack, monkeypatch, caplog):
    """FLUX's single blocks map attention and MLP through one linear2: their attention delta is kept
    as linear2 maps it, inside the MLP's output cache (one cache instead of two; sizes in
    tests/core/test_memory.py). The picture is the one two caches give, and the report says so."""
    (folded, report), (separate, separate_report) = _folded_and_separate(
        pack, monkeypatch, caplog, lambda: flux.sample(flux.accelerate(**SPARSE), flux.sizes[0], cfg=3.5))
    assert "folded into their MLP output caches" in report, report
    assert "folded" not in separate_report
    assert cm.step_counts(report)["sparse"] > 0
    gap = _relative(folded, separate)
    print(f"folded against separate caches: {gap:.1e}")
    assert 0 <= gap < 1e-5


def test_a_folded_layer_whose_attention_goes_elsewhere_turns_dense_for_that_step(flux, pack, monkeypatch):
    """When another attention path takes a sparse step of a folded layer (its MLP cache holds the
    attention delta the full attention already contains), that layer's MLP runs dense for the
    step instead of adding the delta twice; the picture stays where a sparse run is."""
    state = importlib.import_module(f"{pack}.chipmunk_core.state")
    replacements = importlib.import_module(f"{pack}.chipmunk_core.adapters.replacements")
    size = flux.sizes[0]
    stock = flux.sample(flux.model, size, cfg=3.5)
    undisturbed = flux.sample(flux.accelerate(**SPARSE), size, cfg=3.5)
    serve, taken = state.LayerCall.attention, []

    def once_elsewhere(self, *args, **kwargs):
        if self.fold == "sparse" and not taken:
            taken.append(self.index)
            return None  # ComfyUI's own attention computes it
        return serve(self, *args, **kwargs)

    monkeypatch.setattr(state.LayerCall, "attention", once_elsewhere)
    runs, end_call = [], state.SamplingRun.end_call
    monkeypatch.setattr(state.SamplingRun, "end_call", lambda self, call: (runs.append(self), end_call(self, call)))
    # That block's update on that step is the stock block's (full attention, dense MLP), not one
    # with the attention delta counted twice.
    block_gaps, single_block = [], replacements.single_block

    def checked(block, layer, x, vec, pe, *args, **kwargs):
        before = x.clone()
        out = single_block(block, layer, x, vec, pe, *args, **kwargs)
        if taken and not block_gaps and layer is not None and layer.index == taken[0]:
            expected = type(block).forward(block, before.clone(), vec=vec, pe=pe)
            block_gaps.append(_relative(out - before, expected - before))
        return out

    monkeypatch.setattr(replacements, "single_block", checked)
    disturbed = flux.sample(flux.accelerate(**SPARSE), size, cfg=3.5)
    gap, sparse_gap = _relative(disturbed, undisturbed), _relative(undisturbed, stock)
    print(f"one sparse step of layer {taken[0]} elsewhere: block update against stock {block_gaps[0]:.1e}, "
          f"picture {gap:.1e} (sparse against stock {sparse_gap:.1e})")
    assert runs[-1].stats["folded layer made dense"] == 1
    assert block_gaps[0] < 1e-5
    assert torch.isfinite(disturbed).all() and 0 < gap < sparse_gap


def test_hunyuan_video_single_blocks_fold_with_padded_text_too(comfy_inprocess, chipmunk_pack_nodes,
                                                               tiny_models_dir, pack, monkeypatch, caplog):
    """HunyuanVideo's single blocks fold as FLUX's do where their MLP is sparse (its default MLP
    sparsity is 0), with the text's padding keys dropped by the attention: the same picture."""
    kind, sample = hunyuan_with_padded_text(comfy_inprocess, chipmunk_pack_nodes, tiny_models_dir)
    (folded, report), (separate, _) = _folded_and_separate(
        pack, monkeypatch, caplog, lambda: sample(kind.accelerate(**SPARSE)))
    assert "folded into their MLP output caches" in report and cm.step_counts(report)["sparse"] > 0, report
    gap = _relative(folded, separate)
    print(f"HunyuanVideo, padded text: folded against separate caches {gap:.1e}")
    assert 0 <= gap < 1e-5
