"""The buffers caches live in: the model dimensions they are sized by, long-lived buffers refilled
in place, and the moves between host memory and the compute device for caches the run plan
(``plan.py``) streams from host memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelDims:
    """What the cache size depends on, per family: read off the diffusion model by its adapter."""

    n_layers: int
    heads: int
    head_dim: int
    mlp_hidden: int
    mlp_out: int


def reuse_buffer(buffer, shape, dtype, device, pinned=False) -> torch.Tensor:
    """``buffer`` when it has this shape, dtype and device, else a new empty tensor (in pinned host
    memory with ``pinned``, so that copies from the GPU into it are asynchronous). Long-lived
    tensors refilled through this keep their addresses, which a captured CUDA graph relies on."""
    device = torch.device(device)
    if buffer is not None and tuple(buffer.shape) == tuple(shape) and buffer.dtype == dtype and buffer.device == device:
        return buffer
    return torch.empty(shape, dtype=dtype, device=device, pin_memory=pinned and device.type == "cpu")


def to_storage(tensor: torch.Tensor, storage: torch.device) -> torch.Tensor:
    """A cache tensor moved to where caches live (pinned host memory when that is the CPU)."""
    if tensor.device == storage:
        return tensor
    if storage.type == "cpu" and tensor.is_cuda:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return host
    return tensor.to(storage)


def to_compute(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor if tensor.device == device else tensor.to(device, non_blocking=True)
