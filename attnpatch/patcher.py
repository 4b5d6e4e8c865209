"""``patch()``: route every attention of a pipeline or model through attnpatch; exact undo.

What gets patched, per target:

- diffusers attention modules (anything with ``processor``/``set_processor``): a routed copy of
  the processor (:mod:`attnpatch.processors`); the original object is put back on unpatch;
- transformers models (``PreTrainedModel``): the ``attnpatch`` AttentionInterface function and
  mask function (:mod:`attnpatch.integrations.transformers`); every config's previous
  implementation is put back on unpatch;
- each diffusers model holding patched modules: a forward pre/post hook publishing the token
  layout (:func:`attnpatch.current_token_layout`);
- the target and each component model: instance methods ``set_attention_backend`` /
  ``reset_attention_backend`` (removed again on unpatch).

State lives on the patched objects (attributes named ``_attnpatch_*``, all removed on unpatch),
never in module globals. Patching an already patched module reuses its state (reference
counted), so ``patch`` is idempotent and ``patch(pipe)`` + ``patch(pipe.unet)`` compose.
"""

from __future__ import annotations

import fnmatch
import logging
import types
from collections import Counter
from typing import Any, Callable, Iterator, Optional, Union

import torch

from . import registry
from ._errors import AttnPatchError
from ._record import ModuleRecord, PatchReport
from .integrations import diffusers as dif
from .integrations import modules as mods
from .integrations import transformers as tf

__all__ = ["patch", "unpatch", "set_attention_backend", "PatchHandle"]

logger = logging.getLogger(__name__)

_MISSING = object()
_METHODS = ("set_attention_backend", "reset_attention_backend")
BackendSpec = Union[str, tuple, dict, None]

#: record kind -> (install, restore) for the changes made per module: a routed diffusers
#: processor, or a module's routed class (attention computed in its own methods)
_SWAPS = {"diffusers": (dif.patch_module, dif.restore_module),
          "module": (mods.patch_module, mods.restore_module)}


# --- discovery --------------------------------------------------------------------------------

class _Found:
    def __init__(self):
        self.attention: list[tuple[str, torch.nn.Module, str]] = []   # (name, module, kind)
        self.owner: dict[int, tuple[str, Any]] = {}   # id(tf attention module) -> (name, model)
        self.tf_models: list[tuple[str, Any]] = []
        self.denoisers: list[tuple[str, Any]] = []
        self.models: list[tuple[str, Any]] = []       # component models (get the methods)
        self.tf_all: dict[int, list] = {}                 # id(model) -> its attention modules
        self.summary: list[str] = []
        self.module_types: Counter = Counter()


def _roots(target) -> list[tuple[str, torch.nn.Module]]:
    if dif.is_pipeline(target):
        roots = []
        for name, comp in dif.pipeline_components(target):
            if isinstance(comp, torch.nn.Module):
                roots.append((name, comp))
        return roots
    if isinstance(target, torch.nn.Module):
        return [("", target)]
    raise AttnPatchError(f"patch() takes a diffusers DiffusionPipeline, a diffusers model, a "
                         f"transformers model or any torch.nn.Module; got "
                         f"{type(target).__module__}.{type(target).__name__}")


def _walk(target) -> Iterator[tuple[str, torch.nn.Module]]:
    seen = set()
    for prefix, root in _roots(target):
        for name, module in root.named_modules(prefix=prefix):
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield name, module


def _inside(name: str, tops: list[str]) -> Optional[str]:
    for top in tops:
        if top == "" or name == top or name.startswith(top + "."):
            return top
    return None


def _discover(target) -> _Found:
    found = _Found()
    tf_tops: dict[str, Any] = {}
    dif_tops: dict[str, Any] = {}
    tf_all: dict[int, list] = {}
    processors: set[int] = set()  # nn.Module processors: routed with their attention module
    for name, module in _walk(target):
        found.module_types[type(module).__name__] += 1
        if id(module) in processors:
            continue
        if tf.is_pretrained_model(module) and _inside(name, list(tf_tops)) is None:
            tf_tops[name] = module
        if dif.is_model_mixin(module) and _inside(name, list(dif_tops)) is None:
            dif_tops[name] = module
        if dif.is_attention_module(module):
            found.attention.append((name, module, "diffusers"))
            processors.add(id(module.processor))
        elif tf.is_attention_module(module):
            top = _inside(name, list(tf_tops))
            if top is None:
                continue  # a transformers attention class outside any PreTrainedModel
            found.attention.append((name, module, "transformers"))
            found.owner[id(module)] = (top, tf_tops[top])
            tf_all.setdefault(id(tf_tops[top]), []).append(module)
        elif mods.routes_forward(module):
            found.attention.append((name, module, "module"))
        elif mods.hand_written_attention(module) is not None:
            found.attention.append((name, module, "hand"))
    found.tf_models = list(tf_tops.items())
    found.denoisers = list(dif_tops.items())
    found.tf_all = tf_all
    tops = {**dif_tops, **tf_tops}
    found.models = [(n, m) for n, m in tops.items() if n != ""]
    if dif.is_pipeline(target):
        counts = Counter()
        for name, module, _ in found.attention:
            counts[name.split(".", 1)[0]] += 1
        for name, comp in dif.pipeline_components(target):
            what = type(comp).__name__ if comp is not None else "None"
            if isinstance(comp, torch.nn.Module):
                found.summary.append(f"{name} ({what}: {counts.get(name, 0)} attention modules)")
            else:
                found.summary.append(f"{name} ({what}, not a torch module)")
    return found


def _nothing_found(target, found: _Found) -> str:
    kind = type(target).__name__
    if found.summary:
        what = "components: " + ", ".join(found.summary)
    else:
        common = ", ".join(f"{n} x{c}" for n, c in found.module_types.most_common(12))
        what = f"{sum(found.module_types.values())} modules: {common or 'none'}"
    return (f"no attention modules found in {kind} (diffusers attention modules have a "
            f"`processor`; transformers ones look their function up in ALL_ATTENTION_FUNCTIONS; "
            f"other modules call F.scaled_dot_product_attention, nn.MultiheadAttention or "
            f"softmax(q @ k^T) in their own methods); found {what}")


# --- selection --------------------------------------------------------------------------------

def _patterns(value, arg: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    try:
        pats = list(value)
    except TypeError:
        raise AttnPatchError(f"{arg} must be a glob pattern or a list of them, got "
                             f"{type(value).__name__}") from None
    for p in pats:
        if not isinstance(p, str):
            raise AttnPatchError(f"{arg} patterns must be strings, got {p!r}")
    return pats


def _match(name: str, pattern: str) -> bool:
    """Glob over module names; a pattern naming a container also matches everything in it."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def _some_names(names: list[str], n: int = 8) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    more = f" ... ({len(names)} in all)" if len(names) > n else ""
    return shown + more


def _select(attention: list, include: list[str], exclude: list[str]) -> list:
    names = [n for n, _, _ in attention]
    for arg, pats in (("include", include), ("exclude", exclude)):
        for pat in pats:
            if not any(_match(n, pat) for n in names):
                raise AttnPatchError(f"{arg} pattern {pat!r} matches no attention module; "
                                     f"attention modules are named like {_some_names(names)}")
    selected = [a for a in attention
                if (not include or any(_match(a[0], p) for p in include))
                and not any(_match(a[0], p) for p in exclude)]
    if not selected:
        raise AttnPatchError(f"include={include!r} / exclude={exclude!r} leave no attention module "
                             f"to patch (out of {_some_names(names)})")
    return selected


# --- backends ---------------------------------------------------------------------------------

def _canonical(name: Any) -> str:
    if not isinstance(name, str):
        raise AttnPatchError(f"backend must be a name (str), a (name, options) tuple or a dict "
                             f"of pattern -> backend; got {type(name).__name__}")
    try:
        return registry.canonical_name(name.lower())
    except AttnPatchError as err:
        if name.lower() in dif.diffusers_backend_names():
            raise AttnPatchError(f"{err}. {name!r} is a diffusers backend that attnpatch does "
                                 "not implement: register an attnpatch backend for it, or "
                                 "unpatch and use diffusers' own set_attention_backend") from None
        raise


def _spec(value: Any, options: dict) -> Optional[tuple[str, dict]]:
    """(canonical name, options) for one backend request; None for plain ``auto``."""
    opts = dict(options)
    if isinstance(value, tuple):
        if len(value) != 2 or not isinstance(value[1], dict):
            raise AttnPatchError(f"a backend tuple is (name, options dict), got {value!r}")
        value, extra = value
        opts.update(extra)
    elif isinstance(value, dict):
        value = dict(value)
        if "backend" not in value:
            raise AttnPatchError(f"a backend dict needs a 'backend' key, got {value!r}")
        name = value.pop("backend")
        opts.update(value)
        value = name
    name = _canonical(value)
    registry.check_options(name, opts)  # names and values, before anything is changed
    if name == "auto" and not opts:
        return None
    return (name, opts)


def _backend_plan(backend: BackendSpec, options: dict, names: list[str]
                  ) -> Callable[[str], Optional[tuple[str, dict]]]:
    """name -> default for each module; validates every name and option up front."""
    if isinstance(backend, dict) and "backend" not in backend:
        entries = [(pattern, _spec(value, options)) for pattern, value in backend.items()]
        for pattern, _ in entries:
            if not isinstance(pattern, str):
                raise AttnPatchError(f"backend dict keys are glob patterns, got {pattern!r}")
            if not any(_match(n, pattern) for n in names):
                raise AttnPatchError(f"backend pattern {pattern!r} matches no patched attention "
                                     f"module; they are named like {_some_names(names)}")
        fallback = _spec("auto", options)

        def plan(name: str):
            for pattern, spec in entries:
                if _match(name, pattern):
                    return spec
            return fallback
        return plan
    spec = _spec("auto" if backend is None else backend, options)
    return lambda name: spec


# --- shared per-object state (reference counted) ----------------------------------------------

class _MethodSite:
    """``set_attention_backend``/``reset_attention_backend`` bound to one pipeline or model."""

    def __init__(self, obj):
        self.obj = obj
        self.refs = 0
        self.saved = {n: obj.__dict__.get(n, _MISSING) for n in _METHODS}
        obj.__dict__["set_attention_backend"] = types.MethodType(_obj_set_backend, obj)
        obj.__dict__["reset_attention_backend"] = types.MethodType(_obj_reset_backend, obj)

    def restore(self) -> None:
        for n, value in self.saved.items():
            if value is _MISSING:
                self.obj.__dict__.pop(n, None)
            else:
                self.obj.__dict__[n] = value


def _acquire_site(obj, attr: str, make: Callable[[], Any]):
    site = obj.__dict__.get(attr)
    if site is None:
        site = make()
        obj.__dict__[attr] = site
    site.refs += 1
    return site


def _release_site(obj, attr: str, site, restore: Callable[[Any], None]) -> None:
    site.refs -= 1
    if site.refs <= 0:
        restore(site)
        if obj.__dict__.get(attr) is site:
            del obj.__dict__[attr]


# --- the handle -------------------------------------------------------------------------------

class PatchHandle:
    """What :func:`patch` did to one target; undo it with :meth:`unpatch` (or a ``with`` block).

    ``report()`` lists every attention module: the backend that ran last, calls, fallbacks and
    their reasons, and modules that could not be routed with the reason.
    """

    def __init__(self, target, implicit: bool = False):
        self.target = target
        self.implicit = implicit
        self.active = True
        self._records: list[ModuleRecord] = []
        self._swapped: list[ModuleRecord] = []  # diffusers processors and module classes
        self._tf_sites: list = []
        self._hook_sites: list = []
        self._method_sites: list = []
        self._changed: list[tuple[ModuleRecord, Any, Any]] = []

    # -- public --
    def report(self) -> PatchReport:
        """One :class:`~attnpatch.ModuleReport` per attention module; prints as a table."""
        return PatchReport(r.report() for r in self._records)

    @property
    def records(self) -> list[ModuleRecord]:
        return list(self._records)

    def set_backend(self, backend: BackendSpec, **options) -> "PatchHandle":
        """Switch the patched modules to ``backend`` (a name, alias, diffusers name, or a dict of
        pattern -> backend); ``reset_backend`` goes back to what ``patch`` set."""
        self._check_active()
        _set_defaults([(r.name, r) for r in self._records], backend, options)
        return self

    set_attention_backend = set_backend

    def reset_backend(self) -> None:
        self._check_active()
        for r in self._records:
            r.default = r.patch_default

    def unpatch(self) -> None:
        """Restore everything ``patch`` changed: processors (the original objects), transformers
        implementations, hooks and methods. Idempotent."""
        if not self.active:
            return
        self.active = False
        for obj, site in reversed(self._method_sites):
            _release_site(obj, "_attnpatch_methods", site, _MethodSite.restore)
        for model, site in reversed(self._hook_sites):
            _release_site(model, "_attnpatch_layout", site, dif.LayoutHooks.remove)
        for model, site in reversed(self._tf_sites):
            _release_site(model, "_attnpatch_tf_site", site, tf.TransformersSite.restore)
        for r in reversed(self._swapped):
            r.refs -= 1
            if r.refs <= 0:
                _SWAPS[r.kind][1](r)
                if r.module.__dict__.get("_attnpatch_record") is r:
                    del r.module.__dict__["_attnpatch_record"]
        for r, default, patch_default in self._changed:  # shared records: what they had before
            if r.refs > 0:
                r.default, r.patch_default = default, patch_default
        self._method_sites, self._hook_sites, self._tf_sites = [], [], []
        if getattr(self.target, "__dict__", {}).get("_attnpatch_handle") is self:
            _set_handle(self.target, None)

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        routed = sum(1 for r in self._records if r.routed)
        state = "active" if self.active else "unpatched"
        return (f"<attnpatch.PatchHandle {type(self.target).__name__}: {routed}/"
                f"{len(self._records)} attention modules routed, {state}>")

    # -- internals --
    def _check_active(self) -> None:
        if not self.active:
            raise AttnPatchError("this patch was undone (unpatch()); patch the target again")

    def _hold(self, r: ModuleRecord, default) -> None:
        if r in self._records:
            r.default = r.patch_default = default
            return
        if r.refs > 0:
            self._changed.append((r, r.default, r.patch_default))
        r.default = r.patch_default = default
        self._records.append(r)

    def _apply(self, target, found: _Found, selected: list, plan) -> None:
        selected_ids = {id(m) for _, m, _ in selected}
        # diffusers attention modules
        mine = {id(r.module): r for r in self._swapped}
        for name, module, kind in selected:
            if kind == "hand":
                r = ModuleRecord(name, "module", module, "hand-written")
                where = mods.hand_written_attention(module)
                r.note_text = (f"computes softmax attention by hand in {where} (no SDPA call "
                               "to redirect): not routed, runs as before")
                self._hold(r, plan(name))
                continue
            if kind not in _SWAPS:
                continue
            r = module.__dict__.get("_attnpatch_record")
            if r is None or r.replaced() or not r.routed:
                what = type(module.processor).__name__ if kind == "diffusers" else "forward"
                r = ModuleRecord(name, kind, module, what)
                _SWAPS[kind][0](r)
                if r.routed:
                    module.__dict__["_attnpatch_record"] = r
                stale = mine.get(id(module))
                if stale is not None:  # re-patch of a module whose processor was swapped out
                    stale.refs -= 1
                    self._swapped.remove(stale)
                    self._records.remove(stale)
            if r not in self._swapped:
                r.refs += 1
                self._swapped.append(r)
            self._hold(r, plan(name))
        # transformers models
        groups: dict[int, list] = {}
        for name, module, kind in selected:
            if kind == "transformers":
                groups.setdefault(id(found.owner[id(module)][1]), []).append((name, module))
        for _, model in found.tf_models:
            members = groups.get(id(model))
            if not members:
                continue
            site = model.__dict__.get("_attnpatch_tf_site")
            if site is None:
                records = [ModuleRecord(n, "transformers", m,
                                        str(getattr(getattr(m, "config", None),
                                                    "_attn_implementation", "?")))
                           for n, m in members]
                excluded = [m for m in found.tf_all.get(id(model), [])
                            if id(m) not in selected_ids]
                site = tf.TransformersSite(model, records, excluded)
                site.apply()
                if not site.applied:  # the model can't switch: report, hold nothing
                    for r in records:
                        self._hold(r, plan(r.name))
                    continue
                model.__dict__["_attnpatch_tf_site"] = site
            if not any(site is s for _, s in self._tf_sites):
                site.refs += 1
                self._tf_sites.append((model, site))
            for n, m in members:
                r = m.__dict__.get("_attnpatch_record")
                if r is None:  # excluded by an earlier patch of this model, included now
                    r = ModuleRecord(n, "transformers", m, site._saved_impl(m.config))
                    m.__dict__.pop("_attnpatch_passthrough", None)
                    if m in site.excluded:
                        site.excluded.remove(m)
                    r.routed = True
                    r.extra["impl"] = tf.ATTN_NAME
                    m.__dict__["_attnpatch_record"] = r
                    site.records.append(r)
                self._hold(r, plan(n))
        # token layout hooks on the diffusers models that hold routed modules
        routed_names = [r.name for r in self._swapped if r.routed]
        for name, model in found.denoisers:
            if any(_inside(n, [name]) is not None for n in routed_names) and not any(
                    model is m for m, _ in self._hook_sites):
                site = _acquire_site(model, "_attnpatch_layout", lambda: dif.LayoutHooks(model))
                self._hook_sites.append((model, site))
        # set_attention_backend / reset_attention_backend
        holders = [target] + [m for n, m in found.models
                              if any(_inside(r.name, [n]) is not None for r in self._records if r.routed)]
        for obj in holders:
            if any(obj is o for o, _ in self._method_sites):
                continue
            site = _acquire_site(obj, "_attnpatch_methods", lambda: _MethodSite(obj))
            self._method_sites.append((obj, site))


def _handle_of(target) -> Optional[PatchHandle]:
    handle = getattr(target, "__dict__", {}).get("_attnpatch_handle")
    return handle if handle is not None and handle.active else None


def _set_handle(target, handle: Optional[PatchHandle]) -> None:
    if handle is None:
        target.__dict__.pop("_attnpatch_handle", None)
    else:
        target.__dict__["_attnpatch_handle"] = handle


# --- public functions -------------------------------------------------------------------------

def patch(target, backend: BackendSpec = "auto", include=None, exclude=None,
          **options: Any) -> PatchHandle:
    """Route every attention in ``target`` through attnpatch; returns a :class:`PatchHandle`.

    ``target``: a diffusers ``DiffusionPipeline`` (all its torch components), a diffusers
    ``ModelMixin``, a transformers ``PreTrainedModel``, or any ``nn.Module`` containing them.
    ``backend``: a backend name or alias (diffusers' names too), ``"auto"``, or a dict of glob
    pattern -> backend (first match wins; unmatched modules use ``auto``); a value may be a
    ``(name, options)`` tuple. ``include``/``exclude``: glob patterns over module names as
    ``named_modules()`` spells them (prefixed with the component name for a pipeline); a pattern
    naming a container matches everything inside it. ``options`` go to the backend.

    The patch-level backend sits below an ``attention_backend(...)`` block and above
    ``$ATTNPATCH_BACKEND`` (plain ``"auto"`` leaves the environment variable in charge).
    Raises :class:`AttnPatchError` when the target has no attention module, a pattern matches
    nothing, a backend name is unknown, or no module can be routed.
    """
    return _patch(target, backend, include, exclude, options, implicit=False)


def _patch(target, backend, include, exclude, options, implicit: bool) -> PatchHandle:
    include = _patterns(include, "include")
    exclude = _patterns(exclude, "exclude")
    found = _discover(target)
    if not found.attention:
        raise AttnPatchError(_nothing_found(target, found))
    selected = _select(found.attention, include, exclude)
    for name, module, kind in selected:  # refused before anything changes
        why = tf.unsupported_reason(module, name) if kind == "transformers" else None
        if why is not None:
            raise AttnPatchError(why)
    plan = _backend_plan(backend, options, [n for n, _, _ in selected])
    handle = _handle_of(target)
    fresh = handle is None
    if fresh:
        handle = PatchHandle(target, implicit)
    try:
        handle._apply(target, found, selected, plan)
    except BaseException:
        if fresh:
            handle.unpatch()
        raise
    if not any(r.routed for r in handle._records):
        notes = "; ".join(f"{r.name}: {r.note_text}" for r in handle._records[:6])
        if fresh:
            handle.unpatch()
        raise AttnPatchError(f"none of the {len(handle._records)} attention modules of "
                             f"{type(target).__name__} can be routed through attnpatch: {notes}")
    if fresh:
        _set_handle(target, handle)
    skipped = [r for r in handle._records if not r.routed]
    if skipped:
        logger.warning("attnpatch: %d attention module(s) not routed: %s", len(skipped),
                       "; ".join(f"{r.name}: {r.note_text}" for r in skipped[:4]))
    return handle


def unpatch(target) -> None:
    """Undo :func:`patch` on ``target`` (the object that was passed to it)."""
    handle = _handle_of(target)
    if handle is None:
        held = [n for n, m in _walk(target) if "_attnpatch_record" in m.__dict__] \
            if (dif.is_pipeline(target) or isinstance(target, torch.nn.Module)) else []
        if held:
            raise AttnPatchError(f"{type(target).__name__} was patched as part of a larger "
                                 f"target (e.g. its pipeline): unpatch that one")
        raise AttnPatchError(f"{type(target).__name__} is not patched")
    handle.unpatch()


def _patched_under(obj) -> list[tuple[str, ModuleRecord]]:
    out = []
    for name, module in _walk(obj):
        r = module.__dict__.get("_attnpatch_record")
        if r is not None:
            out.append((name, r))
    return out


def _set_defaults(named: list[tuple[str, ModuleRecord]], backend: BackendSpec,
                  options: dict) -> None:
    plan = _backend_plan(backend, options, [n for n, _ in named])
    for name, r in named:
        r.default = plan(name)


def set_attention_backend(target, backend: BackendSpec, **options: Any) -> PatchHandle:
    """Use ``backend`` for every attention in ``target``, patching it first if needed.

    On a patched target this switches the backend (``target.reset_attention_backend()`` goes
    back to what ``patch`` set); on an unpatched one it patches, and
    ``target.reset_attention_backend()`` (or ``unpatch``) undoes the patch.
    """
    handle = _handle_of(target)
    if handle is not None:
        return handle.set_backend(backend, **options)
    return _patch(target, backend, None, None, options, implicit=True)


def _obj_set_backend(obj, backend: BackendSpec, **options: Any) -> None:
    """Installed as ``set_attention_backend`` on patched pipelines and models: any attnpatch
    backend name (or diffusers' names), with options, or a dict of pattern -> backend."""
    named = _patched_under(obj)
    if not named:
        raise AttnPatchError(f"no attnpatch-patched attention module left in "
                             f"{type(obj).__name__}")
    _set_defaults(named, backend, options)


def _obj_reset_backend(obj) -> None:
    """Installed as ``reset_attention_backend``: back to what ``patch`` set; if the patch came
    from ``attnpatch.set_attention_backend`` (no explicit ``patch``), undo it entirely."""
    handle = _handle_of(obj)
    if handle is not None and handle.implicit:
        handle.unpatch()
        return
    for _, r in _patched_under(obj):
        r.default = r.patch_default
