"""Shared fixtures: random attention inputs and an independent float64 reference."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("ATTNPATCH_BACKEND", None)

import attnpatch  # noqa: E402  (after the environment is set)
from attnpatch import registry  # noqa: E402

#: call structures of the backend matrices: name -> make_inputs keywords
STRUCTURES = {
    "plain": dict(),
    "gqa": dict(heads=4, kv_heads=2),
    "mqa": dict(heads=4, kv_heads=1),
    "bool": dict(mask="bool"),
    "float": dict(mask="float"),
    "key_padding": dict(mask="key_padding"),
    "causal": dict(is_causal=True),
    "causal+bool": dict(is_causal=True, mask="bool"),
}


def make_inputs(batch=2, heads=4, kv_heads=None, seq_q=16, seq_k=None, head_dim=32,
                head_dim_v=None, dtype=torch.float32, device="cpu", mask=None, seed=0,
                requires_grad=False):
    """Random q, k, v (B, H, S, D) and an optional mask.

    ``mask``: None, "bool" (B, 1, Sq, Sk), "float" (Sq, Sk additive, some -inf), "key_padding"
    (B, 1, 1, Sk, True = keep). Key 0 is always visible so no query row is empty.
    """
    gen = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    seq_k = seq_k or seq_q
    head_dim_v = head_dim_v or head_dim

    def rnd(*shape):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    q = rnd(batch, heads, seq_q, head_dim)
    k = rnd(batch, kv_heads, seq_k, head_dim)
    v = rnd(batch, kv_heads, seq_k, head_dim_v)
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(batch, 1, seq_q, seq_k, generator=gen) > 0.3
        attn_mask[..., 0] = True
    elif mask == "float":
        attn_mask = torch.randn(seq_q, seq_k, generator=gen, dtype=torch.float64)
        attn_mask[torch.rand(seq_q, seq_k, generator=gen) > 0.8] = float("-inf")
        attn_mask[..., 0] = 0.0
        attn_mask = attn_mask.to(dtype)
    elif mask == "key_padding":
        lengths = torch.randint(1, seq_k + 1, (batch,), generator=gen)
        attn_mask = (torch.arange(seq_k)[None, :] < lengths[:, None])[:, None, None, :]
    elif mask is not None:
        raise ValueError(mask)
    if attn_mask is not None:
        attn_mask = attn_mask.to(device)
    return q, k, v, attn_mask


def reference(q, k, v, attn_mask=None, is_causal=False, scale=None, softcap=None):
    """Float64 attention written out independently of attnpatch (top-left causal; ``softcap``
    caps the scaled scores, c * tanh(s / c), before the mask, as Gemma 2 does).

    Returns ``(out, lse)``; a query row that sees no key gets out 0 and lse -inf, and
    contributes no gradient.
    """
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.double()
    if is_causal:
        sq, sk = scores.shape[-2:]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    # a query row that sees no key: out 0, lse -inf, zero gradients (filling its scores with 0
    # first keeps softmax and logsumexp, and so their gradients, free of NaN)
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    scores = scores.masked_fill(empty, 0.0)
    lse = torch.logsumexp(scores, dim=-1).masked_fill(empty.squeeze(-1), float("-inf"))
    return torch.softmax(scores, dim=-1).masked_fill(empty, 0.0) @ v, lse


def is_dense(backend: str) -> bool:
    """True for a backend defined as dense attention (its ``reference`` is the registry's
    dense one); False for a pattern strategy such as ``dilated``, whose result differs from
    dense attention by definition (tests that compare with an unpatched model skip those)."""
    return type(registry.get_backend(backend)).reference is registry.Backend.reference


def expected(backend: str, q, k, v, attn_mask=None, is_causal=False):
    """What ``backend`` is defined to compute, ``(out, lse)`` in float64: :func:`reference`
    (written independently of attnpatch) for a backend whose definition is dense attention,
    else the backend's own ``reference`` (a strategy that attends under a pattern, such as
    ``dilated``: dense attention under its stated mask) with its default options.
    Differentiable with respect to the given tensors."""
    b = registry.get_backend(backend)
    if is_dense(backend):
        return reference(q, k, v, attn_mask, is_causal)
    ex = attnpatch.explain(q.double(), k.double(), v.double(), attn_mask=attn_mask,
                           is_causal=is_causal, backend=backend)
    call = ex.call.replace(query=q.double(), key=k.double(), value=v.double(),
                           attn_mask=attn_mask if attn_mask is None or attn_mask.dtype == torch.bool
                           else attn_mask.double())
    return b.reference(call, ex.call.options)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def cpu_backends() -> list[str]:
    """Names of the registered backends that run on this machine's CPU, ``auto``'s order."""
    return [b.name for b in registry.all_backends()
            if "cpu" in b.devices and not b.availability_reasons()]


#: the backends of the CPU matrices, from the registry (built-in, strategies, third-party)
CPU_BACKENDS = tuple(cpu_backends())


def _tolerance(b: registry.Backend, dtype: torch.dtype) -> float:
    """The backend's declared tolerance for ``dtype``; an exact backend is also held to the
    dtype's rounding (machine epsilon) for fp16/bf16."""
    tol = b.tolerance[dtype]
    if b.exact and dtype in (torch.float16, torch.bfloat16):
        tol = min(tol, torch.finfo(dtype).eps)
    return tol


def check_or_refuse(backend: str, q, k, v, attn_mask=None, *, grad: bool = False, **kwargs):
    """``run_or_refuse``, then, when the backend ran: ``out`` (and ``lse`` with
    ``return_lse=True``; and with ``grad`` the q/k/v gradients of :func:`out_lse_loss`) against
    ``backend.reference(call)`` on float64 copies of the inputs, within the backend's declared
    ``tolerance`` (and its dtype's rounding when it is ``exact``). Returns ``(result, reference
    out)``, or None when the backend refused."""
    b = registry.get_backend(backend)
    dtype = q.dtype
    leaves = [t.detach().requires_grad_(grad) for t in (q, k, v)]
    result = run_or_refuse(backend, *leaves, attn_mask=attn_mask, **kwargs)
    if result is None:
        return None
    return_lse = kwargs.get("return_lse", False)
    out, lse = result if return_lse else (result, None)
    ref_leaves = [t.detach().double().requires_grad_(grad) for t in (q, k, v)]
    ref_mask = (attn_mask.double() if attn_mask is not None and attn_mask.is_floating_point()
                else attn_mask)
    ex = attnpatch.explain(*ref_leaves, attn_mask=ref_mask, backend=backend, **kwargs)
    ref_out, ref_lse = b.reference(ex.call, ex.call.options)
    tol = _tolerance(b, dtype)
    assert out.dtype == dtype and out.shape == ref_out.shape, (out.dtype, out.shape)
    assert not out.isnan().any(), "NaN in out"
    assert rel_error(out.detach(), ref_out.detach()) <= tol, (
        f"{backend}: out error {rel_error(out.detach(), ref_out.detach()):.2e} > {tol:.0e}")
    if lse is not None:
        want = torch.float64 if dtype == torch.float64 else torch.float32
        assert lse.shape == ref_lse.shape and lse.dtype == want, (lse.dtype, want)
        torch.testing.assert_close(lse.detach().double(), ref_lse.detach(),
                                   rtol=max(tol, 1e-5), atol=max(tol, 1e-5))
    if grad:
        out_lse_loss(ref_out, ref_lse if return_lse else None).backward()
        out_lse_loss(out, lse).backward()
        for name, ours, ref in zip("qkv", leaves, ref_leaves):
            assert ours.grad is not None, f"{backend}: no gradient for {name}"
            err = rel_error(ours.grad, ref.grad)
            assert err <= tol, f"{backend}: gradient of {name} error {err:.2e} > {tol:.0e}"
    return result, ref_out.detach()


def run_or_refuse(backend: str, *args, **kwargs):
    """``attnpatch.attention(*args, backend=backend, **kwargs)`` when ``explain`` says the
    backend takes the call; otherwise assert that the call raises
    :class:`~attnpatch.BackendUnavailableError` with exactly the reasons ``explain`` gives (at
    least one), and return None."""
    explanation = attnpatch.explain(*args, backend=backend, **kwargs)
    reasons = explanation.reasons[backend]
    if explanation.choice is not None:
        assert not reasons, reasons
        return attnpatch.attention(*args, backend=backend, **kwargs)
    assert reasons, f"{backend} refused without a reason"
    with pytest.raises(attnpatch.BackendUnavailableError) as err:
        attnpatch.attention(*args, backend=backend, **kwargs)
    assert err.value.reasons[backend] == reasons
    return None


def out_lse_loss(out: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    """A scalar that depends on every element of ``out`` and, if given, of ``lse``, through
    fixed random weights (the same for every dtype and device). Rows whose lse is -inf (no
    visible key) enter with lse 0, so the loss stays finite."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    loss = (out * weight.to(out.device, out.dtype)).sum()
    if lse is not None:
        weight = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
        finite = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        loss = loss + (finite * weight.to(lse.device, lse.dtype)).sum()
    return loss


@pytest.fixture
def inputs():
    return make_inputs
