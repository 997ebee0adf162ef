"""Token reordering: which tokens form a query group (attention) or a row block (MLP).

A group of consecutive tokens should be spatially compact so that its members want the same keys
and the same hidden units. Image and video tokens are enumerated tile by tile (2D tiles for images,
3D voxels for video, each tile holding exactly one group); tokens that do not fill a whole tile are
appended afterwards in raster order, then any extra image tokens (e.g. reference latents), then
text. The model's own token order is never changed: the permutation travels to the kernels as an
index table.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch


def _factorizations(n: int, parts: int):
    if parts == 1:
        yield (n,)
        return
    for first in range(1, n + 1):
        if n % first == 0:
            for rest in _factorizations(n // first, parts - 1):
                yield (first,) + rest


def choose_tile(grid: tuple[int, ...], group: int) -> tuple[int, ...]:
    """The tile shape (product == group) that leaves the fewest tokens outside whole tiles.

    Ties go to the most compact tile (smallest spread between its sides).
    """
    best = None
    for tile in _factorizations(group, len(grid)):
        covered = math.prod((g // t) * t for g, t in zip(grid, tile))
        key = (-covered, max(tile) - min(tile))
        if best is None or key < best[0]:
            best = (key, tile)
    return best[1]


def tile_order(grid: tuple[int, ...], tile: tuple[int, ...]) -> torch.Tensor:
    """Permutation (int64) of the raster-ordered grid: whole tiles first, the rest after."""
    raster = torch.arange(math.prod(grid), dtype=torch.int64).reshape(grid)
    full = tuple((g // t) * t for g, t in zip(grid, tile))
    inside = raster[tuple(slice(0, f) for f in full)]
    # [n0, t0, n1, t1, ...] -> [n0, n1, ..., t0, t1, ...]: tile-major, raster within a tile.
    split = inside.reshape([d for f, t in zip(full, tile) for d in (f // t, t)])
    dims = len(grid)
    tiled = split.permute(*range(0, 2 * dims, 2), *range(1, 2 * dims, 2)).reshape(-1)
    in_tiles = torch.ones(grid, dtype=torch.bool)
    in_tiles[tuple(slice(0, f) for f in full)] = False
    rest = raster[in_tiles]
    return torch.cat([tiled, rest])


def local_window_keys(grid: tuple[int, ...], tile: tuple[int, ...], window: tuple[int, ...]) -> torch.Tensor:
    """Per whole tile: the raster positions of the box around it, widened by ``window`` per axis.

    Returns int64 [tiles, F] padded with -1 (boxes are clipped at the grid's edges).
    """
    counts = [g // t for g, t in zip(grid, tile)]
    raster = torch.arange(math.prod(grid), dtype=torch.int64).reshape(grid)
    boxes = []
    for corner in itertools.product(*(range(c) for c in counts)):
        box = tuple(slice(max(0, i * t - w // 2), min(g, (i + 1) * t + w - w // 2))
                    for i, t, w, g in zip(corner, tile, window, grid))
        boxes.append(raster[box].reshape(-1))
    width = max((b.numel() for b in boxes), default=0)
    out = torch.full((len(boxes), width), -1, dtype=torch.int64)
    for row, box in enumerate(boxes):
        out[row, : box.numel()] = box
    return out


@dataclass(frozen=True)
class SequenceShape:
    """How a model lays out one attention sequence: the generated grid, text length and order."""

    grid: tuple[int, ...]
    text_len: int
    text_first: bool  # [text, image] (FLUX) or [image, text] (HunyuanVideo)
    grid_first: bool = True  # generated tokens open the image stream; extra (reference) tokens follow
    # Where known, how many extra tokens precede the generated ones (the rest follow them): WAN
    # prepends a reference latent's tokens and newer ComfyUI appends context latents' tokens.
    extra_before: int | None = None


@dataclass(frozen=True)
class JointLayout:
    """Where the image/video and text tokens sit in one attention sequence, and their groups.

    ``query_order`` (int32, on the device) is the permutation handed to the attention kernels;
    ``image_order`` the permutation of the image stream alone (for MLPs that see only image
    tokens); ``forced_keys`` the key columns every query group always keeps: the text tokens
    ([F]) or, with a local window, per query group ([G, F], -1 padded).
    """

    n_tokens: int
    query_order: torch.Tensor
    image_order: torch.Tensor
    forced_keys: torch.Tensor
    tile: tuple[int, ...]

    def forced_below(self, n_keys: int) -> torch.Tensor:
        """Forced keys restricted to the first ``n_keys`` columns (masked-out text is dropped)."""
        if n_keys >= self.n_tokens:
            return self.forced_keys
        if self.forced_keys.dim() == 1:
            return self.forced_keys[self.forced_keys < n_keys]
        return torch.where(self.forced_keys < n_keys, self.forced_keys, -1)

    def forced_among(self, valid: torch.Tensor) -> torch.Tensor:
        """Forced keys as positions among the ``valid`` key columns (sorted original positions):
        the keys a mask dropped are dropped, the rest renumbered."""
        remap = torch.full((self.n_tokens + 1,), -1, dtype=torch.int64, device=valid.device)
        remap[valid.long()] = torch.arange(valid.numel(), device=valid.device)
        forced = self.forced_keys.to(valid.device)
        mapped = remap[torch.where(forced >= 0, forced, self.n_tokens)]
        return mapped[mapped >= 0] if forced.dim() == 1 else mapped


@functools.lru_cache(maxsize=32)
def _layout(text_len: int, grid: tuple[int, ...], image_len: int, text_first: bool, grid_first: bool,
            group: int, window: tuple[int, ...], device: str, extra_before: int = -1) -> JointLayout:
    grid_tokens = math.prod(grid) if grid else 0
    if grid_tokens > image_len:
        raise ValueError(f"token grid {grid} holds {grid_tokens} tokens but the image stream has {image_len}")
    if extra_before > image_len - grid_tokens:
        raise ValueError(f"{extra_before} extra tokens before a grid of {grid_tokens} do not fit an image stream "
                         f"of {image_len}")
    grid_start = extra_before if extra_before >= 0 else 0 if grid_first else image_len - grid_tokens
    tile = choose_tile(grid, group) if grid_tokens else ()
    grid_part = tile_order(grid, tile) if grid_tokens else torch.empty(0, dtype=torch.int64)
    others = torch.cat([torch.arange(0, grid_start), torch.arange(grid_start + grid_tokens, image_len)])
    image_order = torch.cat([grid_part + grid_start, others.to(torch.int64)])
    image_start = text_len if text_first else 0
    text_start = 0 if text_first else image_len
    text_positions = torch.arange(text_start, text_start + text_len, dtype=torch.int64)
    query_order = torch.cat([image_order + image_start, text_positions])
    forced = text_positions
    if window and grid_tokens:
        raw = local_window_keys(grid, tile, window)
        local = torch.where(raw >= 0, raw + image_start + grid_start, -1)
        n_groups = math.ceil((image_len + text_len) / group)
        forced = torch.full((n_groups, local.shape[1] + text_len), -1, dtype=torch.int64)
        forced[: local.shape[0], : local.shape[1]] = local
        forced[:, local.shape[1]:] = text_positions
    return JointLayout(
        n_tokens=image_len + text_len,
        query_order=query_order.to(device=device, dtype=torch.int32),
        image_order=image_order.to(device=device, dtype=torch.int32),
        forced_keys=forced.to(device),
        tile=tile,
    )


def joint_layout(text_len: int, grid: tuple[int, ...], image_len: int, text_first: bool, group: int,
                 device, grid_first: bool = True, window: tuple[int, ...] = (),
                 extra_before: int | None = None) -> JointLayout:
    """Layout of a [text, image] (``text_first``) or [image, text] sequence; cached per shape.

    ``grid_first``: the generated image's tokens open the image stream (extra tokens such as
    reference latents follow); otherwise they close it. ``extra_before``, where given, says
    instead how many extra tokens precede the generated ones (the others follow them).
    """
    return _layout(int(text_len), tuple(int(g) for g in grid), int(image_len), bool(text_first), bool(grid_first),
                   int(group), tuple(int(w) for w in window), str(torch.device(device)),
                   -1 if extra_before is None else int(extra_before))


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order.long()] = torch.arange(order.numel(), device=order.device, dtype=order.dtype)
    return inverse
