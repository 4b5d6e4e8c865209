"""merge_partials: the exact merge of partial attentions, its definition and its errors."""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch import Partial, merge_partials
from attnpatch.call import build_call

from .conftest import make_inputs, rel_error


def _call(q, k, v, mask=None):
    grad = torch.is_grad_enabled() and q.requires_grad
    return build_call(q, k, v, mask, False, None, 0.0, "bhsd", False, grad)


@pytest.mark.parametrize("inner", ["math", "sdpa_flash"])
def test_a_key_in_two_partials_counts_twice(inner):
    """LongNet's semantics: the merge is attention over the concatenation of the partials'
    keys, so the same keys given to two partials count twice (forward and backward, float64)."""
    q, k, v, _ = make_inputs(batch=2, heads=4, kv_heads=2, seq_q=7, seq_k=9, head_dim=16,
                             dtype=torch.float64, requires_grad=True)
    call = _call(q, k, v)
    out = merge_partials(call, [Partial(call, inner), Partial(call, inner)])
    twice = attnpatch.attention(q, torch.cat([k, k], 2), torch.cat([v, v], 2), backend="math")
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.autograd.grad(twice, (q, k, v), grad)
    assert rel_error(out, twice) < 1e-12
    assert all(rel_error(a, b) < 1e-12 for a, b in zip(ours, ref))


def test_rows_no_partial_sees_give_zero_and_minus_inf_without_nan_gradients():
    q, k, v, _ = make_inputs(seq_q=5, seq_k=6, head_dim=8, dtype=torch.float64,
                             requires_grad=True)
    hidden = torch.ones(1, 1, 5, 3, dtype=torch.bool)
    hidden[..., 2, :] = False  # query row 2 sees no key in either half
    call = _call(q, k, v)
    parts = [Partial(call.replace(key=k[:, :, s], value=v[:, :, s], attn_mask=hidden), "math")
             for s in (slice(0, 3), slice(3, 6))]
    with torch.no_grad():
        out, lse = merge_partials(call.replace(return_lse=True), parts)
    assert out[:, :, 2].abs().max() == 0 and torch.isneginf(lse[:, :, 2]).all()
    out = merge_partials(call, parts)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_bad_partials_are_named_and_the_callers_call_is_unchanged():
    q, k, v, _ = make_inputs(seq_q=5, head_dim=8)
    call = _call(q, k, v)
    with pytest.raises(attnpatch.AttnPatchError, match="at least one Partial"):
        merge_partials(call, [])
    with pytest.raises(attnpatch.AttnPatchError, match=r"partials\[0\] is a AttentionCall"):
        merge_partials(call, [call])
    other = _call(q[:, :, :3], k, v)
    with pytest.raises(attnpatch.AttnPatchError, match=r"partials\[1\] has \(B, H, Sq, Dv\)"):
        merge_partials(call, [Partial(call), Partial(other)])
    sub = call.replace(return_lse=True)
    merge_partials(call, [Partial(sub, "math")])
    assert sub.backward_from_lse is False and sub.return_lse is True
