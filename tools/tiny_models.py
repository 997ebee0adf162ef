"""Tiny, randomly initialised diffusion models of every FLUX, HunyuanVideo and WAN kind, built
from ComfyUI's own classes.

No real weights can be used in tests, so this module builds the real model classes of a ComfyUI
checkout with small configurations and seeded random weights (norm scales 1, biases 0,
everything else N(0, 0.02)), through the loader's own path: ``unet_config`` ->
``comfy.model_detection.model_config_from_unet_config`` -> ``get_model``.

``KINDS`` is the registry: one ``Kind`` per model kind, keyed by a stable name. Each kind has,
per ComfyUI version, the ``unet_config`` it is built from. Where ComfyUI's detection can read
that config back from the weights (``Build.stock_loader``), the config is exactly what
``comfy.model_detection.detect_unet_config`` returns, the checkpoint loads through the stock
"Load Diffusion Model" node (``comfy.sd.load_diffusion_model``), and ``verify_checkpoint``
checks the round trip. Where it cannot (detection hard-codes a width), ``load_model`` builds the
same model config class in process from the same file (``Build.why_not`` says why).

Kinds ("stock": loads through the stock loader; "in-proc": built in process; "-": not there):

==========================  ===============================================  ========  ========
kind                        what it is                                       v0.19.3   v0.3.64
==========================  ===============================================  ========  ========
flux1_dev                   FLUX.1 dev: guidance embedding, T5 + CLIP-L      stock     stock (*)
flux1_schnell               FLUX.1 schnell: no guidance embedding            stock     in-proc
flux1_kontext               FLUX.1 Kontext: detected as dev; reference       stock     in-proc
                            latents become extra image tokens
flux1_fill                  FLUX.1 Fill: 96 = 16 + 16 + 64 input channels    stock     in-proc
                            (noise, masked image, 8x8 mask), 2x2 packed
flux2_dev                   FLUX.2 dev: global modulation, SiLU-gated MLP,   stock     -
                            no biases, 128-channel latents, patch 1
flux2_klein                 FLUX.2 Klein 4B: no guidance, Qwen3 text         stock     -
longcat_image               LongCat-Image: FLUX.1 blocks, Qwen2.5-VL text    stock     -
ovis_image                  Ovis-Image: FLUX.1 blocks with YakMLP, text norm stock     -
chroma                      Chroma: sibling class, one approximator makes    in-proc   in-proc
                            every block's modulation
chroma_radiance             Chroma Radiance: pixel space, NeRF-style head    in-proc   in-proc
hunyuan_video               HunyuanVideo t2v                                 stock     stock
hunyuan_video_i2v           HunyuanVideo I2V "v1 (concat)": 33 channels      stock     stock
hunyuan_video_i2v_skyreels  SkyReels V1 I2V: 32 channels                     stock     stock
hunyuan_video15             HunyuanVideo 1.5: 32-channel 16x latents, byT5   stock     -
                            and SigLIP tokens with the text
wan21_t2v                   WAN2.1 t2v                                       stock     stock
wan21_i2v                   WAN2.1 i2v: 36 channels, CLIP-H features         stock     stock
wan22_t2v_a14b_high         WAN2.2 A14B t2v high-noise expert                stock     stock
wan22_t2v_a14b_low          WAN2.2 A14B t2v low-noise expert (own weights)   stock     stock
wan22_ti2v_5b               WAN2.2 TI2V 5B: 48-channel 16x latents           stock     stock
wan21_vace                  WAN2.1 VACE (VaceWanModel)                       stock     stock
wan21_camera                WAN2.1 Fun camera control (CameraWanModel)       stock     stock
wan22_s2v                   WAN2.2 S2V (WanModel_S2V)                        stock     stock
==========================  ===============================================  ========  ========

Sizes: width 256 (2 heads of 128) everywhere; FLUX-like kinds have 2 double + 2 single blocks
(HunyuanVideo 1.5: 2 double, no single, like the real one), WAN kinds 4 layers, 2 extra blocks
where a kind has them (VACE); text and vision widths are the real encoders'. A sampling step at
the tests' sizes (64x64, 5 frames, 32 text tokens, cfg 2) takes 0.04-0.2 CPU seconds on one
thread; FLUX.2 (text padded to 512 tokens) and HunyuanVideo 1.5 (729 SigLIP tokens) about 0.6.

(*) ComfyUI v0.3.64 detection hard-codes FLUX's width (3072, 24 heads) and text width (4096),
so its only stock-loadable FLUX is full width: ``flux1_dev`` there is 3072 wide with 1 double
and 1 single block (545M parameters, about 2 CPU seconds a step); every other FLUX kind is built
narrow in process, and ``narrow_flux_patcher`` gives a narrow FLUX.1 dev in either version.
Chroma's detection hard-codes the approximator (5120 wide, 5 layers, output 3072) in both
versions, so Chroma kinds are always built in process.

What each kind needs besides text (which stock node a workflow uses) is in ``Kind.image_node``
and ``Kind.notes``; the tests build those inputs with the stock nodes in
tests/harness/inprocess.py (``InProcessComfy.sampling_inputs``), with the dev nodes' random
text, CLIP-vision and VAE stand-ins.

ComfyUI must be importable before the model functions are called: ``import_comfy(comfyui_dir)``
puts the checkout on ``sys.path`` and selects the CPU unless ``comfy.model_management`` was
already imported by the caller.

Command line (writes missing checkpoints, then optionally loads each)::

    python tools/tiny_models.py --comfyui DIR --out DIR/models/diffusion_models [--kind K ...]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Bump when the weights a given (kind, seed) produces change, so that stale files are rebuilt.
FORMAT_VERSION = "2"
DEFAULT_SEED = 0

V0_3_64 = (0, 3, 64)
V0_19_3 = (0, 19, 3)


@dataclass(frozen=True)
class Build:
    """How a kind is built in one ComfyUI version."""
    unet_config: dict
    stock_loader: bool = True  # detection reads ``unet_config`` back from the weights
    why_not: str = ""  # why the stock loader cannot load it, when it cannot


@dataclass(frozen=True)
class Kind:
    name: str
    title: str
    family: str  # "flux", "chroma", "hunyuan_video" or "wan"
    model_class: tuple[str, str]  # (module, class) of the diffusion model ComfyUI builds
    model_base: str  # comfy.model_base class
    supported_model: str  # comfy.supported_models class that detection picks
    builds: dict  # first ComfyUI version (tuple) -> Build
    conditioning: str  # text encoder, a key of tools/dev_nodes TEXT_ENCODERS
    latent: str  # stock node that makes the empty latent
    image_node: str | None = None  # stock node that adds the image / reference inputs
    vae: str | None = None  # latent space of the image inputs, a key of dev_nodes VAES
    clip_vision: str | None = None  # vision encoder, a key of dev_nodes CLIP_VISION_ENCODERS
    # Inputs of the diffusion model's forward, besides x, timestep and context, that those
    # nodes' conditioning must deliver (not None).
    model_inputs: tuple = ()
    checkpoint: str = ""
    notes: str = ""

    @property
    def min_version(self) -> tuple:
        return min(self.builds)

    def build(self, version: tuple) -> Build | None:
        """The build for ComfyUI ``version``, or None where this kind does not exist."""
        known = [v for v in self.builds if v <= tuple(version)]
        return self.builds[max(known)] if known else None

    def unet_config(self, version: tuple) -> dict | None:
        build = self.build(version)
        return None if build is None else build.unet_config

    def available(self, version: tuple) -> bool:
        return self.build(version) is not None


# --- configs: exactly what detection reads back (stock builds), or what the model is built from
_V3_FLUX_WIDTH = ("ComfyUI v0.3.64 detection hard-codes FLUX's width 3072, 24 heads and text "
                  "width 4096")
_CHROMA_APPROXIMATOR = ("detection hard-codes Chroma's approximator (hidden 5120, 5 layers, output "
                        "3072 = the model width), about 280M parameters on its own")


def _flux1(version: tuple, **changes) -> dict:
    config = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16,
              "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 256, "mlp_ratio": 4.0,
              "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [16, 56, 56],
              "theta": 10000, "qkv_bias": True, "guidance_embed": True}
    if version >= V0_19_3:
        config.update(txt_ids_dims=[], yak_mlp=False, txt_norm=False)
    config.update(changes)
    return config


def _flux1_builds(**changes) -> dict:
    """Stock on v0.19.3; narrow in process on v0.3.64."""
    return {V0_3_64: Build(_flux1(V0_3_64, **changes), False, _V3_FLUX_WIDTH),
            V0_19_3: Build(_flux1(V0_19_3, **changes))}


def _flux2(**changes) -> dict:
    config = {"image_model": "flux2", "in_channels": 128, "patch_size": 1, "out_channels": 128,
              "vec_in_dim": None, "context_in_dim": 15360, "hidden_size": 256, "mlp_ratio": 3.0,
              "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [32, 32, 32, 32],
              "theta": 2000, "qkv_bias": False, "guidance_embed": True, "global_modulation": True,
              "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index",
              "ref_index_scale": 10.0, "txt_ids_dims": [3], "yak_mlp": False, "txt_norm": False}
    config.update(changes)
    return config


def _chroma(version: tuple, **changes) -> dict:
    config = {"image_model": "chroma", "in_channels": 64, "patch_size": 2, "out_channels": 64,
              "context_in_dim": 4096, "hidden_size": 256, "mlp_ratio": 4.0, "num_heads": 2,
              "depth": 2, "depth_single_blocks": 2, "axes_dim": [16, 56, 56], "theta": 10000,
              "qkv_bias": True, "in_dim": 64, "out_dim": 256, "hidden_dim": 256, "n_layers": 2}
    if version >= V0_19_3:
        config.update(txt_ids_dims=[], vec_in_dim=None)
    config.update(changes)
    return config


def _chroma_radiance(version: tuple) -> dict:
    config = _chroma(version, image_model="chroma_radiance", in_channels=3, out_channels=3,
                     patch_size=16, nerf_hidden_size=32, nerf_mlp_ratio=4, nerf_depth=2,
                     nerf_max_freqs=8, nerf_tile_size=0, nerf_final_head_type="conv",
                     nerf_embedder_dtype=torch.float32)
    if version >= V0_19_3:
        config.update(use_x0=False)
    return config


def _hunyuan(version: tuple, **changes) -> dict:
    config = {"image_model": "hunyuan_video", "in_channels": 16, "patch_size": [1, 2, 2],
              "out_channels": 16, "vec_in_dim": 768, "axes_dim": [16, 56, 56], "meanflow": False,
              "context_in_dim": 4096, "hidden_size": 256, "mlp_ratio": 4.0, "num_heads": 2,
              "depth": 2, "depth_single_blocks": 2, "theta": 256, "qkv_bias": True,
              "byt5": False, "guidance_embed": True}
    if version >= V0_19_3:
        config.update(use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False)
    config.update(changes)
    return config


def _hunyuan_builds(**changes) -> dict:
    return {v: Build(_hunyuan(v, **changes)) for v in (V0_3_64, V0_19_3)}


def _wan(**changes) -> dict:
    config = {"image_model": "wan2.1", "dim": 256, "out_dim": 16, "num_heads": 2, "ffn_dim": 1024,
              "num_layers": 4, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1),
              "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16,
              "model_type": "t2v"}
    config.update(changes)
    return config


def _wan_builds(**changes) -> dict:
    # WAN detection is the same in both versions.
    return {V0_3_64: Build(_wan(**changes))}


_FLUX = ("comfy.ldm.flux.model", "Flux")
_CHROMA = ("comfy.ldm.chroma.model", "Chroma")
_HUNYUAN = ("comfy.ldm.hunyuan_video.model", "HunyuanVideo")
_WAN = ("comfy.ldm.wan.model", "WanModel")

_KIND_LIST = [
    Kind("flux1_dev", "FLUX.1 dev", "flux", _FLUX, "Flux", "Flux",
         {V0_3_64: Build(_flux1(V0_3_64, hidden_size=3072, num_heads=24, depth=1,
                                depth_single_blocks=1)),
          V0_19_3: Build(_flux1(V0_19_3))},
         "flux", "EmptySD3LatentImage", model_inputs=("y", "guidance"),
         checkpoint="chipmunk-tiny-flux.safetensors",
         notes="On v0.3.64 full width (3072, 1 double + 1 single block): the narrowest FLUX its "
               "detection accepts. narrow_flux_patcher() gives a narrow one in process."),
    Kind("flux1_schnell", "FLUX.1 schnell", "flux", _FLUX, "Flux", "FluxSchnell",
         _flux1_builds(guidance_embed=False), "flux", "EmptySD3LatentImage",
         model_inputs=("y",),
         notes="No guidance_in; the guidance value in the conditioning is ignored."),
    Kind("flux1_kontext", "FLUX.1 Kontext", "flux", _FLUX, "Flux", "Flux",
         _flux1_builds(), "flux", "EmptySD3LatentImage", "ReferenceLatent", vae="flux",
         model_inputs=("y", "guidance", "ref_latents"),
         notes="Same weights layout and detection as dev. A workflow encodes the image (VAEEncode) "
               "and chains ReferenceLatent, which appends the latent to the conditioning's "
               "`reference_latents` list; model_base.Flux passes it on as `ref_latents` and the "
               "model appends its tokens after the image tokens (RoPE index 1, offset)."),
    Kind("flux1_fill", "FLUX.1 Fill", "flux", _FLUX, "Flux", "FluxInpaint",
         _flux1_builds(in_channels=96), "flux", "EmptySD3LatentImage",
         "InpaintModelConditioning", vae="flux",
         model_inputs=("y", "guidance"),
         notes="InpaintModelConditioning sets `concat_latent_image` (masked image) and "
               "`concat_mask`; model_base.Flux.concat_cond packs the mask 8x8 into 64 channels. "
               "Without them it concatenates zeros and a full mask."),
    Kind("flux2_dev", "FLUX.2 dev", "flux", _FLUX, "Flux2", "Flux2",
         {V0_19_3: Build(_flux2())}, "flux2", "EmptyFlux2LatentImage", vae="flux2",
         model_inputs=("guidance",),
         notes="Blocks have no img_mod/txt_mod: the model passes (img, txt) modulation tuples as "
               "`vec`; single blocks take a tuple too. model_base.Flux2 left-pads the text to "
               "512 tokens. Reference images (ReferenceLatent) use RoPE index scale 10."),
    Kind("flux2_klein", "FLUX.2 Klein 4B", "flux", _FLUX, "Flux2", "Flux2",
         {V0_19_3: Build(_flux2(guidance_embed=False, context_in_dim=7680))},
         "flux2_klein", "EmptyFlux2LatentImage", vae="flux2",
         notes="Klein 9B differs only in text width (Qwen3-8B: 12288)."),
    Kind("longcat_image", "LongCat-Image", "flux", _FLUX, "LongCatImage", "LongCatImage",
         {V0_19_3: Build(_flux1(V0_19_3, vec_in_dim=None, guidance_embed=False,
                                context_in_dim=3584, txt_ids_dims=[1, 2]))},
         "longcat", "EmptySD3LatentImage",
         notes="Detected by text width 3584 without a pooled input; image RoPE shifted past the "
               "text (model_base.LongCatImage sets rope_options)."),
    Kind("ovis_image", "Ovis-Image", "flux", _FLUX, "Flux", "FluxSchnell",
         {V0_19_3: Build(_flux1(V0_19_3, vec_in_dim=None, guidance_embed=False,
                                context_in_dim=2048, yak_mlp=True, txt_norm=True,
                                txt_ids_dims=[1, 2]))},
         "ovis", "EmptySD3LatentImage",
         notes="YakMLP: gate_proj/up_proj/down_proj (no Sequential), single blocks' linear1 "
               "carries 2 x MLP width. Assumed without guidance embedding (detection reads it)."),
    Kind("chroma", "Chroma", "chroma", _CHROMA, "Chroma", "Chroma",
         {v: Build(_chroma(v), False, _CHROMA_APPROXIMATOR) for v in (V0_3_64, V0_19_3)},
         "chroma", "EmptySD3LatentImage",
         model_inputs=("guidance",),
         notes="Built narrow with a small approximator (out_dim = width). No pooled input; "
               "guidance defaults to 0."),
    Kind("chroma_radiance", "Chroma Radiance", "chroma",
         ("comfy.ldm.chroma_radiance.model", "ChromaRadiance"), "ChromaRadiance",
         "ChromaRadiance",
         {v: Build(_chroma_radiance(v), False, _CHROMA_APPROXIMATOR)
          for v in (V0_3_64, V0_19_3)},
         "chroma", "EmptyChromaRadianceLatentImage",
         model_inputs=("guidance",),
         notes="Pixel space: the latent is the RGB image; 16x16 patches; NeRF head tiling off."),
    Kind("hunyuan_video", "HunyuanVideo t2v", "hunyuan_video", _HUNYUAN, "HunyuanVideo",
         "HunyuanVideo", _hunyuan_builds(), "hunyuan_video", "EmptyHunyuanLatentVideo",
         model_inputs=("y", "guidance"),
         checkpoint="chipmunk-tiny-hunyuan-video.safetensors",
         notes="The I2V 'v2 (replace)' model is detected as this kind; HunyuanImageToVideo then "
               "sets `guiding_frame_index` and a noise mask."),
    Kind("hunyuan_video_i2v", "HunyuanVideo I2V v1", "hunyuan_video", _HUNYUAN,
         "HunyuanVideoI2V", "HunyuanVideoI2V", _hunyuan_builds(in_channels=33), "hunyuan_video",
         "EmptyHunyuanLatentVideo", "HunyuanImageToVideo", vae="hunyuan_video",
         model_inputs=("y", "guidance"),
         notes="HunyuanImageToVideo 'v1 (concat)' sets `concat_latent_image` and `concat_mask` "
               "(concat keys concat_image + mask_inverted: 16 + 16 + 1 channels)."),
    Kind("hunyuan_video_i2v_skyreels", "SkyReels V1 I2V (HunyuanVideo)", "hunyuan_video",
         _HUNYUAN, "HunyuanVideoSkyreelsI2V", "HunyuanVideoSkyreelsI2V",
         _hunyuan_builds(in_channels=32), "hunyuan_video", "EmptyHunyuanLatentVideo",
         "HunyuanImageToVideo", vae="hunyuan_video",
         model_inputs=("y", "guidance"),
         notes="Concat key concat_image only (16 + 16 channels)."),
    Kind("hunyuan_video15", "HunyuanVideo 1.5", "hunyuan_video", _HUNYUAN, "HunyuanVideo15",
         "HunyuanVideo15",
         {V0_19_3: Build(_hunyuan(V0_19_3, in_channels=65, patch_size=[1, 1, 1],
                                  out_channels=32, vec_in_dim=None, context_in_dim=3584,
                                  depth_single_blocks=0, byt5=True, guidance_embed=False,
                                  use_cond_type_embedding=True, vision_in_dim=1152,
                                  meanflow_sum=True))},
         "hunyuan_video15", "EmptyHunyuanVideo15Latent", "HunyuanVideo15ImageToVideo",
         vae="hunyuan_video15", clip_vision="siglip",
         model_inputs=("txt_byt5", "clip_fea"),
         notes="Text first, then byT5 glyph tokens (`conditioning_byt5small` from the text "
               "encoder), then SigLIP vision tokens (`clip_vision_output.last_hidden_state`), all "
               "joined to the text side with a cond-type embedding. 65 = 32 + 32 + 1 input "
               "channels (concat image and mask; zeros without a start image)."),
    Kind("wan21_t2v", "WAN2.1 t2v", "wan", _WAN, "WAN21", "WAN21_T2V", _wan_builds(), "wan",
         "EmptyHunyuanLatentVideo", checkpoint="chipmunk-tiny-wan21-t2v.safetensors"),
    Kind("wan21_i2v", "WAN2.1 i2v", "wan", _WAN, "WAN21", "WAN21_I2V",
         _wan_builds(in_dim=36, model_type="i2v"), "wan", "EmptyHunyuanLatentVideo",
         "WanImageToVideo", vae="wan21", clip_vision="clip_vision_h",
         model_inputs=("clip_fea",),
         checkpoint="chipmunk-tiny-wan21-i2v.safetensors",
         notes="WanImageToVideo sets `concat_latent_image`, `concat_mask` and "
               "`clip_vision_output` (its penultimate hidden states become `clip_fea`, "
               "257 tokens put before the text in cross-attention)."),
    Kind("wan22_t2v_a14b_high", "WAN2.2 A14B t2v, high-noise expert", "wan", _WAN, "WAN21",
         "WAN21_T2V", _wan_builds(), "wan", "EmptyHunyuanLatentVideo",
         notes="Same architecture and detection as WAN2.1 t2v; a workflow samples the first "
               "steps with it (KSamplerAdvanced) and hands over to the low-noise expert."),
    Kind("wan22_t2v_a14b_low", "WAN2.2 A14B t2v, low-noise expert", "wan", _WAN, "WAN21",
         "WAN21_T2V", _wan_builds(), "wan", "EmptyHunyuanLatentVideo",
         notes="Same config as the high-noise expert, other weights."),
    Kind("wan22_ti2v_5b", "WAN2.2 TI2V 5B", "wan", _WAN, "WAN22", "WAN22_T2V",
         _wan_builds(in_dim=48, out_dim=48), "wan", "Wan22ImageToVideoLatent",
         "Wan22ImageToVideoLatent", vae="wan22",
         model_inputs=("denoise_mask",),
         notes="Wan22ImageToVideoLatent writes the encoded start image into the latent and a "
               "`noise_mask`; model_base.WAN22 turns the mask into per-token timesteps."),
    Kind("wan21_vace", "WAN2.1 VACE", "wan", ("comfy.ldm.wan.model", "VaceWanModel"),
         "WAN21_Vace", "WAN21_Vace", _wan_builds(model_type="vace", vace_in_dim=96,
                                                 vace_layers=2),
         "wan", "EmptyHunyuanLatentVideo", "WanVaceToVideo", vae="wan21",
         model_inputs=("vace_context", "vace_strength"),
         notes="WanVaceToVideo sets `vace_frames` (32 channels), `vace_mask` (64) and "
               "`vace_strength`; VACE blocks run beside blocks 0 and 2."),
    Kind("wan21_camera", "WAN2.1 Fun camera control", "wan",
         ("comfy.ldm.wan.model", "CameraWanModel"), "WAN21_Camera", "WAN21_Camera",
         _wan_builds(model_type="camera", in_dim=32), "wan", "EmptyHunyuanLatentVideo",
         "WanCameraImageToVideo", vae="wan21", clip_vision="clip_vision_h",
         model_inputs=("camera_conditions", "clip_fea"),
         notes="WanCameraEmbedding makes `camera_conditions` (Plucker rays, 24 channels at 8x); "
               "the adapter adds them to the patch embedding."),
    Kind("wan22_s2v", "WAN2.2 S2V", "wan", ("comfy.ldm.wan.model", "WanModel_S2V"), "WAN22_S2V",
         "WAN22_S2V", _wan_builds(model_type="s2v"), "wan", "EmptyHunyuanLatentVideo",
         notes="Audio injection layers and a frame packer; samples without audio or reference "
               "(WanSoundImageToVideo adds them in a workflow)."),
]
KINDS: dict[str, Kind] = {kind.name: kind for kind in _KIND_LIST}

# The first four checkpoints' names, still accepted wherever a kind name is.
ALIASES = {"flux": "flux1_dev", "hunyuan_video": "hunyuan_video", "wan_t2v": "wan21_t2v",
           "wan_i2v": "wan21_i2v"}
# Kept for callers that iterate the original four checkpoints (values: the kind names).
FAMILY_CONFIGS = ALIASES

CHECKPOINT_NAMES = {name: kind.checkpoint or f"chipmunk-tiny-{name.replace('_', '-')}.safetensors"
                    for name, kind in KINDS.items()}
CHECKPOINT_NAMES.update({alias: CHECKPOINT_NAMES[name] for alias, name in ALIASES.items()})


def kind_named(name: str) -> Kind:
    """The kind called ``name`` (or one of its older ``ALIASES``)."""
    return KINDS[ALIASES.get(name, name)]


def import_comfy(comfyui_dir: str | os.PathLike) -> None:
    """Make a ComfyUI checkout importable in this process, on the CPU.

    ``args.cpu`` only takes effect if it is set before ``comfy.model_management`` is imported.
    ``utils.extra_config`` has to be imported before ``nodes`` (ComfyUI's own start-up order).
    """
    comfyui_dir = str(Path(comfyui_dir).resolve())
    if comfyui_dir not in sys.path:
        sys.path.insert(0, comfyui_dir)
    from comfy.cli_args import args
    if "comfy.model_management" not in sys.modules:
        args.cpu = True
    import utils.extra_config  # noqa: F401


def comfy_version() -> tuple:
    """The version of the imported ComfyUI, e.g. (0, 19, 3)."""
    import comfyui_version

    return _parse_version(comfyui_version.__version__)


def checkout_version(comfyui_dir: str | os.PathLike) -> tuple | None:
    """The version of the ComfyUI checkout in ``comfyui_dir`` without importing it (or None)."""
    try:
        text = (Path(comfyui_dir) / "comfyui_version.py").read_text()
    except OSError:
        return None
    found = re.search(r"__version__\s*=\s*[\"']([^\"']+)[\"']", text)
    return _parse_version(found.group(1)) if found else None


def _parse_version(text: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def available_kinds(version: tuple | None = None) -> list[str]:
    """Names of the kinds the ComfyUI ``version`` (default: the imported one) has."""
    version = comfy_version() if version is None else version
    return [name for name, kind in KINDS.items() if kind.available(version)]


def _build_for(kind: Kind) -> Build:
    version = comfy_version()
    build = kind.build(version)
    if build is None:
        raise LookupError(f"{kind.title} ({kind.name}) needs ComfyUI "
                          f"{'.'.join(map(str, kind.min_version))} or later, this is "
                          f"{'.'.join(map(str, version))}")
    return build


def init_random_(module: torch.nn.Module, seed: int) -> None:
    """Seeded init in place: norm scales 1, biases 0, every other tensor N(0, 0.02)."""
    norm_params = set()
    for name, sub in module.named_modules():
        if "Norm" in type(sub).__name__:
            for pname, _ in sub.named_parameters(recurse=False):
                norm_params.add(f"{name}.{pname}" if name else pname)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                param.zero_()
            elif name in norm_params:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)


def model_config(unet_config: dict, state_dict: dict | None = None):
    """The ``comfy.supported_models`` entry the loader picks for ``unet_config``."""
    import comfy.model_detection

    config = comfy.model_detection.model_config_from_unet_config(dict(unet_config), state_dict)
    if config is None:
        raise ValueError(f"ComfyUI knows no model for {unet_config}")
    return config


def build_model(unet_config: dict, dtype: torch.dtype, seed: int):
    """A ``comfy.model_base.BaseModel`` for ``unet_config`` with seeded random weights."""
    config = model_config(unet_config)
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    init_random_(model.diffusion_model, seed)
    return model


def _init_seed(kind: Kind, seed: int) -> int:
    # Kinds with the same config (Kontext and dev, the two WAN2.2 experts) get other weights.
    return (zlib.crc32(kind.name.encode()) + seed) % (2 ** 63)


def random_state_dict(name: str, seed: int = DEFAULT_SEED,
                      dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The diffusion-model weights of kind ``name`` under the key names the loader expects."""
    kind = kind_named(name)
    model = build_model(_build_for(kind).unet_config, dtype, _init_seed(kind, seed))
    return {k: v.contiguous() for k, v in model.diffusion_model.state_dict().items()}


def _metadata(kind: Kind, build: Build, seed: int) -> dict[str, str]:
    # One key: safetensors writes the metadata map in no fixed order, and identical inputs must
    # give identical files.
    return {"chipmunk_tiny": json.dumps(
        {"kind": kind.name, "seed": seed, "format": FORMAT_VERSION, "config": build.unet_config},
        sort_keys=True, default=str)}


def checkpoint_is_current(path: Path, name: str, seed: int = DEFAULT_SEED) -> bool:
    """Whether ``path`` holds what ``write_checkpoint`` would write for the imported ComfyUI."""
    from safetensors import safe_open

    kind = kind_named(name)
    try:
        with safe_open(str(path), framework="pt") as existing:
            return existing.metadata() == _metadata(kind, _build_for(kind), seed)
    except Exception:  # missing, unreadable or truncated
        return False


def write_checkpoint(name: str, out_dir: str | os.PathLike, seed: int = DEFAULT_SEED,
                     force: bool = False) -> Path:
    """Write kind ``name``'s checkpoint into ``out_dir`` unless an identical one is there."""
    from safetensors.torch import save_file

    kind = kind_named(name)
    build = _build_for(kind)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CHECKPOINT_NAMES[kind.name]
    if not force and checkpoint_is_current(path, kind.name, seed):
        return path
    log.info("building tiny %s checkpoint %s", kind.name, path)
    state_dict = random_state_dict(kind.name, seed)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    save_file(state_dict, str(partial), metadata=_metadata(kind, build, seed))
    os.chmod(partial, 0o644)
    os.replace(partial, path)
    return path


def detected_config(path: str | os.PathLike) -> dict | None:
    """What ``comfy.model_detection`` reads from the checkpoint at ``path``."""
    import comfy.model_detection
    import comfy.utils

    state_dict = comfy.utils.load_torch_file(str(path))
    return comfy.model_detection.detect_unet_config(state_dict, "")


def config_differences(detected: dict | None, intended: dict) -> dict:
    """{key: (detected, intended)} for every key where the two configs differ."""
    detected = detected or {}
    return {k: (detected.get(k), intended.get(k)) for k in sorted(set(detected) | set(intended))
            if _normalise(detected.get(k)) != _normalise(intended.get(k))}


def _normalise(value):
    return list(value) if isinstance(value, tuple) else value


def load_model(name: str, out_dir: str | os.PathLike, seed: int = DEFAULT_SEED):
    """Kind ``name`` as a ModelPatcher, from its checkpoint in ``out_dir`` (written if needed).

    Through the stock loader (``comfy.sd.load_diffusion_model``) where detection allows, else
    through the same model config class in process (``load_in_process``).
    """
    kind = kind_named(name)
    path = write_checkpoint(kind.name, out_dir, seed)
    if _build_for(kind).stock_loader:
        import comfy.sd

        return comfy.sd.load_diffusion_model(str(path))
    return load_in_process(path, kind.name)


def verify_checkpoint(path: str | os.PathLike, name: str):
    """Load ``path`` as kind ``name`` and check that it became the intended model.

    Stock kinds: detection must read back exactly the kind's ``unet_config`` and the stock
    loader loads the file. In-process kinds: loaded by ``load_in_process``. Both: the model
    config, model and diffusion-model classes must be the kind's. Returns the ModelPatcher.
    """
    kind = kind_named(name)
    build = _build_for(kind)
    if build.stock_loader:
        import comfy.sd

        differences = config_differences(detected_config(path), build.unet_config)
        if differences:
            raise AssertionError(f"{path}: detection differs (detected, intended): {differences}")
        patcher = comfy.sd.load_diffusion_model(str(path))
    else:
        patcher = load_in_process(path, kind.name)
    found = (type(patcher.model.model_config).__name__, type(patcher.model).__name__,
             _class_path(patcher.model.diffusion_model))
    intended = (kind.supported_model, kind.model_base, kind.model_class)
    if found != intended:
        raise AssertionError(f"{path}: built {found}, intended {intended}")
    return patcher


def _class_path(module) -> tuple[str, str]:
    return type(module).__module__, type(module).__name__


def load_in_process(path: str | os.PathLike, name: str):
    """Kind ``name``'s checkpoint as a ModelPatcher without the detection step.

    Mirrors ``comfy.sd.load_diffusion_model_state_dict`` after detection: the kind's
    ``unet_config`` -> model config (dtype chosen as the loader chooses it) -> ``get_model`` ->
    ``load_model_weights`` -> ModelPatcher.
    """
    import comfy.model_management
    import comfy.utils

    state_dict = comfy.utils.load_torch_file(str(path))
    unet_config = _build_for(kind_named(name)).unet_config
    config = model_config(unet_config, state_dict)
    dtype = comfy.model_management.unet_dtype(
        model_params=comfy.utils.calculate_parameters(state_dict),
        supported_dtypes=list(config.supported_inference_dtypes),
        weight_dtype=comfy.utils.weight_dtype(state_dict))
    return _patcher(config, dtype, state_dict)


def _patcher(config, dtype: torch.dtype, state_dict: dict):
    import comfy.model_management
    import comfy.model_patcher

    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    config.set_inference_dtype(dtype, comfy.model_management.unet_manual_cast(
        dtype, load_device, config.supported_inference_dtypes))
    model = config.get_model(state_dict, "")
    patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher",
                            comfy.model_patcher.ModelPatcher)
    patcher = patcher_class(model, load_device=load_device, offload_device=offload_device)
    if not comfy.model_management.is_device_cpu(offload_device):
        model.to(offload_device)
    if getattr(patcher, "is_dynamic", lambda: False)():  # v0.19.3's dynamic VRAM patcher
        model.load_model_weights(state_dict, "", assign=True)
    else:
        model.load_model_weights(state_dict, "")
    return patcher


def narrow_flux_patcher(seed: int = DEFAULT_SEED, dtype: torch.dtype = torch.float32,
                        **overrides):
    """A real ModelPatcher around a narrow FLUX.1 dev with random weights, in process.

    Width 256 (2 heads of 128), 2 double + 2 single blocks. ``overrides`` change the config
    (e.g. ``depth=1``); text width is ``context_in_dim`` (64), pooled width ``vec_in_dim`` (768).
    """
    unet_config = {**_flux1(comfy_version()), "context_in_dim": 64, **overrides}
    state_dict = build_model(unet_config, dtype, seed).diffusion_model.state_dict()
    return _patcher(model_config(unet_config), dtype, state_dict)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", required=True, help="ComfyUI checkout to import")
    parser.add_argument("--out", required=True, help="folder for the checkpoints")
    parser.add_argument("--kind", "--family", action="append", dest="kinds",
                        choices=sorted(set(KINDS) | set(ALIASES)),
                        help="kind to build (repeatable; default: all this ComfyUI has)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--force", action="store_true", help="rebuild existing files")
    parser.add_argument("--verify", action="store_true",
                        help="load each checkpoint afterwards and check what it became")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[tiny_models] %(message)s")

    import_comfy(ns.comfyui)
    for name in ns.kinds or available_kinds():
        path = write_checkpoint(name, ns.out, ns.seed, ns.force)
        if ns.verify:
            patcher = verify_checkpoint(path, name)
            params = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
            how = "stock loader" if _build_for(kind_named(name)).stock_loader else "in process"
            log.info("%s: %s, %.1fM parameters (%s)", path.name,
                     type(patcher.model).__name__, params / 1e6, how)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
