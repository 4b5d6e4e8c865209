"""PyTorch's ``scaled_dot_product_attention``: torch's own choice, and each kernel forced.

Forced kernels run under ``torch.nn.attention.sdpa_kernel``; on CUDA their constraints are
torch's own (``torch.backends.cuda.can_use_*_attention`` with debug reasons), so our reasons
never drift from what the kernel really accepts. ``return_lse`` goes through the aten ops.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..call import AttentionCall
from ..registry import Backend, register_backend
from ._padding import pad_head_dim


def _sdpa(call: AttentionCall):
    mask, is_causal = call.attn_mask, call.is_causal
    if mask is None and not is_causal and not call.dropout_p and not call.is_gqa:
        # torch's argument parser charges ~0.5 µs per keyword: pass only what differs
        if call.default_scale:
            return F.scaled_dot_product_attention(call.query, call.key, call.value)
        return F.scaled_dot_product_attention(call.query, call.key, call.value, scale=call.scale)
    if is_causal and mask is not None:  # SDPA refuses both at once; fold the pattern in
        mask, is_causal = call.combined_mask(), False
    # scale=None where the caller gave none: SDPA's own default is not bitwise our float
    return F.scaled_dot_product_attention(
        call.query, call.key, call.value, attn_mask=mask, dropout_p=call.dropout_p,
        is_causal=is_causal, scale=None if call.default_scale else call.scale,
        enable_gqa=call.is_gqa)


@register_backend
class SDPABackend(Backend):
    """``F.scaled_dot_product_attention`` with torch's own kernel choice."""

    name = "sdpa"
    aliases = ("native", "torch")
    description = "torch SDPA, torch picks the kernel"
    priority = 100

    def forward(self, call: AttentionCall, **options):
        return _sdpa(call)

    def specialize(self, call: AttentionCall) -> Optional[Callable]:
        # what _sdpa does for a call without a mask: the kernel with the arguments that differ
        # from SDPA's defaults bound once (a C-level partial: no Python frame per call)
        kwargs = {}
        if call.dropout_p:
            kwargs["dropout_p"] = call.dropout_p
        if call.is_causal:
            kwargs["is_causal"] = True
        if not call.default_scale:
            kwargs["scale"] = call.scale
        if call.is_gqa:
            kwargs["enable_gqa"] = True
        sdpa = F.scaled_dot_product_attention
        return functools.partial(sdpa, **kwargs) if kwargs else sdpa


class _ForcedSDPA(Backend):
    kernel: ClassVar[SDPBackend]
    cuda_check: ClassVar[Optional[str]] = None  # name of torch.backends.cuda.can_use_* function

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        reasons = super().not_supported_reasons(call)
        if (reasons or call.device.type != "cuda" or self.cuda_check is None
                or call.query.device.type == "meta"):  # traced by torch.compile: no tensors
            return reasons
        return _torch_reasons(self.cuda_check, call)

    def forward(self, call: AttentionCall, **options):
        if call.return_lse:
            return self.forward_with_lse(call)
        with sdpa_kernel(self.kernel):
            return _sdpa(call)

    def forward_with_lse(self, call: AttentionCall):
        raise NotImplementedError


def _torch_reasons(check: str, call: AttentionCall) -> list[str]:
    """Ask torch whether its kernel takes ``call``; turn its debug warnings into reasons."""
    mask, is_causal = call.attn_mask, call.is_causal
    if is_causal and mask is not None:
        mask, is_causal = call.combined_mask(), False
    if mask is not None and mask.dim() == 4 and mask.shape != (
            call.batch_size, call.num_heads, call.seq_len_q, call.seq_len_kv):
        mask = mask.expand(call.batch_size, call.num_heads, call.seq_len_q, call.seq_len_kv)
    params = torch.backends.cuda.SDPAParams(call.query, call.key, call.value, mask,
                                            call.dropout_p, is_causal, call.is_gqa)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = getattr(torch.backends.cuda, check)(params, True)
    if ok:
        return []
    msgs = [str(w.message).strip() for w in caught]
    return [f"torch: {m}" for m in msgs] or [f"torch.backends.cuda.{check} refused the call"]


def _expand_kv(call: AttentionCall):
    k, v = call.key, call.value
    if call.is_gqa:
        group = call.num_heads // call.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return k, v


def _float_bias(call: AttentionCall) -> Optional[torch.Tensor]:
    mask = call.combined_mask()
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=call.dtype, device=call.device).masked_fill_(
        ~mask, float("-inf"))


@register_backend
class SDPAFlashBackend(_ForcedSDPA):
    """SDPA's FlashAttention-2 kernel (CUDA) or its flash-style CPU kernel."""

    name = "sdpa_flash"
    aliases = ("_native_flash",)
    description = "torch SDPA, flash kernel forced"
    priority = 200
    kernel = SDPBackend.FLASH_ATTENTION
    cuda_check = "can_use_flash_attention"
    supports_lse = True
    supports_value_head_dim = False

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        reasons = super().not_supported_reasons(call)
        if call.device.type == "cpu" and call.dropout_p > 0:
            reasons.append(f"dropout_p={call.dropout_p} not supported by the CPU flash kernel")
        if call.device.type == "cuda" and call.return_lse and call.attn_mask is not None:
            reasons.append("return_lse=True with attn_mask not supported by the CUDA flash kernel")
        return reasons

    def forward_with_lse(self, call: AttentionCall):
        k, v = _expand_kv(call)
        if call.device.type == "cpu":  # the CPU kernel takes only a float bias of q's dtype
            bias = _float_bias(call)
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                call.query, k, v, call.dropout_p, call.is_causal and bias is None,
                attn_mask=bias, scale=call.scale)
        d = call.head_dim
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            pad_head_dim(call.query, 8), pad_head_dim(k, 8), pad_head_dim(v, 8),
            call.dropout_p, call.is_causal, False, scale=call.scale)[:2]
        return out[..., :d], lse


@register_backend
class SDPAEfficientBackend(_ForcedSDPA):
    """SDPA's memory-efficient (xformers-derived) CUDA kernel."""

    name = "sdpa_efficient"
    aliases = ("_native_efficient", "efficient")
    description = "torch SDPA, memory-efficient kernel forced"
    priority = 220
    devices = ("cuda",)
    kernel = SDPBackend.EFFICIENT_ATTENTION
    cuda_check = "can_use_efficient_attention"
    supports_lse = True

    def forward_with_lse(self, call: AttentionCall):
        k, v = _expand_kv(call)
        bias, is_causal = None, call.is_causal  # the kernel's causal is top-left, like ours
        if call.attn_mask is not None:
            bias, is_causal = _aligned(_float_bias(call), call), False
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            call.query, k, v, bias, True, call.dropout_p, is_causal, scale=call.scale)[:2]
        return out, lse[..., :call.seq_len_q]


def _aligned(bias: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """The (B, H, Sq, Sk) bias in a buffer whose strides are multiples of 16 elements, as the
    memory-efficient kernel requires (F.scaled_dot_product_attention pads the same way)."""
    shape = (call.batch_size, call.num_heads, call.seq_len_q, call.seq_len_kv)
    padded = call.seq_len_kv + (-call.seq_len_kv % 16)
    buffer = torch.empty(*shape[:-1], padded, dtype=bias.dtype, device=bias.device)
    buffer = buffer[..., :call.seq_len_kv]
    buffer.copy_(bias.expand(shape))
    return buffer


@register_backend
class SDPACudnnBackend(_ForcedSDPA):
    """SDPA's cuDNN kernel (fastest on H100 for the large diffusion shapes)."""

    name = "sdpa_cudnn"
    aliases = ("_native_cudnn", "cudnn")
    description = "torch SDPA, cuDNN kernel forced"
    priority = 210
    devices = ("cuda",)
    kernel = SDPBackend.CUDNN_ATTENTION
    cuda_check = "can_use_cudnn_attention"
    supports_lse = True

    def forward_with_lse(self, call: AttentionCall):
        k, v = _expand_kv(call)
        bias = _float_bias(call)
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            call.query, k, v, bias, True, call.dropout_p,
            False if bias is not None else call.is_causal, False, scale=call.scale)[:2]
        return out, lse.reshape(call.batch_size, call.num_heads, call.seq_len_q)


@register_backend
class SDPAMathBackend(_ForcedSDPA):
    """SDPA's composite math kernel (what torch falls back to)."""

    name = "sdpa_math"
    aliases = ("_native_math",)
    description = "torch SDPA, math kernel forced"
    priority = 900
    kernel = SDPBackend.MATH
