"""ComfyUI imported into the test process: real models, real nodes, the real KSampler.

Fast tests use this instead of a server. ``InProcessComfy(comfyui_dir)`` imports ComfyUI on the
CPU (``args.cpu`` is set before ``comfy.model_management`` is first imported); every model is a
``comfy.model_patcher.ModelPatcher`` and sampling goes through ``nodes.common_ksampler``, the
function behind the KSampler node.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from pathlib import Path

import torch

from .paths import PACK_NAME, dev_nodes_module, link_custom_nodes, tiny_models_module

VIDEO_FAMILIES = ("hunyuan_video", "wan")


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
        self._pack_nodes: dict | None = None

    # --- models ----------------------------------------------------------------------------
    def narrow_flux(self, seed: int = 0, **overrides):
        """A narrow FLUX (width 256, 2+2 blocks, text width 64) as a ModelPatcher."""
        return self.tiny_models.narrow_flux_patcher(seed=seed, **overrides)

    def load_diffusion_model(self, path: Path):
        """A checkpoint through the stock loader (what the "Load Diffusion Model" node calls)."""
        import comfy.sd

        return comfy.sd.load_diffusion_model(str(path))

    # --- inputs ----------------------------------------------------------------------------
    @staticmethod
    def conditioning(family: str, seed: int = 0, tokens: int = 32, **widths):
        """Random CONDITIONING as the ``ChipmunkRandomConditioning`` node makes it.

        For the narrow FLUX pass ``context_width=64``.
        """
        return dev_nodes_module().random_conditioning(family, seed=seed, tokens=tokens, **widths)

    @staticmethod
    def empty_latent(family: str, width: int = 64, height: int = 64, frames: int = 1) -> dict:
        """Zeros shaped like EmptySD3LatentImage (images) or EmptyHunyuanLatentVideo (video)."""
        if family in VIDEO_FAMILIES:
            shape = [1, 16, (frames - 1) // 4 + 1, height // 8, width // 8]
        else:
            shape = [1, 16, height // 8, width // 8]
        return {"samples": torch.zeros(shape)}

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
