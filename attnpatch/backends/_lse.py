"""Gradients through the log-sum-exp for kernels whose own backward ignores it.

The SDPA aten ops return the lse as a non-differentiable output, so a loss that uses it (every
merge of partial attentions does) would get wrong q/k gradients. :func:`with_lse_gradient` makes
the lse differentiable: with P the attention probabilities, s_ij = scale * q_i . k_j and
g = dL/dlse, lse_i = logsumexp_j s_ij gives dL/ds_ij = g_i P_ij, so

    dq_i = scale * g_i * sum_j P_ij k_j      (attention of q over keys k with values k)
    dk_j = scale * sum_i P_ij g_i q_i        (that attention's value gradient for grad g * q)

Both come from one forward and one backward of the same kernel, with the same mask and causal
pattern; nothing of size Sq x Sk is materialized. The value gradient gets nothing from the lse.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["with_lse_gradient"]


class _LseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lse, query, key, attend, scale):
        ctx.save_for_backward(query, key, lse)
        ctx.attend, ctx.scale = attend, scale
        return lse.view_as(lse)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lse):
        query, key, lse = ctx.saved_tensors
        # rows without a visible key (lse = -inf) have no probabilities: nothing flows back
        weight = torch.where(torch.isfinite(lse), grad_lse, 0.0).unsqueeze(-1)
        q, k = query.detach(), key.detach()
        with torch.enable_grad():
            values = key.detach().requires_grad_()  # its own leaf, sharing k's storage
            mean_key = ctx.attend(q, k, values)  # sum_j P_ij k_j, (B, H, Sq, D)
            (grad_values,) = torch.autograd.grad(mean_key, values,
                                                 (weight * q).to(mean_key.dtype))
        grad_q = (ctx.scale * weight * mean_key.detach()).to(query.dtype)
        grad_k = (ctx.scale * grad_values).to(key.dtype)
        return None, grad_q, grad_k, None, None


def with_lse_gradient(lse: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                      attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                      scale: float) -> torch.Tensor:
    """``lse`` (B, H, Sq), now carrying its gradient to ``query`` (B, H, Sq, D) and ``key``
    (B, Hkv, Sk, D).

    ``attend(q, k, v) -> out`` must run the kernel that produced ``lse`` (same mask, causal,
    scale, no dropout) with autograd through ``v``; it is called only in backward, and only when
    the loss uses the lse.
    """
    return _LseGradient.apply(lse.detach(), query, key, attend, scale)
