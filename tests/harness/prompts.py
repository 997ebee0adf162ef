"""API-format prompts (node id -> {class_type, inputs}) for the tiny models.

Every graph uses stock nodes plus the development node ``ChipmunkRandomConditioning``; a
``chipmunk`` argument (a dict of inputs, ``{}`` for the node's defaults) inserts the pack's
``ChipmunkAccelerate`` between the loader and the sampler.
"""
from __future__ import annotations

ACCELERATE_NODE = "ChipmunkAccelerate"
CONDITIONING_NODE = "ChipmunkRandomConditioning"
SAVE_NODE_ID = "save"


def widget_defaults(node_info: dict) -> dict:
    """Defaults of a node's widget inputs (those with a default), from its ``/object_info``."""
    out = {}
    for section in ("required", "optional"):
        for name, spec in (node_info.get("input", {}).get(section) or {}).items():
            if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]:
                out[name] = spec[1]["default"]
    return out


def flux_text_to_image(unet_name: str, *, seed: int = 0, steps: int = 2, cfg: float = 1.0,
                       width: int = 256, height: int = 256, tokens: int = 32,
                       sampler_name: str = "euler", scheduler: str = "simple",
                       chipmunk: dict | None = None,
                       filename_prefix: str = "chipmunk-tests/flux") -> dict:
    """UNETLoader [-> ChipmunkAccelerate] -> KSampler -> SaveLatent on a FLUX checkpoint."""
    prompt = {
        "loader": {"class_type": "UNETLoader",
                   "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        "positive": {"class_type": CONDITIONING_NODE,
                     "inputs": {"family": "flux", "seed": seed, "tokens": tokens,
                                "guidance": 3.5}},
        "negative": {"class_type": "ConditioningZeroOut",
                     "inputs": {"conditioning": ["positive", 0]}},
        "latent": {"class_type": "EmptySD3LatentImage",
                   "inputs": {"width": width, "height": height, "batch_size": 1}},
        "sampler": {"class_type": "KSampler",
                    "inputs": {"model": ["loader", 0], "seed": seed, "steps": steps, "cfg": cfg,
                               "sampler_name": sampler_name, "scheduler": scheduler,
                               "positive": ["positive", 0], "negative": ["negative", 0],
                               "latent_image": ["latent", 0], "denoise": 1.0}},
        SAVE_NODE_ID: {"class_type": "SaveLatent",
                       "inputs": {"samples": ["sampler", 0],
                                  "filename_prefix": filename_prefix}},
    }
    if chipmunk is not None:
        prompt["chipmunk"] = {"class_type": ACCELERATE_NODE,
                              "inputs": {**chipmunk, "model": ["loader", 0]}}
        prompt["sampler"]["inputs"]["model"] = ["chipmunk", 0]
    return prompt
