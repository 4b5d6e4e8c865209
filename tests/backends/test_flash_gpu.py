"""FlashAttention-4 (``flash4``) on the GPU machine: forward, lse and gradients against an fp32
reference, on the correctness matrix of the issue.

Run there (after ``bash .gpu-wheels/b/install.sh``, which installs flash-attn-4):

    python3 -m pytest -m gpu tests/backends/test_flash_gpu.py -q

FlashAttention-4 JIT-compiles one kernel per configuration (dtype, head dim, causal/window,
varlen, forward/backward...): the first run of this file spends most of its time compiling.
``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1`` keeps the compiled kernels on disk for later runs
on the same machine.

Tolerance, as in flash-attn's own tests: the error of flash4 against the fp32 reference may be
at most twice the error of the same attention computed naively in the low precision (scores and
probabilities rounded to fp16/bf16), plus one ulp of slack at the reference's magnitude.
"""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch import Partial, merge_partials, registry
from attnpatch.backends.flash import Flash4Backend, FlashBackend
from attnpatch.constraints import module_present

from ..conftest import make_inputs, out_lse_loss, reference, rel_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not module_present("flash_attn.cute"),
                       reason="flash_attn.cute (pip install flash-attn-4) not installed"),
]

DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def _needs_flash4():
    reasons = Flash4Backend().availability_reasons()
    if reasons:
        pytest.skip("flash4 unavailable: " + "; ".join(reasons))
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("flash4 needs compute capability >= 9.0")


def lowp_attention(q, k, v, mask, is_causal, scale, softcap=None):
    """Naive attention in the inputs' low precision: scores and probabilities rounded to the
    dtype, as a flash kernel's inputs to its second matmul are. Returns (out, lse)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)
    if is_causal:
        keep = keep.tril()
    if mask is not None:
        keep = keep & mask
    scores = scores.float().masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return probs @ v, torch.logsumexp(scores, dim=-1)


def within(got, ref, naive, factor, dtype, what):
    """max|got - ref| <= factor * max|naive - ref| + one ``dtype`` ulp at ref's magnitude."""
    err = (got.float() - ref.float()).abs().max().item()
    naive_err = (naive.float() - ref.float()).abs().max().item()
    slack = torch.finfo(dtype).eps * max(1.0, ref.float().abs().max().item())
    assert err <= factor * naive_err + slack, (
        f"{what}: max error {err:.3g} vs naive low-precision {naive_err:.3g} (+{slack:.3g})")


def check(q, k, v, mask=None, is_causal=False, return_lse=False, grad=True, backend="flash4",
          softcap=None):
    """flash4 vs the fp32 math reference (and the naive low-precision one), out/lse/grads."""
    scale = q.shape[-1] ** -0.5
    ex = attnpatch.explain(q, k, v, attn_mask=mask, is_causal=is_causal, return_lse=return_lse,
                           backend=backend, softcap=softcap)
    assert ex.choice == backend, ex

    def run(fn, tensors):
        leaves = [t.detach().clone().requires_grad_(grad) for t in tensors]
        result = fn(*leaves)
        out, lse = result if isinstance(result, tuple) else (result, None)
        grads = None
        if grad:
            gen = torch.Generator(device=q.device).manual_seed(1)
            dout = torch.randn(out.shape, generator=gen, device=q.device)
            loss = (out.float() * dout).sum()
            if return_lse:
                dlse = torch.randn(lse.shape, generator=gen, device=q.device)
                loss = loss + (lse.float() * dlse).sum()
            grads = torch.autograd.grad(loss, leaves)
        return out.detach(), (None if lse is None else lse.detach()), grads

    got = run(lambda a, b, c: attnpatch.attention(a, b, c, attn_mask=mask, is_causal=is_causal,
                                                  return_lse=return_lse, backend=backend,
                                                  softcap=softcap),
              (q, k, v))
    ref = run(lambda a, b, c: attnpatch.attention(a, b, c, attn_mask=mask, is_causal=is_causal,
                                                  return_lse=True, backend="math",
                                                  softcap=softcap),
              (q.float(), k.float(), v.float()))
    naive = run(lambda a, b, c: lowp_attention(a, b, c, mask, is_causal, scale, softcap),
                (q, k, v))
    assert got[0].dtype == q.dtype and got[0].shape == ref[0].shape
    assert torch.isfinite(got[0]).all()
    within(got[0], ref[0], naive[0], 2, q.dtype, "out")
    if return_lse:
        assert got[1].dtype == torch.float32 and got[1].shape == ref[1].shape
        within(got[1], ref[1], naive[1], 2, q.dtype, "lse")
    if grad:
        for name, g, r, n in zip("qkv", got[2], ref[2], naive[2]):
            assert g.shape == r.shape and torch.isfinite(g).all(), name
            within(g, r, n, 3, q.dtype, f"d{name}")
    return got


def inputs(dtype, **kw):
    q, k, v, mask = make_inputs(dtype=dtype, device="cuda", **kw)
    return q, k, v, mask


# --- the matrix ----------------------------------------------------------------------------------
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seq", [1, 77, 113, 1023])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_matrix(dtype, seq, head_dim):
    q, k, v, _ = inputs(dtype, batch=2, heads=4, seq_q=seq, head_dim=head_dim)
    check(q, k, v)


@pytest.mark.parametrize("head_dim", [32, 96, 100, 256])
def test_other_head_dims(head_dim):
    """Other head dims flash4 takes (100 is zero-padded to 104 by the backend)."""
    q, k, v, _ = inputs(torch.bfloat16, batch=2, heads=4, seq_q=113, head_dim=head_dim)
    call = attnpatch.explain(q, k, v).call
    reasons = Flash4Backend().not_supported_reasons(call)
    if reasons:  # e.g. 96 or 100 on Blackwell: then the refusal must say so
        assert "not supported on compute capability" in reasons[0]
        pytest.skip("; ".join(reasons))
    check(q, k, v)


@pytest.mark.parametrize("seq_q,seq_k", [(77, 1023), (1023, 77), (1, 113), (113, 1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_attention(dtype, seq_q, seq_k):
    q, k, v, _ = inputs(dtype, batch=2, heads=4, seq_q=seq_q, seq_k=seq_k, head_dim=64)
    check(q, k, v)


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("seq_q,seq_k", [(113, 113), (77, 1023)])
def test_gqa(kv_heads, seq_q, seq_k):
    q, k, v, _ = inputs(torch.bfloat16, batch=2, heads=8, kv_heads=kv_heads, seq_q=seq_q,
                        seq_k=seq_k, head_dim=128)
    check(q, k, v)


@pytest.mark.parametrize("seq_q,seq_k", [(113, 40), (40, 113)])
def test_gqa_causal(seq_q, seq_k):
    q, k, v, _ = inputs(torch.bfloat16, batch=2, heads=8, kv_heads=2, seq_q=seq_q, seq_k=seq_k,
                        head_dim=128)
    check(q, k, v, is_causal=True, return_lse=True)


@pytest.mark.parametrize("seq_q,seq_k", [(77, 113), (113, 1023), (1, 77)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_padding_through_varlen(dtype, seq_q, seq_k):
    q, k, v, _ = inputs(dtype, batch=3, heads=4, seq_q=seq_q, seq_k=seq_k, head_dim=64)
    lengths = torch.tensor([seq_k, max(1, seq_k // 3), max(1, seq_k - 5)], device="cuda")
    mask = (torch.arange(seq_k, device="cuda")[None] < lengths[:, None])[:, None, None, :]
    mask[1, ..., 0] = False  # not only right padding: a hole at the start too
    mask[1, ..., -1] = True
    check(q, k, v, mask=mask)
    check(q, k, v, mask=mask[1:2], return_lse=True)  # (1, 1, 1, Sk): one mask for all


def test_key_padding_gqa_with_lse():
    q, k, v, _ = inputs(torch.bfloat16, batch=2, heads=8, kv_heads=2, seq_q=113, seq_k=77,
                        head_dim=128)
    mask = torch.rand(2, 1, 1, 77, device="cuda") > 0.3
    mask[..., 0] = True
    check(q, k, v, mask=mask, return_lse=True)


@pytest.mark.parametrize("seq_q,seq_k", [(113, 113), (77, 1023), (1023, 77), (1, 77), (77, 1),
                                         (113, 40)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_is_top_left_like_sdpa(dtype, seq_q, seq_k):
    """attnpatch's is_causal is SDPA's (top-left); flash's own is bottom-right. Sq > Sk runs
    through a right window, Sq < Sk through a key slice (see _padding.causal_plan)."""
    q, k, v, _ = inputs(dtype, batch=2, heads=4, seq_q=seq_q, seq_k=seq_k, head_dim=64)
    got = check(q, k, v, is_causal=True, return_lse=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got[0], sdpa, atol=2e-2, rtol=2e-2)


def test_lse_and_its_gradient():
    q, k, v, _ = inputs(torch.bfloat16, batch=2, heads=4, seq_q=113, seq_k=300, head_dim=128)
    check(q, k, v, return_lse=True)


def test_batch_element_without_keys():
    q, k, v, _ = inputs(torch.bfloat16, batch=2, heads=4, seq_q=33, seq_k=77, head_dim=64,
                        requires_grad=True)
    mask = torch.ones(2, 1, 1, 77, dtype=torch.bool, device="cuda")
    mask[1] = False
    out, lse = attnpatch.attention(q, k, v, attn_mask=mask, return_lse=True, backend="flash4")
    assert (out[1] == 0).all() and (lse[1] == float("-inf")).all()
    ref = attnpatch.attention(q.float(), k.float(), v.float(), attn_mask=mask[:1],
                              backend="math")
    torch.testing.assert_close(out[0].float(), ref[0], atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[1] == 0).all()


def test_bshd_layout_and_direct_call_agree():
    from benchmarks._flash_direct import flash4_direct

    q, k, v, _ = inputs(torch.bfloat16, batch=2, heads=4, seq_q=256, head_dim=128)
    qb, kb, vb = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    out = attnpatch.attention(qb, kb, vb, layout="bshd", backend="flash4")
    direct = flash4_direct(qb, kb, vb)
    torch.testing.assert_close(out, direct, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(attnpatch.attention(q, k, v, backend="flash4").transpose(1, 2),
                               direct, atol=1e-2, rtol=1e-2)


# --- selection and refusals on the GPU -----------------------------------------------------------
def test_flash_meta_backend_runs_flash4():
    q, k, v, _ = inputs(torch.float16, batch=1, heads=2, seq_q=77, head_dim=64)
    call = attnpatch.explain(q, k, v, backend="flash").call
    member, reasons = FlashBackend().choose(call)
    assert member is not None and member.name == "flash4", reasons
    torch.testing.assert_close(attnpatch.attention(q, k, v, backend="flash"),
                               attnpatch.attention(q, k, v, backend="flash4"), atol=0, rtol=0)


def test_refusals_on_the_gpu():
    fa4 = Flash4Backend()
    assert fa4.availability_reasons() == []
    q, k, v, mask = inputs(torch.float32, seq_q=16, head_dim=64, mask="bool")
    reasons = attnpatch.explain(q, k, v, attn_mask=mask, dropout_p=0.1,
                                backend="flash4").reasons["flash4"]
    assert reasons == ["dtype torch.float32 not in (float16, bfloat16)",
                       "bool attn_mask not supported (supports: key_padding, none)",
                       "dropout_p=0.1 not supported (only 0.0)"]
    q, k, v, _ = inputs(torch.float16, seq_q=16, head_dim=320)
    assert attnpatch.explain(q, k, v).reasons["flash4"][0] == "head_dim 320 > 256"
    with pytest.raises(attnpatch.BackendUnavailableError):
        attnpatch.attention(q, k, v, backend="flash4")
    q, k, v, _ = inputs(torch.float16, seq_q=64, head_dim=64)
    assert attnpatch.explain(q, k, v).choice == "sdpa"  # auto: measured order, sdpa first
    flash2 = attnpatch.explain(q, k, v).reasons["flash2"]
    if not module_present("flash_attn.flash_attn_interface"):
        assert flash2 == ["package flash_attn not installed (pip install flash-attn); only "
                          "flash-attn-4's flash_attn.cute is there (backend flash4)"]


# --- softcap: flash-attn-4's own softcap= ---------------------------------------------------------
SOFTCAP_CASES = {
    "dense": dict(seq_q=256, head_dim=128),
    "odd": dict(seq_q=113, seq_k=77, head_dim=64),
    "padded_head_dim": dict(seq_q=113, head_dim=100),  # zero-padded by the backend
    "gqa": dict(heads=8, kv_heads=2, seq_q=113, seq_k=300, head_dim=128),
}


@pytest.mark.parametrize("softcap", [0.5, 5.0])
@pytest.mark.parametrize("case", list(SOFTCAP_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap(dtype, case, softcap):
    q, k, v, _ = inputs(dtype, batch=2, **{"heads": 4, **SOFTCAP_CASES[case]})
    got = check(q, k, v, softcap=softcap, return_lse=True)
    plain = attnpatch.attention(q, k, v, backend="flash4")
    assert (got[0].float() - plain.float()).abs().max() > 1e-2  # the cap changed the result


@pytest.mark.parametrize("seq_q,seq_k", [(113, 113), (113, 40), (40, 113)])
def test_softcap_causal(seq_q, seq_k):
    q, k, v, _ = inputs(torch.bfloat16, batch=2, heads=4, seq_q=seq_q, seq_k=seq_k, head_dim=64)
    check(q, k, v, is_causal=True, softcap=0.5, return_lse=True)


def test_softcap_key_padding_through_varlen():
    q, k, v, _ = inputs(torch.bfloat16, batch=3, heads=4, seq_q=77, seq_k=113, head_dim=64)
    lengths = torch.tensor([113, 37, 100], device="cuda")
    mask = (torch.arange(113, device="cuda")[None] < lengths[:, None])[:, None, None, :]
    check(q, k, v, mask=mask, softcap=0.5, return_lse=True)


def test_gemma2_patched_with_flash4_equals_eager():
    """Gemma 2 (Sana's text encoder family) with attn_logit_softcapping, bf16, on flash4 (no
    padding, sequence within the sliding window: causal without a mask, which flash4 runs)."""
    from transformers import Gemma2Config, Gemma2Model
    torch.manual_seed(0)
    model = Gemma2Model(Gemma2Config(
        vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
        query_pre_attn_scalar=64, sliding_window=256, attn_logit_softcapping=5.0,
        attn_implementation="eager")).eval().to("cuda", torch.bfloat16)
    with torch.no_grad():
        for layer in model.layers:  # logits large enough for the cap to matter
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    ids = torch.randint(3, 60, (2, 200), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state.float()
        ref32 = model.float()(input_ids=ids).last_hidden_state
        model.to(torch.bfloat16)
        with attnpatch.patch(model, backend="flash4") as handle:
            out = model(input_ids=ids).last_hidden_state.float()
            report = handle.report()
    assert [r.backend for r in report] == ["flash4", "flash4"] and all(r.calls == 1 for r in report)
    eager_err = ((ref - ref32).norm() / ref32.norm()).item()
    err = ((out - ref32).norm() / ref32.norm()).item()
    assert err <= 2 * eager_err + 1e-3, (err, eager_err)


# --- backward from a merged (out, lse): flash4 as the partials' kernel of an exact merge -------
# merge_partials runs each partial's kernel backward with the merged out and lse
# (Flash4Backend.backward: flash_attn.cute.interface._flash_attn_bwd). Both tests compare with
# float64 (the dense reference; the math backward from the same out and lse) within flash4's
# declared tolerance and within twice the error of the math backend on the same bf16/fp16
# inputs (+1e-3 on out and lse, +1e-2 on gradients, as test_lse_gpu.py allows).
OUT_SLACK, GRAD_SLACK = 1e-3, 1e-2

#: make_inputs keywords, plus: split (keys [:split] and [split:]), causal (the first part's
#: top-left causal pattern), padding ("first": batch element 1 keeps no key of the first part;
#: "both": of either part, so its rows see no key at all), softcap
MERGE_CASES = {
    "odd": dict(batch=2, heads=4, seq_q=113, seq_k=333, head_dim=64, split=150),
    "gqa": dict(batch=2, heads=8, kv_heads=2, seq_q=257, seq_k=190, head_dim=128, split=77),
    "padded_head_dim": dict(batch=1, heads=4, seq_q=77, seq_k=201, head_dim=100, split=100),
    # first part causal with more queries than its keys (a right window) and fewer (a key slice)
    "causal_q_longer": dict(batch=2, heads=4, seq_q=257, seq_k=300, head_dim=64, split=100,
                            causal=True),
    "causal_k_longer_gqa": dict(batch=2, heads=8, kv_heads=2, seq_q=77, seq_k=301, head_dim=64,
                                split=200, causal=True),
    "key_padding": dict(batch=2, heads=4, seq_q=113, seq_k=250, head_dim=64, split=120,
                        padding="first"),
    "no_key_anywhere": dict(batch=2, heads=4, seq_q=113, seq_k=250, head_dim=64, split=120,
                            padding="both"),
    "softcap": dict(batch=2, heads=4, seq_q=113, seq_k=250, head_dim=64, split=120,
                    softcap=0.5),
}


def split_inputs(case: dict, dtype, device="cuda"):
    """q, k, v, the two parts' key-padding masks (or None), and the dense (B, 1, Sq, Sk) bool
    mask of what the merged attention sees (None: everything)."""
    kw = dict(case)
    split, causal, padding = kw.pop("split"), kw.pop("causal", False), kw.pop("padding", None)
    kw.pop("softcap", None)
    q, k, v, _ = make_inputs(dtype=dtype, device=device, **kw)
    b, sq, sk = q.shape[0], q.shape[2], k.shape[2]
    gen = torch.Generator().manual_seed(5)
    masks = [None, None]
    for i, (lo, hi) in enumerate(((0, split), (split, sk))):
        if padding == "both" or (padding == "first" and i == 0):
            keep = torch.rand(b, 1, 1, hi - lo, generator=gen) > 0.3
            keep[..., 0] = True
            keep[1] = False
            masks[i] = keep.to(device)
    visible = None
    if causal or padding:
        visible = torch.ones(b, 1, sq, sk, dtype=torch.bool, device=device)
        if causal:
            visible[..., :split] &= torch.ones(sq, split, dtype=torch.bool, device=device).tril()
        for m, part in zip(masks, (slice(0, split), slice(split, sk))):
            if m is not None:
                visible[..., part] &= m
    return q, k, v, masks, visible


def run_merge(backend: str, q, k, v, case: dict, masks):
    """merge_partials over keys [:split] and [split:] run by ``backend``: (out, lse,
    [dq, dk, dv]) for the loss out_lse_loss(out) (the merged lse carries no gradient)."""
    split, causal, softcap = case["split"], case.get("causal", False), case.get("softcap")
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ql, kl, vl = leaves
    call = attnpatch.explain(ql, kl, vl, return_lse=True, softcap=softcap).call
    parts = [Partial(call.replace(key=kl[:, :, :split], value=vl[:, :, :split],
                                  is_causal=causal, attn_mask=masks[0]), backend),
             Partial(call.replace(key=kl[:, :, split:], value=vl[:, :, split:],
                                  attn_mask=masks[1]), backend)]
    out, lse = merge_partials(call, parts)
    grads = torch.autograd.grad(out_lse_loss(out), leaves)
    return out.detach(), lse, grads


def check_merge(backend: str, case: dict, dtype, device="cuda"):
    q, k, v, masks, visible = split_inputs(case, dtype, device)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference(*leaves, visible, softcap=case.get("softcap"))
    ref_grads = torch.autograd.grad(out_lse_loss(ref_out), leaves)
    ref = (ref_out.detach(), ref_lse.detach(), ref_grads)
    out, lse, grads = got = run_merge(backend, q, k, v, case, masks)
    math = run_merge("math", q, k, v, case, masks)
    empty = torch.isneginf(ref[1])
    assert out.dtype == dtype and out.shape == ref[0].shape
    assert lse.dtype == torch.float32 and lse.shape == ref[1].shape
    assert (out[empty] == 0).all() and torch.isneginf(lse[empty]).all()
    assert torch.isfinite(lse[~empty]).all()
    tol = registry.get_backend(backend).tolerance[dtype]

    def errors(result):
        errs = {"out": rel_error(result[0], ref[0]),
                "lse": rel_error(result[1][~empty], ref[1][~empty])}
        errs.update({f"d{n}": rel_error(g, r) for n, g, r in zip("qkv", result[2], ref[2])})
        return errs
    ours, baseline = errors(got), errors(math)
    for what, err in ours.items():
        slack = GRAD_SLACK if what.startswith("d") else OUT_SLACK
        assert err <= tol and err <= 2 * baseline[what] + slack, (
            f"{what}: error {err:.2e} (math {baseline[what]:.2e}, tolerance {tol:.0e})")
    for name, g, t in zip("qkv", grads, (q, k, v)):
        assert g.dtype == dtype and g.shape == t.shape and torch.isfinite(g).all(), name
    if case.get("padding") == "both":  # batch element 1 sees no key: no gradient anywhere
        assert all((g[1] == 0).all() for g in grads)
    return got


MERGE_MATRIX = [pytest.param("flash4", case, torch.bfloat16, id=f"flash4-{case}-bfloat16")
                for case in MERGE_CASES]
MERGE_MATRIX += [pytest.param("flash4", "odd", torch.float16, id="flash4-odd-float16"),
                 pytest.param("flash", "gqa", torch.bfloat16, id="flash-gqa-bfloat16")]


@pytest.mark.parametrize("backend, case, dtype", MERGE_MATRIX)
def test_merge_of_flash4_partials_is_exact_forward_and_backward(backend, case, dtype):
    """Two key halves on flash4, merged: attention over all the keys (float64 reference) in
    out, lse and the q/k/v gradients; rows without keys give 0 and -inf, finite gradients."""
    check_merge(backend, MERGE_CASES[case], dtype)


#: make_inputs keywords of the part, plus: causal, padding ("first": batch element 1 keeps
#: no key of the part, other keys of the larger attention it belongs to; "both": none there
#: either, so its lse is -inf), softcap. The larger attention adds REST keys.
BACKWARD_CASES = {
    "odd": dict(batch=2, heads=4, seq_q=113, seq_k=77, head_dim=64),
    "gqa": dict(batch=2, heads=8, kv_heads=2, seq_q=113, seq_k=77, head_dim=128),
    "padded_head_dim": dict(batch=2, heads=4, seq_q=113, seq_k=77, head_dim=100),
    "causal_q_longer": dict(batch=2, heads=4, seq_q=113, seq_k=40, head_dim=64, causal=True),
    "causal_k_longer": dict(batch=2, heads=4, seq_q=40, seq_k=113, head_dim=64, causal=True),
    "key_padding_gqa": dict(batch=2, heads=8, kv_heads=2, seq_q=113, seq_k=77, head_dim=64,
                            padding="first"),
    "no_key_anywhere": dict(batch=2, heads=4, seq_q=113, seq_k=77, head_dim=64,
                            padding="both"),
    "softcap": dict(batch=2, heads=4, seq_q=113, seq_k=77, head_dim=64, softcap=0.5),
}
REST = 50


def check_backward_from_given_out_lse(backend: str, case: dict, dtype, device="cuda"):
    """``backend.backward(call, grad_out, out, lse)`` with the out and lse of a larger attention
    (the part's keys and REST more) against the math backward from the same values in
    float64."""
    kw = dict(case)
    causal, padding, softcap = kw.pop("causal", False), kw.pop("padding", None), kw.pop(
        "softcap", None)
    kw["seq_k"] = kw["seq_k"] + REST
    q, k_all, v_all, _ = make_inputs(dtype=dtype, device=device, **kw)
    sk = k_all.shape[2] - REST
    k, v = k_all[:, :, :sk], v_all[:, :, :sk]
    b, sq = q.shape[0], q.shape[2]
    mask = None
    big = torch.ones(b, 1, sq, sk + REST, dtype=torch.bool, device=device)
    if causal:
        big[..., :sk] &= torch.ones(sq, sk, dtype=torch.bool, device=device).tril()
    if padding:
        mask = torch.rand(b, 1, 1, sk, generator=torch.Generator().manual_seed(3)) > 0.3
        mask[..., 0] = True
        mask[1] = False
        mask = mask.to(device)
        big[..., :sk] &= mask
        if padding == "both":
            big[1] = False
    big_out, big_lse = reference(q, k_all, v_all, big, softcap=softcap)
    out, lse = big_out.to(dtype), big_lse.float()
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4),
                           dtype=torch.float64).to(device, dtype)
    assert bool(torch.isneginf(lse[1]).all()) is (padding == "both")

    call = attnpatch.explain(q, k, v, attn_mask=mask, is_causal=causal, softcap=softcap).call
    call64 = attnpatch.explain(q.double(), k.double(), v.double(), attn_mask=mask,
                               is_causal=causal, softcap=softcap).call
    math = registry.get_backend("math")
    ref = math.backward(call64, grad_out.double(), out.double(), lse.double())
    baseline = math.backward(call, grad_out, out, lse)
    b_ = registry.get_backend(backend)
    got = b_.backward(call, grad_out, out, lse)
    tol = b_.tolerance[dtype]
    for name, g, r, m, t in zip("qkv", got, ref, baseline, (q, k, v)):
        assert g.dtype == dtype and g.shape == t.shape and torch.isfinite(g).all(), name
        err, math_err = rel_error(g, r), rel_error(m, r)
        assert err <= tol and err <= 2 * math_err + GRAD_SLACK, (
            f"d{name}: error {err:.2e} (math {math_err:.2e}, tolerance {tol:.0e})")
    if padding:  # no key of the part for batch element 1, and padded keys: zero gradients
        assert (got[0][1] == 0).all()
        padded = ~mask[:, 0, 0, :]
        assert (got[1].transpose(1, 2)[padded] == 0).all()
        assert (got[2].transpose(1, 2)[padded] == 0).all()
    return got


BACKWARD_MATRIX = [pytest.param(case, torch.bfloat16, id=f"{case}-bfloat16")
                   for case in BACKWARD_CASES]
BACKWARD_MATRIX += [pytest.param("odd", torch.float16, id="odd-float16")]


@pytest.mark.parametrize("case, dtype", BACKWARD_MATRIX)
def test_flash4_backward_from_a_given_out_and_lse_equals_math(case, dtype):
    """Flash4Backend.backward directly, from the (out, lse) of a larger attention (as a merge
    passes them; -inf for rows that see no key anywhere): the math backward's float64 result
    from the same values."""
    check_backward_from_given_out_lse("flash4", BACKWARD_CASES[case], dtype)
