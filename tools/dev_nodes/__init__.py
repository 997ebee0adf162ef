"""Development-only ComfyUI nodes for driving tiny models without text encoders.

Loaded by tools/start.sh and the tests next to the pack, never by the pack itself: users'
ComfyUI never sees these nodes. Classic node API, no ComfyUI imports, so that the tests can
also import ``random_conditioning`` directly.
"""
import torch

# Text-encoder output shapes each family's diffusion model expects.
FAMILIES = {
    # name: (context width, pooled width or None, takes a guidance value)
    "flux": (4096, 768, True),
    "hunyuan_video": (4096, 768, True),
    "wan": (4096, None, False),
}


def random_conditioning(family: str, seed: int = 0, tokens: int = 32, guidance: float = 3.5,
                        context_width: int | None = None, pooled_width: int | None = None):
    """A seeded random CONDITIONING list ``[[context, options]]`` shaped for ``family``.

    ``context`` is [1, tokens, context_width] (N(0, 1)); FLUX and HunyuanVideo also get
    ``pooled_output`` [1, pooled_width] and ``guidance``. Widths default to the real encoders'.
    """
    default_context, default_pooled, takes_guidance = FAMILIES[family]
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(1, tokens, context_width or default_context, generator=generator)
    options = {}
    if default_pooled is not None:
        options["pooled_output"] = torch.randn(1, pooled_width or default_pooled,
                                               generator=generator)
    if takes_guidance:
        options["guidance"] = guidance
    return [[context, options]]


class ChipmunkRandomConditioning:
    """Seeded random conditioning standing in for a text encoder's output."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "family": (list(FAMILIES),),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
            "tokens": ("INT", {"default": 32, "min": 1, "max": 4096,
                               "tooltip": "Text length; real encoders give 256-512."}),
            "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1,
                                   "tooltip": "Distilled guidance (FLUX, HunyuanVideo)."}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "emit"
    CATEGORY = "chipmunk/dev"
    DESCRIPTION = "Random CONDITIONING of the right shapes for tests without a text encoder."

    def emit(self, family, seed, tokens, guidance):
        return (random_conditioning(family, seed, tokens, guidance),)


NODE_CLASS_MAPPINGS = {"ChipmunkRandomConditioning": ChipmunkRandomConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"ChipmunkRandomConditioning": "Chipmunk Random Conditioning (dev)"}
