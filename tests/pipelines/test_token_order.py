"""attnpatch.pipelines.token_order: which denoisers get a per-forward token-order plan (tiny
real diffusers models), and how a plan finds the token dim of a tensor."""

from __future__ import annotations

import pytest
import torch

from attnpatch.pipelines.families import token_order_plan
from attnpatch.pipelines.token_order import IMG_IDS, SD3, WAN, Tokens, token_dim
from tests import tiny_models, zoo_models

pytest.importorskip("diffusers")


@pytest.mark.parametrize("name, plan", [("flux", IMG_IDS), ("wan", WAN), ("sd3", SD3),
                                        ("pixart", None), ("sd15", None)])
def test_each_family_gets_its_plan(name, plan):
    model, _ = getattr(tiny_models, name)()
    assert token_order_plan(model) is plan
    if plan is not None:
        for path in plan.paths():  # every place the plan names is in the model
            model.get_submodule(path)


def test_wan_variants_with_tokens_the_plan_does_not_cover_get_none():
    """VACE adds control tokens with their own blocks: no plan (its calls reorder per call)."""
    case = zoo_models.build("WanVACETransformer3DModel")
    assert token_order_plan(case.model) is None


def test_token_dim_finds_the_token_axis_of_each_table_format():
    rope = Tokens("rope", output=True, dims=(1, 2), ndim=4)
    assert token_dim(torch.zeros(1, 30, 1, 8), rope, 30) == 1  # (cos, sin): (1, N, 1, D)
    assert token_dim(torch.zeros(1, 1, 30, 4, dtype=torch.complex64), rope, 30) == 2  # older
    per_token = Tokens("condition_embedder", output=True, index=1, ndim=3)
    assert token_dim(torch.zeros(2, 30, 12), per_token, 30) == 1   # Wan 2.2 TI2V
    assert token_dim(torch.zeros(2, 30), per_token, 30) is None    # per sample: not tokens
    assert token_dim(torch.zeros(30, 3), Tokens(name="img_ids", dims=(-2,)), 30) == -2
