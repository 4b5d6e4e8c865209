"""Exact merges of partial attentions, with an exact backward: the strategy author's tool.

A strategy splits one attention call into sub-calls over the same queries (each over some of the
keys, with its own mask or causal pattern), runs each on an inner kernel, and merges them:

    lse = log(sum_i exp(lse_i))            out = sum_i exp(lse_i - lse) * out_i      (in fp32)

which is attention over the concatenation of the partials' keys. A key that appears in several
partials is counted once per partial (LongNet's semantics: its weight adds up), so a strategy
that wants plain attention over a set of keys gives each key to one partial.

The backward never differentiates through an lse: each partial's kernel runs its own backward
with the *merged* out and lse (as flash-attn's ring attention does), which is exactly that
partial's share of the gradient. Kernels declare it with ``supports_backward_from_lse``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ._errors import AttnPatchError
from .call import AttentionCall
from .dispatch import run_selected

__all__ = ["Partial", "merge_partials"]


@dataclass(frozen=True)
class Partial:
    """One sub-call of a merge: ``call`` (from ``AttentionCall.replace``) over the merge's
    queries, run by ``backend`` (a name, or ``"auto"``) with ``options``."""

    call: AttentionCall
    backend: str = "auto"
    options: Mapping[str, Any] = field(default_factory=dict)


def merge_partials(call: AttentionCall, partials: Sequence[Partial]):
    """Attention of ``call``'s queries over the keys of all ``partials``, exact in forward and
    backward (see the module docstring for the definition).

    Every partial's call must have ``call``'s batch, heads, query length and value head dim.
    When ``call.requires_grad``, each partial's backend must compute its backward from the
    merged (out, lse) (``supports_backward_from_lse``; ``auto`` picks one that does).
    A query row that no partial lets see a key gives out = 0, lse = -inf.

    Returns ``out`` (B, H, Sq, Dv) in ``call``'s dtype, or ``(out, lse)`` with lse float32
    (float64 for float64 inputs) (B, H, Sq) when ``call.return_lse``; the merged lse carries
    no gradient (a strategy that returns it declares ``lse_has_grad = False``). Raises
    :class:`AttnPatchError` for partials that do not fit ``call``, and what the inner backends
    raise.
    """
    if not partials:
        raise AttnPatchError("merge_partials needs at least one Partial")
    grad = call.requires_grad
    subs = []
    for i, part in enumerate(partials):
        if not isinstance(part, Partial):
            raise AttnPatchError(f"partials[{i}] is a {type(part).__name__}, not an "
                                 "attnpatch.Partial(call, backend, options)")
        sub = part.call
        expected = (call.batch_size, call.num_heads, call.seq_len_q, call.head_dim_v)
        got = (sub.batch_size, sub.num_heads, sub.seq_len_q, sub.head_dim_v)
        if got != expected:
            raise AttnPatchError(f"partials[{i}] has (B, H, Sq, Dv) = {got}, the merged call "
                                 f"{expected}: a partial covers the same queries")
        if sub.dropout_p:
            raise AttnPatchError(f"partials[{i}] has dropout_p={sub.dropout_p}: partials of an "
                                 "exact merge run without dropout")
        sub = sub.replace(return_lse=True)  # our own copy: the caller's call is not changed
        sub.backward_from_lse = grad and sub.requires_grad
        subs.append((sub, part.backend, dict(part.options)))
    if not grad:
        with torch.no_grad():
            out, lse = _merged([run_selected(name, sub, opts)[0] for sub, name, opts in subs])
        out = out.to(call.dtype)
    else:
        tensors = [t for sub, _, _ in subs for t in (sub.query, sub.key, sub.value)]
        out, lse = _Merge.apply(subs, call.dtype, *tensors)
    return (out, lse) if call.return_lse else out


def _merged(results) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) in fp32 (fp64 for fp64 outputs) of partial ``(out_i, lse_i)`` results."""
    acc = torch.float64 if results[0][0].dtype == torch.float64 else torch.float32
    lses = torch.stack([lse.to(acc) for _, lse in results])
    lse = torch.logsumexp(lses, dim=0)  # -inf where every partial is -inf
    # rows without any key: exp(-inf - 0) = 0 for every partial, so out = 0
    weights = torch.exp(lses - lse.nan_to_num(neginf=0.0)).unsqueeze(-1)
    out = weights[0] * results[0][0].to(acc)
    for w, (o, _) in zip(weights[1:], results[1:]):
        out = out + w * o.to(acc)
    return out, lse


class _Merge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, subs, dtype, *tensors):
        ran = [run_selected(name, sub, opts) for sub, name, opts in subs]
        out, lse = _merged([result for result, _ in ran])
        out = out.to(dtype)
        ctx.subs = [(sub, backend, opts) for (sub, _, opts), (_, backend) in zip(subs, ran)]
        ctx.save_for_backward(out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        out, lse = ctx.saved_tensors
        # a row that sees no key (lse = -inf): +inf gives every kernel P = exp(s - lse) = 0
        lse = lse.masked_fill(lse == float("-inf"), float("inf"))
        grads = []
        for sub, backend, opts in ctx.subs:
            grads.extend(backend.backward(sub, grad_out, out, lse, **opts))
        return (None, None, *grads)
