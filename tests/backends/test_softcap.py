"""Attention logit softcapping (Gemma 2): ``c * tanh(q·kᵀ·scale / c)`` before the mask.

Computed by every backend that declares ``supports_softcap`` (checked here against an
independent float64 reference on every such backend that runs on this machine's CPU), refused
with a reason by every backend that does not. The matrices come from the registry.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import attnpatch
from attnpatch import registry

from ..conftest import (CPU_BACKENDS, STRUCTURES, check_or_refuse, make_inputs, reference,
                       rel_error)

COMPUTES = [b for b in CPU_BACKENDS if registry.get_backend(b).supports_softcap]
REFUSES = [b.name for b in registry.all_backends() if not b.supports_softcap]

SHAPES = [(1, 1, 40), (77, 113, 40), (113, 77, 72), (1, 77, 64)]
STRUCTURES = {**STRUCTURES, "causal+float": dict(is_causal=True, mask="float")}
# a tight cap on N(0, 1) scores, and a loose one on unscaled scores (std sqrt(head_dim)):
# both change the result (asserted below)
CAPS = {"tight": dict(softcap=0.7), "loose": dict(softcap=30.0, scale=1.0)}


def _case(shape, structure, dtype=torch.float32, seed=0, requires_grad=False):
    sq, sk, d = shape
    opts = dict(STRUCTURES[structure])
    is_causal = opts.pop("is_causal", False)
    heads = opts.pop("heads", 2)
    q, k, v, mask = make_inputs(batch=2, heads=heads, seq_q=sq, seq_k=sk, head_dim=d,
                                dtype=dtype, seed=seed, requires_grad=requires_grad, **opts)
    return q, k, v, mask, is_causal


def test_the_matrices_come_from_the_registry():
    assert {"math", "flex"} <= set(COMPUTES)
    assert {"sdpa", "sdpa_flash", "sdpa_math", "sdpa_cudnn", "sdpa_efficient",
            "xformers"} <= set(REFUSES)
    assert not {"math", "flex", "flash", "flash2", "flash3", "flash4"} & set(REFUSES)


# flex runs eagerly on CPU (~0.3-1 s a call with a tensor mask): the two cross-attention shapes
# there, every shape for the others (the hypothesis test below covers many more for flex)
MATRIX = [pytest.param(backend, shape, id=f"{backend}-{'x'.join(map(str, shape))}")
          for backend in COMPUTES for shape in SHAPES
          if backend != "flex" or shape in ((77, 113, 40), (113, 77, 72))]


@pytest.mark.parametrize("cap", list(CAPS))
@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("backend, shape", MATRIX)
def test_fp32_matches_float64_reference(backend, shape, structure, cap):
    q, k, v, mask, is_causal = _case(shape, structure)
    kw = CAPS[cap]
    # within the backend's declared tolerance of its reference (refusing is a failure here)
    checked = check_or_refuse(backend, q, k, v, mask, is_causal=is_causal, **kw)
    assert checked is not None, f"{backend} declares softcap but refused"
    ref = checked[1]
    # the reference the backend is held to is the independent one's, cap included
    assert rel_error(reference(q, k, v, mask, is_causal, **kw)[0], ref) <= 1e-12
    if shape[1] > 1 and not (is_causal and shape[0] == 1):  # one key per row: caps can't matter
        uncapped, _ = reference(q, k, v, mask, is_causal, scale=kw.get("scale"))
        assert rel_error(uncapped, ref) > 1e-3, "the cap did not change the result"


@pytest.mark.parametrize("structure", ["plain", "gqa", "bool", "float", "causal", "causal+bool"])
@pytest.mark.parametrize("backend", [b for b in COMPUTES
                                     if registry.get_backend(b).supports_lse])
def test_lse_matches_reference(backend, structure):
    q, k, v, mask, is_causal = _case((77, 113, 64), structure)
    checked = check_or_refuse(backend, q, k, v, mask, is_causal=is_causal, softcap=0.7,
                              return_lse=True)
    assert checked is not None, f"{backend} declares softcap and lse but refused"


@pytest.mark.parametrize("structure", ["plain", "gqa", "bool", "float", "key_padding", "causal",
                                       "causal+bool"])
@pytest.mark.parametrize("shape", [(33, 47, 40), (47, 33, 24)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", COMPUTES)
def test_gradients_match_reference(backend, shape, structure):
    q, k, v, mask, is_causal = _case(shape, structure, requires_grad=True)
    reasons = attnpatch.explain(q, k, v, attn_mask=mask, is_causal=is_causal, softcap=0.7,
                                backend=backend).reasons[backend]
    # flex has no CPU backward: refused for that (with explain's reasons), never for the softcap
    assert not any("softcap" in r for r in reasons), reasons
    check_or_refuse(backend, q, k, v, mask, is_causal=is_causal, softcap=0.7, grad=True)


def test_math_gradcheck_float64():
    q, k, v, mask = make_inputs(batch=1, heads=2, kv_heads=1, seq_q=5, seq_k=7, head_dim=4,
                                dtype=torch.float64, mask="float", requires_grad=True)
    fn = lambda q, k, v: attnpatch.attention(q, k, v, attn_mask=mask, is_causal=True,
                                             softcap=0.5, backend="math", return_lse=True)
    assert torch.autograd.gradcheck(fn, (q, k, v))


# --- refusals -----------------------------------------------------------------------------------
def _calls(cap=0.7, **kw):
    q, k, v, mask = make_inputs(seq_q=9, seq_k=11, head_dim=16, **kw)
    with_cap = attnpatch.explain(q, k, v, attn_mask=mask, softcap=cap).call
    without = attnpatch.explain(q, k, v, attn_mask=mask).call
    return with_cap, without


@pytest.mark.parametrize("backend", REFUSES)
def test_every_other_backend_refuses_with_the_reason(backend):
    b = registry.get_backend(backend)
    for kw in (dict(), dict(dtype=torch.float16), dict(mask="key_padding")):
        with_cap, without = _calls(**kw)
        reasons = b.not_supported_reasons(with_cap)
        assert "softcap=0.7 not supported" in reasons, (kw, reasons)
        assert reasons == [*b.not_supported_reasons(without), "softcap=0.7 not supported"]
    q, k, v, _ = make_inputs(seq_q=9, head_dim=16)
    if not b.availability_reasons():  # runs here: asked for, it raises with that reason
        with pytest.raises(attnpatch.BackendUnavailableError) as err:
            attnpatch.attention(q, k, v, softcap=0.7, backend=backend)
        assert "softcap=0.7 not supported" in err.value.reasons[backend]
        assert attnpatch.explain(q, k, v, softcap=0.7, backend=backend).choice is None


@pytest.mark.parametrize("backend", [b.name for b in registry.all_backends()
                                     if b.supports_softcap])
def test_backends_that_compute_it_add_no_reason(backend):
    """Their reasons for a softcap call are those of the same call without it (on this
    machine: none for math/flex, the device or package for the flash kernels)."""
    b = registry.get_backend(backend)
    for kw in (dict(), dict(dtype=torch.float16), dict(mask="key_padding")):
        with_cap, without = _calls(**kw)
        assert b.not_supported_reasons(with_cap) == b.not_supported_reasons(without)


def test_capabilities_and_list_backends_show_it():
    for info in attnpatch.list_backends():
        b = registry.get_backend(info.name)
        assert info.capabilities["softcap"] is b.supports_softcap, info.name
    caps = {i.name: i.capabilities["softcap"] for i in attnpatch.list_backends()}
    for name in ("math", "flex", "flash", "flash2", "flash3", "flash4"):
        assert caps[name] is True, name
    for name in ("sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "xformers"):
        assert caps[name] is False, name


# --- auto ---------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the CPU choice")
def test_auto_on_cpu_picks_flex_if_it_can_else_math():
    q, k, v, mask = make_inputs(seq_q=13, seq_k=17, head_dim=16, mask="bool")
    ex = attnpatch.explain(q, k, v, attn_mask=mask, softcap=0.7)
    assert ex.choice == "flex"
    order = [b.name for b in registry.priority_list()]
    for name in order[:order.index("flex")]:  # every candidate before it refuses
        assert ex.reasons[name], name
    for name in ("sdpa", "sdpa_flash"):  # those that run here refuse for the softcap only
        assert ex.reasons[name] == ["softcap=0.7 not supported"]
    ref, _ = reference(q, k, v, mask, softcap=0.7)
    assert rel_error(attnpatch.attention(q, k, v, attn_mask=mask, softcap=0.7), ref) <= 1e-5
    # flex cannot run these on CPU (no backward, no dropout): auto falls back to math
    qg = q.clone().requires_grad_()
    assert attnpatch.explain(qg, k, v, attn_mask=mask, softcap=0.7).choice == "math"
    assert attnpatch.explain(q, k, v, attn_mask=mask, softcap=0.7, dropout_p=0.1).choice == "math"
    out = attnpatch.attention(qg, k, v, attn_mask=mask, softcap=0.7)
    assert rel_error(out, ref) <= 1e-5
    # without softcap, auto's choice is what it was
    assert attnpatch.explain(q, k, v, attn_mask=mask).choice == "sdpa"


# --- math and flex agree on any shape and mask --------------------------------------------------
CASES = st.fixed_dictionaries({
    "batch": st.integers(1, 3),
    "kv_heads": st.integers(1, 3),
    "group": st.integers(1, 3),
    "seq_q": st.integers(1, 50),
    "seq_k": st.integers(1, 50),
    "head_dim": st.sampled_from([8, 16, 24, 40, 72]),
    "mask": st.sampled_from([None, "bool", "float", "key_padding"]),
    "is_causal": st.booleans(),
    "softcap": st.sampled_from([0.1, 0.7, 2.0, 50.0]),
    "scale": st.sampled_from([None, 1.0]),
    "seed": st.integers(0, 2**16),
})


@pytest.mark.skipif("flex" not in COMPUTES, reason="flex does not run here")
@settings(max_examples=20, deadline=None)
@given(case=CASES)
def test_math_and_flex_agree(case):
    heads = case["kv_heads"] * case["group"]
    q, k, v, mask = make_inputs(batch=case["batch"], heads=heads, kv_heads=case["kv_heads"],
                                seq_q=case["seq_q"], seq_k=case["seq_k"],
                                head_dim=case["head_dim"], mask=case["mask"], seed=case["seed"])
    kw = dict(attn_mask=mask, is_causal=case["is_causal"], softcap=case["softcap"],
              scale=case["scale"])
    ref, _ = reference(q, k, v, mask, case["is_causal"], case["scale"], case["softcap"])
    math_out = attnpatch.attention(q, k, v, backend="math", **kw)
    flex_out = attnpatch.attention(q, k, v, backend="flex", **kw)
    assert rel_error(math_out, ref) <= 1e-5
    assert rel_error(flex_out, math_out) <= 1e-5


def test_flex_applies_softcap_before_the_users_score_mod_and_the_mask():
    q, k, v, mask = make_inputs(seq_q=19, seq_k=23, head_dim=16, mask="float")
    bias = torch.randn(19, 23, generator=torch.Generator().manual_seed(3))

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[q_idx, kv_idx]

    out = attnpatch.attention(q, k, v, attn_mask=mask, softcap=0.7, backend="flex",
                              score_mod=score_mod)
    # cap, then the user's bias, then the mask: the bias adds to the mask outside the cap
    ref, _ = reference(q, k, v, mask + bias, softcap=0.7)
    assert rel_error(out, ref) <= 1e-5
