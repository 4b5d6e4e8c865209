"""Bad input raises AttnPatchError naming the argument; normalization only views."""

import pytest
import torch

import attnpatch
from attnpatch import AttnPatchError
from attnpatch.call import build_call

from .conftest import make_inputs


def q4(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("kwargs, match", [
    (dict(query=q4(2, 4, 8)), "query must be 4-D"),
    (dict(key=q4(3, 4, 8, 16)), "batch sizes differ"),
    (dict(key=q4(2, 3, 8, 16), value=q4(2, 3, 8, 16)), "not a multiple"),
    (dict(value=q4(2, 2, 8, 16)), "key has 4 heads but value has 2"),
    (dict(key=q4(2, 4, 8, 32)), "key head_dim 32 != query head_dim 16"),
    (dict(value=q4(2, 4, 9, 16)), "value has 9"),
    (dict(key=q4(2, 4, 8, 16, dtype=torch.float64)), "key dtype"),
    (dict(query=torch.ones(2, 4, 8, 16, dtype=torch.int64)), "query must be floating point"),
    (dict(attn_mask=torch.ones(2, 8, dtype=torch.bool)), "attn_mask shape \\(2, 8\\) does not broadcast"),
    (dict(attn_mask=torch.ones(8, dtype=torch.bool)), "attn_mask must be 2-D"),
    (dict(attn_mask=torch.ones(8, 8, dtype=torch.int32)), "attn_mask dtype torch.int32 is neither bool"),
    (dict(attn_mask=[[1]]), "attn_mask must be a torch.Tensor"),
    (dict(dropout_p=-0.1), "dropout_p must be a number in \\[0, 1\\]"),
    (dict(dropout_p=float("nan")), "dropout_p"),
    (dict(dropout_p=1.5), "dropout_p"),
    (dict(scale=float("inf")), "scale must be None or a finite number"),
    (dict(is_causal=1), "is_causal must be a bool"),
    (dict(softcap=0.0), "softcap must be None or a positive finite number"),
    (dict(softcap=-30.0), "softcap must be None or a positive finite number.*-30.0"),
    (dict(softcap=float("inf")), "softcap"),
    (dict(softcap=float("nan")), "softcap"),
    (dict(softcap=True), "softcap.*True"),
    (dict(softcap="50"), "softcap.*'50'"),
    (dict(softcap=torch.tensor(50.0)), "softcap"),
    (dict(layout="sbhd"), "layout='sbhd' is not one of"),
    (dict(key=q4(2, 4, 0, 16), value=q4(2, 4, 0, 16)), "empty attention"),
])
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(query=q4(2, 4, 8, 16), key=q4(2, 4, 8, 16), value=q4(2, 4, 8, 16))
    args.update(kwargs)
    with pytest.raises(AttnPatchError, match=match):
        attnpatch.attention(**args)
    with pytest.raises(AttnPatchError, match=match):
        attnpatch.explain(**args)


def test_unknown_backend_suggests_the_closest():
    q, k, v, _ = make_inputs()
    with pytest.raises(AttnPatchError, match="unknown backend 'sdap'.*did you mean 'sdpa'"):
        attnpatch.attention(q, k, v, backend="sdap")
    with pytest.raises(AttnPatchError, match="unknown backend"):
        with attnpatch.attention_backend("flashy_thing"):
            pass


def test_env_backend_unknown_is_named(monkeypatch):
    q, k, v, _ = make_inputs()
    monkeypatch.setenv("ATTNPATCH_BACKEND", "nope")
    with pytest.raises(AttnPatchError, match="ATTNPATCH_BACKEND='nope'"):
        attnpatch.attention(q, k, v)


def test_bad_input_is_caught_after_a_cached_good_call():
    q, k, v, _ = make_inputs()
    attnpatch.attention(q, k, v)
    with pytest.raises(AttnPatchError, match="dropout_p"):
        attnpatch.attention(q, k, v, dropout_p=-1.0)


def test_option_not_taken_by_named_backend():
    q, k, v, _ = make_inputs()
    with pytest.raises(AttnPatchError, match="backend 'sdpa' does not take option.*block_mask"):
        attnpatch.attention(q, k, v, backend="sdpa", block_mask=None)


def test_bshd_layout_round_trips_and_matches_bhsd():
    q, k, v, _ = make_inputs(seq_q=10, seq_k=12)
    out = attnpatch.attention(q, k, v, backend="math")
    out_bshd = attnpatch.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                   backend="math", layout="bshd")
    assert out_bshd.shape == (2, 10, 4, 32)
    torch.testing.assert_close(out_bshd.transpose(1, 2), out)


def test_normalization_does_not_copy_inputs():
    from attnpatch.call import build_call
    q, k, v, mask = make_inputs(mask="float")
    call = build_call(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, False,
                      None, 0.0, "bshd", False, False)
    assert call.query.data_ptr() == q.data_ptr() and call.key.data_ptr() == k.data_ptr()
    assert call.attn_mask.data_ptr() == mask.data_ptr() and call.attn_mask.dim() == 4
    assert call.mask_kind == "float" and call.scale == pytest.approx(32 ** -0.5)


@pytest.mark.parametrize("mask, kind", [("bool", "bool"), ("float", "float"),
                                        ("key_padding", "key_padding"), (None, "none")])
def test_mask_kinds(mask, kind):
    q, k, v, m = make_inputs(mask=mask)
    assert attnpatch.explain(q, k, v, attn_mask=m).call.mask_kind == kind


def test_with_tensors_keeps_the_call_and_refuses_another_shape():
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    mask = torch.rand(1, 1, 5, 5) > 0.3
    call = build_call(q, k, v, mask, False, 0.3, 0.0, "bhsd", True, False, softcap=5.0)
    new = [torch.randn(1, 2, 5, 4) for _ in range(3)]
    sub = call.with_tensors(*new)
    assert (sub.query, sub.key, sub.value) == tuple(new) and sub.attn_mask is mask
    assert (sub.scale, sub.softcap, sub.return_lse, sub.mask_kind) == (0.3, 5.0, True, "bool")
    assert call.query is q  # the original is untouched
    with pytest.raises(AttnPatchError, match="key is .* build a call of another shape"):
        call.with_tensors(new[0], torch.randn(1, 2, 6, 4), new[2])
    with pytest.raises(AttnPatchError, match="query is .*float64"):
        call.with_tensors(new[0].double(), new[1], new[2])
