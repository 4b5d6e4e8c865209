"""``attention()``: resolve the backend (argument > context > patch default > env > auto),
select it once per call signature, run it."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from . import registry
from ._caches import BoundedCache
from ._errors import AttnPatchError, BackendUnavailableError
from ._layout import LAYOUT_CALL, TokenLayout, call_layout, set_traced_call
from .call import AttentionCall, build_call, metadata_call, validate

__all__ = ["attention", "attention_backend", "explain", "current_backend", "Explanation",
           "run_backend", "run_selected",
           # the per-call entry points of the processors and integrations (not attnpatch's API)
           "dispatch_call", "dispatch_eager", "dispatch_traced"]

logger = logging.getLogger(__name__)

ENV_VAR = "ATTNPATCH_BACKEND"

# (canonical backend name, options dict) set by `attention_backend(...)`; per thread and per task.
_CONTEXT: contextvars.ContextVar[Optional[tuple[str, dict]]] = contextvars.ContextVar(
    "attnpatch_backend", default=None)

# signature -> (Selection, resolved scale, is_gqa, specialized kernel or None, options, the
# TokenLayout it was selected for, or _UNREAD when the backend does not read layouts)
_CACHE = BoundedCache(4096)
_UNREAD = object()
#: the key of a bool where a number belongs (scale=True: True == 1 would hit 1's entry)
_BOOL = object()


@contextlib.contextmanager
def attention_backend(backend: str, **options: Any) -> Iterator[None]:
    """Use ``backend`` (with ``options``) for every attnpatch call inside the block.

    Scoped to the current thread / asyncio task (a ContextVar); nests. Raises
    :class:`AttnPatchError` for an unknown name, or options the backend does not take (name
    or value).
    """
    name = registry.canonical_name(backend)
    registry.check_options(name, options)  # a bad name or value is named here, not per call
    token = _CONTEXT.set((name, dict(options)))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_backend() -> Optional[tuple[str, dict]]:
    """The (name, options) of the innermost ``attention_backend`` block, or None."""
    return _CONTEXT.get()


# os.environ.get costs ~2 µs for a missing key (it raises and catches KeyError); reading the
# mapping behind os.environ directly sees every change made through os.environ as well.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else ENV_VAR


def _env_backend() -> str:
    if _ENV_DATA is not None:
        raw = _ENV_DATA.get(_ENV_KEY)
        name = None if raw is None else os.environ.decodevalue(raw)
    else:  # pragma: no cover - non-CPython environ
        name = os.environ.get(ENV_VAR)
    if not name:
        return "auto"
    try:
        return registry.canonical_name(name)
    except AttnPatchError as err:
        raise AttnPatchError(f"environment variable {ENV_VAR}={name!r}: {err}") from None


def resolve(backend: Optional[str], options: dict, default: Optional[tuple[str, dict]] = None
            ) -> tuple[str, dict]:
    """The backend name and merged options for one call, by precedence."""
    if backend is not None:
        return registry.canonical_name(backend), options
    ctx = _CONTEXT.get()
    if ctx is None:
        ctx = default
    if ctx is not None:
        name, ctx_options = ctx
        return name, ({**ctx_options, **options} if options else ctx_options)
    return _env_backend(), options


# per thread: dynamo maps it to True in the frames it traces, and it is False in eager code
# (torch.compiler.is_compiling() reads a process-wide flag that is True while *any* thread
# compiles, eager flex on CPU included)
_is_compiling = torch.compiler.is_dynamo_compiling
_grad_enabled = torch.is_grad_enabled
_VERSION = registry.VERSION  # bumped on every registration change


def dispatch_call(query, key, value, attn_mask=None, is_causal=False, scale=None,
                  dropout_p=0.0, backend=None, layout="bhsd", return_lse=False, options=None,
                  default=None, softcap=None, token_layout=None):
    """Run one call; returns ``(result, Selection)``. Used by ``attention`` and the processors.

    The hot path (selection cached) only builds the signature, looks it up and runs the kernel;
    validation and selection run once per signature.
    """
    if token_layout is not None and not isinstance(token_layout, TokenLayout):
        raise AttnPatchError(f"token_layout must be an attnpatch.TokenLayout or None, got "
                             f"{type(token_layout).__name__}")
    if _is_compiling():
        return dispatch_traced(query, key, value, attn_mask, is_causal, scale, dropout_p,
                               backend, layout, return_lse, options or {}, default, softcap,
                               None, token_layout)
    return dispatch_eager(query, key, value, attn_mask, is_causal, scale, dropout_p, backend,
                          layout, return_lse, options, default, None, softcap, token_layout)


def dispatch_eager(query, key, value, attn_mask, is_causal, scale, dropout_p, backend, layout,
                   return_lse, options, default, record=None, softcap=None, token_layout=None):
    """``dispatch_call`` outside torch.compile (callers that already checked call this directly).

    ``record``: the :class:`~attnpatch._record.ModuleRecord` of the patched diffusers module
    making the call, or None. The call is booked on it, its ``scale`` stands in for a missing
    ``scale``, and its text position makes the call's token layout visible to the backend
    (``current_token_layout``). ``softcap``: None or the call's logit cap (``c * tanh(s / c)``
    on the scaled scores, before the mask); part of the cache key. ``token_layout``: the
    caller's :class:`TokenLayout` for a bare call (a patched module's is resolved here), given
    to a backend that reads it as ``call.token_layout``.
    """
    if scale is None and record is not None:
        scale = record.scale
    if backend is None and (ctx := _CONTEXT.get() or default) is not None and not options:
        name, options = ctx  # resolve(), inlined for the processors' common case
    else:
        name, options = resolve(backend, options or _NO_OPTIONS, default)
    try:  # the signature that keys the selection cache: built inline, this is the hot path
        # Everything that decides validity or selection: the option values, every tensor's
        # shape, dtype, device and requires-grad (the mask's too), the flags and the grad mode
        # (k/v dtypes: the math backend would cast a mismatch instead of raising). Non-bool
        # flags key as None and bool numbers as _BOOL, never cached, so validate() names
        # them every time.
        grad = _grad_enabled()
        key_ = (name, _option_key(options) if options else (), _VERSION[0], query.shape,
                key.shape, value.shape, query.dtype, key.dtype, value.dtype, query.device,
                key.device, value.device,
                None if attn_mask is None else (attn_mask.shape, attn_mask.dtype,
                                                attn_mask.device,
                                                grad and attn_mask.requires_grad),
                is_causal if is_causal.__class__ is bool else None,
                _BOOL if scale.__class__ is bool else scale,
                _BOOL if dropout_p.__class__ is bool else dropout_p, layout,
                return_lse if return_lse.__class__ is bool else None,
                _BOOL if softcap.__class__ is bool else softcap,
                grad and (query.requires_grad or key.requires_grad or value.requires_grad))
        entry = _CACHE.get(key_)
    except (AttributeError, TypeError):  # not tensors / unhashable flags: let validate() say so
        key_, entry = None, None
    if entry is not None and entry[5] is not _UNREAD and entry[5] != _layout_of(
            token_layout, record, query, key, layout):
        entry = None  # a backend that reads the layout: checked and selected again for this one
    if entry is None:
        validate(query, key, value, attn_mask, is_causal, scale, dropout_p, layout, return_lse,
                 softcap)
        grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                            or value.requires_grad)
        call = build_call(query, key, value, attn_mask, is_causal, scale, dropout_p, layout,
                          return_lse, grad, softcap)
        if registry.may_read_token_layout(name):
            call.token_layout = _layout_of(token_layout, record, query, key, layout)
        selection = registry.select(name, call, options)
        reads = selection.backend.reads_token_layout
        if reads and call.token_layout is None:  # a family member that reads it
            call.token_layout = _layout_of(token_layout, record, query, key, layout)
            selection = registry.select(name, call, options)
        if selection.rejected:
            logger.info("attnpatch auto chose %r for %s; passed over: %s", selection.backend.name,
                        call, "; ".join(f"{n}: {', '.join(r)}" for n, r in
                                        selection.rejected.items()))
        kernel = None
        # a backend that reads the token layout specializes only if it bakes the layout in:
        # its kernel serves only calls whose layout equals this one (read_layout, checked on
        # every hit above)
        if attn_mask is None and not return_lse and (
                not reads or selection.backend.specializes_per_token_layout) and (
                softcap is None or selection.backend.supports_softcap):
            kernel = selection.backend.specialize(call)
        # the first call of a signature runs forward() and checks what it returns; cached only
        # once that passed, so a warm call never runs unchecked
        result = _first_forward(selection, call, options, record, query, key, layout)
        if key_ is not None:
            _CACHE.put(key_, (selection, call.scale, call.is_gqa, kernel, call.options,
                              call.token_layout if reads else _UNREAD,
                              getattr(kernel, "bshd", False) is True))
    else:
        selection, resolved_scale, is_gqa, kernel, validated, read_layout, kernel_bshd = entry
        if kernel is not None:  # a plain kernel call: no AttentionCall, no layout context
            try:  # costs nothing unless it raises (CPython 3.11+)
                if (layout == "bshd") is kernel_bshd:  # the kernel takes the caller's layout
                    result = kernel(query, key, value)
                else:
                    result = kernel(query.transpose(1, 2), key.transpose(1, 2),
                                    value.transpose(1, 2)).transpose(1, 2)
            except Exception as err:
                if _passes_through(selection.backend, err):
                    raise
                call = build_call(query, key, value, None, is_causal, scale, dropout_p, layout,
                                  return_lse, key_[-1], softcap)
                raise _failed(selection.backend, call, err) from err
            if record is not None:  # ModuleRecord.note(), inlined
                record.calls += 1
                if selection is not record.last_selection:
                    record.switch(selection)
            return result, selection
        if attn_mask is None and layout == "bhsd":
            call = AttentionCall(query, key, value, None, "none", is_causal, resolved_scale,
                                 dropout_p, layout, return_lse, key_[-1], scale is None,
                                 is_gqa, softcap)
        else:
            call = build_call(query, key, value, attn_mask, is_causal, scale, dropout_p, layout,
                              return_lse, key_[-1], softcap)
        call.options = validated
        if read_layout is not _UNREAD:
            call.token_layout = read_layout
        try:  # costs nothing unless it raises (CPython 3.11+)
            if record is None:
                result = selection.backend.forward(call, **options)
            else:
                token = LAYOUT_CALL.set((record.joint_text, query, key,
                                         -2 if layout == "bhsd" else 1))
                try:
                    result = selection.backend.forward(call, **options)
                finally:
                    LAYOUT_CALL.reset(token)
                record.note(selection)
        except Exception as err:
            if _passes_through(selection.backend, err):
                raise
            raise _failed(selection.backend, call, err) from err
    if return_lse is True and query.dtype is torch.float64 and result[1].dtype is not (
            torch.float64):  # one lse dtype per input dtype, whichever kernel ran
        result = (result[0], result[1].double())
    if layout == "bshd":
        if return_lse:
            result = (result[0].transpose(1, 2), result[1])
        else:
            result = result.transpose(1, 2)
    return result, selection


_NO_OPTIONS: dict = {}


def _layout_of(token_layout, record, query, key, layout) -> Optional[TokenLayout]:
    """The call's layout: the caller's, else the patched module's (None for a bare call)."""
    if token_layout is not None or record is None:
        return token_layout
    seq = 2 if layout == "bhsd" else 1
    return call_layout(record.joint_text, int(query.shape[seq]), int(key.shape[seq]))


def _option_key(options: dict) -> tuple:
    """Option values as a hashable part of the cache key: each value with its type (``True``
    and ``1`` are different options); a dict as its sorted items; other unhashable values by
    identity (the cache entry keeps the validated options, hence the object, alive)."""
    try:
        key_ = tuple((name, value.__class__, value) for name, value in options.items())
        hash(key_)
        return key_
    except TypeError:
        return tuple((name, value.__class__, _hashable(value)) for name, value in options.items())


def _hashable(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    try:
        hash(value)
        return value
    except TypeError:
        return ("id", id(value))


def _first_forward(selection, call, options, record, query, key, layout):
    """``forward`` for the first call of a signature (the cold path), its result checked."""
    backend = selection.backend
    try:
        if record is None:
            result = backend.forward(call, **options)
        else:
            token = LAYOUT_CALL.set((record.joint_text, query, key,
                                     -2 if layout == "bhsd" else 1))
            try:
                result = backend.forward(call, **options)
            finally:
                LAYOUT_CALL.reset(token)
    except Exception as err:
        if _passes_through(backend, err):
            raise
        raise _failed(backend, call, err) from err
    check_result(backend, call, result)
    if record is not None:
        record.note(selection)
    return result


def check_result(backend, call: AttentionCall, result) -> None:
    """Raise :class:`AttnPatchError` unless ``result`` is what ``backend.forward`` must return
    for ``call``: ``out`` (B, H, Sq, Dv), or ``(out, lse)`` with ``lse`` (B, H, Sq) float32
    (float64 is accepted for float64 inputs) when ``call.return_lse``."""
    out_shape = (call.batch_size, call.num_heads, call.seq_len_q, call.head_dim_v)
    where = f"backend {backend.name!r} returned"
    if call.return_lse:
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise AttnPatchError(
                f"{where} {_describe(result)} for {call} with return_lse=True: expected a tuple "
                f"(out, lse) with out of shape {out_shape} and lse of shape {out_shape[:3]}")
        out, lse = result
    else:
        out, lse = result, None
        if isinstance(result, (tuple, list)):
            raise AttnPatchError(f"{where} {_describe(result)} for {call} with return_lse=False: "
                                 f"expected one tensor of shape {out_shape}")
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != out_shape:
        raise AttnPatchError(f"{where} output {_describe(out)} for {call}: expected output shape "
                             f"{out_shape} (B, H, Sq, Dv)")
    if lse is None:
        return
    lse_dtypes = (torch.float32, torch.float64) if call.dtype == torch.float64 else (
        torch.float32,)
    if (not isinstance(lse, torch.Tensor) or tuple(lse.shape) != out_shape[:3]
            or lse.dtype not in lse_dtypes):
        raise AttnPatchError(f"{where} lse {_describe(lse)} for {call}: expected lse shape "
                             f"{out_shape[:3]} (B, H, Sq) and dtype torch.float32")


def _describe(value, depth: int = 0) -> str:
    if isinstance(value, torch.Tensor):
        if depth:
            return f"tensor {tuple(value.shape)} {value.dtype}"
        return f"of shape {tuple(value.shape)} ({value.dtype})"
    if isinstance(value, (tuple, list)) and depth == 0:
        items = ", ".join(_describe(v, 1) for v in value[:3]) + (", ..." if len(value) > 3 else "")
        return f"a {type(value).__name__} of {len(value)} ({items})"
    return f"a {type(value).__name__}"


# memory errors keep their type (batch-size finders catch them); they get a note instead
_KEEP_TYPE = (MemoryError, *((torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError")
                             else ()))


def _passes_through(backend, err: Exception) -> bool:
    """Whether ``err``, raised by ``backend``'s kernel, propagates as it is: built-in backends'
    errors already say what failed; out-of-memory errors get a note naming the backend."""
    if type(backend).__module__.startswith("attnpatch."):
        return True
    if isinstance(err, _KEEP_TYPE):
        if hasattr(err, "add_note"):  # Python 3.11+
            err.add_note(f"(in attnpatch backend {backend.name!r})")
        return True
    return False


def _failed(backend, call: AttentionCall, err: Exception) -> AttnPatchError:
    return AttnPatchError(f"backend {backend.name!r} failed on {call}: "
                          f"{type(err).__name__}: {err}")


@torch.compiler.assume_constant_result
def _resolve_traced(backend, default_name):
    """(backend name, where it came from), read once while torch.compile traces."""
    if backend is not None:
        return registry.canonical_name(backend), "argument"
    ctx = _CONTEXT.get()
    if ctx is not None:
        if ctx[1]:
            raise AttnPatchError(
                f"attention_backend({ctx[0]!r}, {', '.join(f'{k}=...' for k in ctx[1])}) is active "
                "while torch.compile traces: a block's options cannot reach the compiled graph. "
                "Pass them to patch(...)/set_attention_backend(...) or as attention(..., "
                "backend=..., **options) instead")
        return ctx[0], "context"
    if default_name is not None:
        return default_name, "patch"
    return _env_backend(), "env"


@torch.compiler.assume_constant_result
def _select_traced(name, option_names, sig, layout_fields):
    key_ = (name, option_names, registry.VERSION[0], "traced", *sig, layout_fields)
    entry = _CACHE.get(key_)
    if entry is None:
        call = metadata_call(*sig)
        if layout_fields is not None:
            call.token_layout = TokenLayout(*layout_fields)
        entry = _CACHE.put(key_, (registry.select(name, call, option_names), call.scale,
                                  call.is_gqa, None, None, _UNREAD, False))
    return entry[0].backend.name


@torch.compiler.assume_constant_result
def _may_read_layout_traced(name):
    return registry.may_read_token_layout(name)


def _static(size) -> int:
    """A size as a constant of the graph. After a recompile dynamo may make sizes symbolic
    (automatic dynamic shapes), and torch before 2.13 keeps ``int(size)`` and ``size == 1``
    symbolic, which a constant-result function cannot take; the length of a range is
    specialized (guarded) in every version."""
    return len(range(size))


def dispatch_traced(query, key, value, attn_mask, is_causal, scale, dropout_p, backend, layout,
                    return_lse, options, default, softcap=None, record=None, token_layout=None):
    """``dispatch_call`` while torch.compile traces: the backend is chosen at trace time, from
    metadata, and becomes a constant of the graph (the backend's kernel is what is traced).

    Batch and sequence lengths do not enter that choice (dynamo may make them symbolic: one
    graph then serves every size), so ``auto`` under compile never takes a backend that it
    prefers only for large calls (flash4). A later ``attention_backend`` block or
    ``$ATTNPATCH_BACKEND`` change does not retrace a compiled graph; a patch's
    ``set_attention_backend`` does (dynamo guards on it).

    The token layout is read only for a backend that reads it (its sizes then become constants
    of the graph, guarded); ``current_token_layout()`` inside the backend sees the call's.
    """
    name, source = _resolve_traced(backend, None if default is None else default[0])
    if source == "patch":
        options = {**default[1], **options}
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                        or value.requires_grad)
    h = 1 if layout == "bhsd" else 2
    mask = None
    if attn_mask is not None:
        mask = (attn_mask.dtype, attn_mask.dim() < 3 or _static(attn_mask.shape[-3]) == 1,
                _static(attn_mask.shape[-2]) == 1,
                torch.is_grad_enabled() and attn_mask.requires_grad)
    meta = (_static(query.shape[h]), _static(key.shape[h]), _static(query.shape[-1]),
            _static(value.shape[-1]), query.dtype, query.device, mask, is_causal, scale,
            dropout_p, return_lse, grad, softcap)
    token_layout = _traced_layout(token_layout, record, query, key, layout) \
        if _may_read_layout_traced(name) else None
    fields = None if token_layout is None else _layout_fields(token_layout)
    chosen = registry.get_backend(_select_traced(name, tuple(options), meta, fields))
    if chosen.reads_token_layout and token_layout is None:  # a family member that reads it
        token_layout = _traced_layout(None, record, query, key, layout)
        fields = None if token_layout is None else _layout_fields(token_layout)
        chosen = registry.get_backend(_select_traced(name, tuple(options), meta, fields))
    call = build_call(query, key, value, attn_mask, is_causal, scale, dropout_p, layout,
                      return_lse, grad, softcap)
    call.options = registry.option_values(chosen, options)
    if chosen.reads_token_layout:
        call.token_layout = token_layout
    seq = 2 if layout == "bhsd" else 1
    previous = set_traced_call(None if record is None else
                               (record.joint_text, query.shape[seq], key.shape[seq]))
    try:
        result = chosen.forward(call, **options)
    finally:
        set_traced_call(previous)
    if layout == "bshd":
        result = (result[0].transpose(1, 2), result[1]) if return_lse else result.transpose(1, 2)
    return result, None


def _traced_layout(token_layout, record, query, key, layout) -> Optional[TokenLayout]:
    """:func:`_layout_of` while dynamo traces: the sizes it reads become constants (guarded)."""
    if token_layout is not None or record is None:
        return token_layout
    seq = 2 if layout == "bhsd" else 1
    return call_layout(record.joint_text, _static(query.shape[seq]), _static(key.shape[seq]))


def _layout_fields(layout: TokenLayout) -> tuple:
    """A layout as plain constants (dynamo passes those to a constant-result function)."""
    # field by field: dataclasses.astuple deep-copies values, which older dynamo cannot trace
    values = (getattr(layout, f.name) for f in dataclasses.fields(layout))
    return tuple(_static(v) if isinstance(v, torch.SymInt) else v for v in values)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
              scale: Optional[float] = None, dropout_p: float = 0.0,
              backend: Optional[str] = None, layout: str = "bhsd", return_lse: bool = False,
              *, softcap: Optional[float] = None, token_layout: Optional[TokenLayout] = None,
              **options: Any):
    """Scaled dot-product attention through the selected backend.

    Shapes (``layout="bhsd"``): query (B, H, Sq, D), key (B, Hkv, Sk, D), value (B, Hkv, Sk, Dv)
    with H % Hkv == 0 (GQA/MQA); ``layout="bshd"`` swaps the S and H axes, in and out.
    ``attn_mask``: bool (True = attend) or additive float, broadcastable to (B, H, Sq, Sk).
    ``is_causal``: top-left aligned, as in ``F.scaled_dot_product_attention``.
    ``softcap``: None, or a positive cap ``c``: the scaled scores become ``c * tanh(s / c)``
    before the mask is added (Gemma 2's attention logit softcapping); backends that do not
    compute it (``supports_softcap``) refuse the call with a reason.
    ``backend``: a name or alias; None uses ``attention_backend(...)``, then
    ``$ATTNPATCH_BACKEND``, then ``"auto"``. ``options`` go to the backend.
    ``token_layout``: which tokens are text and the image grid (a :class:`TokenLayout`), for
    backends that read it (grid-aware strategies); calls from patched models get theirs.

    Returns the output (B, H, Sq, Dv) (or (B, Sq, H, Dv)), and with ``return_lse=True`` also the
    log-sum-exp (B, H, Sq) in float32 (float64 for float64 inputs).
    Raises :class:`AttnPatchError` for bad input, :class:`BackendUnavailableError` when the
    requested backend (or every ``auto`` candidate) cannot run the call.
    """
    return dispatch_call(query, key, value, attn_mask, is_causal, scale, dropout_p, backend, layout,
                         return_lse, options, None, softcap, token_layout)[0]


def _run_selection(backend: str, call: AttentionCall, options: dict):
    """``(selection, cache key, checked)`` for ``run_backend(backend, call, **options)``: the
    named backend, or ``auto``'s first fit other than the strategies running here; cached per
    (name, option names, running strategies, call signature) once its first result passed."""
    name = registry.canonical_name(backend)
    running = registry.running_strategies()
    if name in running:
        raise AttnPatchError(f"run_backend({backend!r}) inside the strategy {name!r} would run "
                             "it again on its own sub-call: name its inner kernel, or 'auto'")
    key_ = ("run_backend", name, _option_key(options) if options else (), _VERSION[0],
            running, call.signature(),
            call.token_layout if registry.may_read_token_layout(name) else None)
    entry = _CACHE.get(key_)
    if entry is not None:
        call.options = entry[4]
        return entry[0], key_, True
    return registry.select(name, call, options, exclude=running), key_, False


def run_backend(backend: str, call: AttentionCall, **options: Any):
    """Run one backend on ``call`` (a sub-call built with :meth:`AttentionCall.replace`), with
    the dispatcher's checks: ``backend`` is a name, or ``"auto"`` (never a strategy whose
    ``run`` is active here). No ``attention_backend`` block, patch default or environment
    variable applies, so a strategy never re-enters itself through them.

    Returns ``out`` (B, H, Sq, Dv), or ``(out, lse)`` when ``call.return_lse``.
    Raises :class:`AttnPatchError` / :class:`BackendUnavailableError` like :func:`attention`.
    """
    return run_selected(backend, call, options)[0]


def run_selected(backend: str, call: AttentionCall, options: dict):
    """:func:`run_backend`, returning ``(result, the Backend that ran)``."""
    selection, key_, checked = _run_selection(backend, call, options)
    chosen = selection.backend
    if not checked:
        result = _first_forward(selection, call, options, None, call.query, call.key, "bhsd")
        _CACHE.put(key_, (selection, call.scale, call.is_gqa, None, call.options, _UNREAD,
                          False))
        return result, chosen
    try:
        return chosen.forward(call, **options), chosen
    except Exception as err:
        if _passes_through(chosen, err):
            raise
        raise _failed(chosen, call, err) from err


@dataclass
class Explanation:
    """Which backend ``attention`` would run for a call, and why every other one would not."""

    requested: str
    choice: Optional[str]
    reasons: dict[str, list[str]] = field(default_factory=dict)
    call: Optional[AttentionCall] = None

    def __str__(self) -> str:
        lines = [f"requested: {self.requested}", f"choice: {self.choice or 'none (error)'}"]
        width = max((len(n) for n in self.reasons), default=8)
        for name, why in self.reasons.items():
            mark = "ok" if not why else "; ".join(why)
            tag = " <- chosen" if name == self.choice else ""
            lines.append(f"  {name:<{width}}  {mark}{tag}")
        return "\n".join(lines)


def explain(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
            scale: Optional[float] = None, dropout_p: float = 0.0,
            backend: Optional[str] = None, layout: str = "bhsd", return_lse: bool = False,
            *, softcap: Optional[float] = None, token_layout: Optional[TokenLayout] = None,
            **options: Any) -> Explanation:
    """For the call ``attention(...)`` would get with these arguments: the backend it would run,
    and the reasons of every registered backend (an empty list means it could run).

    Raises :class:`AttnPatchError` for bad input, like ``attention``.
    """
    name, options = resolve(backend, options)
    validate(query, key, value, attn_mask, is_causal, scale, dropout_p, layout, return_lse,
             softcap)
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                        or value.requires_grad)
    call = build_call(query, key, value, attn_mask, is_causal, scale, dropout_p, layout,
                      return_lse, grad, softcap)
    if token_layout is not None and not isinstance(token_layout, TokenLayout):
        raise AttnPatchError(f"token_layout must be an attnpatch.TokenLayout or None, got "
                             f"{type(token_layout).__name__}")
    call.token_layout = token_layout
    reasons = {b.name: registry.candidate_reasons(b, call, options)
               or (b.auto_reasons(call) if name == "auto" else [])
               for b in registry.all_backends()}
    try:
        choice = registry.select(name, call, options).backend.name
    except BackendUnavailableError:
        choice = None
    except AttnPatchError as err:
        choice = None
        reasons.setdefault(name, []).append(str(err))
    if name != "auto":
        reasons = {name: reasons[name], **{n: r for n, r in reasons.items() if n != name}}
    return Explanation(name, choice, reasons, call)
