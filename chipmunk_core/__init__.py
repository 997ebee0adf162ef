"""Chipmunk's sparse-delta method, independent of ComfyUI's UI.

config (settings and per-family defaults) -> schedule (dense or sparse step) -> state (per-run
caches) -> attention / mlp (the sparse-delta logic) -> layout (token reordering); adapters/ holds
one adapter per model family. Tensor work goes through ``kernels``.
"""

from .adapters import ADAPTERS, FamilyAdapter, adapter_for, adapter_named
from .config import FAMILIES, FAMILY_DEFAULTS, FAMILY_NAMES, ChipmunkConfig, resolve_config
from .state import ModelCall, SamplingRun

__all__ = [
    "ADAPTERS", "FamilyAdapter", "adapter_for", "adapter_named", "FAMILIES", "FAMILY_DEFAULTS", "FAMILY_NAMES",
    "ChipmunkConfig", "resolve_config", "ModelCall", "SamplingRun",
]
