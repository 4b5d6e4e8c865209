"""FlashAttention 2, 3 and 4 as backends, and ``flash``: the best of those installed.

Every version is optional: a missing package, a build that does not import (made for another
torch), no CUDA device, are *reasons*, never import errors. Nothing here imports a flash
package until a backend is asked whether it can run (``list_backends``, ``explain``, selection)
or runs; presence is checked on the file system without importing anything.

The three versions share one class, :class:`_FlashAttention`; each subclass names its module
and adapts two entry points (dense ``flash_attn_func``, packed ``flash_attn_varlen_func``) to
one signature. What they have in common is done once, with exact pure-torch helpers
(:mod:`._padding`):

* a key-padding mask runs through the varlen entry point: keys/values unpadded per batch
  element, queries kept dense (``cu_seqlens_q = arange * Sq``), out and lse padded back;
* SDPA's top-left ``is_causal`` is rewritten for flash's bottom-right alignment, so results
  equal SDPA's for ``Sq != Sk`` (see :func:`._padding.causal_plan`);
* head dims are zero-padded to a multiple of 8 (exact; the output is sliced back);
* a call's ``softcap`` goes to the kernels' own ``softcap=`` (scale, then cap, then mask: what
  Gemma 2 computes); a build whose entry point takes no ``softcap=`` refuses it with a reason;
* :meth:`~_FlashAttention.backward` (a partial of an exact merge) runs the kernels' own backward
  entry points (flash-attn 2: ``_wrapped_flash_attn_backward``, FA3: ``_flash_attn_backward``,
  FA4: ``flash_attn.cute.interface._flash_attn_bwd``) on the same segments or packed sequences
  as the forward, with the given (out, lse). All three take the lse as float32 (B, H, Sq)
  (varlen: (H, total_q)), natural log, unpadded, and read a row's -inf as 0 (then P = exp(s)):
  attnpatch's -inf (a row that sees no key) is passed as +inf, which gives P = 0.

Any other mask is refused (no arbitrary masks in these kernels), as is ``is_causal`` together
with a key-padding mask (unpadding moves keys, so the causal diagonal would move with them).
Selecting the key-padding path synchronizes with the GPU (packed lengths), like flash-attn's own
``unpad_input``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, ClassVar, Optional

import torch

from .. import constraints as C
from .._errors import AttnPatchError, BackendUnavailableError
from ..call import AttentionCall
from ..registry import Backend, candidate_reasons, get_backend, register_backend
from . import _padding as P

__all__ = ["Flash2Backend", "Flash3Backend", "Flash4Backend", "FlashBackend"]

_HALF = (torch.float16, torch.bfloat16)
_NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"


@functools.lru_cache(maxsize=None)
def _import(module: str):
    """(module, None) or (None, "why it does not import"), once per process."""
    try:
        return importlib.import_module(module), None
    except Exception as err:  # ImportError, OSError (undefined symbol), RuntimeError...
        text = " ".join(str(err).split())
        if len(text) > 300:
            text = text[:297] + "..."
        return None, f"{type(err).__name__}: {text}"


@functools.lru_cache(maxsize=None)
def _takes(fn, param: str) -> bool:
    """Whether ``fn`` has a parameter ``param``: a function, or an operator registered with
    ``torch.library`` (flash-attn's backward ops: a ``custom_op`` definition or its
    ``torch.ops`` packet, whose Python signature is ``*args, **kwargs``)."""
    overloads = getattr(fn, "overloads", None)
    if callable(overloads):  # torch.ops.<namespace>.<name>: the schemas say
        return any(param == arg.name for name in overloads()
                   for arg in getattr(fn, name)._schema.arguments)
    fn = getattr(fn, "_init_fn", fn)  # torch.library.custom_op: the function it wraps
    try:
        return param in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _fa2_window(window: P.Window) -> tuple[int, int]:
    """flash-attn 2/3 spell "unbounded" as -1."""
    return tuple(-1 if w is None else w for w in window)


def _split_result(result, seq_q: int, want_lse: bool, who: str):
    """(out, lse | None) from an entry point that returns ``out`` or a tuple starting with it."""
    if isinstance(result, (tuple, list)):
        out, lse = result[0], (result[1] if len(result) > 1 else None)
    else:
        out, lse = result, None
    if not want_lse:
        return out, None
    if lse is None:
        raise AttnPatchError(f"{who} returned no log-sum-exp although it was asked for one")
    return out, (lse[..., :seq_q] if lse.dim() == 3 else lse)


class _FlashAttention(Backend):
    """What FlashAttention 2, 3 and 4 share; subclasses name their package and adapt the two
    entry points (:meth:`_dense`, :meth:`_varlen`)."""

    devices = ("cuda",)
    dtypes = _HALF
    max_head_dim = 256
    mask_kinds = frozenset({"none", "key_padding"})
    supports_causal_with_mask = False
    supports_dropout = False
    supports_gqa = True
    supports_lse = True
    supports_value_head_dim = False
    supports_softcap = True
    supports_backward_from_lse = True
    # fp16/bf16 only; their GPU tests allow twice math's error + 1e-2 on the input gradients
    tolerance = {**Backend.tolerance, torch.float16: 2e-2, torch.bfloat16: 5e-2}

    #: importable module found without importing (presence) ...
    probe: ClassVar[str]
    #: ... and the module whose flash_attn_func / flash_attn_varlen_func run
    module: ClassVar[str]
    #: the package name and how to install it, for reasons
    package: ClassVar[str]
    install: ClassVar[str]
    #: the kernel keeps any right window as given (else top-left causal with Sq > Sk splits rows)
    any_right_window: ClassVar[bool] = False
    #: head dims are zero-padded to this multiple before the call
    head_dim_multiple: ClassVar[int] = 8
    #: the module and functions of the backward from (out, lse): (dense, varlen)
    backward_module: ClassVar[str]
    backward_entries: ClassVar[tuple[str, str]]

    # --- environment ---------------------------------------------------------------------------
    def missing_reason(self) -> str:
        return f"package {self.package} not installed ({self.install})"

    def availability_reasons(self) -> list[str]:
        reasons = []
        if not C.module_present(self.probe):
            reasons.append(self.missing_reason())
        else:
            _, err = _import(self.module)
            if err:
                reasons.append(f"{self.package} is installed but does not import ({err}); it "
                               f"may be built for another torch: reinstall it for torch "
                               f"{torch.__version__} (CUDA {torch.version.cuda})")
        if not torch.cuda.is_available():
            reasons.append(_NO_CUDA)
        return reasons

    # --- per call ------------------------------------------------------------------------------
    def padded_size(self, head_dim: int) -> int:
        """The head_dim the kernel is called with (zero-padding is exact)."""
        return -(-head_dim // self.head_dim_multiple) * self.head_dim_multiple

    def padded_head_dims(self, call: AttentionCall) -> tuple[int, int]:
        return self.padded_size(call.head_dim), self.padded_size(call.head_dim_v)

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        reasons = super().not_supported_reasons(call)
        if call.softcap is not None:
            reasons += self.softcap_reasons(call)
        if call.backward_from_lse and call.requires_grad:
            reasons += self.backward_reasons(call)
        if call.device.type == "cuda":
            reasons += self.device_reasons(call, C.compute_capability(call.device))
        return reasons

    def softcap_reasons(self, call: AttentionCall) -> list[str]:
        """Why the installed build cannot cap logits: its entry point for ``call`` (dense, or
        varlen for a key-padding mask) takes no ``softcap=`` (flash-attn 2 < 2.6). Nothing is
        imported for a package that is not there (its availability reasons say so)."""
        if not C.module_present(self.probe):
            return []
        mod, _ = _import(self.module)
        if mod is None:
            return []
        entry = ("flash_attn_varlen_func" if call.mask_kind == "key_padding"
                 else "flash_attn_func")
        fn = getattr(mod, entry, None)
        if fn is not None and not _takes(fn, "softcap"):
            return [f"softcap={call.softcap} not supported by this {self.package} build "
                    f"({self.module}.{entry} takes no softcap=)"]
        return []

    def backward_reasons(self, call: AttentionCall) -> list[str]:
        """Why the installed build cannot run :meth:`backward` for ``call``: its backward entry
        point (dense, or varlen for a key-padding mask) does not import, is missing (flash-attn
        2 < 2.7 has no ``_wrapped_*`` ops), or takes no ``softcap=`` for a capped call. Nothing
        is imported for a package that is not there."""
        if not C.module_present(self.probe):
            return []
        mod, err = _import(self.backward_module)
        entry = self.backward_entries[call.mask_kind == "key_padding"]
        fn = None if mod is None else getattr(mod, entry, None)
        if fn is None:
            why = err or f"it has no {entry}"
            return [f"backward from a merged (out, lse) not supported by this {self.package} "
                    f"build ({self.backward_module}: {why})"]
        if call.softcap is not None and not _takes(fn, "softcap"):
            return [f"softcap={call.softcap} with backward from a merged (out, lse) not "
                    f"supported by this {self.package} build ({self.backward_module}.{entry} "
                    "takes no softcap=)"]
        return []

    def device_reasons(self, call: AttentionCall, capability: tuple[int, int]) -> list[str]:
        """Limits that depend on the GPU generation (beyond ``min_compute_capability``)."""
        return []

    # --- running -------------------------------------------------------------------------------
    def entry_points(self):
        mod, err = _import(self.module)
        if mod is None:
            raise BackendUnavailableError(f"backend {self.name!r} cannot import {self.module}:",
                                          {self.name: [err]})
        return mod

    def forward(self, call: AttentionCall, **options: Any):
        mod = self.entry_points()
        q, k, v = call.bshd()
        dv = v.shape[-1]
        d_pad, dv_pad = self.padded_head_dims(call)
        if (call.mask_kind == "none" and not call.is_causal and d_pad == call.head_dim
                and dv_pad == dv):
            # the common diffusion case: one dense call, nothing to pad or plan
            out, lse = self._dense(mod, call, q, k, v, False, P.NO_WINDOW)
            out = out.transpose(1, 2)
            return (out, lse.float()) if call.return_lse else out
        q, k, v = P.pad_head_dim_to(q, d_pad), P.pad_head_dim_to(k, d_pad), P.pad_head_dim_to(
            v, dv_pad)
        if call.mask_kind == "key_padding":
            keep = P.key_padding_keep(call.attn_mask, call.batch_size)
            out, lse = P.run_key_padding(q, k, v, keep,
                                         functools.partial(self._varlen, mod, call))
        else:
            plan = P.causal_plan(call.seq_len_q, call.seq_len_kv, call.is_causal,
                                 self.any_right_window)
            out, lse = P.run_causal_plan(plan, q, k, v, functools.partial(self._dense, mod, call))
        out = out[..., :dv].transpose(1, 2)
        return (out, lse.float()) if call.return_lse else out

    def backward(self, call: AttentionCall, grad_out: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, **options: Any):
        """The kernel's backward from ``out``/``lse`` as given (see :meth:`Backend.backward`),
        on the forward's plan: the same head-dim padding, causal segments or packed keys.
        Returns (B, H, S, D) gradients in the inputs' dtype."""
        mod, err = _import(self.backward_module)
        if mod is None:
            raise BackendUnavailableError(
                f"backend {self.name!r} cannot import {self.backward_module}:", {self.name: [err]})
        q, k, v = call.bshd()
        d_pad, dv_pad = self.padded_head_dims(call)
        o, do = out.to(call.dtype).transpose(1, 2), grad_out.to(call.dtype).transpose(1, 2)
        q, k = P.pad_head_dim_to(q, d_pad), P.pad_head_dim_to(k, d_pad)
        v, o, do = (P.pad_head_dim_to(t, dv_pad) for t in (v, o, do))
        # the kernels read an lse of -inf as 0 (P = exp(s)); +inf gives P = 0 there
        lse = lse.float().masked_fill(lse == float("-inf"), float("inf"))
        if call.mask_kind == "key_padding":
            keep = P.key_padding_keep(call.attn_mask, call.batch_size)
            dq, dk, dv = P.run_key_padding_backward(
                q, k, v, o, do, lse, keep, functools.partial(self._varlen_bwd, mod, call))
        else:
            plan = P.causal_plan(call.seq_len_q, call.seq_len_kv, call.is_causal,
                                 self.any_right_window)
            dq, dk, dv = P.run_causal_plan_backward(
                plan, q, k, v, o, do, lse, functools.partial(self._dense_bwd, mod, call))
        d, dv_ = call.head_dim, call.head_dim_v
        return (dq[..., :d].transpose(1, 2), dk[..., :d].transpose(1, 2),
                dv[..., :dv_].transpose(1, 2))

    def _dense(self, mod, call, q, k, v, causal, window):
        """``flash_attn_func`` on (B, S, H, D): returns (out, lse (B, H, Sq) | None)."""
        raise NotImplementedError

    def _varlen(self, mod, call, q, k, v, cu_q, cu_k, max_q, max_k):
        """``flash_attn_varlen_func`` on packed (T, H, D), non-causal: (out, lse | None)."""
        raise NotImplementedError

    def _dense_bwd(self, mod, call, q, k, v, out, dout, lse, causal, window):
        """The dense backward entry point on (B, S, H, D), lse (B, H, Sq) float32 (+inf for a
        row without keys): returns (dq, dk, dv)."""
        raise NotImplementedError

    def _varlen_bwd(self, mod, call, q, k, v, out, dout, lse, cu_q, cu_k, max_q, max_k):
        """The varlen backward entry point on packed (T, H, D), lse (H, total_q), non-causal:
        returns packed (dq, dk, dv)."""
        raise NotImplementedError


# Priorities: `auto` ranks backends by speed measured on the GPU machine, not by reputation:
# torch's SDPA (cuDNN) beats SDPA's FA2 kernel by ~1.8x (benchmarks/results/kernels_h100.json,
# H100, bf16, torch 2.11; 1.4-2.0x on the H200); flash4 beats cuDNN on large calls and loses on
# small ones (benchmarks/results/flash4_vs_sdpa_h200_session12.*), so it comes first (90) but
# passes itself over below a size per head_dim (Flash4Backend's auto_min_scores).
# flash3/flash2/xformers are unmeasured here (not installable on the GPU machine): after sdpa.
@register_backend
class Flash4Backend(_FlashAttention):
    """FlashAttention-4 (package flash-attn-4, module ``flash_attn.cute``; CuTe DSL, JIT-compiled
    per configuration): Hopper and Blackwell; forward, backward, lse with gradients."""

    name = "flash4"
    aliases = ("fa4", "flash_4")
    description = "FlashAttention-4 (flash_attn.cute), sm90/sm100"
    priority = 90
    #: head_dim -> the least attention scores (batch x heads x queries x keys) from which auto
    #: prefers flash4 to cuDNN SDPA. Measured on the H200 (bf16, non-causal, alternating rounds,
    #: benchmarks/results/flash4_vs_sdpa_h200_session12.*), flash4's time / cuDNN's, forward and
    #: forward + backward. head_dim 64: SDXL's (2, 10, 4096) 1.12 / 1.40 and (2, 20, 1024)
    #: 3.1 / 1.8 (3.4e8 scores and fewer), but SD3's (1, 24, 4429) 0.89 / 0.87 and
    #: (2, 24, 4429) 0.82 / 0.79, SDXL 1536²'s (2, 10, 9216) 0.96 / 0.85 (4.7e8 and more).
    #: head_dim 128: (1, 24, 4608) 1.03 / 0.93 (5.1e8), (2, 24, 8192) 0.93 / 0.83 and
    #: (1, 24, 12288) 0.92 / 0.81 (3.2e9 and more). Other head dims were not measured: sdpa.
    auto_min_scores = {64: 4 * 10**8, 128: 2 * 10**9}

    def padded_size(self, head_dim: int) -> int:
        # flash-attn-4 4.0.0b36's sm90 backward fails to compile for head_dim 104 and 112
        # ("failed to partition ... with tiled_mma"; 64-96, 128, 160, 192, 256 compile: measured
        # on H100), so those run padded to 128
        size = super().padded_size(head_dim)
        return 128 if size in (104, 112, 120) else size
    min_compute_capability = (9, 0)
    supports_value_head_dim = True
    probe = "flash_attn.cute"
    module = "flash_attn.cute"
    package = "flash_attn.cute"
    install = "pip install flash-attn-4"
    any_right_window = True
    lse_has_grad = True
    backward_module = "flash_attn.cute.interface"
    backward_entries = ("_flash_attn_bwd", "_flash_attn_bwd")

    def auto_reasons(self, call):
        least = self.auto_min_scores.get(call.head_dim)
        if least is None:
            return [f"auto prefers sdpa at head_dim {call.head_dim} (flash4 measured faster than "
                    f"cuDNN only at head_dim {sorted(self.auto_min_scores)}, on large calls)"]
        scores = call.batch_size * call.num_heads * call.seq_len_q * call.seq_len_kv
        if scores < least:
            return [f"auto prefers sdpa below {least:.0e} attention scores (batch x heads x "
                    f"queries x keys) at head_dim {call.head_dim}: this call has {scores:.2g} "
                    "(cuDNN measured faster on such calls on the H200)"]
        return []

    def device_reasons(self, call, capability):
        d, dv = self.padded_head_dims(call)
        reasons = []
        if d != dv and (d, dv) != (192, 128):
            reasons.append(f"value head_dim {call.head_dim_v} != query head_dim {call.head_dim} "
                           "(flash4 takes equal head dims, or 192 with value 128)")
        major = capability[0]
        if major in (10, 11) and not ((d <= 128 and dv <= 128) or (d, dv) in ((192, 128),
                                                                           (256, 256))):
            reasons.append(f"head_dim {max(d, dv)} not supported on compute capability "
                           f"{major}.{capability[1]} (flash4 takes <= 128, 192 with value 128, "
                           "or 256)")
        elif major == 12 and max(d, dv) > 128:
            reasons.append(f"head_dim {max(d, dv)} > 128 on compute capability "
                           f"{major}.{capability[1]}")
        if call.softcap is not None and major in (10, 11) and (d, dv) == (256, 256):
            # flash_attn.cute's dedicated head_dim-256 kernels (forward and backward) assert
            # softcap is None
            reasons.append(f"softcap={call.softcap} with head_dim 256 not supported on compute "
                           f"capability {major}.{capability[1]}")
        return reasons

    def _dense(self, mod, call, q, k, v, causal, window):
        # keywords only where they differ from flash_attn_func's defaults: its Python wrapper
        # is on the per-call path (a padded head_dim needs the true scale passed)
        kw = {}
        if not call.default_scale or q.shape[-1] != call.head_dim:
            kw["softmax_scale"] = call.scale
        if causal:
            kw["causal"] = True
        if window != P.NO_WINDOW:
            kw["window_size"] = window
        if call.softcap is not None:
            kw["softcap"] = call.softcap
        if call.return_lse:
            kw["return_lse"] = True
        out, lse = mod.flash_attn_func(q, k, v, **kw)
        return out, (lse if call.return_lse else None)

    def _varlen(self, mod, call, q, k, v, cu_q, cu_k, max_q, max_k):
        kw = {} if call.softcap is None else {"softcap": call.softcap}
        out, lse = mod.flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
            max_seqlen_k=max_k, softmax_scale=call.scale, causal=False,
            return_lse=call.return_lse, **kw)
        return out, (lse if call.return_lse else None)

    # flash-attn-4's _flash_attn_bwd: lse (B, H, Sq) (varlen: (H, total_q)) float32, natural
    # log, unpadded; window None = unbounded; softcap 0.0 = off; GQA and dq/dk/dv allocation
    # (the inputs' dtype) its own
    def _dense_bwd(self, mod, call, q, k, v, out, dout, lse, causal, window):
        return mod._flash_attn_bwd(
            q, k, v, out, dout, lse.contiguous(), softmax_scale=call.scale, causal=causal,
            softcap=call.softcap or 0.0, window_size_left=window[0],
            window_size_right=window[1])[:3]

    def _varlen_bwd(self, mod, call, q, k, v, out, dout, lse, cu_q, cu_k, max_q, max_k):
        return mod._flash_attn_bwd(
            q, k, v, out, dout, lse.contiguous(), softmax_scale=call.scale, causal=False,
            softcap=call.softcap or 0.0, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
            max_seqlen_q=max_q, max_seqlen_k=max_k)[:3]


@register_backend
class Flash3Backend(_FlashAttention):
    """FlashAttention-3 (module ``flash_attn_interface``, built from flash-attention's
    ``hopper/``): Hopper only, no dropout; its lse carries no gradient."""

    name = "flash3"
    aliases = ("fa3", "_flash_3", "_flash_varlen_3")
    description = "FlashAttention-3 (flash_attn_interface), Hopper"
    priority = 160
    min_compute_capability = (9, 0)
    max_compute_capability = (9, 0)
    probe = "flash_attn_interface"
    module = "flash_attn_interface"
    package = "flash_attn_interface"
    install = "build FlashAttention-3: flash-attention/hopper, python setup.py install"
    backward_module = "flash_attn_interface"
    backward_entries = ("_flash_attn_backward", "_flash_attn_backward")

    def _lse_kwargs(self, fn, call) -> dict:
        # newer builds return (out, lse) only with return_attn_probs=True, older ones always
        kw = {"return_attn_probs": True} if call.return_lse and _takes(
            fn, "return_attn_probs") else {}
        if call.softcap is not None:
            kw["softcap"] = call.softcap
        return kw

    def _dense(self, mod, call, q, k, v, causal, window):
        fn = mod.flash_attn_func
        kw = self._lse_kwargs(fn, call)
        if window != P.NO_WINDOW:
            kw["window_size"] = _fa2_window(window)
        result = fn(q, k, v, softmax_scale=call.scale, causal=causal, **kw)
        return _split_result(result, q.shape[1], call.return_lse, "flash_attn_interface")

    def _varlen(self, mod, call, q, k, v, cu_q, cu_k, max_q, max_k):
        fn = mod.flash_attn_varlen_func
        result = fn(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                    max_seqlen_k=max_k, softmax_scale=call.scale, causal=False,
                    **self._lse_kwargs(fn, call))
        return _split_result(result, max_q, call.return_lse, "flash_attn_interface")

    # FA3's _flash_attn_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
    # seqused_q, seqused_k, max_seqlen_q, max_seqlen_k, dq, dk, dv, softmax_scale, causal, ...)
    # writes into dq/dk/dv; lse (B, H, Sq) (varlen: (H, total_q)) float32, natural log. The
    # window is a pair in builds from flash-attn 2.8's tree, two arguments in later ones.
    def _bwd(self, mod, call, q, k, v, out, dout, lse, varlen, causal, window):
        fn = mod._flash_attn_backward
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        left, right = _fa2_window(window)
        kw = {"softcap": call.softcap or 0.0}
        if _takes(fn, "window_size_left"):
            kw.update(window_size_left=left, window_size_right=right)
        else:
            kw["window_size"] = (left, right)
        fn(dout, q, k, v, out, lse.contiguous(), *varlen, dq, dk, dv, call.scale, causal, **kw)
        return dq, dk, dv

    def _dense_bwd(self, mod, call, q, k, v, out, dout, lse, causal, window):
        return self._bwd(mod, call, q, k, v, out, dout, lse, (None,) * 6, causal, window)

    def _varlen_bwd(self, mod, call, q, k, v, out, dout, lse, cu_q, cu_k, max_q, max_k):
        return self._bwd(mod, call, q, k, v, out, dout, lse, (cu_q, cu_k, None, None, max_q,
                                                              max_k), False, P.NO_WINDOW)


@register_backend
class Flash2Backend(_FlashAttention):
    """FlashAttention-2 (package flash-attn, module ``flash_attn``): Ampere and newer, dropout;
    its lse carries no gradient."""

    name = "flash2"
    aliases = ("fa2", "flash_varlen")
    description = "FlashAttention-2 (flash_attn), sm80+"
    priority = 250
    min_compute_capability = (8, 0)
    supports_dropout = True
    probe = "flash_attn.flash_attn_interface"  # flash-attn-4 alone leaves a bare flash_attn/
    module = "flash_attn"
    package = "flash_attn"
    install = "pip install flash-attn"
    # the custom ops of flash-attn >= 2.7 (window as two ints, softcap)
    backward_module = "flash_attn.flash_attn_interface"
    backward_entries = ("_wrapped_flash_attn_backward", "_wrapped_flash_attn_varlen_backward")

    def missing_reason(self) -> str:
        reason = super().missing_reason()
        if C.module_present("flash_attn.cute"):
            reason += "; only flash-attn-4's flash_attn.cute is there (backend flash4)"
        return reason

    def not_supported_reasons(self, call):
        reasons = super().not_supported_reasons(call)
        if call.return_lse and call.dropout_p > 0:
            reasons.append("return_lse=True with dropout_p > 0 not supported (flash_attn would "
                           "materialize the attention probabilities)")
        return reasons

    def _dense(self, mod, call, q, k, v, causal, window):
        kw = dict(dropout_p=call.dropout_p, softmax_scale=call.scale, causal=causal)
        if window != P.NO_WINDOW:
            kw["window_size"] = _fa2_window(window)
        if call.softcap is not None:
            kw["softcap"] = call.softcap
        if call.return_lse:
            kw["return_attn_probs"] = True
        return _split_result(mod.flash_attn_func(q, k, v, **kw), q.shape[1], call.return_lse,
                             "flash_attn")

    def _varlen(self, mod, call, q, k, v, cu_q, cu_k, max_q, max_k):
        kw = {"return_attn_probs": True} if call.return_lse else {}
        if call.softcap is not None:
            kw["softcap"] = call.softcap
        result = mod.flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
            max_seqlen_k=max_k, dropout_p=call.dropout_p, softmax_scale=call.scale,
            causal=False, **kw)
        return _split_result(result, max_q, call.return_lse, "flash_attn")

    # flash-attn 2.7+: (dout, q, k, v, out, softmax_lse, dq, dk, dv, [cu_seqlens_q,
    # cu_seqlens_k, max_seqlen_q, max_seqlen_k,] dropout_p, softmax_scale, causal,
    # window_size_left, window_size_right, softcap, alibi_slopes, deterministic, rng_state),
    # writing into dq/dk/dv; lse (B, H, Sq) (varlen: (H, total_q)) float32, natural log
    def _dense_bwd(self, mod, call, q, k, v, out, dout, lse, causal, window):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        mod._wrapped_flash_attn_backward(
            dout, q, k, v, out, lse.contiguous(), dq, dk, dv, 0.0, call.scale, causal,
            *_fa2_window(window), call.softcap or 0.0, None, False, None)
        return dq, dk, dv

    def _varlen_bwd(self, mod, call, q, k, v, out, dout, lse, cu_q, cu_k, max_q, max_k):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        mod._wrapped_flash_attn_varlen_backward(
            dout, q, k, v, out, lse.contiguous(), dq, dk, dv, cu_q, cu_k, max_q, max_k, 0.0,
            call.scale, False, -1, -1, call.softcap or 0.0, None, False, None)
        return dq, dk, dv


@register_backend
class FlashBackend(Backend):
    """``flash``: the first of flash4, flash3, flash2 that is installed and takes the call.

    Not in ``auto``'s list (its members are, each at its measured place). When none fits, its
    reasons are the union of theirs, each prefixed with the member(s) it comes from.
    """

    name = "flash"
    description = "best FlashAttention installed: flash4 > flash3 > flash2"
    priority = None
    members: ClassVar[tuple[str, ...]] = ("flash4", "flash3", "flash2")
    # the union of the members' capabilities (for the table; checks are the members')
    devices = ("cuda",)
    dtypes = _HALF
    max_head_dim = 256
    min_compute_capability = (8, 0)
    mask_kinds = frozenset({"none", "key_padding"})
    supports_causal_with_mask = False
    supports_dropout = True
    supports_lse = True
    lse_has_grad = True
    supports_softcap = True
    supports_backward_from_lse = True
    tolerance = _FlashAttention.tolerance

    def _member_backends(self) -> list[Backend]:
        out = []
        for name in self.members:
            try:
                out.append(get_backend(name))
            except AttnPatchError:  # unregistered by someone: skip it
                pass
        return out

    @staticmethod
    def _union(per_member: list[tuple[str, list[str]]]) -> list[str]:
        """Reasons of several members, identical ones merged: "flash4, flash2: why"."""
        merged: dict[str, list[str]] = {}
        for name, reasons in per_member:
            for r in reasons:
                merged.setdefault(r, []).append(name)
        return [f"{', '.join(names)}: {r}" for r, names in merged.items()]

    def availability_reasons(self) -> list[str]:
        per_member = []
        for member in self._member_backends():
            reasons = member.availability_reasons()
            if not reasons:
                return []
            per_member.append((member.name, reasons))
        return self._union(per_member) or ["no FlashAttention backend registered"]

    def choose(self, call: AttentionCall) -> tuple[Optional[Backend], list[str]]:
        """The member that runs ``call``, or None and every member's reasons."""
        per_member = []
        for member in self._member_backends():
            reasons = candidate_reasons(member, call, ())
            if not reasons:
                return member, []
            per_member.append((member.name, reasons))
        return None, self._union(per_member) or ["no FlashAttention backend registered"]

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        return self.choose(call)[1]

    def delegate(self, call: AttentionCall) -> Backend:
        # the dispatcher caches this per signature and runs the member directly
        return self.choose(call)[0] or self

    def forward(self, call: AttentionCall, **options: Any):
        member, reasons = self.choose(call)
        if member is None:
            raise BackendUnavailableError(f"backend 'flash' cannot run {call}:",
                                          {self.name: reasons})
        return member.forward(call, **options)

    def backward(self, call: AttentionCall, grad_out: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, **options: Any):
        """The backward of the member that runs ``call`` (see :meth:`Backend.backward`)."""
        member, reasons = self.choose(call)
        if member is None:
            raise BackendUnavailableError(f"backend 'flash' cannot run the backward of {call}:",
                                          {self.name: reasons})
        return member.backward(call, grad_out, out, lse, **options)
