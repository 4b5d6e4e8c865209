"""Attention that a module computes in its own methods, outside any processor.

- A module whose class has a method that calls ``F.scaled_dot_product_attention``,
  ``F.multi_head_attention_forward`` or diffusers' ``dispatch_attention_fn`` (the VAE attention
  blocks of Wan, QwenImage, HunyuanVideo; attention pools; ``torch.nn.MultiheadAttention``
  itself): the module's class is swapped for a generated subclass whose methods are the same
  code with those calls rebound to attnpatch (:func:`attnpatch.processors.rebind.routed_class`),
  and swapped back on unpatch. ``isinstance``, weights and ``state_dict`` are unchanged.
- Softmax attention written out by hand (a method with a softmax and two matrix products,
  and no call attnpatch can redirect): found by inspection and reported as *not routed*, with
  the method named, so a report that says "all routed" is true.
"""

from __future__ import annotations

import dis
import functools
import types
from typing import Any, Optional

import torch

from .._record import ModuleRecord
from ..processors.rebind import NotRoutable, calls_attention, routed_class

__all__ = ["routes_forward", "hand_written_attention", "patch_module", "restore_module"]

_MATMUL_NAMES = frozenset({"matmul", "bmm", "baddbmm", "einsum"})


def routes_forward(module: Any) -> bool:
    """Whether ``module``'s own class computes attention through a call attnpatch redirects."""
    return isinstance(module, torch.nn.Module) and calls_attention(type(module))


def _codes(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _matrix_products(code: types.CodeType) -> int:
    """How many matrix products a function's code spells (``@``, matmul, bmm, baddbmm, einsum)."""
    count = 0
    for c in _codes(code):
        for i in dis.get_instructions(c):
            if i.opname in ("BINARY_MATRIX_MULTIPLY", "INPLACE_MATRIX_MULTIPLY") or (
                    i.opname == "BINARY_OP" and i.argrepr in ("@", "@=")):  # 3.10 / 3.11+
                count += 1
            elif i.opname.startswith("LOAD_") and i.argval in _MATMUL_NAMES:
                count += 1
    return count


@functools.lru_cache(maxsize=None)
def _hand_written(cls: type) -> Optional[str]:
    for klass in cls.__mro__:
        if klass is object or klass is torch.nn.Module:
            continue
        for name, attr in vars(klass).items():
            fn = getattr(attr, "__func__", attr)
            if not isinstance(fn, types.FunctionType):
                continue
            # softmax(q kᵀ) v: two matrix products around a softmax (one product and a softmax
            # is a weighted mix, e.g. of layers, not attention)
            if any("softmax" in c.co_names for c in _codes(fn.__code__)) and \
                    _matrix_products(fn.__code__) >= 2:
                return f"{klass.__qualname__}.{name}"
    return None


def hand_written_attention(module: Any) -> Optional[str]:
    """``Class.method`` where ``module`` computes softmax attention by hand (a softmax and two
    matrix products in one method), or None."""
    if not isinstance(module, torch.nn.Module):
        return None
    return _hand_written(type(module))


def patch_module(record: ModuleRecord) -> None:
    """Swap ``record.module``'s class for its routed subclass; sets ``routed``/``note_text``."""
    module = record.module
    cls = type(module)
    record.original = cls
    try:
        routed = routed_class(cls, record)
    except NotRoutable as err:
        record.note_text = str(err)
        return
    module.__class__ = routed
    # accelerate's hooks (cpu offload) keep the forward they wrapped as a bound method in
    # ``_old_forward``; rebind it so the hooked forward runs the routed code too
    old = module.__dict__.get("_old_forward")
    if isinstance(old, types.MethodType) and old.__self__ is module \
            and old.__func__ is getattr(cls, "forward", None):
        record.extra["old_forward"] = old
        module.__dict__["_old_forward"] = types.MethodType(routed.forward, module)
    record.installed = routed
    record.routed = True


def restore_module(record: ModuleRecord) -> bool:
    """Put the original class back; False if the module's class was changed meanwhile (then
    the new one stays)."""
    module = record.module
    if record.installed is None:
        return True
    if type(module) is not record.installed:
        return False
    module.__class__ = record.original
    old = record.extra.pop("old_forward", None)
    if old is not None and isinstance(module.__dict__.get("_old_forward"), types.MethodType):
        module.__dict__["_old_forward"] = old
    return True
