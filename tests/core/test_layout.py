"""Token reordering: tiles are compact, and every order is an exact permutation."""

import math

import pytest
import torch

from chipmunk_pack.chipmunk_core.layout import (choose_tile, inverse_permutation, joint_layout, local_window_keys,
                                                tile_order)


def _is_permutation(order, n):
    return torch.equal(torch.sort(order.long()).values, torch.arange(n))


@pytest.mark.parametrize("grid", [(64, 64), (48, 80), (13, 7), (1, 5), (33, 45, 80), (5, 7, 9), (2, 3, 4)])
@pytest.mark.parametrize("group", [192, 128, 64])
def test_tile_order_is_a_permutation_with_whole_tiles_first(grid, group):
    tile = choose_tile(grid, group)
    assert math.prod(tile) == group
    order = tile_order(grid, tile)
    n = math.prod(grid)
    assert _is_permutation(order, n)
    assert torch.equal(order[inverse_permutation(order)], torch.arange(n))
    # Each whole tile is one contiguous group whose tokens span exactly the tile's box.
    n_tiles = math.prod(g // t for g, t in zip(grid, tile))
    coords = torch.stack(torch.unravel_index(order[: n_tiles * group], grid), dim=-1).reshape(n_tiles, group, len(grid))
    extent = coords.amax(1) - coords.amin(1) + 1
    assert torch.equal(extent, torch.tensor(tile).expand_as(extent))


def test_choose_tile_prefers_no_remainder_then_compact():
    assert choose_tile((64, 64), 64) == (8, 8)
    assert choose_tile((24, 48), 192) in {(12, 16), (8, 24), (16, 12), (24, 8)}
    assert math.prod(choose_tile((30, 45, 80), 192)) == 192


@pytest.mark.parametrize("text_first,grid_first", [(True, True), (False, False), (False, True)])
def test_joint_layout_orders_image_then_text_and_forces_text(text_first, grid_first):
    text_len, grid, extra = 7, (6, 10), 5
    image_len = math.prod(grid) + extra
    layout = joint_layout(text_len, grid, image_len, text_first, 16, "cpu", grid_first=grid_first)
    n = image_len + text_len
    assert _is_permutation(layout.query_order, n)
    assert _is_permutation(layout.image_order, image_len)
    text = torch.arange(text_len) + (0 if text_first else image_len)
    assert torch.equal(layout.forced_keys, text)
    assert torch.equal(layout.query_order[-text_len:].long(), text)  # text queries close the order
    first_grid_token = 0 if grid_first else extra
    tile_tokens = math.prod(layout.tile)
    first_tile = layout.image_order[:tile_tokens].long() - first_grid_token
    assert first_tile.min() >= 0 and first_tile.max() < math.prod(grid)


@pytest.mark.parametrize("before", [0, 3, 5])
def test_extra_tokens_on_both_sides_of_the_grid(before):
    """WAN: a reference latent's tokens before the video's, newer ComfyUI's context latents after."""
    grid, extra = (4, 6, 8), 5
    image_len = math.prod(grid) + extra
    layout = joint_layout(0, grid, image_len, False, 48, "cpu", grid_first=False, extra_before=before)
    assert _is_permutation(layout.image_order, image_len)
    grid_part = layout.image_order[:math.prod(grid)].long()
    assert grid_part.min() == before and grid_part.max() == before + math.prod(grid) - 1
    rest = sorted(layout.image_order[math.prod(grid):].tolist())
    assert rest == list(range(before)) + list(range(before + math.prod(grid), image_len))
    with pytest.raises(ValueError, match="do not fit"):
        joint_layout(0, grid, image_len, False, 48, "cpu", extra_before=extra + 1)


def test_local_window_covers_the_tile_and_its_neighbourhood():
    grid, tile, window = (8, 12, 16), (4, 6, 8), (2, 2, 2)
    keys = local_window_keys(grid, tile, window)
    order = tile_order(grid, tile)
    assert keys.shape[0] == math.prod(g // t for g, t in zip(grid, tile))
    for row in range(keys.shape[0]):
        box = set(keys[row][keys[row] >= 0].tolist())
        assert set(order[row * 192:(row + 1) * 192].tolist()) <= box
        assert len(box) <= math.prod(t + w for t, w in zip(tile, window))


def test_joint_layout_with_window_keeps_text_and_pads_remainder_groups():
    layout = joint_layout(3, (5, 6, 8), 240, False, 48, "cpu", window=(2, 2, 2))
    forced = layout.forced_keys
    assert forced.dim() == 2 and forced.shape[0] == math.ceil(243 / 48)
    assert (forced[:, -3:] == torch.arange(240, 243)).all()
    assert forced.max() < 243
