"""Dilated attention (LongNet, issue 13) against a float64 reference written from the definition
with loops: segments, rates and per-head offsets; masks, causal, GQA; image grids and joint text;
the consequences the issue lists; exact and torchscale gradients; bad options; patched models."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnpatch
from attnpatch import TokenLayout, registry

from ..conftest import make_inputs, rel_error
from ..tiny_models import flux, run, sd15, sd3, wan


def loop_reference(q, k, v, segments, rates, *, attn_mask=None, is_causal=False, layout=None,
                   grid=None, scale=None):
    """(out, lse) in float64 from the definition, one query at a time: the keys each pattern
    lets the query see, counted once per pattern (text keys once), softmax with log m."""
    q, k, v = (t.detach().double() for t in (q, k, v))
    batch, heads, seq, dim = q.shape
    group = heads // k.shape[1]
    scale = dim ** -0.5 if scale is None else scale
    position = layout.text_position if layout is not None else "none"
    text = layout.text_tokens if position in ("first", "last") else 0
    image = seq - text
    image0 = text if position == "first" else 0
    text0 = image if position == "last" else 0
    text_keys = range(text0, text0 + text)
    if grid is None:
        dims, pats = (image,), [((w,), (r,)) for w, r in zip(segments, rates)]
    elif grid == "2d":
        dims, pats = layout.grid, [((1, *w), (1, *r)) for w, r in zip(segments, rates)]
    else:
        dims, pats = layout.grid, list(zip(segments, rates))

    def coords(i):
        out = []
        for size in reversed(dims):
            i, c = divmod(i, size)
            out.append(c)
        return out[::-1]

    def kept(c, w, r, offsets):
        segment = [ci // wi for ci, wi in zip(c, w)]
        ok = all((ci - si * wi) % ri == oi for ci, si, wi, ri, oi in
                 zip(c, segment, w, r, offsets))
        return ok, segment

    mask = None
    if attn_mask is not None:
        mask = attn_mask.expand(batch, heads, seq, seq)
    out = torch.zeros(batch, heads, seq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((batch, heads, seq), float("-inf"), dtype=torch.float64)
    for b, h in itertools.product(range(batch), range(heads)):
        scores = ((q[b, h] @ k[b, h // group].T) * scale).tolist()
        for p in range(seq):
            count: dict[int, int] = {}
            if p in text_keys:
                count = dict.fromkeys(range(seq), 1)
            else:
                count.update(dict.fromkeys(text_keys, 1))
                cp = coords(p - image0)
                for w, r in pats:
                    period = math.prod(r)
                    offsets = coords_of(h % period, r)
                    ok, segment = kept(cp, w, r, offsets)
                    if not ok:
                        continue
                    for j in range(image):
                        ok_j, segment_j = kept(coords(j), w, r, offsets)
                        if ok_j and segment_j == segment:
                            count[image0 + j] = count.get(image0 + j, 0) + 1
            terms = []
            for key, m in count.items():
                if is_causal and key > p:
                    continue
                s = scores[p][key] + math.log(m)
                if mask is not None:
                    if mask.dtype == torch.bool:
                        if not mask[b, h, p, key]:
                            continue
                    else:
                        s += float(mask[b, h, p, key])
                if s != float("-inf"):
                    terms.append((s, key))
            if not terms:
                continue
            top = max(s for s, _ in terms)
            total = top + math.log(sum(math.exp(s - top) for s, _ in terms))
            weights = torch.tensor([math.exp(s - total) for s, _ in terms], dtype=torch.float64)
            out[b, h, p] = weights @ v[b, h // group, [key for _, key in terms]]
            lse[b, h, p] = total
    return out, lse


def coords_of(index, shape):
    out = []
    for size in reversed(shape):
        index, c = divmod(index, size)
        out.append(c)
    return tuple(out[::-1])


def dilated(q, k, v, attn_mask=None, is_causal=False, layout=None, **options):
    return attnpatch.attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                               backend="dilated", return_lse=True, token_layout=layout,
                               **options)


def check(q, k, v, segments, rates, *, attn_mask=None, is_causal=False, layout=None, grid=None,
          tol=1e-12, **options):
    if q.dtype == torch.float64:  # auto may pick flex, whose CPU kernel is not exact in fp64
        options.setdefault("inner", "math")
    out, lse = dilated(q, k, v, attn_mask, is_causal, layout, segment_lengths=segments,
                       dilation_rates=rates, grid=grid, **options)
    ref_out, ref_lse = loop_reference(q, k, v, segments, rates, attn_mask=attn_mask,
                                      is_causal=is_causal, layout=layout, grid=grid)
    assert out.dtype == q.dtype and out.shape == ref_out.shape
    assert rel_error(out, ref_out) <= tol, rel_error(out, ref_out)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert (lse.double()[finite] - ref_lse[finite]).abs().max() <= max(tol, 1e-12) * 10
    return out, lse


F64 = dict(dtype=torch.float64)


# --- the definition ----------------------------------------------------------------------------

@pytest.mark.parametrize("structure", ["plain", "bool", "float", "key_padding", "causal",
                                       "causal+bool"])
def test_sequence_matches_the_definition(structure):
    """S = 37 divisible by no segment length, 3 heads divisible by no rate > 1, 3 patterns."""
    mask = {"bool": "bool", "float": "float", "key_padding": "key_padding",
            "causal+bool": "bool"}.get(structure)
    q, k, v, m = make_inputs(batch=2, heads=3, seq_q=37, head_dim=8, mask=mask, seed=1, **F64)
    check(q, k, v, (5, 8, 13), (1, 2, 4), attn_mask=m, is_causal="causal" in structure)


def test_gqa_and_value_head_dim():
    q, k, v, _ = make_inputs(batch=2, heads=6, kv_heads=2, seq_q=29, head_dim=8, head_dim_v=5,
                             seed=2, **F64)
    check(q, k, v, (4, 9, 29), (1, 4, 5))
    # the same as every query head with its own copy of its kv head
    opts = dict(segment_lengths=(4, 9, 29), dilation_rates=(1, 4, 5), inner="math")
    out, _ = dilated(q, k, v, **opts)
    expanded, _ = dilated(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), **opts)
    torch.testing.assert_close(out, expanded, rtol=0, atol=1e-13)


def test_per_head_masks_and_head_offsets_beyond_the_heads():
    """A (B, H, Sq, Sk) float mask; rate 7 > 3 heads (offsets 3..6 have no head)."""
    q, k, v, _ = make_inputs(batch=1, heads=3, seq_q=23, head_dim=4, seed=3, **F64)
    mask = torch.randn(1, 3, 23, 23, dtype=torch.float64)
    check(q, k, v, (6, 23), (2, 7), attn_mask=mask)


@pytest.mark.parametrize("compile", [False, True])
def test_float32_within_tolerance(compile):
    q, k, v, m = make_inputs(batch=2, heads=3, seq_q=41, head_dim=16, mask="bool", seed=4)
    check(q, k, v, (6, 16, 41), (1, 3, 4), attn_mask=m, tol=1e-5, compile=compile)


FLUX = TokenLayout(7, "first", 1, 4, 6, 31, 31)
SD3 = TokenLayout(5, "last", 1, 5, 5, 30, 30)
WAN = TokenLayout(0, "none", 3, 4, 5, 60, 60)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", [FLUX, SD3], ids=["text_first", "text_last"])
def test_joint_text_sequence(layout, causal):
    q, k, v, _ = make_inputs(batch=2, heads=3, seq_q=layout.seq_len_q, head_dim=8, seed=5, **F64)
    check(q, k, v, (5, 24), (1, 2), layout=layout, is_causal=causal)


@pytest.mark.parametrize("layout", [FLUX, SD3], ids=["text_first", "text_last"])
def test_joint_text_grid_2d(layout):
    q, k, v, m = make_inputs(batch=2, heads=5, seq_q=layout.seq_len_q, head_dim=8, mask="bool",
                             seed=6, **F64)
    check(q, k, v, ((3, 4), (2, 2), (5, 6)), ((1, 1), (2, 1), (2, 3)), layout=layout,
          grid="2d", attn_mask=m)


@pytest.mark.parametrize("causal", [False, True])
def test_video_grid_3d_and_2d(causal):
    q, k, v, _ = make_inputs(batch=1, heads=7, kv_heads=1, seq_q=60, head_dim=8, seed=7, **F64)
    check(q, k, v, ((2, 3, 2), (3, 4, 5)), ((1, 1, 2), (3, 2, 2)), layout=WAN, grid="3d",
          is_causal=causal)
    check(q, k, v, ((3, 2), (4, 5)), ((1, 2), (2, 3)), layout=WAN, grid="2d", is_causal=causal)


def test_a_grid_pattern_is_the_sequence_pattern_on_one_row():
    layout = TokenLayout(0, "none", 1, 1, 29, 29, 29)
    q, k, v, _ = make_inputs(batch=2, heads=4, seq_q=29, head_dim=8, seed=8, **F64)
    grid, _ = dilated(q, k, v, layout=layout, grid="2d", segment_lengths=((1, 6), (1, 13)),
                      dilation_rates=((1, 2), (1, 3)))
    seq, _ = dilated(q, k, v, segment_lengths=(6, 13), dilation_rates=(2, 3))
    torch.testing.assert_close(grid, seq, rtol=0, atol=1e-13)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_patterns_match_the_definition(data):
    seq = data.draw(st.integers(1, 30), label="S")
    kv_heads = data.draw(st.integers(1, 3), label="Hkv")
    heads = kv_heads * data.draw(st.integers(1, 3), label="group")
    lengths = data.draw(st.lists(st.integers(1, 35), min_size=1, max_size=3), label="w")
    rates = [data.draw(st.integers(1, w), label="r") for w in lengths]
    causal = data.draw(st.booleans(), label="causal")
    q, k, v, _ = make_inputs(batch=1, heads=heads, kv_heads=kv_heads, seq_q=seq, head_dim=4,
                             seed=data.draw(st.integers(0, 99)), **F64)
    check(q, k, v, tuple(lengths), tuple(rates), is_causal=causal)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_grids_and_text_match_the_definition(data):
    frames, height, width = (data.draw(st.integers(1, n), label=a)
                             for a, n in (("F", 3), ("H", 4), ("W", 5)))
    grid = data.draw(st.sampled_from(["2d", "3d"]), label="grid")
    text = data.draw(st.integers(0, 3), label="text")
    position = data.draw(st.sampled_from(["first", "last"]), label="position") if text else "none"
    seq = frames * height * width + text
    layout = TokenLayout(text, position, frames, height, width, seq, seq)
    axes = 2 if grid == "2d" else 3
    count = data.draw(st.integers(1, 2), label="patterns")
    lengths = [tuple(data.draw(st.integers(1, 6)) for _ in range(axes)) for _ in range(count)]
    rates = [tuple(data.draw(st.integers(1, w)) for w in ws) for ws in lengths]
    heads = data.draw(st.integers(1, 5), label="heads")
    q, k, v, _ = make_inputs(batch=1, heads=heads, seq_q=seq, head_dim=4,
                             seed=data.draw(st.integers(0, 99)), **F64)
    check(q, k, v, tuple(lengths), tuple(rates), layout=layout, grid=grid,
          is_causal=data.draw(st.booleans(), label="causal"))


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_bshd_memory_gives_the_same_values_and_gradients(batch, compile):
    """(B, S, H, D) inputs (what diffusers passes): rate-1 segments are read as strided views
    where they can be, the output comes back in (B, S, H, D) memory."""
    q, k, v, _ = make_inputs(batch=batch, heads=4, kv_heads=2, seq_q=45, head_dim=8, seed=24,
                             **F64)
    opts = dict(backend="dilated", segment_lengths=(8, 20, 45), dilation_rates=(1, 2, 4),
                inner="math", compile=compile)
    grad = torch.randn_like(q)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = attnpatch.attention(*leaves, **opts)
    ref_grads = torch.autograd.grad(ref, leaves, grad)
    bshd = [t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
    out = attnpatch.attention(*bshd, layout="bshd", **opts)
    assert out.is_contiguous()  # (B, S, H, D), as given
    torch.testing.assert_close(out.transpose(1, 2), ref, rtol=0, atol=1e-13)
    for a, b in zip(torch.autograd.grad(out, bshd, grad.transpose(1, 2)), ref_grads):
        assert a.is_contiguous()  # the gradients too
        torch.testing.assert_close(a.transpose(1, 2), b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("compile", [False, True])
def test_inputs_cut_from_a_fused_projection(compile):
    """q, k, v as strided views of one (B, S, 3, H, D) tensor: read in place, same values."""
    qkv = torch.randn(2, 37, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    opts = dict(backend="dilated", segment_lengths=(5, 37), dilation_rates=(1, 3), inner="math",
                compile=compile)
    out = attnpatch.attention(*qkv.unbind(2), layout="bshd", **opts)
    copies = [t.detach().contiguous().requires_grad_() for t in qkv.unbind(2)]
    ref = attnpatch.attention(*copies, layout="bshd", **opts)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-13)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, qkv, grad)
    want = torch.autograd.grad(ref, copies, grad)
    torch.testing.assert_close(got, torch.stack(want, dim=2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("memory", ["bhsd", "bshd", "fused_projection"])
@pytest.mark.parametrize("kv_heads", [8, 4])
def test_rates_dividing_heads_and_segments_in_every_memory_order(memory, kv_heads):
    """Rates that divide the heads, the segments and the ragged tail (Flux's pattern set): the
    per-head parts are read as strided copies (offset, head group, segment, position); values
    and gradients equal the definition whatever q, k, v's strides (GQA: keys by index)."""
    gen = torch.Generator().manual_seed(31)
    b, h, s, d = 2, 8, 72, 8
    segments, rates = (16, 32, 72), (1, 2, 8)
    if memory == "fused_projection":
        qkv = torch.randn(b, s, 3, h, d, dtype=torch.float64, generator=gen)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    else:
        shape = (b, h, s, d) if memory == "bhsd" else (b, s, h, d)
        q, k, v = (torch.randn(shape, dtype=torch.float64, generator=gen) for _ in range(3))
        if memory == "bshd":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k, v = k[:, :kv_heads], v[:, :kv_heads]
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    check(q, k, v, segments, rates)
    opts = dict(backend="dilated", segment_lengths=segments, dilation_rates=rates, inner="math")
    out = attnpatch.attention(*leaves, **opts)
    call = attnpatch.explain(*leaves, **opts).call
    ref, _ = registry.get_backend("dilated").reference(call, call.options)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    for got, want in zip(torch.autograd.grad(out, leaves, grad),
                         torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for low in (torch.bfloat16, torch.float32):  # copied as 8-byte words
        # strides and offsets kept: the low-precision tensors have the same memory order
        cast = [torch.empty_strided(t.shape, t.stride(), dtype=low).copy_(t) for t in (q, k, v)]
        got = attnpatch.attention(*cast, **opts)
        assert rel_error(got.double(), ref.detach()) < (1e-2 if low == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_fused_and_scatter_merges_agree_on_strided_kernel_outputs(layout):
    """CPU flash returns its lse (and gradients) in (B, S, H) memory: the fused merge reads
    every part's rows in its own memory order, the scatter merge in the logical one."""
    q, k, v, m = make_inputs(batch=2, heads=6, kv_heads=3, seq_q=50, head_dim=16,
                             mask="key_padding", seed=25)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    opts = dict(backend="dilated", segment_lengths=(7, 16, 50), dilation_rates=(1, 2, 4),
                inner="sdpa_flash", layout=layout, attn_mask=m)
    grad = torch.randn_like(q)
    results = []
    for compile in (False, True):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = attnpatch.attention(*leaves, compile=compile, **opts)
        results.append((out, torch.autograd.grad(out, leaves, grad)))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for x, y in zip(gb, ga):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    ref, _ = loop_reference(*(t.transpose(1, 2) if layout == "bshd" else t for t in (q, k, v)),
                            (7, 16, 50), (1, 2, 4), attn_mask=m)
    assert rel_error(b.transpose(1, 2) if layout == "bshd" else b, ref) < 1e-5


# --- consequences ------------------------------------------------------------------------------

@pytest.mark.parametrize("structure", ["plain", "float", "causal+bool", "gqa"])
def test_one_segment_at_least_the_sequence_with_rate_one_is_dense(structure):
    mask = {"float": "float", "causal+bool": "bool"}.get(structure)
    kv = 2 if structure == "gqa" else None
    q, k, v, m = make_inputs(batch=2, heads=4, kv_heads=kv, seq_q=33, head_dim=8, mask=mask,
                             seed=9, **F64, requires_grad=True)
    causal = "causal" in structure
    dense = attnpatch.attention(q, k, v, attn_mask=m, is_causal=causal, backend="math")
    ref = torch.autograd.grad(dense.sum(), (q, k, v))
    for w in (33, 34, 1000):
        out = attnpatch.attention(q, k, v, attn_mask=m, is_causal=causal, backend="dilated",
                                  segment_lengths=(w,), dilation_rates=(1,))
        torch.testing.assert_close(out, dense, rtol=0, atol=1e-13)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


def test_a_key_in_two_patterns_counts_twice():
    """A pattern given twice: every key meets every kept query twice (bias log 2): the same
    output, and the lse grows by log 2."""
    q, k, v, _ = make_inputs(batch=1, heads=3, seq_q=26, head_dim=8, seed=10, **F64)
    once, lse1 = dilated(q, k, v, segment_lengths=(7,), dilation_rates=(2,))
    twice, lse2 = dilated(q, k, v, segment_lengths=(7, 7), dilation_rates=(2, 2))
    torch.testing.assert_close(twice, once, rtol=0, atol=1e-13)
    finite = torch.isfinite(lse1)
    torch.testing.assert_close(lse2[finite], lse1[finite] + math.log(2), rtol=0, atol=1e-12)


def test_disjoint_key_sets_give_attention_over_their_union():
    """Text keys and one image pattern never share a key: plain attention over the union."""
    layout = FLUX
    q, k, v, _ = make_inputs(batch=2, heads=2, seq_q=31, head_dim=8, seed=11, **F64)
    out, _ = dilated(q, k, v, layout=layout, segment_lengths=(5,), dilation_rates=(2,))
    union = torch.zeros(2, 31, 31, dtype=torch.bool)
    union[:, :7, :] = True  # text queries: every key
    union[:, 7:, :7] = True  # image queries: every text key
    for h in range(2):
        for p, j in itertools.product(range(24), range(24)):
            if p // 5 == j // 5 and (p % 5) % 2 == h % 2 and (j % 5) % 2 == h % 2:
                union[h, 7 + p, 7 + j] = True
    dense = attnpatch.attention(q, k, v, attn_mask=union[None], backend="math")
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-13)


def test_causal_keeps_keys_at_or_before_the_query():
    q, k, v, _ = make_inputs(batch=1, heads=3, seq_q=30, head_dim=8, seed=12, **F64)
    out = dilated(q, k, v, is_causal=True, segment_lengths=(7, 30), dilation_rates=(1, 3))[0]
    changed = v.clone()
    changed[:, :, 20:] = torch.randn_like(changed[:, :, 20:])
    again = dilated(q, k, changed, is_causal=True, segment_lengths=(7, 30),
                    dilation_rates=(1, 3))[0]
    torch.testing.assert_close(again[:, :, :20], out[:, :, :20], rtol=0, atol=0)
    assert not torch.allclose(again[:, :, 20:], out[:, :, 20:])


def test_a_query_no_pattern_keeps_gives_zeros():
    q, k, v, _ = make_inputs(batch=1, heads=1, seq_q=9, head_dim=4, seed=13, **F64,
                             requires_grad=True)
    with torch.no_grad():
        _, lse = dilated(q, k, v, segment_lengths=(9,), dilation_rates=(2,))
    out = attnpatch.attention(q, k, v, backend="dilated", segment_lengths=(9,),
                              dilation_rates=(2,))
    assert torch.equal(out[0, 0, 1::2], torch.zeros(4, 4, dtype=torch.float64))
    assert torch.isneginf(lse[0, 0, 1::2]).all() and torch.isfinite(lse[0, 0, ::2]).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][0, 0, 1::2], torch.zeros(4, 4, dtype=torch.float64))


def test_reference_is_the_definition():
    """``Backend.reference`` (dense, log-multiplicity bias) against the loop reference."""
    layout = SD3
    q, k, v, m = make_inputs(batch=2, heads=4, kv_heads=2, seq_q=30, head_dim=8, mask="float",
                             seed=14, **F64)
    opts = dict(segment_lengths=((2, 3), (5, 5)), dilation_rates=((1, 2), (2, 2)), grid="2d")
    call = attnpatch.explain(q, k, v, attn_mask=m, is_causal=True, backend="dilated",
                             token_layout=layout, **opts).call
    out, lse = registry.get_backend("dilated").reference(call, call.options)
    ref_out, ref_lse = loop_reference(q, k, v, opts["segment_lengths"], opts["dilation_rates"],
                                      attn_mask=m, is_causal=True, layout=layout, grid="2d")
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-13)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)


def test_cross_attention_runs_dense():
    q, _, _, _ = make_inputs(batch=2, heads=2, seq_q=20, head_dim=8, seed=15, **F64)
    _, k, v, _ = make_inputs(batch=2, heads=2, seq_q=7, head_dim=8, seed=16, **F64)
    out = attnpatch.attention(q, k, v, backend="dilated", segment_lengths=(3,),
                              dilation_rates=(2,))
    torch.testing.assert_close(out, attnpatch.attention(q, k, v, backend="math"), rtol=0,
                               atol=1e-14)
    # keys that are text (a layout that says so) with as many tokens as the queries
    q2, k2, v2, _ = make_inputs(batch=1, heads=2, seq_q=7, head_dim=8, seed=17, **F64)
    key = TokenLayout(7, "key", seq_len_q=7, seq_len_kv=7)
    out2 = attnpatch.attention(q2, k2, v2, backend="dilated", token_layout=key,
                               segment_lengths=(3,), dilation_rates=(2,))
    torch.testing.assert_close(out2, attnpatch.attention(q2, k2, v2, backend="math"), rtol=0,
                               atol=1e-14)


# --- gradients -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["sequence", "masked_causal_gqa", "joint_grid"])
def test_gradcheck_float64(case):
    kw, layout, mask = {}, None, None
    if case == "sequence":
        q, k, v, _ = make_inputs(batch=1, heads=3, seq_q=11, head_dim=4, seed=18, **F64,
                                 requires_grad=True)
        opts = dict(segment_lengths=(3, 5, 11), dilation_rates=(1, 2, 3))
    elif case == "masked_causal_gqa":
        q, k, v, mask = make_inputs(batch=2, heads=4, kv_heads=2, seq_q=10, head_dim=4,
                                    mask="float", seed=19, **F64, requires_grad=True)
        opts = dict(segment_lengths=(4, 10), dilation_rates=(1, 3))
        kw = dict(is_causal=True)
    else:
        layout = TokenLayout(3, "first", 1, 3, 4, 15, 15)
        q, k, v, _ = make_inputs(batch=1, heads=3, seq_q=15, head_dim=4, seed=20, **F64,
                                 requires_grad=True)
        opts = dict(segment_lengths=((2, 3), (3, 4)), dilation_rates=((1, 1), (2, 2)),
                    grid="2d")
        kw = dict(token_layout=layout)

    def fn(q, k, v):
        return attnpatch.attention(q, k, v, attn_mask=mask, backend="dilated", inner="math",
                                   **kw, **opts)
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("compile", [False, True])
def test_gradients_are_the_definitions(compile):
    """Exact backward of the merge (each part from the merged out and lse) equals autograd
    through the dense reference, also with the fused (compiled) merge."""
    layout = TokenLayout(4, "last", 1, 5, 5, 29, 29)
    q, k, v, m = make_inputs(batch=2, heads=4, kv_heads=2, seq_q=29, head_dim=8, mask="bool",
                             seed=21, **F64, requires_grad=True)
    opts = dict(segment_lengths=(6, 25), dilation_rates=(1, 3), compile=compile)
    out = attnpatch.attention(q, k, v, attn_mask=m, is_causal=True, backend="dilated",
                              token_layout=layout, **opts)
    call = attnpatch.explain(q, k, v, attn_mask=m, is_causal=True, backend="dilated",
                             token_layout=layout, **opts).call
    ref, _ = registry.get_backend("dilated").reference(call, call.options)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-13)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_compiled_merge_takes_any_number_of_batch_sizes():
    """The fused merge and gradient sums compile once per plan and signature: a plan called
    with more batch sizes than dynamo's recompile limit (here lowered to 2) keeps working
    (one code object per plan recompiled per batch size until a hard fullgraph error)."""
    import torch._dynamo
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    opts = dict(backend="dilated", segment_lengths=(4, 8), dilation_rates=(1, 2), inner="math")
    with config.patch({limit: 2}):
        for batch in (1, 2, 3, 4):
            q, k, v, _ = make_inputs(batch=batch, heads=4, kv_heads=2, seq_q=12, head_dim=8,
                                     seed=batch, requires_grad=True, dtype=torch.float32)
            out = attnpatch.attention(q, k, v, compile=True, **opts)
            ref = attnpatch.attention(q, k, v, compile=False, **opts)
            grad = torch.randn_like(out)
            for a, b in zip(torch.autograd.grad(out, (q, k, v), grad),
                            torch.autograd.grad(ref, (q, k, v), grad)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_detach_weights_is_torchscales_backward():
    """``detach_weights=True``: out = Σ_i w_i·out_i with the weights w_i = softmax_i(lse_i)
    detached (torchscale's LongNet), each out_i the pattern's own attention."""
    segments, rates = (4, 12, 23), (1, 2, 5)
    q, k, v, _ = make_inputs(batch=1, heads=3, seq_q=23, head_dim=8, seed=22, **F64,
                             requires_grad=True)
    outs, lses = [], []
    for w, r in zip(segments, rates):  # each pattern alone: masked dense attention
        keep = torch.zeros(3, 23, 23, dtype=torch.bool)
        for h, p, j in itertools.product(range(3), range(23), range(23)):
            keep[h, p, j] = (p // w == j // w and (p % w) % r == h % r
                             and (j % w) % r == h % r)
        o, lse = attnpatch.attention(q, k, v, attn_mask=keep[None], backend="math",
                                     return_lse=True)
        outs.append(o)
        lses.append(lse)
    with torch.no_grad():
        weights = torch.softmax(torch.stack(lses), dim=0).nan_to_num(0.0)
    torchscale = sum(w[..., None] * o for w, o in zip(weights, outs))
    ours = attnpatch.attention(q, k, v, backend="dilated", segment_lengths=segments,
                               dilation_rates=rates, detach_weights=True)
    exact = attnpatch.attention(q, k, v, backend="dilated", segment_lengths=segments,
                                dilation_rates=rates)
    torch.testing.assert_close(ours, torchscale, rtol=0, atol=1e-13)
    torch.testing.assert_close(exact, torchscale, rtol=0, atol=1e-13)
    grad = torch.randn_like(ours)
    got = torch.autograd.grad(ours, (q, k, v), grad)
    want = torch.autograd.grad(torchscale, (q, k, v), grad)
    true = torch.autograd.grad(exact, (q, k, v), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # the weights depend on q and k only: their gradients differ from the true ones, v's not
    assert (got[0] - true[0]).abs().max() > 1e-6 and (got[1] - true[1]).abs().max() > 1e-6
    torch.testing.assert_close(got[2], true[2], rtol=0, atol=1e-12)


# --- options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, match", [
    (dict(segment_lengths=(4, 8), dilation_rates=(1,)), "same|one segment length and one"),
    (dict(segment_lengths=(0, 8), dilation_rates=(1, 2)), r"segment_lengths\[0\] = 0"),
    (dict(segment_lengths=(4, -8), dilation_rates=(1, 2)), r"segment_lengths\[1\] = -8"),
    (dict(segment_lengths=(4, 8), dilation_rates=(0, 2)), r"dilation_rates\[0\] = 0"),
    (dict(segment_lengths=(4, 8), dilation_rates=(1, 9)), r"dilation_rates\[1\] = 9 exceeds"),
    (dict(segment_lengths=(4,), dilation_rates=(True,)), r"dilation_rates\[0\] = True"),
    (dict(segment_lengths=(), dilation_rates=()), "non-empty"),
    (dict(segment_lengths=((4, 4),), dilation_rates=((1, 1),)), "grid='2d' or grid='3d'"),
    (dict(segment_lengths=((4, 4),), dilation_rates=((1, 5),), grid="2d"), "on every axis"),
    (dict(segment_lengths=(4,), dilation_rates=(1,), grid="2d"), "tuple of 2 positive"),
    (dict(segment_lengths=((4, 4),), dilation_rates=((1, 1),), grid="3d"), "tuple of 3"),
    (dict(grid="4d"), "grid must be None"),
    (dict(inner="sdpa"), "inner='sdpa' does not return the log-sum-exp"),
    (dict(inner="dilated"), "inside itself"),
    (dict(inner="ring"), "inner='ring' splits one sequence across processes"),
    (dict(inner="nope"), "inner='nope': unknown backend"),
    (dict(detach_weights=1), "detach_weights must be"),
    (dict(compile="yes"), "compile must be"),
    (dict(cuda_graph="yes"), "cuda_graph must be"),
])
def test_bad_options_are_named(options, match):
    q, k, v, _ = make_inputs(batch=1, heads=2, seq_q=8, head_dim=4)
    with pytest.raises(attnpatch.AttnPatchError, match=match) as err:
        attnpatch.attention(q, k, v, backend="dilated", **options)
    assert "dilated" in str(err.value)
    with pytest.raises(attnpatch.AttnPatchError, match=match):
        with attnpatch.attention_backend("dilated", **options):
            pass


def test_json_lists_are_taken():
    options = registry.option_values(registry.get_backend("dilated"), dict(
        segment_lengths=[[2, 4], [4, 8]], dilation_rates=[[1, 1], [2, 2]], grid="2d",
        inner="reference"))
    assert options.segment_lengths == ((2, 4), (4, 8)) and options.inner == "math"
    hash(options)


def test_a_grid_without_a_grid_in_the_layout_is_refused_with_the_reason():
    q, k, v, _ = make_inputs(batch=1, heads=2, seq_q=16, head_dim=4)
    opts = dict(segment_lengths=((2, 2),), dilation_rates=((1, 1),), grid="2d")
    for layout in (None, TokenLayout(0, "none", seq_len_q=16, seq_len_kv=16),
                   TokenLayout(0, "none", 1, 3, 3, 16, 16)):
        reasons = attnpatch.explain(q, k, v, backend="dilated", token_layout=layout,
                                    **opts).reasons["dilated"]
        assert len(reasons) == 1 and ("grid='2d' needs the image grid" in reasons[0]
                                      or "has 9 tokens" in reasons[0]), reasons
        with pytest.raises(attnpatch.BackendUnavailableError) as err:
            attnpatch.attention(q, k, v, backend="dilated", token_layout=layout, **opts)
        assert err.value.reasons["dilated"] == reasons
    attnpatch.attention(q, k, v, backend="dilated", **opts,
                        token_layout=TokenLayout(0, "none", 1, 4, 4, 16, 16))


def test_unknown_text_position_and_inner_without_backward_are_refused():
    q, k, v, _ = make_inputs(batch=1, heads=2, seq_q=16, head_dim=4, requires_grad=True)
    unknown = TokenLayout(4, "unknown", seq_len_q=16, seq_len_kv=16)
    reasons = attnpatch.explain(q, k, v, backend="dilated", token_layout=unknown).reasons
    assert any("text position" in r for r in reasons["dilated"])
    reasons = attnpatch.explain(q, k, v, backend="dilated", inner="flex").reasons["dilated"]
    assert any("inner='flex' cannot run its backward" in r for r in reasons)
    with torch.no_grad():  # no gradient needed: flex serves
        attnpatch.attention(q, k, v, backend="dilated", inner="flex", segment_lengths=(4,),
                            dilation_rates=(2,))


# --- patched models, report, torch.compile -----------------------------------------------------

DENSE = dict(segment_lengths=(100_000,), dilation_rates=(1,))


@pytest.mark.parametrize("factory", [flux, sd3, wan, sd15], ids=lambda f: f.__name__)
def test_patched_model_equals_dense_with_one_whole_segment(factory):
    model, kw = factory()
    ref = run(model, kw)
    with attnpatch.patch(model, backend="dilated", inner="math", **DENSE) as handle:
        out = run(model, kw)
        report = handle.report()
    assert rel_error(out, ref) <= 1e-5
    assert {n for r in report.routed for n in r.backends} == {"dilated"}


def test_per_module_backends_and_set_attention_backend():
    model, kw = wan()
    ref = run(model, kw)
    grid = dict(segment_lengths=((1, 2, 2),), dilation_rates=((1, 2, 1),), grid="3d")
    with attnpatch.patch(model, backend={"*attn1": ("dilated", grid), "*": "sdpa"}) as handle:
        out = run(model, kw)
        ran = {r.name: set(r.backends) for r in handle.report()}
        assert all(b == ({"dilated"} if n.endswith("attn1") else {"sdpa"})
                   for n, b in ran.items()), ran
        assert rel_error(out, ref) > 1e-4
        model.set_attention_backend("dilated")  # default patterns: runs, every module
        run(model, kw)
        attnpatch.set_attention_backend(model, "dilated", inner="math", **DENSE)
        assert rel_error(run(model, kw), ref) <= 1e-5
        assert all("dilated" in r.backends for r in handle.report())


def test_patched_models_report_their_patterns_and_cost():
    model, kw = wan()
    ref = run(model, kw)
    opts = dict(segment_lengths=((1, 2, 2), (2, 4, 4)), dilation_rates=((1, 1, 1), (1, 2, 2)),
                grid="3d")
    with attnpatch.patch(model, backend="dilated", **opts) as handle:
        out = run(model, kw)
        report = handle.report()
    assert torch.isfinite(out).all() and rel_error(out, ref) > 1e-4
    notes = {r.name: r.notes for r in report}
    self_attn = [n for name, n in notes.items() if name.endswith("attn1")]
    cross = [n for name, n in notes.items() if name.endswith("attn2")]
    assert self_attn and all(len(n) == 1 and "of dense FLOPs" in n[0] and "grid (2, 4, 4)" in n[0]
                             for n in self_attn), notes
    assert cross and all(n and "cross-attention" in n[0] and "dense" in n[0] for n in cross)
    assert "of dense FLOPs" in str(report)


def test_flux_report_fraction_is_the_cost_of_its_parts():
    model, kw = flux()
    with attnpatch.patch(model, backend="dilated", segment_lengths=(4, 16),
                         dilation_rates=(1, 2)) as handle:
        run(model, kw)
        notes = [n for r in handle.report() for n in r.notes]
    # 23 tokens: 7 text rows x 23 keys, 16 image rows x 7 text keys, (4 segments of 4) and
    # (1 segment of 16, half the positions per head): per head 161 + 112 + 64 + 64
    fraction = (7 * 23 + 16 * 7 + 4 * 16 + 8 * 8) / 23 ** 2
    assert notes and all(f"{fraction:.1%} of dense FLOPs" in n and "text first" in n
                         for n in notes), notes


@pytest.mark.parametrize("fullgraph", [False, True])
def test_torch_compile_matches_eager(fullgraph):
    import torch._dynamo
    torch._dynamo.reset()
    model, kw = flux()
    opts = dict(segment_lengths=(3, 16), dilation_rates=(1, 2))
    with attnpatch.patch(model, backend="dilated", **opts):
        eager = run(model, kw)
        compiled = torch.compile(model, backend="eager", fullgraph=fullgraph)
        with torch.no_grad():
            out = compiled(**kw)[0]
    torch._dynamo.reset()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("inner, fullgraph", [("math", True), ("auto", False)])
def test_torch_compile_gradients_match_eager(inner, fullgraph):
    """Under torch.compile autograd differentiates the parts and the merge (through the inner
    lse). SDPA's kernels give their lse gradient with torch.autograd.grad, which dynamo does not
    trace: with gradients and fullgraph=True the inner kernel must be one whose lse gradient
    traces (math, flex)."""
    import torch._dynamo
    torch._dynamo.reset()
    q, k, v, m = make_inputs(batch=1, heads=3, seq_q=19, head_dim=8, mask="bool", seed=23,
                             **F64, requires_grad=True)
    opts = dict(segment_lengths=(4, 19), dilation_rates=(1, 2), inner=inner)

    def fn(q, k, v):
        return attnpatch.attention(q, k, v, attn_mask=m, is_causal=True, backend="dilated",
                                   **opts)
    eager = fn(q, k, v)
    traced = torch.compile(fn, backend="eager", fullgraph=fullgraph)(q, k, v)
    torch._dynamo.reset()
    torch.testing.assert_close(traced, eager, rtol=0, atol=1e-13)
    grad = torch.randn_like(eager)
    for a, b in zip(torch.autograd.grad(traced, (q, k, v), grad),
                    torch.autograd.grad(eager, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_benchmark_runs_quick_on_cpu(tmp_path):
    """``benchmarks/dilated.py --quick`` (the GPU command with tiny shapes): every variant runs,
    agrees with the fp32 dilated function, and its FLOPs fraction (counted independently by
    the script) is the one the plan reports."""
    import json
    import pathlib
    import re
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[2]
    out = tmp_path / "dilated.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "dilated.py"), "--quick",
                    "--device", "cpu", "--budget", "0.01", "--out", str(out)], check=True,
                   cwd=root, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    rows = result["rows"]
    flux = result["flux_transformer"]
    assert flux["rel_err_vs_dense"] > 0 and flux["sdpa_ms"] > 0 and flux["dilated_ms"] > 0
    assert any("text first (7 tokens" in n for n in flux["dilated_notes"]), flux
    assert {r["shape"] for r in rows} == {"flux_tiny", "wan_tiny", "wan_tiny_grid"}
    for row in rows:
        assert "error" not in row, row
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
        if row["flops_fraction"] < 1:
            assert row["rel_err_vs_fp32_dilated"] < 1e-5, row
            reported = float(re.search(r"([\d.]+)% of dense FLOPs", row["plan"]).group(1))
            assert abs(reported - 100 * row["flops_fraction"]) < 0.051, row
