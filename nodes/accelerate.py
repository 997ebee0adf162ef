"""The "Chipmunk Accelerate" node: MODEL in, a patched clone out. The input MODEL is never changed.

What the node shows is what runs. Where ComfyUI has dynamic inputs (``io.DynamicCombo``, v0.19
and later), the sliders exist only under ``preset = custom``; "auto" shows none and runs the
connected family's reference settings (named in the tooltip and in the run report). Older ComfyUI
gets one flat set of inputs, where the sliders take effect under "custom" and the run report says
when "auto" left them unused. The step cache settings work the same way.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..chipmunk_core import FAMILY_DEFAULTS, SLIDER_FIELDS
from . import hooks

PRESET_AUTO = "auto (per model)"
PRESET_CUSTOM = "custom"
CACHE_PRECISIONS = ("model", "fp8")
CACHE_OFF, CACHE_FIXED, CACHE_ADAPTIVE = "off", "fixed", "adaptive"
DYNAMIC = hasattr(io, "DynamicCombo")
_FLUX = FAMILY_DEFAULTS["flux"]

AUTO_TOOLTIP = (
    "auto: the reference settings of the connected model family (FLUX: attention sparsity 0.835, MLP 0.70, "
    "dense at steps 0, 1 and every 10th; HunyuanVideo: attention 0.94, dense at 0, 1, 20% and 80%; WAN: "
    "attention 0.89 with a local 3D window, dense at 0, 1 and every 10th; first 2 layers always dense). "
    "custom: your values.")
CACHE_TOOLTIP = (
    "Skip whole steps by reusing the last computed step's change (full-step caching, stacked on the sparse "
    "deltas). off: every step runs. fixed: the reference schedule, every other step between dense refreshes "
    "(about half the steps). adaptive: skip while the predicted change stays under the threshold. Runs of 10 "
    "steps or fewer never skip.")


def _sliders() -> list:
    slider = io.NumberDisplay.slider
    return [
        io.Float.Input("attention_sparsity", default=_FLUX.attention_sparsity, min=0.0, max=0.99, step=0.005,
                       display_mode=slider,
                       tooltip="Fraction of attention keys each query group skips on sparse steps. 0 = dense "
                               "attention. Higher is faster and less faithful."),
        io.Float.Input("mlp_sparsity", default=_FLUX.mlp_sparsity, min=0.0, max=0.99, step=0.01, display_mode=slider,
                       tooltip="Fraction of MLP hidden units each block of tokens skips on sparse steps. 0 = dense "
                               "MLP (models whose MLP Chipmunk does not know always run it dense)."),
        io.Int.Input("dense_warmup_steps", default=_FLUX.dense_warmup_steps, min=1, max=50, display_mode=slider,
                     tooltip="Steps at the start that run dense and build the caches."),
        io.Int.Input("dense_interval", default=_FLUX.dense_interval, min=0, max=100, display_mode=slider,
                     tooltip="Refresh the caches with a dense step every this many steps (0 = never after the "
                             "warm-up)."),
        io.Int.Input("first_dense_layers", default=_FLUX.first_dense_layers, min=0, max=64, display_mode=slider,
                     tooltip="Number of first transformer layers that always run dense."),
        io.Combo.Input("cache_precision", options=list(CACHE_PRECISIONS), default=CACHE_PRECISIONS[0],
                       tooltip="model: the caches keep the model's precision. fp8: the attention caches and the "
                               "MLP's hidden caches take half the memory (8-bit floats with float32 scales; needs "
                               "an RTX 40xx, H100 or newer), a little slower. What fp8 costs in quality is "
                               "measured on the toy models only."),
    ]


def _cache_settings() -> list:
    return [
        io.Float.Input("step_cache_threshold", default=_FLUX.step_cache_threshold, min=0.0, max=1.0, step=0.01,
                       display_mode=io.NumberDisplay.slider,
                       tooltip="Skip a step while the predicted relative change of the model's output since the "
                               "last computed step stays under this. Higher skips more."),
        io.Int.Input("step_cache_max_skips", default=_FLUX.step_cache_max_skips, min=1, max=8,
                     tooltip="At most this many skipped steps in a row."),
    ]


def _inputs() -> list:
    model = io.Model.Input("model", tooltip="A FLUX, Chroma, HunyuanVideo or WAN model (from Load Diffusion Model).")
    if DYNAMIC:
        return [
            model,
            io.DynamicCombo.Input("preset", tooltip=AUTO_TOOLTIP, options=[
                io.DynamicCombo.Option(PRESET_AUTO, []), io.DynamicCombo.Option(PRESET_CUSTOM, _sliders())]),
            io.DynamicCombo.Input("step_cache", tooltip=CACHE_TOOLTIP, options=[
                io.DynamicCombo.Option(CACHE_OFF, []), io.DynamicCombo.Option(CACHE_FIXED, []),
                io.DynamicCombo.Option(CACHE_ADAPTIVE, _cache_settings())]),
        ]
    return [
        model,
        io.Combo.Input("preset", options=[PRESET_AUTO, PRESET_CUSTOM], default=PRESET_AUTO,
                       tooltip=AUTO_TOOLTIP + " (With auto, the sliders below are not used.)"),
        *_sliders(),
        io.Combo.Input("step_cache", options=[CACHE_OFF, CACHE_FIXED, CACHE_ADAPTIVE], default=CACHE_OFF,
                       tooltip=CACHE_TOOLTIP),
        *_cache_settings(),
    ]


def _changed(values: dict, inputs: list) -> bool:
    """Whether any of ``inputs`` has a value other than its default (flat schema)."""
    return any(name in values and values[name] != i.default for i in inputs for name in (i.id,))


def settings_from_inputs(preset, step_cache, flat: dict) -> tuple[dict, list[str]]:
    """ChipmunkConfig overrides from the node's inputs (dynamic: dicts; flat: values + ``flat``),
    and the inputs shown but not used (said in the run report)."""
    unused = []
    preset_values = preset if isinstance(preset, dict) else {"preset": preset, **flat}
    cache_values = step_cache if isinstance(step_cache, dict) else {"step_cache": step_cache, **flat}
    settings = {}
    choice = preset_values["preset"]
    if choice == PRESET_CUSTOM:
        settings.update({name: preset_values[name] for name in SLIDER_FIELDS})
        precision = preset_values.get("cache_precision", CACHE_PRECISIONS[0])
        if precision not in CACHE_PRECISIONS:
            raise ValueError(f"cache_precision must be one of {', '.join(CACHE_PRECISIONS)}, not {precision!r}")
        settings["fp8_caches"] = precision == "fp8"
    elif choice != PRESET_AUTO:
        raise ValueError(f"preset must be {PRESET_AUTO!r} or {PRESET_CUSTOM!r}, not {choice!r}")
    elif not isinstance(preset, dict) and _changed(flat, _sliders()):
        unused.append("preset is auto, so the sparsity and schedule sliders you changed are not used")
    mode = cache_values["step_cache"]
    if mode not in (CACHE_OFF, CACHE_FIXED, CACHE_ADAPTIVE):
        raise ValueError(f"step_cache must be one of off, fixed, adaptive, not {mode!r}")
    settings["step_cache"] = mode
    if mode == CACHE_ADAPTIVE:
        settings["step_cache_threshold"] = cache_values["step_cache_threshold"]
        settings["step_cache_max_skips"] = cache_values["step_cache_max_skips"]
    elif not isinstance(step_cache, dict) and _changed(flat, _cache_settings()):
        unused.append("step_cache is not adaptive, so the threshold and skip limit you changed are not used")
    return settings, unused


class ChipmunkAccelerate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ChipmunkAccelerate",
            display_name="Chipmunk Accelerate",
            category="model_patches/chipmunk",
            description=(
                "Training-free acceleration of FLUX, Chroma, HunyuanVideo and WAN: after a few dense steps, each "
                "step recomputes only the attention keys and MLP units that change fastest and reuses the rest "
                "from a per-step cache (Chipmunk's column-sparse deltas); optionally skips whole steps. Place "
                "between the model loader and the sampler. After each run the node shows what ran."),
            inputs=_inputs(),
            outputs=[io.Model.Output(tooltip="The model, patched to sample with Chipmunk.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, preset, step_cache, **flat) -> io.NodeOutput:
        settings, unused = settings_from_inputs(preset, step_cache, flat)
        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        patched = hooks.accelerate(model, node_id=node_id, unused_inputs=tuple(unused), **settings)
        return io.NodeOutput(patched)
