"""What the Triton launchers share: facts about the GPU they launch on (shared memory class, L2
size, copy engine), the row tile they split row groups into, and the one log line for a fallback
to the reference."""

from __future__ import annotations

import functools
import logging
import os

import torch


def _cuda_index(device) -> int | None:
    """The CUDA device index of ``device`` (the current one when it names none); None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _l2_bytes(index: int) -> int:
    return int(getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0) or 0)


def size_class(device) -> str:
    """"big" where the tile configurations tuned on the H100 fit in shared memory (and on the CPU,
    where only Triton's interpreter runs them), "small" elsewhere."""
    index = _cuda_index(device)
    if index is None:
        return "big"
    # sm_80 and sm_90 give a block up to ~227 KB of shared memory; sm_86 / sm_89 about 100 KB.
    major, minor = _capability(index)
    return "big" if major >= 9 or (major, minor) == (8, 0) else "small"


def l2_bytes(device) -> int:
    """The GPU's L2 cache in bytes (0 off CUDA, or where torch does not say)."""
    index = _cuda_index(device)
    return 0 if index is None else _l2_bytes(index)


def capability_major(device) -> int:
    """The GPU's compute capability major (9 for Hopper; 0 off CUDA)."""
    index = _cuda_index(device)
    return 0 if index is None else _capability(index)[0]


def fp8_supported(device) -> bool:
    """Whether the kernels can convert to and from float8_e4m3fn here: compute capability 8.9 and
    up (Ada, Hopper, Blackwell), and the CPU, where only Triton's interpreter runs them."""
    index = _cuda_index(device)
    return index is None or _capability(index) >= (8, 9)


def row_tile(rows: int, cap: int) -> int:
    """Largest power of two <= cap that divides ``rows`` (a query group or row block: 192 -> 64,
    256 -> 128 with cap 128): Triton tiles are powers of two."""
    tile = 1
    while tile * 2 <= cap and rows % (tile * 2) == 0:
        tile *= 2
    return tile


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
    if torch.device(device).type == "cuda":
        if capability_major(device) < 9:
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
