"""The ComfyUI hooks that put Chipmunk into a sampling run. Nothing of a model's code is copied here.

- At node time the cloned MODEL gets light things only (``clone()`` copies model_options): an
  ``Accelerator`` (settings, the model plan), two wrappers, one block patch per block, and object
  patches for the MLPs the plan may replace (shallow copies of the stock modules with another
  ``forward``; same children, so LoRA, offload and weight casting see the same parameters).
- OUTER_SAMPLE creates the run's state (a ``RunContext``, kept in the run's own cloned model
  options, so a nested sampling gets its own) when sampling starts and always releases it
  (``finally``); afterwards the run report goes to the console and onto the node.
- SAMPLER_SAMPLE keeps the run's conditioning on the sampling device (``conditioning_on_device``).
- DIFFUSION_MODEL turns each model call into a ``ModelCall`` (step, dense / sparse / skipped,
  caches of this conditioning) and installs Chipmunk's attention override for the call, chained
  to whatever override was there (another node's backend or sparse attention gets every call
  Chipmunk does not serve).
- The block patches tell each layer which tokens it holds (text and image streams, as the stock
  block receives them) and implement step caching; the stock block always runs, or none at all.

Sparse calls replayed as CUDA graphs are carried out in ``graph_calls``, the MLP replacements'
forwards live in ``mlp_forwards``, the keys of what the hooks keep in ComfyUI's options in
``options``; what runs is decided by the core's run plan.
"""

from __future__ import annotations

import functools
import logging
import threading
import time

import torch

from ..chipmunk_core import SLIDER_FIELDS, ChipmunkConfig, SamplingRun, plan_for, resolve_config
from . import graph_calls, mlp_forwards, report
from .options import (ACCEL_KEY, CALL_KEY, HOOK_KEY, LAYER_KEY, MULTIGPU_THREAD, OVERRIDE, RUN_KEY, name,
                      transformer_options, with_transformer_options)

logger = logging.getLogger(__name__)
_FIRST_GPU_RUN = [True]  # emptied by the first sparse run on a GPU in this process (it compiles the kernels)

class Accelerator:
    """What one Chipmunk Accelerate node put on a model: settings and the model plan, nothing of a
    run. Shared by the clones of that model (copying it returns itself)."""

    def __init__(self, adapter, plan, config: ChipmunkConfig, node_id=None, unused_inputs=()):
        self.adapter = adapter
        self.plan = plan
        self.config = config
        self.node_id = node_id
        self.unused_inputs = tuple(unused_inputs)  # node inputs shown but not in effect
        self.last_report = None  # the report of the last run, as logged
        self.passed_checks: set[str] = set()  # self-checks this model's code passed (failures are per run)
        self._local = threading.local()  # the model calls in progress on this thread (MLP proxies read them)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def calls(self) -> list:
        if not hasattr(self._local, "calls"):
            self._local.calls = []
        return self._local.calls

    def layer(self, index: int):
        """The LayerCall of ``index`` in the innermost model call in progress on this thread, or None."""
        calls = self.calls()
        return calls[-1].layers.get(index) if calls else None


class RunContext:
    """One sampling run of a Chipmunk-patched model, kept in that run's cloned model options
    (``RUN_KEY``): the core's ``SamplingRun`` and what the hooks learn of ComfyUI's set-up during
    the run. Everything here ends with the run: a failed self-check or capture is retried by the
    next one."""

    def __init__(self, accelerator: Accelerator, run: SamplingRun, patcher):
        self.accelerator = accelerator
        self.run = run
        self.patcher = patcher
        self.graphs = None  # ("off", reason) or ("on", (weights, PagedWeights or None)), once known
        self.stock_from_now = False  # later calls run their layers stock (run_stock_from)
        self.checks: dict[str, str | None] = {}  # self-check kind -> failure (None: passed)

    def run_stock_from(self, call):
        """This call's layers and every later call's run stock (step caching, if on, goes on)."""
        call.stock_layers = self.stock_from_now = True


def accelerate(model, node_id=None, unused_inputs=(), **settings):
    """A clone of ``model`` patched to sample with Chipmunk (``settings``: ChipmunkConfig fields).

    Raises ValueError for models Chipmunk does not support or settings it cannot use.
    """
    adapter, plan = plan_for(model.get_model_object("diffusion_model"))
    config = resolve_config(adapter.family, **settings)
    if plan.attention_only_reason and config.sparse_mlp:
        config = config.replace(mlp_sparsity=0.0)
    if plan.step_cache_reason and config.step_cache != "off":
        logger.warning("Chipmunk: step caching is off for %s: %s", plan.model_name, plan.step_cache_reason)
        config = config.replace(step_cache="off")
    patched = model.clone()
    install(patched, Accelerator(adapter, plan, config, node_id, unused_inputs))
    return patched


def install(model, accelerator: Accelerator):
    """Patch a (cloned) ModelPatcher; applying the node again replaces the earlier Chipmunk patches."""
    import comfy.patcher_extension

    options = model.model_options.setdefault("transformer_options", {})
    options[ACCEL_KEY] = accelerator
    for kind, wrapper in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, outer_sample_wrapper),
                          (comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, sampler_sample_wrapper),
                          (comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, diffusion_model_wrapper)):
        model.remove_wrappers_with_key(kind, HOOK_KEY)
        model.add_wrapper_with_key(kind, HOOK_KEY, wrapper)
    existing = options.get("patches_replace", {}).get("dit", {})
    plan = accelerator.plan
    for position, (kind, index) in enumerate(plan.block_keys):
        patch = functools.partial(block_hook, kind, index, position)
        user_patch = existing.get((kind, index))
        user_patch = getattr(user_patch, "chipmunk_wraps", user_patch)  # ours from an earlier node: replace
        if user_patch is not None:
            wrapped = functools.partial(wrapped_by_user_patch, user_patch, patch)
            wrapped.chipmunk_wraps = user_patch
            patch = wrapped
        else:
            patch.chipmunk_wraps = None
        model.set_model_patch_replace(patch, "dit", kind, index)
    if accelerator.config.sparse_mlp:
        for site in plan.mlp_sites:
            stock = model.get_model_object(site.path)
            model.add_object_patch(site.path, mlp_forwards.mlp_proxy(stock, accelerator, site))


# --- sampling run ----------------------------------------------------------------------------------
def outer_sample_wrapper(executor, *args, **kwargs):
    import comfy.model_patcher

    guider = executor.class_obj
    accelerator = guider.model_options["transformer_options"].get(ACCEL_KEY)
    if accelerator is None:
        return executor(*args, **kwargs)
    sigmas = args[3]
    seed = kwargs.get("seed", args[7] if len(args) > 7 else None)
    patcher = guider.model_patcher
    diffusion_model = patcher.get_model_object("diffusion_model")
    run = SamplingRun(accelerator.config, sample_sigmas=sigmas, seed=seed,
                      dims=accelerator.adapter.dims(diffusion_model),
                      memory_budget=functools.partial(cache_budget, patcher),
                      host_budget=host_cache_budget,
                      mlp_layers=accelerator.plan.mlp_layers if accelerator.config.sparse_mlp else frozenset(),
                      image_mlp_layers=accelerator.plan.image_mlp_layers,
                      folded_layers=accelerator.plan.folded_layers,
                      starts_mid_schedule=_starts_mid_schedule(patcher, sigmas),
                      paged_weights=graph_calls.dynamic_vram(patcher),
                      conditionings=_conditionings(guider))
    context = RunContext(accelerator, run, patcher)
    report.note_setup(context)
    original_options = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
    guider.model_options["transformer_options"][RUN_KEY] = context
    run.wrapped_by = innermost_model_wrapper(guider.model_options)
    if run.wrapped_by:
        run.note("wrapped", f"other nodes wrap the model call ({', '.join(run.wrapped_by)}): Chipmunk's wrapper runs "
                            "inside theirs, so what they decide (a skipped step) happens before it", logging.INFO)
    started = time.perf_counter()
    try:
        return executor(*args, **kwargs)
    finally:
        seconds = time.perf_counter() - started
        guider.model_options = original_options
        report.publish(accelerator, run, seconds)
        run.release()


def innermost_model_wrapper(model_options: dict) -> tuple[str, ...]:
    """Put Chipmunk's DIFFUSION_MODEL wrapper innermost in this run's (cloned) options: a node that
    wraps the model call (core EasyCache) then decides around Chipmunk, and a call that reaches
    Chipmunk runs only ComfyUI's model code inside it, which a CUDA graph may capture. Returns the
    other wrappers' keys (now outside)."""
    import comfy.patcher_extension

    wrappers = (model_options.get("transformer_options", {}).get("wrappers") or {}).get(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL)
    if not wrappers or HOOK_KEY not in wrappers:
        return ()
    wrappers[HOOK_KEY] = wrappers.pop(HOOK_KEY)
    return tuple(str(key) for key in wrappers if key != HOOK_KEY)


def _conditionings(guider) -> int:
    """How many conditionings the sampler evaluates per step: every positive entry, and every
    negative one unless cfg 1 drops them (ComfyUI's CFG-1 optimisation)."""
    import math

    conds = getattr(guider, "original_conds", None) or getattr(guider, "conds", None) or {}
    cfg = getattr(guider, "cfg", 1.0)
    skip_negative = math.isclose(float(cfg), 1.0) and not guider.model_options.get("disable_cfg1_optimization", False)
    count = sum(len(entries) for name, entries in conds.items()
                if isinstance(entries, list) and not (name == "negative" and skip_negative))
    return max(1, count)


# Devices whose free memory bounds the caches (tests add "cpu" with a stand-in free-memory query).
BUDGET_DEVICES = ("cuda",)


def cache_budget(patcher, x: torch.Tensor, rows: int, wanted: int) -> int | None:
    """Device bytes the run's caches may take: ComfyUI first unloads idle models to make room for
    them next to this model's working memory (as it does for its own inference), so the answer
    does not depend on what else happened to be loaded; then free memory less that working memory.
    Memory that dynamic VRAM could take back from the weights is not counted (caches there would
    push the model's weights out every step): that is why this asks ``model_management`` and not
    ``patcher.get_free_memory``, which adds that memory (what ComfyUI's cond batching wants)."""
    import comfy.model_management as mm

    if x.device.type not in BUDGET_DEVICES:  # the CPU's caches live in system memory: no budget
        return None
    try:
        working = int(patcher.model.memory_required([rows] + list(x.shape[1:])))
    except Exception:  # a model without ComfyUI's estimate: the conservative share of a GiB per row
        working = rows * 2**30
    working += int(mm.minimum_inference_memory())
    keep = [loaded for loaded in mm.current_loaded_models if loaded.model is patcher
            or getattr(loaded.model, "model", None) is patcher.model]
    mm.free_memory(wanted + working, x.device, keep_loaded=keep)
    return max(0, int(mm.get_free_memory(x.device)) - working)


# Share of the host memory available when a run is planned that caches streamed from there may
# pin: the rest stays for ComfyUI (its offloaded weights, the next model) and everything else.
HOST_CACHE_SHARE = 0.5


def host_cache_budget() -> int | None:
    """Host bytes the run's streamed caches may take: a share of what ComfyUI finds available in
    system memory (pinned memory cannot be swapped out: taking it all would stall the machine)."""
    import comfy.model_management as mm

    try:
        return int(mm.get_free_memory(torch.device("cpu")) * HOST_CACHE_SHARE)
    except Exception:  # no answer: no limit, as before
        return None


# Samplers that evaluate the model once per step, at the schedule's own sigmas: the step of each
# call can be predicted (StepClock, checked one call later), so the host need not wait for the GPU.
ONE_CALL_PER_STEP = frozenset(f"sample_{name}" for name in (
    "euler", "euler_ancestral", "euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2m", "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "lcm", "ddpm", "ipndm", "ipndm_v",
    "deis", "res_multistep", "res_multistep_cfg_pp"))


def sampler_sample_wrapper(executor, *args, **kwargs):
    """During a Chipmunk run: the conditioning goes onto the sampling device once (see
    ``conditioning_on_device``), and the run learns whether the sampler lets it predict each
    call's step. Other runs pass through untouched."""
    guider = args[0] if args else kwargs.get("model_wrap")
    noise = args[4] if len(args) > 4 else kwargs.get("noise")
    context = getattr(guider, "model_options", {}).get("transformer_options", {}).get(RUN_KEY)
    run = None if context is None else context.run
    if run is not None and isinstance(noise, torch.Tensor):
        conditioning_on_device(getattr(guider, "conds", None), noise.device)
        function = getattr(executor.class_obj, "sampler_function", None)
        # (a node wrapping the model call may skip calls: then each call's step is read)
        run.predict_steps(getattr(function, "__name__", None) in ONE_CALL_PER_STEP and not run.wrapped_by)
    try:
        return executor(*args, **kwargs)
    finally:
        if run is not None:
            run.finish_steps()


def conditioning_on_device(conds, device) -> int:
    """Moves the run's processed conditioning tensors (``model_conds`` of every entry) to ``device``.

    ComfyUI keeps text embeddings where the text encoder left them (the CPU) and copies them to
    the GPU inside every model call, from pageable memory: a copy the host waits on, which keeps
    it from preparing the next step while the GPU computes this one (1-3% of a FLUX run on an
    H200, stock or not; bench "stock resident"). The entries are the run's own copies (ComfyUI
    builds them per sampling run), and each replaced value is a new object of the same class:
    the user's conditioning is not touched, and the model receives the same values (the dtype
    cast happens on the device instead of before the copy: the same rounding). Returns how many
    tensors moved; does nothing on the CPU.
    """
    if device.type == "cpu" or not isinstance(conds, dict):
        return 0
    moved = 0
    for entries in conds.values():
        for entry in entries if isinstance(entries, list) else ():
            model_conds = entry.get("model_conds") if isinstance(entry, dict) else None
            if not isinstance(model_conds, dict):
                continue
            model_conds = dict(model_conds)
            for key, cond in model_conds.items():
                tensor = getattr(cond, "cond", None)
                if isinstance(tensor, torch.Tensor) and tensor.device != device and hasattr(cond, "_copy_with"):
                    model_conds[key] = cond._copy_with(tensor.to(device))
                    moved += 1
            entry["model_conds"] = model_conds
    return moved


def _starts_mid_schedule(patcher, sigmas) -> bool:
    """Whether this run starts below the model's highest noise level (a split or second pass)."""
    try:
        sigma_max = float(patcher.get_model_object("model_sampling").sigma_max)
        return len(sigmas) > 1 and float(sigmas[0]) < sigma_max * 0.999
    except (AttributeError, TypeError, ValueError):
        return False


# --- model calls -----------------------------------------------------------------------------------
def diffusion_model_wrapper(executor, *args, **kwargs):
    # Under torch.compile this frame is traced: the bookkeeping lives in eager-only helpers, so
    # that only ComfyUI's own model code (the executor) is compiled.
    begun = _begin_call(executor, args, kwargs)
    if begun is None:  # the model is being used outside a Chipmunk sampling run
        return executor(*args, **kwargs)
    context, call, args, kwargs = begun
    try:
        verdict = graph_calls.verdict(context, call, args, kwargs)
        if verdict is True:
            return graph_calls.graphed_call(executor, context, call, args, kwargs)
        if verdict is not None:
            graph_calls.stock_where_eager_loses(context, call, verdict)
        return executor(*args, **kwargs)
    except torch.cuda.OutOfMemoryError as error:
        if call.stock_layers:
            raise  # stock itself does not fit: ComfyUI's own handling
        graph_calls.stock_after_out_of_memory(context, call, error)
        return executor(*args, **kwargs)  # the same call again, its layers stock
    finally:
        _end_call(context, call)


@torch.compiler.disable
def _begin_call(executor, args, kwargs):
    """The ModelCall for this call and the arguments with Chipmunk's transformer_options, or None."""
    options = transformer_options(args, kwargs)
    context = (options or {}).get(RUN_KEY)
    if context is None:
        return None
    accelerator, run = context.accelerator, context.run
    if options.get(MULTIGPU_THREAD) is not None:
        # ComfyUI's MultiGPU CFG split (autumn 2026) runs conditionings in threads on clones on
        # other GPUs; one run's caches cannot serve those: such calls run stock.
        run.note("multigpu", "a MultiGPU split runs this model's conditionings in threads on several GPUs, "
                             "which Chipmunk does not support yet: those model calls run stock")
        return None
    diffusion_model = executor.class_obj
    adapter = accelerator.adapter
    arguments = adapter.call_arguments(diffusion_model, args, kwargs)
    shape = adapter.geometry(diffusion_model, arguments)
    call = run.begin_call(arguments["x"], options, shape)
    call.stock_layers = call.stock_layers or context.stock_from_now
    if _FIRST_GPU_RUN and call.seeds.device.type == "cuda" and not call.stock_layers and accelerator.config.sparse:
        _FIRST_GPU_RUN.clear()
        run.note("compile", "the first Chipmunk run in this ComfyUI process compiles its GPU kernels for the "
                            "model's shapes, so it takes longer (FLUX 1024x1024 on an H100: about 11 s more than "
                            "stock's first run); later runs, and later processes through Triton's cache, do not",
                 logging.INFO)
    call.context = context
    call.diffusion_model = diffusion_model
    call.has_control = arguments.get("control") is not None
    previous = options.get(OVERRIDE)
    if previous is not None and not getattr(previous, "chipmunk", False):
        run.note("override", f"another attention override is installed ({name(previous)}): Chipmunk serves the "
                             "self-attention of its sparse layers first, every other attention call goes to it")
    call_options = {**options, CALL_KEY: call, OVERRIDE: attention_override(getattr(previous, "previous", previous))}
    args, kwargs = with_transformer_options(args, kwargs, options, call_options)
    accelerator.calls().append(call)
    return context, call, args, kwargs


@torch.compiler.disable
def _end_call(context: RunContext, call):
    calls = context.accelerator.calls()
    if calls and calls[-1] is call:
        calls.pop()
    call.run.end_call(call)


def attention_override(previous):
    """Chipmunk's attention for the layers it serves; everything else to ``previous`` (or stock)."""

    @torch.compiler.disable
    def chipmunk_attention(func, q, k, v, heads, *args, **kwargs):
        layer = (kwargs.get("transformer_options") or {}).get(LAYER_KEY)
        if layer is not None and not args:
            out = layer.attention(q, k, v, heads, kwargs)
            if out is not None:
                return out
        if previous is not None:
            return previous(func, q, k, v, heads, *args, **kwargs)
        return func(q, k, v, heads, *args, **kwargs)

    chipmunk_attention.chipmunk = True
    chipmunk_attention.previous = previous
    return chipmunk_attention


# --- blocks: layer context and step caching ---------------------------------------------------------
def _block(diffusion_model, kind: str, index: int):
    if kind == "single_block":
        return diffusion_model.single_blocks[index]
    blocks = getattr(diffusion_model, "double_blocks", None)
    return (blocks if blocks is not None else diffusion_model.blocks)[index]


def _streams_in(args: dict, names) -> dict:
    return {name: args[name] for name in names}


def _streams_out(out: dict, call) -> dict:
    """The last block's output as the first block's streams (single blocks output [txt, img])."""
    if "txt" in out or not call.text_len:
        return {name: out[name] for name in ("img", "txt") if name in out}
    joint, text = out["img"], call.text_len
    if call.text_first:
        return {"txt": joint[:, :text], "img": joint[:, text:]}
    return {"img": joint[:, :-text], "txt": joint[:, -text:]}


def block_hook(kind: str, index: int, position: int, args: dict, extra: dict):
    # As in the DIFFUSION_MODEL wrapper: eager-only bookkeeping around the stock block.
    original = extra["original_block"]
    entered = _enter_block(kind, index, position, args)
    if entered is None:
        return original(args)
    if entered[0] == "skipped":
        return entered[1]
    _, call, block_args, last = entered
    out = original(block_args)
    if last:
        _leave_last_block(call, out)
    return out


@torch.compiler.disable
def _enter_block(kind: str, index: int, position: int, args: dict):
    """None (not in a Chipmunk call), ("skipped", outputs) on a skipped step, or ("run", call,
    the block's arguments with this layer's context, whether it is the last block)."""
    options = args.get("transformer_options") or {}
    call = options.get(CALL_KEY)
    if call is None:
        return None
    accelerator = options[ACCEL_KEY]
    plan, run, adapter = accelerator.plan, call.run, accelerator.adapter
    first, last = position == 0, position == len(plan.block_keys) - 1
    if first:
        _decide_skip(call, _streams_in(args, adapter.stream_names))
    if call.skipped:
        if first:
            return "skipped", call.caches.step_cache.apply(_streams_in(args, adapter.stream_names))
        return "skipped", {name: args[name] for name in adapter.block_outputs(kind)}
    diffusion_model = call.diffusion_model
    block = _block(diffusion_model, kind, index)
    text_len, image_len, _ = adapter.streams(block, kind, args, call)
    layer_index = adapter.layer_index(diffusion_model, kind, index)
    layer = call.layer(layer_index, text_len, image_len)
    if layer is not None:
        call.layers[layer_index] = layer
        args = {**args, "transformer_options": {**options, LAYER_KEY: layer}}
    call.recording = run.step_cache_schedule.active and not call.has_control
    if first and call.recording:
        call.caches.step_cache.begin_computed(_streams_in(args, adapter.stream_names))
    return "run", call, args, last and call.recording


@torch.compiler.disable
def _leave_last_block(call, out: dict):
    call.caches.step_cache.end_computed(_streams_out(out, call),
                                        measure=call.run.step_cache_schedule.mode == "adaptive")


def _decide_skip(call, streams: dict):
    run = call.run
    schedule = run.step_cache_schedule
    if not schedule.active:
        return
    if call.has_control:
        run.note("control", "a ControlNet adds to the blocks' outputs: steps with it are not skipped")
        return
    cache = call.caches.step_cache
    config = run.config
    chunks = max(1, len(call.cond_or_uncond))
    rows = slice(0, max(1, streams["img"].shape[0] // chunks))
    skip = schedule.decide(call.step, lambda: cache.predict_skip(streams["img"], rows, config.step_cache_threshold,
                                                               config.step_cache_max_skips))
    call.skipped = skip and cache.ready_for(streams)


def wrapped_by_user_patch(user_patch, chipmunk_patch, args, extra):
    """A block patch the user already had runs first and sees Chipmunk's patch as the original."""
    return user_patch(args, {**extra, "original_block": functools.partial(_chipmunk_inner, chipmunk_patch, extra)})


def _chipmunk_inner(chipmunk_patch, extra, args):
    return chipmunk_patch(args, extra)


__all__ = ["accelerate", "install", "Accelerator", "RunContext", "SLIDER_FIELDS"]
