"""The buffers caches live in: the model dimensions they are sized by, long-lived buffers refilled
in place, and the moves between host memory and the compute device for caches the run plan
(``plan.py``) streams from host memory."""

from __future__ import annotations

import copy
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

    def fc2_bytes(self, element: int) -> int:
        """One MLP's second weight (what a sparse step transposes into the run's scratch)."""
        return self.mlp_hidden * self.mlp_out * element


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


def take_rows(value, start: int, stop: int):
    """Batch rows ``start:stop`` of a cache value: a tensor (batch first), or a tuple, list or dict
    of them; anything else is shared as it is. Copies, so the pieces are independent."""
    if isinstance(value, torch.Tensor):
        return value[start:stop].clone()
    if isinstance(value, (tuple, list)):
        return type(value)(take_rows(v, start, stop) for v in value)
    if isinstance(value, dict):
        return {k: take_rows(v, start, stop) for k, v in value.items()}
    return value


def join_rows(values: list):
    """The pieces of ``take_rows`` (in row order) as one value; None when any piece is None."""
    first = values[0]
    if any(v is None for v in values):
        return None
    if isinstance(first, torch.Tensor):
        joined = torch.cat(values)
        return joined.pin_memory() if first.is_pinned() else joined
    if isinstance(first, (tuple, list)):
        return type(first)(join_rows([v[i] for v in values]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: join_rows([v[k] for v in values]) for k in first}
    return first


def with_batch(shape: tuple, batch: int) -> tuple:
    """``shape`` with its first (batch) size replaced."""
    return (batch,) + tuple(shape[1:])


class Rows:
    """Mixin for per-conditioning cache states: ``BATCHED`` names the attributes whose tensors
    have the batch first; ``rebatched(batch)`` fixes whatever else records the batch size. A state
    can then be cut into the rows of each conditioning, or the pieces joined again, when ComfyUI
    changes how it batches cond and uncond mid-run (it decides from free memory on every call)."""

    BATCHED: tuple[str, ...] = ()

    signature = None

    def rebatched(self, batch: int):
        """Update what records the batch size after a cut or a join: by default a ``signature``
        whose first entry is the batched input's shape."""
        if self.signature is not None:
            self.signature = (with_batch(self.signature[0], batch),) + tuple(self.signature[1:])

    def take_rows(self, start: int, stop: int):
        piece = copy.copy(self)
        for name in self.BATCHED:
            setattr(piece, name, take_rows(getattr(self, name), start, stop))
        piece.rebatched(stop - start)
        return piece

    @classmethod
    def joined(cls, states: list):
        whole = copy.copy(states[0])
        for name in cls.BATCHED:
            setattr(whole, name, join_rows([getattr(s, name) for s in states]))
        whole.rebatched(sum(s.batch() for s in states))
        return whole

    def batch(self) -> int:
        raise NotImplementedError


class HostPrefetch:
    """Copies of host-resident caches brought to the device ahead of use, on a side stream.

    The layers whose caches live in host memory register in the order the model runs them. When a
    layer takes its cache on a sparse step, the next registered layer's copy starts on the side
    stream, so it travels while this layer computes; the compute stream waits for a copy only
    when it uses it. A layer with no copy in flight (the first streamed layer of a step) copies
    in the compute stream. A state whose host tensors are rewritten (a dense step) drops its copy.
    Inside a CUDA graph capture, and on the CPU, copies stay in the compute stream."""

    def __init__(self):
        self.order: list = []       # states, in the order they registered
        self.pending: dict = {}     # id(state) -> (device tensors, event)
        self._stream = None

    def register(self, state):
        self.order.append(state)

    def drop(self, state):
        """Forget ``state``'s copy in flight (its host tensors are being rewritten)."""
        self._retire(self.pending.pop(id(state), None))

    @staticmethod
    def _retire(entry):
        # The copy's memory came from the compute stream's pool: that stream waits for the copy
        # before the memory can be handed out again.
        if entry is not None:
            torch.cuda.current_stream(entry[0][0].device).wait_event(entry[1])

    def take(self, state, tensors: tuple, device: torch.device) -> tuple:
        """``tensors`` (host tensors of ``state``) on ``device``; starts the next layer's copy."""
        side = device.type == "cuda" and not torch.cuda.is_current_stream_capturing()
        if not side:  # (a copy in flight stays pending: a capture may not wait on it)
            return tuple(to_compute(t, device) for t in tensors)
        entry = self.pending.pop(id(state), None)
        if entry is not None:
            copies, event = entry
            torch.cuda.current_stream(device).wait_event(event)
        else:
            copies = tuple(to_compute(t, device) for t in tensors)
        self._ahead(state, device)
        return copies

    def _ahead(self, state, device):
        index = next((i for i, s in enumerate(self.order) if s is state), None)
        if index is None or index + 1 >= len(self.order):
            return
        following = self.order[index + 1]
        host = following.host_tensors()
        if not host or id(following) in self.pending:
            return
        current = torch.cuda.current_stream(device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        # Allocated in the compute stream, which waits for the copy before any use: the memory
        # is reused only after that.
        copies = tuple(torch.empty_like(t, device=device) for t in host)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            for device_copy, t in zip(copies, host):
                device_copy.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        self.pending[id(following)] = (copies, event)

    def reset(self):
        for entry in self.pending.values():
            self._retire(entry)
        self.order.clear()
        self.pending.clear()
