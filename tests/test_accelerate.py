"""Chipmunk Accelerate in a real ComfyUI process: real models, the real KSampler, the real node.

FLUX is the narrow FLUX built from ComfyUI's own classes (the stock loader only accepts full-width
FLUX; that path runs through the server in test_comfyui_pack.py). HunyuanVideo and WAN2.1 are tiny
checkpoints loaded through the stock loader. Every run has 8 steps, so sparse steps really run
(FLUX and WAN: dense at 0 and 1; HunyuanVideo: dense at 0, 1, 2 and 6).
"""

from __future__ import annotations

import logging
import re

import pytest
import torch

pytestmark = [pytest.mark.comfyui, pytest.mark.chipmunk_node]

STEPS = 8
# family -> sizes as (width px, height px, frames); token counts are not multiples of 192.
SIZES = {
    "flux": [(256, 256, 1), (200, 328, 1)],
    "hunyuan_video": [(160, 96, 9), (144, 112, 5)],
    "wan21": [(160, 96, 9), (136, 104, 5)],
}
CONDITIONING_FAMILY = {"flux": "flux", "hunyuan_video": "hunyuan_video", "wan21": "wan"}
CHECKPOINT = {"hunyuan_video": "hunyuan_video", "wan21": "wan_t2v"}
AUTO = "auto (per model)"


class Family:
    def __init__(self, comfy, node, name, model):
        self.comfy, self.node, self.name, self.model = comfy, node, name, model

    def conditioning(self, seed, tokens=32):
        widths = {"context_width": 64} if self.name == "flux" else {}
        return self.comfy.conditioning(CONDITIONING_FAMILY[self.name], seed=seed, tokens=tokens, **widths)

    def accelerate(self, model=None, **settings):
        preset = AUTO if not settings else "custom"
        (patched,) = self.comfy.run_node(self.node, model=model or self.model, preset=preset, **settings)
        return patched

    def sample(self, model, size, *, seed=1, cfg=1.0, negative_tokens=32):
        width, height, frames = size
        latent = self.comfy.empty_latent(CONDITIONING_FAMILY[self.name], width=width, height=height, frames=frames)
        return self.comfy.ksampler(model, self.conditioning(5), self.conditioning(6, negative_tokens), latent,
                                   seed=seed, steps=STEPS, cfg=cfg)


@pytest.fixture(scope="module", params=list(SIZES))
def family(request, comfy_inprocess, chipmunk_pack_nodes, tiny_models_dir):
    name = request.param
    if name == "flux":
        model = comfy_inprocess.narrow_flux()
    else:
        tiny = comfy_inprocess.tiny_models
        model = comfy_inprocess.load_diffusion_model(tiny.write_checkpoint(CHECKPOINT[name], tiny_models_dir))
    return Family(comfy_inprocess, chipmunk_pack_nodes["ChipmunkAccelerate"], name, model)


def _relative(a, b):
    return ((a - b).float().norm() / b.float().norm()).item()


@pytest.mark.parametrize("cfg", [1.0, 3.5])
def test_sparsity_zero_reproduces_the_stock_model_exactly(family, cfg):
    size = SIZES[family.name][1]
    stock = family.sample(family.model, size, cfg=cfg)
    dense = family.accelerate(attention_sparsity=0.0, mlp_sparsity=0.0, dense_warmup_steps=2,
                              dense_interval=10, first_dense_layers=0)
    # Same operations in the same order: bit-identical (tolerance 0).
    assert torch.equal(family.sample(dense, size, cfg=cfg), stock)


@pytest.mark.parametrize("cfg", [1.0, 3.5])
def test_defaults_run_sparse_steps_and_stay_close_to_dense(family, cfg, caplog):
    patched = family.accelerate()
    for size in SIZES[family.name]:
        stock = family.sample(family.model, size, cfg=cfg)
        with caplog.at_level(logging.INFO):
            fast = family.sample(patched, size, cfg=cfg)
        assert torch.isfinite(fast).all()
        deviation = _relative(fast, stock)
        print(f"{family.name} size={size} cfg={cfg}: relative deviation from dense {deviation:.2e}")
        assert 0 < deviation < 0.2
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Chipmunk run:")]
    assert summary, "one summary line per sampling run"
    sparse_attention_steps = int(re.search(r"attention (\d+) dense / (\d+) sparse", summary[-1]).group(2))
    assert sparse_attention_steps > 0, summary[-1]


def test_mlp_sparsity_runs_and_differs(family):
    size = SIZES[family.name][0]
    stock = family.sample(family.model, size)
    patched = family.accelerate(attention_sparsity=0.0, mlp_sparsity=0.7, dense_warmup_steps=2,
                                dense_interval=0, first_dense_layers=1)
    fast = family.sample(patched, size)
    assert torch.isfinite(fast).all() and 0 < _relative(fast, stock) < 0.2


def test_same_seed_is_identical_and_runs_do_not_leak_state(family):
    first_size, other_size = SIZES[family.name]
    original = family.sample(family.model, first_size)
    patched = family.accelerate()
    a = family.sample(patched, first_size)
    family.sample(patched, other_size, seed=9)  # another resolution in between
    b = family.sample(patched, first_size)
    assert torch.equal(a, b)
    # The model the node received is untouched: it still gives exactly its original output.
    assert torch.equal(family.sample(family.model, first_size), original)
    assert "chipmunk_config" not in family.model.model_options.get("transformer_options", {})


def test_cfg_with_separate_calls_per_conditioning(family):
    """Conditionings ComfyUI cannot batch run as separate model calls: one cache set each."""
    size = SIZES[family.name][0]
    stock = family.sample(family.model, size, cfg=4.0, negative_tokens=7)
    fast = family.sample(family.accelerate(), size, cfg=4.0, negative_tokens=7)
    assert torch.isfinite(fast).all() and 0 < _relative(fast, stock) < 0.2


def test_unsupported_model_is_refused_when_the_node_runs(comfy_inprocess, chipmunk_pack_nodes):
    import comfy.model_patcher
    import comfy.supported_models

    unet = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [1],
            "transformer_depth": [1], "channel_mult": [1], "transformer_depth_middle": 1,
            "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 2,
            "transformer_depth_output": [1, 1], "use_temporal_attention": False, "use_temporal_resblock": False}
    sd15 = comfy.model_patcher.ModelPatcher(comfy.supported_models.SD15(unet).get_model({}),
                                            torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match="supports FLUX, HunyuanVideo, WAN2.1 models; this model is UNetModel"):
        comfy_inprocess.run_node(chipmunk_pack_nodes["ChipmunkAccelerate"], model=sd15, preset=AUTO)


def test_batch_of_two_with_cfg(family):
    size = SIZES[family.name][0]
    width, height, frames = size
    single = family.comfy.empty_latent(CONDITIONING_FAMILY[family.name], width=width, height=height, frames=frames)
    latent = {"samples": single["samples"].repeat(2, *([1] * (single["samples"].dim() - 1)))}
    positive, negative = family.conditioning(5), family.conditioning(6)
    stock = family.comfy.ksampler(family.model, positive, negative, latent, seed=3, steps=STEPS, cfg=3.5)
    fast = family.comfy.ksampler(family.accelerate(), positive, negative, latent, seed=3, steps=STEPS, cfg=3.5)
    assert fast.shape == stock.shape and fast.shape[0] == 2
    assert torch.isfinite(fast).all() and 0 < _relative(fast, stock) < 0.2


def test_an_interrupted_run_releases_its_state(family, caplog):
    """An interrupt (or any error) mid-sampling ends the run cleanly; the next run is unaffected."""
    import comfy.model_management
    import comfy.patcher_extension

    size = SIZES[family.name][0]
    patched = family.accelerate()
    expected = family.sample(patched, size)
    interrupted = patched.clone()
    calls = []

    def interrupt_after_three_calls(executor, *args, **kwargs):
        calls.append(None)
        if len(calls) > 3:  # past the dense warm-up: sparse caches exist by now
            raise comfy.model_management.InterruptProcessingException()
        return executor(*args, **kwargs)

    interrupted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test-interrupt",
                                     interrupt_after_three_calls)
    with caplog.at_level(logging.INFO), pytest.raises(comfy.model_management.InterruptProcessingException):
        family.sample(interrupted, size)
    assert any(r.getMessage().startswith("Chipmunk run:") for r in caplog.records), "state released in a finally"
    assert "chipmunk_run" not in patched.model_options["transformer_options"]
    assert torch.equal(family.sample(patched, size), expected)
