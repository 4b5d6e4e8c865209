"""The reference backend: softmax(cap(QKᵀ·scale) + mask)·V with fp32 (fp64 for fp64)
accumulation, where cap(s) = c·tanh(s / c) when the call has a softcap c, else s."""

from __future__ import annotations

import torch

from ..call import AttentionCall
from ..registry import Backend, register_backend


def reference_attention(call: AttentionCall, accumulate: torch.dtype | None = None):
    """Exact attention for ``call``; returns ``(out, lse)``.

    ``out`` is (B, H, Sq, Dv) in the input dtype, ``lse`` (B, H, Sq) float32 (float64 for float64
    inputs). A query row that sees no key gives 0 and lse = -inf (no NaN, also in gradients).
    """
    q, (k, v) = call.query, call.kv_per_query_head()
    acc = accumulate or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * call.scale
    if call.softcap is not None:  # Gemma 2's order: scale, then cap, then the mask
        scores = torch.tanh(scores / call.softcap) * call.softcap
    mask = call.combined_mask()
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(acc)
    # Shift by a detached row max: softmax is shift-invariant, so gradients stay exact, and rows
    # with every key masked get a finite shift instead of (-inf) - (-inf) = NaN.
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    empty = denom == 0
    safe = torch.where(empty, torch.ones_like(denom), denom)
    probs = weights / safe
    # log(safe), then -inf: log(0) would send 1/0 * 0 = NaN back through a float mask's -inf
    lse = (torch.log(safe) + row_max).masked_fill(empty, float("-inf")).squeeze(-1)
    if call.dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, p=call.dropout_p, training=True)
    out = torch.matmul(probs, v.to(acc)).to(q.dtype)
    return out, (lse if acc == torch.float64 else lse.float())


def reference_backward(call: AttentionCall, grad_out: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``call`` from ``grad_out``, ``out`` and ``lse`` as given (see
    :meth:`Backend.backward`), in fp32 (fp64 for fp64 inputs), without dropout."""
    q, k, v = call.query, call.key, call.value
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = call.num_heads // call.num_kv_heads
    ka, va = call.kv_per_query_head()
    qa, ka, va = q.to(acc), ka.to(acc), va.to(acc)
    scores = torch.matmul(qa, ka.transpose(-2, -1)) * call.scale
    capped = None
    if call.softcap is not None:
        capped = torch.tanh(scores / call.softcap)
        scores = capped * call.softcap
    mask = call.combined_mask()
    if mask is not None:
        scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                  else scores + mask.to(acc))
    lse = lse.to(acc).unsqueeze(-1)
    # rows without a visible key (lse = -inf) have no probabilities
    probs = torch.where(torch.isfinite(lse), torch.exp(scores - lse.nan_to_num(neginf=0.0)),
                        0.0)
    do, o = grad_out.to(acc), out.to(acc)
    grad_v = torch.matmul(probs.transpose(-2, -1), do)
    delta = (do * o).sum(dim=-1, keepdim=True)
    grad_s = probs * (torch.matmul(do, va.transpose(-2, -1)) - delta)
    if capped is not None:  # d/ds c·tanh(s/c) = 1 - tanh²
        grad_s = grad_s * (1 - capped * capped)
    grad_q = torch.matmul(grad_s, ka) * call.scale
    grad_k = torch.matmul(grad_s.transpose(-2, -1), qa) * call.scale
    if group > 1:
        shape = (call.batch_size, call.num_kv_heads, group)
        grad_k = grad_k.view(*shape, *grad_k.shape[2:]).sum(2)
        grad_v = grad_v.view(*shape, *grad_v.shape[2:]).sum(2)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


@register_backend
class MathBackend(Backend):
    """Reference implementation: every feature, any device, slow and memory-hungry (S² scores)."""

    name = "math"
    aliases = ("reference",)
    description = "reference softmax(QK^T)V, fp32 accumulation"
    priority = 1000
    supports_lse = True
    supports_softcap = True
    supports_mask_grad = True
    lse_has_grad = True

    supports_backward_from_lse = True
    exact = True  # the reference itself: fp32 (fp64) accumulation, one rounding of the output

    def backward(self, call, grad_out, out, lse, **options):
        return reference_backward(call, grad_out, out, lse)

    def forward(self, call: AttentionCall, **options):
        out, lse = reference_attention(call)
        return (out, lse) if call.return_lse else out
