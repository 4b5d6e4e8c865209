"""The normalized attention call: tensors in one layout, a resolved scale, a classified mask."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._caches import BoundedCache
from ._errors import AttnPatchError

__all__ = ["AttentionCall", "MASK_KINDS", "LAYOUTS"]

LAYOUTS = ("bhsd", "bshd")
# "key_padding" is a bool mask of shape (B|1, 1, 1, Sk): one visibility bit per key, shared by
# every head and query. Kernels without arbitrary masks can still run it (varlen entry points).
MASK_KINDS = ("none", "key_padding", "bool", "float")


class AttentionCall:
    """One attention call in (B, H, S, D) form.

    ``query`` is (B, H, Sq, D), ``key`` (B, Hkv, Sk, D), ``value`` (B, Hkv, Sk, Dv), all views of
    what the caller passed (``layout="bshd"`` inputs are transposed views, never copies).
    ``attn_mask`` is None or a 4-D view broadcastable to (B, H, Sq, Sk): True/0 means "attend",
    False/-inf means "skip"; a float mask keeps the dtype it was given in (a backend whose kernel
    needs the query's dtype converts it with :meth:`additive_mask`). ``scale`` is resolved
    (default ``1/sqrt(D)``). ``softcap`` is None or a positive float: the scaled scores become
    ``softcap * tanh(q·kᵀ·scale / softcap)`` before the mask is added (Gemma 2's attention
    logit softcapping).
    """

    __slots__ = (
        "query", "key", "value", "attn_mask", "mask_kind", "is_causal", "scale", "dropout_p",
        "layout", "return_lse", "requires_grad", "device", "default_scale", "is_gqa",
        "softcap", "mask_requires_grad", "backward_from_lse", "options", "token_layout",
    )

    def __init__(self, query, key, value, attn_mask, mask_kind, is_causal, scale, dropout_p,
                 layout, return_lse, requires_grad, default_scale=False, is_gqa=None,
                 softcap=None):
        self.query = query
        self.key = key
        self.value = value
        self.attn_mask = attn_mask
        self.mask_kind = mask_kind
        self.is_causal = is_causal
        self.scale = scale
        self.dropout_p = dropout_p
        self.layout = layout
        self.return_lse = return_lse
        self.requires_grad = requires_grad
        self.device = query.device
        #: True when ``scale`` is the default 1/sqrt(head_dim) (the caller passed None)
        self.default_scale = default_scale
        #: fewer key/value heads than query heads (grouped-query / multi-query attention)
        self.is_gqa = query.shape[1] != key.shape[1] if is_gqa is None else is_gqa
        #: None, or the cap c of ``c * tanh(score / c)`` on the scaled scores, before the mask
        self.softcap = softcap
        #: the mask's gradient is wanted (grad mode on and a float mask that requires grad)
        self.mask_requires_grad = bool(attn_mask is not None and attn_mask.requires_grad
                                       and torch.is_grad_enabled())
        #: a partial of an exact merge: its backward runs from the merged (out, lse)
        self.backward_from_lse = False
        #: the running backend's validated ``Options`` instance (set by the dispatcher), or None
        self.options = None
        #: the :class:`~attnpatch.TokenLayout` of the call (which tokens are text, the image
        #: grid), set by the dispatcher; None when it is not known (a bare ``attention()`` call)
        self.token_layout = None

    # --- shapes -------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.query.shape[0]

    @property
    def num_heads(self) -> int:
        return self.query.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.key.shape[1]

    @property
    def seq_len_q(self) -> int:
        return self.query.shape[2]

    @property
    def seq_len_kv(self) -> int:
        return self.key.shape[2]

    @property
    def head_dim(self) -> int:
        return self.query.shape[3]

    @property
    def head_dim_v(self) -> int:
        return self.value.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.query.dtype

    def bshd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query, key, value) as (B, S, H, D) views."""
        return self.query.transpose(1, 2), self.key.transpose(1, 2), self.value.transpose(1, 2)

    def kv_per_query_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(key, value) with one head per query head: grouped-query heads repeated
        (``repeat_interleave``, as SDPA's ``enable_gqa``), or the tensors themselves."""
        if not self.is_gqa:
            return self.key, self.value
        group = self.num_heads // self.num_kv_heads
        return (self.key.repeat_interleave(group, dim=1),
                self.value.repeat_interleave(group, dim=1))

    def causal_mask(self) -> torch.Tensor:
        """Bool (Sq, Sk) mask of the top-left-aligned causal pattern (SDPA's convention)."""
        return _causal_mask(self.seq_len_q, self.seq_len_kv, self.device)

    def combined_mask(self) -> Optional[torch.Tensor]:
        """``attn_mask`` with the causal pattern folded in (bool stays bool, float gets -inf)."""
        mask = self.attn_mask
        if not self.is_causal:
            return mask
        causal = self.causal_mask()
        if mask is None:
            return causal
        if mask.dtype == torch.bool:
            return mask & causal
        return mask.masked_fill(~causal, float("-inf"))

    def replace(self, **fields) -> "AttentionCall":
        """A new call for a sub-problem: ``query``, ``key``, ``value`` ((B, H, S, D) tensors),
        ``attn_mask``, ``is_causal``, ``scale`` (None: the default for the new head dim),
        ``dropout_p``, ``return_lse``, ``softcap`` replaced; everything derived (mask kind, GQA,
        requires-grad, device) follows. Raises :class:`AttnPatchError` naming a field that is
        unknown or makes an invalid call."""
        unknown = sorted(set(fields) - set(_REPLACEABLE))
        if unknown:
            raise AttnPatchError(f"AttentionCall.replace() got unknown field(s) {unknown}; it "
                                 f"takes {list(_REPLACEABLE)}")
        values = {name: getattr(self, name) for name in _REPLACEABLE}
        if self.default_scale:
            values["scale"] = None  # the default follows the new head dim
        values.update(fields)
        q, k, v = values["query"], values["key"], values["value"]
        validate(q, k, v, values["attn_mask"], values["is_causal"], values["scale"],
                 values["dropout_p"], "bhsd", values["return_lse"], values["softcap"])
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                             or v.requires_grad)
        sub = build_call(q, k, v, values["attn_mask"], values["is_causal"], values["scale"],
                         values["dropout_p"], "bhsd", values["return_lse"], grad,
                         values["softcap"])
        sub.token_layout = self.token_layout  # the token structure of the call it is part of
        return sub

    def with_tensors(self, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor) -> "AttentionCall":
        """This call on other (B, H, S, D) tensors of the same shapes and dtypes, without
        validating again: a strategy's sub-call, built once by :meth:`replace`, repeated on new
        inputs (the mask, flags and options stay). Raises :class:`AttnPatchError` when a
        shape or dtype differs (build that call with :meth:`replace`)."""
        for name, new, old in (("query", query, self.query), ("key", key, self.key),
                               ("value", value, self.value)):
            if new.shape != old.shape or new.dtype != old.dtype:
                raise AttnPatchError(
                    f"AttentionCall.with_tensors(): {name} is {tuple(new.shape)} {new.dtype}, "
                    f"the call's {tuple(old.shape)} {old.dtype}: build a call of another shape "
                    "with replace()")
        sub = AttentionCall.__new__(AttentionCall)
        for name in AttentionCall.__slots__:
            setattr(sub, name, getattr(self, name))
        sub.query, sub.key, sub.value = query, key, value
        return sub

    def signature(self) -> tuple:
        """Everything that decides which backend can run this call (hashable): every tensor's
        shape, dtype, device and requires-grad (the mask's too), the flags, the grad mode."""
        m = self.attn_mask
        return (self.query.shape, self.key.shape, self.value.shape, self.query.dtype,
                self.key.dtype, self.value.dtype, self.query.device, self.key.device,
                self.value.device,
                None if m is None else (m.shape, m.dtype, m.device, self.mask_requires_grad),
                self.is_causal, self.scale, self.default_scale, self.dropout_p, self.return_lse,
                self.requires_grad, self.softcap, self.backward_from_lse)

    def additive_mask(self, dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
        """:meth:`combined_mask` as an additive float bias in ``dtype`` (default: the query's),
        for kernels that take only that: bool becomes 0/-inf; a float mask is cast by
        :func:`cast_bias` (no overflow to -inf)."""
        mask = self.combined_mask()
        if mask is None:
            return None
        dtype = dtype or self.dtype
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                ~mask, float("-inf"))
        return cast_bias(mask, dtype)

    def empty_rows(self) -> Optional[torch.Tensor]:
        """Bool (B|1, H|1, Sq, 1): the query rows that see no key under the mask (and causal
        pattern), or None when no row can be empty (no mask). Such a row has out = 0 and
        lse = -inf by definition."""
        mask = self.combined_mask()
        if mask is None:
            return None
        if mask.dtype == torch.bool:
            visible = mask.any(dim=-1, keepdim=True)
        else:
            visible = (mask != float("-inf")).any(dim=-1, keepdim=True)
        if visible.dim() < 4:
            visible = visible.view((1,) * (4 - visible.dim()) + tuple(visible.shape))
        return ~visible

    def __repr__(self) -> str:
        return (f"AttentionCall(q={tuple(self.query.shape)}, k={tuple(self.key.shape)}, "
                f"v={tuple(self.value.shape)}, dtype={self.dtype}, device={self.device}, "
                f"mask={self.mask_kind}, is_causal={self.is_causal}, dropout_p={self.dropout_p}"
                + ("" if self.softcap is None else f", softcap={self.softcap}") + ")")


_REPLACEABLE = ("query", "key", "value", "attn_mask", "is_causal", "scale", "dropout_p",
                "return_lse", "softcap")

_CAUSAL_CACHE = BoundedCache(64)


def _causal_mask(seq_q: int, seq_k: int, device: torch.device) -> torch.Tensor:
    key = (seq_q, seq_k, device)
    mask = _CAUSAL_CACHE.get(key)
    if mask is None:
        mask = _CAUSAL_CACHE.put(key, torch.ones(seq_q, seq_k, dtype=torch.bool,
                                                 device=device).tril())
    return mask


def cast_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float additive ``mask`` in ``dtype``: finite values beyond ``dtype``'s range are clamped
    to it (an fp32 bias of -1e5 becomes fp16's -65504, which still zeroes its weight, instead
    of -inf, which could empty a row); -inf stays -inf."""
    if mask.dtype == dtype:
        return mask
    info = torch.finfo(dtype)
    if torch.finfo(mask.dtype).max > info.max:
        mask = mask.clamp(info.min, info.max).masked_fill_(mask == float("-inf"), float("-inf"))
    return mask.to(dtype)


def classify_mask(mask: Optional[torch.Tensor]) -> str:
    """The mask kind of an already 4-D mask."""
    if mask is None:
        return "none"
    if mask.dtype == torch.bool:
        if mask.shape[1] == 1 and mask.shape[2] == 1:
            return "key_padding"
        return "bool"
    return "float"


def validate(query, key, value, attn_mask, is_causal, scale, dropout_p, layout, return_lse,
             softcap=None) -> None:
    """Raise :class:`AttnPatchError` naming the argument when the inputs are not a valid call."""
    if layout not in LAYOUTS:
        raise AttnPatchError(f"layout={layout!r} is not one of {LAYOUTS}: use 'bhsd' for "
                             "(batch, heads, seq, head_dim) or 'bshd' for "
                             "(batch, seq, heads, head_dim)")
    dims = "(B, H, S, D)" if layout == "bhsd" else "(B, S, H, D)"
    for arg, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise AttnPatchError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise AttnPatchError(f"{arg} must be 4-D {dims} for layout={layout!r}, got shape "
                                 f"{tuple(t.shape)}")
        if not t.is_floating_point():
            raise AttnPatchError(f"{arg} must be floating point, got {t.dtype}")
    for arg, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise AttnPatchError(f"{arg} dtype {t.dtype} != query dtype {query.dtype}: cast all "
                                 "three to one dtype")
        if t.device != query.device:
            raise AttnPatchError(f"{arg} is on {t.device} but query is on {query.device}")
    h, s = (1, 2) if layout == "bhsd" else (2, 1)
    b, hq, sq, d = query.shape[0], query.shape[h], query.shape[s], query.shape[3]
    bk, hk, sk, dk = key.shape[0], key.shape[h], key.shape[s], key.shape[3]
    bv, hv, sv = value.shape[0], value.shape[h], value.shape[s]
    if bk != b or bv != b:
        raise AttnPatchError(f"batch sizes differ: query {b}, key {bk}, value {bv}")
    if hv != hk:
        raise AttnPatchError(f"key has {hk} heads but value has {hv}: they must match")
    if hk == 0 or hq % hk:
        raise AttnPatchError(f"query has {hq} heads, not a multiple of key/value's {hk} "
                             "(grouped-query attention needs num_heads % num_kv_heads == 0)")
    if dk != d:
        raise AttnPatchError(f"key head_dim {dk} != query head_dim {d}")
    if sv != sk:
        raise AttnPatchError(f"key has sequence length {sk} but value has {sv}")
    if sk == 0 or sq == 0 or d == 0:
        raise AttnPatchError(f"empty attention: Sq={sq}, Sk={sk}, head_dim={d}")
    if not isinstance(is_causal, bool):
        raise AttnPatchError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if not isinstance(return_lse, bool):
        raise AttnPatchError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)
                              or not math.isfinite(scale)):
        raise AttnPatchError(f"scale must be None or a finite number, got {scale!r}")
    if (not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool)
            or not math.isfinite(dropout_p) or not 0.0 <= dropout_p <= 1.0):
        raise AttnPatchError(f"dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if softcap is not None:
        validate_softcap(softcap)
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise AttnPatchError(f"attn_mask must be a torch.Tensor or None, got "
                             f"{type(attn_mask).__name__} (pass BlockMask/mask_mod to the 'flex' "
                             "backend as the block_mask=/mask_mod= option)")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise AttnPatchError(f"attn_mask dtype {attn_mask.dtype} is neither bool (True = attend) "
                             "nor floating point (additive bias): convert it with .bool() or "
                             ".to(query.dtype)")
    if attn_mask.device != query.device:
        raise AttnPatchError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
    if not 2 <= attn_mask.dim() <= 4:
        raise AttnPatchError(f"attn_mask must be 2-D (Sq, Sk), 3-D or 4-D (B, H, Sq, Sk); got "
                             f"shape {tuple(attn_mask.shape)}")
    target = (b, hq, sq, sk)
    mshape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    if any(m not in (1, t) for m, t in zip(mshape, target)):
        raise AttnPatchError(
            f"attn_mask shape {tuple(attn_mask.shape)} does not broadcast to (B, H, Sq, Sk) = "
            f"{target}; a key-padding mask has shape (B, 1, 1, Sk) = ({b}, 1, 1, {sk})")


def validate_softcap(softcap) -> None:
    """Raise :class:`AttnPatchError` unless ``softcap`` is None or a positive finite number."""
    if softcap is not None and (not isinstance(softcap, (int, float)) or isinstance(softcap, bool)
                                or not math.isfinite(softcap) or softcap <= 0):
        raise AttnPatchError(f"softcap must be None or a positive finite number (the cap c of "
                             f"c * tanh(score / c)), got {softcap!r}")


def build_call(query, key, value, attn_mask, is_causal, scale, dropout_p, layout, return_lse,
               requires_grad, softcap=None) -> AttentionCall:
    """Normalize already-validated inputs into an :class:`AttentionCall` (views only)."""
    if layout == "bshd":
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if attn_mask is not None:
        nd = attn_mask.dim()
        if nd < 4:
            attn_mask = attn_mask.view((1,) * (4 - nd) + tuple(attn_mask.shape))
    default_scale = scale is None
    if default_scale:
        scale = query.shape[-1] ** -0.5
    return AttentionCall(query, key, value, attn_mask, classify_mask(attn_mask), is_causal,
                         float(scale), float(dropout_p), layout, return_lse, requires_grad,
                         default_scale, None, softcap)


def metadata_call(heads, kv_heads, head_dim, head_dim_v, dtype, device, mask, is_causal, scale,
                  dropout_p, return_lse, requires_grad, softcap=None) -> AttentionCall:
    """An :class:`AttentionCall` on meta tensors for selection while ``torch.compile`` traces
    (no real tensors, and batch/sequence sizes may be symbolic). ``mask`` is None or
    ``(dtype, shared by heads, shared by queries, requires grad)``. Sizes stand in as batch 1,
    length 2."""
    q = torch.empty(1, heads, 2, head_dim, dtype=dtype, device="meta")
    k = torch.empty(1, kv_heads, 2, head_dim, dtype=dtype, device="meta")
    v = torch.empty(1, kv_heads, 2, head_dim_v, dtype=dtype, device="meta")
    mask_t = None
    if mask is not None:
        mask_dtype, per_head_shared, per_query_shared, mask_grad = mask
        shape = (1, 1 if per_head_shared else heads, 1 if per_query_shared else 2, 2)
        mask_t = torch.empty(shape, dtype=mask_dtype, device="meta",
                             requires_grad=mask_grad)
    validate_softcap(softcap)  # traced calls skip validate(): name a bad softcap here
    call = build_call(q, k, v, mask_t, is_causal, scale, dropout_p, "bhsd", return_lse,
                      requires_grad, softcap)
    call.device = device
    return call
