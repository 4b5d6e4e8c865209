"""lse on CUDA, for every backend that declares ``supports_lse`` (from the registry): out, lse and
the q/k/v gradients of a loss using both, in bf16 and fp16, against the float64 reference.

Run on the GPU machine: ``python -m pytest -m gpu tests/backends/test_lse_gpu.py``. Pass
criterion: each error is at most twice the ``math`` backend's error in the same dtype on the
same inputs, plus 1e-3 (plus 1e-2 for gradients, the slack test_gpu_correctness gives them). A
backend that cannot run a call on this machine is skipped with its reasons; a backend whose lse
carries no gradient (``lse_has_grad = False``) must refuse return_lse=True with backward, with a
reason. Rows that see no key give out 0 and lse -inf wherever a backend takes the mask.
"""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch import registry

from ..conftest import make_inputs, out_lse_loss, reference, rel_error, run_or_refuse

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device")]

#: math is the baseline every other backend is measured against
LSE_BACKENDS = [b.name for b in registry.all_backends()
                if b.supports_lse and "cuda" in b.devices and b.name != "math"]
DTYPES = [torch.bfloat16, torch.float16]
CASES = {
    "2x4x257x64": dict(batch=2, heads=4, seq_q=257, head_dim=64),
    "1x8x1024x128": dict(batch=1, heads=8, seq_q=1024, head_dim=128),
    "cross-200x333": dict(batch=2, heads=4, seq_q=200, seq_k=333, head_dim=64),
    "gqa-8:2": dict(batch=2, heads=8, kv_heads=2, seq_q=257, head_dim=64),
    "key_padding": dict(batch=2, heads=4, seq_q=257, head_dim=64, mask="key_padding"),
    "causal": dict(batch=2, heads=4, seq_q=257, head_dim=64, is_causal=True),
    "causal-cross-300x200": dict(batch=2, heads=4, seq_q=300, seq_k=200, head_dim=64,
                                 is_causal=True),
    # rows that see no key: a bool mask with every third query row empty, and a key-padding
    # mask whose first batch element has no key at all
    "bool-empty-rows": dict(batch=2, heads=4, seq_q=257, seq_k=190, head_dim=64,
                            empty="rows"),
    "key_padding-empty-batch": dict(batch=2, heads=4, seq_q=257, head_dim=64, empty="batch"),
}
OUT_SLACK, GRAD_SLACK = 1e-3, 1e-2


def _inputs(case: str, dtype):
    opts = dict(CASES[case])
    is_causal = opts.pop("is_causal", False)
    empty = opts.pop("empty", None)
    q, k, v, mask = make_inputs(dtype=dtype, device="cuda", **opts)
    b, sq, sk = q.shape[0], q.shape[2], k.shape[2]
    if empty == "rows":
        mask = torch.rand(b, 1, sq, sk, generator=torch.Generator().manual_seed(2)) > 0.3
        mask[..., 0] = True
        mask[:, :, 1::3] = False
    elif empty == "batch":
        lengths = torch.tensor([0, sk // 2])
        mask = (torch.arange(sk)[None, :] < lengths[:, None])[:, None, None, :]
    return q, k, v, (None if mask is None else mask.cuda()), is_causal


def _skip_unless_available(backend: str) -> None:
    reasons = registry.get_backend(backend).availability_reasons()
    if reasons:
        pytest.skip(f"{backend} cannot run here: {'; '.join(reasons)}")


def _run(name, q, k, v, mask, is_causal, requires_grad):
    """(out, lse, [dq, dk, dv] or None) of ``name`` ("reference": float64 autograd of the
    reference), or None when the backend refuses (asserted: with explain()'s reasons)."""
    if name == "reference":
        leaves = [t.detach().double().requires_grad_(requires_grad) for t in (q, k, v)]
        out, lse = reference(*leaves, mask, is_causal)
    else:
        leaves = [t.detach().clone().requires_grad_(requires_grad) for t in (q, k, v)]
        result = run_or_refuse(name, *leaves, attn_mask=mask, is_causal=is_causal,
                               return_lse=True)
        if result is None:
            return None
        out, lse = result
    grads = None
    if requires_grad:
        out_lse_loss(out, lse).backward()
        grads = [t.grad for t in leaves]
    return out.detach(), lse.detach(), grads


def _errors(result, ref, empty) -> dict[str, float]:
    """Relative errors of out, of lse on the rows that see a key, and of the gradients."""
    out, lse, grads = result
    visible = ~empty
    errors = {"out": rel_error(out, ref[0]), "lse": rel_error(lse[visible], ref[1][visible])}
    for axis, grad, ref_grad in zip("qkv", grads or (), ref[2] or ()):
        errors[f"d{axis}"] = rel_error(grad, ref_grad)
    return errors


def _check(result, ref, math, dtype):
    out, lse, grads = result
    empty = torch.isneginf(ref[1])
    assert out.dtype == dtype and out.shape == ref[0].shape
    assert lse.dtype == torch.float32 and lse.shape == ref[1].shape
    assert (out[empty] == 0).all(), "a row without visible keys is not 0"
    assert torch.isneginf(lse[empty]).all(), "lse of a row without visible keys is not -inf"
    for grad in grads or ():
        assert torch.isfinite(grad).all(), "non-finite gradient"
    ours, baseline = _errors(result, ref, empty), _errors(math, ref, empty)
    for what, err in ours.items():
        slack = GRAD_SLACK if what.startswith("d") else OUT_SLACK
        assert err <= 2 * baseline[what] + slack, (what, err, baseline[what])


# flex compiles a kernel per signature and per grad mode (seconds each): it runs on FLEX_CASES
FLEX_CASES = ("2x4x257x64", "gqa-8:2", "bool-empty-rows")
MATRIX = [pytest.param(backend, case, dtype, id=f"{backend}-{case}-{str(dtype)[6:]}")
          for backend in LSE_BACKENDS for case in CASES for dtype in DTYPES
          if backend != "flex" or case in FLEX_CASES]


@pytest.mark.parametrize("backend, case, dtype", MATRIX)
def test_out_lse_and_gradients_match_reference(backend, case, dtype):
    """Without grad: out and lse within twice math's error (rows without keys: 0 and -inf).
    With grad: a backend whose lse carries no gradient refuses return_lse with a reason; a
    backend that takes the call gives out, lse and the q/k/v gradients of a loss using out and
    lse within twice math's error (no NaN, also for rows without keys)."""
    _skip_unless_available(backend)
    q, k, v, mask, is_causal = _inputs(case, dtype)
    kwargs = dict(attn_mask=mask, is_causal=is_causal, return_lse=True, backend=backend)
    result = _run(backend, q, k, v, mask, is_causal, requires_grad=False)
    if result is None:
        reasons = attnpatch.explain(q, k, v, **kwargs).reasons[backend]
        pytest.skip(f"{backend} refuses this call: {'; '.join(reasons)}")
    ref = _run("reference", q, k, v, mask, is_causal, requires_grad=True)
    math = _run("math", q, k, v, mask, is_causal, requires_grad=True)
    _check(result, ref, math[:2] + (None,), dtype)

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    explanation = attnpatch.explain(*leaves, **kwargs)
    if explanation.choice is not None:
        # the backend that runs it (a family like flash runs one of its members)
        runs = registry.get_backend(explanation.choice)
        assert getattr(runs, "lse_has_grad", True), (
            f"{runs.name} declares no lse gradient but takes return_lse=True with backward")
        _check(_run(backend, q, k, v, mask, is_causal, requires_grad=True), ref, math, dtype)
        return
    reasons = explanation.reasons[backend]
    assert _run(backend, q, k, v, mask, is_causal, requires_grad=True) is None  # same reasons
    ran = registry.get_backend(attnpatch.explain(q, k, v, **kwargs).choice)
    if not getattr(ran, "lse_has_grad", True):
        assert any("return_lse" in r for r in reasons), reasons
        return
    pytest.skip(f"{backend} refuses backward for this call: {'; '.join(reasons)}")
