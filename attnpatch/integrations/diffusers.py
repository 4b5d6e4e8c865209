"""diffusers: find attention modules, install routed processors, capture the token layout.

Every module with a ``processor`` and ``set_processor`` (legacy ``Attention``,
``AttentionModuleMixin`` models such as Flux/Wan/QwenImage), or with an attention processor and
no ``set_processor`` (``MochiAttention``, ``CosmosCausalAttention``), gets a copy of its processor whose core attention call goes to attnpatch (:mod:`attnpatch.processors`).
Legacy processors that never call SDPA (bmm ``AttnProcessor``, sliced, xformers, IP-adapter,
custom diffusion) are swapped for diffusers' own SDPA equivalent where that is numerically the
same computation (with ``attn.scale`` passed through), else reported as not routed.
"""

from __future__ import annotations

import contextvars
import functools
import sys
from typing import Any, Optional

import torch

from .._layout import ForwardInfo, enter_forward, exit_forward
from .._record import ModuleRecord
from .._sites import Site
from ..pipelines import forward_info, text_position
from ..processors.rebind import NotRoutable, calls_attention, route_processor

__all__ = ["is_attention_module", "is_pipeline", "is_model_mixin", "pipeline_components",
           "patch_module", "restore_module", "LayoutHooks", "diffusers_backend_names"]


def _diffusers():
    return sys.modules.get("diffusers")


def is_attention_module(module: Any) -> bool:
    """A module with a ``processor`` and ``set_processor``, or with a processor whose class
    calls attention but no ``set_processor`` (``MochiAttention``, ``CosmosCausalAttention``;
    a processor without attention, such as DC-AE's linear attention, does not count)."""
    if not isinstance(module, torch.nn.Module) or not hasattr(module, "processor"):
        return False
    if callable(getattr(module, "set_processor", None)):
        return True
    processor = module.processor
    return processor is not None and calls_attention(type(processor))


def _install(module: torch.nn.Module, processor: Any) -> None:
    if callable(getattr(module, "set_processor", None)):
        module.set_processor(processor)
    else:  # no set_processor: the attribute, as the module's __init__ assigned it
        setattr(module, "processor", processor)


def is_pipeline(obj: Any) -> bool:
    d = _diffusers()
    if d is None or isinstance(obj, torch.nn.Module):
        return False
    return isinstance(obj, d.DiffusionPipeline)


def is_model_mixin(obj: Any) -> bool:
    d = _diffusers()
    return d is not None and isinstance(obj, d.ModelMixin)


def pipeline_components(pipe) -> list[tuple[str, Any]]:
    """(name, component) for every component of a pipeline, modules or not."""
    return list(pipe.components.items())


def diffusers_backend_names() -> set[str]:
    d = _diffusers()
    if d is None:
        return set()
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName
    except Exception:  # pragma: no cover
        return set()
    return {m.value for m in AttentionBackendName}


# --- legacy processors ------------------------------------------------------------------------
# original class -> (diffusers SDPA equivalent, attention attributes that must be None for the
# two to compute the same thing: the legacy class ignores them, the SDPA one applies them)
_LEGACY = {
    "AttnProcessor": ("AttnProcessor2_0", ("norm_q", "norm_k")),
    "SlicedAttnProcessor": ("AttnProcessor2_0", ("norm_q", "norm_k", "spatial_norm")),
    "XFormersAttnProcessor": ("AttnProcessor2_0", ("norm_q", "norm_k")),
    "AttnAddedKVProcessor": ("AttnAddedKVProcessor2_0", ()),
    "SlicedAttnAddedKVProcessor": ("AttnAddedKVProcessor2_0", ("spatial_norm",)),
    "XFormersAttnAddedKVProcessor": ("AttnAddedKVProcessor2_0", ()),
    "XFormersJointAttnProcessor": ("JointAttnProcessor2_0", ()),
    "IPAdapterAttnProcessor": ("IPAdapterAttnProcessor2_0", ()),
    "IPAdapterXFormersAttnProcessor": ("IPAdapterAttnProcessor2_0", ()),
    "CustomDiffusionAttnProcessor": ("CustomDiffusionAttnProcessor2_0", ()),
    "CustomDiffusionXFormersAttnProcessor": ("CustomDiffusionAttnProcessor2_0", ()),
}


def _legacy_target(module, processor) -> tuple[Optional[type], Optional[str]]:
    """(SDPA class to use instead, None) for a convertible legacy processor; (None, reason) for
    one that is not equivalent; (None, None) when the processor is not a legacy one."""
    try:
        from diffusers.models import attention_processor as ap
    except Exception:  # pragma: no cover
        return None, None
    name = type(processor).__name__
    if name not in _LEGACY or type(processor) is not getattr(ap, name, None):
        return None, None
    target_name, must_be_none = _LEGACY[name]
    bad = [a for a in must_be_none if getattr(module, a, None) is not None]
    if bad:
        return None, (f"{name} ignores attn.{', attn.'.join(bad)} but {target_name} applies "
                      "it: no numerically equivalent SDPA processor")
    return getattr(ap, target_name), None


def patch_module(record: ModuleRecord) -> None:
    """Install a routed processor on ``record.module``; sets ``record.routed``/``note_text``."""
    module = record.module
    processor = module.processor
    record.original = processor
    record.processor = type(processor).__name__
    if processor is None:
        record.note_text = "module has no processor"
        return
    base = getattr(type(processor), "_attnpatch_base", None)
    source = processor
    if base is not None:  # someone copied a routed processor from another patched model here
        record.processor = base.__name__
    else:
        base = type(processor)
        target, why_not = _legacy_target(module, processor)
        if why_not is not None:
            record.note_text = why_not
            return
        if target is not None:
            source = _convert(processor, target)
            record.scale = getattr(module, "scale", None)
            record.extra["replaced_by"] = target.__name__
            record.note_text = None
            base = target
    try:
        new = route_processor(source, record, base)
    except NotRoutable as err:
        record.note_text = str(err)
        return
    record.joint_text = text_position(base.__name__)
    _install(module, new)
    record.installed = new
    record.routed = True


def _convert(processor, target: type):
    """A ``target`` processor carrying ``processor``'s state (weights of nn.Module processors:
    the same tensors, under the same names)."""
    if isinstance(processor, torch.nn.Module):
        new = object.__new__(target)
        new.__dict__.update(processor.__dict__)
        return new
    return target()


def restore_module(record: ModuleRecord) -> bool:
    """Put the original processor back; False if someone replaced ours meanwhile (then theirs
    stays)."""
    module = record.module
    if record.installed is None:
        return True
    if getattr(module, "processor", None) is not record.installed:
        return False
    _install(module, record.original)
    return True


# --- token layout -----------------------------------------------------------------------------

class _CheckpointInContext:
    """A diffusers gradient-checkpointing function whose checkpointed block runs in a copy of
    the context (ContextVars) current when the block is called: the same copy when autograd
    recomputes the block in backward."""

    def __init__(self, original):
        self.original = original

    def __call__(self, block, *args, **kwargs):
        context = contextvars.copy_context()
        return self.original(functools.partial(context.run, block), *args, **kwargs)


class LayoutHooks(Site):
    """Forward pre/post hooks on one denoiser that publish its :class:`ForwardInfo` (a site,
    stored on the model under ``KEY``)."""

    KEY = "_attnpatch_layout"

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.model = model
        #: image-token count -> grid read from ids (Flux) in eager forwards: compiled forwards,
        #: which can't read ids values, take the grid from here
        self.known_grids: dict[int, tuple[int, int, int]] = {}
        self._handles: list = []
        #: the model's modules that can checkpoint their blocks (diffusers'
        #: ``gradient_checkpointing`` attribute) and the checkpoint functions swapped in the
        #: running forward, to put back at its exit
        self._checkpointing: list = []
        self._swapped: list = []

    def apply(self) -> None:
        self._checkpointing = [m for m in self.model.modules()
                               if hasattr(m, "gradient_checkpointing")]
        self._handles = [
            self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.model.register_forward_hook(self._post, always_call=True),
        ]

    def _pre(self, module, args, kwargs):
        # runs in eager forwards and in traced ones (from shapes only: a constant of the graph)
        info = None
        try:
            info = forward_info(module, args, kwargs)
        except Exception:  # never break a forward for bookkeeping
            info = None
        if info is None:
            info = ForwardInfo(type(module).__name__, None, 0)
        info.known_grids = self.known_grids
        enter_forward(info)
        if not torch.compiler.is_dynamo_compiling():
            self._swapped.append(self._checkpoint_in_context())
        return None

    def _post(self, module, args, output):
        exit_forward()
        if not torch.compiler.is_dynamo_compiling() and self._swapped:
            for m, original, ours in self._swapped.pop():
                if m.__dict__.get("_gradient_checkpointing_func") is ours:
                    m._gradient_checkpointing_func = original
        return None

    def _checkpoint_in_context(self) -> list:
        """For this forward, wrap each checkpointing module's checkpoint function so that the
        blocks it checkpoints run in a copy of the forward's context: autograd recomputes them
        in backward, after the forward has returned, and they must see the same token layout
        and strategy state (ContextVars) as in the forward."""
        swapped = []
        if not torch.is_grad_enabled():  # diffusers checkpoints only with grad enabled
            return swapped
        for m in self._checkpointing:
            original = m.__dict__.get("_gradient_checkpointing_func")
            if getattr(m, "gradient_checkpointing", False) and callable(original) and not (
                    isinstance(original, _CheckpointInContext)):
                ours = _CheckpointInContext(original)
                m._gradient_checkpointing_func = ours
                swapped.append((m, original, ours))
        return swapped

    def restore(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
