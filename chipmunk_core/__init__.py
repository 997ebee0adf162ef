"""Chipmunk's sparse-delta method, independent of ComfyUI's UI.

config (settings and per-family defaults) -> schedule (dense or sparse step) and step_cache (skipped
steps) -> state (per-run caches, per-call and per-layer views) -> attention / mlp (the sparse-delta
logic) -> layout (token reordering); adapters/ says what each model family looks like and holds the
only replaced model code (MLPs). Tensor work goes through ``kernels``.
"""

from .adapters import ADAPTERS, FamilyAdapter, ModelPlan, adapter_named, plan_for, supported_models
from .config import FAMILIES, FAMILY_DEFAULTS, FAMILY_NAMES, SLIDER_FIELDS, ChipmunkConfig, resolve_config
from .state import LayerCall, ModelCall, SamplingRun

__all__ = [
    "ADAPTERS", "FamilyAdapter", "ModelPlan", "adapter_named", "plan_for", "supported_models", "FAMILIES",
    "FAMILY_DEFAULTS", "FAMILY_NAMES", "SLIDER_FIELDS", "ChipmunkConfig", "resolve_config", "LayerCall", "ModelCall",
    "SamplingRun",
]
