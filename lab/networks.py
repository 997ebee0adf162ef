"""The toy diffusion transformers, built from ComfyUI's own classes, and what sampling them means.

- Toy FLUX: ``comfy.ldm.flux.model.Flux``, width 128 (one head of 128), 2 double + 6 single
  blocks, guidance embedding, text and pooled width 128 (the toy vocabulary's vectors). Images
  256x256 -> 16x32x32 latents -> 256 image tokens.
- Toy WAN2.1: ``comfy.ldm.wan.model.WanModel`` (t2v), width 128 (one head), 6 blocks, FFN 512,
  text width 4096 (fixed by ComfyUI's detection). Clips 17x160x160 -> 16x5x20x20 latents -> 500 tokens.

``FLUX_UNET_CONFIG`` / ``WAN_UNET_CONFIG`` are exactly what ``comfy.model_detection`` reads back
from the saved weights, so the stock "Load Diffusion Model" rebuilds the same networks.

Both models are trained with rectified flow in their model space (what ComfyUI's
``process_latent_in`` gives): x_sigma = (1 - sigma) x0 + sigma * noise, the network predicts
v = noise - x0, and ComfyUI's CONST sampling turns that into x0 = x_sigma - sigma * v. The
networks see ``timestep = sigma`` (FLUX) and ``1000 * sigma`` (WAN), as ComfyUI passes them.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch

FLUX_UNET_CONFIG = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 128,
    "context_in_dim": 128, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 1, "depth": 2,
    "depth_single_blocks": 6, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True,
    "txt_ids_dims": [], "yak_mlp": False, "txt_norm": False,
}
WAN_UNET_CONFIG = {
    "image_model": "wan2.1", "model_type": "t2v", "dim": 128, "ffn_dim": 512, "num_heads": 1, "num_layers": 6,
    "in_dim": 16, "out_dim": 16, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1),
    "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
}
# The real-scale models (lab/real.py): FLUX.1 sampling 1024x1024 (4,096 image tokens) and WAN2.1 at
# 832x480x33 (14,040 tokens). Two heads of 128 (ComfyUI's detection: heads = width // 128). Depth is
# set by the repository's size limit: both are stored in float8_e4m3fn (one byte per parameter).
REAL_FLUX_UNET_CONFIG = {**FLUX_UNET_CONFIG, "hidden_size": 256, "num_heads": 2, "depth": 1, "depth_single_blocks": 2}
REAL_WAN_UNET_CONFIG = {**WAN_UNET_CONFIG, "dim": 256, "ffn_dim": 384, "num_heads": 2, "num_layers": 3}
UNET_CONFIGS = {("flux", "toy"): FLUX_UNET_CONFIG, ("wan", "toy"): WAN_UNET_CONFIG,
                ("flux", "real"): REAL_FLUX_UNET_CONFIG, ("wan", "real"): REAL_WAN_UNET_CONFIG}
# Sampling shifts ComfyUI's loader gives these families (supported_models: Flux default 1.15, WAN21 8.0).
SAMPLING_SHIFT = {"flux": 1.15, "wan": 8.0}
IMAGE_SIZE = 256
VIDEO_SIZE, VIDEO_FRAMES = 160, 17
CHECKPOINT_NAMES = {"flux": "chipmunk-toy-flux.safetensors", "wan": "chipmunk-toy-wan21-t2v.safetensors"}
REAL_CHECKPOINT_NAMES = {"flux": "chipmunk-lab-flux.safetensors", "wan": "chipmunk-lab-wan21-t2v.safetensors"}
REAL_IMAGE_SIZE = (1024, 1024)  # height, width; any multiple of 16 samples (e.g. 1216x832)
REAL_VIDEO_SIZE, REAL_VIDEO_FRAMES = (480, 832), 33


def checkpoint_name(family: str, scale: str = "toy") -> str:
    return (CHECKPOINT_NAMES if scale == "toy" else REAL_CHECKPOINT_NAMES)[family]


def build(family: str, device="cpu", scale: str = "toy") -> torch.nn.Module:
    """The untrained network (float32, plain layers) with the lab's initialisation."""
    import comfy.ops

    ops = comfy.ops.disable_weight_init
    if family == "flux":
        from comfy.ldm.flux.model import Flux

        config = {k: v for k, v in UNET_CONFIGS[family, scale].items() if k not in ("yak_mlp", "txt_norm")}
        model = Flux(**config, operations=ops, device=device, dtype=torch.float32)
    elif family == "wan":
        from comfy.ldm.wan.model import WanModel

        config = {k: v for k, v in UNET_CONFIGS[family, scale].items() if k != "image_model"}
        model = WanModel(**config, operations=ops, device=device, dtype=torch.float32)
    else:
        raise ValueError(f"unknown toy family {family!r}")
    init_weights_(model, family)
    return model


def init_weights_(model: torch.nn.Module, family: str) -> None:
    """Linear/conv weights N(0, 0.02), biases 0, norm scales 1; every modulation output, gate and
    the last projection start at zero, so each block starts as the identity (adaLN-zero)."""
    zero_prefixes = (("final_layer.", ".img_mod.", ".txt_mod.", ".modulation.") if family == "flux"
                     else ("head.", "time_projection.", ".modulation"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            dotted = "." + name
            if any(p in dotted for p in zero_prefixes):
                param.zero_()
            elif name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1:  # RMSNorm / LayerNorm scales
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)


def model_sampling(family: str):
    """ComfyUI's sigma schedule object for the family (what the loaded model samples with)."""
    import comfy.model_sampling as ms

    config = SimpleNamespace(sampling_settings={"shift": SAMPLING_SHIFT[family]})
    return ms.ModelSamplingFlux(config) if family == "flux" else ms.ModelSamplingDiscreteFlow(config)


def simple_sigmas(sampling, steps: int) -> torch.Tensor:
    """ComfyUI's "simple" scheduler (comfy.samplers.simple_scheduler, whose module needs torchsde)."""
    sigmas = sampling.sigmas
    stride = len(sigmas) / steps
    return torch.tensor([float(sigmas[-(1 + int(i * stride))]) for i in range(steps)] + [0.0])


def shift_sigma(family: str, t: torch.Tensor) -> torch.Tensor:
    """Map uniform t in (0, 1) through the family's time shift (how its schedule spaces sigmas)."""
    shift = SAMPLING_SHIFT[family]
    if family == "flux":
        e = torch.exp(torch.tensor(shift))
        return e / (e + (1.0 / t - 1.0))
    return shift * t / (1.0 + (shift - 1.0) * t)


def noisy_batch(family: str, x0: torch.Tensor, generator: torch.Generator):
    """A rectified-flow training batch from clean latents ``x0``: (x_sigma, sigma, noise, guidance).
    Half the noise levels from a logit-normal, half uniform, through the family's time shift; the
    FLUX guidance input uniform in [1, 5]. Draws from ``generator`` in a fixed order."""
    batch, device = x0.shape[0], x0.device
    u = torch.where(torch.rand(batch, device=device, generator=generator) < 0.5,
                    torch.sigmoid(torch.randn(batch, device=device, generator=generator)),
                    torch.rand(batch, device=device, generator=generator)).clamp(1e-4, 1 - 1e-4)
    sigma = shift_sigma(family, u)
    noise = torch.randn(x0.shape, device=device, generator=generator)
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    guidance = 1.0 + 4.0 * torch.rand(batch, device=device, generator=generator)
    return (1.0 - s) * x0 + s * noise, sigma, noise, guidance


def predict_v(model, family: str, x, sigma, context, pooled=None, guidance=None):
    """The network's velocity for model-space ``x`` at noise level ``sigma`` [B]."""
    if family == "flux":
        return model(x, sigma, context, y=pooled, guidance=guidance)
    return model(x, sigma * 1000.0, context)


@contextlib.contextmanager
def trainable_comfy_blocks():
    """ComfyUI's blocks add residuals in place (``img += ...``), which autograd refuses when the
    tensor was saved for a norm's backward. While training, ``+=`` on tensors is made out of place
    (same values, a new tensor), and ComfyUI's training flag selects its autograd-safe RoPE."""
    import comfy.model_management

    original = torch.Tensor.__iadd__
    was_training = comfy.model_management.in_training
    torch.Tensor.__iadd__ = lambda self, other: self.add(other)
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        torch.Tensor.__iadd__ = original
        comfy.model_management.in_training = was_training


def wan_latent_stats(device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's WAN2.1 latent mean and std ([1, 16, 1, 1, 1]): model space = (latent - mean) / std."""
    import comfy.latent_formats

    fmt = comfy.latent_formats.Wan21()
    return fmt.latents_mean.to(device), fmt.latents_std.to(device)


def save_checkpoint(model: torch.nn.Module, path, metadata: dict | None = None, dtype=torch.bfloat16) -> None:
    """Safetensors under ComfyUI's own key names (the module's state_dict), every tensor in ``dtype``
    (bf16 for the toys, float8_e4m3fn for the real-scale models: ComfyUI's loader then builds the
    model in fp8 and computes in its working dtype, as with FLUX's own fp8 checkpoints)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32).to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})


FP8 = torch.float8_e4m3fn


def fp8_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded through float8_e4m3fn (saturating at its largest finite value), in x's dtype."""
    limit = torch.finfo(FP8).max
    return x.float().clamp(-limit, limit).to(FP8).to(x.dtype)


@contextlib.contextmanager
def fp8_weights(model: torch.nn.Module):
    """Within the block, every parameter reads as its fp8-rounded value in the forward pass and passes
    gradients straight through (quantisation-aware training: the model is trained to be what the fp8
    file computes). Implemented with parametrize-free swaps: the rounded tensors replace the
    parameters' data for the forward, and the backward's gradients land on the originals."""
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.data for p in params]
    try:
        for p in params:
            p.data = fp8_round(p.data)
        yield
    finally:
        for p, original in zip(params, saved):
            p.data = original
