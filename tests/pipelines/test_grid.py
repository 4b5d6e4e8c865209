"""attnpatch.pipelines.grid: the latent grid and text length of real denoiser forwards (tiny
diffusers models from configs, random weights), from each grid source a family names."""

from __future__ import annotations

import math

import pytest
import torch

import attnpatch
from attnpatch.pipelines import FAMILIES, forward_info, model_family
from attnpatch.pipelines.grid import GRID_SOURCES, patch_sizes
from tests import tiny_models, zoo_models
from tests.pipelines.cases import ZOO_CASES, ZOO_IDS, seen_by_forward
from tests.tiny_models import counting_backend, run

pytest.importorskip("diffusers")

#: zoo models whose forward has no single grid (reason)
NO_GRID = {"JoyImageEditPlusTransformer3DModel":
           "several images per sample: 6-D latents and a shape_list"}


def info_of(model, kwargs, call=None):
    args, kw = seen_by_forward(model, kwargs, call)
    return forward_info(model, args, kw)


def test_patch_sizes():
    assert patch_sizes({}) == (1, 1, 1)
    assert patch_sizes({"patch_size": 2}) == (1, 2, 2)
    assert patch_sizes({"patch_size": 2, "patch_size_t": 2}) == (2, 2, 2)
    assert patch_sizes({"patch_size": (1, 2, 2)}) == (1, 2, 2)
    assert patch_sizes({"patch_size": [2, 4], "patch_size_t": 3}) == (3, 2, 4)


def test_flux_grid_from_img_ids():
    model, kw = tiny_models.flux()
    assert FAMILIES["flux"].grid == "img_ids"
    info = info_of(model, kw)
    assert (info.image_tokens, info.text_tokens) == (16, 7)
    assert info.grid() == (1, 4, 4)


def test_flux_ids_of_another_shape():
    model, kw = tiny_models.flux()
    kw = dict(kw, hidden_states=tiny_models.randn(2, 8 * 2, 4), img_ids=tiny_models.flux_ids(2, 8))
    assert info_of(model, kw).grid() == (1, 2, 8)


def test_flux2_grid_from_thwl_ids():
    case = zoo_models.build("Flux2Transformer2DModel")
    assert case.kwargs["img_ids"].shape[-1] == 4  # (t, h, w, l)
    info = info_of(case.model, case.kwargs)
    assert info.grid() == (1, 4, 4) and info.image_tokens == 16


def test_flux2_patched_layout_has_the_grid():
    case = zoo_models.build("Flux2Transformer2DModel")
    with counting_backend(record_layouts=True) as counting, \
            attnpatch.patch(case.model, backend="counting"):
        run(case.model, case.kwargs)
    joint = [layout for q, k, layout in counting.layouts if layout.text_tokens]
    assert joint and all(layout.grid == (1, 4, 4) and layout.text_position == "first"
                         for layout in joint)


def test_qwenimage_grid_from_img_shapes():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6)).eval()
    kw = dict(hidden_states=tiny_models.randn(2, 2 * 8, 16),
              encoder_hidden_states=tiny_models.randn(2, 7, 16),
              encoder_hidden_states_mask=torch.ones(2, 7), timestep=torch.tensor([0.5, 0.5]),
              img_shapes=[[(1, 2, 8)]] * 2)
    assert FAMILIES["qwenimage"].grid == "img_shapes"
    info = info_of(model, kw)
    assert info.grid() == (1, 2, 8) and (info.image_tokens, info.text_tokens) == (16, 7)


def test_wan_grid_from_5d_latents():
    model, kw = tiny_models.wan()  # (B, C, F=2, H=8, W=8), patch (1, 2, 2)
    info = info_of(model, kw)
    assert info.grid() == (2, 4, 4) and (info.image_tokens, info.text_tokens) == (32, 7)


def test_cogvideox_frames_second():
    case = zoo_models.build("CogVideoXTransformer3DModel")
    b, f, c, h, w = case.kwargs["hidden_states"].shape  # (B, F, C, H, W)
    assert c == case.model.config.in_channels
    p = case.model.config.patch_size
    assert info_of(case.model, case.kwargs).grid() == (f, h // p, w // p)


def test_unet_grid_from_positional_sample():
    model, kw = tiny_models.sd15()
    args = (kw["sample"], kw["timestep"], kw["encoder_hidden_states"])
    info = info_of(model, {}, call=lambda m, _: m(*args))
    assert info.grid() == (1, 16, 16) and (info.image_tokens, info.text_tokens) == (256, 7)


def test_unet_levels_from_the_input_grid():
    """SDXL-style UNet: attention only at the second level, half the input grid."""
    model, kw = tiny_models.sdxl()
    assert info_of(model, kw).grid() == (1, 16, 16)
    with counting_backend(record_layouts=True) as counting, \
            attnpatch.patch(model, backend="counting"):
        run(model, kw)
    assert {layout.grid for q, k, layout in counting.layouts} == {(1, 8, 8)}


def test_sd3_grid_is_latents_over_patch():
    model, kw = tiny_models.sd3()
    assert info_of(model, kw).grid() == (1, 8, 8)


def test_packed_tokens_without_a_source_give_the_count():
    model, kw = tiny_models.flux()
    kw = {k: v for k, v in kw.items() if k != "img_ids"}
    info = forward_info(model, (), kw)
    assert info.grid() is None and info.image_tokens == 16


@pytest.mark.parametrize("family, name", ZOO_CASES, ids=ZOO_IDS)
def test_family_grid_source_describes_the_real_forward(family, name):
    """The grid source a family names gives the grid of its models' real forwards, and
    forward_info uses it."""
    if name in NO_GRID:
        pytest.skip(NO_GRID[name])
    case = zoo_models.build(name)
    args, kw = seen_by_forward(case.model, case.kwargs, case.call)
    hs = kw.get("hidden_states", kw.get("sample", args[0] if args else None))
    assert model_family(case.model) is not None
    source = GRID_SOURCES[model_family(case.model).grid]
    info = source(case.model, hs, kw, 0)
    assert info is not None and info.grid() is not None
    assert math.prod(info.grid()) == info.image_tokens
    assert forward_info(case.model, args, kw).grid() == info.grid()
