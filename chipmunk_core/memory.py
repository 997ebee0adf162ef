"""How much memory the delta caches of a run take, known before it is spent, and where they live.

The estimate comes from the model's dimensions and the latent size alone, so it is logged (and the
placement decided) on the first model call of a conditioning, before any cache exists. When the
caches would not fit in free device memory next to the model's own working memory, they are kept
in host memory and streamed to the device one layer at a time (asynchronous copies from pinned
buffers, allocated lazily per layer rather than all at start-up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels import selection_size
from .config import ChipmunkConfig

# Device memory left free for the model's activations when deciding where caches go.
WORKING_MEMORY_SHARE = 0.25


@dataclass(frozen=True)
class ModelDims:
    """What the cache size depends on, per family: read off the diffusion model by its adapter."""

    n_layers: int
    heads: int
    head_dim: int
    mlp_hidden: int
    mlp_out: int


def cache_bytes(config: ChipmunkConfig, dims: ModelDims, batch: int, n_tokens: int, dtype: torch.dtype) -> int:
    """Bytes of all Chipmunk caches for one conditioning signature (``batch`` rows of ``n_tokens``)."""
    layers = max(0, dims.n_layers - config.first_dense_layers)
    element = torch.empty((), dtype=dtype).element_size()
    per_layer = 0
    if config.sparse_attention:
        groups = math.ceil(n_tokens / config.query_group)
        kept = selection_size(n_tokens, round(config.attention_keep * n_tokens), config.selection_tile)
        per_layer += batch * n_tokens * dims.heads * dims.head_dim * element  # delta cache
        per_layer += batch * dims.heads * (groups * (kept + 1) + n_tokens) * 4  # key lists, counts, lse
    if config.sparse_mlp:
        blocks = math.ceil(n_tokens / config.mlp_block)
        per_layer += batch * n_tokens * (dims.mlp_hidden + dims.mlp_out) * element
        per_layer += batch * blocks * dims.mlp_hidden * 4
        per_layer += dims.mlp_hidden * dims.mlp_out * element  # fc2 transposed for the kernel
    return layers * per_layer


def place_caches(needed: int, free: int | None, device: torch.device) -> torch.device:
    """The device the caches live on: the compute device when they fit, else the CPU."""
    if device.type == "cpu" or free is None:
        return device
    return device if needed <= free * (1.0 - WORKING_MEMORY_SHARE) else torch.device("cpu")


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
