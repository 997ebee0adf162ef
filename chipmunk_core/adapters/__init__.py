"""What Chipmunk knows about each model family, read from the model ComfyUI built.

An adapter says which diffusion-model classes it serves, how its blocks are keyed for ComfyUI's
block patches, how a call's latent becomes a token grid, how long the text and image streams of a
block are, and which MLPs the sparse-delta MLP may replace (``mlp_sites``: only those whose
structure matches a fingerprint; ``replacements`` holds that code and its parity self-check).
Attention needs nothing of the model: it goes through ComfyUI's attention override.

Adapters import ComfyUI lazily (only when asked about a model), so the core stays importable
without it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass

from ..layout import SequenceShape
from ..memory import ModelDims
from . import replacements


@dataclass(frozen=True)
class MLPSite:
    """One MLP the sparse-delta MLP replaces: where it is, and which layer and stream it serves."""

    path: str    # object path under the BaseModel, e.g. "diffusion_model.double_blocks.3.img_mlp"
    layer: int
    stream: str  # "img" (two-stream blocks), "fused" (single blocks), "ffn" (WAN), "joint" (a double block)
    kind: str    # "sequential", "single_block" or "double_block" (per-token work only; see replacements)


@dataclass(frozen=True)
class ModelPlan:
    """What Chipmunk will do with one model, decided when the node runs."""

    family: str
    model_name: str
    block_keys: tuple[tuple[str, int], ...]
    n_layers: int
    mlp_sites: tuple[MLPSite, ...]
    mlp_refusals: tuple[str, ...]  # why an MLP keeps its stock code, one line per kind of block
    attention_only_reason: str | None = None  # set when the whole model runs attention-only
    step_cache_reason: str | None = None      # set when step caching cannot be used with this model
    block_refusals: tuple[str, ...] = ()      # why double blocks keep ComfyUI's per-token code (their MLP may be sparse)

    @property
    def mlp_layers(self) -> frozenset[int]:
        return frozenset(site.layer for site in self.mlp_sites)

    @property
    def image_mlp_layers(self) -> frozenset[int]:
        """The layers whose replaced MLP sees the image tokens only (two-stream blocks)."""
        return frozenset(site.layer for site in self.mlp_sites if site.stream == "img")

    @property
    def folded_layers(self) -> frozenset[int]:
        """The layers whose attention delta folds into the MLP's output cache (blocks whose
        replacement feeds attention and MLP through one linear map: FLUX's single blocks)."""
        return frozenset(site.layer for site in self.mlp_sites if site.kind == "single_block")


def _class(module_name: str, class_name: str):
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return None


@functools.lru_cache(maxsize=None)
def _forward_signature(cls) -> inspect.Signature:
    """The signature of ``cls._forward`` as the DIFFUSION_MODEL executor calls it (bound: no self)."""
    signature = inspect.signature(cls._forward)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


class FamilyAdapter:
    family = ""
    # The streams a block patch receives and returns ("img" and "txt" for two-stream blocks).
    stream_names: tuple[str, ...] = ("img",)
    # (module, class name, display name, full support?) of the diffusion models this adapter serves;
    # classes not marked full run attention-only (their forward differs in ways Chipmunk's MLP
    # and step cache do not follow).
    model_classes: tuple[tuple[str, str, str, bool], ...] = ()

    def recognise(self, diffusion_model) -> tuple[str, bool] | None:
        """(display name, full support) when this adapter serves the model's exact class."""
        for module_name, class_name, display, full in self.model_classes:
            cls = _class(module_name, class_name)
            if cls is not None and type(diffusion_model) is cls:
                return self.model_name(diffusion_model, display), full
        return None

    def model_name(self, diffusion_model, display: str) -> str:
        return display

    def block_keys(self, diffusion_model) -> list[tuple[str, int]]:
        raise NotImplementedError

    def layer_index(self, diffusion_model, kind: str, index: int) -> int:
        raise NotImplementedError

    def dims(self, diffusion_model) -> ModelDims:
        """The dimensions the caches are sized by."""
        raise NotImplementedError

    def mlp_candidates(self, diffusion_model):
        """(path, layer, stream, kind, module) of every MLP the sparse-delta MLP could replace."""
        raise NotImplementedError

    def call_arguments(self, diffusion_model, args: tuple, kwargs: dict) -> dict:
        """The DIFFUSION_MODEL call's arguments by name (the model's own ``_forward`` signature)."""
        bound = _forward_signature(type(diffusion_model)).bind_partial(*args, **kwargs)
        return dict(bound.arguments)

    def geometry(self, diffusion_model, arguments: dict) -> SequenceShape:
        """The generated latent's token grid, from the call's arguments."""
        raise NotImplementedError

    def block_outputs(self, kind: str) -> tuple[str, ...]:
        """The keys a block patch of this kind returns."""
        return ("img",)

    def streams(self, block, kind: str, args: dict, call) -> tuple[int, int, bool]:
        """(text tokens, image tokens, text first) of the sequence a block attends over."""
        raise NotImplementedError

    @staticmethod
    def patch_grid(spatial_shape, patch_size) -> tuple[int, ...]:
        """Token grid after the patch embedding (ComfyUI pads the latent to whole patches)."""
        return tuple(-(-s // p) for s, p in zip(spatial_shape, patch_size))

    def plan(self, diffusion_model, name: str, full: bool) -> ModelPlan:
        sites, refusals, block_refusals = [], {}, {}
        if full:
            for path, layer, stream, kind, module in self.mlp_candidates(diffusion_model):
                reason = replacements.fingerprint(kind, module)
                if reason is None:
                    sites.append(MLPSite(path, layer, stream, kind))
                else:
                    (block_refusals if kind == "double_block" else refusals).setdefault(f"{kind} {reason}", None)
        return ModelPlan(
            family=self.family, model_name=name, block_keys=tuple(self.block_keys(diffusion_model)),
            n_layers=self.dims(diffusion_model).n_layers, mlp_sites=tuple(sites),
            mlp_refusals=tuple(refusals), block_refusals=tuple(block_refusals),
            attention_only_reason=None if full else f"{name} changes the model's forward pass: Chipmunk runs its "
                                                    "attention only (MLP dense, no step caching)",
            step_cache_reason=None if full else f"{name} adds its own inputs between blocks")


from .flux import FluxAdapter, HunyuanVideoAdapter  # noqa: E402
from .wan import WanAdapter  # noqa: E402

ADAPTERS = [FluxAdapter(), HunyuanVideoAdapter(), WanAdapter()]


def supported_models() -> str:
    names = [display for adapter in ADAPTERS for _, _, display, _ in adapter.model_classes]
    return ", ".join(dict.fromkeys(names))


def adapter_named(family: str) -> FamilyAdapter:
    return next(a for a in ADAPTERS if a.family == family)


def plan_for(diffusion_model) -> tuple[FamilyAdapter, ModelPlan]:
    """The adapter and plan for this diffusion model, or a ValueError naming the supported models."""
    for adapter in ADAPTERS:
        found = adapter.recognise(diffusion_model)
        if found is not None:
            return adapter, adapter.plan(diffusion_model, *found)
    raise ValueError(f"Chipmunk Accelerate does not support this model ({type(diffusion_model).__name__}). "
                     f"Supported: {supported_models()}. Connect one of those to Chipmunk Accelerate, or remove "
                     f"the node.")
