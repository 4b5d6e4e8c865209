"""FlexAttention: masks as ``BlockMask``/``mask_mod``/``score_mod``, compiled per signature on CUDA.

Tensor masks become a ``score_mod`` (no block sparsity to exploit), causal becomes a cached
``BlockMask`` so fully masked blocks are skipped. A call's ``softcap`` is a ``score_mod`` too,
applied first (to the scaled score, as in Gemma 2): softcap, then the user's ``score_mod``, then
the tensor mask. On CPU the kernel runs eagerly by default:
compiling it there takes tens of seconds per shape, and eager flex computes the same result.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .._caches import BoundedCache
from .._errors import AttnPatchError
from ..call import AttentionCall
from ..registry import Backend, register_backend
from .math import reference_attention

try:  # torch >= 2.5
    from torch.nn.attention import flex_attention as _flex_module
except ImportError:  # pragma: no cover - torch too old
    _flex_module = None


def _trampoline(query, key, value, **kwargs):
    return _flex_module.flex_attention(query, key, value, **kwargs)


# compiled kernels are costly to rebuild: a generous bound, only against unbounded growth
_COMPILED = BoundedCache(512)


def _compiled_flex(signature: tuple):
    """A compiled flex_attention for one call signature.

    Each signature gets its own code object, hence its own dynamo cache and recompile budget:
    a UNet's many resolutions and cross-attention shapes never exhaust one shared limit and
    silently fall back to the unfused eager path.
    """
    fn = _COMPILED.get(signature)
    if fn is None:
        code = _trampoline.__code__.replace(co_name=f"_flex_{len(_COMPILED)}")
        fresh = types.FunctionType(code, _trampoline.__globals__, code.co_name)
        fn = _COMPILED.put(signature, torch.compile(fresh, dynamic=False, fullgraph=True))
    return fn


_BLOCK_MASKS = BoundedCache(64)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _block_mask(mask_mod: Optional[Callable], causal: bool, batch: Optional[int],
                heads: Optional[int], seq_q: int, seq_k: int, device: torch.device):
    """The cached BlockMask of the user's ``mask_mod`` (None: none) with ``causal`` on top.
    A user mask_mod may read b and h: its mask is built per batch element and head (one for
    (b, h) = (0, 0) alone makes the compiled kernel skip the others' blocks); the causal
    pattern alone reads neither and is built once for all."""
    if mask_mod is None:
        batch = heads = None
    key = (mask_mod, causal, batch, heads, seq_q, seq_k, device)
    block_mask = _BLOCK_MASKS.get(key)
    if block_mask is None:
        fn = _causal if mask_mod is None else _and_causal(mask_mod) if causal else mask_mod
        block_mask = _flex_module.create_block_mask(fn, batch, heads, seq_q, seq_k,
                                                    device=device)
        _BLOCK_MASKS.put(key, block_mask)
    return block_mask


def _and_causal(mask_mod: Callable) -> Callable:
    def both(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx, kv_idx) & (q_idx >= kv_idx)
    return both


@dataclass(frozen=True)
class FlexOptions:
    """flex's options, validated when given (see :class:`FlexBackend`)."""

    block_mask: Any = None
    mask_mod: Optional[Callable] = None
    score_mod: Optional[Callable] = None
    compile: Optional[bool] = None
    kernel_options: Any = None

    def __post_init__(self):
        block_mask, mask_mod = self.block_mask, self.mask_mod
        if block_mask is not None and not isinstance(block_mask, _flex_module.BlockMask):
            raise AttnPatchError(f"flex: block_mask must be a BlockMask "
                                 f"(torch.nn.attention.flex_attention.create_block_mask) or None, "
                                 f"got {type(block_mask).__name__}")
        if mask_mod is not None and not callable(mask_mod):
            raise AttnPatchError(f"flex: mask_mod must be a callable fn(b, h, q_idx, kv_idx) -> "
                                 f"bool or None, got {type(mask_mod).__name__}")
        if block_mask is not None and mask_mod is not None:
            raise AttnPatchError("flex: pass block_mask= or mask_mod=, not both")
        if self.score_mod is not None and not callable(self.score_mod):
            raise AttnPatchError(f"flex: score_mod must be a callable "
                                 f"fn(score, b, h, q_idx, kv_idx) -> score or None, got "
                                 f"{type(self.score_mod).__name__}")
        if self.compile is not None and not isinstance(self.compile, bool):
            raise AttnPatchError(f"flex: compile must be a bool or None, got {self.compile!r}")
        kernel_options = self.kernel_options
        if kernel_options is not None:
            if not isinstance(kernel_options, Mapping):
                raise AttnPatchError(f"flex: kernel_options must be a dict or None, got "
                                     f"{type(kernel_options).__name__}")
            # hashable, so equal options key one selection
            object.__setattr__(self, "kernel_options", tuple(sorted(kernel_options.items())))


@register_backend
class FlexBackend(Backend):
    """``torch.nn.attention.flex_attention``.

    Options: ``block_mask`` (a BlockMask), ``mask_mod`` (``fn(b, h, q_idx, kv_idx) -> bool``;
    a BlockMask is built and cached per mask_mod and shape), ``score_mod``
    (``fn(score, b, h, q_idx, kv_idx) -> score``; with a call's ``softcap`` it receives the
    capped score), ``compile`` (default: True on CUDA, False on
    CPU), ``kernel_options`` (passed to flex_attention).
    """

    name = "flex"
    aliases = ("flex_attention",)
    description = "torch FlexAttention (compiled on CUDA)"
    priority = 400
    supports_dropout = False
    supports_lse = True
    lse_has_grad = True  # flex's backward takes the lse gradient (grad_logsumexp)
    supports_value_head_dim = True
    supports_softcap = True
    Options = FlexOptions

    def availability_reasons(self) -> list[str]:
        reasons = super().availability_reasons()
        if _flex_module is None:
            reasons.append(f"torch {torch.__version__} has no FlexAttention (needs >= 2.5)")
        return reasons

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        reasons = super().not_supported_reasons(call)
        if call.device.type == "cpu" and call.requires_grad:
            reasons.append("backward not supported on cpu (FlexAttention has no CPU backward)")
        if call.head_dim < 16 and call.device.type == "cuda":
            reasons.append(f"head_dim {call.head_dim} < 16")
        return reasons

    def forward(self, call: AttentionCall, block_mask=None, mask_mod=None, score_mod=None,
                compile: Optional[bool] = None, kernel_options: Optional[dict] = None, **_: Any):
        if mask_mod is not None or (block_mask is None and call.is_causal):
            block_mask = _block_mask(mask_mod, call.is_causal, call.batch_size, call.num_heads,
                                     call.seq_len_q, call.seq_len_kv, call.device)
        elif block_mask is not None and call.is_causal:
            raise AttnPatchError("flex: is_causal=True with a prebuilt block_mask is ambiguous: "
                                 "fold the causal pattern into the BlockMask, or pass mask_mod=")
        if call.batch_size == 0:
            # nothing to attend; flex's tensor-mask score_mod cannot index an empty batch and its
            # lse comes back None. The reference computes the empty result (B=0, H, Sq, Dv), as
            # SDPA returns it, still connected to the inputs for autograd.
            out, lse = reference_attention(call)
            return (out, lse.float()) if call.return_lse else out
        score_mod = _with_tensor_mask(_with_softcap(score_mod, call.softcap), call)
        if compile is None:
            compile = call.device.type == "cuda"
        kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=call.scale,
                      enable_gqa=call.is_gqa, kernel_options=kernel_options)
        if call.return_lse:
            kwargs["return_aux"] = _flex_module.AuxRequest(lse=True)
        query, key, value = call.query, call.key, call.value
        if not call.requires_grad and (query.requires_grad or key.requires_grad
                                       or value.requires_grad):
            # grad mode is off (torch.no_grad()): no graph is recorded either way, but flex
            # refuses inputs that require grad on CPU ("does not support backward on CPU")
            query, key, value = query.detach(), key.detach(), value.detach()
        if torch.compiler.is_dynamo_compiling():
            # inside a graph torch.compile is tracing: flex_attention is traced (and compiled
            # with that graph) as it is; no nested compiled function, no warnings context
            result = _flex_module.flex_attention(query, key, value, **kwargs)
        elif compile:
            signature = (call.query.shape, call.key.shape, call.value.shape, call.dtype,
                         call.device, call.mask_kind, score_mod is not None,
                         block_mask is not None, call.return_lse, call.softcap)
            result = _compiled_flex(signature)(query, key, value, **kwargs)
        else:
            with warnings.catch_warnings():
                # eager is our deliberate choice here; torch warns that it is unfused
                warnings.filterwarnings("ignore", message="flex_attention called without")
                result = _flex_module.flex_attention(query, key, value, **kwargs)
        if call.return_lse:
            return result[0], result[1].lse.float()
        return result


def _softcap_mod(cap: float) -> Callable:
    """The ``score_mod`` of logit softcapping: ``cap * tanh(score / cap)``."""
    def softcap(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap
    return softcap


def _with_softcap(score_mod: Optional[Callable], cap: Optional[float]) -> Optional[Callable]:
    """``score_mod`` applied to the softcapped score (the cap comes first, as in Gemma 2)."""
    if cap is None:
        return score_mod
    capped = _softcap_mod(cap)
    if score_mod is None:
        return capped

    def both(score, b, h, q_idx, kv_idx):
        return score_mod(capped(score, b, h, q_idx, kv_idx), b, h, q_idx, kv_idx)
    return both


def _with_tensor_mask(score_mod: Optional[Callable], call: AttentionCall) -> Optional[Callable]:
    """``score_mod`` followed by the call's tensor mask as an additive bias
    (:meth:`AttentionCall.additive_mask`: a bool mask in the query dtype, 0 or -inf; a float
    mask in its own dtype, so no precision is lost to a half-precision query)."""
    mask = call.attn_mask
    if mask is None:
        return score_mod
    bias = call.additive_mask(call.dtype if mask.dtype == torch.bool else mask.dtype).expand(
        call.batch_size, call.num_heads, call.seq_len_q, call.seq_len_kv)

    def masked(score, b, h, q_idx, kv_idx):
        return score + bias[b, h, q_idx, kv_idx]
    if score_mod is None:
        return masked

    def both(score, b, h, q_idx, kv_idx):
        return masked(score_mod(score, b, h, q_idx, kv_idx), b, h, q_idx, kv_idx)
    return both
