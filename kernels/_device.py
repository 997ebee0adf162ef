"""What the Triton launchers share: facts about the GPU they launch on (shared memory class, L2
size, copy engine), the row tile they split row groups into, and the one log line for a fallback
to the reference."""

from __future__ import annotations

import functools
import logging
import os

import torch


@functools.lru_cache(maxsize=None)
def _big_shared_memory(index: int) -> bool:
    major, minor = torch.cuda.get_device_capability(index)
    # sm_80 and sm_90 give a block up to ~227 KB of shared memory; sm_86 / sm_89 about 100 KB.
    return major >= 9 or (major, minor) == (8, 0)


def size_class(device) -> str:
    """"big" where the tile configurations tuned on the H100 fit in shared memory (and on the CPU,
    where only Triton's interpreter runs them), "small" elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return "big"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return "big" if _big_shared_memory(index) else "small"


@functools.lru_cache(maxsize=None)
def _l2_bytes(index: int) -> int:
    return int(getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0) or 0)


def l2_bytes(device) -> int:
    """The GPU's L2 cache in bytes (0 off CUDA, or where torch does not say)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    return _l2_bytes(device.index if device.index is not None else torch.cuda.current_device())


def capability_major(device) -> int:
    """The GPU's compute capability major (9 for Hopper; 0 off CUDA)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_capability(device.index if device.index is not None
                                            else torch.cuda.current_device())[0]


def row_tile(rows: int, cap: int) -> int:
    """Largest power of two <= cap that divides ``rows`` (a query group or row block: 192 -> 64,
    256 -> 128 with cap 128): Triton tiles are powers of two."""
    tile = 1
    while tile * 2 <= cap and rows % (tile * 2) == 0:
        tile *= 2
    return tile


@functools.lru_cache(maxsize=None)
def _copy_engine(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


@functools.lru_cache(maxsize=None)
def _host_tensor_descriptors() -> bool:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


def tensor_descriptors(device) -> bool:
    """True where kernels may load tiles through the copy engine (TMA) with host-side tensor
    descriptors: a GPU of sm_90 or newer (or Triton's interpreter on the CPU) and a Triton that
    has them."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if not _copy_engine(index):
            return False
    elif os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return _host_tensor_descriptors()


_logger = logging.getLogger(__name__)
_reported: set[tuple[str, str]] = set()


def note_fallback(op: str, reason: str) -> None:
    """Log once per (op, reason) that a Triton launcher handed a call to the PyTorch reference."""
    if (op, reason) not in _reported:
        _reported.add((op, reason))
        _logger.warning("Chipmunk: %s runs on the PyTorch reference (slow): %s", op, reason)
