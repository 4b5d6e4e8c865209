"""attnpatch: swap the attention inside diffusers and transformers models, one call.

The public surface is ``__all__``; everything else is private.
"""

from __future__ import annotations

from . import backends as _backends  # noqa: F401  (registers the built-in backends)
from . import strategies as _strategies  # noqa: F401  (registers the built-in strategies)
from ._caches import clear_caches as _clear_caches  # noqa: F401  (attnpatch._clear_caches())
from ._errors import AttnPatchError, BackendUnavailableError
from ._info import BackendInfo, list_backends
from .call import AttentionCall
from .dispatch import Explanation, attention, attention_backend, explain, run_backend
from .merge import Partial, merge_partials
from .registry import Backend, Strategy, register_backend, unregister_backend
from ._layout import TokenLayout, current_token_layout
from ._record import ModuleReport, PatchReport
from .patcher import PatchHandle, patch, set_attention_backend, unpatch

__version__ = "0.1.0"

__all__ = [
    "AttentionCall",
    "AttnPatchError",
    "Backend",
    "BackendInfo",
    "BackendUnavailableError",
    "Explanation",
    "Partial",
    "Strategy",
    "attention",
    "attention_backend",
    "explain",
    "list_backends",
    "merge_partials",
    "run_backend",
    "register_backend",
    "unregister_backend",
    "patch",
    "unpatch",
    "set_attention_backend",
    "PatchHandle",
    "PatchReport",
    "ModuleReport",
    "TokenLayout",
    "current_token_layout",
]
