"""Development-only ComfyUI nodes that stand in for the encoders tiny test models have none of.

Loaded by tools/start.sh and the tests next to the pack, never by the pack itself: users'
ComfyUI never sees these nodes. Classic node API and no ComfyUI imports at module import time,
so that the tests can also call the functions directly.

- ``random_conditioning`` / "Chipmunk Random Conditioning": a text encoder's output (CONDITIONING
  with the cross-attention tokens, pooled output, guidance and extra text outputs of each
  model's real encoder), seeded N(0, 1).
- ``random_clip_vision_output`` / "Chipmunk Random CLIP Vision Output": what CLIPVisionEncode
  returns, for the image-to-video nodes (WanImageToVideo, HunyuanVideo15ImageToVideo...).
- ``RandomVAE`` / "Chipmunk Random VAE": a VAE stand-in whose ``encode`` maps pixels to latents
  of the right shape (a fixed random linear map of pooled pixels plus a fixed random field), so
  that the stock nodes that encode images (InpaintModelConditioning, VAEEncode before
  ReferenceLatent, WanImageToVideo, Wan22ImageToVideoLatent, WanVaceToVideo...) run unchanged.
  It cannot decode.

Everything else (image inputs, masks, reference latents, concat channels) is made by ComfyUI's
own nodes from these.
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TextEncoder:
    title: str
    context_width: int  # width of the cross-attention tokens
    pooled_width: int | None = None  # CLIP-L pooled output, where the model takes one
    guidance: float | None = None  # default distilled guidance, where the model embeds one
    extra_widths: tuple = ()  # (conditioning key, width) of further token outputs


# What each model's real text encoder puts in the CONDITIONING.
TEXT_ENCODERS = {
    "flux": TextEncoder("T5-XXL + CLIP-L (FLUX.1)", 4096, 768, 3.5),
    "flux2": TextEncoder("Mistral 3 Small, 3 layers stacked (FLUX.2 dev)", 15360, None, 4.0),
    "flux2_klein": TextEncoder("Qwen3 4B, 3 layers stacked (FLUX.2 Klein)", 7680),
    "longcat": TextEncoder("Qwen2.5-VL 7B (LongCat-Image)", 3584),
    "ovis": TextEncoder("Qwen3 2B (Ovis-Image)", 2048),
    "chroma": TextEncoder("T5-XXL (Chroma)", 4096),
    "hunyuan_video": TextEncoder("LLaVA-LLaMA-3 + CLIP-L (HunyuanVideo)", 4096, 768, 6.0),
    "hunyuan_video15": TextEncoder("Qwen2.5-VL 7B + byT5 small (HunyuanVideo 1.5)", 3584,
                                   extra_widths=(("conditioning_byt5small", 1472),)),
    "wan": TextEncoder("UMT5-XXL (WAN)", 4096),
}
GLYPH_TOKENS = 8  # byT5 tokens (quoted text in a HunyuanVideo 1.5 prompt)

# Vision encoders: (tokens, width of the hidden states, width of image_embeds).
CLIP_VISION_ENCODERS = {
    "clip_vision_h": (257, 1280, 1024),  # CLIP ViT-H/14 (WAN i2v, camera)
    "siglip": (729, 1152, 1152),  # SigLIP so400m patch14 384 (HunyuanVideo 1.5)
}

# Latent spaces: (channels, spatial downscale, temporal downscale or None for images).
VAES = {
    "flux": (16, 8, None),  # FLUX.1 / Chroma / SD3
    "flux2": (128, 16, None),  # FLUX.2: 32 channels, 2x2 patches packed
    "hunyuan_video": (16, 8, 4),
    "wan21": (16, 8, 4),
    "wan22": (48, 16, 4),
    "hunyuan_video15": (32, 16, 4),
}


def random_conditioning(family: str, seed: int = 0, tokens: int = 32, guidance: float | None = None,
                        context_width: int | None = None, pooled_width: int | None = None):
    """A seeded random CONDITIONING list ``[[context, options]]`` from text encoder ``family``.

    ``context`` is [1, tokens, context_width] (N(0, 1)); where the real encoder has them, the
    options carry ``pooled_output`` [1, pooled_width], ``guidance`` (default: the model's usual
    value) and further token outputs (HunyuanVideo 1.5: ``conditioning_byt5small``). Widths
    default to the real encoders'.
    """
    encoder = TEXT_ENCODERS[family]
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(1, tokens, context_width or encoder.context_width, generator=generator)
    options = {"pooled_output": None}  # as CLIP.encode_from_tokens_scheduled: always present
    if encoder.pooled_width is not None:
        options["pooled_output"] = torch.randn(1, pooled_width or encoder.pooled_width,
                                               generator=generator)
    if encoder.guidance is not None:
        options["guidance"] = encoder.guidance if guidance is None else guidance
    for key, width in encoder.extra_widths:
        options[key] = torch.randn(1, GLYPH_TOKENS, width, generator=generator)
    return [[context, options]]


def random_clip_vision_output(encoder: str = "clip_vision_h", seed: int = 0):
    """What CLIPVisionEncode returns for one image, with seeded random hidden states."""
    from comfy.clip_vision import Output

    tokens, width, embed_width = CLIP_VISION_ENCODERS[encoder]
    generator = torch.Generator().manual_seed(seed)
    output = Output()
    output["last_hidden_state"] = torch.randn(1, tokens, width, generator=generator)
    output["penultimate_hidden_states"] = torch.randn(1, tokens, width, generator=generator)
    output["image_embeds"] = torch.randn(1, embed_width, generator=generator)
    return output


class RandomVAE:
    """A VAE stand-in: ``encode`` gives latents of the latent space's shape, deterministically.

    Images [B, H, W, 3] become [B, C, H/s, W/s]; video frames [T, H, W, 3] become
    [1, C, (T - 1) // 4 + 1, H/s, W/s] (first frame alone, then groups of 4, as causal video
    VAEs count them).
    """

    def __init__(self, space: str, seed: int = 0):
        self.latent_channels, self.ratio, self.temporal = VAES[space]
        generator = torch.Generator().manual_seed(seed)
        self.projection = torch.randn(3, self.latent_channels, generator=generator)
        self.field_seed = seed + 1

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        r = self.ratio
        x = pixels[..., :3].movedim(-1, 1).float() * 2.0 - 1.0
        h, w = x.shape[-2] // r, x.shape[-1] // r
        x = torch.nn.functional.avg_pool2d(x[..., :h * r, :w * r], r)
        if self.temporal is not None:
            t = self.temporal
            frames = [x[:1]] + [x[1 + t * i:1 + t * (i + 1)].mean(0, keepdim=True)
                                for i in range((x.shape[0] - 1) // t)]
            x = torch.cat(frames).movedim(0, 1).unsqueeze(0)
        latent = torch.einsum("bc...,cd->bd...", x, self.projection)
        generator = torch.Generator().manual_seed(self.field_seed)
        return latent + torch.randn(latent.shape, generator=generator)


class ChipmunkRandomConditioning:
    """Seeded random conditioning standing in for a text encoder's output."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "family": (list(TEXT_ENCODERS), {"tooltip": "Which model's text encoder to imitate."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
            "tokens": ("INT", {"default": 32, "min": 1, "max": 4096,
                               "tooltip": "Text length; real encoders give 256-512."}),
            "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1,
                                   "tooltip": "Distilled guidance, for the encoders of models "
                                              "that embed it (FLUX.1, FLUX.2 dev, "
                                              "HunyuanVideo)."}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "emit"
    CATEGORY = "chipmunk/dev"
    DESCRIPTION = "Random CONDITIONING of the right shapes for tests without a text encoder."

    def emit(self, family, seed, tokens, guidance):
        return (random_conditioning(family, seed, tokens, guidance),)


class ChipmunkRandomClipVisionOutput:
    """Seeded random CLIP vision output standing in for CLIPVisionEncode."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "encoder": (list(CLIP_VISION_ENCODERS),),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
        }}

    RETURN_TYPES = ("CLIP_VISION_OUTPUT",)
    FUNCTION = "emit"
    CATEGORY = "chipmunk/dev"
    DESCRIPTION = "Random CLIP_VISION_OUTPUT for image-to-video nodes in tests."

    def emit(self, encoder, seed):
        return (random_clip_vision_output(encoder, seed),)


class ChipmunkRandomVAE:
    """A VAE stand-in that encodes images to random-looking latents of the right shape."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "latent_space": (list(VAES),),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
        }}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "emit"
    CATEGORY = "chipmunk/dev"
    DESCRIPTION = "Encode-only VAE stand-in for tests (image-to-video, inpaint, reference nodes)."

    def emit(self, latent_space, seed):
        return (RandomVAE(latent_space, seed),)


NODE_CLASS_MAPPINGS = {
    "ChipmunkRandomConditioning": ChipmunkRandomConditioning,
    "ChipmunkRandomClipVisionOutput": ChipmunkRandomClipVisionOutput,
    "ChipmunkRandomVAE": ChipmunkRandomVAE,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ChipmunkRandomConditioning": "Chipmunk Random Conditioning (dev)",
    "ChipmunkRandomClipVisionOutput": "Chipmunk Random CLIP Vision Output (dev)",
    "ChipmunkRandomVAE": "Chipmunk Random VAE (dev)",
}
