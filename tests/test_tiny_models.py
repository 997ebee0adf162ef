"""Tiny real models of every kind (tools/tiny_models.py) in the ComfyUI under test.

Each kind this ComfyUI has (kinds newer than the checkout are not collected) is written as a
checkpoint, read back by ComfyUI's detection, loaded (through the stock loader, or in process
where detection cannot read it), given its inputs by the stock nodes a workflow uses, and sampled
for 2 steps with the real KSampler. The dev nodes' stand-ins for the encoders are checked here
too.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from harness import paths
from harness.paths import dev_nodes_module, tiny_models_module

tiny = tiny_models_module()
dev = dev_nodes_module()
_VERSION = tiny.checkout_version(paths.comfyui_dir())  # None without a checkout: tests skip
KIND_NAMES = [name for name, kind in tiny.KINDS.items()
              if _VERSION is None or kind.available(_VERSION)]
V0_19_3_ONLY = {"flux2_dev", "flux2_klein", "longcat_image", "ovis_image", "hunyuan_video15"}

comfyui = pytest.mark.comfyui


# --- the registry --------------------------------------------------------------------------
def test_registry_refers_to_what_exists():
    for kind in tiny.KINDS.values():
        assert kind.conditioning in dev.TEXT_ENCODERS, kind.name
        assert kind.vae is None or kind.vae in dev.VAES, kind.name
        assert kind.clip_vision is None or kind.clip_vision in dev.CLIP_VISION_ENCODERS, kind.name
        assert kind.image_node is None or kind.vae is not None, f"{kind.name}: images need a VAE"
        for build in kind.builds.values():
            assert build.stock_loader or build.why_not, f"{kind.name}: say why not stock"
    files = [tiny.CHECKPOINT_NAMES[name] for name in tiny.KINDS]
    assert len(set(files)) == len(files)


def test_kinds_per_version():
    assert tiny.available_kinds(tiny.V0_19_3) == list(tiny.KINDS)
    assert set(tiny.KINDS) - set(tiny.available_kinds(tiny.V0_3_64)) == V0_19_3_ONLY
    assert tiny.available_kinds((0, 3, 0)) == []


def test_older_names_still_work():
    assert tiny.kind_named("flux") is tiny.KINDS["flux1_dev"]
    assert tiny.kind_named("wan_i2v") is tiny.KINDS["wan21_i2v"]
    assert set(tiny.FAMILY_CONFIGS) == {"flux", "hunyuan_video", "wan_t2v", "wan_i2v"}
    assert tiny.CHECKPOINT_NAMES["flux"] == tiny.CHECKPOINT_NAMES["flux1_dev"] \
        == "chipmunk-tiny-flux.safetensors"


# --- every kind in the ComfyUI under test ----------------------------------------------------
@comfyui
@pytest.mark.parametrize("name", KIND_NAMES)
@pytest.mark.filterwarnings("ignore:Using torch.cross without specifying the dim")  # ComfyUI's
def test_kind_is_detected_loaded_and_samples(comfy_inprocess, tiny_models_dir, name):
    kind = tiny.KINDS[name]
    build = kind.build(comfy_inprocess.version)
    path = tiny.write_checkpoint(name, tiny_models_dir)

    differences = tiny.config_differences(tiny.detected_config(path), build.unet_config)
    if build.stock_loader:
        assert differences == {}
    else:  # keeps Build.why_not true: a ComfyUI that reads these back can load them stock
        assert differences, f"{name}: detection now reads the config back; make it stock"
    model = tiny.verify_checkpoint(path, name)  # model config, model and class are the kind's

    positive, negative, latent = comfy_inprocess.sampling_inputs(name, seed=1)
    assert latent["samples"].shape[1] == model.model.latent_format.latent_channels
    recording, inputs = with_recorded_inputs(model)
    out = comfy_inprocess.ksampler(recording, positive, negative, latent, seed=2, steps=2, cfg=2.0)
    assert out.shape == latent["samples"].shape
    assert torch.isfinite(out).all(), "latent has NaN or Inf"
    assert out.float().std() > 0, "latent is constant"
    missing = [key for key in kind.model_inputs if inputs.get(key) is None]
    assert not missing, f"the conditioning did not reach the model as {missing}"


def with_recorded_inputs(model):
    """A clone of ``model`` that records the named inputs of its diffusion model's forward."""
    import comfy.patcher_extension

    inputs = {}

    def record(executor, *args, **kwargs):
        bound = inspect.signature(executor.class_obj.forward).bind(*args, **kwargs)
        extra = {k: v for k, v in bound.arguments.items()
                 if bound.signature.parameters[k].kind is inspect.Parameter.VAR_KEYWORD}
        inputs.update({k: v for k, v in bound.arguments.items() if k not in extra})
        for more in extra.values():
            inputs.update(more)
        return executor(*args, **kwargs)

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                               "tiny-models-test", record)
    return clone, inputs


@comfyui
@pytest.mark.parametrize("name", ["wan21_t2v", "chroma"])  # one stock, one in-process kind
def test_same_kind_and_seed_give_identical_files(comfy_inprocess, tmp_path, name):
    first = tiny.write_checkpoint(name, tmp_path / "first", seed=3)
    again = tiny.write_checkpoint(name, tmp_path / "again", seed=3)
    other_seed = tiny.write_checkpoint(name, tmp_path / "other", seed=4)
    assert first.read_bytes() == again.read_bytes()
    assert first.read_bytes() != other_seed.read_bytes()

    written = first.stat().st_mtime_ns
    assert tiny.write_checkpoint(name, tmp_path / "first", seed=3) == first
    assert first.stat().st_mtime_ns == written, "an up-to-date checkpoint was rewritten"


@comfyui
def test_kinds_sharing_a_config_have_their_own_weights(comfy_inprocess):
    high, low = "wan22_t2v_a14b_high", "wan22_t2v_a14b_low"
    version = comfy_inprocess.version
    assert tiny.KINDS[high].unet_config(version) == tiny.KINDS[low].unet_config(version)
    high_weights, low_weights = tiny.random_state_dict(high), tiny.random_state_dict(low)
    assert high_weights.keys() == low_weights.keys()
    assert not torch.equal(high_weights["blocks.0.ffn.0.weight"],
                           low_weights["blocks.0.ffn.0.weight"])


# --- the encoder stand-ins -----------------------------------------------------------------
@pytest.mark.parametrize("family", list(dev.TEXT_ENCODERS))
def test_random_conditioning_has_the_encoders_shapes(family):
    encoder = dev.TEXT_ENCODERS[family]
    [[context, options]] = dev.random_conditioning(family, seed=5, tokens=7)
    assert context.shape == (1, 7, encoder.context_width)
    pooled = options["pooled_output"]
    assert (pooled is None) == (encoder.pooled_width is None)
    assert pooled is None or pooled.shape == (1, encoder.pooled_width)
    assert ("guidance" in options) == (encoder.guidance is not None)
    for key, width in encoder.extra_widths:
        assert options[key].shape[-1] == width
    [[again, _]] = dev.random_conditioning(family, seed=5, tokens=7)
    assert torch.equal(context, again)


@pytest.mark.parametrize("space", list(dev.VAES))
def test_random_vae_encodes_to_the_latent_shape(space):
    channels, ratio, temporal = dev.VAES[space]
    vae = dev.RandomVAE(space, seed=1)
    pixels = torch.rand(9, 64, 48, 3)
    latent = vae.encode(pixels)
    if temporal is None:
        assert latent.shape == (9, channels, 64 // ratio, 48 // ratio)
    else:
        assert latent.shape == (1, channels, (9 - 1) // temporal + 1, 64 // ratio, 48 // ratio)
    assert torch.equal(latent, dev.RandomVAE(space, seed=1).encode(pixels))
    assert not torch.equal(latent, vae.encode(1.0 - pixels)), "the image must matter"


@comfyui
@pytest.mark.parametrize("encoder", list(dev.CLIP_VISION_ENCODERS))
def test_random_clip_vision_output_has_the_encoders_shapes(comfy_inprocess, encoder):
    tokens, width, embed_width = dev.CLIP_VISION_ENCODERS[encoder]
    output = dev.random_clip_vision_output(encoder, seed=2)
    assert output.last_hidden_state.shape == output.penultimate_hidden_states.shape \
        == (1, tokens, width)
    assert output["image_embeds"].shape == (1, embed_width)
