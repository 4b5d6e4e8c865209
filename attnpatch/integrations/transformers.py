"""transformers: one ``AttentionInterface`` function and its mask function, under one name.

``ATTN_NAME`` is registered in ``AttentionInterface`` (the attention call) and in
``AttentionMaskInterface`` (:func:`attnpatch_mask`: models then build a 4-D bool mask, True =
attend; without it transformers silently drops padding masks for unknown implementations). A
patched model's configs are switched to ``ATTN_NAME`` with ``set_attn_implementation``; each
config's previous ``_attn_implementation`` is restored exactly on unpatch, and the global
registrations (a :class:`Registration` site on the module-level :data:`REGISTRY`, counted per
patch) are removed again when the last patch holding them lets go.

The function gets ``module``, so records (and backends) are per attention module. It follows
``sdpa_attention_forward``'s conventions: ``is_causal`` from the call or ``module.is_causal``
(only when there is no mask and more than one query), T5's ``position_bias`` folded into the
mask, ``scaling`` as the scale (T5: 1.0), ``dropout`` as the model passes it (0.0 in eval), GQA
(fewer key/value heads), output (B, S, H, D) and no weights. ``softcap`` (Gemma 2's
``attn_logit_softcapping``) becomes the call's softcap: backends that compute it run it, others
refuse it with a reason. What no backend computes is refused, never dropped: a module whose
forward passes attention sinks (``s_aux=``, GPT-OSS; ``sinks=``, Inkling 2) or the key indices of
a sparse indexer (``indices=``/``block_indices=``: DeepSeek-V3.2 and its kin fold them into the
mask only for "eager" and "sdpa") is refused when it is patched (:func:`unsupported_reason`), and
any other tensor keyword the function does not know raises at the call.

The mask function (:func:`attnpatch_mask`) is ``sdpa_mask`` that leaves a causal mask out (None:
the call's ``is_causal``) only where the queries and keys are the same positions. So a None mask
with more keys than queries means queries cut from the end after the mask was built (Gemma 4's
``logits_to_keep`` slicing, which transformers allows for every implementation but "sdpa"): the
call runs bottom-right causal, the rows the full causal mask had for those queries.
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Any, Iterator, Optional

import torch

from .._errors import AttnPatchError
from .._record import RECORD_KEY, ModuleRecord
from .._sites import MISSING, ProcessSite, Site, held
from ..dispatch import dispatch_call, dispatch_eager

logger = logging.getLogger(__name__)

__all__ = ["ATTN_NAME", "is_pretrained_model", "is_attention_module", "unsupported_reason",
           "REGISTRY", "Registration", "registered", "cannot_switch", "ImplementationSite",
           "module_record", "attnpatch_attention", "attnpatch_mask", "UNSUPPORTED_KEYWORDS",
           "IGNORED_KEYWORDS"]

#: the implementation name; avoids the substrings (flash, sdpa, flex_attention) and the
#: org/repo pattern that make transformers take special code paths
ATTN_NAME = "attnpatch"


def _transformers():
    return sys.modules.get("transformers")


def is_pretrained_model(obj: Any) -> bool:
    t = _transformers()
    return t is not None and isinstance(obj, t.PreTrainedModel)


def _functions_behind(fn: Any, depth: int = 6) -> Iterator[types.FunctionType]:
    """``fn`` and every function it wraps: ``__wrapped__`` chains (functools.wraps, as in
    transformers' ``deprecate_kwarg``) and functions held in a wrapper's closure cells (a
    decorator that does not use functools.wraps)."""
    todo, seen = [fn], set()
    while todo and depth > 0:
        depth -= 1
        nxt = []
        for f in todo:
            f = getattr(f, "__func__", f)  # bound / static methods
            if not isinstance(f, types.FunctionType) or id(f) in seen:
                continue
            seen.add(id(f))
            yield f
            nxt.append(getattr(f, "__wrapped__", None))
            nxt.extend(c.cell_contents for c in (f.__closure__ or ())
                       if _cell_is_function(c))
        todo = nxt


def _cell_is_function(cell) -> bool:
    try:
        return isinstance(cell.cell_contents, (types.FunctionType, types.MethodType))
    except ValueError:  # an empty cell
        return False


def is_attention_module(module: Any) -> bool:
    """A module whose forward (behind any decorators) looks its attention function up in
    ``ALL_ATTENTION_FUNCTIONS``, transformers' registry of attention implementations."""
    forward = getattr(type(module), "forward", None)
    return any("ALL_ATTENTION_FUNCTIONS" in f.__code__.co_names
               for f in _functions_behind(forward))


#: keywords an attention module may pass to its attention function that no attnpatch backend
#: computes: (what they are, the module attribute that holds them, None where a layer has none;
#: None: no such attribute, the keyword alone refuses the module)
UNSUPPORTED_KEYWORDS = {
    "s_aux": ("attention sinks", "sinks"),
    "sinks": ("attention sinks", None),
    "indices": ("the key indices of a sparse attention indexer", None),
    "block_indices": ("the key block indices of a sparse attention indexer", None),
}

#: keywords transformers passes that the call needs no value of: the mask already holds them
#: (sliding windows, packed sequences), or only other kernels read them, as for
#: ``sdpa_attention_forward``; a tensor under any keyword outside these and the handled ones
#: is refused at the call
IGNORED_KEYWORDS = frozenset({
    "sliding_window", "position_ids", "cache_position", "cu_seq_lens_q", "cu_seq_lens_k",
    "max_length_q", "max_length_k", "use_cache", "output_attentions", "output_hidden_states",
    "output_router_logits", "return_dict", "deterministic", "layer_idx", "target_dtype",
})


def _keywords_passed(fn: types.FunctionType) -> set[str]:
    """Keyword names ``fn``'s code passes in calls: CPython keeps them as tuples of strings
    among the code's constants (``f(a, b=...)``, also with ``**kwargs``)."""
    names: set[str] = set()
    for const in fn.__code__.co_consts:
        if isinstance(const, tuple) and all(isinstance(c, str) for c in const):
            names.update(const)
    return names


def unsupported_reason(module: Any, name: str = "") -> Optional[str]:
    """Why ``module`` (a transformers attention module) cannot be routed through attnpatch, or
    None. Found by inspecting its class's forward (behind decorators), so that ``patch()`` can
    refuse it before anything changes instead of failing at the first forward: a forward that
    passes a keyword of :data:`UNSUPPORTED_KEYWORDS` (attention sinks, sparse indexer indices),
    which no backend computes. A module whose ``sinks`` attribute is None (MiMo-V2-Flash's
    full-attention layers pass ``s_aux=self.sinks`` = None) is not refused."""
    forward = getattr(type(module), "forward", None)
    passed = set()
    for f in _functions_behind(forward):
        passed |= _keywords_passed(f)
    found = [kw for kw, (_, attr) in UNSUPPORTED_KEYWORDS.items()
             if kw in passed and (attr is None or getattr(module, attr, True) is not None)]
    if not found:
        return None
    what = ", ".join(f"{UNSUPPORTED_KEYWORDS[kw][0]} ({kw}=)" for kw in found)
    label = f"{name} ({type(module).__name__})" if name else type(module).__name__
    exclude = f"exclude={name!r}" if name else "exclude=<its name>"
    return (f"{label} passes {what} to its attention function, which no attnpatch backend "
            f"computes: exclude it from the patch (patch(..., {exclude})) or leave this model "
            "unpatched (attnpatch.unpatch)")


# --- the attention function -------------------------------------------------------------------

def _passthrough(module, query, key, value, attention_mask, impl: str, **kwargs):
    """A module inside a switched model that was excluded from the patch: run what it ran
    before (eager or sdpa), with the mask in the form that implementation expects."""
    if impl == "eager":
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise AttnPatchError(f"{type(module).__name__}: no eager_attention_forward to fall "
                                 "back to for an excluded module")
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            attention_mask = torch.where(attention_mask, 0.0, torch.finfo(query.dtype).min).to(
                query.dtype)
        return eager(module, query, key, value, attention_mask, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def attnpatch_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                        is_causal=None, position_bias=None, cache=None, **kwargs):
    """The ``AttentionInterface`` function: q/k/v (B, H, S, D) in, ((B, S, H, D), None) out."""
    record: Optional[ModuleRecord] = getattr(module, RECORD_KEY, None)
    if record is None:
        impl = getattr(module, "_attnpatch_passthrough", "sdpa")
        return _passthrough(module, query, key, value, attention_mask, impl, dropout=dropout,
                            scaling=scaling, is_causal=is_causal, position_bias=position_bias,
                            cache=cache, **kwargs)
    _refuse_unknown(record, kwargs)
    softcap = kwargs.get("softcap")  # Gemma 2: attn_logit_softcapping (None when off)
    if cache is not None:
        from transformers.generation.continuous_batching.cache import PagedAttentionCache
        if isinstance(cache, PagedAttentionCache):
            key, value = cache.update(key_states=key, value_states=value,
                                      layer_idx=module.layer_idx, kwargs=kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and kv_len > q_len:  # queries cut from the end (see the module docstring)
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(
            kv_len - q_len)
        is_causal = False
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import create_position_bias_mask
        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal,
                                                   query, key)
        is_causal = False
    if torch.compiler.is_dynamo_compiling():
        out = dispatch_call(query, key, value, attention_mask, is_causal, scaling, dropout,
                            None, "bhsd", False, None, record.default, softcap)[0]
    else:
        out, selection = dispatch_eager(query, key, value, attention_mask, is_causal, scaling,
                                        dropout, None, "bhsd", False, None, record.default,
                                        None, softcap)
        record.note(selection)
    return out.transpose(1, 2).contiguous(), None


def _refuse_unknown(record: ModuleRecord, kwargs: dict) -> None:
    """Raise for a keyword whose value no backend computes (patch() refuses the modules that
    name one in their forward; this is the backstop) or a tensor under a keyword this function
    does not know; warn once per module for ``output_attentions=True`` (no weights come back,
    as with "sdpa")."""
    for kw, value in kwargs.items():
        if value is None:
            continue
        if kw in UNSUPPORTED_KEYWORDS:
            raise AttnPatchError(f"{record.name}: {UNSUPPORTED_KEYWORDS[kw][0]} ({kw}=) are not "
                                 "computed by any attnpatch backend; exclude this module from "
                                 f"the patch (patch(..., exclude={record.name!r}))")
        if isinstance(value, torch.Tensor) and kw not in IGNORED_KEYWORDS and kw != "softcap":
            raise AttnPatchError(f"{record.name}: its attention function was passed {kw}= (a "
                                 "tensor) that attnpatch does not know how to compute, and "
                                 "dropping it could change the result; exclude this module "
                                 f"from the patch (patch(..., exclude={record.name!r}))")
    if kwargs.get("output_attentions") and not record.extra.get("warned_output_attentions"):
        record.extra["warned_output_attentions"] = True
        logger.warning("%s: output_attentions=True, but attnpatch backends return no attention "
                       "weights (None, as with 'sdpa'); exclude this module from the patch to "
                       "get them from its 'eager' implementation", record.name)


def attnpatch_mask(batch_size: int, q_length: int, kv_length: int, *args,
                   allow_is_causal_skip: bool = True, **kwargs):
    """``sdpa_mask`` (the 4-D bool mask, True = attend) that skips a causal mask (returns
    None) only for one query or queries at the keys' own positions: a None mask then never
    stands for top-left causal over a longer, partly empty cache."""
    from transformers.masking_utils import sdpa_mask
    same = q_length == 1 or q_length == kv_length
    return sdpa_mask(batch_size, q_length, kv_length, *args,
                     allow_is_causal_skip=allow_is_causal_skip and same, **kwargs)


# --- global registration (a site on a module-level holder) -------------------------------------

class _Holder:
    """Where the site of attnpatch's entries in transformers' registries is kept: one per
    process, counted per patch that switched a model to ``ATTN_NAME``."""


#: the holder of the :class:`Registration` site (``acquire(REGISTRY, Registration.KEY, ...)``)
REGISTRY = _Holder()


class Registration(ProcessSite):
    """``ATTN_NAME`` in ``AttentionInterface`` and ``AttentionMaskInterface``; restore puts back
    exactly what those two mappings held under the name before."""

    KEY = "_attnpatch_registration"

    def __init__(self):
        super().__init__(REGISTRY)
        self.saved: tuple = (MISSING, MISSING)

    def apply(self) -> None:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
        self.saved = (AttentionInterface._global_mapping.get(ATTN_NAME, MISSING),
                      AttentionMaskInterface._global_mapping.get(ATTN_NAME, MISSING))
        AttentionInterface.register(ATTN_NAME, attnpatch_attention)
        AttentionMaskInterface.register(ATTN_NAME, attnpatch_mask)

    def restore(self) -> None:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
        for mapping, saved in zip((AttentionInterface._global_mapping,
                                   AttentionMaskInterface._global_mapping), self.saved):
            if saved is MISSING:
                mapping.pop(ATTN_NAME, None)
            else:
                mapping[ATTN_NAME] = saved


def registered() -> bool:
    """Whether attnpatch's AttentionInterface entry is currently registered (for tests)."""
    return held(REGISTRY, Registration.KEY) is not None


# --- one patched model ------------------------------------------------------------------------

def _configs(model) -> list:
    """Every config object of ``model``: its own, its submodels', and nested sub-configs."""
    t = _transformers()
    config_cls = getattr(t, "PreTrainedConfig", None) or t.PretrainedConfig
    seen: dict[int, Any] = {}
    todo = [model.config]
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and isinstance(cfg, config_cls):
            todo.append(cfg)
    while todo:
        cfg = todo.pop()
        if cfg is None or id(cfg) in seen:
            continue
        seen[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}) or {}:
            todo.append(getattr(cfg, key, None))
    return list(seen.values())


def cannot_switch(model) -> Optional[str]:
    """Why ``model``'s attention implementation cannot be switched to ``ATTN_NAME``, or None."""
    if model._can_set_attn_implementation():
        return None
    return (f"{type(model).__name__} does not use transformers' AttentionInterface (cannot "
            "switch its attention implementation)")


class ImplementationSite(Site):
    """One transformers model switched to ``ATTN_NAME`` (needs the :class:`Registration`): every
    config's previous implementation, and a passthrough marker on each attention module the
    patch ``excluded`` (they run what they ran before). Records go on the routed modules
    separately (:func:`module_record`)."""

    KEY = "_attnpatch_tf_site"

    def __init__(self, model, excluded: list):
        super().__init__(model)
        self.excluded = excluded
        self.saved: list[tuple[Any, Any]] = []

    def apply(self) -> None:
        model = self.obj
        original = model.config._attn_implementation
        if self.excluded and original not in ("eager", "sdpa"):
            raise AttnPatchError(
                f"{type(model).__name__}: excluding only some of its attention modules needs its "
                f"current implementation to be 'eager' or 'sdpa' (it is {original!r}); include or "
                "exclude the whole model")
        self.saved = [(cfg, cfg.__dict__.get("_attn_implementation_internal", MISSING))
                      for cfg in _configs(model)]
        try:
            model.set_attn_implementation(ATTN_NAME)
        except Exception as err:
            self._restore_configs()
            raise AttnPatchError(f"{type(model).__name__}: could not switch to the attnpatch "
                                 f"attention implementation: {err}") from err
        for module in self.excluded:
            module._attnpatch_passthrough = self.saved_impl(getattr(module, "config", None))

    def saved_impl(self, cfg) -> str:
        """The implementation ``cfg`` had before the switch ("sdpa" when it had none)."""
        for c, value in self.saved:
            if c is cfg:
                return value if isinstance(value, str) else "sdpa"
        return "sdpa"

    def _restore_configs(self) -> None:
        """Put back each config's implementation, unless someone switched it away from
        attnpatch after patching (then theirs stays, like a swapped diffusers processor)."""
        for cfg, value in self.saved:
            if cfg.__dict__.get("_attn_implementation_internal") != ATTN_NAME:
                continue
            if value is MISSING:
                cfg.__dict__.pop("_attn_implementation_internal", None)
            else:
                cfg.__dict__["_attn_implementation_internal"] = value

    def restore(self) -> None:
        for module in self.excluded:
            module.__dict__.pop("_attnpatch_passthrough", None)
        self._restore_configs()


def module_record(name: str, module, site: Optional[ImplementationSite],
                  why_not: Optional[str] = None) -> ModuleRecord:
    """The record of one attention module of a switched model (``site``): routed when its
    config now names ``ATTN_NAME``; else, or with ``why_not``, reported as not routed."""
    cfg = getattr(module, "config", None)
    before = site.saved_impl(cfg) if site is not None else str(
        getattr(cfg, "_attn_implementation", "?"))
    record = ModuleRecord(name, "transformers", module, before)
    impl = getattr(cfg, "_attn_implementation", None)
    if why_not is not None:
        record.note_text = why_not
    elif impl != ATTN_NAME:
        record.note_text = (f"its config's attention implementation stayed {impl!r} "
                            "(submodel refused set_attn_implementation)")
    else:
        record.original = before
        record.extra["impl"] = ATTN_NAME
        record.routed = True
    return record
