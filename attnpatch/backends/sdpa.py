"""PyTorch's ``scaled_dot_product_attention``: torch's own choice, and each kernel forced.

A forced kernel is its aten op, called the way ``F.scaled_dot_product_attention`` calls it once
it has chosen that kernel (same padding, mask conversion and arguments). Nothing goes through
``torch.nn.attention.sdpa_kernel``, whose flags are process-wide: another thread, or plain
``F.scaled_dot_product_attention`` elsewhere, would see them. On CUDA the reasons are torch's
own (``torch.backends.cuda.can_use_*_attention`` with debug reasons), so they never drift from
what the kernel really accepts; on CPU they are written out here.

Every forced kernel that returns an lse holds attnpatch's definition: float32 (B, H, Sq); a
query row with no visible key has out = 0 and lse = -inf; gradients through the lse are exact
(the aten ops' own backward ignores them; ``_lse.with_lse_gradient`` adds them).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, ClassVar, Optional

import torch
import torch.nn.functional as F

from ..call import AttentionCall, cast_bias
from ..registry import Backend, get_backend, register_backend
from ._lse import with_lse_gradient
from ._padding import aligned_bias, pad_head_dim


def _sdpa(call: AttentionCall):
    mask, is_causal = call.attn_mask, call.is_causal
    if mask is None and not is_causal and not call.dropout_p and not call.is_gqa:
        # torch's argument parser charges ~0.5 µs per keyword: pass only what differs
        if call.default_scale:
            return F.scaled_dot_product_attention(call.query, call.key, call.value)
        return F.scaled_dot_product_attention(call.query, call.key, call.value, scale=call.scale)
    if is_causal and mask is not None:  # SDPA refuses both at once; fold the pattern in
        mask, is_causal = call.combined_mask(), False
    if mask is not None and mask.dtype not in (torch.bool, call.dtype) and (
            call.device.type != "cpu" or mask.dtype != torch.float32
            or call.dtype == torch.float64):
        # SDPA on CPU adds a float32 mask to half-precision scores in float32 (math and flash
        # kernels), but to float64 queries wrongly (off by ~2 from 16 keys on, torch 2.13):
        # those get the mask in float64. CUDA's fused kernels need the query's dtype (the
        # efficient one raises otherwise)
        mask = cast_bias(mask, call.dtype)
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
    supports_mask_grad = True

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
    """One SDPA kernel, run through its aten op. Subclasses implement :meth:`attend`."""

    #: name of the torch.backends.cuda.can_use_* function that checks a CUDA call
    cuda_check: ClassVar[Optional[str]] = None
    lse_has_grad = True  # with_lse_gradient adds what the aten ops' backward leaves out

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        reasons = super().not_supported_reasons(call)
        if call.return_lse and call.requires_grad and call.dropout_p > 0:
            reasons.append(f"return_lse=True with dropout_p={call.dropout_p} and backward not "
                           "supported (the lse gradient is computed without dropout)")
        if (reasons or call.device.type != "cuda" or self.cuda_check is None
                or call.query.device.type == "meta"):  # traced by torch.compile: no tensors
            return reasons
        return _torch_reasons(self.cuda_check, call)

    def forward(self, call: AttentionCall, **options):
        q, k, v = _kernel_inputs(call)
        if not call.return_lse:
            return self.attend(call, q, k, v, False)[0]
        out, lse = self.attend(call, q, k, v, True)
        empty = call.empty_rows()
        if empty is not None:  # kernels give these rows lse 0 or garbage: the definition
            out = out.masked_fill(empty, 0.0)
            lse = lse.masked_fill(empty.squeeze(-1), float("-inf"))
        if call.requires_grad:
            lse = with_lse_gradient(lse, q, k, functools.partial(self._attend_out, call),
                                    call.scale)
        return out, lse

    def _attend_out(self, call: AttentionCall, q, k, v):
        return self.attend(call, q, k, v, False)[0]

    def attend(self, call: AttentionCall, q, k, v, need_lse: bool):
        """``(out, lse or None)`` of the kernel on ``call``'s mask, causal, scale and dropout, with
        ``q``, ``k``, ``v`` in place of its tensors (head dim contiguous)."""
        raise NotImplementedError


def _head_dim_strided(t: torch.Tensor) -> bool:
    return t.stride(-1) != 1 and t.shape[-1] != 1


def _kernel_inputs(call: AttentionCall):
    """(query, key, value) with the head dim contiguous, as the kernels need it: torch's public
    SDPA would fall back to its math kernel for other strides, a forced kernel copies instead."""
    q, k, v = call.query, call.key, call.value
    return (q.contiguous() if _head_dim_strided(q) else q,
            k.contiguous() if _head_dim_strided(k) else k,
            v.contiguous() if _head_dim_strided(v) else v)


def _torch_reasons(check: str, call: AttentionCall) -> list[str]:
    """Ask torch whether its kernel takes ``call``; turn its debug warnings into reasons.

    Asked about the tensors :meth:`_ForcedSDPA.forward` passes (head dim contiguous, standing
    in without a copy), so the answer never depends on strides the forward removes."""
    mask, is_causal = call.attn_mask, call.is_causal
    if is_causal and mask is not None:
        mask, is_causal = call.combined_mask(), False
    if mask is not None and mask.dim() == 4 and mask.shape != (
            call.batch_size, call.num_heads, call.seq_len_q, call.seq_len_kv):
        mask = mask.expand(call.batch_size, call.num_heads, call.seq_len_q, call.seq_len_kv)
    q, k, v = (torch.empty_like(t, memory_format=torch.contiguous_format)
               if _head_dim_strided(t) else t for t in (call.query, call.key, call.value))
    params = torch.backends.cuda.SDPAParams(q, k, v, mask, call.dropout_p, is_causal,
                                            call.is_gqa)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = getattr(torch.backends.cuda, check)(params, True)
    if ok:
        return []
    msgs = [str(w.message).strip() for w in caught]
    return [f"torch: {m}" for m in msgs] or [f"torch.backends.cuda.{check} refused the call"]


@register_backend
class SDPAFlashBackend(_ForcedSDPA):
    """SDPA's FlashAttention-2 kernel (CUDA) or its flash-style CPU kernel."""

    name = "sdpa_flash"
    aliases = ("_native_flash",)
    description = "torch SDPA, flash kernel"
    priority = 200
    cuda_check = "can_use_flash_attention"
    supports_lse = True
    supports_value_head_dim = False
    supports_backward_from_lse = True

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        reasons = super().not_supported_reasons(call)
        if call.device.type == "cpu" and call.dropout_p > 0:
            reasons.append(f"dropout_p={call.dropout_p} not supported by the CPU flash kernel")
        if call.device.type == "cuda" and call.return_lse and call.attn_mask is not None:
            reasons.append("return_lse=True with attn_mask not supported by the CUDA flash kernel")
        return reasons

    def auto_reasons(self, call: AttentionCall) -> list[str]:
        # auto reaches this backend only for calls plain `sdpa` cannot run (the lse of a
        # strategy's partial). On Hopper torch's FlashAttention-2 kernel ran at 248-362
        # TFLOP/s forward where cuDNN's ran at 383-616, in every shape of the kernels suite
        # (H200, docs/bench); dilated's parts on `auto` took 0.53x of dense time against
        # 0.36x on cuDNN (benchmarks/results, session 11)
        if call.device.type != "cuda" or torch.cuda.get_device_capability(call.device) < (9, 0):
            return []
        cudnn = get_backend("sdpa_cudnn")
        if cudnn.availability_reasons() or cudnn.not_supported_reasons(call):
            return []
        return ["auto prefers sdpa_cudnn where it runs the call on compute capability 9.0 and "
                "newer (1.5-1.9x faster on the H200)"]

    @staticmethod
    def _cpu_bias(call: AttentionCall, q: torch.Tensor) -> Optional[torch.Tensor]:
        """The CPU kernel's additive bias, in q's dtype or float32: a float32 mask is kept as it
        is (no precision lost to half-precision queries)."""
        mask = call.attn_mask
        if mask is None:
            return None
        keep32 = mask.dtype == torch.float32 and q.dtype in (torch.float16, torch.bfloat16)
        return call.additive_mask(torch.float32 if keep32 else q.dtype)

    def attend(self, call, q, k, v, need_lse):
        if call.device.type == "cpu":
            bias = self._cpu_bias(call, q)
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, call.dropout_p, call.is_causal and bias is None, attn_mask=bias,
                scale=None if call.default_scale else call.scale)
        d = call.head_dim  # as torch pads: to a multiple of 8, with the unpadded head dim's scale
        scale = _torch_scale(call)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            pad_head_dim(q, 8), pad_head_dim(k, 8), pad_head_dim(v, 8), call.dropout_p,
            call.is_causal, False, scale=scale)[:2]
        return (out[..., :d] if out.shape[-1] != d else out), lse

    def backward(self, call, grad_out, out, lse, **options):
        q, k, v = _kernel_inputs(call)
        if call.device.type == "cpu":
            bias = self._cpu_bias(call, q)
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out.to(q.dtype).contiguous(), q, k, v, out.to(q.dtype).contiguous(),
                lse.to(_lse_dtype(q)).contiguous(), 0.0, call.is_causal and bias is None,
                attn_mask=bias, scale=None if call.default_scale else call.scale)
        d = call.head_dim
        padded = [pad_head_dim(t, 8) for t in (grad_out.to(q.dtype), q, k, v, out.to(q.dtype))]
        # no dropout: the RNG state is not read, but the op wants tensors of the forward's kind
        seed = torch.empty(2, dtype=torch.uint64, device=q.device)
        offset = torch.empty((), dtype=torch.uint64, device=q.device)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            padded[0].contiguous(), *padded[1:4], padded[4].contiguous(), lse.float().contiguous(),
            None, None, call.seq_len_q, call.seq_len_kv, 0.0, call.is_causal, seed, offset,
            scale=_torch_scale(call))
        return tuple(g[..., :d] if g.shape[-1] != d else g for g in grads)


def _torch_scale(call: AttentionCall) -> float:
    """The scale as torch computes its default (1 / sqrt(head_dim)), bitwise."""
    return 1.0 / math.sqrt(call.head_dim) if call.default_scale else call.scale


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@register_backend
class SDPAEfficientBackend(_ForcedSDPA):
    """SDPA's memory-efficient (xformers-derived) CUDA kernel."""

    name = "sdpa_efficient"
    aliases = ("_native_efficient", "efficient")
    description = "torch SDPA, memory-efficient kernel"
    priority = 220
    devices = ("cuda",)
    cuda_check = "can_use_efficient_attention"
    supports_lse = True
    supports_mask_grad = True
    supports_backward_from_lse = True

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        reasons = super().not_supported_reasons(call)
        if call.return_lse and call.requires_grad and call.mask_requires_grad:
            reasons.append("return_lse=True with an attn_mask that requires grad not supported "
                           "(the lse gradient does not reach the mask)")
        return reasons

    def attend(self, call, q, k, v, need_lse):
        bias, is_causal = None, call.is_causal  # the kernel's causal is top-left, like ours
        if call.attn_mask is not None:
            bias, is_causal = _efficient_bias(call, q.dtype), False
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, need_lse or call.requires_grad or call.mask_requires_grad,
            call.dropout_p, is_causal, scale=None if call.default_scale else call.scale)[:2]
        return out, (lse[..., :call.seq_len_q] if need_lse else None)


    def backward(self, call, grad_out, out, lse, **options):
        q, k, v = _kernel_inputs(call)
        bias, is_causal = None, call.is_causal
        if call.attn_mask is not None:
            bias, is_causal = _efficient_bias(call, q.dtype), False
        padded_q = -(-call.seq_len_q // 32) * 32  # the kernel's lse rows come in blocks of 32
        lse = torch.nn.functional.pad(lse.float(), (0, padded_q - call.seq_len_q)).contiguous()
        none = torch.empty((), dtype=torch.int64, device=q.device)
        grads = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            _bshd_memory(grad_out.to(q.dtype)), q, k, v, bias, _bshd_memory(out.to(q.dtype)), lse,
            none, none, 0.0, [True, True, True, False], is_causal,
            scale=None if call.default_scale else call.scale)
        return grads[0], grads[1], grads[2]


def _bshd_memory(t: torch.Tensor) -> torch.Tensor:
    """``t`` (B, H, S, D) with (B, S, H, D) memory, the layout of the kernel's own output."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _efficient_bias(call: AttentionCall, dtype: torch.dtype) -> torch.Tensor:
    """The call's mask as the memory-efficient kernel takes it: additive, rows stored at a
    multiple of 16 elements, expanded to (B, H, Sq, Sk) (what F.scaled_dot_product_attention
    does to a mask for this kernel)."""
    shape = (call.batch_size, call.num_heads, call.seq_len_q, call.seq_len_kv)
    return aligned_bias(call.additive_mask(dtype), shape, 16)


@register_backend
class SDPACudnnBackend(_ForcedSDPA):
    """SDPA's cuDNN kernel (fastest on H100 for the large diffusion shapes)."""

    name = "sdpa_cudnn"
    aliases = ("_native_cudnn", "cudnn")
    description = "torch SDPA, cuDNN kernel"
    priority = 210
    devices = ("cuda",)
    cuda_check = "can_use_cudnn_attention"
    supports_lse = True
    supports_backward_from_lse = True

    def attend(self, call, q, k, v, need_lse):
        bias = call.additive_mask(q.dtype) if call.attn_mask is not None else None
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, bias, need_lse or call.requires_grad, call.dropout_p,
            call.is_causal and bias is None, False,
            scale=None if call.default_scale else call.scale)[:2]
        if need_lse:
            lse = lse.reshape(call.batch_size, call.num_heads, call.seq_len_q)
        return out, (lse if need_lse else None)

    def backward(self, call, grad_out, out, lse, **options):
        q, k, v = _kernel_inputs(call)
        bias = call.additive_mask(q.dtype) if call.attn_mask is not None else None
        none = torch.empty((), dtype=torch.int64, device=q.device)
        grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad_out.to(q.dtype).contiguous(), q, k, v, out.to(q.dtype).contiguous(),
            lse.float().reshape(call.batch_size, call.num_heads, call.seq_len_q, 1).contiguous(),
            none, none, bias, None, None, call.seq_len_q, call.seq_len_kv, 0.0,
            call.is_causal and bias is None, scale=None if call.default_scale else call.scale)
        return grads[0], grads[1], grads[2]


@register_backend
class SDPAMathBackend(_ForcedSDPA):
    """SDPA's composite math kernel (what torch falls back to)."""

    name = "sdpa_math"
    aliases = ("_native_math",)
    description = "torch SDPA, math kernel"
    priority = 900
    supports_mask_grad = True

    def attend(self, call, q, k, v, need_lse):
        mask = call.attn_mask
        is_causal = call.is_causal
        if mask is not None:
            if is_causal:  # the op refuses both at once: fold the pattern in
                mask, is_causal = call.combined_mask(), False
            if mask.dtype == torch.bool:  # the op adds the mask: bool becomes 0/-inf
                mask = call.additive_mask(q.dtype)
        return torch.ops.aten._scaled_dot_product_attention_math(
            q, k, v, mask, call.dropout_p, is_causal, None,
            scale=None if call.default_scale else call.scale, enable_gqa=call.is_gqa)[0], None
