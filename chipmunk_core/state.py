"""Per-run state: everything Chipmunk remembers between the model calls of one sampling run.

A ``SamplingRun`` is created when sampling starts and released when it ends (also on error or
interrupt), so a patched model reused across queue runs starts clean every time. Caches are kept
per conditioning signature (the uuids that share a model call, plus the input's shape, dtype and
device): cond and uncond batched together share one cache set, separate calls get one each, and a
change of shape or device starts a fresh set instead of reusing a stale one.
"""

from __future__ import annotations

import logging
import math
from collections import Counter

import torch

from .attention import SparseDeltaAttention
from .config import ChipmunkConfig
from .layout import SequenceShape, joint_layout
from .memory import ModelDims, cache_bytes, place_caches
from .mlp import SparseDeltaMLP
from .schedule import DenseSchedule, step_index

logger = logging.getLogger(__name__)


class CondCaches:
    """The delta caches of every Chipmunk layer for one conditioning signature."""

    def __init__(self, uuids: tuple, storage: torch.device | None = None, estimate: int = 0):
        self.uuids = uuids
        self.storage = storage
        self.estimate = estimate
        self.attention: dict[int, SparseDeltaAttention] = {}
        self.mlp: dict[tuple[int, str], SparseDeltaMLP] = {}

    def attention_state(self, layer: int) -> SparseDeltaAttention:
        if layer not in self.attention:
            self.attention[layer] = SparseDeltaAttention(self.storage)
        return self.attention[layer]

    def mlp_state(self, layer: int, stream: str) -> SparseDeltaMLP:
        if (layer, stream) not in self.mlp:
            self.mlp[(layer, stream)] = SparseDeltaMLP(self.storage)
        return self.mlp[(layer, stream)]

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.attention.values()) + sum(s.nbytes() for s in self.mlp.values())

    def reset(self):
        for state in list(self.attention.values()) + list(self.mlp.values()):
            state.reset()
        self.attention.clear()
        self.mlp.clear()


class SamplingRun:
    """State of one sampling run of a Chipmunk-patched model."""

    def __init__(self, config: ChipmunkConfig, total_steps: int, seed: int | None, dims: ModelDims | None = None,
                 free_memory=None):
        """``dims`` sizes the caches; ``free_memory(device) -> bytes | None`` says what is free."""
        self.config = config
        self.dims = dims
        self.free_memory = free_memory
        self.schedule = DenseSchedule(config, total_steps)
        self.seed = int(seed or 0)
        self._generators: dict[str, torch.Generator] = {}
        self._caches: dict[tuple, CondCaches] = {}
        self.stats = Counter()
        self.peak_cache_bytes = 0

    def generator(self, device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[key] = gen
        return self._generators[key]

    def caches_for(self, uuids: tuple, x: torch.Tensor, shape: SequenceShape, dtype: torch.dtype) -> CondCaches:
        signature = (uuids, tuple(x.shape), x.dtype, str(x.device))
        caches = self._caches.get(signature)
        if caches is None:
            # A conditioning now batched differently, or at another shape: its old caches are stale.
            for old in [s for s, c in self._caches.items() if set(c.uuids) & set(uuids)]:
                self._caches.pop(old).reset()
            caches = self._caches[signature] = self._new_caches(uuids, x, shape, dtype)
        return caches

    def _new_caches(self, uuids, x, shape: SequenceShape, dtype) -> CondCaches:
        if self.dims is None:
            return CondCaches(uuids)
        n_tokens = math.prod(shape.grid) + shape.text_len
        needed = cache_bytes(self.config, self.dims, x.shape[0], n_tokens, dtype)
        free = self.free_memory(x.device) if self.free_memory else None
        storage = place_caches(needed, free, x.device)
        free_text = "unknown" if free is None else f"{free / 2**30:.1f} GiB"
        logger.info("Chipmunk caches for %d conditioning(s) x %d tokens: %.2f GiB (device free: %s) -> kept on %s",
                    len(uuids), n_tokens, needed / 2**30, free_text, storage)
        return CondCaches(uuids, storage, needed)

    def begin_call(self, x: torch.Tensor, transformer_options: dict, shape: SequenceShape) -> "ModelCall":
        """The call's step, its dense/sparse decision and its conditioning's caches (stored in x's dtype)."""
        step = step_index(transformer_options.get("sample_sigmas"), transformer_options.get("sigmas"))
        uuids = tuple(str(u) for u in transformer_options.get("uuids") or ("default",))
        caches = self.caches_for(uuids, x, shape, x.dtype)
        dense = self.schedule.is_dense(step)
        self.stats["dense calls" if dense else "sparse calls"] += 1
        return ModelCall(self, step, dense, caches, shape)

    def end_call(self, call: "ModelCall"):
        self.peak_cache_bytes = max(self.peak_cache_bytes, sum(c.nbytes() for c in self._caches.values()))

    def summary(self) -> str:
        return (f"Chipmunk run: {self.config.describe()}; {self.schedule.total_steps} steps, dense at "
                f"{sorted(self.schedule.dense_steps)}; model calls {self.stats['dense calls']} dense / "
                f"{self.stats['sparse calls']} sparse; layer attention {self.stats['attention dense']} dense / "
                f"{self.stats['attention sparse']} sparse, MLP {self.stats['mlp dense']} dense / "
                f"{self.stats['mlp sparse']} sparse; peak cache {self.peak_cache_bytes / 2**30:.2f} GiB "
                f"(estimated {sum(c.estimate for c in self._caches.values()) / 2**30:.2f} GiB)")

    def release(self):
        for caches in self._caches.values():
            caches.reset()
        self._caches.clear()
        self._generators.clear()


def _key_padding_prefix(mask: torch.Tensor, n_keys: int) -> int | None:
    if mask.dim() != 3 or mask.shape[1] != 1 or mask.shape[2] != n_keys:
        return None
    keep = mask if mask.dtype == torch.bool else mask > -1e4
    rows = keep[:, 0]
    n_valid = int(rows[0].sum())
    expected = torch.arange(n_keys, device=mask.device) < n_valid
    if n_valid == 0 or not bool((rows == expected).all()):
        return None
    return n_valid


class ModelCall:
    """One call of the diffusion model within a run: its step, and whether that step is dense."""

    def __init__(self, run: SamplingRun, step: int, dense: bool, caches: CondCaches, shape: SequenceShape):
        self.run = run
        self.config = run.config
        self.step = step
        self.dense = dense
        self.caches = caches
        self.shape = shape
        self.text_len = shape.text_len  # refined by the first block that sees the text stream
        self._mask_prefix: dict[tuple, int | None] = {}
        self.extras: dict = {}  # family-specific per-call values (see FamilyAdapter.call_extras)

    def layout(self, text_len: int, image_len: int, device):
        shape = self.shape
        return joint_layout(text_len, shape.grid, image_len, shape.text_first, self.config.query_group, device,
                            grid_first=shape.grid_first, window=self.config.local_window)

    def keys_kept_by(self, mask, n_keys: int) -> int | None:
        """How many leading keys an attention mask keeps, or None if Chipmunk cannot serve it.

        Chipmunk serves no mask and key-padding masks (HunyuanVideo pads its text and masks the
        padding): additive [1 or B, 1, N] masks, 0 on a prefix of the keys and very negative after
        it, the same for every batch row. Anything else runs dense through the user's backend.
        """
        if mask is None:
            return n_keys
        key = (id(mask), n_keys)
        if key not in self._mask_prefix:
            self._mask_prefix[key] = _key_padding_prefix(mask, n_keys)
        return self._mask_prefix[key]

    def layer(self, index: int) -> "LayerCall | None":
        """The Chipmunk view of a layer, or None for the always-dense first layers."""
        if index < self.config.first_dense_layers:
            return None
        return LayerCall(self, index)


class LayerCall:
    """Chipmunk attention and MLP for one layer within one model call."""

    def __init__(self, call: ModelCall, index: int):
        self.call = call
        self.index = index
        self.config = call.config

    def _dense_now(self, state, kind: str, *tensors) -> bool:
        dense = self.call.dense or not state.ready_for(*tensors)
        self.call.run.stats[f"{kind} {'dense' if dense else 'sparse'}"] += 1
        return dense

    # --- attention -------------------------------------------------------------------------
    def attention_options(self, transformer_options: dict, layout) -> dict:
        """transformer_options whose attention override routes this layer's attention through Chipmunk.

        Calls Chipmunk cannot serve (an attention mask it does not understand) go on to whatever
        backend or override the user already had.
        """
        if not self.config.sparse_attention:
            return transformer_options
        previous = transformer_options.get("optimized_attention_override")

        def override(func, q, k, v, heads, *args, **kwargs):
            key_axis = -2 if kwargs.get("skip_reshape") else 1
            n_keys = None if args else self.call.keys_kept_by(kwargs.get("mask"), k.shape[key_axis])
            if n_keys is None:
                if previous is not None:
                    return previous(func, q, k, v, heads, *args, **kwargs)
                return func(q, k, v, heads, *args, **kwargs)
            return self._attention(q, k, v, heads, n_keys, layout, kwargs)

        return {**transformer_options, "optimized_attention_override": override}

    def _attention(self, q, k, v, heads, n_keys, layout, kwargs):
        if not kwargs.get("skip_reshape", False):
            batch, n_tokens, width = q.shape
            q, k, v = (t.view(batch, -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        k, v = k[:, :, :n_keys], v[:, :, :n_keys]
        state = self.call.caches.attention_state(self.index)
        if self._dense_now(state, "attention", q, k):
            out = state.dense_step(q, k, v, layout, self.config, self.call.run.generator(q.device))
        else:
            out = state.sparse_step(q, k, v, layout, self.config)
        if kwargs.get("skip_output_reshape", False):
            batch, n_tokens, _ = out.shape
            return out.view(batch, n_tokens, heads, -1).transpose(1, 2)
        return out

    # --- MLP -----------------------------------------------------------------------------------
    def mlp_state(self, stream: str) -> SparseDeltaMLP | None:
        if not self.config.sparse_mlp:
            return None
        return self.call.caches.mlp_state(self.index, stream)

    def mlp_is_dense(self, state: SparseDeltaMLP, x) -> bool:
        return self._dense_now(state, "mlp", x)

    def generator(self, device) -> torch.Generator:
        return self.call.run.generator(device)
