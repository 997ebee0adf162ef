"""The toy checkpoints load through ComfyUI v0.19.3's stock loaders and mean there what training meant."""
from __future__ import annotations

import pytest
import torch

from chipmunk_pack.lab import networks, tae, vocab

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def registered(toy_models):
    """ComfyUI's model folders, with the toy models' folder first."""
    import folder_paths

    for kind in ("diffusion_models", "vae_approx"):
        folder_paths.add_model_folder_path(kind, str(toy_models / kind), is_default=True)
    return folder_paths


def _load(registered, family):
    import comfy.sd

    return comfy.sd.load_diffusion_model(registered.get_full_path_or_raise(
        "diffusion_models", networks.CHECKPOINT_NAMES[family]))


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_load_diffusion_model_detects_the_toy_architecture(registered, family):
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.wan.model import WanModel

    patcher = _load(registered, family)
    detected = patcher.model.model_config.unet_config
    expected = networks.FLUX_UNET_CONFIG if family == "flux" else networks.WAN_UNET_CONFIG
    for key, value in expected.items():
        assert detected[key] == value or tuple(detected[key]) == tuple(value), key
    assert isinstance(patcher.model.diffusion_model, Flux if family == "flux" else WanModel)
    import nodes

    assert networks.CHECKPOINT_NAMES[family] in nodes.UNETLoader.INPUT_TYPES()["required"]["unet_name"][0]


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_comfyui_denoises_with_the_training_convention(registered, family):
    """ComfyUI's apply_model (sigma -> timestep, CONST denoising) equals x - sigma * v as trained."""
    patcher = _load(registered, family)
    model = patcher.model
    context, pooled, _ = vocab.encode("a large cat at the middle center on a blue background", family)
    context = torch.from_numpy(context)[None]
    shape = (1, 16, 8, 8) if family == "flux" else (1, 16, 2, 4, 4)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.6])
    dtype = model.get_dtype()
    with torch.no_grad():
        kwargs = {}
        if family == "flux":
            kwargs = {"y": torch.from_numpy(pooled)[None], "guidance": torch.tensor([3.5])}
        denoised = model.apply_model(x, sigma, c_crossattn=context, **kwargs)
        v = networks.predict_v(model.diffusion_model, family, x.to(dtype), sigma, context.to(dtype),
                               kwargs["y"].to(dtype) if family == "flux" else None, kwargs.get("guidance"))
    assert torch.allclose(denoised, x - sigma * v.float(), atol=2e-2, rtol=2e-2)


def test_load_vae_offers_and_loads_taef1(registered, toy_models):
    import comfy.latent_formats
    import nodes
    from safetensors.torch import load_file

    assert "taef1" in nodes.VAELoader.vae_list(nodes.VAELoader)
    (vae,) = nodes.VAELoader().load_vae("taef1")
    ours = tae.ImageTAE()
    ours.encoder.load_state_dict({k: v.float() for k, v in load_file(toy_models / "vae_approx" / tae.IMAGE_TAE_FILES[0]).items()})
    ours.decoder.load_state_dict({k: v.float() for k, v in load_file(toy_models / "vae_approx" / tae.IMAGE_TAE_FILES[1]).items()})
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))  # FLUX model space
    latent = comfy.latent_formats.Flux().process_out(x)  # what KSampler returns
    with torch.no_grad():
        theirs = vae.decode(latent)  # [1, 64, 64, 3]
        expected = ours.decode(x).clamp(0, 1).permute(0, 2, 3, 1)
    assert theirs.shape == (1, 64, 64, 3)
    assert torch.allclose(theirs.float(), expected, atol=3e-2)


def test_load_vae_offers_and_loads_lighttaew2_1(registered, toy_models):
    import comfy.latent_formats
    import nodes
    from safetensors.torch import load_file

    assert tae.VIDEO_TAE_FILE in nodes.VAELoader.vae_list(nodes.VAELoader)
    (vae,) = nodes.VAELoader().load_vae(tae.VIDEO_TAE_FILE)
    assert vae.first_stage_model.latent_format is None  # lighttaew2_1, not taehv's scaled format
    ours = tae.VideoTAE()
    ours.net.load_state_dict({k: v.float() for k, v in load_file(toy_models / "vae_approx" / tae.VIDEO_TAE_FILE).items()})
    x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(2))  # WAN model space
    latent = comfy.latent_formats.Wan21().process_out(x)
    with torch.no_grad():
        theirs = vae.decode(latent)  # [1, 5, 32, 32, 3]; ComfyUI decodes frame by frame
        expected = ours.decode(ours.from_model_space(x)).clamp(0, 1)  # training decodes all frames at once
    assert theirs.shape == (1, 5, 32, 32, 3)
    difference = (theirs.float() - expected.permute(0, 2, 3, 4, 1)).abs()
    print(f"lighttaew2_1 in ComfyUI vs training: mean {difference.mean():.2e}, max {difference.max():.2e}")
    # ComfyUI decodes in the file's bf16 and frame by frame: rounding, not a different decoder.
    assert difference.mean() < 1e-2 and difference.max() < 0.25
