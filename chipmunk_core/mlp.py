"""Sparse-delta MLP for one layer: hidden-unit caches and the choice of units to recompute.

Dense step: the caller computes the MLP normally; we keep the post-activation hidden matrix H, the
output Y and, per row block, the mean of fc1's pre-activation. Sparse step: per row block, rank
hidden units by |fc1(mean of the block's inputs) - cached block mean| (fc1 is linear, so that is
exactly the change of the block's mean pre-activation), recompute the top ones plus a few random
ones, and update H and Y by the delta. The block mean of the recomputed units is refreshed, so the
next ranking measures change since each unit was last recomputed. Like the reference, the
ranking is redone every ``mlp_selection_interval`` sparse steps; in between, the same units are
recomputed.

A sparse step is two launches (the update) plus three when it ranks (block means of x, fc1 of the
means, one selection kernel that also refreshes the block means). The row order is folded into
the kernels (x and the output stay in the model's token order; only the hidden cache is kept in
block order). Once the state exists for a shape, a step neither synchronises with the host nor
draws from a generator, and the long-lived tensors are updated in place (CUDA-graph safe).
"""

from __future__ import annotations

import torch

from .. import kernels
from ..kernels.mlp_reference import ACTIVATIONS
from .config import ChipmunkConfig
from .layout import inverse_permutation
from .memory import Rows, reuse_buffer, to_compute

ACTIVATION = "gelu_tanh"


class SparseDeltaMLP(Rows):
    """Per-layer, per-conditioning MLP caches; x is [B, N, Din].

    The hidden cache is kept in block order (rows permuted by ``row_order``, so a row block is
    contiguous) and unit-major ([B, M, N]): the layout the Triton kernel reads and writes with
    coalesced accesses (scattered 2-byte stores into a token-major cache cost half the sparse
    MLP's time on an H100). The output cache stays in token order (its rows are whole, contiguous
    vectors wherever they sit). fc2's weight is handed to the kernel transposed (``w2_t.t()``,
    one row per unit): each sparse step transposes the weight as the model holds it at that moment
    (casts, LoRA hooks and keyframes included) into ``fc2_scratch``, one buffer per weight shape for
    the whole run (or a temporary without one). No copy of a weight outlives the step.
    """

    BATCHED = ("hidden", "hidden_scale", "out", "block_mean", "_selection", "_x_mean")

    def __init__(self, storage: torch.device | None = None, fc2_scratch: "TransposeScratch | None" = None):
        self.storage = storage  # where the hidden/output caches live (None: with the computation)
        self.fc2_scratch = fc2_scratch  # None: a temporary per step
        self.reset()

    def reset(self):
        self.hidden = None      # [B, M, N] post-activation, block order, unit-major (model dtype, or fp8)
        self.hidden_scale = None  # [B, M] float32 unit scales of an fp8 hidden cache (else None)
        self.out = None         # [B, N, Dout] MLP output as last computed, token order
        self.block_mean = None  # [B, NB, M] fp32 pre-activation mean per row block
        self.signature = None
        self._order = None      # row order of the last dense step
        self._selection = None  # (indices, counts) of the last ranking (buffers reused by the next)
        self._sparse_steps = 0  # sparse steps since the last dense step
        self._x_mean = None     # [B, NB, Din] block means of x, fc1's dtype
        self.folded = False     # ``out`` also holds the block's attention delta (``fold_in``)

    def batch(self) -> int:
        return 0 if self.hidden is None else self.hidden.shape[0]

    def ready_for(self, x) -> bool:
        return self.hidden is not None and self.signature == (tuple(x.shape), x.dtype, x.device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def buffers(self) -> list[torch.Tensor]:
        """The long-lived tensors a sparse step reads or updates in place."""
        tensors = (self.hidden, self.hidden_scale, self.out, self.block_mean, self._x_mean, *(self._selection or ()))
        return [t for t in tensors if t is not None]

    def hidden_in_token_order(self) -> torch.Tensor:
        """The hidden cache as [B, N, M] in the model's token order (for inspection and tests)."""
        inverse = inverse_permutation(self._order.long()).to(self.hidden.device)
        hidden = self.hidden if self.hidden_scale is None else self.hidden.float() * self.hidden_scale[..., None]
        return hidden.transpose(1, 2).index_select(1, inverse)

    def dense_step(self, x, pre_activation, row_order, config: ChipmunkConfig) -> torch.Tensor:
        """Record a dense step from fc1's output; returns the activation for the caller's fc2."""
        hidden = ACTIVATIONS[ACTIVATION](pre_activation)
        batch, n_tokens, n_units = hidden.shape
        self._order = row_order
        blocked = hidden.index_select(1, row_order.long()).transpose(1, 2)
        storage = self.storage or hidden.device
        dtype = kernels.FP8 if config.fp8_caches else hidden.dtype
        self.hidden = reuse_buffer(self.hidden, (batch, n_units, n_tokens), dtype, storage, hidden.is_cuda)
        if config.fp8_caches:  # one scale per unit, with room for later values (kernels.HIDDEN_HEADROOM)
            blocked, scale = kernels.quantize_rows(blocked, kernels.HIDDEN_HEADROOM)
            self.hidden_scale = reuse_buffer(self.hidden_scale, (batch, n_units), torch.float32, storage,
                                             hidden.is_cuda)
            self.hidden_scale.copy_(scale, non_blocking=True)
        else:
            self.hidden_scale = None
        self.hidden.copy_(blocked, non_blocking=True)
        n_blocks = -(-n_tokens // config.mlp_block)
        self.block_mean = kernels.block_means(
            pre_activation, row_order, config.mlp_block,
            out=reuse_buffer(self.block_mean, (batch, n_blocks, n_units), torch.float32, hidden.device))
        self.signature = (tuple(x.shape), x.dtype, x.device)
        self._sparse_steps = 0
        return hidden

    def store_output(self, y: torch.Tensor):
        self.out = reuse_buffer(self.out, y.shape, y.dtype, self.storage or y.device, y.is_cuda)
        self.out.copy_(y, non_blocking=True)
        self.folded = False

    def fold_in(self, delta: torch.Tensor, weight: torch.Tensor):
        """Add a fresh attention delta ([B, N, K]) to the output cache through the block's linear
        map ``weight`` ([Dout, K], as it maps the attention): from now on the cache holds it and
        the attention keeps none (sparse steps update the sum as they update the MLP's part)."""
        out = to_compute(self.out, delta.device)
        out.view(-1, out.shape[-1]).addmm_(delta.reshape(-1, delta.shape[-1]), weight.t())
        if out is not self.out:
            self.out.copy_(out, non_blocking=True)
        self.folded = True

    def ranks_next_step(self, config: ChipmunkConfig) -> bool:
        """Whether the next sparse step re-ranks the units when it is not told (``rank=None``)."""
        return self._selection is None or self._sparse_steps % config.mlp_selection_interval == 0

    def reserve_fc2(self, w2):
        """On a dense step: allocate the scratch the sparse steps transpose fc2 into, so that the
        first sparse step, which may be captured as a CUDA graph at once, finds it in place."""
        if self.fc2_scratch is not None:
            self.fc2_scratch.buffer_for(w2)

    def _transposed_fc2(self, w2):
        out = (torch.empty(w2.shape[::-1], dtype=w2.dtype, device=w2.device) if self.fc2_scratch is None
               else self.fc2_scratch.buffer_for(w2))
        return kernels.transpose_into(w2, out)

    def units(self) -> int:
        """Hidden units of the MLP (0 before the first dense step)."""
        return 0 if self.hidden is None else self.hidden.shape[1]

    def sparse_step(self, x, w1, b1, w2, row_order, config: ChipmunkConfig, seeds: torch.Tensor,
                    rank: bool | None = None) -> torch.Tensor:
        """The MLP output after recomputing the chosen units of every row block.

        ``seeds``: int64 [B] on x's device (a row's random units depend on its seed only).
        ``rank``: re-rank the units now (True), keep the last lists (False), or follow
        ``mlp_selection_interval`` (None, which counts this state's sparse steps on the host: a
        captured graph that replays steps must be told). Lists of another shape are never kept.
        """
        if rank is None:
            rank = self.ranks_next_step(config)
            self._sparse_steps += 1
        stale = self._selection is None or self._selection[0].shape[:2] != self.block_mean.shape[:2]
        if rank or stale:
            self._rank_units(x, w1, b1, row_order, config, seeds)
        indices, counts = self._selection
        hidden, out = to_compute(self.hidden, x.device), to_compute(self.out, x.device)
        scale = None if self.hidden_scale is None else to_compute(self.hidden_scale, x.device)
        result = torch.empty_like(out)  # the caller's copy: the model may change it in place
        w2_t = self._transposed_fc2(w2)
        kernels.sparse_mlp_delta(x, w1, b1, w2_t.t(), indices, counts, row_order, config.mlp_block,
                                 hidden.transpose(1, 2), out, ACTIVATION, hidden_in_block_order=True, result=result,
                                 hidden_scale=scale)
        if hidden is not self.hidden:  # caches kept off the device: write the updates back
            self.hidden.copy_(hidden, non_blocking=True)
            self.out.copy_(out, non_blocking=True)
        return result

    def _rank_units(self, x, w1, b1, row_order, config: ChipmunkConfig, seeds):
        """Units to recompute per row block; refreshes the block means of the chosen units."""
        batch, n_tokens, d_in = x.shape
        n_units = w1.shape[0]
        n_blocks = self.block_mean.shape[1]
        self._x_mean = kernels.block_means(x, row_order, config.mlp_block,
                                           out=reuse_buffer(self._x_mean, (batch, n_blocks, d_in), w1.dtype, x.device))
        current = torch.nn.functional.linear(self._x_mean, w1, b1)
        keep_count = round(config.mlp_keep * n_units)
        out = None
        if self._selection is not None:
            width = kernels.list_width(n_units, keep_count, config.selection_tile)
            if (self._selection[0].shape == (batch, n_blocks, width) and self._selection[0].device == x.device
                    and self._selection[0].dtype == kernels.index_dtype(n_units)):
                out = self._selection
        self._selection = kernels.rank_units(
            current, self.block_mean, keep_count=keep_count,
            random_count=round(config.mlp_random_fraction * n_units), row_seeds=seeds,
            pad_to=config.selection_tile, out=out)


class TransposeScratch:
    """Where sparse steps transpose fc2 to [M, Dout] for the sparse MLP kernel: one buffer per
    weight shape and dtype for the whole run, shared by every layer and conditioning (the layers
    run one after another). It holds a weight's transpose only between the transpose and the
    kernel of one step, so nothing in it can go stale when ComfyUI patches weights in place (hook
    keyframes, per-conditioning LoRA hooks) or casts them per call (fp8)."""

    def __init__(self):
        self.buffers_by_shape: dict = {}

    def buffer_for(self, w2) -> torch.Tensor:
        key = (tuple(w2.shape), w2.dtype, w2.device)
        found = self.buffers_by_shape.get(key)
        if found is None:
            found = self.buffers_by_shape[key] = torch.empty(w2.shape[::-1], dtype=w2.dtype, device=w2.device)
        return found

    def buffers(self) -> list[torch.Tensor]:
        return list(self.buffers_by_shape.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers_by_shape.values())

    def reset(self):
        self.buffers_by_shape.clear()
