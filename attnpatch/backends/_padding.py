"""Pure-torch helpers that let flash-style kernels run attnpatch's calls exactly.

Two gaps between SDPA semantics (attnpatch's) and FlashAttention's kernels are bridged here,
without any kernel import, so every helper is exact and testable on CPU tensors:

* **Key padding** (a bool ``(B|1, 1, 1, Sk)`` mask, True = keep): the kernels have no masks, but
  their *varlen* entry points take packed sequences. :func:`run_key_padding` unpads keys and
  values per batch element (``cu_seqlens_k``), keeps every query (``cu_seqlens_q = arange * Sq``),
  calls the kernel once and gives back the output and log-sum-exp in dense layout.
* **Causal alignment**: ``is_causal`` is top-left aligned in SDPA (query ``i`` sees keys
  ``j <= i``); flash's ``causal`` and ``window_size`` are bottom-right aligned. With
  ``off = Sk - Sq``, flash keeps key ``j`` for query ``i`` iff
  ``i + off - left <= j <= i + off + right`` (``causal`` is ``right = 0``; ``None`` is unbounded).
  :func:`causal_plan` rewrites top-left causal as segments flash can run:

  - ``Sq == Sk``: the two alignments agree: ``causal=True``.
  - ``Sq < Sk``: keys ``j >= Sq`` are seen by no query, so dropping them leaves a square problem:
    keys ``[:Sq]`` with ``causal=True`` (less work, too).
  - ``Sq > Sk``: ``right = Sq - Sk`` gives ``j <= i + (Sk - Sq) + (Sq - Sk) = i``: one call with
    ``window=(None, Sq - Sk)`` where the kernel takes any right window (FlashAttention-4).
    FlashAttention-2/3 clamp ``right >= Sk`` to "unbounded" (wrong once ``Sq >= 2 Sk``), so for
    them the rows split: queries ``[:Sk]`` are square causal, queries ``[Sk:]`` see every key.

  Top-left causal never leaves a query row without keys (key 0 is always visible), so no
  segment has an empty row. :func:`flash_visible` is the kernels' rule written out, and
  :func:`plan_visible` composes a plan from it: tests prove ``plan_visible == tril`` for all
  sizes, and run the executors against the math backend.

Each executor has a backward twin (:func:`run_causal_plan_backward`,
:func:`run_key_padding_backward`) that runs the kernels' backward entry points on the same
segments or packed sequences, from a given (out, lse), and assembles dense gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "Segment", "causal_plan", "flash_visible", "plan_visible", "run_causal_plan",
    "run_causal_plan_backward", "key_padding_keep", "unpad_kv", "dense_cu_seqlens",
    "lse_from_varlen", "run_key_padding", "run_key_padding_backward", "pad_head_dim",
    "pad_head_dim_to", "aligned_bias",
]

Window = tuple[Optional[int], Optional[int]]
NO_WINDOW: Window = (None, None)


# --- causal alignment ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """One kernel call of a plan: queries ``[q_start:q_end]`` against keys ``[:k_end]``, with
    flash's own (bottom-right aligned) ``causal`` flag and ``window`` on that sub-problem."""

    q_start: int
    q_end: int
    k_end: int
    causal: bool = False
    window: Window = NO_WINDOW


def causal_plan(seq_q: int, seq_k: int, is_causal: bool, any_right_window: bool
                ) -> tuple[Segment, ...]:
    """The kernel calls that compute attention with SDPA's top-left ``is_causal`` (see module
    doc). ``any_right_window``: the kernel keeps a right window ``>= seq_k`` as given (FA4)."""
    if not is_causal:
        return (Segment(0, seq_q, seq_k),)
    if seq_q == seq_k:
        return (Segment(0, seq_q, seq_k, causal=True),)
    if seq_q < seq_k:
        return (Segment(0, seq_q, seq_q, causal=True),)
    if any_right_window:
        return (Segment(0, seq_q, seq_k, window=(None, seq_q - seq_k)),)
    return (Segment(0, seq_k, seq_k, causal=True), Segment(seq_k, seq_q, seq_k))


def flash_visible(seq_q: int, seq_k: int, causal: bool = False, window: Window = NO_WINDOW,
                  device=None) -> torch.Tensor:
    """Bool (Sq, Sk): which keys flash's kernels keep for ``causal``/``window`` (bottom-right
    aligned; ``causal`` means right window 0; ``None`` is unbounded)."""
    left, right = window
    if causal:
        right = 0
    i = torch.arange(seq_q, device=device)[:, None]
    j = torch.arange(seq_k, device=device)[None, :]
    diag = i + (seq_k - seq_q)
    keep = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
    if right is not None:
        keep &= j <= diag + right
    if left is not None:
        keep &= j >= diag - left
    return keep


def plan_visible(plan: tuple[Segment, ...], seq_q: int, seq_k: int) -> torch.Tensor:
    """Bool (Sq, Sk): what a plan lets each query see, built from :func:`flash_visible`."""
    keep = torch.zeros(seq_q, seq_k, dtype=torch.bool)
    for s in plan:
        keep[s.q_start:s.q_end, :s.k_end] = flash_visible(s.q_end - s.q_start, s.k_end, s.causal,
                                                          s.window)
    return keep


DenseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, Window],
                   tuple[torch.Tensor, Optional[torch.Tensor]]]


def run_causal_plan(plan: tuple[Segment, ...], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    dense: DenseFn) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run ``plan`` with ``dense(q, k, v, causal, window) -> (out, lse | None)`` on (B, S, H, D)
    tensors (views are sliced, never copied); returns out (B, Sq, H, Dv) and lse (B, H, Sq)."""
    outs, lses = [], []
    for s in plan:
        qs = q if (s.q_start, s.q_end) == (0, q.shape[1]) else q[:, s.q_start:s.q_end]
        ks, vs = (k, v) if s.k_end == k.shape[1] else (k[:, :s.k_end], v[:, :s.k_end])
        out, lse = dense(qs, ks, vs, s.causal, s.window)
        outs.append(out)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    lse = None if lses[0] is None else torch.cat(lses, dim=2)
    return torch.cat(outs, dim=1), lse


DenseBwdFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                       torch.Tensor, bool, Window],
                      tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def run_causal_plan_backward(plan: tuple[Segment, ...], q: torch.Tensor, k: torch.Tensor,
                             v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                             lse: torch.Tensor, dense_bwd: DenseBwdFn
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q/k/v gradients of :func:`run_causal_plan`'s attention for ``dout``, from ``out``
    (B, Sq, H, Dv) and ``lse`` (B, H, Sq) as given (possibly those of a larger attention).

    ``dense_bwd(q, k, v, out, dout, lse, causal, window) -> (dq, dk, dv)`` is one backward
    kernel call on a segment (its rows of out, dout and lse). Returns dq (B, Sq, H, D), dk and
    dv (B, Sk, Hkv, D|Dv); keys no segment sees get zero. Key gradients of several segments
    add up in float32 (float64 for float64 inputs).
    """
    if len(plan) == 1 and (plan[0].q_start, plan[0].q_end, plan[0].k_end) == (
            0, q.shape[1], k.shape[1]):
        return dense_bwd(q, k, v, out, dout, lse, plan[0].causal, plan[0].window)
    dq = torch.zeros_like(q)
    acc = torch.promote_types(k.dtype, torch.float32) if len(plan) > 1 else k.dtype
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    for s in plan:
        rows = slice(s.q_start, s.q_end)
        gq, gk, gv = dense_bwd(q[:, rows], k[:, :s.k_end], v[:, :s.k_end], out[:, rows],
                               dout[:, rows], lse[:, :, rows], s.causal, s.window)
        dq[:, rows] = gq
        dk[:, :s.k_end] += gk
        dv[:, :s.k_end] += gv
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# --- key padding through varlen ------------------------------------------------------------------
def key_padding_keep(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """A key-padding mask (B|1, 1, 1, Sk) as a (B, Sk) bool "keep" matrix (a view)."""
    return mask[:, 0, 0, :].expand(batch, mask.shape[-1])


def unpad_kv(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor):
    """Pack the kept keys/values of (B, Sk, H, D) tensors: returns ``(k_packed (Tk, H, D),
    v_packed (Tk, H, Dv), cu_seqlens_k (B+1,) int32, max_seqlen_k int, seqlens (B,) int32)``.

    Order is batch-major, then position, as varlen kernels expect. Gradients flow back to the
    kept positions (padding positions get zero). Synchronizes with the device (packed size).
    """
    seqlens = keep.sum(dim=1, dtype=torch.int32)
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    return k[keep], v[keep], cu_seqlens, max_seqlen, seqlens


def dense_cu_seqlens(batch: int, seq: int, device) -> torch.Tensor:
    """``cu_seqlens`` of ``batch`` sequences of ``seq`` tokens each: arange(B+1) * S, int32."""
    return torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=device)


def lse_from_varlen(lse: torch.Tensor, batch: int, seq_q: int) -> torch.Tensor:
    """A varlen kernel's lse for dense queries as (B, H, Sq).

    Accepts the packed layout (H, B*Sq) of flash-attn >= 2.4 / FA3 / FA4, and the older padded
    (B, H, >= Sq). Rows that saw no key come back as -inf (FA2 writes +inf there).
    """
    if lse.dim() == 2:
        lse = lse.view(lse.shape[0], batch, seq_q).permute(1, 0, 2)
    else:
        lse = lse[..., :seq_q]
    return torch.where(lse == float("inf"), torch.full_like(lse, float("-inf")), lse)


VarlenFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int,
                     int],
                    tuple[torch.Tensor, Optional[torch.Tensor]]]


def run_key_padding(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                    varlen: VarlenFn) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention of (B, Sq, H, D) queries over the kept keys of (B, Sk, Hkv, D) k/v.

    ``varlen(q_packed, k_packed, v_packed, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k) -> (out_packed (B*Sq, H, Dv), lse | None)`` is one non-causal varlen kernel
    call. Returns out (B, Sq, H, Dv) and lse (B, H, Sq) (None when the kernel gave none).
    A query whose batch element keeps no key gets 0 and lse -inf.
    """
    batch, seq_q, heads, _ = q.shape
    k_packed, v_packed, cu_k, max_k, _ = unpad_kv(k, v, keep)
    if max_k == 0:  # nothing to attend anywhere: zeros, still connected to the graph
        out = q.new_zeros(batch, seq_q, heads, v.shape[-1])
        if q.requires_grad or k.requires_grad or v.requires_grad:
            out = out + 0 * (q.sum() + k.sum() + v.sum())
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return out, torch.full((batch, heads, seq_q), float("-inf"), dtype=lse_dtype,
                               device=q.device)
    cu_q = dense_cu_seqlens(batch, seq_q, q.device)
    out, lse = varlen(q.reshape(batch * seq_q, heads, q.shape[-1]), k_packed, v_packed, cu_q,
                      cu_k, seq_q, max_k)
    out = out.view(batch, seq_q, heads, out.shape[-1])
    return out, (None if lse is None else lse_from_varlen(lse, batch, seq_q))


VarlenBwdFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                        torch.Tensor, torch.Tensor, torch.Tensor, int, int],
                       tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def run_key_padding_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
                             keep: torch.Tensor, varlen_bwd: VarlenBwdFn
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q/k/v gradients of :func:`run_key_padding`'s attention for ``dout`` (B, Sq, H, Dv),
    from ``out`` (B, Sq, H, Dv) and ``lse`` (B, H, Sq) as given.

    ``varlen_bwd(q_packed, k_packed, v_packed, out_packed, dout_packed, lse_packed (H, B*Sq),
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> (dq, dk, dv)`` (packed) is one
    non-causal varlen backward kernel call. Returns dense dq (B, Sq, H, D), dk, dv
    (B, Sk, Hkv, D|Dv): zero at padded keys, and zero for the queries of a batch element that
    keeps no key. Synchronizes with the device (packed size), like the forward.
    """
    batch, seq_q, heads, _ = q.shape
    k_packed, v_packed, cu_k, max_k, seqlens = unpad_kv(k, v, keep)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    if max_k == 0:
        return torch.zeros_like(q), dk, dv
    cu_q = dense_cu_seqlens(batch, seq_q, q.device)

    def packed(t):
        return t.reshape(batch * seq_q, heads, t.shape[-1])

    lse_packed = lse.permute(1, 0, 2).reshape(heads, batch * seq_q)
    dq, dk_packed, dv_packed = varlen_bwd(packed(q), k_packed, v_packed, packed(out),
                                          packed(dout), lse_packed, cu_q, cu_k, seq_q, max_k)
    dk[keep] = dk_packed.to(dk.dtype)
    dv[keep] = dv_packed.to(dv.dtype)
    has_keys = (seqlens > 0).view(batch, 1, 1, 1)
    dq = torch.where(has_keys, dq.reshape(batch, seq_q, heads, dq.shape[-1]), 0.0)
    return dq, dk, dv


def pad_head_dim(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last dim to a multiple (exact for q/k; slice the output for v)."""
    return pad_head_dim_to(t, t.shape[-1] + (-t.shape[-1] % multiple))


def pad_head_dim_to(t: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last dim to ``size`` (>= its length); ``t`` itself when nothing to pad."""
    extra = size - t.shape[-1]
    return F.pad(t, (0, extra)) if extra else t


def aligned_bias(bias: torch.Tensor, shape: tuple[int, ...], multiple: int) -> torch.Tensor:
    """``bias`` (an additive mask broadcastable to ``shape`` = (B, H, Sq, Sk)) expanded to
    ``shape`` (stride 0 where it broadcasts), stored so that every stride but the last (1) is a
    multiple of ``multiple`` elements, as the memory-efficient kernels require of a bias (SDPA's:
    16; xFormers': 8). Copied into row-padded storage only when it is not stored so already."""
    sk = shape[-1]
    if bias.stride(-1) != 1 or any(s % multiple for s in bias.stride()[:-1]):
        stored = torch.empty(*bias.shape[:-1], sk + (-sk % multiple), dtype=bias.dtype,
                             device=bias.device)[..., :sk]
        stored.copy_(bias)
        bias = stored
    return bias.expand(shape)
