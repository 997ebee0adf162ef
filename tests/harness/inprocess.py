"""ComfyUI imported into the test process: real models, real nodes, the real KSampler.

Fast tests use this instead of a server. ``InProcessComfy(comfyui_dir)`` imports ComfyUI on the
CPU (``args.cpu`` is set before ``comfy.model_management`` is first imported); every model is a
``comfy.model_patcher.ModelPatcher`` and sampling goes through ``nodes.common_ksampler``, the
function behind the KSampler node.

Models: ``tiny_model(kind, models_dir)`` (tools/tiny_models.py ``KINDS``), ``narrow_flux()``.
Inputs: ``sampling_inputs(kind)`` gives (positive, negative, latent) the way a workflow makes
them: random text from the dev conditioning node, then the kind's stock nodes (empty latent,
ReferenceLatent, InpaintModelConditioning, WanImageToVideo...) fed with the dev nodes' random
image-encoder stand-ins; ``conditioning`` and ``empty_latent`` give the parts.
"""
from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
from pathlib import Path

import torch

from .paths import PACK_NAME, dev_nodes_module, link_custom_nodes, tiny_models_module

# Older conditioning / latent names (the text encoder of one family) -> a kind of that family.
FAMILY_KINDS = {"flux": "flux1_dev", "hunyuan_video": "hunyuan_video", "wan": "wan21_t2v"}

# Stock nodes outside nodes.py that the inputs of the tiny models come from, by module.
STOCK_NODE_MODULES = {
    "comfy_extras.nodes_sd3": ("EmptySD3LatentImage",),
    "comfy_extras.nodes_flux": ("EmptyFlux2LatentImage",),
    "comfy_extras.nodes_edit_model": ("ReferenceLatent",),
    "comfy_extras.nodes_chroma_radiance": ("EmptyChromaRadianceLatentImage",),
    "comfy_extras.nodes_hunyuan": ("EmptyHunyuanLatentVideo", "EmptyHunyuanVideo15Latent",
                                   "HunyuanImageToVideo", "HunyuanVideo15ImageToVideo"),
    "comfy_extras.nodes_wan": ("WanImageToVideo", "Wan22ImageToVideoLatent", "WanVaceToVideo",
                               "WanCameraImageToVideo"),
    "comfy_extras.nodes_camera_trajectory": ("WanCameraEmbedding",),
}


class InProcessComfy:
    def __init__(self, comfyui_dir: Path):
        self.tiny_models = tiny_models_module()
        self.tiny_models.import_comfy(comfyui_dir)
        import comfy.model_management
        import comfy.sd
        import nodes

        if not comfy.model_management.cpu_mode():
            raise RuntimeError("comfy.model_management was imported before the tests chose the "
                               "CPU; import ComfyUI only through this harness")
        self.nodes = nodes
        self.dev_nodes = dev_nodes_module()
        self.version = self.tiny_models.comfy_version()
        self._pack_nodes: dict | None = None

    # --- models ----------------------------------------------------------------------------
    def narrow_flux(self, seed: int = 0, **overrides):
        """A narrow FLUX (width 256, 2+2 blocks, text width 64) as a ModelPatcher."""
        return self.tiny_models.narrow_flux_patcher(seed=seed, **overrides)

    def load_diffusion_model(self, path: Path):
        """A checkpoint through the stock loader (what the "Load Diffusion Model" node calls)."""
        import comfy.sd

        return comfy.sd.load_diffusion_model(str(path))

    def tiny_model(self, kind: str, models_dir: Path, seed: int = 0):
        """Tiny model ``kind`` as a ModelPatcher: through the stock loader where detection allows,
        else in process (``tiny_models.load_model``); its checkpoint is kept in ``models_dir``."""
        return self.tiny_models.load_model(kind, models_dir, seed)

    def kind(self, name: str):
        """The ``tiny_models.Kind`` for a kind name, an alias or an older family name."""
        return self.tiny_models.kind_named(FAMILY_KINDS.get(name, name))

    # --- inputs ----------------------------------------------------------------------------
    def conditioning(self, family: str, seed: int = 0, tokens: int = 32, **widths):
        """Random CONDITIONING as the ``ChipmunkRandomConditioning`` node makes it.

        ``family`` is a text encoder of ``dev_nodes.TEXT_ENCODERS`` or a kind (its encoder).
        For the narrow FLUX pass ``context_width=64``.
        """
        if family not in self.dev_nodes.TEXT_ENCODERS:
            family = self.kind(family).conditioning
        return self.dev_nodes.random_conditioning(family, seed=seed, tokens=tokens, **widths)

    def empty_latent(self, kind: str, width: int = 64, height: int = 64,
                     frames: int = 1) -> dict:
        """The empty latent the stock node of ``kind`` (``Kind.latent``) makes."""
        node = self.stock_node(self.kind(kind).latent)
        inputs = {"width": width, "height": height, "batch_size": 1}
        names = input_names(node)
        if "length" in names:
            inputs["length"] = frames
        if "vae" in names:  # only used to encode a start image
            inputs["vae"] = None
        return self.run_node(node, **inputs)[0]

    def sampling_inputs(self, kind: str, seed: int = 0, width: int = 64, height: int = 64,
                        frames: int = 5, tokens: int = 32) -> tuple:
        """(positive, negative, latent) for one sampling run of ``kind``, as a workflow makes them.

        Random text (``ChipmunkRandomConditioning``); then the kind's stock image node
        (``Kind.image_node``) with a seeded random image, the dev nodes' random VAE and CLIP
        vision output; else the stock empty latent.
        """
        spec = self.kind(kind)
        positive = self.conditioning(spec.conditioning, seed=seed, tokens=tokens)
        negative = self.conditioning(spec.conditioning, seed=seed + 1, tokens=tokens)
        latent = self.empty_latent(spec.name, width, height, frames)
        if spec.image_node is None:
            return positive, negative, latent

        generator = torch.Generator().manual_seed(seed)
        image_frames = 1 if latent["samples"].ndim == 4 else frames
        image = torch.rand(image_frames, height, width, 3, generator=generator)
        vae = self.dev_nodes.RandomVAE(spec.vae, seed)
        vision = (self.dev_nodes.random_clip_vision_output(spec.clip_vision, seed)
                  if spec.clip_vision else None)
        size = {"width": width, "height": height, "length": frames, "batch_size": 1}
        node = self.stock_node(spec.image_node)
        if spec.image_node == "ReferenceLatent":
            (reference,) = self.run_node(self.stock_node("VAEEncode"), pixels=image, vae=vae)
            (positive,) = self.run_node(node, conditioning=positive, latent=reference)
            (negative,) = self.run_node(node, conditioning=negative, latent=reference)
        elif spec.image_node == "InpaintModelConditioning":
            mask = torch.zeros(1, height, width)
            mask[:, height // 4:3 * height // 4, width // 4:3 * width // 4] = 1.0
            positive, negative, latent = self.run_node(
                node, positive=positive, negative=negative, pixels=image, vae=vae, mask=mask,
                noise_mask=True)
        elif spec.image_node == "HunyuanImageToVideo":
            positive, latent = self.run_node(node, positive=positive, vae=vae,
                                             guidance_type="v1 (concat)", start_image=image[:1],
                                             **size)
        elif spec.image_node == "Wan22ImageToVideoLatent":
            (latent,) = self.run_node(node, vae=vae, start_image=image[:1], **size)
        elif spec.image_node == "WanVaceToVideo":
            positive, negative, latent, _ = self.run_node(
                node, positive=positive, negative=negative, vae=vae, control_video=image, **size)
        else:  # WanImageToVideo, WanCameraImageToVideo, HunyuanVideo15ImageToVideo
            extra = {}
            if spec.image_node == "WanCameraImageToVideo":
                extra["camera_conditions"] = self.run_node(
                    self.stock_node("WanCameraEmbedding"), camera_pose="Pan Left",
                    width=width, height=height, length=frames)[0]
            positive, negative, latent = self.run_node(
                node, positive=positive, negative=negative, vae=vae, start_image=image[:1],
                clip_vision_output=vision, **size, **extra)
        return positive, negative, latent

    def stock_node(self, node_id: str):
        """A stock node class by id (nodes.py, or the comfy_extras module that defines it)."""
        if node_id in self.nodes.NODE_CLASS_MAPPINGS:
            return self.nodes.NODE_CLASS_MAPPINGS[node_id]
        for module, ids in STOCK_NODE_MODULES.items():
            if node_id in ids:
                return getattr(importlib.import_module(module), node_id)
        raise KeyError(f"no stock node {node_id} known to the harness")

    # --- running ---------------------------------------------------------------------------
    def ksampler(self, model, positive, negative, latent: dict, *, seed: int = 0, steps: int = 1,
                 cfg: float = 1.0, sampler_name: str = "euler", scheduler: str = "simple",
                 denoise: float = 1.0) -> torch.Tensor:
        """One KSampler node execution; returns the sampled latent tensor."""
        (out,) = self.nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler,
                                            positive, negative, latent, denoise=denoise)
        return out["samples"]

    def run_node(self, node_cls, **inputs) -> tuple:
        """Execute a node class as ComfyUI's executor does (classic or V3 API).

        Widget inputs that are not given take their declared defaults.
        """
        from comfy_api.internal import _ComfyNodeInternal, make_locked_method_func

        inputs = {**declared_defaults(node_cls), **inputs}
        if issubclass(node_cls, _ComfyNodeInternal):
            node_cls.VALIDATE_CLASS()
            clone = node_cls.PREPARE_CLASS_CLONE({})
            function = make_locked_method_func(node_cls, node_cls.FUNCTION, clone)
        else:
            function = getattr(node_cls(), node_cls.FUNCTION)
        result = function(**inputs)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
        if hasattr(result, "result"):  # V3 NodeOutput
            return tuple(result.result or ())
        if isinstance(result, dict):
            return tuple(result.get("result", ()))
        return tuple(result)

    # --- the pack --------------------------------------------------------------------------
    def load_pack(self, link_folder: Path) -> dict:
        """Import the pack the way ComfyUI does (``nodes.load_custom_node`` on its linked folder).

        Returns the node classes it registered, by node id. Raises with ComfyUI's log lines when
        the import fails.
        """
        if self._pack_nodes is None:
            folder = link_custom_nodes(link_folder)
            before = set(self.nodes.NODE_CLASS_MAPPINGS)
            records = _LogRecords()
            logging.getLogger().addHandler(records)
            try:
                loaded = asyncio.run(self.nodes.load_custom_node(
                    str(folder / PACK_NAME), ignore=before, module_parent="custom_nodes"))
            finally:
                logging.getLogger().removeHandler(records)
            if not loaded:
                raise ImportError(f"ComfyUI could not load the pack:\n{records.text()}")
            self._pack_nodes = {name: cls for name, cls in self.nodes.NODE_CLASS_MAPPINGS.items()
                                if name not in before}
        return self._pack_nodes


def input_names(node_cls) -> set[str]:
    """Names of a node's declared inputs."""
    spec = node_cls.INPUT_TYPES()
    return {name for section in ("required", "optional") for name in (spec.get(section) or {})}


def declared_defaults(node_cls) -> dict:
    """Defaults of a node's widget inputs, from its (classic or V3-compatible) INPUT_TYPES."""
    spec = node_cls.INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        for name, entry in (spec.get(section) or {}).items():
            if len(entry) > 1 and isinstance(entry[1], dict) and "default" in entry[1]:
                out[name] = entry[1]["default"]
    return out


async def _await(awaitable):
    return await awaitable


class _LogRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.records)
