"""The toy autoencoders: ComfyUI's tiny-autoencoder architectures, trained on the toy scenes.

- ``taef1``: ``comfy.taesd.taesd.TAESD`` with 16 latent channels (FLUX latents, 8x). Saved as
  ``taef1_encoder.safetensors`` / ``taef1_decoder.safetensors`` (keys of each ``nn.Sequential``),
  which ComfyUI's "Load VAE" offers as ``taef1`` from ``models/vae_approx``. That loader applies
  FLUX's fixed latent scale and shift, so the FLUX model space is the raw encoder output.
- ``lighttaew2_1``: ``comfy.taesd.taehv.TAEHV`` with 16 latent channels (WAN2.1 latents, 4x in time,
  8x in space). Saved as one bf16 file ``lighttaew2_1.safetensors`` (``encoder.*`` / ``decoder.*``):
  ComfyUI treats a float16 file of this shape as ``taehv`` (HunyuanVideo scaling), anything else as
  lighttaew2_1 (no scaling). The WAN model space is (latent - mean) / std with WAN2.1's constants.

Training: L1 on pixels and on pixel gradients, plus a small penalty pulling every model-space
latent channel towards mean 0 and standard deviation 1 (what rectified-flow noise assumes), and
small Gaussian noise on the latents the decoder sees (so it tolerates a sampler's small errors).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .networks import wan_latent_stats

IMAGE_TAE_FILES = ("taef1_encoder.safetensors", "taef1_decoder.safetensors")
VIDEO_TAE_FILE = "lighttaew2_1.safetensors"
LATENT_NOISE = 0.03
LATENT_PENALTY = 0.05


class ImageTAE(torch.nn.Module):
    """taef1's encoder and decoder; pixels in [0, 1], latents in FLUX model space."""

    def __init__(self):
        super().__init__()
        from comfy.taesd.taesd import Decoder, Encoder

        self.encoder, self.decoder = Encoder(latent_channels=16), Decoder(latent_channels=16)

    def encode(self, pixels):  # [B, 3, H, W] -> [B, 16, H/8, W/8]
        return self.encoder(pixels)

    def decode(self, latents):
        return self.decoder(latents)

    def to_model_space(self, latents):
        return latents

    def save(self, folder) -> list:
        from safetensors.torch import save_file

        paths = []
        for name, module in zip(IMAGE_TAE_FILES, (self.encoder, self.decoder)):
            state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in module.state_dict().items()}
            save_file(state, str(folder / name))
            paths.append(folder / name)
        return paths

    def load(self, folder) -> "ImageTAE":
        from safetensors.torch import load_file

        for name, module in zip(IMAGE_TAE_FILES, (self.encoder, self.decoder)):
            module.load_state_dict({k: v.float() for k, v in load_file(str(folder / name)).items()})
        return self


class VideoTAE(torch.nn.Module):
    """lighttaew2_1's encoder and decoder; pixels [B, 3, T, H, W] in [0, 1], latents as ComfyUI stores them."""

    def __init__(self):
        super().__init__()
        from comfy.taesd.taehv import TAEHV

        self.net = TAEHV(latent_channels=16, latent_format=None, parallel=True)
        mean, std = wan_latent_stats()
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def encode(self, pixels):  # [B, 3, T, H, W] -> [B, 16, ceil(T/4), H/8, W/8]
        return self.net.encode(pixels)

    def decode(self, latents):  # -> [B, 3, 4 * T' - 3, H, W]
        return self.net.decode(latents)

    def to_model_space(self, latents):
        return (latents - self.mean) / self.std

    def from_model_space(self, x):
        return x * self.std + self.mean

    def save(self, folder) -> list:
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(folder / VIDEO_TAE_FILE))
        return [folder / VIDEO_TAE_FILE]

    def load(self, folder) -> "VideoTAE":
        from safetensors.torch import load_file

        self.net.load_state_dict({k: v.float() for k, v in load_file(str(folder / VIDEO_TAE_FILE)).items()})
        return self


def init_weights_(module: torch.nn.Module) -> None:
    """ComfyUI's layers skip PyTorch's initialisation; give every conv Kaiming-uniform weights."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_uniform_(m.weight, a=5 ** 0.5)
                if m.bias is not None:
                    m.bias.zero_()


def _gradients(x, dims):
    return [torch.diff(x, dim=d) for d in dims]


def loss_terms(tae, pixels, generator=None) -> dict:
    """The training loss of one batch (see the module docstring) and its parts."""
    latents = tae.encode(pixels)
    z = tae.to_model_space(latents)
    reduce = [0] + list(range(2, z.dim()))
    penalty = z.float().mean(reduce).square().mean() + (z.float().std(reduce) - 1.0).square().mean()
    noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype) * LATENT_NOISE
    if isinstance(tae, VideoTAE):
        noisy = latents + noise * tae.std
    else:
        noisy = latents + noise
    out = tae.decode(noisy).float()
    target = pixels.float()
    if out.shape != target.shape:
        raise RuntimeError(f"decoder gives {tuple(out.shape)} for input {tuple(target.shape)}")
    pixel = F.l1_loss(out, target)
    spatial = (-2, -1)
    edges = sum(F.l1_loss(a, b) for a, b in zip(_gradients(out, spatial), _gradients(target, spatial)))
    total = pixel + edges + LATENT_PENALTY * penalty
    return {"loss": total, "pixel_l1": pixel.detach(), "edge_l1": edges.detach(), "latent_penalty": penalty.detach()}
