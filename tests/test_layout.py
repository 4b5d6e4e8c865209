"""Token-layout helpers of attnpatch._layout."""

from __future__ import annotations

import gc

import torch

from attnpatch._layout import _grid_from_ids


def flux_ids(rows: int, cols: int) -> torch.Tensor:
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(-1, 3)


def test_grid_of_new_ids_with_the_same_token_count_is_not_stale():
    # same shape, same version: a cache keyed on the address would return the freed tensor's
    # grid when the allocator hands its memory to the next one
    for _ in range(3):
        wide = flux_ids(64, 32)
        assert _grid_from_ids(wide, 64 * 32) == (1, 64, 32)
        del wide
        gc.collect()
        tall = flux_ids(32, 64)
        assert _grid_from_ids(tall, 32 * 64) == (1, 32, 64)
        del tall
        gc.collect()


def test_grid_is_recomputed_after_in_place_change():
    ids = flux_ids(4, 8)
    assert _grid_from_ids(ids, 32) == (1, 4, 8)
    ids.copy_(flux_ids(8, 4))
    assert _grid_from_ids(ids, 32) == (1, 8, 4)


def test_grid_of_inference_mode_ids_is_read_each_time():
    # inference tensors track no version: an in-place change must still be seen
    with torch.inference_mode():
        ids = flux_ids(4, 8)
        assert _grid_from_ids(ids, 32) == (1, 4, 8)
        ids.copy_(flux_ids(8, 4))
        assert _grid_from_ids(ids, 32) == (1, 8, 4)
