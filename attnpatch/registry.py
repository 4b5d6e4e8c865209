"""The backend registry: Backend classes declare what they support; selection explains refusals."""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence, Union

import torch

from . import constraints as C
from ._errors import AttnPatchError, BackendUnavailableError
from .call import MASK_KINDS, AttentionCall

__all__ = ["Backend", "NoOptions", "option_values", "check_options", "Strategy",
           "running_strategies", "register_backend", "get_backend", "canonical_name",
           "priority_list", "all_backends", "Selection", "select", "candidate_reasons"]

logger = logging.getLogger(__name__)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class NoOptions:
    """The options of a backend that takes none."""


NO_OPTIONS = NoOptions()


class Backend:
    """Base class of every attention backend, built-in or third-party.

    Subclasses declare capabilities as class attributes and implement :meth:`forward`. The base
    :meth:`not_supported_reasons` turns the attributes into specific reasons; override it to add
    your own (call ``super()`` first, like xformers' operators do).

    Accuracy is declared too, so that tests generated from the registry hold every backend
    (built-in, strategy, third-party) to it: ``tolerance`` maps each dtype to the largest
    relative error ``||out - ref|| / ||ref||`` (and the same for ``lse`` and the input
    gradients) against :meth:`reference` computed in float64 on the same inputs; ``exact``
    says the result equals that reference up to the rounding of the dtype (as ``math``'s
    does: fp32 accumulation, one rounding of the output), so it is held to the dtype's machine
    epsilon where that is tighter than ``tolerance``.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    #: position in ``auto``'s list (lower is tried first); None keeps the backend out of ``auto``
    priority: ClassVar[Optional[int]] = 500
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    dtypes: ClassVar[tuple[torch.dtype, ...]] = _FLOATS
    max_head_dim: ClassVar[Optional[int]] = None
    min_compute_capability: ClassVar[Optional[tuple[int, int]]] = None
    max_compute_capability: ClassVar[Optional[tuple[int, int]]] = None
    mask_kinds: ClassVar[frozenset[str]] = frozenset(MASK_KINDS)
    supports_causal: ClassVar[bool] = True
    supports_causal_with_mask: ClassVar[bool] = True
    supports_dropout: ClassVar[bool] = True
    supports_gqa: ClassVar[bool] = True
    supports_backward: ClassVar[bool] = True
    supports_lse: ClassVar[bool] = False
    #: the lse it returns carries exact gradients to query and key (else a call with
    #: ``return_lse=True`` whose inputs require grad is refused with a reason)
    lse_has_grad: ClassVar[bool] = False
    #: :meth:`backward` computes the input gradients from (grad_out, out, lse), which may be a
    #: merge's (exact partial merges run every partial's backward this way)
    supports_backward_from_lse: ClassVar[bool] = False
    #: differentiates with respect to a float ``attn_mask`` that requires grad
    supports_mask_grad: ClassVar[bool] = False
    supports_value_head_dim: ClassVar[bool] = True  # value head_dim may differ from query's
    #: computes ``call.softcap`` (``c * tanh(score / c)`` on the scaled scores, before the mask)
    supports_softcap: ClassVar[bool] = False
    #: reads ``call.token_layout`` (which tokens are text, the image grid): the dispatcher then
    #: resolves the layout for every call (eager and compiled), re-selects when it changes, and
    #: replaces ``forward`` with a :meth:`specialize` kernel only if the backend also sets
    #: ``specializes_per_token_layout``
    reads_token_layout: ClassVar[bool] = False
    #: a backend that reads the token layout and whose :meth:`specialize` bakes
    #: ``call.token_layout`` into its kernel (the dispatcher uses that kernel only for calls with
    #: the same layout); without it such a backend is never asked to specialize
    specializes_per_token_layout: ClassVar[bool] = False
    #: ``patch(pipe, backend=name)`` on a pipeline gives this backend to the denoiser
    #: components only, and ``auto`` to the rest (text encoders, VAE): context parallelism,
    #: whose shards only the denoiser's hooks make
    denoiser_only: ClassVar[bool] = False
    #: one attention call spans the processes of a group (context parallelism): every process
    #: runs the same inputs, so the scripts don't split data across processes for it
    spans_processes: ClassVar[bool] = False
    requires_package: ClassVar[Optional[str]] = None
    requires_pip_name: ClassVar[Optional[str]] = None
    #: the options the backend takes: a frozen dataclass whose ``__post_init__`` validates the
    #: values (raise :class:`AttnPatchError` naming the option and the fix). Validated where
    #: the user gives them; the instance's values are part of the selection cache key, and it
    #: reaches ``delegate``/``specialize``/``forward`` as ``call.options`` (``forward`` also
    #: gets the options the user gave as keyword arguments).
    Options: ClassVar[type] = NoOptions
    #: the option names (the fields of ``Options``; set at registration). A backend that
    #: declares only these names gets an ``Options`` of them, unvalidated (default None).
    options: ClassVar[frozenset[str]] = frozenset()
    #: largest relative error (``||out - ref|| / ||ref||``, likewise ``lse`` and the q/k/v
    #: gradients) against :meth:`reference` in float64, by input dtype. Override in a subclass
    #: with the whole mapping (``{**Backend.tolerance, torch.float32: 1e-4}``).
    tolerance: ClassVar[Mapping[torch.dtype, float]] = {
        torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
    #: the result equals :meth:`reference` up to the dtype's rounding (no approximation, no
    #: reduced-precision accumulation): tests also hold it to ``torch.finfo(dtype).eps`` for
    #: fp16/bf16 inputs
    exact: ClassVar[bool] = False

    # --- environment ---------------------------------------------------------------------------
    def availability_reasons(self) -> list[str]:
        """Why this backend cannot run on this machine at all (package, hardware); [] if it can."""
        reasons = []
        missing = C.package_missing(self.requires_package, self.requires_pip_name)
        if missing:
            reasons.append(missing)
        if "cpu" not in self.devices and "cuda" in self.devices and not torch.cuda.is_available():
            reasons.append("no CUDA device (torch.cuda.is_available() is False)")
        return reasons

    # --- per call -------------------------------------------------------------------------------
    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        """Why this backend cannot run ``call``; an empty list means it can. ``call.options``
        holds the backend's validated options where their values are known (not while
        torch.compile selects from metadata: ``forward`` checks what depends on them too)."""
        checks = (
            C.device_type(call, self.devices),
            C.dtype(call, self.dtypes),
            C.max_head_dim(call, self.max_head_dim),
            C.min_capability(call, self.min_compute_capability),
            C.max_capability(call, self.max_compute_capability),
            C.mask_kind(call, self.mask_kinds),
        )
        reasons = [r for r in checks if r]
        if call.is_causal and not self.supports_causal:
            reasons.append("is_causal=True not supported")
        if call.is_causal and call.attn_mask is not None and not self.supports_causal_with_mask:
            reasons.append("is_causal=True together with attn_mask not supported")
        if call.dropout_p > 0 and not self.supports_dropout:
            reasons.append(f"dropout_p={call.dropout_p} not supported (only 0.0)")
        if call.is_gqa and not self.supports_gqa:
            reasons.append(f"grouped-query attention ({call.num_heads} query heads, "
                           f"{call.num_kv_heads} kv heads) not supported")
        if call.requires_grad and not self.supports_backward:
            reasons.append("backward not supported (inputs require grad)")
        if call.return_lse and not self.supports_lse:
            reasons.append("return_lse=True not supported")
        elif (call.return_lse and call.requires_grad and not self.lse_has_grad
              and not call.backward_from_lse):  # a merge's partial: no lse gradient needed
            reasons.append(f"return_lse=True with backward not supported ({self.name} gives no "
                           "gradient through the lse)")
        if call.backward_from_lse and call.requires_grad and not self.supports_backward_from_lse:
            reasons.append("backward from a merged (out, lse) not supported (an exact partial "
                           "merge needs it)")
        if call.mask_requires_grad and not self.supports_mask_grad:
            reasons.append("attn_mask requires grad: no gradient for the mask (use 'sdpa', "
                           "'sdpa_math' or 'math')")
        if call.head_dim_v != call.head_dim and not self.supports_value_head_dim:
            reasons.append(f"value head_dim {call.head_dim_v} != query head_dim {call.head_dim}")
        if call.softcap is not None and not self.supports_softcap:
            reasons.append(f"softcap={call.softcap} not supported")
        return reasons

    def auto_reasons(self, call: AttentionCall) -> list[str]:
        """Why ``auto`` passes this backend over for ``call`` although it could run it (measured
        slower there than a later candidate). Not consulted when the backend is named."""
        return []

    def delegate(self, call: AttentionCall) -> "Backend":
        """The backend that runs ``call`` once this one is selected: itself, or for a family
        backend (``flash``) the member it picks. Resolved once per call signature, with the
        selection, so the per-call path never chooses again."""
        return self

    def forward(self, call: AttentionCall, **options: Any):
        """Compute attention. Returns ``out`` as (B, H, Sq, Dv) (a view is fine), or
        ``(out, lse)`` with ``lse`` (B, H, Sq) float32 when ``call.return_lse``.

        The dispatcher checks that on the first call of each signature (``AttnPatchError``
        naming the backend otherwise). An exception raised here by a backend registered outside
        attnpatch reaches the caller as ``AttnPatchError("backend 'name' failed on ...")``
        chained to it (out-of-memory errors keep their type)."""
        raise NotImplementedError(f"backend {self.name!r} does not implement forward()")

    def backward(self, call: AttentionCall, grad_out: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, **options: Any) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
        """``(grad_query, grad_key, grad_value)`` of ``call`` for ``grad_out`` (B, H, Sq, Dv),
        computed from ``out`` (B, H, Sq, Dv) and ``lse`` (B, H, Sq, float32) as given, which may
        be those of a larger attention that this call is one part of (flash-attn's ring
        backward): with P = exp(scores - lse), dS = P * (grad_out @ value^T -
        rowsum(grad_out * out)). Declared by ``supports_backward_from_lse``; no dropout."""
        raise NotImplementedError(f"backend {self.name!r} has no backward from (out, lse)")

    def reference(self, call: AttentionCall, options: Any = None):
        """What this backend computes for ``call``, densely and exactly: ``(out, lse)`` in
        float64 (``out`` (B, H, Sq, Dv), ``lse`` (B, H, Sq), -inf for a query row that sees no
        key), differentiable with respect to ``call``'s tensors. ``options``: the validated
        ``Options`` instance (or a mapping of the user's options; None for the defaults).

        The default is exact attention on the call's mask, causal pattern, scale and softcap
        (:func:`attnpatch.backends.math.reference_attention` in float64), without dropout. A
        backend or strategy that computes something else on purpose (an expanded element mask,
        a score bias) overrides it to return that dense attention, so that the generated tests
        compare it with what it means to compute. Tests compare :meth:`forward` with this within
        :attr:`tolerance`."""
        from .backends.math import reference_attention  # registry stays below the backends

        def f64(t):
            return t.double() if t is not None and t.is_floating_point() else t
        dense = call.replace(query=f64(call.query), key=f64(call.key), value=f64(call.value),
                             attn_mask=f64(call.attn_mask), dropout_p=0.0, return_lse=True)
        return reference_attention(dense, accumulate=torch.float64)

    def denoiser_hooks(self, model: torch.nn.Module, options: Any) -> Sequence[Any]:
        """Hooks this backend needs on a diffusers model whose attention modules
        :func:`attnpatch.patch` routes to it: the denoiser (or another ``ModelMixin`` holding
        routed modules, such as a VAE: return ``()`` for a model you leave alone). For
        context parallelism: shard inputs at the model's entry, gather outputs at its exit.

        Each hook is an object with ``pre(module, args, kwargs)``, which may return new
        ``(args, kwargs)``, and/or ``post(module, args, kwargs, output)``, which may return a
        new output (it runs also when the forward raises, with ``output`` None). The patch
        registers them as torch forward hooks (``with_kwargs=True``; the post hook with
        ``always_call=True``), in order, after attnpatch's own token-layout hook (which sees
        the model's unsharded inputs).

        A hook may also carry ``path``: the submodule it hooks, as ``model.get_submodule``
        spells it (``"proj_out"``, ``"blocks.0"``; ``""`` or none: the model itself), so a
        plan can shard where a block starts and gather where the output projection ends. Its
        hooks are registered and removed with the model's, as one set.

        ``options``: the validated ``Options`` instance of the request. Called once per model,
        backend and options, when a patch, ``set_backend`` or ``set_attention_backend`` first
        sets a routed module of ``model`` to this backend with them; the hooks stay installed
        while any routed module of the model is set to it, and are removed exactly when none
        is (or on unpatch; putting the backend back reinstalls the same hooks). One model
        takes one set of hooks per backend: modules of one model set to this backend with
        different options are refused. ``auto`` (and ``attention_backend`` blocks) install
        none. An exception raised here fails the request, with nothing changed, as an
        :class:`AttnPatchError` naming the backend. Default: no hooks."""
        return ()

    def report_note(self, call: AttentionCall) -> Optional[str]:
        """A line for ``handle.report()`` about what this backend does with calls like ``call``
        (a strategy's pattern set and its cost), or None. Asked once per call signature, with
        ``call.options`` and ``call.token_layout`` set."""
        return None

    def specialize(self, call: AttentionCall) -> Optional[Callable]:
        """A kernel ``fn(query, key, value) -> out`` on (B, H, S, D) tensors that computes exactly
        what :meth:`forward` computes for *every* call with ``call``'s signature (shapes, dtypes,
        flags, scale and option values: ``call.options`` holds them, and a call with other
        values is another signature; never asked for calls with a mask or ``return_lse``, nor
        for calls with a ``softcap`` unless the backend declares ``supports_softcap``: then
        ``fn`` must apply ``call.softcap``), or None.

        Asked once per signature; the dispatcher then calls ``fn`` directly, without building
        an :class:`AttentionCall` (the per-call Python that shows in launch-bound models). Only
        for a backend whose ``forward`` is a plain kernel call for that signature: ``fn`` runs
        outside the token-layout context, so a backend that reads
        :func:`attnpatch.current_token_layout` must not specialize. One that declares
        ``reads_token_layout`` is asked only if it sets ``specializes_per_token_layout``: it
        bakes ``call.token_layout`` into ``fn``, and the dispatcher uses ``fn`` only for calls
        with that token layout. An ``fn`` whose attribute ``bshd`` is True
        takes (B, S, H, D) tensors and returns (B, Sq, H, Dv) instead (a kernel that needs that
        memory order: a ``layout="bshd"`` caller's tensors then reach it untransposed).
        """
        return None

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        return {
            "devices": list(cls.devices),
            "dtypes": C.dtype_names(cls.dtypes),
            "max_head_dim": cls.max_head_dim,
            "min_compute_capability": cls.min_compute_capability,
            "mask_kinds": sorted(cls.mask_kinds),
            "causal": cls.supports_causal,
            "causal_with_mask": cls.supports_causal_with_mask,
            "dropout": cls.supports_dropout,
            "gqa": cls.supports_gqa,
            "backward": cls.supports_backward,
            "returns_lse": cls.supports_lse,
            "lse_has_grad": cls.lse_has_grad,
            "backward_from_lse": cls.supports_backward_from_lse,
            "mask_grad": cls.supports_mask_grad,
            "softcap": cls.supports_softcap,
            "reads_token_layout": cls.reads_token_layout,
            "requires_package": cls.requires_package,
            "options": sorted(cls.options),
            "tolerance": {str(d).removeprefix("torch."): t for d, t in cls.tolerance.items()},
            "exact": cls.exact,
        }

    def __repr__(self) -> str:
        return f"<attnpatch backend {self.name!r}>"


#: names of the strategies whose forward is running in this thread/task: ``auto`` inside
#: them never picks them again
_RUNNING: contextvars.ContextVar[frozenset] = contextvars.ContextVar(
    "attnpatch_running_strategies", default=frozenset())


def running_strategies() -> frozenset:
    """Names of the :class:`Strategy` backends whose ``forward`` is running here."""
    return _RUNNING.get()


class Strategy(Backend):
    """A backend that runs other backends (its inner kernels) on sub-calls and combines them.

    Implement :meth:`run` instead of ``forward``: it runs with this strategy marked as running,
    so :func:`attnpatch.run_backend` with ``"auto"`` inside it never picks it again. Kept out of
    ``auto`` unless a ``priority`` is set.
    """

    priority: ClassVar[Optional[int]] = None

    def forward(self, call: AttentionCall, **options: Any):
        token = _RUNNING.set(_RUNNING.get() | {self.name})
        try:
            return self.run(call, **options)
        finally:
            _RUNNING.reset(token)

    def run(self, call: AttentionCall, **options: Any):
        """Compute ``call`` from sub-calls (``call.replace(...)``) run by
        :func:`attnpatch.run_backend`, merged with :func:`attnpatch.merge_partials`. Returns
        what :meth:`Backend.forward` returns."""
        raise NotImplementedError(f"strategy {self.name!r} does not implement run()")


_LOCK = threading.Lock()
_BACKENDS: dict[str, Backend] = {}
_ALIASES: dict[str, str] = {}
_ORDER: list[str] = []
_PRIORITY: list[Backend] = []
#: one element, bumped on every registration change: part of the dispatcher's cache keys, so a
#: new, replaced or removed backend is never hidden behind a cached selection
VERSION = [0]
RESERVED = ("auto",)


def register_backend(backend: Union[type[Backend], Backend, None] = None, *,
                     replace: bool = False):
    """Register a :class:`Backend` subclass (or instance); usable as a class decorator.

    The backend joins ``auto`` at its ``priority``, and is reachable by name and aliases in
    ``attention``, ``explain``, ``patch`` and ``set_attention_backend``.
    Raises :class:`AttnPatchError` for a missing/clashing name unless ``replace=True``.
    """
    if backend is None:
        return lambda b: register_backend(b, replace=replace)
    if not (issubclass(backend, Backend) if isinstance(backend, type)
            else isinstance(backend, Backend)):  # before instantiating: any class would run
        raise AttnPatchError(f"register_backend expects a Backend subclass or instance, got "
                             f"{backend!r}")
    instance = backend() if isinstance(backend, type) else backend
    _declare_options(type(instance))
    name = instance.name
    if not name or not isinstance(name, str) or name != name.lower() or name in RESERVED:
        raise AttnPatchError(f"backend name {name!r} must be a non-empty lowercase string other "
                             f"than {RESERVED}: set the class attribute `name`")
    if type(instance).forward is Backend.forward or (
            isinstance(instance, Strategy) and type(instance).run is Strategy.run):
        raise AttnPatchError(f"backend {name!r} must implement forward(self, call, **options) "
                             "(a Strategy: run(self, call, **options))")
    with _LOCK:
        taken = {n for n in (name, *instance.aliases) if n in _BACKENDS or n in _ALIASES}
        if name in _BACKENDS:
            old = _BACKENDS[name]
            taken -= {name, *old.aliases}
        if (name in _BACKENDS or taken) and not replace:
            raise AttnPatchError(f"backend name(s) {sorted(taken | ({name} & _BACKENDS.keys()))} "
                                 "already registered: pass replace=True to override")
        if name in _BACKENDS:
            _unregister_locked(name)
        _BACKENDS[name] = instance
        _ORDER.append(name)
        for alias in instance.aliases:
            _ALIASES[alias] = name
        _rebuild_priority_locked()
    return backend


def _declare_options(cls: type) -> None:
    """Make ``cls.Options`` and ``cls.options`` agree: names from the dataclass, or a dataclass
    (fields default None, no validation) for a backend that declares only names."""
    if not (isinstance(cls.Options, type) and dataclasses.is_dataclass(cls.Options)):
        raise AttnPatchError(f"backend {cls.__name__}.Options must be a frozen dataclass, got "
                             f"{cls.Options!r}")
    names = frozenset(f.name for f in dataclasses.fields(cls.Options))
    if cls.Options is NoOptions and cls.options:
        cls.Options = dataclasses.make_dataclass(
            f"{cls.__name__}Options", [(n, Any, None) for n in sorted(cls.options)],
            frozen=True)
        names = frozenset(cls.options)
    cls.options = names


def _not_taken(backend: Backend, names) -> list[str]:
    """The option names (sorted) that ``backend`` does not take: the one "does not take
    option" check, behind the error (:func:`option_values`) and the reason
    (:func:`candidate_reasons`)."""
    return sorted(set(names) - backend.options)


def option_values(backend: Backend, values: Mapping[str, Any]):
    """``backend.Options(**values)``, validated: raises :class:`AttnPatchError` naming an
    option the backend does not take (and the ones it does), or a bad value."""
    if isinstance(values, backend.Options):
        return values
    if not values:
        return NO_OPTIONS if backend.Options is NoOptions else backend.Options()
    extra = _not_taken(backend, values)
    if extra:
        raise AttnPatchError(f"backend {backend.name!r} does not take option(s) {extra}; it "
                             f"takes {sorted(backend.options) or 'no options'}")
    try:
        return backend.Options(**values)
    except AttnPatchError:
        raise
    except (TypeError, ValueError) as err:
        raise AttnPatchError(f"backend {backend.name!r}: bad option value: {err}") from None


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Raise :class:`AttnPatchError` unless backend ``name`` takes ``options`` (names and
    values); for ``"auto"``: unless some backend ``auto`` can choose takes them all (and each
    such backend takes their values)."""
    if not options:
        return
    if name != "auto":
        option_values(_BACKENDS[name], options)
        return
    takers = [b for b in _PRIORITY if not _not_taken(b, options)]
    if not takers:
        known = sorted({o for b in _PRIORITY for o in b.options})
        raise AttnPatchError(f"no backend that 'auto' can choose takes option(s) "
                             f"{sorted(options)}; options any backend takes: {known}")
    for backend in takers:
        option_values(backend, options)


def unregister_backend(name: str) -> None:
    """Remove a registered backend (mainly for tests and plugins that unload)."""
    with _LOCK:
        _unregister_locked(canonical_name(name))
        _rebuild_priority_locked()


def _unregister_locked(name: str) -> None:
    old = _BACKENDS.pop(name)
    _ORDER.remove(name)
    for alias in old.aliases:
        _ALIASES.pop(alias, None)


def _rebuild_priority_locked() -> None:
    ranked = [(b.priority, i, b) for i, n in enumerate(_ORDER)
              if (b := _BACKENDS[n]).priority is not None]
    _PRIORITY[:] = [b for _, _, b in sorted(ranked, key=lambda t: (t[0], t[1]))]
    VERSION[0] += 1


def canonical_name(name: str) -> str:
    """The registered name for ``name`` or one of its aliases; 'auto' stays 'auto'.

    Raises :class:`AttnPatchError` suggesting the closest names for an unknown one.
    """
    try:  # free when nothing raises (CPython 3.11+): this runs on every call naming a backend
        if name in _BACKENDS or name == "auto":
            return name
        target = _ALIASES.get(name)
    except TypeError:  # unhashable (a list, a dict): not a name
        target = None
    if target is not None:
        return target
    if not isinstance(name, str):
        raise AttnPatchError(f"backend must be a name (str), got {type(name).__name__}")
    if name != name.lower():  # names are lowercase; "SDPA" means "sdpa"
        return canonical_name(name.lower())
    known = ["auto", *_BACKENDS, *_ALIASES]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise AttnPatchError(f"unknown backend {name!r}{hint} (known: {', '.join(sorted(_BACKENDS))})")


def get_backend(name: str) -> Backend:
    return _BACKENDS[canonical_name(name)]


def all_backends() -> list[Backend]:
    """Every registered backend, ``auto``'s candidates first in priority order."""
    rest = [_BACKENDS[n] for n in _ORDER if _BACKENDS[n] not in _PRIORITY]
    return [*_PRIORITY, *rest]


def priority_list() -> list[Backend]:
    return list(_PRIORITY)


def may_read_token_layout(name: str) -> bool:
    """Whether the backend ``name`` (canonical; ``auto``: any of its candidates) reads
    ``call.token_layout``, so the dispatcher must resolve it before selecting."""
    if name == "auto":
        return any(b.reads_token_layout for b in _PRIORITY)
    backend = _BACKENDS.get(name)
    return backend is not None and backend.reads_token_layout


@dataclass
class Selection:
    """The backend chosen for one call signature, and why the ones before it were passed over."""

    backend: Backend
    requested: str
    rejected: dict[str, list[str]] = field(default_factory=dict)
    #: the backend's :meth:`Backend.report_note` for this call signature (shown by reports)
    note: Optional[str] = None


def candidate_reasons(backend: Backend, call: AttentionCall, option_names) -> list[str]:
    reasons = backend.availability_reasons()
    if reasons:
        return reasons
    extra = _not_taken(backend, option_names)
    if isinstance(option_names, Mapping) and not extra:  # the reasons may read the values
        try:
            call.options = option_values(backend, option_names)
        except AttnPatchError:  # a bad value: selecting the backend names it
            pass
    reasons = list(backend.not_supported_reasons(call))
    if extra:
        takes = sorted(backend.options) or "none"
        reasons.append(f"does not take option(s) {extra} (takes {takes})")
    return reasons


def _delegate(backend: Backend, call: AttentionCall, options) -> Backend:
    """``backend.delegate(call)`` with ``call.options`` set to the validated options (when
    ``options`` carries values, a mapping) of the backend that will run."""
    if isinstance(options, Mapping):
        call.options = option_values(backend, options)
    chosen = backend.delegate(call)
    if chosen is not backend and isinstance(options, Mapping):
        call.options = option_values(chosen, options)
    return chosen


def select(requested: str, call: AttentionCall, option_names=(),
           exclude: frozenset = frozenset()) -> Selection:
    """Pick the backend for ``call``: the named one, or the first of ``auto``'s list that fits.

    ``option_names``: the options' names, or a mapping of their values: then they are
    validated and ``call.options`` is set to the chosen backend's instance.
    ``exclude``: names ``auto`` passes over (the strategies running this call's parent).
    Raises :class:`AttnPatchError` for options the named backend does not take and
    :class:`BackendUnavailableError` (with every candidate's reasons) when nothing fits.
    """
    if requested != "auto":
        backend = _BACKENDS[requested]
        if _not_taken(backend, option_names):  # option_values() says it, naming what it takes
            option_values(backend, dict.fromkeys(option_names))
        reasons = candidate_reasons(backend, call, option_names)
        if reasons:
            raise BackendUnavailableError(f"backend {requested!r} cannot run {call}:",
                                          {requested: reasons})
        chosen = _delegate(backend, call, option_names)
        return Selection(chosen, requested, note=chosen.report_note(call))
    rejected: dict[str, list[str]] = {}
    for backend in _PRIORITY:
        if backend.name in exclude:
            rejected[backend.name] = ["is the strategy running this sub-call"]
            continue
        reasons = candidate_reasons(backend, call, option_names) or backend.auto_reasons(call)
        if not reasons:
            chosen = _delegate(backend, call, option_names)
            return Selection(chosen, requested, rejected, chosen.report_note(call))
        rejected[backend.name] = reasons
    raise BackendUnavailableError(f"no backend can run {call}:", rejected)
