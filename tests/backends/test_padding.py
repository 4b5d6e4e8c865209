"""The pure-torch helpers that let flash kernels run SDPA semantics (backends/_padding.py).

Flash's kernels are emulated here by the math backend with flash's own masking rule
(:func:`flash_visible`, pinned below to flash-attn's documented examples): a dense kernel is
math over (Sq, Sk) with that rule, a varlen kernel is math per packed sequence. The executors
must then equal the math backend on the original call exactly (float64, rounding only).
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import attnpatch
from attnpatch.backends import _padding as P
from attnpatch.backends.math import reference_backward

from ..conftest import make_inputs

EXACT = dict(rtol=1e-10, atol=1e-12)


def tril(sq, sk):
    return torch.ones(sq, sk, dtype=torch.bool).tril()


def math_bshd(q, k, v, mask=None, is_causal=False, scale=None):
    """The math backend on (B, S, H, D) tensors: (out (B, S, H, Dv), lse (B, H, S))."""
    return attnpatch.attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                               backend="math", layout="bshd", return_lse=True)


def emulated_dense(scale=None):
    """A stand-in for flash_attn_func: flash's bottom-right rule, computed by math."""
    def dense(q, k, v, causal, window):
        return math_bshd(q, k, v, P.flash_visible(q.shape[1], k.shape[1], causal, window),
                         scale=scale)
    return dense


def emulated_varlen(scale=None, lse_layout="packed"):
    """A stand-in for flash_attn_varlen_func (non-causal): math per packed sequence."""
    def varlen(q, k, v, cu_q, cu_k, max_q, max_k):
        outs, lses = [], []
        for b in range(cu_q.numel() - 1):
            qs = q[cu_q[b]:cu_q[b + 1]][None]
            ks, vs = k[cu_k[b]:cu_k[b + 1]][None], v[cu_k[b]:cu_k[b + 1]][None]
            assert qs.shape[1] <= max_q and ks.shape[1] <= max_k
            if ks.shape[1] == 0:  # what flash does for a row with no key: 0, lse -inf (FA2: +inf)
                outs.append(q.new_zeros(qs.shape[1], q.shape[1], v.shape[-1]))
                lses.append(torch.full((q.shape[1], qs.shape[1]), float("inf")))
                continue
            out, lse = math_bshd(qs, ks, vs, scale=scale)
            outs.append(out[0])
            lses.append(lse[0])
        lse = torch.cat(lses, dim=1)  # (H, total_q)
        if lse_layout == "padded":  # flash-attn < 2.4: (B, H, max_seqlen_q)
            lse = lse.view(lse.shape[0], -1, max_q).permute(1, 0, 2)
        return torch.cat(outs, dim=0), lse
    return varlen


def math_bshd_backward(q, k, v, out, dout, lse, mask=None, is_causal=False, scale=None):
    """The math backend's backward from a given (out, lse) on (B, S, H, D) tensors (lse
    (B, H, Sq)): (dq, dk, dv) as (B, S, H, D)."""
    call = attnpatch.explain(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                             layout="bshd").call
    grads = reference_backward(call, dout.transpose(1, 2), out.transpose(1, 2), lse)
    return tuple(g.transpose(1, 2) for g in grads)


def emulated_dense_bwd(scale=None):
    """A stand-in for a dense backward entry point: flash's bottom-right rule, by math."""
    def dense_bwd(q, k, v, out, dout, lse, causal, window):
        visible = P.flash_visible(q.shape[1], k.shape[1], causal, window)
        return math_bshd_backward(q, k, v, out, dout, lse, mask=visible, scale=scale)
    return dense_bwd


def emulated_varlen_bwd(scale=None):
    """A stand-in for a varlen backward entry point (non-causal): math per packed sequence,
    lse (H, total_q)."""
    def varlen_bwd(q, k, v, out, dout, lse, cu_q, cu_k, max_q, max_k):
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for b in range(cu_q.numel() - 1):
            rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            assert rows.stop - rows.start <= max_q and keys.stop - keys.start <= max_k
            if keys.stop == keys.start:
                continue
            grads = math_bshd_backward(q[rows][None], k[keys][None], v[keys][None],
                                       out[rows][None], dout[rows][None],
                                       lse[:, rows][None], scale=scale)
            dq[rows], dk[keys], dv[keys] = (g[0] for g in grads)
        return dq, dk, dv
    return varlen_bwd


def given_out_lse(q, k, v, mask=None, is_causal=False, seed=0):
    """(out, lse) of a larger attention that this one is part of (as an exact merge passes
    them): this attention's, moved by random amounts, and a random dout."""
    gen = torch.Generator().manual_seed(seed)
    out, lse = math_bshd(q, k, v, mask=mask, is_causal=is_causal)
    out = out + torch.randn(out.shape, generator=gen, dtype=out.dtype)
    lse = lse.masked_fill(torch.isneginf(lse), 0.0) + torch.rand(lse.shape, generator=gen,
                                                                 dtype=lse.dtype)
    return out, torch.randn(out.shape, generator=gen, dtype=out.dtype), lse


# --- flash's masking rule, pinned to its documentation -----------------------------------------
def test_flash_visible_matches_flash_attn_docs():
    # flash_attn_func's docstring: "If seqlen_q = 2 and seqlen_k = 5, the causal mask is ..."
    assert P.flash_visible(2, 5, causal=True).int().tolist() == [[1, 1, 1, 1, 0],
                                                                  [1, 1, 1, 1, 1]]
    assert P.flash_visible(5, 2, causal=True).int().tolist() == [[0, 0], [0, 0], [0, 0],
                                                                  [1, 0], [1, 1]]
    # "Query at position i will only attend to keys between
    #  [i + seqlen_k - seqlen_q - window_size[0], i + seqlen_k - seqlen_q + window_size[1]]"
    keep = P.flash_visible(3, 6, window=(1, 0))
    assert keep.int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]]
    assert P.flash_visible(4, 4).all()


@pytest.mark.parametrize("any_right_window", [True, False])
def test_causal_plan_is_top_left_causal_for_every_size(any_right_window):
    for sq in range(1, 14):
        for sk in range(1, 14):
            plan = P.causal_plan(sq, sk, True, any_right_window)
            keep = P.plan_visible(plan, sq, sk)
            assert torch.equal(keep, tril(sq, sk)), (sq, sk, plan)
            assert keep.any(dim=1).all()  # no query row without a key
            rows = torch.zeros(sq, dtype=torch.int)
            for s in plan:
                rows[s.q_start:s.q_end] += 1
            assert (rows == 1).all()  # every query row computed exactly once
            if not any_right_window:  # FA2/FA3: no window at all (they clamp big right windows)
                assert all(s.window == P.NO_WINDOW for s in plan)


def test_causal_plan_shapes():
    assert P.causal_plan(7, 7, True, True) == (P.Segment(0, 7, 7, causal=True),)
    assert P.causal_plan(3, 9, True, False) == (P.Segment(0, 3, 3, causal=True),)
    assert P.causal_plan(9, 3, True, True) == (P.Segment(0, 9, 3, window=(None, 6)),)
    assert P.causal_plan(9, 3, True, False) == (P.Segment(0, 3, 3, causal=True),
                                                P.Segment(3, 9, 3))
    assert P.causal_plan(5, 8, False, True) == (P.Segment(0, 5, 8),)


@settings(max_examples=15, deadline=None)
@given(sq=st.integers(1, 40), sk=st.integers(1, 40), gqa=st.booleans(),
       any_right_window=st.booleans(), seed=st.integers(0, 2**16))
def test_run_causal_plan_equals_math_top_left(sq, sk, gqa, any_right_window, seed):
    q, k, v, _ = make_inputs(batch=2, heads=4, kv_heads=2 if gqa else 4, seq_q=sq, seq_k=sk,
                             head_dim=8, head_dim_v=5, dtype=torch.float64, seed=seed)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, S, H, D) views, as flash gets them
    plan = P.causal_plan(sq, sk, True, any_right_window)
    out, lse = P.run_causal_plan(plan, q, k, v, emulated_dense())
    ref_out, ref_lse = math_bshd(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref_out, **EXACT)
    torch.testing.assert_close(lse, ref_lse, **EXACT)


def test_run_causal_plan_gradients_equal_math():
    for sq, sk, arw in ((13, 5, False), (13, 5, True), (4, 11, False), (6, 6, True)):
        q, k, v, _ = make_inputs(batch=2, heads=2, seq_q=sq, seq_k=sk, head_dim=8,
                                 dtype=torch.float64, requires_grad=True, seed=sq * sk)
        qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))
        plan = P.causal_plan(sq, sk, True, arw)
        out, lse = P.run_causal_plan(plan, qb, kb, vb, emulated_dense())
        grads = torch.autograd.grad((out.sin().sum() + lse.cos().sum()), (q, k, v))
        ref_out, ref_lse = math_bshd(qb, kb, vb, is_causal=True)
        ref = torch.autograd.grad((ref_out.sin().sum() + ref_lse.cos().sum()), (q, k, v))
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r, **EXACT)
        if sk > sq:  # keys no query sees get exactly zero gradient
            assert (grads[1][:, :, sq:] == 0).all() and (grads[2][:, :, sq:] == 0).all()


@settings(max_examples=15, deadline=None)
@given(sq=st.integers(1, 30), sk=st.integers(1, 30), gqa=st.booleans(),
       any_right_window=st.booleans(), seed=st.integers(0, 2**16))
def test_run_causal_plan_backward_equals_math_from_given_out_lse(sq, sk, gqa,
                                                                  any_right_window, seed):
    """Every segment's backward from the rows of a given (out, lse), assembled: the math
    backward of top-left causal attention from the same (out, lse) (float64, rounding only);
    keys no query sees get zero."""
    q, k, v, _ = make_inputs(batch=2, heads=4, kv_heads=2 if gqa else 4, seq_q=sq, seq_k=sk,
                             head_dim=8, head_dim_v=5, dtype=torch.float64, seed=seed)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out, dout, lse = given_out_lse(q, k, v, is_causal=True, seed=seed)
    plan = P.causal_plan(sq, sk, True, any_right_window)
    grads = P.run_causal_plan_backward(plan, q, k, v, out, dout, lse, emulated_dense_bwd())
    ref = math_bshd_backward(q, k, v, out, dout, lse, is_causal=True)
    for g, r, t in zip(grads, ref, (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype
        torch.testing.assert_close(g, r, **EXACT)
    if sk > sq:
        assert (grads[1][:, sq:] == 0).all() and (grads[2][:, sq:] == 0).all()


def test_run_causal_plan_backward_adds_key_gradients_of_segments_in_float32():
    """FA2/FA3's plan for Sq > Sk has two segments over the same keys: their key gradients
    add up in float32, one rounding to the inputs' dtype."""
    sq, sk = 13, 5
    plan = P.causal_plan(sq, sk, True, any_right_window=False)
    assert len(plan) == 2
    q, k, v, _ = make_inputs(batch=1, heads=2, seq_q=sq, seq_k=sk, head_dim=8,
                             dtype=torch.bfloat16)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out, dout, lse = given_out_lse(q.double(), k.double(), v.double(), is_causal=True)
    seen = []

    def dense_bwd(*args):
        grads = emulated_dense_bwd()(*(a.double() if torch.is_tensor(a) else a for a in args))
        seen.append(grads)
        return tuple(g.to(torch.bfloat16) for g in grads)

    dq, dk, dv = P.run_causal_plan_backward(plan, q, k, v, out.bfloat16(), dout.bfloat16(),
                                            lse.float(), dense_bwd)
    assert dq.dtype == dk.dtype == dv.dtype == torch.bfloat16
    summed = (seen[0][1].bfloat16().float() + seen[1][1].bfloat16().float()).bfloat16()
    assert torch.equal(dk, summed)


# --- key padding through varlen ----------------------------------------------------------------
def test_unpad_kv_order_and_offsets():
    k = torch.arange(2 * 4, dtype=torch.float64).view(2, 4, 1, 1)
    keep = torch.tensor([[True, False, True, True], [False, False, False, True]])
    kp, vp, cu, max_len, lens = P.unpad_kv(k, k * 10, keep)
    assert kp.flatten().tolist() == [0, 2, 3, 7]
    assert vp.flatten().tolist() == [0, 20, 30, 70]
    assert cu.tolist() == [0, 3, 4] and cu.dtype == torch.int32
    assert max_len == 3 and lens.tolist() == [3, 1]
    assert P.dense_cu_seqlens(3, 5, "cpu").tolist() == [0, 5, 10, 15]


def test_lse_from_varlen_layouts_and_empty_rows():
    packed = torch.tensor([[1.0, 2.0, float("inf"), 4.0, 5.0, 6.0]])  # (H=1, B*Sq = 2*3)
    dense = P.lse_from_varlen(packed, batch=2, seq_q=3)
    assert dense.shape == (2, 1, 3)
    assert dense.tolist() == [[[1.0, 2.0, float("-inf")]], [[4.0, 5.0, 6.0]]]
    padded = torch.arange(2 * 1 * 5, dtype=torch.float32).view(2, 1, 5)  # (B, H, max_q >= Sq)
    assert P.lse_from_varlen(padded, batch=2, seq_q=3).tolist() == [[[0, 1, 2]], [[5, 6, 7]]]


keep_masks = st.integers(1, 4).flatmap(lambda b: st.integers(1, 24).flatmap(
    lambda sk: st.lists(st.lists(st.booleans(), min_size=sk, max_size=sk), min_size=b,
                        max_size=b)))


@settings(max_examples=20, deadline=None)
@given(keep=keep_masks, sq=st.integers(1, 20), gqa=st.booleans(),
       broadcast=st.booleans(), lse_layout=st.sampled_from(["packed", "padded"]),
       seed=st.integers(0, 2**16))
def test_run_key_padding_equals_math(keep, sq, gqa, broadcast, lse_layout, seed):
    keep = torch.tensor(keep)
    if broadcast:  # a (1, 1, 1, Sk) mask shared by the whole batch
        keep = keep[:1]
    batch = 3 if broadcast else keep.shape[0]
    mask = keep[:, None, None, :]
    q, k, v, _ = make_inputs(batch=batch, heads=4, kv_heads=1 if gqa else 4, seq_q=sq,
                             seq_k=keep.shape[1], head_dim=8, head_dim_v=6,
                             dtype=torch.float64, seed=seed)
    qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))
    out, lse = P.run_key_padding(qb, kb, vb, P.key_padding_keep(mask, batch),
                                 emulated_varlen(lse_layout=lse_layout))
    ref_out, ref_lse = math_bshd(qb, kb, vb, mask=mask)  # math: empty rows give 0 and -inf
    torch.testing.assert_close(out, ref_out, **EXACT)
    torch.testing.assert_close(lse, ref_lse, **EXACT)


def test_run_key_padding_gradients_equal_math():
    q, k, v, _ = make_inputs(batch=3, heads=4, kv_heads=2, seq_q=7, seq_k=10, head_dim=8,
                             dtype=torch.float64, requires_grad=True, seed=3)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1, 1, 1, 0, 1], [0] * 10, [1] * 10],
                        dtype=torch.bool)[:, None, None, :]
    qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))
    out, lse = P.run_key_padding(qb, kb, vb, P.key_padding_keep(mask, 3), emulated_varlen())
    ref_out, ref_lse = math_bshd(qb, kb, vb, mask=mask)
    live = torch.isfinite(ref_lse)
    loss = out.sin().sum() + lse[live].cos().sum()
    ref_loss = ref_out.sin().sum() + ref_lse[live].cos().sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    ref = torch.autograd.grad(ref_loss, (q, k, v))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, **EXACT)
    assert (grads[1].transpose(1, 2)[~mask[:, 0, 0]] == 0).all()  # padded keys: no gradient


def test_run_key_padding_all_keys_masked():
    q, k, v, _ = make_inputs(batch=2, heads=2, seq_q=3, seq_k=4, head_dim=8,
                             dtype=torch.float64, requires_grad=True)
    qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))
    keep = torch.zeros(2, 4, dtype=torch.bool)
    out, lse = P.run_key_padding(qb, kb, vb, keep, emulated_varlen())
    assert (out == 0).all() and out.shape == (2, 3, 2, 8)
    assert (lse == float("-inf")).all() and lse.shape == (2, 2, 3)
    out.sum().backward()  # connected to the graph, zero gradients
    assert (q.grad == 0).all()


@settings(max_examples=20, deadline=None)
@given(keep=keep_masks, sq=st.integers(1, 20), gqa=st.booleans(), broadcast=st.booleans(),
       seed=st.integers(0, 2**16))
def test_run_key_padding_backward_equals_math_from_given_out_lse(keep, sq, gqa, broadcast,
                                                                  seed):
    """One varlen backward from a given (out, lse), gradients scattered back: the math
    backward under the key-padding mask from the same (out, lse): zero at padded keys, and for
    the queries of a batch element that keeps no key (their lse is that of other keys)."""
    keep = torch.tensor(keep)
    if broadcast:
        keep = keep[:1]
    batch = 3 if broadcast else keep.shape[0]
    mask = keep[:, None, None, :]
    q, k, v, _ = make_inputs(batch=batch, heads=4, kv_heads=1 if gqa else 4, seq_q=sq,
                             seq_k=keep.shape[1], head_dim=8, head_dim_v=6,
                             dtype=torch.float64, seed=seed)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out, dout, lse = given_out_lse(q, k, v, mask=mask, seed=seed)
    grads = P.run_key_padding_backward(q, k, v, out, dout, lse, P.key_padding_keep(mask, batch),
                                       emulated_varlen_bwd())
    ref = math_bshd_backward(q, k, v, out, dout, lse, mask=mask)
    for g, r, t in zip(grads, ref, (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype
        torch.testing.assert_close(g, r, **EXACT)
    padded = ~P.key_padding_keep(mask, batch)
    assert (grads[1][padded] == 0).all() and (grads[2][padded] == 0).all()


def test_run_key_padding_backward_without_any_key_is_zero():
    q, k, v, _ = make_inputs(batch=2, heads=2, seq_q=3, seq_k=4, head_dim=8,
                             dtype=torch.float64)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out, dout, lse = given_out_lse(q, k, v)

    def never(*args):
        raise AssertionError("no kernel call without keys")
    grads = P.run_key_padding_backward(q, k, v, out, dout, lse,
                                       torch.zeros(2, 4, dtype=torch.bool), never)
    assert all((g == 0).all() and g.shape == t.shape for g, t in zip(grads, (q, k, v)))


def test_pad_head_dim_is_exact():
    q, k, v, _ = make_inputs(batch=1, heads=2, seq_q=5, seq_k=6, head_dim=12, head_dim_v=7,
                             dtype=torch.float64)
    scale = 12 ** -0.5  # the caller's scale, not the padded head dim's
    qp, kp, vp = (P.pad_head_dim(t, 8) for t in (q, k, v))
    assert qp.shape[-1] == 16 and vp.shape[-1] == 8 and P.pad_head_dim(qp, 8) is qp
    out = attnpatch.attention(qp, kp, vp, scale=scale, backend="math")[..., :7]
    torch.testing.assert_close(out, attnpatch.attention(q, k, v, backend="math"), **EXACT)


@pytest.mark.parametrize("multiple", [8, 16])
@pytest.mark.parametrize("seq_k", [16, 13])
def test_aligned_bias_strides_and_values(seq_k, multiple):
    """The memory-efficient kernels' bias (SDPA's: 16, xFormers': 8): every stride but the last
    a multiple, broadcast with stride 0, equal to the additive mask; copied only when needed."""
    shape = (2, 4, 5, seq_k)
    mask = torch.rand(2, 1, 5, seq_k) > 0.4
    q, k, v, _ = make_inputs(batch=2, heads=4, seq_q=5, seq_k=seq_k, dtype=torch.float16)
    additive = attnpatch.explain(q, k, v, attn_mask=mask).call.additive_mask()
    bias = P.aligned_bias(additive, shape, multiple)
    assert bias.shape == shape and bias.dtype == torch.float16 and bias.stride(1) == 0
    assert all(s % multiple == 0 for s in bias.stride()[:-1]) and bias.stride(-1) == 1
    expected = torch.zeros(shape, dtype=torch.float16).masked_fill(~mask.expand(shape),
                                                                    float("-inf"))
    assert torch.equal(bias, expected)
    assert (bias.data_ptr() == additive.data_ptr()) is (seq_k % multiple == 0)
    add = torch.randn(1, 1, 5, seq_k)
    bias = P.aligned_bias(add, (3, 2, 5, seq_k), multiple)
    assert torch.equal(bias, add.expand(3, 2, 5, seq_k)) and bias.stride()[:2] == (0, 0)
