"""WAN (2.1 text- and image-to-video, 2.2 A14B experts and TI2V 5B): self-attention over the video
tokens, cross-attention to the text (left to the user's backend), then an FFN.

WanModel subclasses (VACE, Camera, S2V, HuMo, Animate, SCAIL) keep the block loop but add inputs
between blocks or extra tokens: they run attention-only.
"""

from __future__ import annotations

import math

from ..layout import SequenceShape
from ..memory import ModelDims
from . import FamilyAdapter

_WAN = "comfy.ldm.wan.model"


class WanAdapter(FamilyAdapter):
    family = "wan"
    model_classes = (
        (_WAN, "WanModel", "WAN2.1 / WAN2.2", True),
        (_WAN, "VaceWanModel", "WAN VACE", False),
        (_WAN, "CameraWanModel", "WAN Camera", False),
        (_WAN, "WanModel_S2V", "WAN S2V", False),
        (_WAN, "HumoWanModel", "WAN HuMo", False),
        (_WAN, "SCAILWanModel", "WAN SCAIL", False),
        ("comfy.ldm.wan.model_animate", "AnimateWanModel", "WAN Animate", False),
    )

    def block_keys(self, diffusion_model):
        return [("double_block", i) for i in range(len(diffusion_model.blocks))]

    def layer_index(self, diffusion_model, kind, index):
        return index

    def dims(self, diffusion_model):
        return ModelDims(len(diffusion_model.blocks), diffusion_model.num_heads,
                         diffusion_model.dim // diffusion_model.num_heads, diffusion_model.ffn_dim, diffusion_model.dim)

    def mlp_candidates(self, diffusion_model):
        for i, block in enumerate(diffusion_model.blocks):
            yield f"diffusion_model.blocks.{i}.ffn", i, "ffn", "sequential", block.ffn

    def geometry(self, diffusion_model, arguments):
        x, time_dim_concat = arguments["x"], arguments.get("time_dim_concat")
        frames = x.shape[2] + (0 if time_dim_concat is None else time_dim_concat.shape[2])
        grid = self.patch_grid((frames, *x.shape[3:]), diffusion_model.patch_size)
        # A reference latent (models with ref_conv) is prepended to the video tokens; anything else
        # beside them (newer ComfyUI's context latents) is appended after them.
        reference = (arguments.get("kwargs") or {}).get("reference_latent")
        before = 0
        if getattr(diffusion_model, "ref_conv", None) is not None and reference is not None:
            # (its convolution has stride = kernel and no padding: whole patches only)
            before = math.prod(s // p for s, p in zip(reference.shape[-2:], diffusion_model.patch_size[1:]))
        return SequenceShape(grid, 0, text_first=False, grid_first=False, extra_before=before)

    def streams(self, block, kind, args, call):
        return 0, args["img"].shape[1], False
