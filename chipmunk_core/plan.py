"""The run plan: decided once when a sampling run's first model call arrives, before any cache exists.

The plan says, for the whole run, whether Chipmunk's layers run at all (``stock``: the CPU's
reference kernels, a latent below the measured size bound) and, per layer, which delta caches exist
and where they live (``placement``): on the compute device, in host memory (streamed each sparse
step), or not at all (that part of the layer runs stock). Hooks and states only read it.

Memory is given up where it buys the least: every cache is an item with its bytes and the time its
sparse steps save (``CostModel``), and items are placed in order of time saved per byte. With FLUX
at 1024x1024 that keeps attention caches (about 10 us saved per MB and step) before MLP caches
(about 4 us/MB). No copy of a weight is kept: a sparse MLP step transposes fc2 into one scratch
buffer of the run (its cost is taken off the MLP's saving). Where a block feeds attention and MLP
through one linear map (FLUX's single blocks), the attention delta folds into the MLP's output cache
when both are kept, and the attention item then costs its key lists alone. An item goes to host memory only where
copying it over the host link each sparse step costs less than half of what it saves; an image
layer's step is too short for that, a long video layer's is not.

The budget is what the device has free once ComfyUI has unloaded idle models for it (the hooks ask
ComfyUI as it asks for its own inference), less the model's working memory, rounded down to
``BUDGET_QUANTUM``: the same model, size, settings and card give the same plan whatever else was
loaded, and a plan that had to shrink says so.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from ..kernels import list_bytes, list_width, selection_size
from .config import ChipmunkConfig
from .memory import ModelDims

DEVICE, HOST, OFF = "device", "host", "off"
ATTENTION, MLP = "attention", "MLP"
BUDGET_QUANTUM = 256 * 2**20

# Devices whose latents follow the measured size rule (min_sparse_tokens; tests add "cpu").
SIZE_RULE_DEVICES = ("cuda",)
# Devices where Chipmunk's kernels beat stock. Elsewhere (the CPU, where the PyTorch reference
# kernels run) layers run stock and the report says why. The tests and the quality lab, which
# study the method itself on the CPU, set CHIPMUNK_SPARSE_ON_CPU=1.
SPARSE_DEVICES = ("cuda",)
SPARSE_ON_CPU = "CHIPMUNK_SPARSE_ON_CPU"


def sparse_devices() -> tuple[str, ...]:
    return SPARSE_DEVICES + (("cpu",) if os.environ.get(SPARSE_ON_CPU) == "1" else ())


@dataclass(frozen=True)
class CostModel:
    """Rates that turn bytes and FLOPs into seconds, for ranking caches and judging host streaming.

    Only ratios decide: time saved per byte orders the items, and the host link against the
    device's matrix rate decides streaming. The defaults are of a current desktop card on PCIe 4.
    """

    matrix_flops: float = 300e12       # dense bf16 matrix rate
    device_bandwidth: float = 1.0e12   # device memory, bytes/s (read + write)
    host_bandwidth: float = 20e9       # host link, bytes/s one way
    attention_efficiency: float = 0.65  # column-sparse rate / dense rate (method.md)
    mlp_efficiency: float = 0.55        # sparse MLP rate / cuBLAS rate (70% sparsity ran 1.94x)
    stream_share: float = 0.5           # stream only where the copies cost under this share of the saving


DEFAULT_COST = CostModel()


@dataclass(frozen=True)
class CacheItem:
    """One cache of one layer for the whole run (every conditioning's rows together)."""

    layer: int
    kind: str              # ATTENTION or MLP
    nbytes: int
    saving: float          # seconds saved per sparse step by holding it
    host_traffic: int = 0  # bytes over the host link per sparse step when it lives there (0: never)
    folds: int = 0         # an attention item's delta bytes, not needed when its layer's MLP cache is kept too
    resident: int = 0      # bytes that stay on the compute device wherever the item lives (an MLP's
    #                        block means and unit lists: each ranking reads and refreshes them)


def layer_items(config: ChipmunkConfig, dims: ModelDims, rows: int, n_tokens: int, element: int,
                mlp_layers, cost: CostModel = DEFAULT_COST, image_tokens: int | None = None,
                image_mlp_layers=frozenset(), folded_layers=frozenset()) -> list[CacheItem]:
    """Every cache Chipmunk could keep in this run, ``rows`` batch rows of ``n_tokens`` tokens.

    ``image_mlp_layers``: the layers whose MLP sees the image tokens only (``image_tokens`` of
    them: FLUX's double blocks, whose text has its own MLP), not the joint sequence.
    ``folded_layers``: the layers whose attention delta folds into their MLP's output cache."""
    items = []
    attention = None
    if config.sparse_attention:
        groups = math.ceil(n_tokens / config.query_group)
        kept = selection_size(n_tokens, round(config.attention_keep * n_tokens), config.selection_tile)
        delta = rows * n_tokens * dims.heads * (dims.head_dim + 4 if config.fp8_caches else dims.head_dim * element)
        lists = rows * dims.heads * (groups * list_bytes(n_tokens, kept, paged=True) + n_tokens * 4)  # and fp32 lse
        flops = 4.0 * n_tokens * n_tokens * dims.head_dim * dims.heads * rows
        saved = flops * max(0.0, 1.0 - (kept / n_tokens) / cost.attention_efficiency) / cost.matrix_flops
        attention = dict(nbytes=delta + lists, saving=saved, host_traffic=delta + lists)  # a sparse step reads it

    def mlp_item(tokens: int):
        blocks = math.ceil(tokens / config.mlp_block)
        hidden_element = 1 if config.fp8_caches else element  # fp8: a float32 scale per unit besides
        caches = rows * (tokens * (dims.mlp_hidden * hidden_element + dims.mlp_out * element)
                         + (dims.mlp_hidden * 4 if config.fp8_caches else 0))
        means = rows * blocks * (dims.mlp_hidden * 4 + dims.mlp_out * element)  # fp32 pre-activation, x
        width = list_width(dims.mlp_hidden, round(config.mlp_keep * dims.mlp_hidden), config.selection_tile)
        lists = rows * blocks * list_bytes(dims.mlp_hidden, width)  # unit lists and counts
        flops = 4.0 * tokens * dims.mlp_out * dims.mlp_hidden * rows
        saved = flops * max(0.0, 1.0 - config.mlp_keep / cost.mlp_efficiency) / cost.matrix_flops
        # each sparse step transposes fc2 into the run's scratch (read + write)
        saved = max(0.0, saved - 2 * dims.fc2_bytes(element) / cost.device_bandwidth)
        return dict(nbytes=caches + means + lists, saving=saved, host_traffic=2 * caches,  # read and written
                    resident=means + lists)

    joint_mlp = mlp_item(n_tokens) if config.sparse_mlp else None
    image_mlp = mlp_item(image_tokens) if config.sparse_mlp and image_tokens is not None else joint_mlp
    for layer in range(config.first_dense_layers, dims.n_layers):
        if attention:
            folds = delta if joint_mlp and layer in mlp_layers and layer in folded_layers else 0
            items.append(CacheItem(layer, ATTENTION, **attention, folds=folds))
        if joint_mlp and layer in mlp_layers:
            items.append(CacheItem(layer, MLP, **(image_mlp if layer in image_mlp_layers else joint_mlp)))
    return items


@dataclass(frozen=True)
class MemoryPlan:
    """Where each layer's caches live in this run (``placement[(layer, kind)]``: DEVICE / HOST / OFF)."""

    placement: dict = field(default_factory=dict)
    budget: int | None = None   # device bytes the caches may take (None: no limit known)
    host_budget: int | None = None  # host bytes streamed caches may take (None: no limit known)
    wanted: int = 0             # device bytes of every cache
    device_bytes: int = 0
    host_bytes: int = 0
    sized: bool = True  # False: the model's dimensions were not known; every cache with the computation
    folded: int = 0     # layers whose attention delta lives in their MLP output cache

    def where(self, layer: int, kind: str) -> str:
        return self.placement.get((layer, kind), OFF if self.sized else DEVICE)

    def given_up(self) -> dict[str, int]:
        """Per kind, how many layers' caches of that kind had no room."""
        out = {}
        for (_, kind), where in self.placement.items():
            if where == OFF:
                out[kind] = out.get(kind, 0) + 1
        return out

    def headline(self) -> str:
        """The placement in a few words (for the node)."""
        text = f"caches {self.device_bytes / 2**30:.1f} GiB"
        if self.host_bytes:
            text += f" + {self.host_bytes / 2**30:.1f} GiB from host"
        return text + (", some given up" if self.given_up() else "")

    def describe(self) -> str:
        text = f"caches {self.device_bytes / 2**30:.2f} GiB on the device"
        if self.host_bytes:
            text += f", {self.host_bytes / 2**30:.2f} GiB streamed from host memory"
        if self.folded:
            text += f" (the attention deltas of {self.folded} layers folded into their MLP output caches)"
        given_up = self.given_up()
        if given_up:
            budget = "none" if not self.budget else f"{self.budget / 2**30:.2f} GiB"
            if self.host_budget is not None and self.host_bytes:
                budget += f", host memory for streaming {self.host_budget / 2**30:.2f} GiB"
            text += (f"; memory for {self.wanted / 2**30:.2f} GiB was not free (budget {budget}): without caches "
                     + ", ".join(f"{kind} of {n} layers" for kind, n in given_up.items()))
        return text


def plan_memory(items: list[CacheItem], budget: int | None, cost: CostModel = DEFAULT_COST,
                host_budget: int | None = None) -> MemoryPlan:
    """Place ``items`` most valuable per byte first: on the device while ``budget`` lasts, then in
    host memory where streaming pays (see ``CostModel.stream_share``), else nowhere. Streamed
    caches travel through device memory too (the one in use and the next one in flight): where
    any is streamed, room for two of the largest is kept out of the budget. ``host_budget``: the
    pinned host memory streamed caches may take (None: no limit known)."""
    plan = _placed(items, budget, cost, host_budget)
    if plan.host_bytes and budget is not None:
        staging = 2 * max(item.nbytes for item in items if plan.where(item.layer, item.kind) == HOST)
        plan = _placed(items, max(0, budget - staging), cost, host_budget)
        plan = replace(plan, budget=budget)
    return plan


def folded_bytes(items) -> int:
    """Bytes of ``items`` when every one is kept (folded deltas not counted)."""
    return sum(item.nbytes - item.folds for item in items)


def _placed(items, budget, cost, host_budget) -> MemoryPlan:
    folds = {item.layer: item.folds for item in items if item.folds}

    def value(item):  # time saved per byte; a folded layer's MLP cache also spares its attention delta
        return item.saving / max(1, item.nbytes - (folds.get(item.layer, 0) if item.kind == MLP else 0))

    placement, used = {}, {DEVICE: 0, HOST: 0}
    for item in sorted(items, key=lambda i: (-value(i), i.layer, i.kind)):
        # A folded layer's second cache kept: the attention delta is needed no more, wherever it lives.
        partner = placement.get((item.layer, MLP if item.kind == ATTENTION else ATTENTION), OFF)
        fold = folds.get(item.layer, 0) if partner != OFF else 0
        own = item.nbytes - (fold if item.kind == ATTENTION else 0)
        credit = {partner: fold} if item.kind == MLP and fold else {}  # taken off where the attention lives
        if budget is None or used[DEVICE] + own - credit.get(DEVICE, 0) <= budget:
            where = DEVICE
        elif (item.host_traffic and item.host_traffic / cost.host_bandwidth < cost.stream_share * item.saving
              and (host_budget is None or used[HOST] + own - item.resident - credit.get(HOST, 0) <= host_budget)
              and (budget is None or used[DEVICE] + item.resident <= budget)):
            where = HOST
        else:
            where = OFF
        placement[(item.layer, item.kind)] = where
        if where != OFF:
            resident = item.resident if where == HOST else 0  # (on the device wherever the item lives)
            used[where] += own - resident
            used[DEVICE] += resident
            for place, freed in credit.items():
                used[place] -= freed
    folded = sum(1 for layer in folds if OFF not in (placement[(layer, ATTENTION)], placement.get((layer, MLP), OFF)))
    return MemoryPlan(placement, budget, host_budget, folded_bytes(items), used[DEVICE], used[HOST], folded=folded)


def cache_bytes(config: ChipmunkConfig, dims: ModelDims, rows: int, n_tokens: int, dtype: torch.dtype,
                mlp_layers=None, folded_layers=frozenset()) -> int:
    """Bytes of every cache Chipmunk could keep for ``rows`` batch rows of ``n_tokens`` tokens
    (``mlp_layers`` None: every layer's MLP is replaceable)."""
    element = torch.empty((), dtype=dtype).element_size()
    mlp_layers = range(dims.n_layers) if mlp_layers is None else mlp_layers
    return folded_bytes(layer_items(config, dims, rows, n_tokens, element, mlp_layers,
                                    folded_layers=folded_layers))


def quantised(budget: int | None) -> int | None:
    """The budget rounded down to ``BUDGET_QUANTUM`` (small differences in free memory between
    runs must not change the plan)."""
    return None if budget is None else max(0, budget // BUDGET_QUANTUM * BUDGET_QUANTUM)


@dataclass(frozen=True)
class RunPlan:
    """What a run does with Chipmunk's layers, fixed at its first model call."""

    stock: StockReason | None  # set: every layer runs stock in this run (step caching still works)
    memory: MemoryPlan
    rows: int        # batch rows the caches were planned for (every conditioning together)
    n_tokens: int

    def attention_on(self, layer: int) -> str:
        return OFF if self.stock else self.memory.where(layer, ATTENTION)

    def mlp_on(self, layer: int) -> str:
        return OFF if self.stock else self.memory.where(layer, MLP)

    def describe(self) -> str:
        return self.stock.detail if self.stock else self.memory.describe()


class StockReason(NamedTuple):
    """Why a run's layers run stock: a headline short enough for the node, and the whole reason."""

    headline: str
    detail: str


def stock_reason(config: ChipmunkConfig, device: torch.device, grid_tokens: int, min_sparse_tokens: int,
                 paged: bool) -> StockReason | None:
    """Why this run's layers run stock whatever the memory, or None."""
    if not config.sparse:
        return StockReason("both sparsities are 0", "both sparsities are 0")
    if device.type not in sparse_devices():
        return StockReason("needs a CUDA GPU",
                           f"on the {device.type.upper()} Chipmunk would run its PyTorch reference kernels, slower "
                           "than stock: layers run stock (the speed-up needs a CUDA GPU)")
    if device.type in SIZE_RULE_DEVICES and grid_tokens < min_sparse_tokens:
        return StockReason(f"too few tokens ({grid_tokens})",
                           f"{grid_tokens} image tokens is below the {min_sparse_tokens} where sparse steps pay off "
                           "on the GPUs measured" + (" with the weights paged in per layer (dynamic VRAM)" if paged
                                                     else "") + ": layers run stock at this size")
    return None


# --- how a model call executes: replayed as a CUDA graph, or eagerly ---------------------------------
NESTED_TENSORS = "the call passes tensors inside lists"
ADAPTIVE_CACHE = "the adaptive step cache decides inside the model call"
CONTROL = "a ControlNet adds to the blocks' outputs"


@dataclass(frozen=True)
class CallFacts:
    """What the hooks read off one model call, for ``graph_verdict``."""

    dense: bool
    stock_layers: bool
    graph_device: bool      # the call's tensors live where graphs are captured
    has_control: bool
    nested_tensors: bool    # tensors inside lists among the arguments (reference latents and the like)


def graph_verdict(config: ChipmunkConfig, schedule, step: int, facts: CallFacts, setup_blocker):
    """How a model call runs: True to replay it through its conditioning's CUDA graphs; a reason
    (str) for a sparse call that must run eagerly; None for a call graphs are not for (dense or
    stock layers, a skipped step, another device, a family that does not replay its steps).

    ``setup_blocker()`` says why ComfyUI's set-up of this run allows no graph at all, or None; it
    is asked only for calls that would otherwise be replayed (its answer is the run's)."""
    if not config.cuda_graphs or not config.sparse or facts.dense or facts.stock_layers or not facts.graph_device:
        return None
    if schedule.mode == "fixed" and schedule.decide(step, lambda: False):
        return None  # a skipped step runs no block: nothing to replay
    if facts.has_control:
        return CONTROL
    blocker = setup_blocker()
    if blocker:
        return blocker
    if facts.nested_tensors:
        return NESTED_TENSORS
    if schedule.mode == "adaptive":
        return ADAPTIVE_CACHE
    return True


def eager_runs_stock(dynamic_vram: bool) -> bool:
    """Whether a sparse call that cannot be replayed runs its layers stock for the rest of the run.

    Under ComfyUI's dynamic VRAM, its per-layer weight handling adds host work to every layer call;
    for a family whose sparse steps are little GPU work (``cuda_graphs`` in its defaults: FLUX),
    eager sparse steps were then slower than stock (H200, FLUX.1-dev width, 50 steps: 0.73x at
    1024x1024, 0.84x at 1280x768; replayed as graphs 1.12x and 1.09x)."""
    return dynamic_vram
