"""Choosing between the Triton kernels and the PyTorch references."""

from __future__ import annotations

import functools
import logging
import os

logger = logging.getLogger(__name__)

# CHIPMUNK_KERNELS=reference forces the PyTorch references (debugging, bisecting a kernel bug).
_FORCE_ENV = "CHIPMUNK_KERNELS"


@functools.lru_cache(maxsize=None)
def _triton_problem(device_type: str) -> str | None:
    """Why Triton cannot serve tensors on this kind of device, or None when it can."""
    if os.environ.get(_FORCE_ENV, "").lower() == "reference":
        return f"{_FORCE_ENV}=reference is set"
    if device_type != "cuda":
        return f"tensors are on '{device_type}', the Triton kernels need CUDA"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton cannot be imported ({exc})"
    return None


_reported: set[str] = set()


def backend_for(tensor) -> str:
    """'triton' or 'reference' for an operation on ``tensor``; logs the reason once per device type."""
    device_type = tensor.device.type
    problem = _triton_problem(device_type)
    if problem is None:
        return "triton"
    if device_type not in _reported:
        _reported.add(device_type)
        level = logging.INFO if device_type == "cpu" else logging.WARNING
        logger.log(level, "Chipmunk: using the PyTorch reference kernels (slow): %s", problem)
    return "reference"
