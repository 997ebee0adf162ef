"""Rich scenes and clips for the real-scale models: the toy prompt's main object on a textured
background among many objects and lines of text that the prompt does not name.

What the prompt fixes (``vocab.image_prompt`` / ``vocab.video_prompt``, drawn by
``scenes.random_images`` / ``scenes.random_clips``): the main emoji, its size, place or motion, the
background colour and whether it fades to white. What it leaves open, and the model must invent
(so that the flow from noise to picture is curved and fewer sampling steps cost detail):
- texture: a smooth random field (sum of a few low-frequency waves), a fine grating or checker
  pattern, and a tilted shading ramp, each with a random strength;
- 4-14 other emoji at several scales (2.5-20% of the short side), some half transparent, rotated;
- 0-5 lines of rendered text (lab/data.py ``--fonts``) in dark or light ink;
- in clips: a camera pan over the whole scene (background, objects and text move together),
  and every other object moving on its own.
The main object is drawn last (on top), at the toy sizes (24-50% of the short side): the classifier
can still name it. Everything is rendered in torch on the device given; random draws come from a
CPU generator, so a seed gives the same data on every machine. Sizes are fractions of the
picture's short side, positions fractions of its width and height; non-square pictures work.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import scenes

OTHERS = (4, 14)  # other emoji per scene (inclusive range)
OTHER_SIZES = (0.025, 0.2)
TEXT_LINES = (0, 5)
TEXT_HEIGHTS = (0.025, 0.07)  # a text line's height, fraction of the short side
WAVES = 6


@dataclass
class Layer:
    """One object per picture (every field has a leading dimension N): what the renderer draws."""
    index: torch.Tensor  # atlas row
    size: torch.Tensor  # height, fraction of the short side
    aspect: torch.Tensor  # width / height
    cx: torch.Tensor
    cy: torch.Tensor
    angle: torch.Tensor
    alpha: torch.Tensor
    tint: torch.Tensor | None = None  # [N, 3] ink colour (text); None: the atlas's own colours


@dataclass
class Texture:
    """Per-picture background parameters (leading dimension N)."""
    colour: torch.Tensor  # [N, 3]
    gradient: torch.Tensor  # bool: fade to white downwards (named by the prompt)
    wave_freq: torch.Tensor  # [N, WAVES, 2] cycles per short side
    wave_phase: torch.Tensor  # [N, WAVES]
    wave_amp: torch.Tensor  # [N, WAVES, 3]
    grating_freq: torch.Tensor  # [N, 2]
    grating_amp: torch.Tensor  # [N]
    checker: torch.Tensor  # bool: product of two gratings instead of one
    ramp: torch.Tensor  # [N, 2] tilted shading direction * strength


class Atlas:
    """The sprites on the device: emoji [K, 4, 64, 64] (premultiplied) and text lines [S, 2, h, w]
    (coverage twice: premultiplied white ink and alpha), with each line's aspect ratio."""

    def __init__(self, sprites_uint8, text=None, device="cpu"):
        self.emoji = scenes.sprites_tensor(sprites_uint8, device)
        self.text = self.text_aspect = None
        if text is not None:
            lines, widths = text
            coverage = torch.as_tensor(lines, device=device).float()[:, None] / 255.0
            self.text = torch.cat([coverage, coverage], dim=1)
            height = lines.shape[1]
            self.text_widths = torch.as_tensor(widths).float()
            self.text_aspect = self.text_widths / height

    def text_sprites(self, index):
        """Lines cropped to their inked width is done by the layer's aspect: the grid reads the
        line's left part only (see ``_theta``)."""
        return self.text[index.to(self.text.device)]


def _uniform(n, low, high, generator):
    return low + (high - low) * torch.rand(n, generator=generator)


def random_texture(placement: scenes.Placement, n: int, generator) -> Texture:
    """Texture for ``n`` pictures whose colour and gradient come from the prompt's placement."""
    colour, gradient = placement.colour[:n], placement.gradient[:n]
    freq = torch.rand(n, WAVES, 2, generator=generator) * 6.0 - 3.0
    strength = torch.rand(n, 1, 1, generator=generator) * 0.16
    shared = torch.randn(n, WAVES, 1, generator=generator)  # mostly lightness, a little colour
    amp = (shared + 0.4 * torch.randn(n, WAVES, 3, generator=generator)) * strength / math.sqrt(WAVES)
    grating = torch.exp(_uniform(n, math.log(12.0), math.log(90.0), generator))
    direction = torch.rand(n, generator=generator) * math.pi
    grating_freq = torch.stack([torch.cos(direction), torch.sin(direction)], 1) * grating[:, None]
    grating_amp = torch.rand(n, generator=generator) ** 2 * 0.12
    ramp_dir = torch.rand(n, generator=generator) * 2 * math.pi
    ramp = torch.stack([torch.cos(ramp_dir), torch.sin(ramp_dir)], 1) * (torch.rand(n, 1, generator=generator) * 0.25)
    return Texture(colour=colour, gradient=gradient, wave_freq=freq,
                   wave_phase=torch.rand(n, WAVES, generator=generator) * 2 * math.pi, wave_amp=amp,
                   grating_freq=grating_freq, grating_amp=grating_amp,
                   checker=torch.rand(n, generator=generator) < 0.3, ramp=ramp)


def render_background(t: Texture, height: int, width: int, device, offset=None) -> torch.Tensor:
    """[N, 3, H, W]; ``offset`` [N, 2] shifts the textured world under the frame (camera pan,
    fractions of the short side). The prompt's fade to white stays fixed to the frame."""
    n, short = t.colour.shape[0], min(height, width)
    ys = (torch.arange(height, device=device).float() + 0.5) / short
    xs = (torch.arange(width, device=device).float() + 0.5) / short
    off = torch.zeros(n, 2, device=device) if offset is None else offset.to(device)
    x = xs.view(1, 1, width) + off[:, 0].view(n, 1, 1)  # [N, 1, W]
    y = ys.view(1, height, 1) + off[:, 1].view(n, 1, 1)  # [N, H, 1]
    colour = t.colour.to(device).view(n, 3, 1, 1)
    ramp = torch.linspace(0.0, 1.0, height, device=device).view(1, 1, height, 1)
    fade = torch.where(t.gradient.to(device).view(n, 1, 1, 1), ramp * scenes.GRADIENT_TO, torch.zeros_like(ramp))
    image = colour + (1.0 - colour) * fade
    f, phase, amp = t.wave_freq.to(device), t.wave_phase.to(device), t.wave_amp.to(device)
    for k in range(WAVES):
        wave = torch.sin(2 * math.pi * (f[:, k, 0].view(n, 1, 1) * x + f[:, k, 1].view(n, 1, 1) * y)
                         + phase[:, k].view(n, 1, 1))
        image = image + amp[:, k].view(n, 3, 1, 1) * wave[:, None]
    g = t.grating_freq.to(device)
    first = torch.sin(2 * math.pi * (g[:, 0].view(n, 1, 1) * x + g[:, 1].view(n, 1, 1) * y))
    second = torch.sin(2 * math.pi * (-g[:, 1].view(n, 1, 1) * x + g[:, 0].view(n, 1, 1) * y))
    pattern = torch.where(t.checker.to(device).view(n, 1, 1), torch.sign(first * second), first)
    image = image + (t.grating_amp.to(device).view(n, 1, 1) * pattern)[:, None]
    r = t.ramp.to(device)
    shade = r[:, 0].view(n, 1, 1) * (x - 0.5 * width / short) + r[:, 1].view(n, 1, 1) * (y - 0.5 * height / short)
    return (image + shade[:, None]).clamp(0.0, 1.0)


def _theta(layer: Layer, height: int, width: int, device) -> torch.Tensor:
    """Output pixel (normalised [-1, 1] per axis) -> sprite coordinates ([-1, 1] over the sprite)."""
    short = min(height, width)
    cos, sin = torch.cos(layer.angle).to(device), torch.sin(layer.angle).to(device)
    sprite_h = layer.size.to(device) * short
    sprite_w = sprite_h * layer.aspect.to(device)
    tx, ty = (2.0 * layer.cx - 1.0).to(device), (2.0 * layer.cy - 1.0).to(device)
    a, b = cos * width / sprite_w, sin * height / sprite_w
    d, e = -sin * width / sprite_h, cos * height / sprite_h
    return torch.stack([torch.stack([a, b, -(a * tx + b * ty)], 1), torch.stack([d, e, -(d * tx + e * ty)], 1)], 1)


def composite(canvas: torch.Tensor, sprites: torch.Tensor, layer: Layer, crop=None) -> torch.Tensor:
    """Draw one layer (sprites [N, 4 or 2, h, w], premultiplied) over ``canvas`` [N, 3, H, W].
    ``crop`` [N]: the fraction of each sprite's width that is used (text lines)."""
    n, _, height, width = canvas.shape
    theta = _theta(layer, height, width, canvas.device)
    grid = F.affine_grid(theta, [n, 1, height, width], align_corners=False)
    if crop is not None:  # sprite x in [-1, 1] over the inked part -> over the stored width
        c = crop.to(canvas.device).view(n, 1, 1)
        grid = torch.stack([(grid[..., 0] + 1.0) * c - 1.0, grid[..., 1]], dim=-1)
    drawn = F.grid_sample(sprites, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    alpha = drawn[:, -1:] * layer.alpha.to(canvas.device).view(n, 1, 1, 1)
    if layer.tint is not None:
        rgb = layer.tint.to(canvas.device).view(n, 3, 1, 1) * alpha
    else:
        rgb = drawn[:, :3] * layer.alpha.to(canvas.device).view(n, 1, 1, 1)
    return rgb + canvas * (1.0 - alpha)


@dataclass
class Extras:
    """What the prompt does not say, for N pictures: the background texture, the other emoji and
    the text lines (lists of layers, drawn in order), and for clips their motion per frame."""
    texture: Texture
    others: list  # of Layer
    texts: list  # of (Layer, crop)
    other_velocity: torch.Tensor | None = None  # [N, len(others), 2] per clip length
    pan: torch.Tensor | None = None  # [N, 2] camera travel over the clip, fractions of the short side


def random_extras(placement: scenes.Placement, n: int, num_classes: int, generator, atlas: Atlas | None = None,
                  aspect: float = 1.0, motion: bool = False) -> Extras:
    """Unprompted content for ``n`` pictures; ``placement`` holds the prompt's draw (one row per
    picture: its main class is not repeated among the others). ``aspect``: width / height."""
    texture = random_texture(placement, n, generator)
    count = int(torch.randint(OTHERS[0], OTHERS[1] + 1, (1,), generator=generator))
    others = []
    main = placement.cls[:n]
    # Objects bigger first, so small ones land on top; pans need objects beyond the frame's edges.
    sizes = torch.exp(_uniform(n * count, math.log(OTHER_SIZES[0]), math.log(OTHER_SIZES[1]), generator)).view(n, count)
    sizes = sizes.sort(dim=1, descending=True).values
    spread = 0.35 if motion else 0.05
    for j in range(count):
        shift = torch.randint(1, num_classes, (n,), generator=generator)
        others.append(Layer(index=(main + shift) % num_classes, size=sizes[:, j], aspect=torch.ones(n),
                            cx=_uniform(n, -spread, 1 + spread, generator), cy=_uniform(n, -spread, 1 + spread, generator),
                            angle=(torch.rand(n, generator=generator) - 0.5) * 1.2,
                            alpha=torch.where(torch.rand(n, generator=generator) < 0.2, 0.5, 1.0)))
    texts = []
    if atlas is not None and atlas.text is not None:
        lines = int(torch.randint(TEXT_LINES[0], TEXT_LINES[1] + 1, (1,), generator=generator))
        for _ in range(lines):
            index = torch.randint(atlas.text.shape[0], (n,), generator=generator)
            crop = atlas.text_widths[index] / atlas.text.shape[-1]
            dark = torch.rand(n, 1, generator=generator) < 0.5
            ink = torch.where(dark, torch.rand(n, 3, generator=generator) * 0.25,
                              0.75 + torch.rand(n, 3, generator=generator) * 0.25)
            height = torch.exp(_uniform(n, math.log(TEXT_HEIGHTS[0]), math.log(TEXT_HEIGHTS[1]), generator))
            layer = Layer(index=index, size=height, aspect=atlas.text_aspect[index], tint=ink,
                          cx=_uniform(n, 0.1 - spread, 0.9 + spread, generator),
                          cy=_uniform(n, 0.05 - spread, 0.95 + spread, generator),
                          angle=(torch.rand(n, generator=generator) - 0.5) * 0.3, alpha=torch.ones(n))
            texts.append((layer, crop))
    extras = Extras(texture=texture, others=others, texts=texts)
    if motion:
        extras.other_velocity = (torch.rand(n, count, 2, generator=generator) - 0.5) * 0.5
        still = torch.rand(n, generator=generator) < 0.25
        pan = (torch.rand(n, 2, generator=generator) - 0.5) * torch.tensor([0.6, 0.3])
        extras.pan = torch.where(still[:, None], torch.zeros_like(pan), pan)
    return extras


def _main_layer(p: scenes.Placement) -> Layer:
    return Layer(index=p.cls, size=p.size, aspect=torch.ones_like(p.size), cx=p.cx, cy=p.cy, angle=p.angle,
                 alpha=p.alpha)


def render(atlas: Atlas, placement: scenes.Placement, extras: Extras, height: int, width: int) -> torch.Tensor:
    """[N, 3, H, W] pictures: textured background, text, other emoji, then the main object."""
    device = atlas.emoji.device
    canvas = render_background(extras.texture, height, width, device)
    return _draw(atlas, canvas, extras, _main_layer(placement), 0.0)


def _moved(layer: Layer, shift: torch.Tensor) -> Layer:
    """The layer moved by ``shift`` [N, 2] (fractions of the short side), in frame fractions."""
    return Layer(index=layer.index, size=layer.size, aspect=layer.aspect, cx=layer.cx + shift[:, 0],
                 cy=layer.cy + shift[:, 1], angle=layer.angle, alpha=layer.alpha, tint=layer.tint)


def _draw(atlas, canvas, extras, main, t):
    height, width = canvas.shape[-2:]
    short = min(height, width)
    scale = torch.tensor([short / width, short / height])
    n = canvas.shape[0]
    camera = extras.pan * t if extras.pan is not None else torch.zeros(n, 2)
    for layer, crop in extras.texts:
        canvas = composite(canvas, atlas.text_sprites(layer.index), _moved(layer, -camera * scale), crop)
    for j, layer in enumerate(extras.others):
        motion = -camera
        if extras.other_velocity is not None:
            motion = motion + extras.other_velocity[:, j] * t
        canvas = composite(canvas, atlas.emoji[layer.index.to(atlas.emoji.device)], _moved(layer, motion * scale))
    return composite(canvas, atlas.emoji[main.index.to(atlas.emoji.device)], main).clamp(0.0, 1.0)


def render_clips(atlas: Atlas, placement: scenes.Placement, extras: Extras, frames: int, height: int,
                 width: int) -> torch.Tensor:
    """[N, 3, frames, H, W] clips; ``placement`` is frame-major per clip (``scenes.random_clips``),
    the main object moves in the frame as the prompt says, everything else pans and moves."""
    device = atlas.emoji.device
    n = extras.texture.colour.shape[0]
    out = torch.empty(n, 3, frames, height, width, device=device)
    for f in range(frames):
        t = f / max(1, frames - 1)
        rows = torch.arange(n) * frames + f
        frame_p = scenes.Placement(**{k: v[rows] for k, v in vars(placement).items()})
        offset = extras.pan * t if extras.pan is not None else None
        canvas = render_background(extras.texture, height, width, device, offset)
        out[:, :, f] = _draw(atlas, canvas, extras, _main_layer(frame_p), t)
    return out


def random_images(n: int, generator, atlas: Atlas, height: int, width: int):
    """(placement, extras, prompt words) of ``n`` rich pictures."""
    placement, words = scenes.random_images(n, generator)
    extras = random_extras(placement, n, atlas.emoji.shape[0], generator, atlas, aspect=width / height)
    return placement, extras, words


def random_clips(n: int, frames: int, generator, atlas: Atlas):
    placement, words = scenes.random_clips(n, frames, generator)
    first = scenes.Placement(**{k: v[::frames] for k, v in vars(placement).items()})
    extras = random_extras(first, n, atlas.emoji.shape[0], generator, atlas, motion=True)
    return placement, extras, words
