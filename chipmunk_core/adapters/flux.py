"""FLUX-style models: ComfyUI's ``Flux`` class (FLUX.1 dev/schnell/Kontext/Fill, and FLUX.2,
Ovis-Image and LongCat-Image, which build the same class with other blocks), ``Chroma`` (FLUX
blocks, modulation computed outside them) and HunyuanVideo (FLUX blocks over video tokens).

Joint sequences are [text, image] (HunyuanVideo too since ComfyUI's February 2026 change; blocks of
older ComfyUI that carry ``flipped_img_txt`` attend over [image, text]). Kontext reference latents
follow the generated image's tokens in FLUX; HunyuanVideo's reference latent precedes them.
"""

from __future__ import annotations

from ..layout import SequenceShape
from ..memory import ModelDims
from . import FamilyAdapter


class FluxAdapter(FamilyAdapter):
    family = "flux"
    model_classes = (
        ("comfy.ldm.flux.model", "Flux", "FLUX", True),
        ("comfy.ldm.chroma.model", "Chroma", "Chroma", True),
        ("comfy.ldm.chroma_radiance.model", "ChromaRadiance", "Chroma Radiance", True),
    )
    grid_first = True
    stream_names = ("img", "txt")

    def model_name(self, diffusion_model, display):
        params = getattr(diffusion_model, "params", None)
        if display == "FLUX" and params is not None:
            if getattr(params, "global_modulation", False):
                return "FLUX.2"
            if getattr(params, "yak_mlp", False) or getattr(params, "txt_norm", False):
                return "FLUX-architecture model"
            return "FLUX.1"
        return display

    def block_keys(self, diffusion_model):
        return ([("double_block", i) for i in range(len(diffusion_model.double_blocks))]
                + [("single_block", i) for i in range(len(diffusion_model.single_blocks))])

    def layer_index(self, diffusion_model, kind, index):
        return index if kind == "double_block" else len(diffusion_model.double_blocks) + index

    def dims(self, diffusion_model):
        width, heads = diffusion_model.hidden_size, diffusion_model.num_heads
        if diffusion_model.single_blocks:
            mlp_hidden = diffusion_model.single_blocks[0].mlp_hidden_dim
        else:
            mlp_hidden = diffusion_model.double_blocks[0].img_mlp[0].out_features
        return ModelDims(len(diffusion_model.double_blocks) + len(diffusion_model.single_blocks), heads,
                         width // heads, mlp_hidden, width)

    def mlp_candidates(self, diffusion_model):
        for i, block in enumerate(diffusion_model.double_blocks):
            yield f"diffusion_model.double_blocks.{i}.img_mlp", i, "img", "sequential", block.img_mlp
            # the block around it, for its per-token work only (the MLP stays the site above)
            yield f"diffusion_model.double_blocks.{i}", i, "joint", "double_block", block
        offset = len(diffusion_model.double_blocks)
        for i, block in enumerate(diffusion_model.single_blocks):
            yield f"diffusion_model.single_blocks.{i}", offset + i, "fused", "single_block", block

    def block_outputs(self, kind):
        return ("img", "txt") if kind == "double_block" else ("img",)

    def _patch(self, diffusion_model):
        patch = diffusion_model.patch_size
        return tuple(patch) if isinstance(patch, (list, tuple)) else (patch, patch)

    def geometry(self, diffusion_model, arguments):
        x = arguments["x"]
        patch = self._patch(diffusion_model)
        grid = self.patch_grid(x.shape[-len(patch):], patch)
        return SequenceShape(grid, arguments["context"].shape[1], text_first=True, grid_first=self.grid_first)

    def streams(self, block, kind, args, call):
        if kind == "double_block":
            text_len, image_len = args["txt"].shape[1], args["img"].shape[1]
            text_first = not getattr(block, "flipped_img_txt", False)
            call.text_len, call.text_first = text_len, text_first  # the single blocks join the same way
            return text_len, image_len, text_first
        n_tokens = args["img"].shape[1]
        img_slice = (args.get("transformer_options") or {}).get("img_slice")
        text_len = img_slice[0] if img_slice else call.text_len
        return text_len, n_tokens - text_len, call.text_first


class HunyuanVideoAdapter(FluxAdapter):
    family = "hunyuan_video"
    model_classes = (("comfy.ldm.hunyuan_video.model", "HunyuanVideo", "HunyuanVideo", True),)
    grid_first = False

    def model_name(self, diffusion_model, display):
        if getattr(diffusion_model, "byt5_in", None) is not None or getattr(diffusion_model, "vision_in", None) is not None:
            return "HunyuanVideo 1.5"
        return display
