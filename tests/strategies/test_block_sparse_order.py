"""block_sparse's tile order once per denoiser forward (``reorder="auto"``) on models that
patchify inside their forward (Wan, SD3): the same function as reordering in every attention
call (``reorder="call"``), forward and gradients, with gradient checkpointing and under
torch.compile; the attention really receives its tokens (and rotary tables) in tile order; the
hooks go with the patch. Tiny real diffusers models in float64, ragged tiles."""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch.strategies import _block_patterns as P
from attnpatch.strategies import block_sparse as BSP

from ..tiny_models import flux, no_attnpatch_state, randn, rel_error, sd3, seeded

BS = "block_sparse"
B = 2
WAN_GRID = (3, 5, 6)  # latent (3, 10, 12) patchified by (1, 2, 2): ragged on every tile axis


def _double(kw: dict) -> dict:
    def f64(v):
        if isinstance(v, list):
            return [f64(x) for x in v]
        return v.double() if torch.is_tensor(v) and v.is_floating_point() else v
    return {k: f64(v) for k, v in kw.items()}


def wan(per_token_timestep: bool = False):
    """A two-block Wan in float64 (rotary tables, modulation, cross-attention to text);
    ``per_token_timestep``: Wan 2.2 TI2V's timestep per token (per-token modulation)."""
    from diffusers import WanTransformer3DModel
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    tokens = 3 * 5 * 6
    timestep = (torch.arange(B * tokens).reshape(B, tokens) % 17 if per_token_timestep
                else torch.tensor([10, 20]))
    kw = dict(hidden_states=randn(B, 4, 3, 10, 12, seed=1), timestep=timestep,
              encoder_hidden_states=randn(B, 7, 16, seed=2))
    return seeded(model).double(), _double(kw)


def sd3_double(controlnet: bool = False):
    """SD3 (text last) in float64; ``controlnet``: with ControlNet residuals (one per block,
    added to the image tokens)."""
    model, kw = sd3()
    if controlnet:
        kw["block_controlnet_hidden_states"] = [randn(B, 64, 16, seed=5 + i) for i in range(2)]
    return seeded(model).double(), _double(kw)


def flux_controlnet():
    """Flux (text first, ``img_ids``) in float64 with ControlNet residuals for both kinds of
    block."""
    model, kw = flux()
    kw["controlnet_block_samples"] = [randn(B, 16, 32, seed=5)]
    kw["controlnet_single_block_samples"] = [randn(B, 16, 32, seed=6)]
    return seeded(model).double(), _double(kw)


CASES = {
    "wan": (wan, dict(pattern="tile3d", tile=(2, 2, 4), window=(1, 2, 1))),
    "wan_ti2v": (lambda: wan(per_token_timestep=True),
                 dict(pattern="tile3d", tile=(2, 2, 4), window=(1, 2, 1))),
    "sd3": (sd3_double, dict(pattern="tile2d", tile=(3, 3), window=(2, 1))),  # text last
    "sd3_controlnet": (lambda: sd3_double(controlnet=True),
                       dict(pattern="tile2d", tile=(3, 3), window=(2, 1))),
    "flux_controlnet": (flux_controlnet, dict(pattern="tile2d", tile=(2, 3), window=(1, 1))),
}
GRAD_INPUTS = ("hidden_states", "encoder_hidden_states")


def _forward_backward(model, kw: dict, options: dict, checkpointing: bool = False):
    """Output, input gradients and parameter gradients of a weighted sum of the output."""
    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    model.zero_grad(set_to_none=True)
    kw = {k: v.clone().requires_grad_() if k in GRAD_INPUTS else v for k, v in kw.items()}
    with attnpatch.patch(model, backend=BS, **options):
        out = model(**kw)[0]
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3),
                             dtype=out.dtype)
        (out * weight).sum().backward()
    grads = {k: kw[k].grad for k in GRAD_INPUTS}
    grads.update({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    return out.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_order_once_per_forward_equals_reordering_per_call(case, checkpointing):
    factory, options = CASES[case]
    model, kw = factory()
    BSP._PLANS.clear()
    out, grads = _forward_backward(model, kw, dict(options, reorder="auto"), checkpointing)
    assert any("preordered" in plan.lists for plan in BSP._PLANS.values())  # it did reorder
    ref, ref_grads = _forward_backward(model, kw, dict(options, reorder="call"))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref_grads.keys() and len(grads) > len(GRAD_INPUTS)
    for name, grad in grads.items():  # Wan's FP32LayerNorm sums its weight grads in float32
        assert rel_error(grad, ref_grads[name]) <= 1e-6, name
    model.disable_gradient_checkpointing()
    with torch.no_grad():
        dense = model(**kw)[0]
    assert (out - dense).abs().max() > 1e-3  # sparse: not the dense model


def test_a_flux_controlnet_is_ordered_per_call():
    """``FluxControlNetModel`` takes ``hidden_states`` and ``img_ids`` like Flux, but its
    ``controlnet_cond`` image tokens enter and its per-block residuals leave where the Flux
    plan does not cover them: it gets no per-forward plan, and its calls permute themselves
    (with the plan, its conditioning was added in the wrong order: 0.07 off)."""
    from diffusers import FluxControlNetModel

    from attnpatch.pipelines.families import token_order_plan
    model = seeded(FluxControlNetModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
        axes_dims_rope=[4, 4, 8])).double()
    _, kw = flux_controlnet()
    kw = {k: v for k, v in kw.items() if not k.startswith("controlnet_")}
    kw["controlnet_cond"] = randn(B, kw["hidden_states"].shape[1], 4, seed=7).double()
    assert token_order_plan(model) is None
    options = dict(pattern="tile2d", tile=(2, 3), window=(1, 1))
    outs = {}
    for reorder in ("auto", "call"):
        with torch.no_grad(), attnpatch.patch(model, backend=BS, reorder=reorder, **options):
            blocks, single = model(**kw, return_dict=False)
        outs[reorder] = torch.cat([*blocks, *single], 1)
    torch.testing.assert_close(outs["auto"], outs["call"], rtol=1e-12, atol=1e-12)


def test_dense_steps_read_a_per_token_timestep_by_its_largest_entry():
    """Wan 2.2 TI2V passes a timestep per token, 0 for the conditioning frame's tokens at
    every step: the step is read from the largest entry (from the first, no step ever
    advanced and every step ran dense)."""
    model, kw = wan(per_token_timestep=True)
    tokens = kw["timestep"].shape[1]

    def at(t):
        timestep = torch.full((B, tokens), float(t), dtype=torch.float64)
        timestep[:, :30] = 0  # the first frame's tokens
        return {**kw, "timestep": timestep}
    with torch.no_grad():
        dense = [model(**at(t))[0] for t in (900, 500)]
        with attnpatch.patch(model, backend=BS, pattern="tile3d", tile=(2, 2, 4),
                             window=(1, 2, 1), dense_steps=1):
            outs = [model(**at(t))[0] for t in (900, 500)]
    assert rel_error(outs[0], dense[0]) <= 1e-12 and rel_error(outs[1], dense[1]) > 1e-4


def _tile_perm(grid: tuple, tile: tuple) -> torch.Tensor:
    return P.tile_layout(P.Geometry(grid[0] * grid[1] * grid[2], 0, "none", grid), tile,
                         (1, 1, 1), True, "cpu").perm


def test_self_attention_receives_tokens_and_rotary_tables_in_tile_order():
    """What the last block's self-attention module gets: with ``reorder="auto"`` its tokens and
    rotary tables are the per-call ones in tile order, and the call runs the plan that permutes
    nothing (the tokens are already in kernel order)."""
    model, kw = wan()
    options = CASES["wan"][1]
    seen = {}

    def grab(module, args, kwargs):
        seen[mode] = (args[0].clone(), [t.clone() for t in args[3]])

    handle = model.blocks[1].attn1.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for mode in ("call", "auto"):
            BSP._PLANS.clear()
            with attnpatch.patch(model, backend=BS, reorder=mode, **options):
                with torch.no_grad():
                    model(**kw)
            plans = [p for p in BSP._PLANS.values() if p.order is not None]
            assert len(plans) == 1
            assert ("preordered" in plans[0].lists) == (mode == "auto")
    finally:
        handle.remove()
    perm = _tile_perm(WAN_GRID, options["tile"])
    assert not torch.equal(perm, torch.arange(perm.numel()))
    hidden, rotary = seen["auto"]
    assert torch.equal(hidden, seen["call"][0].index_select(1, perm))
    assert len(rotary) == 2 and all(torch.equal(t, c.index_select(1, perm))
                                    for t, c in zip(rotary, seen["call"][1]))


def test_hooks_are_installed_for_tile_patterns_with_auto_only_and_leave_with_the_patch():
    model, kw = wan()
    paths = ("", "rope", "condition_embedder", "blocks.0", "norm_out")

    def hooked() -> set:
        return {p for p in paths if model.get_submodule(p)._forward_pre_hooks
                or model.get_submodule(p)._forward_hooks}

    before = hooked()
    with attnpatch.patch(model, backend=BS, **CASES["wan"][1]):
        assert hooked() - before == set(paths[1:]) | ({""} - before)
    assert hooked() == before and not no_attnpatch_state(model)
    for options in (dict(CASES["wan"][1], reorder="call"), dict(pattern="local1d")):
        with attnpatch.patch(model, backend=BS, **options):
            assert not hooked() - {""}


def test_a_forward_that_raises_leaves_no_tile_order_behind():
    model, kw = wan()
    with attnpatch.patch(model, backend=BS, **CASES["wan"][1]):
        with pytest.raises(RuntimeError), torch.no_grad():
            model(**{**kw, "encoder_hidden_states": kw["encoder_hidden_states"][..., :5]})
        assert BSP._PREORDERED.get() is None
        with torch.no_grad():
            model(**kw)
        assert BSP._PREORDERED.get() is None


def test_a_pre_hook_that_raises_before_the_order_hook_leaves_the_outer_forwards_entry():
    """torch runs the order hook's post even when an earlier pre-hook raised and its pre never
    ran: the post must not pop (and reset) an outer reordered forward's entry."""
    model, kw = wan()

    def refuse(module, args, kwargs):
        raise RuntimeError("an earlier pre-hook refuses")
    with attnpatch.patch(model, backend=BS, **CASES["wan"][1]):
        handle = model.register_forward_pre_hook(refuse, with_kwargs=True, prepend=True)
        outer = (object(), None)
        reset = BSP._ORDER_TOKENS.var.set((outer,))
        try:
            with pytest.raises(RuntimeError, match="earlier pre-hook"), torch.no_grad():
                model(**kw)
            assert BSP._ORDER_TOKENS.var.get() == (outer,)
        finally:
            BSP._ORDER_TOKENS.var.reset(reset)
            handle.remove()


@pytest.mark.parametrize("fullgraph", [False, True])
@pytest.mark.parametrize("case", ["wan", "sd3"])
def test_torch_compile_of_the_model_matches_eager(case, fullgraph):
    """Under torch.compile the hooks step aside (no ContextVar in a trace) and the calls
    reorder themselves: the compiled model computes what the eager one does."""
    import torch._dynamo
    factory, options = CASES[case]
    model, kw = factory()
    torch._dynamo.reset()
    try:
        with attnpatch.patch(model, backend=BS, **options):
            with torch.no_grad():
                eager = model(**kw)[0]
                compiled = torch.compile(model, backend="eager", fullgraph=fullgraph)(**kw)[0]
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)


def test_threads_running_one_patched_model_each_keep_their_forwards_order():
    """The hooks keep each forward's ContextVar token in that thread's context: forwards of one
    model in two threads at once interleave their hooks without resetting each other's."""
    import threading
    model, kw = wan()
    results: list = []
    errors: list = []

    def work():
        try:
            for _ in range(3):
                with torch.no_grad():
                    results.append(model(**kw)[0])
        except Exception as err:  # surfaced in the main thread below
            errors.append(err)

    with attnpatch.patch(model, backend=BS, **CASES["wan"][1]):
        with torch.no_grad():
            want = model(**kw)[0]
        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert len(results) == 6 and all(torch.equal(r, want) for r in results)
