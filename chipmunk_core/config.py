"""The one frozen configuration object of a Chipmunk-patched model, and the per-family defaults.

Sparsity is what the user thinks in: the fraction of attention keys (per query group) or MLP hidden
units (per token block) that a sparse step does NOT recompute. The random fractions are part of
what is recomputed (so HunyuanVideo's 0.94 = 0.05 top-k + 0.01 random keys kept).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

FAMILIES = ("flux", "hunyuan_video", "wan")
FAMILY_NAMES = {"flux": "FLUX", "hunyuan_video": "HunyuanVideo", "wan": "WAN"}
STEP_CACHE_MODES = ("off", "fixed", "adaptive")
# "warmup_steps": lists chosen on the dense warm-up steps only and kept on the later dense
# refreshes, which then cost one dense attention plus the cache pass (the reference's FLUX setting).
ATTENTION_SELECTIONS = ("every_dense_step", "warmup_steps")
SCORE_QUERY_COUNTS = (0, 4, 8, 16, 32, 64)  # what the sampled column-sum kernel takes


@dataclass(frozen=True)
class ChipmunkConfig:
    family: str
    attention_sparsity: float
    mlp_sparsity: float
    dense_warmup_steps: int
    dense_interval: int  # 0: no periodic dense refresh after the warm-up
    first_dense_layers: int
    attention_random_fraction: float = 0.0
    mlp_random_fraction: float = 0.0
    # Extra dense refresh steps given as fractions of the run (HunyuanVideo's {10, 40} of 50).
    dense_at_fractions: tuple[float, ...] = ()
    # Static keys around each query voxel (in tokens per axis, t/h/w); () = none.
    local_window: tuple[int, ...] = ()
    query_group: int = 192
    mlp_block: int = 128
    # Sparse steps between re-rankings of the MLP units (the reference re-ranks every second step).
    mlp_selection_interval: int = 2
    selection_tile: int = 64
    # Full-step caching: "off", "fixed" (the family's reference schedule scaled to the run) or
    # "adaptive" (skip while the predicted change stays under step_cache_threshold).
    step_cache: str = "off"
    step_cache_threshold: float = 0.1
    step_cache_max_skips: int = 2
    # On CUDA, latents with fewer generated tokens than this run their layers stock (the sparse
    # path does not pay there); 0 = no limit. FLUX's value is measured (README, GPU numbers).
    min_sparse_tokens: int = 0
    # The same where the host pages the weights in per layer call (ComfyUI's dynamic VRAM): each
    # layer then costs more host time, and small latents need more tokens for sparse steps to pay.
    min_sparse_tokens_paged: int = 0
    # Dense steps that re-select the attention key lists (ATTENTION_SELECTIONS); the others keep them.
    attention_selection: str = "every_dense_step"
    # Queries per group that score the keys when lists are selected (0: all, exact column sums).
    attention_score_queries: int = 0
    # On CUDA, replay the sparse steps of a conditioning as CUDA graphs (captured on the first
    # steps that can be, per conditioning and MLP-ranking pattern) where ComfyUI's set-up allows it:
    # where one step is little GPU work, the host's launches are what the step waits on.
    cuda_graphs: bool = False
    # Attention delta caches and the MLP's hidden caches in float8_e4m3fn with one float32 scale
    # per row (per unit for the MLP): half the bytes, on an Ada/Hopper GPU or newer. The MLP's
    # output caches, which every sparse step adds to, keep the model's precision. Off by default
    # until the quality lab measures what they cost.
    fp8_caches: bool = False

    def __post_init__(self):
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family must be one of {', '.join(FAMILIES)}, not {self.family!r}")
        for name in ("attention_sparsity", "mlp_sparsity"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                problems.append(f"{name} must be in [0, 1) (0 = dense), got {value}")
        if self.mlp_selection_interval < 1:
            problems.append(f"mlp_selection_interval must be >= 1, got {self.mlp_selection_interval}")
        for name in ("dense_warmup_steps", "dense_interval", "first_dense_layers", "step_cache_max_skips",
                     "min_sparse_tokens", "min_sparse_tokens_paged"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.dense_warmup_steps < 1:
            problems.append("dense_warmup_steps must be at least 1: the caches are built on a dense step")
        for name in ("query_group", "mlp_block"):
            value = getattr(self, name)
            if value < 16 or value % 16:
                problems.append(f"{name} must be a positive multiple of 16, got {value}")
        if self.step_cache not in STEP_CACHE_MODES:
            problems.append(f"step_cache must be one of {', '.join(STEP_CACHE_MODES)}, not {self.step_cache!r}")
        if not self.step_cache_threshold >= 0.0:
            problems.append(f"step_cache_threshold must be >= 0, got {self.step_cache_threshold}")
        if self.attention_selection not in ATTENTION_SELECTIONS:
            problems.append(f"attention_selection must be one of {', '.join(ATTENTION_SELECTIONS)}, "
                            f"not {self.attention_selection!r}")
        if self.attention_score_queries not in SCORE_QUERY_COUNTS or self.attention_score_queries > self.query_group:
            problems.append(f"attention_score_queries must be one of {SCORE_QUERY_COUNTS} and at most query_group, "
                            f"got {self.attention_score_queries}")
        if problems:
            raise ValueError("Invalid Chipmunk settings: " + "; ".join(problems))

    @property
    def attention_keep(self) -> float:
        return 1.0 - self.attention_sparsity

    @property
    def mlp_keep(self) -> float:
        return 1.0 - self.mlp_sparsity

    @property
    def sparse_attention(self) -> bool:
        return self.attention_sparsity > 0.0

    @property
    def sparse_mlp(self) -> bool:
        return self.mlp_sparsity > 0.0

    @property
    def sparse(self) -> bool:
        """Whether any sparse-delta computation is asked for (both sparsities 0 = stock sampling)."""
        return self.sparse_attention or self.sparse_mlp

    def replace(self, **changes) -> "ChipmunkConfig":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        schedule = f"dense steps: first {self.dense_warmup_steps}"
        if self.dense_interval:
            schedule += f", every {self.dense_interval}"
        if self.dense_at_fractions:
            schedule += ", at " + "/".join(f"{f:.0%}" for f in self.dense_at_fractions)
        cache = "" if self.step_cache == "off" else f"; step cache {self.step_cache}"
        if self.step_cache == "adaptive":
            cache += f" (threshold {self.step_cache_threshold:g}, at most {self.step_cache_max_skips} skips in a row)"
        if self.attention_selection == "warmup_steps" and self.sparse_attention:
            schedule += " (key lists chosen on the first ones)"
        precision = "; fp8 caches" if self.fp8_caches and self.sparse else ""
        return (f"attention sparsity {self.attention_sparsity:g}, MLP sparsity {self.mlp_sparsity:g}, {schedule}, "
                f"first {self.first_dense_layers} layers dense{cache}{precision}")


# Reference settings (method.md): keep fractions there are 1 - sparsity here. FLUX keeps the key lists
# of its warm-up on later dense steps, as the reference does; WAN too, where the reference re-selects
# them: on the trained toy models that was closer to dense on both (lab/results/quality_selection.md)
# and faster (README, GPU numbers). HunyuanVideo, with no trained model to measure it on, stays as is.
FAMILY_DEFAULTS = {
    "flux": ChipmunkConfig(
        family="flux", attention_sparsity=0.835, mlp_sparsity=0.70, mlp_random_fraction=0.05,
        dense_warmup_steps=2, dense_interval=10, first_dense_layers=2, min_sparse_tokens=2304,
        min_sparse_tokens_paged=3840, cuda_graphs=True, attention_selection="warmup_steps"),
    "hunyuan_video": ChipmunkConfig(
        family="hunyuan_video", attention_sparsity=0.94, attention_random_fraction=0.01, mlp_sparsity=0.0,
        dense_warmup_steps=2, dense_interval=0, dense_at_fractions=(0.2, 0.8), first_dense_layers=2),
    "wan": ChipmunkConfig(
        family="wan", attention_sparsity=0.89, attention_random_fraction=0.01, mlp_sparsity=0.0,
        dense_warmup_steps=2, dense_interval=10, first_dense_layers=2, local_window=(4, 6, 8),
        attention_selection="warmup_steps"),
}

# The settings the node's sliders show: what a user tunes. Everything else is a family default.
SLIDER_FIELDS = ("attention_sparsity", "mlp_sparsity", "dense_warmup_steps", "dense_interval", "first_dense_layers")


def resolve_config(family: str, **overrides) -> ChipmunkConfig:
    """The family's defaults with the given fields replaced (None values are ignored)."""
    if family not in FAMILY_DEFAULTS:
        raise ValueError(f"Chipmunk supports {', '.join(FAMILY_NAMES.values())}; got model family {family!r}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(ChipmunkConfig)})
    if unknown:
        raise ValueError(f"Unknown Chipmunk settings: {', '.join(unknown)}")
    if "dense_warmup_steps" in changes or "dense_interval" in changes:
        # Sliders describe the whole dense schedule: the family's extra refresh fractions only
        # hold for its own reference schedule.
        changes.setdefault("dense_at_fractions", ())
    return FAMILY_DEFAULTS[family].replace(**changes)
