"""Reading a linear layer's weights the way ComfyUI's own ops would use them.

ComfyUI may keep weights off the GPU (low-VRAM offload, dynamic VRAM), quantised, or with LoRA
patches applied on the fly through ``weight_function``; ``comfy.ops.cast_bias_weight`` resolves all
of those for an input. ComfyUI releases with offload-aware casting hand back a stream handle that
must be released once the weights have been used (``uncast_bias_weight``); older releases return
just (weight, bias). Layers that are plain ``torch.nn.Linear`` are read directly.
"""

from __future__ import annotations

import contextlib
import functools
import inspect


@functools.lru_cache(maxsize=1)
def _offloadable_casting() -> bool:
    import comfy.ops
    return "offloadable" in inspect.signature(comfy.ops.cast_bias_weight).parameters


@contextlib.contextmanager
def linear_weights(module, like):
    """(weight, bias) of ``module`` in ``like``'s dtype and device, released on exit."""
    if not hasattr(module, "weight_function"):  # a plain torch Linear
        yield module.weight.to(like), None if module.bias is None else module.bias.to(like)
        return
    import comfy.ops
    if not _offloadable_casting():
        weight, bias = comfy.ops.cast_bias_weight(module, like)[:2]
        scale = getattr(module, "scale_weight", None)  # scaled-fp8 checkpoints of older ComfyUI
        if scale is not None:
            weight = weight * scale.to(device=weight.device, dtype=weight.dtype)
        yield weight, bias
        return
    weight, bias, stream = comfy.ops.cast_bias_weight(module, like, offloadable=True)
    try:
        yield weight, bias
    finally:
        comfy.ops.uncast_bias_weight(module, weight, bias, stream)


def weight_identity(module, weight):
    """A key for ``weight`` when it is (a view of) the module's own parameter, else None.

    Caching something derived from a weight (a transposed copy) is only safe when the weight is
    the parameter itself: casts, offload copies and on-the-fly LoRA give a new tensor per call.
    Such caches live for one sampling run, during which ComfyUI does not patch weights in place
    (and inference tensors have no version counter to check).
    """
    param = getattr(module, "weight", None)
    if param is None or weight.device != param.device or weight.dtype != param.dtype:
        return None
    if weight.untyped_storage().data_ptr() != param.untyped_storage().data_ptr():
        return None
    return (id(param), param.data_ptr(), weight.storage_offset(), tuple(weight.shape), tuple(weight.stride()))
