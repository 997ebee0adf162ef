"""One adapter per model family: how to find its blocks, its token grid and its text, and how to
compute one of its blocks through Chipmunk. Adapters import ComfyUI lazily (only when asked about
a model), so the core stays importable without it.
"""

from __future__ import annotations

import importlib

from ..config import FAMILY_NAMES
from ..layout import SequenceShape
from ..memory import ModelDims
from ..state import ModelCall
from . import flux, wan


class FamilyAdapter:
    family = ""
    model_class = ("", "")  # (module, class name) of the diffusion model ComfyUI builds

    def matches(self, diffusion_model) -> bool:
        """Exact class match: subclasses (VACE, camera, audio variants...) change the forward pass."""
        module_name, class_name = self.model_class
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            return False
        return type(diffusion_model) is cls

    def block_keys(self, diffusion_model) -> list[tuple[str, int]]:
        raise NotImplementedError

    def layer_index(self, diffusion_model, kind: str, index: int) -> int:
        raise NotImplementedError

    def dims(self, diffusion_model) -> ModelDims:
        """The dimensions the caches are sized by."""
        raise NotImplementedError

    def geometry(self, diffusion_model, args: tuple) -> SequenceShape:
        """The attention sequence's shape, from the DIFFUSION_MODEL wrapper's args."""
        raise NotImplementedError

    @staticmethod
    def patch_grid(spatial_shape, patch_size) -> tuple[int, ...]:
        """Token grid after the patch embedding (ComfyUI rounds odd sizes to the nearest patch)."""
        return tuple((s + p // 2) // p for s, p in zip(spatial_shape, patch_size))

    def call_extras(self, diffusion_model, args: tuple) -> dict:
        """Per-call values the blocks need that ComfyUI does not pass to a block patch."""
        return {}

    def run_block(self, diffusion_model, kind: str, index: int, args: dict, call: ModelCall):
        """The block's output dict, or None to let the stock block run (always-dense layers)."""
        raise NotImplementedError


class FluxAdapter(FamilyAdapter):
    family = "flux"
    model_class = ("comfy.ldm.flux.model", "Flux")

    def block_keys(self, diffusion_model):
        return ([("double_block", i) for i in range(len(diffusion_model.double_blocks))]
                + [("single_block", i) for i in range(len(diffusion_model.single_blocks))])

    def layer_index(self, diffusion_model, kind, index):
        return index if kind == "double_block" else len(diffusion_model.double_blocks) + index

    def dims(self, diffusion_model):
        width, heads = diffusion_model.hidden_size, diffusion_model.num_heads
        blocks = list(diffusion_model.single_blocks) or list(diffusion_model.double_blocks)
        mlp_hidden = blocks[0].mlp_hidden_dim if diffusion_model.single_blocks else blocks[0].img_mlp[0].out_features
        return ModelDims(len(diffusion_model.double_blocks) + len(diffusion_model.single_blocks), heads,
                         width // heads, mlp_hidden, width)

    def geometry(self, diffusion_model, args):
        x, context = args[0], args[2]
        patch = diffusion_model.patch_size
        return SequenceShape(self.patch_grid(x.shape[-2:], (patch, patch)), context.shape[1], text_first=True)

    def run_block(self, diffusion_model, kind, index, args, call):
        if kind == "double_block":
            call.text_len = args["txt"].shape[1]  # the text stream as the blocks see it
        layer = call.layer(self.layer_index(diffusion_model, kind, index))
        if layer is None:
            return None
        if kind == "double_block":
            return flux.double_block(diffusion_model.double_blocks[index], args, layer)
        return flux.single_block(diffusion_model.single_blocks[index], args, layer)


class HunyuanVideoAdapter(FluxAdapter):
    """HunyuanVideo reuses FLUX's blocks with the joint order flipped to [video, text]."""

    family = "hunyuan_video"
    model_class = ("comfy.ldm.hunyuan_video.model", "HunyuanVideo")

    def geometry(self, diffusion_model, args):
        x, context = args[0], args[2]
        patch = diffusion_model.patch_size
        # Reference latents (image-to-video variants) are prepended to the video tokens.
        return SequenceShape(self.patch_grid(x.shape[-len(patch):], patch), context.shape[1], text_first=False,
                             grid_first=False)


class Wan21Adapter(FamilyAdapter):
    """WAN2.1 (text- and image-to-video): sparse self-attention over the video tokens only."""

    family = "wan21"
    model_class = ("comfy.ldm.wan.model", "WanModel")

    def block_keys(self, diffusion_model):
        return [("double_block", i) for i in range(len(diffusion_model.blocks))]

    def layer_index(self, diffusion_model, kind, index):
        return index

    def dims(self, diffusion_model):
        return ModelDims(len(diffusion_model.blocks), diffusion_model.num_heads,
                         diffusion_model.dim // diffusion_model.num_heads, diffusion_model.ffn_dim, diffusion_model.dim)

    def geometry(self, diffusion_model, args):
        x, time_dim_concat = args[0], args[4]
        frames = x.shape[2] + (0 if time_dim_concat is None else time_dim_concat.shape[2])
        grid = self.patch_grid((frames, *x.shape[3:]), diffusion_model.patch_size)
        # A reference latent (when the model has one) is prepended to the video tokens.
        return SequenceShape(grid, 0, text_first=False, grid_first=False)

    def call_extras(self, diffusion_model, args):
        clip_fea = args[3]
        return {"context_img_len": None if clip_fea is None else clip_fea.shape[-2]}

    def run_block(self, diffusion_model, kind, index, args, call):
        layer = call.layer(index)
        if layer is None:
            return None
        return wan.attention_block(diffusion_model.blocks[index], args, layer, call.extras["context_img_len"])


ADAPTERS = [FluxAdapter(), HunyuanVideoAdapter(), Wan21Adapter()]


def adapter_named(family: str) -> FamilyAdapter:
    return next(a for a in ADAPTERS if a.family == family)


def adapter_for(diffusion_model) -> FamilyAdapter:
    """The adapter serving this diffusion model, or a ValueError naming the supported families."""
    for adapter in ADAPTERS:
        if adapter.matches(diffusion_model):
            return adapter
    supported = ", ".join(FAMILY_NAMES[a.family] for a in ADAPTERS)
    raise ValueError(f"Chipmunk Accelerate supports {supported} models; this model is "
                     f"{type(diffusion_model).__name__}. Connect a supported model to Chipmunk Accelerate "
                     f"or remove the node.")
