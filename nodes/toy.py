"""The toy models of the quality lab (lab/): their prompt node, and their model folders.

Importing this module adds ``lab/models/diffusion_models`` and ``lab/models/vae_approx`` to
ComfyUI's model folders, so the toy FLUX, the toy WAN2.1 and their tiny autoencoders appear in the
stock "Load Diffusion Model" and "Load VAE" nodes without copying anything.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from comfy_api.latest import io

from ..lab import vocab

logger = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parents[1] / "lab" / "models"
MODEL_CHOICES = {"toy FLUX": "flux", "toy WAN2.1": "wan"}


def register_model_folders() -> None:
    import folder_paths

    for kind in ("diffusion_models", "vae_approx"):
        folder_paths.add_model_folder_path(kind, str(MODELS_DIR / kind))


def toy_conditioning(text: str, family: str, guidance: float = 3.5) -> list:
    """The CONDITIONING a toy model takes for ``text``: context [1, 8, width]; FLUX also gets the
    pooled vector and the guidance value. Unknown words are dropped with a warning."""
    context, pooled, unknown = vocab.encode(text, family)
    if unknown:
        logger.warning("Chipmunk toy prompt: words outside the toy vocabulary are ignored: %s", ", ".join(unknown))
    options = {}
    if pooled is not None:
        options = {"pooled_output": torch.from_numpy(pooled)[None], "guidance": guidance}
    return [[torch.from_numpy(context)[None], options]]


class ChipmunkToyPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ChipmunkToyPrompt",
            display_name="Chipmunk Toy Prompt",
            category="model_patches/chipmunk/toy",
            description=(
                "Conditioning for the pack's toy FLUX and toy WAN2.1 (small models trained on emoji scenes, for "
                "measuring Chipmunk's quality). Words: the emoji names (" + ", ".join(vocab.CLASS_WORDS) +
                "), sizes (small, medium, large), positions (top/middle/bottom + left/center/right), colours ("
                + ", ".join(vocab.COLOURS) + ") with 'background' or 'gradient', and for video the motions ("
                + ", ".join(vocab.MOTIONS) + "). An empty prompt is the unconditional input (negative)."),
            inputs=[
                io.String.Input("text", default="a large cat at the middle center on a blue background",
                                tooltip="A prompt in the toy vocabulary; other words are ignored."),
                io.Combo.Input("model", options=list(MODEL_CHOICES), default="toy FLUX",
                               tooltip="Which toy model the conditioning is for."),
                io.Float.Input("guidance", default=3.5, min=0.0, max=10.0, step=0.1,
                               tooltip="Toy FLUX's guidance input (the toy model was trained to ignore it)."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text, model, guidance) -> io.NodeOutput:
        return io.NodeOutput(toy_conditioning(text, MODEL_CHOICES[model], guidance))


register_model_folders()
