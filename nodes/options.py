"""What the pack's hooks share: the keys of what they keep in ComfyUI's transformer_options and
model options, and reading a model call's transformer_options."""

from __future__ import annotations

HOOK_KEY = "chipmunk"
ACCEL_KEY = "chipmunk"
RUN_KEY = "chipmunk_run"
CALL_KEY = "chipmunk_call"
LAYER_KEY = "chipmunk_layer"
OVERRIDE = "optimized_attention_override"
MULTIGPU_THREAD = "multigpu_thread_device"  # set on calls made by a MultiGPU worker thread (newer ComfyUI)
FUSED_CHECK = "single_block_fused"  # the self-check of the single blocks' one-pass per-token kernels


def transformer_options(args, kwargs):
    if args and isinstance(args[-1], dict):
        return args[-1]
    return kwargs.get("transformer_options")


def with_transformer_options(args, kwargs, options, new_options):
    """The call's arguments with ``new_options`` where ``options`` was passed (last positional or
    the ``transformer_options`` keyword)."""
    if args and args[-1] is options:
        return args[:-1] + (new_options,), kwargs
    return args, {**kwargs, "transformer_options": new_options}


def name(function) -> str:
    """A callable's module and name, for messages."""
    inner = getattr(function, "func", function)
    return f"{getattr(inner, '__module__', '?')}.{getattr(inner, '__qualname__', type(inner).__name__)}"
