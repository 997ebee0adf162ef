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


class PagedWeights:
    """The layers whose weights ComfyUI's dynamic VRAM (comfy-aimdo) pages in and out of the GPU.

    Under dynamic VRAM a layer's weight lives in a virtual address range reserved for it (``_v``)
    that stays where it is for as long as the model is loaded; ComfyUI's ops "fault" the range in
    before each use (mapping pages and copying the weight in when it was paged out, recorded as a
    signature) and unpin it after launching their kernels. A replayed CUDA graph runs none of that
    Python: it may replay only while every such range holds the weight it held when ComfyUI last
    copied it in. ``resident()`` checks that the way the ops do (fault, compare the signature with
    the layer's) and unpins again at once, as the ops do after launching.
    """

    def __init__(self, modules, vbar_api):
        self.paged = list(modules)    # every paged layer
        self.modules = list(modules)  # the ones the residency check covers
        self._owned = {id(t) for m in self.paged for t in (getattr(m, "weight", None), getattr(m, "bias", None))
                       if t is not None}
        self._api = vbar_api

    @classmethod
    def of(cls, diffusion_model) -> "PagedWeights | None":
        """The paged layers of a model (none: ComfyUI placed every weight on the GPU), or None when
        layers are paged through an API this pack does not know."""
        # (Layers without weights, e.g. norms without an affine part, get an empty range too.)
        modules = [m for m in diffusion_model.modules() if getattr(m, "_v", None) is not None
                   and (getattr(m, "weight", None) is not None or getattr(m, "bias", None) is not None)]
        if not modules:
            return cls([], None)
        try:
            import comfy_aimdo.model_vbar as api
        except ImportError:
            return None
        if not all(hasattr(api, name) for name in ("vbar_fault", "vbar_unpin", "vbar_signature_compare")):
            return None
        return cls(modules, api)

    def owns(self, tensor) -> bool:
        """Whether ``tensor`` is the CPU-side weight of a paged layer (not read by the GPU)."""
        return id(tensor) in self._owned

    def gpu_weights(self) -> list | None:
        """The weights as the GPU reads them (views of the reserved ranges, stable addresses), of
        the layers the model's calls so far have used; None when it used none of the paged ones.

        From here on only those layers are checked: a layer no earlier call used (the dense
        steps use every layer a sparse step does) is not read by the graphs."""
        self.modules = [m for m in self.modules if getattr(m, "_v_weight", None) is not None]
        return [m._v_weight for m in self.modules] if self.modules or not self.paged else None

    def resident(self) -> bool:
        if not self.modules:
            return True
        faulted, ok = [], True
        try:
            for module in self.modules:
                signature = self._api.vbar_fault(module._v)
                if signature is None:  # no memory to map it: nothing pinned
                    ok = False
                    break
                faulted.append(module)
                if not self._api.vbar_signature_compare(signature, getattr(module, "_v_signature", None)):
                    ok = False
                    break
        finally:
            for module in faulted:
                self._api.vbar_unpin(module._v)
        return ok
