"""The "Chipmunk Accelerate" node: MODEL in, a patched clone out. The input MODEL is never changed."""

from __future__ import annotations

from comfy_api.latest import io

from ..chipmunk_core import FAMILY_DEFAULTS, adapter_for, resolve_config
from . import hooks

PRESET_AUTO = "auto (per model)"
PRESET_CUSTOM = "custom"
_FLUX = FAMILY_DEFAULTS["flux"]


class ChipmunkAccelerate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        slider = io.NumberDisplay.slider
        return io.Schema(
            node_id="ChipmunkAccelerate",
            display_name="Chipmunk Accelerate",
            category="model_patches/chipmunk",
            description=(
                "Training-free acceleration of FLUX, HunyuanVideo and WAN2.1: after a few dense steps, each "
                "step recomputes only the attention keys and MLP units that change fastest and reuses the "
                "rest from a per-step cache (Chipmunk's column-sparse deltas). Place between the model loader "
                "and the sampler."),
            inputs=[
                io.Model.Input("model", tooltip="A FLUX, HunyuanVideo or WAN2.1 model."),
                io.Combo.Input(
                    "preset", options=[PRESET_AUTO, PRESET_CUSTOM], default=PRESET_AUTO,
                    tooltip="auto: the reference settings for the connected model family (FLUX: attention 0.835, "
                            "MLP 0.70; HunyuanVideo: attention 0.94; WAN2.1: attention 0.89 + local window). "
                            "custom: use the sliders below."),
                io.Float.Input(
                    "attention_sparsity", default=_FLUX.attention_sparsity, min=0.0, max=0.99, step=0.005,
                    display_mode=slider,
                    tooltip="(custom) Fraction of attention keys each query group skips on sparse steps. "
                            "0 = dense attention. Higher is faster and less faithful."),
                io.Float.Input(
                    "mlp_sparsity", default=_FLUX.mlp_sparsity, min=0.0, max=0.99, step=0.01,
                    display_mode=slider,
                    tooltip="(custom) Fraction of MLP hidden units each block of tokens skips on sparse steps. "
                            "0 = dense MLP."),
                io.Int.Input(
                    "dense_warmup_steps", default=_FLUX.dense_warmup_steps, min=1, max=50, display_mode=slider,
                    tooltip="(custom) Steps at the start that run dense and build the caches."),
                io.Int.Input(
                    "dense_interval", default=_FLUX.dense_interval, min=0, max=100, display_mode=slider,
                    tooltip="(custom) Refresh the caches with a dense step every this many steps (0 = never "
                            "after the warm-up)."),
                io.Int.Input(
                    "first_dense_layers", default=_FLUX.first_dense_layers, min=0, max=64, display_mode=slider,
                    tooltip="(custom) Number of first transformer layers that always run dense."),
            ],
            outputs=[io.Model.Output(tooltip="The model, patched to sample with Chipmunk.")],
        )

    @classmethod
    def execute(cls, model, preset, attention_sparsity, mlp_sparsity, dense_warmup_steps, dense_interval,
                first_dense_layers) -> io.NodeOutput:
        adapter = adapter_for(model.get_model_object("diffusion_model"))
        overrides = {}
        if preset == PRESET_CUSTOM:
            overrides = dict(attention_sparsity=attention_sparsity, mlp_sparsity=mlp_sparsity,
                             dense_warmup_steps=dense_warmup_steps, dense_interval=dense_interval,
                             first_dense_layers=first_dense_layers, dense_at_fractions=())
        elif preset != PRESET_AUTO:
            raise ValueError(f"preset must be {PRESET_AUTO!r} or {PRESET_CUSTOM!r}, not {preset!r}")
        config = resolve_config(adapter.family, **overrides)
        patched = model.clone()
        hooks.install(patched, adapter, config)
        return io.NodeOutput(patched)
