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


@dataclass(frozen=True)
class JointLayout:
    """Where the image/video and text tokens sit in one attention sequence, and their groups.

    ``query_order`` (int32, on the device) is the permutation handed to the attention kernels;
    ``text_positions`` (int64) are the key columns every query group always keeps; ``image_order``
    is the permutation of the image stream alone (for MLPs that see only image tokens).
    """

    n_tokens: int
    query_order: torch.Tensor
    image_order: torch.Tensor
    text_positions: torch.Tensor
    tile: tuple[int, ...]


@functools.lru_cache(maxsize=32)
def _layout(text_len: int, grid: tuple[int, ...], image_len: int, text_first: bool, group: int,
            device: str) -> JointLayout:
    grid_tokens = math.prod(grid) if grid else 0
    if grid_tokens > image_len:
        raise ValueError(f"token grid {grid} holds {grid_tokens} tokens but the image stream has {image_len}")
    tile = choose_tile(grid, group) if grid_tokens else ()
    grid_part = tile_order(grid, tile) if grid_tokens else torch.empty(0, dtype=torch.int64)
    image_order = torch.cat([grid_part, torch.arange(grid_tokens, image_len, dtype=torch.int64)])
    image_start = text_len if text_first else 0
    text_start = 0 if text_first else image_len
    text_positions = torch.arange(text_start, text_start + text_len, dtype=torch.int64)
    query_order = torch.cat([image_order + image_start, text_positions])
    return JointLayout(
        n_tokens=image_len + text_len,
        query_order=query_order.to(device=device, dtype=torch.int32),
        image_order=image_order.to(device=device, dtype=torch.int32),
        text_positions=text_positions.to(device),
        tile=tile,
    )


def joint_layout(text_len: int, grid: tuple[int, ...], image_len: int, text_first: bool, group: int,
                 device) -> JointLayout:
    """Layout of a [text, image] (``text_first``) or [image, text] sequence; cached per shape."""
    return _layout(int(text_len), tuple(int(g) for g in grid), int(image_len), bool(text_first), int(group),
                   str(torch.device(device)))


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order.long()] = torch.arange(order.numel(), device=order.device, dtype=order.dtype)
    return inverse
