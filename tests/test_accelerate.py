"""Chipmunk Accelerate in a real ComfyUI process: real models, the real KSampler, the real node.

Every supported model kind of the ComfyUI version under test is a tiny checkpoint built from
ComfyUI's own classes (tools/tiny_models.py) and loaded through the stock loader where detection
allows; inputs come from the stock nodes a workflow would use (tests/harness/inprocess.py). The
narrow FLUX covers FLUX.1 at several token counts. Runs have 8 steps, so sparse steps really run.
"""

from __future__ import annotations

import importlib
import logging
import math
import re

import pytest
import torch

from harness import chipmunk as cm
from harness.paths import tiny_models_module

pytestmark = [pytest.mark.comfyui, pytest.mark.chipmunk_node]

STEPS = 6  # dense at 0 and 1, then sparse
# Sizes (width px, height px, frames); token counts are not multiples of 192. HunyuanVideo needs
# even latent sides.
IMAGE_SIZES = [(136, 200, 1), (160, 128, 1)]
VIDEO_SIZES = [(160, 96, 9), (144, 112, 5)]
# Kinds Chipmunk accelerates (attention, and the MLP where the fingerprint allows), per family.
ACCELERATED = ["flux1_dev", "flux1_schnell", "flux1_kontext", "flux1_fill", "flux2_dev", "flux2_klein",
               "longcat_image", "ovis_image", "chroma", "chroma_radiance", "hunyuan_video", "hunyuan_video_i2v",
               "hunyuan_video_i2v_skyreels", "hunyuan_video15", "wan21_t2v", "wan21_i2v", "wan22_t2v_a14b_high",
               "wan22_ti2v_5b"]
ATTENTION_ONLY = ["wan21_vace", "wan21_camera", "wan22_s2v"]
_KINDS = tiny_models_module().KINDS


def _since_their_comfyui(names):
    """Each kind as a parameter marked with the first ComfyUI version that has it: deselected (not
    skipped) against older versions."""
    return [pytest.param(name, marks=pytest.mark.comfyui_versions(since=_KINDS[name].min_version))
            for name in names]


def _loaded(kind, name: str):
    """The pack's module ``name`` as the node uses it (ComfyUI loaded the pack under its folder name:
    ``chipmunk_pack`` is another copy of the same files)."""
    return importlib.import_module(f"{kind.node.__module__.split('.')[0]}.{name}")


def _relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


class Kind:
    """One tiny model kind with its inputs, and the pack's node applied to it."""

    narrow = False

    def __init__(self, comfy, node, name, model, video):
        self.comfy, self.node, self.name, self.model, self.video = comfy, node, name, model, video

    @property
    def sizes(self):
        return VIDEO_SIZES if self.video else IMAGE_SIZES

    def accelerate(self, model=None, preset=cm.AUTO, step_cache="off", **values):
        inputs = cm.node_inputs(self.node, preset=preset, step_cache=step_cache, **values)
        (patched,) = self.comfy.run_node(self.node, model=model or self.model, **inputs)
        return patched

    def inputs(self, size, seed=5, tokens=32, batch=1):
        width, height, frames = size
        if self.narrow:  # the narrow FLUX reads 64-wide text
            positive, negative = (self.comfy.conditioning("flux1_dev", seed=s, tokens=tokens, context_width=64)
                                  for s in (seed, seed + 1))
            latent = self.comfy.empty_latent("flux1_dev", width=width, height=height)
        else:
            positive, negative, latent = self.comfy.sampling_inputs(self.name, seed=seed, width=width, height=height,
                                                                    frames=frames, tokens=tokens)
        if batch > 1:
            latent = {**latent, "samples": latent["samples"].repeat(batch, *([1] * (latent["samples"].dim() - 1)))}
        return positive, negative, latent

    def sample(self, model, size, *, seed=1, cfg=1.0, steps=STEPS, sampler="euler", batch=1):
        positive, negative, latent = self.inputs(size, batch=batch)
        return self.comfy.ksampler(model, positive, negative, latent, seed=seed, steps=steps, cfg=cfg,
                                   sampler_name=sampler)


def _kind(comfy, nodes, models_dir, name):
    """Kind ``name`` of tools/tiny_models.py, or "flux_narrow" (``narrow_flux``)."""
    if name == "flux_narrow":
        return narrow_flux(comfy, nodes)
    tiny = comfy.tiny_models
    if name not in tiny.available_kinds(comfy.version):
        pytest.skip(f"{name} does not exist in ComfyUI {'.'.join(map(str, comfy.version))}")
    model = comfy.tiny_model(name, models_dir)
    video = tiny.KINDS[name].family in ("hunyuan_video", "wan")
    return Kind(comfy, nodes["ChipmunkAccelerate"], name, model, video)


def narrow_flux(comfy, nodes, **overrides):
    """FLUX.1 at width 256 (2 heads), built in process: fast on every ComfyUI version (v0.3.64's
    detection only loads full-width FLUX checkpoints)."""
    kind = Kind(comfy, nodes["ChipmunkAccelerate"], "flux1_dev", comfy.narrow_flux(**overrides), False)
    kind.narrow = True
    return kind


@pytest.fixture(scope="module", params=_since_their_comfyui(ACCELERATED))
def any_kind(request, comfy_inprocess, chipmunk_pack_nodes, tiny_models_dir):
    return _kind(comfy_inprocess, chipmunk_pack_nodes, tiny_models_dir, request.param)


@pytest.fixture(scope="module", params=["flux_narrow", "hunyuan_video", "wan21_t2v"])
def kind(request, comfy_inprocess, chipmunk_pack_nodes, tiny_models_dir):
    return _kind(comfy_inprocess, chipmunk_pack_nodes, tiny_models_dir, request.param)


@pytest.fixture(scope="module")
def flux(comfy_inprocess, chipmunk_pack_nodes):
    return narrow_flux(comfy_inprocess, chipmunk_pack_nodes)


@pytest.fixture(scope="module")
def wan(comfy_inprocess, chipmunk_pack_nodes, tiny_models_dir):
    return _kind(comfy_inprocess, chipmunk_pack_nodes, tiny_models_dir, "wan21_t2v")


# --- every kind: sparsity 0 is stock, defaults are sparse and close --------------------------------
def test_every_kind_is_stock_at_sparsity_zero_and_close_at_defaults(any_kind, caplog):
    """cfg 3.5: cond and uncond in one batch. Sparsity 0 is bit for bit the stock model."""
    size = any_kind.sizes[0]
    stock = any_kind.sample(any_kind.model, size, cfg=3.5)
    assert torch.equal(any_kind.sample(any_kind.accelerate(preset=cm.CUSTOM, **cm.DENSE), size, cfg=3.5), stock)
    with caplog.at_level(logging.INFO):
        fast = any_kind.sample(any_kind.accelerate(), size, cfg=3.5)
    deviation = _relative(fast, stock)
    report = cm.reports(caplog)[-1]
    print(f"{any_kind.name}: relative deviation at defaults {deviation:.2e}; {report}")
    assert torch.isfinite(fast).all() and deviation < 0.2
    assert cm.step_counts(report)["sparse"] > 0, report
    bound = 0.2
    if "attention -" in report:  # a tiny model whose every layer is one of the always-dense first ones
        with caplog.at_level(logging.INFO):
            fast = any_kind.sample(any_kind.accelerate(preset=cm.CUSTOM, first_dense_layers=0), size, cfg=3.5)
        report = cm.reports(caplog)[-1]
        deviation = _relative(fast, stock)
        # Every layer sparse, the first included, on random weights (v0.3.64's FLUX.1 is full width,
        # one block of each kind: 0.42 measured): the bound only rules out a corrupted output.
        bound = 0.5
    assert "attention -" not in report and 0 < deviation < bound, (deviation, report)


# --- representative kinds: the details ------------------------------------------------------------
@pytest.mark.parametrize("cfg", [1.0, 3.5])
def test_sparsity_zero_reproduces_the_stock_model_exactly(kind, cfg):
    size = kind.sizes[1]
    stock = kind.sample(kind.model, size, cfg=cfg)
    dense = kind.accelerate(preset=cm.CUSTOM, **cm.DENSE)
    assert torch.equal(kind.sample(dense, size, cfg=cfg), stock)  # tolerance 0


@pytest.mark.parametrize("cfg", [1.0, 3.5])
def test_defaults_run_sparse_steps_and_stay_close_to_stock(kind, cfg, caplog):
    patched = kind.accelerate()
    for size in kind.sizes:
        stock = kind.sample(kind.model, size, cfg=cfg)
        with caplog.at_level(logging.INFO):
            fast = kind.sample(patched, size, cfg=cfg)
        assert torch.isfinite(fast).all()
        deviation = _relative(fast, stock)
        print(f"{kind.name} size={size} cfg={cfg}: relative deviation from stock {deviation:.2e}")
        assert 0 < deviation < 0.2
    report = cm.reports(caplog)[-1]
    assert cm.step_counts(report)["sparse"] > 0, report
    assert "achieved sparsity" in report and "attention -" not in report, report


def test_same_seed_is_identical_and_runs_do_not_leak_state(kind):
    first_size, other_size = kind.sizes
    original = kind.sample(kind.model, first_size)
    patched = kind.accelerate()
    a = kind.sample(patched, first_size)
    kind.sample(patched, other_size, seed=9)  # another resolution in between
    assert torch.equal(kind.sample(patched, first_size), a)
    # The model the node received is untouched: it still gives exactly its original output.
    assert torch.equal(kind.sample(kind.model, first_size), original)
    assert "chipmunk" not in kind.model.model_options.get("transformer_options", {})
    assert not kind.model.object_patches


def test_attention_only_kinds_run_and_say_so(comfy_inprocess, chipmunk_pack_nodes, tiny_models_dir, caplog):
    ran = 0
    for name in ATTENTION_ONLY:
        if name not in comfy_inprocess.tiny_models.available_kinds(comfy_inprocess.version):
            continue
        kind = _kind(comfy_inprocess, chipmunk_pack_nodes, tiny_models_dir, name)
        with caplog.at_level(logging.INFO):
            out = kind.sample(kind.accelerate(step_cache="fixed"), kind.sizes[0], steps=12)
        assert torch.isfinite(out).all()
        report = cm.reports(caplog)[-1]
        assert "runs its attention only" in report and cm.step_counts(report)["skipped"] == 0, report
        ran += 1
    assert ran, "no attention-only kind exists in this ComfyUI"


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
    node = chipmunk_pack_nodes["ChipmunkAccelerate"]
    with pytest.raises(ValueError, match=r"does not support this model \(UNetModel\)\. Supported: FLUX"):
        comfy_inprocess.run_node(node, model=sd15, **cm.node_inputs(node))


# --- the MLP replacement: fingerprint and self-check ----------------------------------------------
def test_mlp_of_a_changed_block_falls_back_with_one_message(flux, caplog, monkeypatch):
    """A block whose code changed under the pack (here: monkeypatched) fails the parity self-check:
    its MLP keeps ComfyUI's code, the run says so, attention stays sparse."""
    import comfy.ldm.flux.layers as layers

    stock_forward = layers.SingleStreamBlock.forward

    def drifted(self, x, vec, pe, attn_mask=None, modulation_dims=None, transformer_options={}):
        return stock_forward(self, x, vec, pe, attn_mask, modulation_dims, transformer_options) * 1.001

    monkeypatch.setattr(layers.SingleStreamBlock, "forward", drifted)
    with caplog.at_level(logging.INFO):
        out = flux.sample(flux.accelerate(), flux.sizes[0])
    assert torch.isfinite(out).all()
    report = cm.reports(caplog)[-1]
    assert "MLP of single blocks kept dense: the self-check failed" in report, report
    assert cm.step_counts(report)["sparse"] > 0
    messages = [r.getMessage() for r in caplog.records if "self-check failed" in r.getMessage()]
    assert len(messages) == 2, messages  # one warning, one report line


def _single_block_fused_adaln(self, x, vec, pe, attn_mask=None, modulation_dims=None, transformer_options={}):
    """FLUX's single block as newer ComfyUI (autumn 2026) writes it: the norm and the modulation in
    one fused operation (here: the normalisation done by hand, so it rounds elsewhere) and the
    residual added out of place. The same function as this ComfyUI's block."""
    import torch.nn.functional as F
    from comfy.ldm.flux.math import attention

    mod = self.modulation(vec)[0] if self.modulation else vec
    mean = x.mean(-1, keepdim=True)
    centred = x - mean
    normed = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.pre_norm.eps)
    x_mod = normed * (1 + mod.scale) + mod.shift
    mlp_width = getattr(self, "mlp_hidden_dim_first", self.mlp_hidden_dim)  # (v0.3.64 has one width)
    qkv, mlp = torch.split(self.linear1(x_mod), [3 * self.hidden_size, mlp_width], dim=-1)
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = self.norm(q, k, v)
    attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
    out = self.linear2(torch.cat((attn, F.gelu(mlp, approximate="tanh")), 2))
    return x + mod.gate * out


def test_single_blocks_with_a_fused_modulation_are_recognised_by_behaviour(flux, caplog, monkeypatch):
    """Newer ComfyUI fuses the single block's norm and modulation and adds its residual out of
    place, so Chipmunk's block no longer equals it bit for bit. Reproduced on this ComfyUI: the block
    is accepted by its update (float32 roundings), its MLP runs sparse, and the picture is the one
    this ComfyUI's own block gives up to that rounding."""
    import comfy.ldm.flux.layers as layers

    size = flux.sizes[0]
    settings = dict(preset=cm.CUSTOM, first_dense_layers=0)
    with caplog.at_level(logging.INFO):
        today = flux.sample(flux.accelerate(**settings), size)
    assert "kept dense" not in cm.reports(caplog)[-1]
    stock_today = flux.sample(flux.model, size)
    monkeypatch.setattr(layers.SingleStreamBlock, "forward", _single_block_fused_adaln)
    stock_newer = flux.sample(flux.model, size)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        newer = flux.sample(flux.accelerate(**settings), size)
    report = cm.reports(caplog)[-1]
    assert "kept dense" not in report and "self-check failed" not in report, report
    assert "MLP 70%" in report, report
    rounding = _relative(stock_newer, stock_today)
    print(f"stock blocks: newer vs today {rounding:.1e}; Chipmunk: {_relative(newer, today):.1e}")
    assert 0 < rounding < 1e-5
    assert _relative(newer, today) < 1e-4


def test_a_feed_forward_with_its_own_fused_forward_is_recognised_by_behaviour(wan, caplog):
    """Newer ComfyUI (autumn 2026) builds WAN's FFN as ``WanFeedForward``: a Sequential subclass
    whose forward folds the GELU into fc2's kernel. Reproduced here on this ComfyUI: the MLP is
    accepted by what it holds and by the self-check against its own forward (within bf16-level
    rounding), runs sparse, and the model without the node keeps its own forward."""
    import torch.nn.functional as F

    class FusedFeedForward(torch.nn.Sequential):
        def forward(self, x):  # the GELU applied inside the down-projection's input, as a fused kernel would
            return F.linear(F.gelu(self[0](x), approximate="tanh"), self[2].weight, self[2].bias)

    model = wan.model.clone()
    blocks = model.get_model_object("diffusion_model").blocks
    originals = [block.ffn.__class__ for block in blocks]
    try:
        for block in blocks:
            block.ffn.__class__ = FusedFeedForward
        size = wan.sizes[0]
        stock = wan.sample(model, size)
        with caplog.at_level(logging.INFO):
            fast = wan.sample(wan.accelerate(model, preset=cm.CUSTOM, mlp_sparsity=0.5), size)
        report = cm.reports(caplog)[-1]
        achieved = re.search(r"achieved sparsity on sparse steps: attention [^,]*, MLP (\d+)%", report)
        assert achieved and int(achieved.group(1)) > 0, report
        assert "kept dense" not in report and "not Sequential" not in report, report
        assert torch.isfinite(fast).all() and 0 < _relative(fast, stock) < 0.2
        assert type(blocks[0].ffn) is FusedFeedForward
    finally:
        for block, cls in zip(blocks, originals):
            block.ffn.__class__ = cls


def test_tokens_appended_after_the_video_keep_the_video_grouped(wan, caplog, monkeypatch):
    """Newer ComfyUI's WAN can append context latents' tokens after the video tokens. Reproduced on
    this ComfyUI with a block patch that appends 12 tokens (and rotary rows) around every block: the
    video grid is laid out from the first token and the extra tokens follow it (they were taken as
    preceding the grid before); the run stays sparse."""
    state = _loaded(wan, "chipmunk_core.state")
    extra = 12

    def appending(args, extras):
        img, pe = args["img"], args["pe"]
        wider = {**args, "img": torch.cat([img, img[:, :extra] * 0.5], dim=1),
                 "pe": torch.cat([pe, pe[:, :extra]], dim=1)}
        out = extras["original_block"](wider)
        return {**out, "img": out["img"][:, :-extra]}

    model = wan.model.clone()
    for index in range(len(model.get_model_object("diffusion_model").blocks)):
        model.set_model_patch_replace(appending, "dit", "double_block", index)
    layouts = []
    joint_layout = state.joint_layout

    def recording(text_len, grid, image_len, *args, **kwargs):
        layouts.append((tuple(grid), image_len, kwargs.get("extra_before")))
        return joint_layout(text_len, grid, image_len, *args, **kwargs)

    monkeypatch.setattr(state, "joint_layout", recording)
    size = wan.sizes[0]
    stock = wan.sample(model, size)
    with caplog.at_level(logging.INFO):
        fast = wan.sample(wan.accelerate(model, preset=cm.CUSTOM, first_dense_layers=0), size)
    report = cm.reports(caplog)[-1]
    assert layouts and all(before == 0 and image_len == math.prod(grid) + extra
                           for grid, image_len, before in layouts), layouts
    assert cm.step_counts(report)["sparse"] > 0 and "tokens are grouped in raster order" not in report, report
    assert torch.isfinite(fast).all() and not torch.equal(fast, stock)


def test_per_token_kernels_match_comfyui_and_step_aside_when_it_changes(flux, caplog, monkeypatch):
    """The single and double blocks' norms, modulation, rotary embedding and gated residuals go
    through one-pass kernels once self-checks find the blocks' updates equal to ComfyUI's; a ComfyUI
    whose query/key norm differs (here: monkeypatched) fails those checks, and the blocks then use
    ComfyUI's own code (the MLPs stay sparse), said once each. (No always-dense layers here:
    the narrow FLUX's two double blocks would be them.)"""
    import comfy.ldm.flux.layers as flux_layers
    replacements = _loaded(flux, "chipmunk_core.adapters.replacements")

    size = flux.sizes[0]
    with caplog.at_level(logging.INFO):
        fused = flux.sample(flux.accelerate(preset=cm.CUSTOM, first_dense_layers=0), size)
    report = cm.reports(caplog)[-1]
    assert "one-pass kernels" not in report and "double blocks run ComfyUI" not in report, report
    with monkeypatch.context() as patch:
        patch.setattr(replacements, "fused_problem", lambda block: "turned off by the test")
        patch.setattr(replacements, "double_block_check", lambda *args: "turned off by the test")
        unfused = flux.sample(flux.accelerate(preset=cm.CUSTOM, first_dense_layers=0), size)
    assert _relative(fused, unfused) < 1e-4  # float32 on the CPU: the same arithmetic up to rounding order

    stock_norm = flux_layers.QKNorm.forward
    monkeypatch.setattr(flux_layers.QKNorm, "forward", lambda self, q, k, v: stock_norm(self, k, q, v))  # changed
    caplog.clear()
    with caplog.at_level(logging.INFO):
        drifted = flux.sample(flux.accelerate(preset=cm.CUSTOM, first_dense_layers=0), size)
        with monkeypatch.context() as patch:
            patch.setattr(replacements, "fused_problem", lambda block: "turned off by the test")
            patch.setattr(replacements, "double_block_check", lambda *args: "turned off by the test")
            drifted_unfused = flux.sample(flux.accelerate(preset=cm.CUSTOM, first_dense_layers=0), size)
    report = cm.reports(caplog)[-2]
    assert "instead of one-pass kernels: their self-check failed (output update differs" in report, report
    assert "double blocks run ComfyUI's own code (their MLP is still Chipmunk's): the self-check" in report, report
    assert cm.step_counts(report)["sparse"] > 0 and "MLP 70%" in report
    assert torch.equal(drifted, drifted_unfused)  # ComfyUI's own operations, as with the kernels off


def test_batch_items_are_independent(flux, wan):
    """An image in a batch of 2 equals the same seed sampled alone (within stock ComfyUI's own batch
    tolerance), with the sparse MLP too: random picks are seeded per sample."""
    for kind in (flux, wan):
        size = kind.sizes[1]
        stock_gap = _relative(kind.sample(kind.model, size, batch=2)[:1], kind.sample(kind.model, size))
        patched = kind.accelerate(preset=cm.CUSTOM, attention_sparsity=0.8, mlp_sparsity=0.7, first_dense_layers=0)
        gap = _relative(kind.sample(patched, size, batch=2)[:1], kind.sample(patched, size))
        print(f"{kind.name}: batch row 0 vs alone, stock {stock_gap:.1e}, Chipmunk {gap:.1e}")
        assert gap <= max(10 * stock_gap, 1e-5)


# --- HunyuanVideo's padded text ------------------------------------------------------------------
def hunyuan_with_padded_text(comfy_inprocess, chipmunk_pack_nodes, tiny_models_dir):
    """The tiny HunyuanVideo, and a sampler whose texts are padded to a fixed length with the rest
    masked, as a text encoder gives them."""
    kind = _kind(comfy_inprocess, chipmunk_pack_nodes, tiny_models_dir, "hunyuan_video")
    positive, negative, latent = kind.inputs(kind.sizes[0])
    for conditioning in (positive, negative):
        tokens = conditioning[0][0].shape[1]
        mask = torch.ones(1, tokens, dtype=torch.long)
        mask[:, tokens * 3 // 4:] = 0
        conditioning[0][1]["attention_mask"] = mask

    def sample(model):  # cfg 1: ComfyUI's HunyuanVideo cannot batch two text masks (stock fails too)
        return comfy_inprocess.ksampler(model, positive, negative, latent, seed=1, steps=STEPS, cfg=1.0)

    return kind, sample


def test_hunyuan_video_with_padded_text_goes_sparse_and_is_stock_at_sparsity_zero(
        comfy_inprocess, chipmunk_pack_nodes, tiny_models_dir, caplog):
    kind, sample = hunyuan_with_padded_text(comfy_inprocess, chipmunk_pack_nodes, tiny_models_dir)
    stock = sample(kind.model)
    assert torch.equal(sample(kind.accelerate(preset=cm.CUSTOM, **cm.DENSE)), stock)
    with caplog.at_level(logging.INFO):
        fast = sample(kind.accelerate())
    report = cm.reports(caplog)[-1]
    assert cm.step_counts(report)["sparse"] > 0 and "attention -" not in report, report
    assert "not key padding" not in report
    assert 0 < _relative(fast, stock) < 0.2


# --- WAN2.2: two experts in one workflow ---------------------------------------------------------
def test_wan22_high_and_low_noise_models_in_one_workflow(comfy_inprocess, chipmunk_pack_nodes, tiny_models_dir,
                                                        caplog):
    """KSamplerAdvanced runs the high-noise expert for the first half and the low-noise expert for
    the rest, the node on both: each run has its own state; the second half rebuilds its caches
    with one dense step, not the whole warm-up; no state is left behind."""
    if "wan22_t2v_a14b_low" not in comfy_inprocess.tiny_models.available_kinds(comfy_inprocess.version):
        pytest.skip("WAN2.2 does not exist in this ComfyUI")
    high = _kind(comfy_inprocess, chipmunk_pack_nodes, tiny_models_dir, "wan22_t2v_a14b_high")
    low = _kind(comfy_inprocess, chipmunk_pack_nodes, tiny_models_dir, "wan22_t2v_a14b_low")
    positive, negative, latent = high.inputs(high.sizes[0])
    advanced = comfy_inprocess.nodes.KSamplerAdvanced()
    steps = 12

    def two_experts(high_model, low_model):
        (half,) = advanced.sample(high_model, "enable", 3, steps, 3.5, "euler", "simple", positive, negative, latent,
                                  0, steps // 2, "enable")
        (done,) = advanced.sample(low_model, "disable", 3, steps, 3.5, "euler", "simple", positive, negative, half,
                                  steps // 2, steps, "disable")
        return done["samples"]

    stock = two_experts(high.model, low.model)
    fast_high, fast_low = high.accelerate(), low.accelerate()
    with caplog.at_level(logging.INFO):
        fast = two_experts(fast_high, fast_low)
    assert torch.isfinite(fast).all() and 0 < _relative(fast, stock) < 0.2
    first, second = cm.reports(caplog)[-2:]
    assert cm.step_counts(first)["dense"] == 2 and cm.step_counts(second)["dense"] == 1, (first, second)
    for model in (fast_high, fast_low):
        _assert_no_run_state(model)


# --- interrupts ----------------------------------------------------------------------------------
def test_an_interrupted_run_releases_its_state(flux, caplog):
    """An interrupt (or any error) mid-sampling ends the run cleanly; the next run is unaffected."""
    import comfy.model_management
    import comfy.patcher_extension

    size = flux.sizes[0]
    patched = flux.accelerate(step_cache="fixed")
    expected = flux.sample(patched, size, steps=12)
    interrupted = patched.clone()
    calls = []

    def interrupt_after_five_calls(executor, *args, **kwargs):
        calls.append(None)
        if len(calls) > 5:  # past the dense warm-up: sparse caches and a step-cache residual exist
            raise comfy.model_management.InterruptProcessingException()
        return executor(*args, **kwargs)

    interrupted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test-interrupt",
                                     interrupt_after_five_calls)
    with caplog.at_level(logging.INFO), pytest.raises(comfy.model_management.InterruptProcessingException):
        flux.sample(interrupted, size, steps=12)
    assert cm.reports(caplog), "the run report is written in a finally"
    _assert_no_run_state(patched)
    assert torch.equal(flux.sample(patched, size, steps=12), expected)


def _assert_no_run_state(model):
    """Nothing of a sampling run stays on the patched model (runs keep their state in their own
    cloned options)."""
    options = model.model_options["transformer_options"]
    assert "chipmunk_run" not in options and options["chipmunk"].calls() == []


def test_a_nested_sampling_gets_its_own_run(flux, caplog):
    """Sampling the same patched model inside a sampling run (here from the outer run's step
    callback) is a run of its own: its picture is that of a sampling on its own, and the outer
    run's picture is unchanged by it."""
    import comfy.sample

    size = flux.sizes[0]
    patched = flux.accelerate()
    positive, negative, latent = flux.inputs(size)
    noise = comfy.sample.prepare_noise(latent["samples"], 3)

    def sample(callback=None):
        return comfy.sample.sample(patched, noise, 12, 1.0, "euler", "simple", positive, negative,
                                   latent["samples"], seed=3, disable_pbar=True, callback=callback)

    alone, outer_alone = flux.sample(patched, size, seed=1), sample()
    nested = []

    def callback(step, x0, x, total):
        if step == 4:
            nested.append(flux.sample(patched, size, seed=1))
            # (stock ComfyUI's cleanup of the inner sampling unsets the shared model's patcher:
            # a sampler that nests must put it back, as here)
            patched.model.current_patcher = patched

    with caplog.at_level(logging.INFO):
        outer = sample(callback)
    assert len(nested) == 1 and torch.equal(nested[0], alone)
    assert torch.equal(outer, outer_alone)
    assert len(cm.reports(caplog)) == 2
    _assert_no_run_state(patched)


# --- stacking with other nodes -------------------------------------------------------------------
def test_another_attention_override_gets_every_call_chipmunk_does_not_serve(flux, caplog):
    """A node that installs ComfyUI's attention override (core's sparse attention, an attention
    backend node) keeps it: Chipmunk serves the self-attention of its sparse layers first and hands
    every other call to it, and says so once."""
    served = []

    def other_override(func, *args, **kwargs):
        served.append((kwargs.get("transformer_options") or {}).get("block_index"))
        return func(*args, **kwargs)

    other = flux.model.clone()
    other.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = other_override
    size = flux.sizes[0]
    stock_with_other = flux.sample(other, size)
    calls_alone = len(served)
    served.clear()
    with caplog.at_level(logging.INFO):
        out = flux.sample(flux.accelerate(other), size)
    assert torch.isfinite(out).all() and 0 < _relative(out, stock_with_other) < 0.2
    assert 0 < len(served) < calls_alone, "the other override gets the calls Chipmunk does not serve"
    report = cm.reports(caplog)[-1]
    assert "another attention override is installed" in report, report
    # With both sparsities at 0 Chipmunk serves nothing: the other override sees every call again.
    served.clear()
    assert torch.equal(flux.sample(flux.accelerate(other, preset=cm.CUSTOM, **cm.DENSE), size), stock_with_other)
    assert len(served) == calls_alone


@pytest.mark.comfyui_versions(since=(0, 19))  # NAG is not in v0.3.64
def test_nag_runs_with_chipmunk(comfy_inprocess, flux, caplog):
    """Core's NAG patches the attention output: two-stream blocks keep running Chipmunk's MLP; single
    blocks run ComfyUI's own code with Chipmunk attention, and the run says so."""
    try:
        nag = importlib.import_module("comfy_extras.nodes_nag").NAGuidance
    except ImportError:
        pytest.skip("this ComfyUI has no NAG node")
    (guided,) = comfy_inprocess.run_node(nag, model=flux.model, nag_scale=3.0, nag_alpha=0.25, nag_tau=2.5)
    size = flux.sizes[0]
    stock = flux.sample(guided, size, cfg=3.5)
    with caplog.at_level(logging.INFO):
        out = flux.sample(flux.accelerate(guided), size, cfg=3.5)
    assert torch.isfinite(out).all() and 0 < _relative(out, stock) < 0.2
    assert "attention patches (NAG, KV caches) are present" in cm.reports(caplog)[-1]
    assert torch.equal(flux.sample(flux.accelerate(guided, preset=cm.CUSTOM, **cm.DENSE), size, cfg=3.5), stock)


# --- torch.compile -------------------------------------------------------------------------------
def test_torch_compile_model_after_the_node(comfy_inprocess, chipmunk_pack_nodes):
    """ComfyUI's TorchCompileModel after the node: several prompts in a row (new seeds, another
    resolution) run and match the uncompiled node within compile's tolerance."""
    compile_node = importlib.import_module("comfy_extras.nodes_torch_compile").TorchCompileModel
    kind = narrow_flux(comfy_inprocess, chipmunk_pack_nodes, depth=1, depth_single_blocks=1)
    patched = kind.accelerate(preset=cm.CUSTOM, first_dense_layers=0)
    (compiled,) = comfy_inprocess.run_node(compile_node, model=patched, backend="inductor")
    for seed, size in ((1, (128, 160, 1)), (2, (128, 160, 1)), (3, (160, 96, 1))):
        expected = kind.sample(patched, size, seed=seed, steps=4)
        got = kind.sample(compiled, size, seed=seed, steps=4)
        assert torch.isfinite(got).all()
        assert _relative(got, expected) < 1e-4, (seed, size)


def test_calls_from_multigpu_worker_threads_run_stock_and_say_so(flux, caplog):
    """Newer ComfyUI (autumn 2026) can split conditionings over GPUs in threads, marking their calls
    with ``multigpu_thread_device``: those calls run stock (bit for bit), and the report says why."""
    import comfy.patcher_extension

    size = flux.sizes[0]
    stock = flux.sample(flux.model, size)
    patched = flux.accelerate().clone()

    def as_a_multigpu_worker(executor, *args, **kwargs):
        options = args[-1] if args and isinstance(args[-1], dict) else kwargs["transformer_options"]
        options["multigpu_thread_device"] = torch.device("cpu")
        return executor(*args, **kwargs)

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "multigpu", as_a_multigpu_worker)
    with caplog.at_level(logging.INFO):
        out = flux.sample(patched, size)
    assert torch.equal(out, stock)
    assert "MultiGPU split" in cm.reports(caplog)[-1]


def test_fp8_caches_stay_within_their_bound_of_model_precision_caches(wan, flux, caplog):
    """cache_precision fp8: attention delta caches in float8_e4m3fn with a scale per row (on the CPU
    through the PyTorch reference). The picture stays within 2% (relative) of the one with caches in
    the model's precision, and the report says which precision ran (their size: tests/core)."""
    for kind in (wan, flux):
        size = kind.sizes[1]
        settings = dict(preset=cm.CUSTOM, attention_sparsity=0.8, mlp_sparsity=0.7, first_dense_layers=0)
        with caplog.at_level(logging.INFO):
            model_precision = kind.sample(kind.accelerate(**settings), size, cfg=3.5)
            fp8 = kind.sample(kind.accelerate(**settings, cache_precision="fp8"), size, cfg=3.5)
        plain_report, fp8_report = cm.reports(caplog)[-2:]
        stock = kind.sample(kind.model, size, cfg=3.5)
        gap, sparse_gap = _relative(fp8, model_precision), _relative(model_precision, stock)
        print(f"{kind.name}: fp8 caches vs model-precision caches {gap:.1e} (sparse vs stock {sparse_gap:.1e})")
        assert 0 < gap < 0.02
        assert "fp8 caches" in fp8_report and "fp8" not in plain_report
