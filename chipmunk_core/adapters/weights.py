"""Reading a linear layer's weights the way ComfyUI's own ops would use them.

ComfyUI may keep weights off the GPU (low-VRAM offload), in fp8 with a per-tensor scale, or with
LoRA patches applied on the fly through ``weight_function``; ``comfy.ops.cast_bias_weight`` resolves
all of those for an input. Layers that are plain ``torch.nn.Linear`` are read directly.
"""

from __future__ import annotations


def linear_weights(module, like):
    """(weight, bias) of ``module`` in ``like``'s dtype and device, LoRA and fp8 scale applied."""
    if hasattr(module, "weight_function"):
        import comfy.ops
        weight, bias = comfy.ops.cast_bias_weight(module, like)[:2]
    else:
        weight = module.weight.to(like)
        bias = None if module.bias is None else module.bias.to(like)
    scale = getattr(module, "scale_weight", None)
    if scale is not None:
        weight = weight * scale.to(device=weight.device, dtype=weight.dtype)
    return weight, bias


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
