"""The correctness matrix on CUDA (bf16/fp16) for every sdpa variant, flex and math.

Run on the GPU machine: ``python -m pytest -m gpu``. A backend either matches the float64
reference or refuses the call with reasons (never a wrong answer).
"""

from __future__ import annotations

import pytest
import torch

import attnpatch

from ..conftest import make_inputs, reference, rel_error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device")]

GPU_BACKENDS = ("sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "flex", "math")
SHAPES = [(1, 1, 40), (77, 77, 64), (113, 113, 72), (1023, 1023, 128), (77, 1023, 64),
          (1023, 77, 128)]
FLEX_SHAPES = [(77, 77, 64), (1023, 77, 128)]
STRUCTURES = {
    "plain": dict(), "gqa": dict(heads=4, kv_heads=2), "bool": dict(mask="bool"),
    "float": dict(mask="float"), "key_padding": dict(mask="key_padding"),
    "causal": dict(is_causal=True), "causal+bool": dict(is_causal=True, mask="bool"),
}


def _case(shape, structure, dtype, requires_grad=False):
    sq, sk, d = shape
    opts = dict(STRUCTURES[structure])
    is_causal = opts.pop("is_causal", False)
    heads = opts.pop("heads", 2)
    q, k, v, mask = make_inputs(batch=2, heads=heads, seq_q=sq, seq_k=sk, head_dim=d, dtype=dtype,
                                device="cuda", requires_grad=requires_grad, **opts)
    return q, k, v, mask, is_causal


def _run_or_refuse(backend, q, k, v, mask, is_causal, **kw):
    explanation = attnpatch.explain(q, k, v, attn_mask=mask, is_causal=is_causal,
                                    backend=backend, **kw)
    if explanation.choice is None:
        assert explanation.reasons[backend], "refused without a reason"
        with pytest.raises(attnpatch.BackendUnavailableError):
            attnpatch.attention(q, k, v, attn_mask=mask, is_causal=is_causal, backend=backend,
                                **kw)
        return None
    return attnpatch.attention(q, k, v, attn_mask=mask, is_causal=is_causal, backend=backend, **kw)


# flex compiles one kernel per signature (seconds each): it runs on FLEX_SHAPES in bf16 only
FORWARD_CASES = [
    pytest.param(backend, shape, structure, dtype,
                 id=f"{backend}-{'x'.join(map(str, shape))}-{structure}-{str(dtype)[6:]}")
    for backend in GPU_BACKENDS for shape in SHAPES for structure in STRUCTURES
    for dtype in (torch.bfloat16, torch.float16)
    if backend != "flex" or (shape in FLEX_SHAPES and dtype == torch.bfloat16)
]


@pytest.mark.parametrize("backend, shape, structure, dtype", FORWARD_CASES)
def test_forward(backend, shape, structure, dtype):
    q, k, v, mask, is_causal = _case(shape, structure, dtype)
    ref, _ = reference(q, k, v, mask, is_causal)
    math_err = rel_error(attnpatch.attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             backend="math"), ref)
    out = _run_or_refuse(backend, q, k, v, mask, is_causal)
    if out is not None:
        assert out.dtype == dtype and out.shape == ref.shape
        assert rel_error(out, ref) <= 2 * math_err + 1e-3
        # the second call of a signature takes the warm path (for sdpa without a mask: the
        # kernel from Backend.specialize, no AttentionCall): same result
        again = attnpatch.attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                    backend=backend)
        assert torch.equal(again, out)


@pytest.mark.parametrize("structure", ["plain", "gqa", "float", "causal", "causal+bool"])
@pytest.mark.parametrize("backend", ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flex", "math"])
def test_lse(backend, structure):
    q, k, v, mask, is_causal = _case((113, 1023, 64), structure, torch.bfloat16)
    _, ref_lse = reference(q, k, v, mask, is_causal)
    result = _run_or_refuse(backend, q, k, v, mask, is_causal, return_lse=True)
    if result is not None:
        out, lse = result
        assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
        torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=2e-2)


@pytest.mark.parametrize("structure", ["plain", "gqa", "float", "key_padding", "causal"])
@pytest.mark.parametrize("backend", ["sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flex"])
def test_gradients(backend, structure):
    q, k, v, mask, is_causal = _case((113, 77, 64), structure, torch.bfloat16)
    grads = {}
    for name in ("ref", "math", backend):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        if name == "ref":
            leaves = [t.double().detach().requires_grad_() for t in leaves]
            out = reference(*leaves, mask, is_causal)[0]
        else:
            out = _run_or_refuse(name, *leaves, mask, is_causal)
            if out is None:
                return
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                             dtype=torch.float64).to(out.device, out.dtype)
        (out * weight).sum().backward()
        grads[name] = [t.grad for t in leaves]
    for i, axis in enumerate("qkv"):
        math_err = rel_error(grads["math"][i], grads["ref"][i])
        assert rel_error(grads[backend][i], grads["ref"][i]) <= 2 * math_err + 1e-2, axis


def test_auto_prefers_a_fast_kernel_on_large_shapes():
    q, k, v, _ = make_inputs(batch=1, heads=24, seq_q=4608, head_dim=128, dtype=torch.bfloat16,
                             device="cuda")
    explanation = attnpatch.explain(q, k, v)
    assert explanation.choice not in ("math", "sdpa_math")


# --- softcap: computed by the backends that declare it, refused by the others --------------------
SOFTCAP_BACKENDS = [b.name for b in attnpatch.list_backends()
                    if b.capabilities["softcap"] and "cuda" in b.capabilities["devices"]
                    and b.name != "flash"]  # flash: its members are tested in test_flash_gpu


@pytest.mark.parametrize("structure", ["plain", "gqa", "bool", "float", "key_padding", "causal",
                                       "causal+bool"])
@pytest.mark.parametrize("backend", SOFTCAP_BACKENDS)
def test_softcap_forward_and_gradients(backend, structure):
    q, k, v, mask, is_causal = _case((113, 77, 64), structure, torch.bfloat16)
    ref, _ = reference(q, k, v, mask, is_causal, softcap=0.5)
    assert rel_error(reference(q, k, v, mask, is_causal)[0], ref) > 1e-2  # the cap matters
    grads, outs = {}, {}
    for name in ("ref", "math", backend):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        if name == "ref":
            leaves = [t.double().detach().requires_grad_() for t in leaves]
            out = reference(*leaves, mask, is_causal, softcap=0.5)[0]
        else:
            out = _run_or_refuse(name, *leaves, mask, is_causal, softcap=0.5)
            if out is None:  # refused (e.g. flash4's masks): never for the softcap itself
                reasons = attnpatch.explain(q, k, v, attn_mask=mask, is_causal=is_causal,
                                            softcap=0.5, backend=name).reasons[name]
                assert not any(r.startswith("softcap") for r in reasons), reasons
                return
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                             dtype=torch.float64).to(out.device, out.dtype)
        (out * weight).sum().backward()
        grads[name], outs[name] = [t.grad for t in leaves], out.detach()
    assert rel_error(outs[backend], ref) <= 2 * rel_error(outs["math"], ref) + 1e-3
    for i, axis in enumerate("qkv"):
        math_err = rel_error(grads["math"][i], grads["ref"][i])
        assert rel_error(grads[backend][i], grads["ref"][i]) <= 2 * math_err + 1e-2, axis


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b not in SOFTCAP_BACKENDS])
def test_softcap_refused_with_the_reason(backend):
    q, k, v, mask, is_causal = _case((77, 77, 64), "plain", torch.bfloat16)
    reasons = attnpatch.explain(q, k, v, softcap=0.5, backend=backend).reasons[backend]
    assert "softcap=0.5 not supported" in reasons
    with pytest.raises(attnpatch.BackendUnavailableError, match="softcap=0.5 not supported"):
        attnpatch.attention(q, k, v, softcap=0.5, backend=backend)


def test_auto_with_softcap_takes_a_backend_that_computes_it():
    q, k, v, _ = make_inputs(batch=1, heads=8, seq_q=1024, head_dim=128, dtype=torch.bfloat16,
                             device="cuda")
    choice = attnpatch.explain(q, k, v, softcap=30.0).choice
    assert choice in SOFTCAP_BACKENDS or choice.startswith("flash"), choice
    out = attnpatch.attention(q, k, v, softcap=30.0)
    ref, _ = reference(q, k, v, softcap=30.0)
    assert rel_error(out, ref) <= 1e-2
