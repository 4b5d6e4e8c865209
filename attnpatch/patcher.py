"""``patch()``: route every attention of a pipeline or model through attnpatch; exact undo.

What gets patched, per target:

- diffusers attention modules (anything with ``processor``/``set_processor``): a routed copy of
  the processor (:mod:`attnpatch.processors`); the original object is put back on unpatch;
- modules computing attention in their own methods: their routed class (swapped back);
- transformers models (``PreTrainedModel``): the ``attnpatch`` AttentionInterface function and
  mask function (:mod:`attnpatch.integrations.transformers`); every config's previous
  implementation is put back on unpatch, the registration when the last patch lets go;
- each diffusers model holding patched modules: a forward pre/post hook publishing the token
  layout (:func:`attnpatch.current_token_layout`), and the hooks the modules' backends ask for
  (:meth:`attnpatch.Backend.denoiser_hooks`);
- the target and each component model: instance methods ``set_attention_backend`` /
  ``reset_attention_backend`` (removed again on unpatch).

Each of these is a site (:mod:`attnpatch._sites`): apply/restore, stored on the object it
changes (attributes named ``_attnpatch_*``, all removed on unpatch) and counted per patch that
holds it, never in module globals (the transformers registration is a site on that module's
holder). Patching an already patched module reuses its sites, so ``patch`` is idempotent and
``patch(pipe)`` + ``patch(pipe.unet)`` compose. A :class:`PatchHandle` holds its sites in the
order it acquired them and releases them in reverse; a patch that fails half-way releases the
ones it acquired the same way.
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
from ._record import RECORD_KEY, ModuleRecord, PatchReport
from ._sites import MISSING, ForwardHooks, Site, acquire, held, release
from .integrations import diffusers as dif
from .integrations import modules as mods
from .integrations import transformers as tf

__all__ = ["patch", "unpatch", "set_attention_backend", "PatchHandle"]

logger = logging.getLogger(__name__)

_METHODS = ("set_attention_backend", "reset_attention_backend")
BackendSpec = Union[str, tuple, dict, None]


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


def _denoiser_scope(target, backend: BackendSpec, options: dict) -> tuple[BackendSpec, dict]:
    """``(backend, options)`` for a pipeline whose one named backend is ``denoiser_only``: a
    dict giving it, with the options, to the denoiser components (the rest get ``auto``, no
    options); otherwise both unchanged."""
    if not dif.is_pipeline(target) or (isinstance(backend, dict) and "backend" not in backend):
        return backend, options
    name, opts = backend, dict(options)
    if isinstance(backend, tuple) and len(backend) == 2 and isinstance(backend[1], dict):
        name, opts = backend[0], {**options, **backend[1]}
    elif isinstance(backend, dict):
        rest = dict(backend)
        name = rest.pop("backend")
        opts = {**options, **rest}
    if not isinstance(name, str) or name.lower() == "auto":
        return backend, options
    if not registry.get_backend(_canonical(name)).denoiser_only:
        return backend, options
    from .pipelines import denoiser_components

    names = [n for n, _ in denoiser_components(target)]
    if not names:
        return backend, options
    logger.info("attnpatch: %s runs on the denoiser (%s); text encoders and VAE stay on auto",
                name, ", ".join(names))
    return {n: (name, opts) for n in names}, {}


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


# --- the sites patch() acquires, besides records and the integrations' own --------------------

class _ProcessorRecord(ModuleRecord):
    """A diffusers attention module, routed by a copy of its processor; restore puts the
    original processor object back (unless someone replaced ours meanwhile)."""

    __slots__ = ()

    def __init__(self, name: str, module: torch.nn.Module):
        super().__init__(name, "diffusers", module, type(module.processor).__name__)

    def apply(self) -> None:
        dif.patch_module(self)

    def restore(self) -> None:
        dif.restore_module(self)


class _ClassRecord(ModuleRecord):
    """A module that computes attention in its own methods, routed by swapping its class for
    the routed subclass; restore swaps the original class back."""

    __slots__ = ()

    def __init__(self, name: str, module: torch.nn.Module):
        super().__init__(name, "module", module, "forward")

    def apply(self) -> None:
        mods.patch_module(self)

    def restore(self) -> None:
        mods.restore_module(self)


def _hand_record(name: str, module: torch.nn.Module) -> ModuleRecord:
    record = ModuleRecord(name, "module", module, "hand-written")
    record.note_text = (f"computes softmax attention by hand in "
                        f"{mods.hand_written_attention(module)} (no SDPA call to redirect): not "
                        "routed, runs as before")
    return record


#: discovery kind -> the record of one such module
_RECORDS: dict[str, Callable[[str, torch.nn.Module], ModuleRecord]] = {
    "diffusers": _ProcessorRecord, "module": _ClassRecord, "hand": _hand_record}


class _Request(Site):
    """One patch's backend for one record (its ``default`` and ``patch_default``); private to
    that patch. Released before the record (it is acquired after it), it puts back what the
    record had before while another patch still holds the record; otherwise the record keeps
    it, so that the report of an undone patch still says what was requested."""

    def __init__(self, record: ModuleRecord, default: Optional[tuple[str, dict]]):
        super().__init__(record)
        self.default = default
        self.saved: tuple = (None, None)

    def apply(self) -> None:
        record = self.obj
        self.saved = (record.default, record.patch_default)
        record.default = record.patch_default = self.default

    def update(self, default: Optional[tuple[str, dict]]) -> None:
        """The same patch asks again (``patch`` called again on its target)."""
        self.default = self.obj.default = self.obj.patch_default = default

    def restore(self) -> None:
        record = self.obj
        if record.refs > 1:
            record.default, record.patch_default = self.saved


class _Methods(Site):
    """``set_attention_backend``/``reset_attention_backend`` bound to one pipeline or model
    (instance attributes; whatever the instance had under those names comes back)."""

    KEY = "_attnpatch_methods"

    def apply(self) -> None:
        slots = vars(self.obj)
        self.saved = {n: slots.get(n, MISSING) for n in _METHODS}
        slots["set_attention_backend"] = types.MethodType(_obj_set_backend, self.obj)
        slots["reset_attention_backend"] = types.MethodType(_obj_reset_backend, self.obj)

    def restore(self) -> None:
        slots = vars(self.obj)
        for n, value in self.saved.items():
            if value is MISSING:
                slots.pop(n, None)
            else:
                slots[n] = value


class _Target(Site):
    """The :class:`PatchHandle` of the object that was passed to :func:`patch` (being stored
    there is the whole change)."""

    KEY = "_attnpatch_handle"

    def __init__(self, target, handle: "PatchHandle"):
        super().__init__(target)
        self.handle = handle


def _same(a: Any, b: Any) -> bool:
    """Equal option values (dataclass equality; values without a truth value, such as
    tensors, compare by identity)."""
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:
        return False


def _make_hooks(backend: registry.Backend, model: torch.nn.Module, options: Any) -> ForwardHooks:
    """``backend.denoiser_hooks(model, options)`` as a (not yet applied) :class:`ForwardHooks`."""
    label = f"{backend.name!r}"
    try:
        hooks = list(backend.denoiser_hooks(model, options))
    except Exception as err:
        raise AttnPatchError(f"backend {label}: denoiser_hooks() failed for "
                             f"{type(model).__name__}: {type(err).__name__}: {err}") from err
    for hook in hooks:
        pre, post = getattr(hook, "pre", None), getattr(hook, "post", None)
        if (pre is None and post is None) or not all(f is None or callable(f)
                                                     for f in (pre, post)):
            raise AttnPatchError(f"backend {label}: denoiser_hooks() returned {hook!r}, which "
                                 "has no callable pre(module, args, kwargs) or post(module, "
                                 "args, kwargs, output)")
        path = getattr(hook, "path", "")
        try:
            model.get_submodule(path or "")
        except (AttributeError, TypeError):
            raise AttnPatchError(f"backend {label}: denoiser_hooks() returned {hook!r}, whose "
                                 f"path {path!r} is not a submodule of {type(model).__name__}"
                                 ) from None
    return ForwardHooks(model, hooks, backend.name)


class _BackendHooks(Site):
    """The hooks backends ask for on one diffusers model (:meth:`Backend.denoiser_hooks`):
    those of every backend that a routed attention module inside the model is set to.

    Held by each patch that found the model; :meth:`sync` follows the modules' backends after
    every change of them (patch, ``set_backend``, ``set_attention_backend``, reset, and the
    unpatch of another patch), and restore removes them all. Hook sets a backend gave once are
    kept while the site lives, so putting a backend back never asks it again (an unpatch never
    fails on a backend that refuses). Records of the model's modules point here
    (``model_hooks``), so a change made through a part of the model finds it; records a patch
    of a part of the model makes later are seen at the model's next sync."""

    KEY = "_attnpatch_backend_hooks"

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.installed: dict[str, ForwardHooks] = {}
        self.built: list[tuple[str, Any, ForwardHooks]] = []

    def restore(self) -> None:
        for hooks in reversed(list(self.installed.values())):
            release(hooks)
        self.installed = {}
        self.built = []

    def _records(self) -> Iterator[ModuleRecord]:
        for module in self.obj.modules():
            record = vars(module).get(RECORD_KEY)
            if record is not None and record.routed and not record.replaced():
                yield record

    def _wanted(self, default_of: Callable[[ModuleRecord], Any]) -> dict[str, tuple]:
        """backend name -> (backend, options) for the backends with hooks the records name."""
        wanted: dict[str, tuple] = {}
        for record in self._records():
            spec = default_of(record)
            if spec is None or spec[0] == "auto":
                continue
            name, opts = spec
            try:
                backend = registry.get_backend(name)
            except AttnPatchError:  # unregistered since: it asks for nothing now
                continue
            if type(backend).denoiser_hooks is registry.Backend.denoiser_hooks:
                continue
            options = registry.option_values(backend, opts)
            if name not in wanted:
                wanted[name] = (backend, options)
            elif not _same(wanted[name][1], options):
                raise AttnPatchError(
                    f"backend {name!r} is set with different options on attention modules of "
                    f"one {type(self.obj).__name__} ({wanted[name][1]} and {options}); its "
                    "denoiser hooks take one set of options per model: give every module of "
                    "the model the same options")
        return wanted

    def _hooks(self, name: str, backend: registry.Backend, options: Any) -> ForwardHooks:
        for built_name, built_options, hooks in self.built:
            if built_name == name and _same(built_options, options):
                return hooks
        hooks = _make_hooks(backend, self.obj, options)
        self.built.append((name, options, hooks))
        return hooks

    def prepare(self, default_of: Callable[[ModuleRecord], Any]) -> None:
        """Ask the backends for the hooks that the backends given by ``default_of`` need.
        Raises :class:`AttnPatchError` (naming the backend) with nothing installed."""
        for name, (backend, options) in self._wanted(default_of).items():
            self._hooks(name, backend, options)

    def sync(self) -> None:
        """Install the hooks the modules' current backends need; remove the others."""
        for record in self._records():
            record.model_hooks = self
        wanted = {name: self._hooks(name, backend, options)
                  for name, (backend, options) in self._wanted(_current_default).items()}
        for name, hooks in list(self.installed.items()):
            if wanted.get(name) is not hooks:
                release(hooks)
                del self.installed[name]
        for name, hooks in wanted.items():
            if name not in self.installed:
                self.installed[name] = acquire(self.obj, None, lambda hooks=hooks: hooks)

    def __repr__(self) -> str:
        return (f"<backend hooks on {type(self.obj).__name__}: "
                f"{', '.join(self.installed) or 'none'}>")


def _current_default(record: ModuleRecord):
    return record.default


def _linked(records) -> list[_BackendHooks]:
    """The live backend-hooks sites of the models holding ``records``' modules."""
    found: dict[int, _BackendHooks] = {}
    for record in records:
        hooks = record.model_hooks
        if hooks is not None and hooks.refs > 0:
            found.setdefault(id(hooks), hooks)
    return list(found.values())


def _change_defaults(changes: dict) -> None:
    """Set each record's ``default`` (record -> (name, options) or None), with the hooks the
    new backends ask for; raises with nothing changed when a backend refuses."""
    linked = _linked(changes)
    for hooks in linked:
        hooks.prepare(lambda r: changes.get(r, r.default))
    for record, default in changes.items():
        record.default = default
    for hooks in linked:
        hooks.sync()


def _holding(model: torch.nn.Module, modules: set[int]) -> bool:
    return any(id(m) in modules for m in model.modules())


# --- the handle -------------------------------------------------------------------------------

class PatchHandle:
    """What :func:`patch` did to one target; undo it with :meth:`unpatch` (or a ``with`` block).

    ``report()`` lists every attention module: the backend that ran last, calls, fallbacks and
    their reasons, and modules that could not be routed with the reason. ``sites`` lists every
    change the patch holds, in the order it made them; ``unpatch()`` releases them in reverse.
    """

    def __init__(self, target, implicit: bool = False):
        self.target = target
        self.implicit = implicit
        self.active = True
        self._sites: list[Site] = []
        self._held: set[Site] = set()
        self._records: list[ModuleRecord] = []
        self._requests: dict[ModuleRecord, _Request] = {}

    # -- public --
    def report(self) -> PatchReport:
        """One :class:`~attnpatch.ModuleReport` per attention module; prints as a table."""
        return PatchReport(r.report() for r in self._records)

    @property
    def records(self) -> list[ModuleRecord]:
        return list(self._records)

    @property
    def sites(self) -> tuple[Site, ...]:
        """Every change this patch holds (records, processors, configs, registrations, hooks,
        methods), in the order it made them."""
        return tuple(self._sites)

    def set_backend(self, backend: BackendSpec, **options) -> "PatchHandle":
        """Switch the patched modules to ``backend`` (a name, alias, diffusers name, or a dict of
        pattern -> backend); ``reset_backend`` goes back to what ``patch`` set. The hooks
        backends ask for on the patched diffusers models follow (:meth:`Backend.denoiser_hooks`);
        a backend that refuses them fails the switch, with nothing changed."""
        self._check_active()
        _set_defaults([(r.name, r) for r in self._records],
                      *_denoiser_scope(self.target, backend, options))
        return self

    set_attention_backend = set_backend

    def reset_backend(self) -> None:
        """Back to the backends ``patch`` set (with their hooks)."""
        self._check_active()
        _change_defaults({r: r.patch_default for r in self._records})

    def unpatch(self) -> None:
        """Restore everything ``patch`` changed: processors (the original objects), transformers
        implementations and registrations, hooks and methods, releasing its sites in reverse.
        Idempotent."""
        if not self.active:
            return
        self.active = False
        linked = _linked(self._records)
        for site in reversed(self._sites):
            release(site)
        self._sites, self._held, self._requests = [], set(), {}
        for hooks in linked:  # models another patch holds: their modules' backends changed
            if hooks.refs > 0:
                try:
                    hooks.sync()
                except AttnPatchError as err:
                    logger.warning("attnpatch: unpatch could not update the backend hooks on "
                                   "%s: %s", type(hooks.obj).__name__, err)

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

    def _take(self, obj, key: Optional[str], factory: Callable[[], Site]) -> Site:
        """Hold the site under ``key`` on ``obj`` (once per handle; a stale one is replaced)."""
        if key is not None:
            site = held(obj, key)
            if site is not None and site in self._held and not site.stale():
                return site
        site = acquire(obj, key, factory)
        if site not in self._held:
            self._held.add(site)
            self._sites.append(site)
        return site

    def _let_go(self, site: Site) -> None:
        self._sites.remove(site)
        self._held.discard(site)
        release(site)

    def _apply(self, target, found: _Found, selected: list, plan) -> None:
        """Acquire every site the patch needs; anything raising releases the ones acquired
        here, in reverse. Then (nothing below raises) the backend requests and hooks."""
        mark = len(self._sites)
        try:
            if not self._sites:
                self._take(target, _Target.KEY, lambda: _Target(target, self))
            taken = self._take_records(found, selected)
            after = self._merged(taken)
            if not any(r.routed for r in after):
                notes = "; ".join(f"{r.name}: {r.note_text}" for r in after[:6])
                raise AttnPatchError(f"none of the {len(after)} attention modules of "
                                     f"{type(target).__name__} can be routed through "
                                     f"attnpatch: {notes}")
            mine = self._take_models(target, found, after)
            defaults = {r: plan(name) for name, r in taken}
            linked = list({id(h): h for h in [*mine, *_linked(r for _, r in taken)]}.values())
            for hooks in linked:
                hooks.prepare(lambda r: defaults.get(r, r.default))
        except BaseException:
            for site in reversed(self._sites[mark:]):
                self._held.discard(site)
                release(site)
            del self._sites[mark:]
            raise
        kept = set(after)
        for record in self._records:
            if record not in kept:  # a stale record of this handle, replaced by a new one
                request = self._requests.pop(record, None)
                if request is not None:
                    self._let_go(request)
                self._let_go(record)
        self._records = after
        for _, record in taken:
            request = self._requests.get(record)
            if request is None:
                self._requests[record] = self._take(
                    record, None, lambda: _Request(record, defaults[record]))
            else:
                request.update(defaults[record])
        for hooks in linked:
            hooks.sync()

    def _take_records(self, found: _Found, selected: list) -> list[tuple[str, ModuleRecord]]:
        """(name, record) of every selected module, held (a record routes its module)."""
        taken = []
        for name, module, kind in selected:
            make = _RECORDS.get(kind)  # transformers modules: per model, below
            if make is not None:
                taken.append((name, self._take(module, RECORD_KEY, lambda: make(name, module))))
        selected_ids = {id(m) for _, m, _ in selected}
        groups: dict[int, list] = {}
        for name, module, kind in selected:
            if kind == "transformers":
                groups.setdefault(id(found.owner[id(module)][1]), []).append((name, module))
        for _, model in found.tf_models:
            members = groups.get(id(model))
            if not members:
                continue
            why_not = tf.cannot_switch(model)
            site = None
            if why_not is None:
                self._take(tf.REGISTRY, tf.Registration.KEY, tf.Registration)
                excluded = [m for m in found.tf_all.get(id(model), [])
                            if id(m) not in selected_ids]
                site = self._take(model, tf.ImplementationSite.KEY,
                                  lambda: tf.ImplementationSite(model, excluded))
            for name, module in members:
                taken.append((name, self._take(
                    module, RECORD_KEY, lambda: tf.module_record(name, module, site, why_not))))
        return taken

    def _merged(self, taken: list[tuple[str, ModuleRecord]]) -> list[ModuleRecord]:
        """This handle's records once ``taken`` are in: a record taken for a module replaces
        the one held for it (in place); new ones come last."""
        by_module = {id(r.module): r for _, r in taken}
        merged = [by_module.pop(id(r.module), r) for r in self._records]
        return merged + list(by_module.values())

    def _take_models(self, target, found: _Found, records: list) -> list[_BackendHooks]:
        """Layout and backend hooks on the diffusers models holding routed modules; the
        backend methods on the target and the component models. Returns the hooks sites."""
        routed = {id(r.module) for r in records if r.routed}
        hooks = []
        for _, model in found.denoisers:
            if _holding(model, routed):
                self._take(model, dif.LayoutHooks.KEY, lambda: dif.LayoutHooks(model))
                hooks.append(self._take(model, _BackendHooks.KEY, lambda: _BackendHooks(model)))
        holders = [target] + [m for _, m in found.models if _holding(m, routed)]
        for obj in holders:
            self._take(obj, _Methods.KEY, lambda: _Methods(obj))
        return hooks


def _handle_of(target) -> Optional[PatchHandle]:
    site = getattr(target, "__dict__", {}).get(_Target.KEY)
    return site.handle if site is not None and site.handle.active else None


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
    ``$ATTNPATCH_BACKEND`` (plain ``"auto"`` leaves the environment variable in charge). Each
    diffusers model holding routed modules also gets the hooks their backends ask for
    (:meth:`Backend.denoiser_hooks`). Raises :class:`AttnPatchError` when the target has no
    attention module, a pattern matches nothing, a backend name is unknown, no module can be
    routed, or a backend refuses its hooks; then nothing is left changed.
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
    plan = _backend_plan(*_denoiser_scope(target, backend, options),
                         [n for n, _, _ in selected])
    handle = _handle_of(target) or PatchHandle(target, implicit)
    handle._apply(target, found, selected, plan)
    skipped = [r for r in handle._records if not r.routed]
    if skipped:
        logger.warning("attnpatch: %d attention module(s) not routed: %s", len(skipped),
                       "; ".join(f"{r.name}: {r.note_text}" for r in skipped[:4]))
    return handle


def unpatch(target) -> None:
    """Undo :func:`patch` on ``target`` (the object that was passed to it)."""
    handle = _handle_of(target)
    if handle is None:
        held_here = [n for n, m in _walk(target) if RECORD_KEY in vars(m)] \
            if (dif.is_pipeline(target) or isinstance(target, torch.nn.Module)) else []
        if held_here:
            raise AttnPatchError(f"{type(target).__name__} was patched as part of a larger "
                                 f"target (e.g. its pipeline): unpatch that one")
        raise AttnPatchError(f"{type(target).__name__} is not patched")
    handle.unpatch()


def _patched_under(obj) -> list[tuple[str, ModuleRecord]]:
    out = []
    for name, module in _walk(obj):
        r = vars(module).get(RECORD_KEY)
        if r is not None and r.routed:
            out.append((name, r))
    return out


def _set_defaults(named: list[tuple[str, ModuleRecord]], backend: BackendSpec,
                  options: dict) -> None:
    plan = _backend_plan(backend, options, [n for n, _ in named])
    _change_defaults({r: plan(name) for name, r in named})


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
    backend name (or diffusers' names), with options, or a dict of pattern -> backend. The
    backends' hooks on the diffusers models follow (:meth:`Backend.denoiser_hooks`)."""
    named = _patched_under(obj)
    if not named:
        raise AttnPatchError(f"no attnpatch-patched attention module left in "
                             f"{type(obj).__name__}")
    _set_defaults(named, *_denoiser_scope(obj, backend, options))


def _obj_reset_backend(obj) -> None:
    """Installed as ``reset_attention_backend``: back to what ``patch`` set; if the patch came
    from ``attnpatch.set_attention_backend`` (no explicit ``patch``), undo it entirely."""
    handle = _handle_of(obj)
    if handle is not None and handle.implicit:
        handle.unpatch()
        return
    _change_defaults({r: r.patch_default for _, r in _patched_under(obj)})
