"""A small CNN that names the emoji class in a picture: the lab's distribution-level score.

Trained on real composed scenes and clip frames (lab/scenes.py), with blur, noise and colour
jitter so that it judges content rather than the autoencoders' softness. Input: pixels in [0, 1],
any size (resized to 128x128); output: logits over ``vocab.CLASSES``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .vocab import CLASSES

INPUT_SIZE = 128
FILE = "toy_classifier.safetensors"


class Classifier(nn.Module):
    def __init__(self, classes: int = len(CLASSES), width: int = 24):
        super().__init__()
        layers, c_in = [], 3
        for c_out in (width, 2 * width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                       nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, classes)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """The pooled features the head reads ([N, 4 * width]): the lab's distribution distance uses them."""
        if pixels.shape[-1] != INPUT_SIZE or pixels.shape[-2] != INPUT_SIZE:
            pixels = F.interpolate(pixels, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True,
                                   align_corners=False)
        return self.features(pixels * 2.0 - 1.0).mean((-2, -1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(pixels))


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur (box filters of size 1-5 after downscaling), Gaussian noise and brightness."""
    n, device = pixels.shape[0], pixels.device
    out = F.interpolate(pixels, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
    blur = torch.randint(0, 3, (n,), generator=generator).tolist()
    blurred = [out]
    for radius in (1, 2):
        blurred.append(F.avg_pool2d(out, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False))
    out = torch.stack([blurred[b][i] for i, b in enumerate(blur)])
    noise = torch.randn(out.shape, generator=generator).to(device) * (torch.rand(n, 1, 1, 1, generator=generator).to(device) * 0.06)
    gain = 1.0 + (torch.rand(n, 1, 1, 1, generator=generator).to(device) - 0.5) * 0.2
    return (out * gain + noise).clamp(0.0, 1.0)


def save(model: Classifier, folder, name: str = FILE) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()},
              str(folder / name))


def load(path, device="cpu") -> Classifier:
    from safetensors.torch import load_file

    model = Classifier()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.to(device).eval()
