"""xFormers' ``memory_efficient_attention`` as a backend, with xFormers' own refusals.

Masks become the ``attn_bias`` xFormers runs fastest:

* ``is_causal`` alone: ``LowerTriangularMask`` (top-left aligned, as SDPA's);
* a key-padding mask: ``BlockDiagonalMask`` over the unpadded keys (queries kept dense, one
  block per batch element), i.e. xFormers' varlen path;
* any other mask (bool, float, or causal together with key padding): the call's additive mask
  in the query dtype (:meth:`AttentionCall.additive_mask`), its rows stored at a multiple of 8
  elements as xFormers' kernels require (copied only when they are not), broadcast (stride 0)
  over batch and heads.

Grouped-query attention uses xFormers' 5-D (B, M, G, H, K) layout in inference; with gradients
(which xFormers' GQA does not support) k/v heads are repeated instead.

When xFormers is installed but cannot run a call (for example its C++/CUDA operators were
built for another torch and do not load), the reasons are xFormers' own: its dispatcher is asked
with inputs shaped like the call's, and every operator's "not supported because" lines, plus the
extension's load error, become this backend's reasons.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Optional

import torch

from .. import constraints as C
from .._errors import BackendUnavailableError
from ..call import AttentionCall
from ..registry import Backend, register_backend
from . import _padding as P

__all__ = ["XFormersBackend", "parse_xformers_reasons"]

_OP_HEADER = re.compile(r"^`(?P<op>[^`]+)` is not supported because:\s*$")


def parse_xformers_reasons(message: str, prefix: str = "xformers") -> list[str]:
    """Turn xFormers' "No operator found" message into one reason per operator:
    ``"xformers fa3F@0.0.0: dtype=torch.float32 (supported: ...); operator wasn't built"``.
    A message in another shape is kept whole (whitespace folded)."""
    reasons: list[str] = []
    op, lines = None, []

    def flush():
        if op is not None:
            reasons.append(f"{prefix} {op}: " + ("; ".join(lines) if lines else "not supported"))

    for raw in message.splitlines():
        m = _OP_HEADER.match(raw.strip())
        if m:
            flush()
            op, lines = m.group("op"), []
        elif op is not None and raw.startswith((" ", "\t")) and raw.strip():
            lines.append(" ".join(raw.split()))
        elif op is not None and raw.strip():
            flush()
            op, lines = None, []
    flush()
    return reasons or [f"{prefix}: " + " ".join(message.split())]


@functools.lru_cache(maxsize=None)
def _load():
    """(xformers.ops.fmha, None) or (None, why), importing once."""
    try:
        from xformers.ops import fmha  # noqa: PLC0415  (optional dependency, imported lazily)
    except Exception as err:
        return None, f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    return fmha, None


def _extension_error() -> Optional[str]:
    """xFormers' own words when its C++/CUDA extension did not load (None if it did)."""
    try:
        from xformers import _cpp_lib  # noqa: PLC0415
    except Exception:
        return None
    exc = getattr(_cpp_lib, "_cpp_library_load_exception", None)
    if exc is None:
        return None
    kept = []
    for line in str(exc).splitlines():
        if line.strip().startswith(("Please", "Memory-efficient attention")):
            break
        kept.append(line.strip())
    return " ".join(" ".join(kept).split()) or type(exc).__name__


@register_backend
class XFormersBackend(Backend):
    """``xformers.ops.memory_efficient_attention`` (CUDA)."""

    name = "xformers"
    # placed by speed measured on the GPU machine, not by reputation; see flash.py's note
    priority = 300
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    supports_lse = False
    requires_package = "xformers"
    requires_pip_name = "xformers"

    @property
    def description(self) -> str:  # what `attnpatch backends` shows when it is available
        text = "xFormers memory_efficient_attention"
        if C.package_missing(self.requires_package) or _load()[1]:
            return text
        why = _extension_error()
        if why:
            text += (f"; its C++/CUDA extension did not load ({why}): only the operators that "
                     "don't need it can run, explain() says per call")
        return text

    def availability_reasons(self) -> list[str]:
        reasons = super().availability_reasons()
        if not C.package_missing(self.requires_package):
            _, err = _load()
            if err:
                why = f"xformers is installed but xformers.ops does not import ({err})"
                if "flash_attn" in err and C.module_present("flash_attn.cute") and not \
                        C.module_present("flash_attn.flash_attn_interface"):
                    why += ("; xformers imports flash-attn 2 whenever a flash_attn package "
                            "exists, and flash-attn-4 installs only flash_attn.cute")
                reasons.insert(0, why)
        return reasons

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        reasons = super().not_supported_reasons(call)
        if (reasons or call.device.type != "cuda" or call.query.device.type == "meta"
                or C.package_missing(self.requires_package)):
            return reasons
        fmha, err = _load()
        if fmha is None:
            return [f"xformers.ops does not import ({err})"]
        return self.xformers_reasons(fmha, call)

    def xformers_reasons(self, fmha, call: AttentionCall) -> list[str]:
        """Ask xFormers' dispatcher (forward, and backward when grads are needed) whether an
        operator takes inputs shaped like ``call``'s; its per-operator reasons if none does."""
        q, k, v, bias, _ = _prepare(fmha, call, check=True)
        inp = fmha.Inputs(query=q, key=k, value=v, attn_bias=bias, p=call.dropout_p,
                          scale=call.scale)
        try:
            inp.validate_inputs()
        except ValueError as err:
            return [f"xformers: {' '.join(str(err).split())}"]
        dispatch = fmha.dispatch
        try:
            fw_op = dispatch._dispatch_fw(inp, call.requires_grad)
        except NotImplementedError as err:
            return self._with_extension_error(parse_xformers_reasons(str(err)))
        if not call.requires_grad:
            return []
        try:
            try:
                dispatch._dispatch_bw(inp, varlen_lse_packed=getattr(fw_op, "VARLEN_LSE_PACKED",
                                                                     None))
            except TypeError:  # older xFormers: _dispatch_bw(inp)
                dispatch._dispatch_bw(inp)
        except NotImplementedError as err:
            return self._with_extension_error(
                parse_xformers_reasons(str(err), prefix="xformers backward"))
        return []

    @staticmethod
    def _with_extension_error(reasons: list[str]) -> list[str]:
        why = _extension_error()
        return ([f"xformers C++/CUDA extension not loaded: {why}"] if why else []) + reasons

    def forward(self, call: AttentionCall, **options: Any):
        fmha, err = _load()
        if fmha is None:
            raise BackendUnavailableError("backend 'xformers' cannot import xformers.ops:",
                                          {self.name: [err]})
        q, k, v, bias, finish = _prepare(fmha, call, check=False)
        out = fmha.memory_efficient_attention(q, k, v, attn_bias=bias, p=call.dropout_p,
                                              scale=call.scale)
        return finish(out)


def _prepare(fmha, call: AttentionCall, check: bool):
    """(q, k, v, attn_bias, finish) for ``memory_efficient_attention``; ``finish(out)`` turns
    its output back into (B, H, Sq, Dv). ``check=True`` builds the same kinds of inputs cheaply
    (views, a stride-0 bias, a one-block mask) for asking the dispatcher."""
    ab = fmha.attn_bias
    q, k, v = call.bshd()  # (B, S, H, D) views
    batch, seq_q, heads, _ = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    shape = (batch, heads, seq_q, seq_k)
    grouped = heads != kv_heads
    if grouped and call.requires_grad:  # xFormers' GQA is forward-only: repeat k/v heads
        k, v = (t.transpose(1, 2) for t in call.kv_per_query_head())
        grouped = False
    bias: Any = None
    packed = False
    if call.mask_kind == "none":
        bias = ab.LowerTriangularMask() if call.is_causal else None
    elif call.mask_kind == "key_padding" and not call.is_causal:
        packed = True
        if check:  # one block of full length: same operator choice as the packed call
            q, k, v = q[:1], k[:1], v[:1]
            bias = ab.BlockDiagonalMask.from_seqlens([seq_q], [seq_k], device=call.device)
        else:
            keep = P.key_padding_keep(call.attn_mask, batch)
            k, v, _, _, seqlens = P.unpad_kv(k, v, keep)
            k, v = k.unsqueeze(0), v.unsqueeze(0)
            q = q.reshape(1, batch * seq_q, heads, q.shape[-1])
            bias = ab.BlockDiagonalMask.from_seqlens([seq_q] * batch, seqlens.tolist(),
                                                     device=call.device)
    else:
        if check:
            pad = -(-seq_k // 8) * 8
            bias = torch.zeros(1, 1, 1, pad, dtype=call.dtype,
                               device=call.device)[..., :seq_k].expand(shape)
        else:  # xFormers' alignment: 8 elements
            bias = P.aligned_bias(call.additive_mask(call.dtype), shape, 8)
    if grouped:  # (B, M, G, H/G, K); k/v broadcast over the heads of a group
        group = heads // kv_heads
        q = q.unflatten(2, (kv_heads, group))
        k = k.unsqueeze(3).expand(*k.shape[:3], group, k.shape[-1])
        v = v.unsqueeze(3).expand(*v.shape[:3], group, v.shape[-1])
        if isinstance(bias, torch.Tensor):
            bias = bias.unflatten(1, (kv_heads, group))

    def finish(out: torch.Tensor) -> torch.Tensor:
        if out.dim() == 5:
            out = out.flatten(2, 3)
        if packed:
            out = out.view(batch, seq_q, heads, out.shape[-1])
        return out.transpose(1, 2)

    return q, k, v, bias, finish
