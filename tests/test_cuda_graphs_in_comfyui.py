"""Sparse steps replayed as CUDA graphs, in a real ComfyUI process (narrow FLUX).

CUDA graphs need a GPU; on the CPU a stand-in backend takes their place. It keeps what a graph
does to the step: the capture and the replay that follows it compute the step once, each later
replay computes it again from the static inputs. Unlike a graph it runs the Python again, so the
run's bookkeeping must come out the same as without graphs only because the hooks restore it.
"""

from __future__ import annotations

import logging

import pytest
import torch

from harness import chipmunk as cm
from test_accelerate import _relative, narrow_flux

pytestmark = [pytest.mark.comfyui, pytest.mark.chipmunk_node]


class StandInBackend:
    def capture(self, fn, static_inputs):
        outputs = fn(*static_inputs)
        return {"fn": fn, "inputs": static_inputs, "outputs": outputs, "fresh": True}, outputs

    def replay(self, graph):
        if graph.pop("fresh", False):  # the capture computed this step
            return
        graph["outputs"].copy_(graph["fn"](*graph["inputs"]))


class CaptureFailsInside(StandInBackend):
    """A capture that fails inside the step, after its Python advanced host-side state, and before
    any cache was written (a CUDA capture executes nothing, so a failed one writes nothing): the
    pack's ``block_means``, the first kernel of an MLP's re-ranking, raises while capturing."""

    capturing = False

    def capture(self, fn, static_inputs):
        CaptureFailsInside.capturing = True
        try:
            return super().capture(fn, static_inputs)
        finally:
            CaptureFailsInside.capturing = False


@pytest.fixture
def graphs_on_cpu(monkeypatch, chipmunk_pack_nodes):
    """The pack's hooks module as the node uses it (ComfyUI loaded the pack under its folder name),
    with CPU calls graphed by the stand-in backend."""
    import importlib

    package = chipmunk_pack_nodes["ChipmunkAccelerate"].__module__.split(".")[0]
    hooks = importlib.import_module(f"{package}.nodes.hooks")
    graphs = importlib.import_module(f"{package}.chipmunk_core.graphs")
    monkeypatch.setattr(importlib.import_module(f"{package}.nodes.graph_calls"), "GRAPH_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(graphs, "CudaGraphBackend", StandInBackend)
    return hooks


def graph_calls(hooks):
    """The pack's graph_calls module beside ``hooks`` (as ComfyUI loaded the pack)."""
    import importlib

    return importlib.import_module(hooks.__name__.rsplit(".", 1)[0] + ".graph_calls")


@pytest.fixture(scope="module")
def flux(comfy_inprocess, chipmunk_pack_nodes):
    return narrow_flux(comfy_inprocess, chipmunk_pack_nodes)


def _report(caplog):
    return cm.reports(caplog)[-1]


@pytest.mark.parametrize("step_cache", ["off", "fixed"])
def test_graphed_sparse_steps_match_eager_ones(flux, graphs_on_cpu, step_cache, caplog):
    """Every sparse call after the first two of each MLP-ranking pattern is replayed; the output and
    the report's counts are those of the same run without graphs."""
    size = flux.sizes[0]
    with caplog.at_level(logging.INFO):
        hooks = graphs_on_cpu
        eager = flux.sample(hooks.accelerate(flux.model, step_cache=step_cache, cuda_graphs=False), size, steps=20,
                            cfg=3.5)
        eager_report = _report(caplog)
        graphed = flux.sample(hooks.accelerate(flux.model, step_cache=step_cache), size, steps=20, cfg=3.5)
        report = _report(caplog)
    assert "CUDA graphs:" in report and "CUDA graphs:" not in eager_report
    replayed = int(report.split("CUDA graphs: ")[1].split(" ")[0])
    assert replayed > 0, report
    assert cm.step_counts(report) == cm.step_counts(eager_report)
    sparsity = [line for line in report.split(" | ") if line.startswith("achieved sparsity")]
    assert sparsity == [line for line in eager_report.split(" | ") if line.startswith("achieved sparsity")]
    assert torch.isfinite(graphed).all() and _relative(graphed, eager) < 1e-5


def test_another_nodes_model_wrapper_runs_outside_the_graphs(flux, graphs_on_cpu, caplog):
    """A node that wraps the model call (applied after Chipmunk, so registered outside it) is moved
    outside Chipmunk's wrapper for the run: its Python runs on every call, the graphs stay on."""
    import comfy.patcher_extension

    size = flux.sizes[0]
    patched = flux.accelerate()
    wrapped = patched.clone()
    seen = []

    def another_nodes_wrapper(executor, *args, **kwargs):
        seen.append(1)
        return executor(*args, **kwargs)

    wrapped.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "another-node",
                                 another_nodes_wrapper)
    with caplog.at_level(logging.INFO):
        flux.sample(wrapped, size, steps=12)
    report = _report(caplog)
    assert "other nodes wrap the model call (another-node): Chipmunk's wrapper runs inside theirs" in report
    assert int(report.split("CUDA graphs: ")[1].split(" ")[0]) > 0, report
    assert len(seen) == 12  # every call, replayed ones included, went through the other node's Python
    wrappers = wrapped.wrappers[comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL]
    assert list(wrappers) == [graphs_on_cpu.HOOK_KEY, "another-node"]  # the user's model is not reordered


def test_chipmunk_under_core_easycache_keeps_its_graphs(comfy_inprocess, flux, graphs_on_cpu, caplog):
    """Model -> Chipmunk Accelerate -> EasyCache: EasyCache skips calls around Chipmunk, and the
    calls it computes are Chipmunk's sparse steps, replayed as graphs, equal to eager ones."""
    from comfy_extras.nodes_easycache import EasyCacheNode

    size = flux.sizes[0]

    def with_easycache(**settings):
        (model,) = comfy_inprocess.run_node(EasyCacheNode, model=graphs_on_cpu.accelerate(flux.model, **settings),
                                            reuse_threshold=0.2, start_percent=0.15, end_percent=0.95,
                                            verbose=False)
        return model

    with caplog.at_level(logging.INFO):
        eager = flux.sample(with_easycache(cuda_graphs=False), size, steps=20, cfg=3.5)
        eager_report = _report(caplog)
        graphed = flux.sample(with_easycache(), size, steps=20, cfg=3.5)
        report = _report(caplog)
    assert "other nodes wrap the model call (easycache)" in report
    assert int(report.split("CUDA graphs: ")[1].split(" ")[0]) > 0, report
    assert cm.step_counts(report) == cm.step_counts(eager_report)
    assert torch.isfinite(graphed).all() and _relative(graphed, eager) < 1e-5


def test_graphs_stay_off_where_chipmunk_cannot_capture_the_call(flux, graphs_on_cpu, caplog):
    size = flux.sizes[0]
    patched = flux.accelerate()
    with caplog.at_level(logging.INFO):
        flux.sample(flux.accelerate(step_cache="adaptive"), size, steps=12)
    assert "off with the adaptive step cache" in _report(caplog)
    compiled = patched.clone()
    compiled.model_options[graph_calls(graphs_on_cpu).COMPILE_OPTION] = {"backend": "inductor"}
    with caplog.at_level(logging.INFO):
        flux.sample(compiled, size, steps=12)
    assert "torch.compile is applied" in _report(caplog)


def test_comfyuis_own_attention_override_keeps_the_graphs(flux, graphs_on_cpu, caplog):
    """An attention override of ComfyUI's core nodes ("Model Attention Backend", "Model Sparse
    Attention" of autumn 2026; here a stand-in marked as core's) is chained and captured with the
    call: the sparse steps replay and the picture is the eager one with that override. Another
    node's override keeps the graphs off and says whose it is."""
    size = flux.sizes[0]
    served = []

    def backend(func, *args, **kwargs):
        served.append(1)
        return func(*args, **kwargs)

    def with_override(model, module):
        backend.__module__ = module
        other = model.clone()
        other.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = backend
        return other

    hooks = graphs_on_cpu
    core = with_override(flux.model, "comfy_extras.nodes_attention_backend")
    with caplog.at_level(logging.INFO):
        eager = flux.sample(hooks.accelerate(core, cuda_graphs=False), size, steps=20)
        graphed = flux.sample(hooks.accelerate(core), size, steps=20)
    report = _report(caplog)
    assert int(report.split("CUDA graphs: ")[1].split(" ")[0]) > 0, report
    assert served and _relative(graphed, eager) < 1e-5
    custom = with_override(flux.model, "custom_nodes.some_pack")
    with caplog.at_level(logging.INFO):
        flux.sample(hooks.accelerate(custom), size, steps=20)
    report = _report(caplog)
    assert "another node's attention override is installed (custom_nodes.some_pack" in report, report
    assert "CUDA graphs:" not in report


def test_a_step_that_cannot_be_captured_runs_eagerly_and_says_so(flux, graphs_on_cpu, monkeypatch, caplog):
    import importlib

    graphs = importlib.import_module(graphs_on_cpu.__name__.rsplit(".", 2)[0] + ".chipmunk_core.graphs")

    class FailingBackend(StandInBackend):
        def capture(self, fn, static_inputs):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "CudaGraphBackend", FailingBackend)
    size = flux.sizes[0]
    eager = flux.sample(graphs_on_cpu.accelerate(flux.model, cuda_graphs=False), size, steps=12)
    with caplog.at_level(logging.INFO):
        out = flux.sample(graphs_on_cpu.accelerate(flux.model), size, steps=12)
    report = _report(caplog)
    assert "capturing a step failed (RuntimeError: operation not permitted" in report
    assert torch.equal(out, eager)


@pytest.mark.parametrize("step_cache", ["off", "fixed"])
def test_under_dynamic_vram_sparse_steps_replay_and_those_that_cannot_run_stock(flux, graphs_on_cpu, monkeypatch,
                                                                                step_cache, caplog):
    """Under dynamic VRAM a model none of whose layers is paged (as on the CPU) replays its sparse
    steps as usual, skipped steps included. Where the graphs cannot be used, eager sparse FLUX
    steps lost to stock (GPU numbers in the README): the run's layers go stock from its first
    sparse step on and the report says why; step caching still skips its steps."""
    monkeypatch.setattr(graph_calls(graphs_on_cpu), "dynamic_vram", lambda patcher: True)
    size = flux.sizes[0]
    with caplog.at_level(logging.INFO):
        flux.sample(graphs_on_cpu.accelerate(flux.model, step_cache=step_cache), size, steps=20)
    report = _report(caplog)
    counts = cm.step_counts(report)
    assert "CUDA graphs:" in report and "layers run stock" not in report
    assert counts["sparse"] > 0 and counts["stock"] == 0 and (counts["skipped"] > 0) == (step_cache == "fixed")

    compiled = graphs_on_cpu.accelerate(flux.model, step_cache=step_cache).clone()
    compiled.model_options[graph_calls(graphs_on_cpu).COMPILE_OPTION] = {"backend": "inductor"}  # (only its presence is read)
    with caplog.at_level(logging.INFO):
        flux.sample(compiled, size, steps=20)
    report = _report(caplog)
    counts = cm.step_counts(report)
    assert "layers run stock from this step on: under ComfyUI's dynamic VRAM" in report
    assert "torch.compile is applied" in report
    assert counts["dense"] == 2 and counts["sparse"] == 0
    assert (counts["skipped"] > 0) == (step_cache == "fixed")
    assert counts["stock"] + counts["skipped"] == 18


def test_the_size_rule_is_stricter_where_the_weights_are_paged(flux, graphs_on_cpu, monkeypatch, caplog):
    """min_sparse_tokens (measured on the GPU; the CPU is added to its devices here) sends small
    latents stock; under dynamic VRAM min_sparse_tokens_paged does, and the report says which."""
    import importlib

    run_plan = importlib.import_module(graphs_on_cpu.__name__.rsplit(".", 2)[0] + ".chipmunk_core.plan")
    monkeypatch.setattr(run_plan, "SIZE_RULE_DEVICES", ("cuda", "cpu"))
    size = flux.sizes[0]
    rule = dict(min_sparse_tokens=0, min_sparse_tokens_paged=10 ** 6)
    for dynamic, stock in ((False, False), (True, True)):
        monkeypatch.setattr(graph_calls(graphs_on_cpu), "dynamic_vram", lambda patcher: dynamic)
        with caplog.at_level(logging.INFO):
            flux.sample(graphs_on_cpu.accelerate(flux.model, **rule), size, steps=12)
        report = _report(caplog)
        assert (cm.step_counts(report)["stock"] == 12) == stock, report
        assert ("with the weights paged in per layer (dynamic VRAM): layers run stock" in report) == stock
    monkeypatch.setattr(graph_calls(graphs_on_cpu), "dynamic_vram", lambda patcher: False)
    with caplog.at_level(logging.INFO):
        flux.sample(graphs_on_cpu.accelerate(flux.model, min_sparse_tokens=10 ** 6), size, steps=12)
    report = _report(caplog)
    assert cm.step_counts(report)["stock"] == 12 and "where sparse steps pay off on the GPUs measured: layers" in report


def test_a_capture_failing_inside_the_step_is_undone_and_the_step_runs_eager(flux, graphs_on_cpu, monkeypatch,
                                                                            caplog):
    """The failed capture's host-side changes (the MLPs' ranking counters, selection buffers made
    during it) are rolled back: the run is bit for bit the run without graphs, and says why."""
    import importlib

    package = graphs_on_cpu.__name__.rsplit(".", 2)[0]
    graphs = importlib.import_module(package + ".chipmunk_core.graphs")
    kernels = importlib.import_module(package + ".kernels")
    size = flux.sizes[0]
    eager = flux.sample(graphs_on_cpu.accelerate(flux.model, cuda_graphs=False), size, steps=20, cfg=3.5)
    block_means = kernels.block_means

    def failing_while_capturing(*args, **kwargs):
        if CaptureFailsInside.capturing:
            raise RuntimeError("operation not permitted when stream is capturing")
        return block_means(*args, **kwargs)

    monkeypatch.setattr(kernels, "block_means", failing_while_capturing)
    monkeypatch.setattr(graphs, "CudaGraphBackend", CaptureFailsInside)
    graphs.PROCESS_WARM.clear()
    with caplog.at_level(logging.INFO):
        failed = flux.sample(graphs_on_cpu.accelerate(flux.model), size, steps=20, cfg=3.5)
    report = _report(caplog)
    assert "capturing a step failed (RuntimeError: operation not permitted" in report, report
    assert cm.step_counts(report)["sparse"] > 0 and cm.step_counts(report)["stock"] == 0
    assert torch.equal(failed, eager)
