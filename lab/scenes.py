"""Scenes and clips composed from the sprites, in torch, on any device.

A scene is one sprite (a class) placed with a size, centre, rotation and opacity on a plain or
gradient background; a clip moves those parameters linearly over its frames. Every random draw
goes through a ``torch.Generator`` on the CPU, so a seed gives the same data set on any machine.
Pixels are float in [0, 1], layout [B, 3, H, W] (images) or [B, 3, T, H, W] (clips).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import vocab

SIZE_JITTER = 0.08  # relative
POSITION_JITTER = 0.04  # fraction of the image side
COLOUR_JITTER = 12 / 255
GRADIENT_TO = 0.75  # a gradient ends this far towards white at the bottom


@dataclass
class Placement:
    """Per-sprite parameters; every field is a tensor of shape [N]."""
    cls: torch.Tensor
    size: torch.Tensor  # sprite side / image side
    cx: torch.Tensor  # centre, fraction of the width
    cy: torch.Tensor  # centre, fraction of the height
    angle: torch.Tensor  # radians, counter-clockwise
    alpha: torch.Tensor  # opacity
    colour: torch.Tensor  # [N, 3] background colour
    gradient: torch.Tensor  # bool: fade to white downwards


def sprites_tensor(sprites_uint8, device) -> torch.Tensor:
    """[K, 4, 64, 64] float sprites with premultiplied alpha."""
    s = torch.as_tensor(sprites_uint8, device=device).permute(0, 3, 1, 2).float() / 255.0
    return torch.cat([s[:, :3] * s[:, 3:], s[:, 3:]], dim=1)


def render(sprites: torch.Tensor, p: Placement, size: int) -> torch.Tensor:
    """[N, 3, size, size] images of the placements."""
    n, device = p.cls.shape[0], sprites.device
    ramp = torch.linspace(0.0, 1.0, size, device=device).view(1, 1, size, 1)
    colour = p.colour.to(device).view(n, 3, 1, 1)
    top_to_bottom = torch.where(p.gradient.to(device).view(n, 1, 1, 1), ramp * GRADIENT_TO, torch.zeros_like(ramp))
    background = (colour + (1.0 - colour) * top_to_bottom).expand(n, 3, size, size)
    # Output pixel (normalised to [-1, 1]) -> sprite coordinates: undo the translation, rotation and scale.
    cos, sin = torch.cos(p.angle).to(device), torch.sin(p.angle).to(device)
    scale = 1.0 / p.size.to(device)
    tx, ty = (2.0 * p.cx - 1.0).to(device), (2.0 * p.cy - 1.0).to(device)
    theta = torch.stack([
        torch.stack([cos * scale, sin * scale, -(cos * tx + sin * ty) * scale], dim=1),
        torch.stack([-sin * scale, cos * scale, (sin * tx - cos * ty) * scale], dim=1)], dim=1)
    grid = F.affine_grid(theta, [n, 4, size, size], align_corners=False)
    sprite = F.grid_sample(sprites[p.cls.to(device)], grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False) * p.alpha.to(device).view(n, 1, 1, 1)
    return (sprite[:, :3] + background * (1.0 - sprite[:, 3:])).clamp(0.0, 1.0)


def _choice(options, n, generator) -> torch.Tensor:
    return torch.randint(len(options), (n,), generator=generator)


def _jitter(n, amount, generator) -> torch.Tensor:
    return (torch.rand(n, generator=generator) * 2.0 - 1.0) * amount


def _colours(index: torch.Tensor, generator) -> torch.Tensor:
    table = torch.tensor(list(vocab.COLOURS.values()), dtype=torch.float32) / 255.0
    return (table[index] + _jitter(index.shape[0] * 3, COLOUR_JITTER, generator).view(-1, 3)).clamp(0.0, 1.0)


def _words(*columns: tuple[tuple[str, ...], torch.Tensor]) -> list[list[str]]:
    out = []
    for row in zip(*(idx.tolist() for _, idx in columns)):
        words = []
        for (names, _), i in zip(columns, row):
            words.extend(names[i].split())
        out.append(words)
    return out


def random_images(n: int, generator: torch.Generator) -> tuple[Placement, list[list[str]]]:
    """Placements of ``n`` random scenes and the words of their prompts (``vocab.image_prompt``)."""
    k = len(vocab.CLASSES)
    cls, size_i = torch.randint(k, (n,), generator=generator), _choice(vocab.SIZES, n, generator)
    row_i, col_i = _choice(vocab.ROWS, n, generator), _choice(vocab.COLUMNS, n, generator)
    colour_i, bg_i = _choice(vocab.COLOURS, n, generator), _choice(vocab.BACKGROUNDS, n, generator)
    sizes = torch.tensor(list(vocab.SIZES.values()))[size_i] * (1.0 + _jitter(n, SIZE_JITTER, generator))
    cx = torch.tensor(list(vocab.COLUMNS.values()))[col_i] + _jitter(n, POSITION_JITTER, generator)
    cy = torch.tensor(list(vocab.ROWS.values()))[row_i] + _jitter(n, POSITION_JITTER, generator)
    placement = Placement(cls=cls, size=sizes, cx=cx, cy=cy, angle=torch.zeros(n), alpha=torch.ones(n),
                          colour=_colours(colour_i, generator), gradient=bg_i == 1)
    words = _words((tuple(vocab.SIZES), size_i), (vocab.CLASS_WORDS, cls), (tuple(vocab.ROWS), row_i),
                   (tuple(vocab.COLUMNS), col_i), (tuple(vocab.COLOURS), colour_i), (vocab.BACKGROUNDS, bg_i))
    return placement, words


# Motion -> (start, end) of (size factor, dx, dy, angle, alpha); positions are offsets from the
# clip's centre point, in fractions of the side.
_MOVE = 0.22
_MOTION_PATHS = {
    "standing still": ((1, 0, 0, 0, 1), (1, 0, 0, 0, 1)),
    "moving left": ((1, _MOVE, 0, 0, 1), (1, -_MOVE, 0, 0, 1)),
    "moving right": ((1, -_MOVE, 0, 0, 1), (1, _MOVE, 0, 0, 1)),
    "moving up": ((1, 0, _MOVE, 0, 1), (1, 0, -_MOVE, 0, 1)),
    "moving down": ((1, 0, -_MOVE, 0, 1), (1, 0, _MOVE, 0, 1)),
    "growing bigger": ((0.5, 0, 0, 0, 1), (1.5, 0, 0, 0, 1)),
    "shrinking away": ((1.5, 0, 0, 0, 1), (0.5, 0, 0, 0, 1)),
    "spinning around": ((1, 0, 0, 0, 1), (1, 0, 0, -math.pi, 1)),
    "fading in": ((1, 0, 0, 0, 0), (1, 0, 0, 0, 1)),
    "fading out": ((1, 0, 0, 0, 1), (1, 0, 0, 0, 0)),
}
assert tuple(_MOTION_PATHS) == vocab.MOTIONS
VIDEO_SIZES = {"small": 0.26, "medium": 0.34, "large": 0.42}


def random_clips(n: int, frames: int, generator: torch.Generator) -> tuple[Placement, list[list[str]]]:
    """Placements of ``n`` random clips, frame-major per clip ([n * frames]), and their prompt words."""
    k = len(vocab.CLASSES)
    cls, size_i = torch.randint(k, (n,), generator=generator), _choice(VIDEO_SIZES, n, generator)
    motion_i = _choice(vocab.MOTIONS, n, generator)
    colour_i, bg_i = _choice(vocab.COLOURS, n, generator), _choice(vocab.BACKGROUNDS, n, generator)
    base = torch.tensor(list(VIDEO_SIZES.values()))[size_i] * (1.0 + _jitter(n, SIZE_JITTER, generator))
    centre_x = 0.5 + _jitter(n, POSITION_JITTER, generator)
    centre_y = 0.5 + _jitter(n, POSITION_JITTER, generator)
    paths = torch.tensor([_MOTION_PATHS[m] for m in vocab.MOTIONS], dtype=torch.float32)[motion_i]  # [n, 2, 5]
    t = torch.linspace(0.0, 1.0, frames).view(1, frames, 1)
    path = paths[:, :1] + (paths[:, 1:] - paths[:, :1]) * t  # [n, frames, 5]
    colour = _colours(colour_i, generator)

    def per_frame(x):
        return x.repeat_interleave(frames, dim=0)

    placement = Placement(
        cls=per_frame(cls), size=(base[:, None] * path[..., 0]).reshape(-1),
        cx=(centre_x[:, None] + path[..., 1]).reshape(-1), cy=(centre_y[:, None] + path[..., 2]).reshape(-1),
        angle=path[..., 3].reshape(-1), alpha=path[..., 4].reshape(-1), colour=per_frame(colour),
        gradient=per_frame(bg_i == 1))
    words = _words((tuple(VIDEO_SIZES), size_i), (vocab.CLASS_WORDS, cls), (vocab.MOTIONS, motion_i),
                   (tuple(vocab.COLOURS), colour_i), (vocab.BACKGROUNDS, bg_i))
    return placement, words


def render_clips(sprites: torch.Tensor, p: Placement, frames: int, size: int) -> torch.Tensor:
    """[N, 3, frames, size, size] clips of frame-major placements."""
    images = render(sprites, p, size)
    return images.view(-1, frames, 3, size, size).transpose(1, 2)


def words_to_ids(words: list[list[str]], generator: torch.Generator | None = None,
                 drop_word: float = 0.0, drop_prompt: float = 0.0, keep: frozenset = frozenset()) -> torch.Tensor:
    """[N, CONTEXT_TOKENS] token ids; optionally drop single words (not those in ``keep``) and whole
    prompts (-> the unconditional input), both with the generator."""
    out = []
    for ws in words:
        if drop_prompt and torch.rand(1, generator=generator).item() < drop_prompt:
            ws = []
        elif drop_word:
            ws = [w for w in ws if w in keep or torch.rand(1, generator=generator).item() >= drop_word]
        out.append(vocab.token_ids(ws))
    return torch.tensor(out, dtype=torch.long)
