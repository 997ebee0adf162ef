"""Sparse model calls replayed as CUDA graphs: the facts a call and the run's set-up show, the
plan's verdict carried out (``plan.graph_verdict``), and a replay that checks its weights stayed put.
Per-run results live in the run's ``RunContext`` (``context.graphs``, ``context.stock_from_now``)."""

from __future__ import annotations

import logging

import torch

from ..chipmunk_core import plan as run_plan
from ..chipmunk_core.adapters.weights import PagedWeights
from ..chipmunk_core.graphs import CaptureFailed
from .options import HOOK_KEY, OVERRIDE, name, transformer_options, with_transformer_options

COMPILE_OPTION = "torch_compile_kwargs"  # model_options key of ComfyUI's TorchCompileModel
GRAPH_DEVICES = ("cuda",)  # device types whose sparse calls are graphed (tests add "cpu" with a stand-in backend)


@torch.compiler.disable
def verdict(context, call, args, kwargs):
    """The plan's verdict on this call (``plan.graph_verdict``) from what the call shows; the run's
    set-up is read at its first candidate call (``_graph_setup``)."""
    run = call.run
    options = transformer_options(args, kwargs) or {}
    facts = run_plan.CallFacts(
        dense=call.dense, stock_layers=call.stock_layers, has_control=call.has_control,
        graph_device=call.seeds.device.type in GRAPH_DEVICES,  # (the seeds live on the latent's device)
        nested_tensors=any(_holds_tensors(a) for a in list(args) + list(kwargs.values()) if a is not options))

    def setup_blocker():
        if context.graphs is None:
            context.graphs = setup(context, call, options)
            if context.graphs[0] == "off":
                run.note("graphs", f"CUDA graphs of the sparse steps are off: {context.graphs[1]}", logging.INFO)
        return context.graphs[1] if context.graphs[0] == "off" else None

    verdict = run_plan.graph_verdict(call.config, run.step_cache_schedule, call.step, facts, setup_blocker)
    if verdict == run_plan.NESTED_TENSORS:
        run.note("graphs nested", "CUDA graphs of the sparse steps are off for calls that pass tensors inside "
                                  "lists (reference latents and the like)", logging.INFO)
    elif verdict == run_plan.ADAPTIVE_CACHE:
        run.note("graphs adaptive", "CUDA graphs of the sparse steps are off with the adaptive step cache (it "
                                    "decides inside the model call); the fixed schedule keeps them", logging.INFO)
    return verdict


def dynamic_vram(patcher) -> bool:
    """Whether ComfyUI's dynamic VRAM (comfy-aimdo) manages the model's weights."""
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


@torch.compiler.disable
def stock_where_eager_loses(context, call, why: str):
    """A sparse call that cannot be replayed (``why``): where the plan says eager sparse steps lose
    to stock (``plan.eager_runs_stock``), its layers and every later call's run stock; step
    caching, if on, still skips steps."""
    if not run_plan.eager_runs_stock(dynamic_vram(context.patcher)):
        return
    context.run_stock_from(call)
    call.run.note("eager loses", f"layers run stock from this step on: under ComfyUI's dynamic VRAM the sparse "
                                 f"steps of this model are slower than stock unless replayed as CUDA graphs, and "
                                 f"these cannot be ({why})")


@torch.compiler.disable
def stock_after_out_of_memory(context, call, error):
    """The GPU ran out of memory inside a Chipmunk call: free the layers' caches; this call (run
    again by the caller) and the rest of the run run their layers stock; say so once."""
    freed = context.run.drop_layer_caches()
    context.run_stock_from(call)
    call.skipped = False
    reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    size = f"{freed / 2**30:.2f} GiB" if freed >= 2**30 else f"{freed / 2**20:.0f} MiB"
    context.run.note("out of memory", f"the GPU ran out of memory in a Chipmunk step ({reason}): its caches "
                                      f"({size}) were released and the rest of the run's layers ran stock")


def _holds_tensors(value) -> bool:
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, torch.Tensor) or _holds_tensors(v) for v in value)
    if isinstance(value, dict):
        return any(isinstance(v, torch.Tensor) or _holds_tensors(v) for v in value.values())
    return False


def setup(context, call, options: dict):
    """("on", (the weights a graph reads, PagedWeights or None)) or ("off", why), worked out at the
    run's first sparse call."""
    import comfy.patcher_extension

    patcher = context.patcher
    if patcher is None:
        return "off", "the model is sampled outside ComfyUI's sampler"
    if COMPILE_OPTION in patcher.model_options:
        return "off", "torch.compile is applied to this model (its own graphs and Chipmunk's would nest)"
    if getattr(patcher.model, "model_lowvram", False):
        return "off", "the model is partly offloaded (low VRAM): its weights move during a step"
    wrappers = list((options.get("wrappers") or {}).get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {}))
    inside = [str(key) for key in wrappers[wrappers.index(HOOK_KEY) + 1:]] if HOOK_KEY in wrappers else []
    if inside:  # their Python would be captured into the graph (innermost_model_wrapper prevents it)
        return "off", f"other nodes wrap the model call inside Chipmunk ({', '.join(inside)})"
    patches = {name: p for name, p in (options.get("patches") or {}).items() if p}
    if patches:
        return "off", f"other nodes patch the model ({', '.join(sorted(patches))})"
    replaced = (options.get("patches_replace") or {}).get("dit", {})
    if any(getattr(patch, "chipmunk_wraps", None) is not None for patch in replaced.values()):
        return "off", "another node replaces blocks of the model"
    previous = getattr(options.get(OVERRIDE), "previous", None)
    if previous is not None and not comfyui_own(previous):
        # another node's override may decide on the host per call (a step counter, a schedule),
        # which a replay would not repeat; ComfyUI's own ("Model Attention Backend", "Model
        # Sparse Attention") are captured with the call (a capture that fails is undone)
        return "off", f"another node's attention override is installed ({name(previous)})"
    weights = list(call.diffusion_model.parameters()) + list(call.diffusion_model.buffers())
    paged = None
    if dynamic_vram(patcher):
        # Dynamic VRAM: the GPU reads each paged layer's weight in its reserved range; a replay
        # first checks that every range still holds it (PagedWeights).
        paged = PagedWeights.of(call.diffusion_model)
        gpu_weights = None if paged is None else paged.gpu_weights()
        if gpu_weights is None:
            return "off", ("ComfyUI's dynamic VRAM pages the weights in a way this pack does not know "
                           "(start ComfyUI with --disable-dynamic-vram to replay sparse steps as CUDA graphs)")
        weights = [t for t in weights if not paged.owns(t)] + gpu_weights
    if any(t.device.type not in GRAPH_DEVICES for t in weights):
        return "off", "some of the model's weights are not on the GPU"
    return "on", (tuple(weights), paged)


def comfyui_own(function) -> bool:
    """Whether a callable comes from ComfyUI itself (its core nodes' attention overrides)."""
    module = getattr(getattr(function, "func", function), "__module__", None) or ""
    return module.split(".")[0] in ("comfy", "comfy_extras", "comfy_api")


def graphed_call(executor, context, call, args, kwargs):
    """The model call through ``SamplingRun.replay_or_run``: every tensor argument (and the call's
    random-pick seeds) is an input of the graph; the output is copied out of the graph's memory."""
    options = transformer_options(args, kwargs)
    positional = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    named = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    in_options = [k for k, v in options.items() if isinstance(v, torch.Tensor)]
    inputs = (tuple(args[i] for i in positional) + tuple(kwargs[k] for k in named)
              + tuple(options[k] for k in in_options) + (call.seeds,))

    def model_call(*tensors):
        *tensors, call.seeds = tensors
        new_args = list(args)
        for i, t in zip(positional, tensors):
            new_args[i] = t
        new_kwargs = {**kwargs, **dict(zip(named, tensors[len(positional):]))}
        new_options = {**options, **dict(zip(in_options, tensors[len(positional) + len(named):]))}
        new_args, new_kwargs = with_transformer_options(tuple(new_args), new_kwargs, options, new_options)
        return executor(*new_args, **new_kwargs)

    weights, paged = context.graphs[1]
    if paged is not None and not paged.resident():
        # Dynamic VRAM paged some weights out (another model, memory pressure): ComfyUI's ops
        # bring them back on an eager call, after which the graphs hold again (same addresses).
        call.run.stats["graph eager calls"] += 1
        call.run.note("graphs paged", "dynamic VRAM had paged weights out: those sparse steps ran eagerly",
                      logging.INFO)
        return executor(*args, **kwargs)
    try:
        out, _ = call.run.replay_or_run(call, model_call, inputs, weights)
    except CaptureFailed as error:
        # Something inside the call cannot be captured (a host synchronisation in a model's code,
        # memory): eager for the rest of the run, said once.
        call.caches.graphs.reset()
        call.seeds = inputs[-1]
        context.graphs = ("off", f"capturing a step failed ({error})")
        call.run.note("graphs", f"CUDA graphs of the sparse steps are off: capturing a step failed ({error})")
        return executor(*args, **kwargs)
    return out.clone()
