"""Per-run state: everything Chipmunk remembers between the model calls of one sampling run.

A ``SamplingRun`` is created when sampling starts and released when it ends (also on error or
interrupt), so a patched model reused across queue runs starts clean every time. Caches are kept
per conditioning signature (the uuids that share a model call, plus the input's shape, dtype and
device): cond and uncond batched together share one cache set, separate calls get one each, and a
change of shape or device starts a fresh set instead of reusing a stale one.

The objects nest the way a run does: ``SamplingRun`` (one per sampling run) -> ``ModelCall`` (one
per call of the diffusion model: its step, dense or sparse, its conditioning's caches) ->
``LayerCall`` (one per transformer layer inside that call: the layer's token layout, and the
sparse-delta attention and MLP that serve it).
"""

from __future__ import annotations

import logging
import math
from collections import Counter

import torch

from .. import kernels
from .attention import SparseDeltaAttention, selects_keys
from .config import ChipmunkConfig
from .graphs import StepReplays
from .layout import JointLayout, SequenceShape, joint_layout
from .memory import HostPrefetch, ModelDims
from .mlp import SparseDeltaMLP, TransposeScratch
from . import plan as plan_module
from .plan import (DEVICE, HOST, MLP, OFF, CostModel, MemoryPlan, RunPlan, StockReason, folded_bytes, layer_items,
                   plan_memory, quantised, stock_reason)
from .schedule import DenseSchedule, StepClock
from .seeds import row_seeds
from .step_cache import StepCache, StepCacheSchedule

logger = logging.getLogger(__name__)


class CondCaches:
    """The delta caches of every Chipmunk layer for one conditioning signature, where the run plan
    puts them (``storage``: layer -> kind -> None for the compute device, or the CPU)."""

    def __init__(self, uuids: tuple, plan: RunPlan | None = None, fc2_scratch: TransposeScratch | None = None):
        self.uuids = uuids
        self.plan = plan
        self.fc2_scratch = fc2_scratch
        self.attention: dict[int, SparseDeltaAttention] = {}
        self.mlp: dict[tuple[int, str], SparseDeltaMLP] = {}
        self.step_cache = StepCache()
        self.graphs = StepReplays()
        self.prefetch = HostPrefetch()  # for the layers whose attention caches live in host memory
        # Token layouts the steps read (index tables from an LRU cache): held here, so that a
        # captured graph's tables are never freed, and part of the graph key (persistent()).
        self.layouts: dict[int, JointLayout] = {}

    def graph_settings(self, config: ChipmunkConfig) -> tuple:
        """What a captured sparse step bakes in besides tensors: which MLPs re-rank their units."""
        return tuple((key, state.ranks_next_step(config)) for key, state in sorted(self.mlp.items()))

    def persistent(self) -> list[torch.Tensor]:
        """Every long-lived tensor a sparse step reads or updates in place (a graph's addresses)."""
        states = [*self.attention.values(), *self.mlp.values(), self.step_cache]
        scratch = self.fc2_scratch.buffers() if self.fc2_scratch is not None else []
        tables = [t for layout in self.layouts.values() for t in (layout.query_order, layout.image_order,
                                                                  layout.forced_keys)]
        return [t for state in states for t in state.buffers()] + scratch + tables

    def _storage(self, where: str) -> torch.device | None:
        return torch.device("cpu") if where == HOST else None

    def attention_state(self, layer: int) -> SparseDeltaAttention:
        if layer not in self.attention:
            where = self.plan.attention_on(layer) if self.plan else DEVICE
            self.attention[layer] = SparseDeltaAttention(self._storage(where), self.prefetch if where == HOST else None)
        return self.attention[layer]

    def mlp_state(self, layer: int, stream: str) -> SparseDeltaMLP:
        if (layer, stream) not in self.mlp:
            where = self.plan.mlp_on(layer) if self.plan else DEVICE
            self.mlp[(layer, stream)] = SparseDeltaMLP(self._storage(where), self.fc2_scratch)
        return self.mlp[(layer, stream)]

    def pieces(self, rows_per_uuid: int) -> dict[str, "CondCaches"]:
        """These caches cut into one set per conditioning (rows of ``uuids[i]``: the i-th chunk of
        ``rows_per_uuid`` rows, as ComfyUI stacks a batched call)."""
        if len(self.uuids) == 1:
            return {self.uuids[0]: self}
        out = {}
        for i, uuid in enumerate(self.uuids):
            start, stop = i * rows_per_uuid, (i + 1) * rows_per_uuid
            piece = CondCaches((uuid,), self.plan, self.fc2_scratch)
            piece.attention = {k: s.take_rows(start, stop) for k, s in self.attention.items()}
            piece.mlp = {k: s.take_rows(start, stop) for k, s in self.mlp.items()}
            piece.step_cache = self.step_cache.take_rows(start, stop)
            piece._adopt_host_states()
            out[uuid] = piece
        self.reset()
        return out

    @classmethod
    def joined(cls, pieces: list["CondCaches"]) -> "CondCaches":
        """Per-conditioning sets as one set for a batched call (in the call's order)."""
        if len(pieces) == 1:
            return pieces[0]
        whole = cls(tuple(u for p in pieces for u in p.uuids), pieces[0].plan, pieces[0].fc2_scratch)
        for name, state_cls in (("attention", SparseDeltaAttention), ("mlp", SparseDeltaMLP)):
            keys = set.intersection(*(set(getattr(p, name)) for p in pieces))
            setattr(whole, name, {k: state_cls.joined([getattr(p, name)[k] for p in pieces]) for k in sorted(keys)})
        whole.step_cache = StepCache.joined([p.step_cache for p in pieces])
        whole._adopt_host_states()
        for piece in pieces:
            piece.graphs.reset()
        return whole

    def _adopt_host_states(self):
        """Host-resident attention states made by a cut or a join stream through this set's prefetch."""
        for layer in sorted(self.attention):
            state = self.attention[layer]
            if state.storage is not None:
                state.prefetch = self.prefetch
                self.prefetch.register(state)

    def nbytes(self) -> int:
        return (sum(s.nbytes() for s in self.attention.values()) + sum(s.nbytes() for s in self.mlp.values())
                + self.step_cache.nbytes())

    def reset(self):
        self.drop_layer_caches()
        self.step_cache.reset()
        self.layouts.clear()

    def drop_layer_caches(self) -> int:
        """Release the Chipmunk layers' caches and graphs (the step cache stays); returns the bytes."""
        freed = sum(s.nbytes() for s in self.attention.values()) + sum(s.nbytes() for s in self.mlp.values())
        for state in list(self.attention.values()) + list(self.mlp.values()):
            state.reset()
        self.attention.clear()
        self.mlp.clear()
        self.graphs.reset()
        self.prefetch.reset()
        return freed


class SamplingRun:
    """State of one sampling run of a Chipmunk-patched model."""

    def __init__(self, config: ChipmunkConfig, sample_sigmas, seed: int | None, dims: ModelDims | None = None,
                 memory_budget=None, host_budget=None, mlp_layers: frozenset[int] = frozenset(),
                 image_mlp_layers: frozenset[int] = frozenset(), folded_layers: frozenset[int] = frozenset(),
                 starts_mid_schedule: bool = False,
                 paged_weights: bool = False, conditionings: int = 1, cost: CostModel | None = None):
        """``dims`` sizes the caches; ``memory_budget(x, rows, wanted) -> bytes | None`` says how many bytes
        of the device the caches may take (asked once, when the run is planned; None: no limit).
        ``host_budget() -> bytes | None``: the host memory caches streamed from there may take
        (asked with it; None: no limit).
        ``conditionings``: how many conditionings the sampler evaluates per step (cond, uncond).

        ``mlp_layers``: the layers whose MLP Chipmunk may replace (the fingerprinted ones).
        ``image_mlp_layers``: those of them whose MLP sees the image tokens only (not the text).
        ``folded_layers``: those whose attention delta folds into the MLP's output cache.
        ``starts_mid_schedule``: the run continues an earlier one (the second half of a split
        sampling): one dense step rebuilds the caches instead of the whole warm-up.
        ``paged_weights``: the host pages the weights in per layer call (``min_sparse_tokens_paged``).
        """
        total_steps = max(1, len(sample_sigmas) - 1) if sample_sigmas is not None else 1
        self.config = config
        self.dims = dims
        self.memory_budget = memory_budget
        self.host_budget = host_budget
        self.conditionings = max(1, conditionings)
        self.cost = cost or plan_module.DEFAULT_COST  # (read per run: tests and benchmarks change it)
        self.plan: RunPlan | None = None  # made by the first model call (``make_plan``)
        self.wrapped_by: tuple[str, ...] = ()  # other nodes' model-call wrappers, around Chipmunk's
        self.fc2_scratch = TransposeScratch()
        self.sample_sigmas = sample_sigmas
        self.clock = StepClock(sample_sigmas)  # predicting once the sampler is known (predict_steps)
        self.schedule = DenseSchedule(config, total_steps, continues=starts_mid_schedule)
        self.step_cache_schedule = StepCacheSchedule(config, total_steps, self.schedule)
        self.seed = int(seed or 0)
        self.mlp_layers = mlp_layers
        self.image_mlp_layers = image_mlp_layers
        self.folded_layers = folded_layers
        self.min_sparse_tokens = max(config.min_sparse_tokens, config.min_sparse_tokens_paged if paged_weights else 0)
        self._caches: dict[tuple, CondCaches] = {}
        self.stats = Counter()
        self.kept = Counter()  # computed / possible work on sparse layers, for the achieved sparsity
        self.steps: dict[int, str] = {}  # step -> "dense" | "sparse" | "skipped" | "stock"
        self.notes: dict[str, str] = {}  # things the user should know, said once per run
        self.peak_cache_bytes = 0

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    def note(self, key: str, message: str, level: int = logging.WARNING):
        """Record something the run report must say (once per run), and log it once."""
        if key not in self.notes:
            self.notes[key] = message
            logger.log(level, "Chipmunk: %s", message)

    def make_plan(self, x: torch.Tensor, shape: SequenceShape, cond_or_uncond: tuple) -> RunPlan:
        """The run's plan, made on its first model call (the latent's size is known, no cache exists)."""
        grid_tokens = math.prod(shape.grid)
        n_tokens = grid_tokens + shape.text_len
        if self.config.fp8_caches and not kernels.fp8_supported(x.device):
            self.config = self.config.replace(fp8_caches=False)
            self.note("fp8 caches", "fp8 caches need a GPU of compute capability 8.9 or newer (Ada, Hopper): "
                                    "this run keeps its caches in the model's precision")
        rows = self.conditionings * max(1, x.shape[0] // max(1, len(cond_or_uncond)))
        paged = self.min_sparse_tokens > self.config.min_sparse_tokens
        reason = stock_reason(self.config, x.device, grid_tokens, self.min_sparse_tokens, paged)
        items = [] if reason or self.dims is None else layer_items(
            self.config, self.dims, rows, n_tokens, x.element_size(), self.mlp_layers, self.cost,
            image_tokens=grid_tokens, image_mlp_layers=self.image_mlp_layers, folded_layers=self.folded_layers)
        # the MLP's fc2 scratch (one weight's transpose, shared by the run's layers) comes first
        scratch = self.dims.fc2_bytes(x.element_size()) if any(item.kind == MLP for item in items) else 0
        wanted = folded_bytes(items)
        budget = host = None
        if items and self.memory_budget is not None:
            free = self.memory_budget(x, rows, wanted + scratch)
            budget = None if free is None else quantised(max(0, free - scratch))
        if items and budget is not None and self.host_budget is not None:
            host = quantised(self.host_budget())
        memory = plan_memory(items, budget, self.cost, host) if self.dims is not None else MemoryPlan(sized=False)
        if items and not any(where != OFF for where in memory.placement.values()):
            reason = StockReason("no GPU memory for caches",
                                 f"no device memory was free for caches ({memory.wanted / 2**30:.2f} GiB wanted): "
                                 "layers run stock")
        plan = RunPlan(reason, memory, rows, n_tokens)
        logger.info("Chipmunk plan for %d row(s) x %d tokens: %s", rows, n_tokens, plan.describe())
        return plan

    def caches_for(self, uuids: tuple, x: torch.Tensor) -> CondCaches:
        """The caches of the conditionings ``uuids`` batched in this order.

        ComfyUI decides on every call whether cond and uncond run batched or apart (from free
        memory): a conditioning batched differently keeps its caches, cut out of the set it was
        batched in or joined with the others, so the output does not depend on that decision.
        Caches made at another shape, dtype or device are stale and dropped."""
        signature = (uuids, tuple(x.shape), x.dtype, str(x.device))
        caches = self._caches.get(signature)
        if caches is not None:
            return caches
        per_uuid = x.shape[0] // max(1, len(uuids))
        pieces = {}
        for old_signature in [s for s, c in self._caches.items() if set(c.uuids) & set(uuids)]:
            old = self._caches.pop(old_signature)
            old_uuids, old_shape, dtype, device = old_signature
            if old_shape[1:] == tuple(x.shape[1:]) and dtype == x.dtype and device == str(x.device) \
                    and old_shape[0] == per_uuid * len(old_uuids):
                pieces.update(old.pieces(per_uuid))
            else:
                old.reset()
        piece_shape = (per_uuid,) + tuple(x.shape[1:])
        for uuid, piece in pieces.items():
            if uuid not in uuids:  # batched apart from this call now: kept for its own calls
                self._caches[((uuid,), piece_shape, x.dtype, str(x.device))] = piece
        if pieces and all(uuid in pieces for uuid in uuids):
            caches = CondCaches.joined([pieces[uuid] for uuid in uuids])
            self.stats["caches re-sliced"] += 1
        else:
            for uuid in uuids:
                if uuid in pieces:
                    pieces[uuid].reset()
            caches = CondCaches(uuids, self.plan, self.fc2_scratch)
        self._caches[signature] = caches
        return caches

    def begin_call(self, x: torch.Tensor, transformer_options: dict, shape: SequenceShape) -> "ModelCall":
        """The call's step, its dense/sparse/skip decision and its conditioning's caches."""
        step = self.clock.step(transformer_options.get("sigmas"))
        self._note_clock()
        uuids = tuple(str(u) for u in transformer_options.get("uuids") or ("default",))
        cond_or_uncond = tuple(transformer_options.get("cond_or_uncond") or (0,))
        if self.plan is None:
            self.plan = self.make_plan(x, shape, cond_or_uncond)
            if self.plan.memory.given_up():
                self.note("memory", self.plan.memory.describe())
        caches = self.caches_for(uuids, x)
        dense = self.schedule.is_dense(step)
        seeds = row_seeds(self.seed, x.shape[0], cond_or_uncond, step, x.device)
        call = ModelCall(self, step, dense, caches, shape, seeds)
        call.cond_or_uncond = cond_or_uncond
        call.stock_layers = self.plan.stock is not None
        return call

    def end_call(self, call: "ModelCall"):
        kind = "skipped" if call.skipped else ("dense" if call.dense else "sparse")
        if (not self.config.sparse or call.stock_layers) and not call.skipped:
            kind = "stock"
        # A step some of whose calls were dense stays dense in the report (heun's second calls).
        if self.steps.get(call.step) not in ("dense",):
            self.steps[call.step] = kind
        self.stats[f"{kind} calls"] += 1
        self.peak_cache_bytes = max(self.peak_cache_bytes, sum(c.nbytes() for c in self._caches.values())
                                    + self.fc2_scratch.nbytes())

    def achieved(self, kind: str) -> float | None:
        """Fraction of the attention (or MLP) work that sparse steps skipped on Chipmunk layers."""
        possible = self.kept[f"{kind} possible"]
        return None if not possible else 1.0 - self.kept[f"{kind} computed"] / possible

    def report(self) -> dict:
        steps = Counter(self.steps.values())
        return {
            "steps": self.total_steps, "dense": steps["dense"], "sparse": steps["sparse"],
            "skipped": steps["skipped"], "stock": steps["stock"],
            "attention_sparsity": self.achieved("attention"), "mlp_sparsity": self.achieved("mlp"),
            "layers": dict(self.stats),
            "graphs": {how: self.stats[f"graph {how} calls"] for how in ("eager", "captured", "replayed")},
            "cache_gib": self.peak_cache_bytes / 2**30,
            "plan": None if self.plan is None else self.plan.describe(),
            "stock_reason": None if self.plan is None else self.plan.stock,
            "notes": list(self.notes.values()),
        }

    def replay_or_run(self, call: "ModelCall", fn, inputs: tuple, persistent: tuple = ()):
        """A sparse model call through its conditioning's CUDA graphs (``StepReplays``): ``fn``
        takes ``inputs`` and computes the call; ``persistent`` adds tensors it reads at fixed
        addresses (the model's weights). Returns (outputs, "eager" | "captured" | "replayed")."""
        caches = call.caches
        settings = caches.graph_settings(self.config)
        out, how = caches.graphs.run(fn, inputs, lambda: tuple(caches.persistent()) + tuple(persistent), settings,
                                     _Bookkeeping(self, caches))
        self.stats[f"graph {how} calls"] += 1
        return out, how

    def predict_steps(self, predict: bool):
        """Before the first model call: whether the sampler lets the clock predict steps (a
        sampling nested in this run, once calls began, changes nothing)."""
        if self.steps or self.clock.predicted:
            return
        self.clock = StepClock(self.sample_sigmas, predict=predict)

    def finish_steps(self):
        """The run's model calls are over: check the clock's last prediction, say if one failed."""
        self.clock.finish()
        self._note_clock()

    def _note_clock(self):
        if self.clock.mispredicted:
            self.note("clock", self.clock.mispredicted)

    def drop_layer_caches(self) -> int:
        """Release every conditioning's layer caches and graphs, and the fc2 scratch (after the GPU
        ran out of memory: the rest of the run's layers run stock, the step cache goes on)."""
        freed = sum(caches.drop_layer_caches() for caches in self._caches.values()) + self.fc2_scratch.nbytes()
        self.fc2_scratch.reset()
        return freed

    def release(self):
        self.clock.finish()
        for caches in self._caches.values():
            caches.reset()
        self._caches.clear()
        self.fc2_scratch.reset()


class _Bookkeeping:
    """The host-side counters a sparse call advances: the run's statistics and each MLP's count of
    sparse steps (its ranking interval). A replayed graph runs no Python: it gets the change the
    call that ran the Python made. A failed capture ran the Python but nothing on the GPU:
    ``rollback`` puts every state of the conditioning back as it was (counters, and buffers made
    during the capture, which hold nothing)."""

    def __init__(self, run: SamplingRun, caches: CondCaches):
        self.run, self.caches = run, caches

    def snapshot(self):
        return (Counter(self.run.stats), Counter(self.run.kept),
                {key: state._sparse_steps for key, state in self.caches.mlp.items()})

    def checkpoint(self):
        """Every state of the conditioning as it stands (right before a capture)."""
        caches = self.caches
        states = [*caches.attention.values(), *caches.mlp.values(), caches.step_cache]
        return ([(state, dict(vars(state))) for state in states], dict(caches.attention), dict(caches.mlp),
                dict(self.run.fc2_scratch.buffers_by_shape))

    @staticmethod
    def delta(before, after):
        return tuple({k: after[i][k] - before[i].get(k, 0) for k in after[i]} for i in range(3))

    def restore(self, before, change):
        for counter, base, diff in ((self.run.stats, before[0], change[0]), (self.run.kept, before[1], change[1])):
            counter.clear()
            counter.update(base)
            counter.update(diff)  # (Counter.update adds)
        for key, state in self.caches.mlp.items():
            state._sparse_steps = before[2].get(key, 0) + change[2].get(key, 0)

    def rollback(self, before, checkpoint):
        states, attention, mlp, scratch = checkpoint
        for state, attributes in states:
            vars(state).clear()
            vars(state).update(attributes)
        self.caches.attention, self.caches.mlp = attention, mlp
        self.run.fc2_scratch.buffers_by_shape = scratch
        self.restore(before, ({}, {}, {}))


def key_padding(mask: torch.Tensor | None, n_keys: int) -> tuple[str, object] | None:
    """How an attention mask restricts the keys, or None when Chipmunk cannot serve it.

    Chipmunk serves no mask, and key-padding masks (HunyuanVideo pads its text and masks the
    padding): [1 or B, 1, N] masks (additive, 0 = keep and very negative = drop, or boolean), the
    same for every row. Returns ("all", None), ("prefix", n_valid) or ("index", valid positions).
    """
    if mask is None:
        return ("all", None)
    if mask.dim() != 3 or mask.shape[1] != 1 or mask.shape[2] != n_keys:
        return None
    keep = mask if mask.dtype == torch.bool else mask > -1e4
    if mask.dtype != torch.bool and not bool(((mask == 0) | ~keep).all()):
        return None  # a real additive bias, not padding
    if mask.shape[0] > 1 and not bool((keep == keep[:1]).all()):
        return None
    row = keep[0, 0]
    valid = torch.nonzero(row).flatten()
    n_valid = int(valid.numel())
    if n_valid == 0:
        return None
    if n_valid == n_keys:
        return ("all", None)
    if int(valid[-1]) == n_valid - 1:
        return ("prefix", n_valid)
    return ("index", valid)


class ModelCall:
    """One call of the diffusion model within a run: its step, and whether that step is dense."""

    def __init__(self, run: SamplingRun, step: int, dense: bool, caches: CondCaches, shape: SequenceShape,
                 seeds: torch.Tensor):
        self.run = run
        self.config = run.config
        self.step = step
        self.dense = dense
        self.caches = caches
        self.shape = shape
        self.seeds = seeds  # int64 [B]: one random-pick seed per batch row of this call
        self.text_len = shape.text_len  # set by the blocks that see the text stream
        self.text_first = shape.text_first
        self.skipped = False
        self.cond_or_uncond = (0,)
        self.layers: dict[int, LayerCall] = {}  # the layers entered so far in this call
        self.diffusion_model = None  # set by the hook that made the call
        self.context = None          # the hooks' per-run object (ComfyUI's side of the run)
        self.has_control = False     # a ControlNet adds to the blocks' outputs in this call
        self.recording = False       # the step cache records this call's residual
        self.stock_layers = False    # layers run stock: sparse ones would not pay off (size, set-up)
        self._masks: dict[tuple, object] = {}

    def padding(self, mask, n_keys: int):
        """``key_padding`` of a mask, worked out once per call (the model reuses one mask object)."""
        key = (id(mask), n_keys)
        if key not in self._masks:
            self._masks[key] = key_padding(mask, n_keys)
        return self._masks[key]

    def layer(self, index: int, text_len: int, image_len: int) -> "LayerCall | None":
        """The Chipmunk view of a layer whose sequence holds ``text_len`` text and ``image_len``
        image tokens, or None for the always-dense first layers (and when nothing is sparse)."""
        if index < self.config.first_dense_layers or not self.config.sparse or self.stock_layers:
            return None
        plan = self.run.plan
        if plan is not None and plan.attention_on(index) == OFF and plan.mlp_on(index) == OFF:
            return None  # the plan keeps no cache for this layer: it runs stock
        return LayerCall(self, index, text_len, image_len)


class LayerCall:
    """Chipmunk attention and MLP for one layer within one model call."""

    def __init__(self, call: ModelCall, index: int, text_len: int, image_len: int):
        self.call = call
        self.index = index
        self.config = call.config
        self.text_len = text_len
        self.image_len = image_len
        self._layout: JointLayout | None = None
        # Set by a block that folds the attention delta into a cache of its own (``fold_attention``):
        # "dense" (this call's block is dense), "sparse" (it holds a folded delta) or None.
        self.fold: str | None = None
        self.folded: tuple | None = None  # what the attention did when asked to fold: (kind, delta)

    @property
    def n_tokens(self) -> int:
        return self.text_len + self.image_len

    @property
    def seeds(self) -> torch.Tensor:
        return self.call.seeds + self.index * 1_000_003

    @property
    def layout(self) -> JointLayout:
        if self._layout is None:
            shape = self.call.shape
            grid = shape.grid if math.prod(shape.grid) <= self.image_len else ()
            if not grid and shape.grid:
                self.call.run.note("grid", f"the image stream ({self.image_len} tokens) is shorter than the latent "
                                           f"grid {shape.grid}: tokens are grouped in raster order")
            before = shape.extra_before
            if grid and before is not None and before + math.prod(grid) > self.image_len:
                self.call.run.note("extra", f"the image stream ({self.image_len} tokens) does not hold the "
                                            f"{before} tokens expected before the latent grid {shape.grid}: the "
                                            "extra tokens are assumed to be placed as in ComfyUI v0.19.3")
                before = None
            self._layout = joint_layout(self.text_len, grid, self.image_len, self.call.text_first,
                                        self.config.query_group, self.call.seeds.device, grid_first=shape.grid_first,
                                        window=self.config.local_window, extra_before=before)
            self.call.caches.layouts.setdefault(id(self._layout), self._layout)
        return self._layout

    def _dense_now(self, state, kind: str, *tensors, **how) -> bool:
        dense = self.call.dense or not state.ready_for(*tensors, **how)
        self.call.run.stats[f"{kind} {'dense' if dense else 'sparse'}"] += 1
        return dense

    def _count(self, kind: str, computed: int, possible: int):
        self.call.run.kept[f"{kind} computed"] += computed
        self.call.run.kept[f"{kind} possible"] += possible

    # --- attention -------------------------------------------------------------------------
    def attention(self, q, k, v, heads: int, kwargs: dict):
        """Chipmunk's attention for this layer, or None when Chipmunk does not serve this call.

        Served: self-attention over exactly this layer's sequence (q, k, v of the same length),
        head dim 64 or 128, no mask or a key-padding mask. Anything else (cross-attention, a
        sequence another patch changed, a mask with real biases) goes to the previous backend.
        """
        plan = self.call.run.plan
        if not self.config.sparse_attention or (plan is not None and plan.attention_on(self.index) == OFF):
            return None
        skip_reshape = kwargs.get("skip_reshape", False)
        if skip_reshape:
            batch, _, n_tokens, head_dim = q.shape
        else:
            batch, n_tokens, width = q.shape
            head_dim = width // heads
        if k.shape != q.shape or v.shape != q.shape:
            return None  # cross-attention (keys from another sequence)
        if n_tokens != self.n_tokens:
            self.call.run.note(f"length {self.index}", f"layer {self.index}: attention over {n_tokens} tokens where "
                                                       f"the block has {self.n_tokens} (another patch changed the "
                                                       "sequence): this layer runs dense")
            return None
        if head_dim not in (64, 128):
            self.call.run.note("head_dim", f"head dim {head_dim} is not served (64 or 128): attention runs dense")
            return None
        padding = self.call.padding(kwargs.get("mask"), n_tokens)
        if padding is None:
            self.call.run.note("mask", "an attention mask that is not key padding: those layers run dense")
            return None
        if not skip_reshape:
            q, k, v = (t.view(batch, n_tokens, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        kind, value = padding
        layout = self.layout
        forced = None  # the layout's (keys past a prefix mask are dropped by the selection)
        if kind == "prefix":
            k, v = k[:, :, :value], v[:, :, :value]
        elif kind == "index":
            k, v = k.index_select(2, value), v.index_select(2, value)
            forced = layout.forced_among(value)
        state = self.call.caches.attention_state(self.index)
        n_keys = k.shape[2]
        fold = self.fold is not None
        if self._dense_now(state, "attention", q, k, fold=fold) or self.fold == "dense":
            out = state.dense_step(q, k, v, layout, self.config, self.seeds, forced=forced,
                                   select=selects_keys(self.config, self.call.step), fold=fold)
            if fold:
                out, delta = out
                self.folded = ("dense", delta)
        else:
            out = state.sparse_step(q, k, v, layout, self.config)
            self._count("attention", state.kept_keys() * n_tokens, n_keys * n_tokens)
            if fold:
                self.folded = ("sparse", None)
        if kwargs.get("skip_output_reshape", False):
            return out.view(batch, n_tokens, heads, head_dim).transpose(1, 2)
        return out

    def folds_attention(self) -> bool:
        """Whether the plan folds this layer's attention delta into its MLP output cache."""
        return self.index in self.call.run.folded_layers

    def fold_attention(self, dense: bool):
        """Ask this layer's next attention call to fold its delta into the caller's cache: dense
        (``dense``, or the attention holds no folded delta for this shape: the delta comes back in
        ``folded``), else sparse with the attention restricted to the key lists alone."""
        self.fold, self.folded = ("dense" if dense else "sparse"), None

    def take_folded(self) -> tuple:
        """(kind, delta) of the attention call asked to fold, ("stock", None) when Chipmunk did not
        serve it (the output holds all of the attention); ends the request."""
        folded = self.folded or ("stock", None)
        self.fold, self.folded = None, None
        return folded

    # --- MLP -----------------------------------------------------------------------------------
    def serves_mlp(self) -> bool:
        run = self.call.run
        return (self.config.sparse_mlp and self.index in run.mlp_layers
                and (run.plan is None or run.plan.mlp_on(self.index) != OFF))

    def mlp_state(self, stream: str) -> SparseDeltaMLP:
        return self.call.caches.mlp_state(self.index, stream)

    def mlp_is_dense(self, state: SparseDeltaMLP, x) -> bool:
        dense = self._dense_now(state, "mlp", x)
        if not dense:
            units = state.units()
            self._count("mlp", round(self.config.mlp_keep * units) * x.shape[1], units * x.shape[1])
        return dense
