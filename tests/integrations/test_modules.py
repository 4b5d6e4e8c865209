"""Attention outside processors: processor-less attention modules (Mochi, Cosmos), SDPA and
F.multi_head_attention_forward called in a module's own forward (VAE blocks, attention pools),
torch.nn.MultiheadAttention, and hand-written softmax attention reported as not routed."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

import attnpatch
from attnpatch import AttnPatchError
from tests.tiny_models import counting_backend, no_attnpatch_state, randn, rel_error, seeded


def _first(out):
    return out[0] if isinstance(out, tuple) else getattr(out, "sample", out)


def _check_routed(model, call, modules: int, calls_each: int = 1, backend="counting"):
    """Patched == unpatched (1e-5), every module routed with its calls, unpatch bitwise."""
    with torch.no_grad():
        ref = _first(call())
    cls = {n: type(m) for n, m in model.named_modules()}
    with counting_backend() as counting, attnpatch.patch(model, backend=backend) as handle:
        with torch.no_grad():
            out = _first(call())
        report = handle.report()
    assert len(report) == modules, report
    assert all(r.routed and r.calls == calls_each for r in report), report
    assert counting.calls == modules * calls_each
    assert rel_error(out, ref) <= 1e-5
    with torch.no_grad():
        assert torch.equal(_first(call()), ref)
    assert {n: type(m) for n, m in model.named_modules()} == cls
    assert no_attnpatch_state(model) == []
    return report


# --- processor-less attention modules ---------------------------------------------------------

def test_mochi_attention_without_set_processor_is_routed_and_restored():
    from diffusers.models.transformers.transformer_mochi import (MochiAttention,
                                                                 MochiAttnProcessor2_0)
    attn = seeded(MochiAttention(query_dim=16, added_kv_proj_dim=12, heads=2, dim_head=8,
                                  processor=MochiAttnProcessor2_0()))
    assert not hasattr(attn, "set_processor")
    original = attn.processor
    x, ctx = randn(2, 9, 16, seed=1), randn(2, 5, 12, seed=2)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    report = _check_routed(attn, lambda: attn(x, encoder_hidden_states=ctx,
                                              attention_mask=mask), modules=1, calls_each=2)
    assert report[0].kind == "diffusers"
    assert attn.processor is original


def test_cosmos_causal_attention_without_set_processor_is_routed():
    from diffusers.models.autoencoders.autoencoder_kl_cosmos import (
        CosmosCausalAttention, CosmosSpatialAttentionProcessor2_0)
    attn = seeded(CosmosCausalAttention(num_attention_heads=2, attention_head_dim=16,
                                         processor=CosmosSpatialAttentionProcessor2_0()))
    original = attn.processor
    x = randn(1, 16, 2, 4, 4, seed=1)
    _check_routed(attn, lambda: attn(x), modules=1)
    assert attn.processor is original


def test_linear_attention_is_not_an_attention_module():
    """DC-AE's multiscale linear attention has a processor but no softmax attention."""
    from diffusers import AutoencoderDC
    model = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        upsample_block_type="interpolate", downsample_block_type="Conv",
        decoder_norm_types="rms_norm", decoder_act_fns="silu")
    with pytest.raises(AttnPatchError, match="no attention modules found in AutoencoderDC") as e:
        attnpatch.patch(model)
    assert "SanaMultiscaleLinearAttention x2" in str(e.value)


# --- attention in a module's own forward ------------------------------------------------------

def test_sdpa_in_vae_forward_is_routed():
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    vae = seeded(AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1], num_res_blocks=1,
                                   temperal_downsample=[False]))
    x = randn(1, 3, 1, 8, 8, seed=1)
    report = _check_routed(vae, lambda: vae(x), modules=2)
    assert {r.module_type for r in report} == {"WanAttentionBlock"}
    assert all(r.kind == "module" for r in report)


def test_multi_head_attention_forward_in_a_pool_is_routed():
    from diffusers.models.embeddings import HunyuanDiTAttentionPool
    pool = seeded(HunyuanDiTAttentionPool(spacial_dim=6, embed_dim=16, num_heads=2,
                                           output_dim=8))
    x = randn(2, 6, 16, seed=1)
    _check_routed(pool, lambda: pool(x), modules=1)


class _SpelledOut(torch.nn.Module):
    """Attention through the ``torch`` global: torch.nn.functional.scaled_dot_product_attention."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_sdpa_spelled_through_the_torch_global_is_routed():
    sdpa = torch.nn.functional.scaled_dot_product_attention
    model = seeded(_SpelledOut())
    x = randn(2, 5, 16, seed=1)
    _check_routed(model, lambda: model(x), modules=1)
    assert torch.nn.functional.scaled_dot_product_attention is sdpa  # torch itself untouched


class _WithMHA(torch.nn.Module):
    def __init__(self, batch_first: bool, kdim=None, bias_kv=False, add_zero_attn=False):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim,
                                                vdim=kdim, add_bias_kv=bias_kv,
                                                add_zero_attn=add_zero_attn)

    def forward(self, q, k, v, **kw):
        return self.attn(q, k, v, **kw)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("variant", ["self", "cross-kdim", "bias-kv-zero-attn", "masks"])
def test_multihead_attention_module_is_routed(batch_first, need_weights, variant):
    """Every form of nn.MultiheadAttention runs its attention through attnpatch (the fused fast
    path included: it is taken in eval/no_grad self-attention, batch_first), with weights when
    asked for."""
    model = seeded(_WithMHA(batch_first, kdim=12 if variant == "cross-kdim" else None,
                             bias_kv=variant == "bias-kv-zero-attn",
                             add_zero_attn=variant == "bias-kv-zero-attn"))
    shape = (lambda s, d: (2, s, d)) if batch_first else (lambda s, d: (s, 2, d))
    q = randn(*shape(7, 16), seed=1)
    kv = randn(*shape(5, 12), seed=2) if variant == "cross-kdim" else q
    kw = {"need_weights": need_weights}
    if variant == "masks":
        padding = torch.zeros(2, 7, dtype=torch.bool)
        padding[1, 5:] = True
        kw.update(key_padding_mask=padding,
                  attn_mask=torch.ones(7, 7, dtype=torch.bool).triu(1))  # True = masked
    with torch.no_grad():
        ref_out, ref_weights = model(q, kv, kv, **kw)
    with counting_backend() as counting, attnpatch.patch(model, backend="counting") as handle:
        with torch.no_grad():
            out, weights = model(q, kv, kv, **kw)
        report = handle.report()
    assert counting.calls == 1 and report[0].routed and report[0].calls == 1
    assert rel_error(out, ref_out) <= 1e-5
    if need_weights:
        assert torch.allclose(weights, ref_weights, atol=1e-6)
    else:
        assert weights is None and ref_weights is None
    with torch.no_grad():
        assert torch.equal(model(q, kv, kv, **kw)[0], ref_out)
    assert type(model.attn) is torch.nn.MultiheadAttention


def test_multihead_attention_gradients_through_attnpatch():
    model = seeded(_WithMHA(True)).train()
    q = randn(2, 7, 16, seed=1).requires_grad_()
    ref = model(q, q, q, need_weights=False)[0]
    ref_grads = torch.autograd.grad(ref.square().sum(), [q, *model.parameters()])
    with attnpatch.patch(model, backend="math") as handle:
        out = model(q, q, q, need_weights=False)[0]
        grads = torch.autograd.grad(out.square().sum(), [q, *model.parameters()])
        assert handle.report()[0].backend == "math"
    assert rel_error(out, ref) <= 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_error(g, r) <= 1e-5


def test_siglip_pooling_head_is_routed():
    from transformers import SiglipVisionConfig, SiglipVisionModel
    torch.manual_seed(0)
    model = seeded(SiglipVisionModel(SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=8, patch_size=4, num_channels=3)))
    x = randn(2, 3, 8, 8, seed=1)
    with torch.no_grad():
        ref = model(pixel_values=x).pooler_output
    with counting_backend() as counting, attnpatch.patch(model, backend="counting") as handle:
        with torch.no_grad():
            out = model(pixel_values=x).pooler_output
        report = handle.report().by_name()
    head = report["head.attention"]
    assert head.routed and head.calls == 1 and head.kind == "module"
    assert all(r.routed and r.calls == 1 for r in report.values())
    assert counting.calls == len(report) == 2
    assert rel_error(out, ref) <= 1e-5


# --- hand-written attention -------------------------------------------------------------------

def test_hand_written_attention_is_reported_not_routed():
    """ConsisID's perceiver computes softmax(q kᵀ) v itself: nothing to redirect, so the report
    lists it as not routed, naming the method, and the module runs as before."""
    from diffusers.models.transformers.consisid_transformer_3d import PerceiverAttention

    class Resampler(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.perceiver = PerceiverAttention(dim=16, dim_head=8, heads=2)
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x, latents):
            latents = self.perceiver(x, latents)
            return self.attn(latents, x, x, need_weights=False)[0]

    model = seeded(Resampler())
    x, latents = randn(2, 6, 16, seed=1), randn(2, 3, 16, seed=2)
    with torch.no_grad():
        ref = model(x, latents)
    with attnpatch.patch(model, backend="math") as handle:
        with torch.no_grad():
            out = model(x, latents)
        report = handle.report().by_name()
        assert "1/2 attention modules routed" in str(handle.report())
    assert report["attn"].routed and report["attn"].calls == 1
    perceiver = report["perceiver"]
    assert not perceiver.routed and perceiver.calls == 0
    assert "PerceiverAttention.forward" in perceiver.note and "by hand" in perceiver.note
    assert rel_error(out, ref) <= 1e-5


def test_only_hand_written_attention_raises_with_the_reason():
    from diffusers.models.transformers.consisid_transformer_3d import PerceiverAttention
    model = PerceiverAttention(dim=16, dim_head=8, heads=2)
    with pytest.raises(AttnPatchError, match="PerceiverAttention.forward"):
        attnpatch.patch(model)


# --- accelerate hooks -------------------------------------------------------------------------

def test_module_routed_under_an_accelerate_hook():
    """accelerate's hooks (cpu offload) keep the wrapped forward in ``_old_forward``: patching
    after the hook still routes, and unpatch gives the hook its original forward back."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
    model = seeded(_WithMHA(True))
    add_hook_to_module(model.attn, ModelHook())
    old = model.attn._old_forward
    q = randn(2, 7, 16, seed=1)
    with torch.no_grad():
        ref = model(q, q, q, need_weights=False)[0]
    with counting_backend() as counting, attnpatch.patch(model, backend="counting"):
        with torch.no_grad():
            out = model(q, q, q, need_weights=False)[0]
    assert counting.calls == 1
    assert rel_error(out, ref) <= 1e-5
    assert model.attn._old_forward == old
    remove_hook_from_module(model.attn)
    assert type(model.attn) is torch.nn.MultiheadAttention


class _AnyRank(torch.nn.Module):
    """F.scaled_dot_product_attention on (..., S, D) inputs of rank 3 and 5, with masks."""

    def forward(self, q3, k3, v3, mask3, q5, k5, v5, mask5):
        a = torch.nn.functional.scaled_dot_product_attention(q3, k3, v3, attn_mask=mask3)
        b = torch.nn.functional.scaled_dot_product_attention(q5, k5, v5, attn_mask=mask5,
                                                             is_causal=False)
        return a, b


def test_sdpa_of_any_rank_is_routed():
    model = _AnyRank()
    q3, k3, v3 = randn(3, 7, 8, seed=1), randn(3, 5, 8, seed=2), randn(3, 5, 6, seed=3)
    mask3 = randn(7, 5, seed=4)  # float bias broadcast over the batch dim
    q5, k5, v5 = (randn(2, 3, 2, 7, 8, seed=s) for s in (5, 6, 7))
    mask5 = randn(2, 3, 1, 1, 7, seed=8) > -0.5  # bool, broadcast over heads and queries
    args = (q3, k3, v3, mask3, q5, k5, v5, mask5)
    ref = model(*args)
    with counting_backend() as counting, attnpatch.patch(model, backend="counting") as handle:
        out = model(*args)
        assert handle.report()[0].calls == 2
    assert counting.calls == 2
    for o, r in zip(out, ref):
        assert o.shape == r.shape and rel_error(o, r) <= 1e-5


class _FlexOnly(torch.nn.Module):
    def forward(self, q, k, v, block_mask):
        return dispatch_attention_fn(q, k, v, attn_mask=block_mask, backend="flex")


def test_flex_block_mask_from_a_diffusers_processor_runs_on_flex():
    """diffusers processors that require its flex backend pass a BlockMask as attn_mask: it
    becomes flex's block_mask option (auto picks flex; sdpa says it can't take it)."""
    from torch.nn.attention.flex_attention import create_block_mask
    model = _FlexOnly()
    q, k, v = (randn(1, 128, 2, 16, seed=s) for s in (1, 2, 3))  # (B, S, H, D)
    block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 128, 128,
                                   device="cpu")
    ref = model(q, k, v, block_mask)
    with attnpatch.patch(model) as handle:
        out = model(q, k, v, block_mask)
        assert handle.report()[0].backend == "flex"
        handle.set_backend("sdpa")
        with pytest.raises(AttnPatchError, match="block_mask"):
            model(q, k, v, block_mask)
    assert rel_error(out, ref) <= 1e-5
