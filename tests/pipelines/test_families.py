"""attnpatch.pipelines.families against real diffusers models and pipelines built tiny from
configs (random weights, nothing downloaded): denoiser components, family lookup, joint-attention
text position, and the context-parallel plan."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import attnpatch
from attnpatch import scripting
from attnpatch.pipelines import (DENOISER_COMPONENTS, FAMILIES, denoiser_components, family_of,
                                 model_family, sharding_plan, text_position)
from attnpatch.pipelines.families import diffusers_cp_plan, processor_family
from attnpatch.pipelines.grid import GRID_SOURCES
from attnpatch.tiny_pipelines import KINDS, build_tiny_pipeline
from tests import tiny_models, zoo_models
from tests.pipelines.cases import ZOO_CASES, ZOO_IDS
from tests.tiny_models import counting_backend, run

pytest.importorskip("diffusers")

#: each tiny pipeline kind's denoiser components
TINY_DENOISERS = {"flux": ["transformer"], "sd": ["unet"], "sdxl": ["unet"],
                  "sd3": ["transformer"], "wan": ["transformer"]}


@pytest.fixture(scope="module")
def tiny_pipes():
    built = {}

    def get(kind):
        if kind not in built:
            built[kind] = build_tiny_pipeline(kind, size="test", seed=0)
        return built[kind]

    return get


def attention_processors(model: torch.nn.Module) -> list[str]:
    return [type(m.processor).__name__ for m in model.modules()
            if getattr(m, "processor", None) is not None]


def test_table_is_consistent():
    assert set(DENOISER_COMPONENTS) >= {"transformer", "transformer_2", "unet", "prior",
                                        "decoder"}
    for name, family in FAMILIES.items():
        assert family.name == name and family.models and family.components
        assert family.grid in GRID_SOURCES, name
        assert family.text in (None, "first", "last"), name
        assert set(family.components) <= set(DENOISER_COMPONENTS)


@pytest.mark.parametrize("kind", list(KINDS))
def test_tiny_pipeline_family_and_denoisers(kind, tiny_pipes):
    pipe = tiny_pipes(kind)
    assert family_of(pipe).name == kind
    found = denoiser_components(pipe)
    assert [name for name, _ in found] == TINY_DENOISERS[kind]
    assert all(model is getattr(pipe, name) for name, model in found)
    assert scripting.denoiser_names(pipe) == TINY_DENOISERS[kind]
    assert family_of(found[0][1]) is family_of(pipe)


def test_two_denoiser_wan_pipeline(tiny_pipes):
    from diffusers import WanPipeline

    pipe = tiny_pipes("wan")
    second = copy.deepcopy(pipe.transformer)
    two = WanPipeline(**{**pipe.components, "transformer_2": second}, boundary_ratio=0.5)
    assert denoiser_components(two) == [("transformer", two.transformer),
                                        ("transformer_2", second)]
    assert family_of(two).name == "wan" and family_of(two).components == ("transformer",
                                                                          "transformer_2")


def test_unet_families_told_apart_by_config():
    from diffusers import UNet2DModel

    sd, _ = tiny_models.sd15()
    sdxl, _ = tiny_models.sdxl()
    plain = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                        block_out_channels=(8, 16), norm_num_groups=8,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    assert model_family(sd).name == "sd"
    assert model_family(sdxl).name == "sdxl"
    assert model_family(plain).name == "unet"
    assert FAMILIES["sd"].components == FAMILIES["sdxl"].components == ("unet",)


def test_models_outside_the_table():
    from diffusers import FluxTransformer2DModel

    vae, _ = tiny_models.vae()
    assert model_family(vae) is None and family_of(vae) is None
    assert model_family(object()) is None

    class MyFlux(FluxTransformer2DModel):  # a subclass keeps its family
        pass

    model = MyFlux(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=8,
                   pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    assert model_family(model).name == "flux"


@pytest.mark.parametrize("which, text", [("flux", "first"), ("sd3", "last"), ("sd15", None),
                                         ("wan", None), ("pixart", None)])
def test_text_position_of_real_processors(which, text):
    model, _ = tiny_models.DIFFUSERS[which]()
    names = attention_processors(model)
    assert names and {text_position(n) for n in names} == {text}


def test_text_position_by_processor_name():
    assert text_position("PAGJointAttnProcessor2_0") == "last"        # SD3 with PAG
    assert text_position("FusedJointAttnProcessor2_0") == "last"
    assert text_position("SD3IPAdapterJointAttnProcessor2_0") == "last"
    assert text_position("FusedCogVideoXAttnProcessor2_0") == "first"
    assert processor_family("Flux2AttnProcessor").name == "flux2"     # longest prefix wins
    assert processor_family("FluxAttnProcessor").name == "flux"
    assert text_position("HunyuanAttnProcessor2_0") is None            # HunyuanDiT: no joint
    assert text_position("BriaFibo2AttnProcessor") is None             # self/cross only
    assert text_position("AttnProcessor2_0") is None


@pytest.mark.parametrize("family, name", ZOO_CASES, ids=ZOO_IDS)
def test_family_record_matches_the_real_model(family, name):
    """The model's class is in its family's record, and the processors of its joint attention
    put the text where the record says (a family without joint attention has none)."""
    model = zoo_models.build(name).model
    assert name in model_family(model).models
    positions = {text_position(n) for n in attention_processors(model)} - {None}
    expected = FAMILIES[family].text
    assert positions == ({expected} if expected else set())


@pytest.mark.parametrize("which, text", [("flux", "first"), ("sd3", "last")])
def test_patched_joint_attention_reports_the_family_text_position(which, text):
    model, kw = tiny_models.DIFFUSERS[which]()
    with counting_backend(record_layouts=True) as counting, \
            attnpatch.patch(model, backend="counting"):
        run(model, kw)
    joint = [layout for q, k, layout in counting.layouts if layout.text_tokens]
    assert joint and {layout.text_position for layout in joint} == {text}
    assert FAMILIES[which].text == text


def test_sharding_plan_is_diffusers_cp_plan():
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel

    flux, _ = tiny_models.flux()
    wan, _ = tiny_models.wan()
    flux_plan = sharding_plan(flux)
    assert flux_plan is FluxTransformer2DModel._cp_plan
    assert set(flux_plan) == {"", "proj_out"}
    assert set(flux_plan[""]) >= {"hidden_states", "encoder_hidden_states", "img_ids"}
    assert sharding_plan(wan) is WanTransformer3DModel._cp_plan and "rope" in sharding_plan(wan)
    assert sharding_plan(tiny_models.DIFFUSERS["pixart"]()[0]) is None


def test_own_sharding_plans_of_sd3_and_unets():
    """SD3: split after the patch and text embeddings, gather after proj_out; a UNet: in each
    Transformer2DModel, split at the first block, the text at every block, gather at the
    last (one entry per path and role, so a one-block model gets two entries on one path)."""
    sd3, _ = tiny_models.sd3()
    plan = sharding_plan(sd3)
    assert set(plan) == {"pos_embed", "context_embedder", "proj_out"}
    assert plan["pos_embed"][0].split_output and plan["proj_out"].gather_dim == 1
    sdxl, _ = tiny_models.sdxl()
    pairs = sharding_plan(sdxl)
    transformers = [n for n, m in sdxl.named_modules() if type(m).__name__ == "Transformer2DModel"]
    assert len(pairs) == 3 * len(transformers) and transformers
    first = transformers[0] + ".transformer_blocks"
    blocks = len(sdxl.get_submodule(first))
    assert pairs[:3] == [(f"{first}.0", pairs[0][1]), (f"{first}.*", pairs[1][1]),
                         (f"{first}.{blocks - 1}", pairs[2][1])]
    assert set(pairs[0][1]) == {"hidden_states"} and set(pairs[1][1]) == {"encoder_hidden_states"}
    assert type(pairs[2][1]).__name__ == "ContextParallelOutput"


def test_sharding_plan_outside_the_table_falls_back_to_diffusers():
    model = zoo_models.build("LTXVideoTransformer3DModel").model
    assert model_family(model) is None
    assert sharding_plan(model) is type(model)._cp_plan is not None


def test_a_family_sharding_plan_wins(monkeypatch):
    unet, _ = tiny_models.sd15()
    plan = {"": {"sample": "split on height"}}
    monkeypatch.setitem(FAMILIES, "sd", dataclasses.replace(FAMILIES["sd"],
                                                            sharding=lambda model: plan))
    assert sharding_plan(unet) is plan
    assert diffusers_cp_plan(unet) is None
