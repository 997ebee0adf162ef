"""The ComfyUI hooks that put Chipmunk into a sampling run.

- At node time only light configuration is stored on the cloned MODEL (a frozen config in
  transformer_options, two wrappers, one block-replace patch per block): ``clone()`` deep-copies
  model_options, so nothing heavy may live there.
- OUTER_SAMPLE creates the run's state when sampling starts and always releases it (``finally``).
- DIFFUSION_MODEL turns each model call into a ``ModelCall`` (step, dense or sparse, caches of
  this conditioning) handed to the blocks through a copy of transformer_options.
- The block patches compute Chipmunk layers; anything else goes to the stock block. A block patch
  the user already had on the same block is kept and wraps ours.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from ..chipmunk_core import ChipmunkConfig, FamilyAdapter, ModelCall, SamplingRun, adapter_named

logger = logging.getLogger(__name__)

HOOK_KEY = "chipmunk"
CONFIG_KEY = "chipmunk_config"
RUN_KEY = "chipmunk_run"
CALL_KEY = "chipmunk_call"


@dataclass
class ActiveCall:
    call: ModelCall
    adapter: FamilyAdapter
    diffusion_model: object


def install(model, adapter: FamilyAdapter, config: ChipmunkConfig):
    """Patch a (cloned) ModelPatcher; applying the node twice only replaces the settings."""
    import comfy.patcher_extension

    options = model.model_options.setdefault("transformer_options", {})
    already = CONFIG_KEY in options
    options[CONFIG_KEY] = config
    if already:
        return
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, HOOK_KEY, outer_sample_wrapper)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, HOOK_KEY, diffusion_model_wrapper)
    existing = options.get("patches_replace", {}).get("dit", {})
    for key in adapter.block_keys(model.get_model_object("diffusion_model")):
        patch = functools.partial(chipmunk_block, key)
        if key in existing:
            patch = functools.partial(wrapped_by_user_patch, existing[key], key)
        model.set_model_patch_replace(patch, "dit", key[0], key[1])


def outer_sample_wrapper(executor, *args, **kwargs):
    import comfy.model_management
    import comfy.model_patcher

    guider = executor.class_obj
    original_options = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
    options = guider.model_options["transformer_options"]
    sigmas = args[3]
    seed = kwargs.get("seed", args[7] if len(args) > 7 else None)
    config = options[CONFIG_KEY]
    diffusion_model = guider.model_patcher.get_model_object("diffusion_model")
    run = SamplingRun(config, total_steps=len(sigmas) - 1, seed=seed,
                      dims=adapter_named(config.family).dims(diffusion_model),
                      free_memory=comfy.model_management.get_free_memory)
    options[RUN_KEY] = run
    try:
        return executor(*args, **kwargs)
    finally:
        logger.info(run.summary())
        run.release()
        guider.model_options = original_options


def diffusion_model_wrapper(executor, *args, **kwargs):
    options = args[-1] if args and isinstance(args[-1], dict) else kwargs.get("transformer_options")
    run = options.get(RUN_KEY) if options else None
    if run is None:  # the model is being used outside a sampling run
        return executor(*args, **kwargs)
    diffusion_model = executor.class_obj
    adapter = adapter_named(run.config.family)
    call = run.begin_call(args[0], options, adapter.geometry(diffusion_model, args))
    call.extras = adapter.call_extras(diffusion_model, args)
    call_options = {**options, CALL_KEY: ActiveCall(call, adapter, diffusion_model)}
    if args and args[-1] is options:
        args = args[:-1] + (call_options,)
    else:
        kwargs["transformer_options"] = call_options
    try:
        return executor(*args, **kwargs)
    finally:
        run.end_call(call)


def chipmunk_block(block_key, args, extra):
    active = (args.get("transformer_options") or {}).get(CALL_KEY)
    if active is None:
        return extra["original_block"](args)
    kind, index = block_key
    out = active.adapter.run_block(active.diffusion_model, kind, index, args, active.call)
    return extra["original_block"](args) if out is None else out


def wrapped_by_user_patch(user_patch, block_key, args, extra):
    """The user's own block patch runs first and sees Chipmunk's block as the original."""
    return user_patch(args, {**extra, "original_block": functools.partial(_chipmunk_inner, block_key, extra)})


def _chipmunk_inner(block_key, extra, args):
    return chipmunk_block(block_key, args, extra)
