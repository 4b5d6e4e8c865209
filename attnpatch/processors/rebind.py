"""Route a diffusers processor's core attention call through attnpatch, keeping everything else.

A processor's ``__call__`` (projections, RoPE, norms, concatenation) stays the model's own code.
We give the module a processor of a generated subclass of the original class whose methods are
the original functions *cloned with rebound globals*: the same code object, but a globals dict
where ``F`` (``torch.nn.functional``), ``nn``, a bare ``scaled_dot_product_attention`` or
``dispatch_attention_fn`` resolve to this module's attnpatch entry points.

- No per-op cost: only the attention call changes; every other ``F.xxx`` resolves to the real
  function (the proxy module holds the same function objects).
- Nothing global is touched: diffusers' module globals stay as they are, other instances of the
  processor class are unaffected.
- The signature is the original one (same code object), so diffusers' kwarg filtering with
  ``inspect.signature(processor.__call__)`` sees the real parameters; it is precomputed as
  ``__signature__`` (diffusers asks on every attention forward).
- ``torch.compile(fullgraph=True)`` traces straight through (a module object and a closure).
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as _F

from .._errors import AttnPatchError
from ..dispatch import current_backend, dispatch_eager, dispatch_traced

# dynamo maps this to True while it traces; eagerly it is one frame (is_compiling() is two)
_is_dynamo_compiling = torch.compiler.is_dynamo_compiling

__all__ = ["intercept_plan", "clone_function", "route_processor", "routed_class", "module_proxy",
           "make_multi_head_attention_forward", "calls_attention", "NotRoutable"]

_SDPA = _F.scaled_dot_product_attention
_MHA = _F.multi_head_attention_forward
#: the attention entry points of torch.nn.functional that a routed function may call
_FUNCTIONAL_ATTENTION = frozenset({"scaled_dot_product_attention", "multi_head_attention_forward"})
#: torch's fused fast path of nn.MultiheadAttention (one native op with attention inside); a
#: routed method sees ``torch.backends.mha.get_fastpath_enabled()`` as False, so it takes the
#: path through F.multi_head_attention_forward instead. Nothing global is flipped.
_FUSED_ATTENTION = frozenset({"_native_multi_head_attention"})


class NotRoutable(Exception):
    """The processor has no attention call attnpatch can redirect; ``str()`` says why."""


def _dispatch_fn():
    try:
        from diffusers.models import attention_dispatch
    except Exception:  # pragma: no cover - diffusers not installed / broken
        return None
    return attention_dispatch.dispatch_attention_fn


def _all_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _all_names(const)
    return names


def intercept_plan(fn: types.FunctionType) -> dict[str, str]:
    """Which globals of ``fn`` lead to a core attention call, and of which kind:
    ``"F"`` (torch.nn.functional), ``"nn"`` (torch.nn), ``"sdpa"`` (the function itself),
    ``"dispatch"`` (diffusers' ``dispatch_attention_fn``)."""
    names = _all_names(fn.__code__)
    glb = fn.__globals__
    dispatch = _dispatch_fn()
    plan = {}
    uses_attr = bool(names & _FUNCTIONAL_ATTENTION)
    for name in names:
        if name not in glb:
            continue
        value = glb[name]
        if value is _F and uses_attr:
            plan[name] = "F"
        elif value is torch.nn and uses_attr and "functional" in names:
            plan[name] = "nn"
        elif value is torch and ((uses_attr and "nn" in names and "functional" in names)
                                 or names & _FUSED_ATTENTION):
            plan[name] = "torch"
        elif value is _SDPA:
            plan[name] = "sdpa"
        elif value is _MHA:
            plan[name] = "mha"
        elif dispatch is not None and value is dispatch:
            plan[name] = "dispatch"
    return plan


def clone_function(fn: types.FunctionType, overrides: dict[str, Any]) -> types.FunctionType:
    """``fn`` with the same code, defaults, closure and attributes, and globals
    ``{**fn.__globals__, **overrides}``.

    ``__name__`` is left out of the new globals: torch.compile would otherwise guard the
    overridden names against the *original* module's attributes (and recompile every call).

    The clone gets its own copy of the code object (equal, not identical). torch.compile keys
    its caches on the code object: the compiled frames, and the resume functions it makes at
    a graph break (ContinueExecutionCache). The code it compiles loads the ``__compiled_fn_*``
    and ``__resume_at_*`` globals it installed in the globals of the frame it compiled, and its
    guards check global *values* by name, never which dict they live in. Two clones of one
    function (one per module) sharing the code object would share those cache entries: after a
    graph break in a backend, the resume code compiled for module A's globals passes its guards
    in module B's frame and fails with ``NameError: name '__compiled_fn_…' is not defined``.
    One code object per globals dict is what dynamo assumes (as for any module's functions).
    """
    glb = dict(fn.__globals__)
    glb.update(overrides)
    glb.pop("__name__", None)
    new = types.FunctionType(fn.__code__.replace(), glb, fn.__name__, fn.__defaults__,
                             fn.__closure__)
    new.__kwdefaults__ = None if fn.__kwdefaults__ is None else dict(fn.__kwdefaults__)
    new.__dict__.update(fn.__dict__)
    new.__module__ = fn.__module__
    new.__qualname__ = fn.__qualname__
    new.__doc__ = fn.__doc__
    new.__annotations__ = dict(getattr(fn, "__annotations__", {}) or {})
    # diffusers runs inspect.signature(processor.__call__) on every attention forward to filter
    # kwargs. The signature is the original's (same code object), so it is computed once here
    # and kept as __signature__, which inspect returns as is. No __wrapped__: following it
    # would cost more frames on every one of those calls.
    new.__signature__ = inspect.signature(fn)
    return new


def module_proxy(module: types.ModuleType, **replaced: Any) -> types.ModuleType:
    """A module object that is ``module`` except for the ``replaced`` attributes.

    Its namespace is a copy, so every other attribute lookup is a plain dict hit (no per-op
    cost); anything added to ``module`` later still resolves (PEP 562 ``__getattr__``).
    """
    proxy = types.ModuleType(module.__name__, module.__doc__)
    proxy.__dict__.update({k: v for k, v in vars(module).items()
                           if not (k.startswith("__") and k.endswith("__"))})
    proxy.__dict__.update(replaced)
    proxy.__getattr__ = lambda name: getattr(module, name)
    return proxy


def make_sdpa(record) -> Callable:
    """``F.scaled_dot_product_attention`` for one module: (B, H, S, D) in and out.

    ``enable_gqa`` is accepted and not needed: the dispatcher reads GQA from the head counts.
    """

    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                     is_causal=False, scale=None, enable_gqa=False):
        if query.dim() != 4:  # SDPA takes any number of batch dims: (..., S, D)
            return _as_four_dims(scaled_dot_product_attention, query, key, value, attn_mask,
                                 dropout_p, is_causal, scale)
        if _is_dynamo_compiling():
            return dispatch_traced(query, key, value, attn_mask, is_causal,
                                   record.scale if scale is None else scale, dropout_p, None,
                                   "bhsd", False, {}, record.default, None, record)[0]
        return dispatch_eager(query, key, value, attn_mask, is_causal, scale, dropout_p, None,
                              "bhsd", False, None, record.default, record)[0]

    return scaled_dot_product_attention


def _as_four_dims(sdpa: Callable, query, key, value, attn_mask, dropout_p, is_causal, scale):
    """``sdpa`` on (..., S, D) inputs of any rank (as ``F.scaled_dot_product_attention`` takes
    them): the batch dims become (B, H) — padded with ones below 4-D, flattened above — and
    the output gets the caller's shape back."""
    rank = query.dim()
    if rank < 2 or key.dim() != rank or value.dim() != rank:
        raise AttnPatchError(f"scaled_dot_product_attention: query, key and value must have the "
                             f"same rank >= 2, got {query.dim()}, {key.dim()}, {value.dim()}")

    def four(t):
        if rank < 4:
            return t.reshape((1,) * (4 - rank) + tuple(t.shape))
        return t.flatten(0, rank - 4)

    if attn_mask is not None:
        attn_mask = attn_mask.reshape((1,) * (rank - attn_mask.dim()) + tuple(attn_mask.shape))
        if rank > 4:
            attn_mask = attn_mask.expand(*query.shape[:-2], *attn_mask.shape[-2:])
        attn_mask = four(attn_mask)
    out = sdpa(four(query), four(key), four(value), attn_mask, dropout_p, is_causal, scale)
    return out.reshape(*query.shape[:-1], out.shape[-1])


def _diffusers_backend_name(backend) -> str:
    value = getattr(backend, "value", backend)
    return str(value)


def make_dispatch(record, original: Callable) -> Callable:
    """diffusers' ``dispatch_attention_fn`` for one module: (B, S, H, D) in and out.

    ``backend`` is what the processor's ``_attention_backend`` says (set with diffusers' own
    ``set_attention_backend``). attnpatch's own choice for the module wins; without one, a
    diffusers name that attnpatch knows maps to its backend, and one it doesn't (``sage``, ...)
    runs diffusers' own kernel, booked as ``diffusers:<name>``. diffusers' process-global active
    backend is not consulted.
    """
    from .. import registry

    mapped: dict[str, Optional[str]] = {}

    def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                              scale=None, enable_gqa=False, attention_kwargs=None, *,
                              backend=None, parallel_config=None):
        if parallel_config is not None:
            raise AttnPatchError(
                f"{record.name}: diffusers context parallelism (parallel_config) is enabled on "
                "this module; attnpatch does not route it. Disable it, or unpatch the model.")
        default = record.default
        # diffusers' own backend choice ranks below an attention_backend() block
        if backend is not None and default is None and current_backend() is None:
            name = _diffusers_backend_name(backend)
            if name not in mapped:
                try:
                    mapped[name] = registry.canonical_name(name)
                except AttnPatchError:
                    mapped[name] = None
            if mapped[name] is None:
                out = original(query, key, value, attn_mask, dropout_p, is_causal, scale,
                               enable_gqa, attention_kwargs, backend=backend)
                if not torch.compiler.is_dynamo_compiling():
                    record.note_external(f"diffusers:{name}")
                return out
            default = (mapped[name], {})
        options = dict(attention_kwargs) if attention_kwargs else None
        if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
            # a FlexAttention BlockMask (models whose processors require diffusers' flex
            # backend): it is flex's block_mask option, so auto picks flex, and a backend
            # that can't take it says so
            options = {**(options or {}), "block_mask": attn_mask}
            attn_mask = None
        elif (attn_mask is not None and attn_mask.dim() == 2
              and attn_mask.shape[0] == query.shape[0] and attn_mask.shape[1] == key.shape[1]):
            attn_mask = attn_mask[:, None, None, :]  # (B, Sk) key padding -> (B, 1, 1, Sk)
        if _is_dynamo_compiling():
            return dispatch_traced(query, key, value, attn_mask, is_causal,
                                   record.scale if scale is None else scale, dropout_p, None,
                                   "bshd", False, options or {}, default, None, record)[0]
        return dispatch_eager(query, key, value, attn_mask, is_causal, scale, dropout_p, None,
                              "bshd", False, options, default, record)[0]

    return dispatch_attention_fn


def _class_functions(cls: type):
    """(name, wrapper, function) for every plain/static/class method visible on ``cls``,
    first definition in the MRO wins; torch.nn.Module's own methods are skipped."""
    seen = set()
    for klass in cls.__mro__:
        if klass is object or klass is torch.nn.Module:
            continue
        for name, attr in vars(klass).items():
            if name in seen:
                continue
            seen.add(name)
            if isinstance(attr, staticmethod):
                yield name, staticmethod, attr.__func__
            elif isinstance(attr, classmethod):
                yield name, classmethod, attr.__func__
            elif isinstance(attr, types.FunctionType):
                yield name, None, attr


@functools.lru_cache(maxsize=None)
def calls_attention(cls: type) -> bool:
    """Whether a method of ``cls`` calls an attention entry point attnpatch can redirect."""
    return any(intercept_plan(fn) for _, _, fn in _class_functions(cls))


def routed_class(cls: type, record) -> type:
    """A generated subclass of ``cls`` whose methods that call attention (SDPA,
    ``F.multi_head_attention_forward`` or ``dispatch_attention_fn``) are cloned to call
    attnpatch for ``record``'s module; everything else is inherited unchanged.

    Raises :class:`NotRoutable` when no method of the class calls attention.
    """
    overrides: dict[str, Any] = {}
    namespace: dict[str, Any] = {}
    for name, wrapper, fn in _class_functions(cls):
        plan = intercept_plan(fn)
        if not plan:
            continue
        bindings = {glob: _make_override(kind, record, overrides) for glob, kind in plan.items()}
        clone = clone_function(fn, bindings)
        namespace[name] = wrapper(clone) if wrapper is not None else clone
    if not namespace:
        raise NotRoutable(_why_not(cls))
    namespace.update(__module__=cls.__module__, __qualname__=cls.__qualname__,
                     __doc__=cls.__doc__, _attnpatch_routed=True, _attnpatch_base=cls)
    record.extra["interception"] = sorted(overrides)
    return type(cls.__name__, (cls,), namespace)


def route_processor(processor: Any, record, base_class: Optional[type] = None) -> Any:
    """A copy of ``processor`` whose class is :func:`routed_class` of ``base_class`` (default:
    its own class).

    The copy shares the original's ``__dict__`` entries (weights of processors that are
    nn.Modules stay the same tensors, and state_dict keys do not change).
    Raises :class:`NotRoutable` when no method of the class calls attention.
    """
    sub = routed_class(base_class or type(processor), record)
    new = object.__new__(sub)
    if hasattr(processor, "__dict__"):
        new.__dict__.update(processor.__dict__)
    return new


def _make_override(kind: str, record, made: dict) -> Any:
    """The object bound to a global of ``kind`` (see :func:`intercept_plan`) for ``record``'s
    module; ``made`` shares the ones already built, so one module has one of each."""
    if kind in made:
        return made[kind]
    if kind == "sdpa":
        value = make_sdpa(record)
    elif kind == "mha":
        value = make_multi_head_attention_forward(_make_override("sdpa", record, made))
    elif kind == "F":
        value = module_proxy(_F, scaled_dot_product_attention=_make_override("sdpa", record, made),
                             multi_head_attention_forward=_make_override("mha", record, made))
    elif kind == "nn":
        value = module_proxy(torch.nn, functional=_make_override("F", record, made))
    elif kind == "torch":
        mha = module_proxy(torch.backends.mha, get_fastpath_enabled=_fastpath_disabled)
        value = module_proxy(torch, nn=_make_override("nn", record, made),
                             backends=module_proxy(torch.backends, mha=mha))
    elif kind == "dispatch":
        value = make_dispatch(record, _dispatch_fn())
    else:
        raise AssertionError(kind)
    made[kind] = value
    return value


def _fastpath_disabled() -> bool:
    return False


def make_multi_head_attention_forward(sdpa: Callable) -> Callable:
    """``F.multi_head_attention_forward`` whose attention runs through ``sdpa`` (attnpatch).

    torch's own function, cloned with its ``scaled_dot_product_attention`` global rebound: the
    projections, masks and dropout stay torch's. torch computes ``need_weights=True`` calls
    with bmm and softmax instead of SDPA, so those run with ``need_weights=False`` (the output
    from attnpatch) and the weights come from a second, unrouted call of torch's function.
    """
    routed = clone_function(_MHA, {"scaled_dot_product_attention": sdpa})
    signature = inspect.signature(_MHA)

    def multi_head_attention_forward(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        need_weights = arguments["need_weights"]
        arguments["need_weights"] = False
        out, _ = routed(**arguments)
        if not need_weights:
            return out, None
        arguments["need_weights"] = True
        return out, _MHA(**arguments)[1]

    return multi_head_attention_forward


def _why_not(cls: type) -> str:
    names = set()
    for _, _, fn in _class_functions(cls):
        names |= _all_names(fn.__code__)
    if "get_attention_scores" in names or "baddbmm" in names:
        return (f"{cls.__name__} computes attention with bmm (no SDPA/dispatch call) and has no "
                "numerically equivalent SDPA processor here")
    if "xformers" in names or "memory_efficient_attention" in names:
        return f"{cls.__name__} calls xformers directly"
    if "softmax" not in names:
        return (f"{cls.__name__} calls no softmax attention (no SDPA, dispatch_attention_fn or "
                "softmax: linear attention): nothing to route")
    return f"{cls.__name__} has no F.scaled_dot_product_attention / dispatch_attention_fn call"
