"""FlashAttention-4 called directly, without attnpatch, to time beside the ``flash4`` backend.

``flash4_direct(q, k, v)`` takes (B, S, H, D) CUDA tensors (fp16/bf16, head_dim a multiple of 8,
H a multiple of Hkv) and returns the output (B, Sq, H, Dv). Its ``causal`` is flash's own,
bottom-right aligned: it equals attnpatch's (SDPA's, top-left) only when Sq == Sk. Importing this
module imports nothing from flash-attn; the first call does.

    from benchmarks._flash_direct import flash4_direct, flash4_available
    if flash4_available():
        out = flash4_direct(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["flash4_direct", "flash4_available"]


def flash4_available() -> bool:
    """Whether ``flash_attn.cute`` imports here (and a CUDA device exists)."""
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn.cute  # noqa: F401
    except Exception:
        return False
    return True


def flash4_direct(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                  softmax_scale: Optional[float] = None) -> torch.Tensor:
    """``flash_attn.cute.flash_attn_func(q, k, v)`` on (B, S, H, D) tensors; returns ``out``
    (the function returns ``(out, lse)``)."""
    from flash_attn.cute import flash_attn_func

    return flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal)[0]
