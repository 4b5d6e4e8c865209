"""Gradient checkpointing recomputes a denoiser's blocks in backward, after its forward has
returned: the blocks must see the forward's token layout and strategy state there too, or a
layout-reading strategy computes another function (silently wrong gradients) or refuses."""

from __future__ import annotations

import pytest
import torch

import attnpatch

from ..tiny_models import flux, sd3, wan

CASES = {
    # joint text first: the recompute must still know the text tokens (dense rows)
    "dilated_flux": (flux, dict(backend="dilated", segment_lengths=(4, 16),
                                dilation_rates=(1, 2), inner="math")),
    "dilated_grid_wan": (wan, dict(backend="dilated", grid="3d",
                                   segment_lengths=((1, 2, 2),), dilation_rates=((1, 1, 2),),
                                   inner="math")),
    # tokens put in tile order once per forward: the recompute must find them in that order
    "block_sparse_tile_order_flux": (flux, dict(backend="block_sparse", pattern="tile2d",
                                                tile=(2, 2), window=(1, 1))),
    # the first block's pre-hook puts the tokens in tile order inside the checkpointed block:
    # its recompute must find the forward's order too
    "block_sparse_tile_order_wan": (wan, dict(backend="block_sparse", pattern="tile3d",
                                              tile=(1, 2, 2), window=(2, 1, 1))),
    "block_sparse_tile_order_sd3": (sd3, dict(backend="block_sparse", pattern="tile2d",
                                              tile=(3, 3), window=(2, 1))),
}


def _input_grad(model, kw, checkpointing: bool, options: dict) -> tuple:
    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    model.zero_grad()
    with attnpatch.patch(model, **options):
        hidden = kw["hidden_states"].clone().requires_grad_()
        out = model(**{**kw, "hidden_states": hidden})[0]
        (grad,) = torch.autograd.grad(out.sum(), hidden)
    return out.detach(), grad


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpointed_blocks_recompute_with_the_forwards_layout(case):
    factory, options = CASES[case]
    model, kw = factory()
    model.train()
    out, grad = _input_grad(model, kw, True, options)
    ref_out, ref_grad = _input_grad(model, kw, False, options)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)


def test_the_checkpoint_function_is_only_wrapped_during_a_forward():
    """The patch wraps diffusers' checkpoint function for the length of each forward only:
    between forwards and after unpatch the model holds its own function."""
    model, kw = flux()
    model.train()
    model.enable_gradient_checkpointing()
    own = {m: m._gradient_checkpointing_func for m in model.modules()
           if hasattr(m, "gradient_checkpointing")}
    with attnpatch.patch(model, backend="sdpa"):
        model(**kw)
        assert all(m._gradient_checkpointing_func is f for m, f in own.items())
    assert all(m._gradient_checkpointing_func is f for m, f in own.items())
