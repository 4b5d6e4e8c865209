"""The flex backend: option values checked at the call, calls torch's flex refuses made to work."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

import attnpatch

from ..conftest import make_inputs, reference, rel_error

BAD_OPTIONS = [
    ("score_mod", 5, "score_mod must be a callable"),
    ("mask_mod", "x", "mask_mod must be a callable"),
    ("block_mask", 5, "block_mask must be a BlockMask"),
    ("block_mask", torch.ones(8, 8, dtype=torch.bool), "block_mask must be a BlockMask"),
    ("compile", "yes", "compile must be a bool"),
    ("compile", 1, "compile must be a bool"),
    ("kernel_options", 3, "kernel_options must be a dict"),
]


@pytest.mark.parametrize("option,value,message", BAD_OPTIONS,
                         ids=[f"{o}={type(v).__name__}" for o, v, _ in BAD_OPTIONS])
def test_bad_option_values_raise_before_the_kernel_runs(option, value, message):
    q, k, v, _ = make_inputs(seq_q=8, head_dim=16)
    scored = []

    def watch(score, b, h, q_idx, kv_idx):  # eager flex on CPU calls it: the kernel ran
        scored.append(1)
        return score

    options = {option: value} if option == "score_mod" else {option: value, "score_mod": watch}
    with pytest.raises(attnpatch.AttnPatchError, match=message):
        attnpatch.attention(q, k, v, backend="flex", **options)
    with pytest.raises(attnpatch.AttnPatchError, match=message):  # where the block is given
        with attnpatch.attention_backend("flex", **options):
            pass
    with pytest.raises(attnpatch.AttnPatchError, match=message):  # and where patch() is given
        attnpatch.patch(torch.nn.MultiheadAttention(16, 2), backend="flex", **options)
    assert scored == []


def test_valid_option_values_keep_working():
    q, k, v, _ = make_inputs(seq_q=8, seq_k=8, head_dim=16)
    bias = torch.eye(8) * 2.0
    causal = torch.ones(8, 8, dtype=torch.bool).tril()

    def shift(score, b, h, q_idx, kv_idx):
        return score + (q_idx == kv_idx) * 2.0

    def lower(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    block_mask = create_block_mask(lower, None, None, 8, 8, device="cpu")
    cases = [
        (dict(score_mod=shift, compile=False, kernel_options={}), reference(q, k, v, bias)[0]),
        (dict(mask_mod=lower, compile=None, kernel_options=None), reference(q, k, v, causal)[0]),
        (dict(block_mask=block_mask), reference(q, k, v, causal)[0]),
    ]
    for options, ref in cases:
        out = attnpatch.attention(q, k, v, backend="flex", **options)
        assert rel_error(out, ref) <= 1e-5, options


def test_no_grad_with_inputs_that_require_grad():
    """torch's flex refuses inputs that require grad on CPU even under no_grad (no graph is
    recorded there); the selection cache keys grad as 'grad mode and requires_grad', so such a
    call shares its entry with plain inputs and must run on whatever that entry chose."""
    plain = make_inputs(seq_q=12, head_dim=16)[:3]
    grad = make_inputs(seq_q=12, head_dim=16, requires_grad=True)[:3]
    ref = reference(*plain, is_causal=True)[0]
    attnpatch.dispatch._CACHE.clear()
    with torch.no_grad():
        for q, k, v in (grad, plain, grad):  # cold with grad inputs, then warm both ways
            out = attnpatch.attention(q, k, v, is_causal=True, backend="flex")
            assert not out.requires_grad and rel_error(out, ref) <= 1e-5
        attnpatch.dispatch._CACHE.clear()
        for q, k, v in (plain, grad):  # cold with plain inputs, warm with grad inputs
            out = attnpatch.attention(q, k, v, is_causal=True, backend="flex")
            assert rel_error(out, ref) <= 1e-5
        with attnpatch.attention_backend("flex"):  # through a block as well
            assert attnpatch.explain(*grad).choice == "flex"
            assert rel_error(attnpatch.attention(*grad), reference(*plain)[0]) <= 1e-5
    with pytest.raises(attnpatch.BackendUnavailableError, match="no CPU backward"):
        attnpatch.attention(*grad, backend="flex")  # grad mode on: still refused, with a reason


@pytest.mark.parametrize("mask", [None, "bool", "float", "key_padding"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_batch_zero_matches_sdpa(mask, is_causal):
    q, k, v, attn_mask = make_inputs(batch=2, heads=4, kv_heads=2, seq_q=8, seq_k=11,
                                     head_dim=16, head_dim_v=24, mask=mask)
    q, k, v = q[:0], k[:0], v[:0]
    if attn_mask is not None and attn_mask.dim() == 4:
        attn_mask = attn_mask[:0]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True,
                                              is_causal=is_causal and mask is None)
    out = attnpatch.attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, backend="flex")
    assert out.shape == expected.shape == (0, 4, 8, 24) and out.dtype == expected.dtype
    out, lse = attnpatch.attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                   backend="flex", return_lse=True)
    assert out.shape == expected.shape and lse.shape == (0, 4, 8) and lse.dtype == torch.float32
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = attnpatch.attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, backend="flex",
                              layout="bshd")
    assert out.shape == expected.transpose(1, 2).shape


def test_a_mask_mod_reading_head_and_batch_is_exact_when_compiled():
    """The BlockMask of a user ``mask_mod`` is built per batch element and head: compiled
    (the CUDA default; here inductor on CPU) the kernel skips blocks by it, and one built for
    (b, h) = (0, 0) alone skipped the other heads' blocks (1.4 off)."""
    q, k, v, _ = make_inputs(batch=2, heads=2, seq_q=256, head_dim=16, dtype=torch.float32)

    def mask_mod(b, h, q_idx, kv_idx):
        return torch.where(h == b, kv_idx < 128, kv_idx >= 128)
    out = attnpatch.attention(q, k, v, backend="flex", mask_mod=mask_mod, compile=True)
    i = torch.arange(256)
    first, second = (i < 128)[None, :].expand(256, 256), (i >= 128)[None, :].expand(256, 256)
    mask = torch.stack([torch.stack([first, second]), torch.stack([second, first])])
    ref = attnpatch.attention(q.double(), k.double(), v.double(), attn_mask=mask, backend="math")
    assert rel_error(out, ref) < 1e-5
