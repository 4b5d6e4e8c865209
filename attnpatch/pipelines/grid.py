"""Where a denoiser's latent grid comes from: one forward's inputs -> :class:`ForwardInfo`.

Three sources, one per way diffusers models take their latents (each family's record names
its own in :attr:`Family.grid <attnpatch.pipelines.families.Family.grid>`):

- ``"latents"``: 4-D ``(B, C, H, W)`` or 5-D ``(B, C, F, H, W)`` latents (``(B, F, C, H, W)``
  in CogVideoX), divided by the model's patch sizes: UNets, SD3, PixArt, Sana, Wan,
  HunyuanVideo;
- ``"img_shapes"``: packed tokens ``(B, S, C)`` with QwenImage's ``img_shapes`` (``(F, H, W)``
  per image, in tokens);
- ``"img_ids"``: packed tokens with Flux's position ids ``img_ids``, ``(S, 3)`` with rows and
  columns in the last two columns. The ids live on the device, so the grid is read from them
  lazily, only when a backend asks for the layout;
- ``"img_ids_thwl"``: the same with Flux2's ``(S, 4)`` ids, columns ``(t, h, w, l)``.

A forward's family's source is tried first, then the others in the order above (so a model not
in the family table still gets its grid); packed tokens that none of them describes give the
token count without a grid.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch

from .._layout import ForwardInfo
from .families import model_family

__all__ = ["GRID_SOURCES", "forward_info", "forward_arguments", "positional_names",
           "patch_sizes", "grid_from_latents", "grid_from_img_shapes", "grid_from_img_ids",
           "grid_from_thwl_ids"]

#: (model, hidden_states, forward kwargs, text tokens) -> ForwardInfo, or None when the source
#: does not describe this forward
GridSource = Callable[[Any, torch.Tensor, dict, int], Optional[ForwardInfo]]


def _get(config: Any, key: str, default: Any = None) -> Any:
    if hasattr(config, "get"):
        return config.get(key, default)
    return getattr(config, key, default)


def patch_sizes(config: Any) -> tuple[int, int, int]:
    """(frames, height, width) latents per token, from a model config's ``patch_size`` (an int,
    or a 2- or 3-tuple) and ``patch_size_t``; 1 where the config has none."""
    p = _get(config, "patch_size") or 1
    pt = _get(config, "patch_size_t") or 1
    if isinstance(p, (tuple, list)):
        if len(p) == 3:
            return int(p[0] or 1), int(p[1] or 1), int(p[2] or 1)
        if len(p) == 2:
            return int(pt), int(p[0] or 1), int(p[1] or 1)
        p = p[0]
    return int(pt), int(p), int(p)


def grid_from_latents(model: Any, hidden_states: torch.Tensor, kwargs: dict,
                      text: int) -> Optional[ForwardInfo]:
    """The grid of 4-D or 5-D latents, in tokens (latents divided by the patch sizes)."""
    name = type(model).__name__
    config = getattr(model, "config", {})
    pt, ph, pw = patch_sizes(config)
    hs = hidden_states
    if hs.dim() == 5:  # (B, C, F, H, W), or (B, F, C, H, W) as in CogVideoX
        channels = _get(config, "in_channels")
        frames = hs.shape[2]
        if channels is not None and hs.shape[1] != channels:
            if hs.shape[2] != channels:
                return ForwardInfo(name, None, text)
            frames = hs.shape[1]
        grid = (frames // pt, hs.shape[3] // ph, hs.shape[4] // pw)
        return ForwardInfo(name, grid[0] * grid[1] * grid[2], text, grid)
    if hs.dim() == 4:  # (B, C, H, W)
        grid = (1, hs.shape[2] // ph, hs.shape[3] // pw)
        return ForwardInfo(name, grid[1] * grid[2], text, grid)
    return None


def grid_from_img_shapes(model: Any, hidden_states: torch.Tensor, kwargs: dict,
                         text: int) -> Optional[ForwardInfo]:
    """The grid of packed tokens from QwenImage's ``img_shapes`` (the first image's, when it
    accounts for every token)."""
    shapes = kwargs.get("img_shapes")
    if hidden_states.dim() != 3 or not shapes:
        return None
    tokens = hidden_states.shape[1]
    try:
        first = shapes[0][0] if isinstance(shapes[0], (list, tuple)) and isinstance(
            shapes[0][0], (list, tuple)) else shapes[0]
        grid = tuple(int(x) for x in first)
    except (TypeError, ValueError, IndexError):
        return None
    if len(grid) == 3 and grid[0] * grid[1] * grid[2] == tokens:
        return ForwardInfo(type(model).__name__, tokens, text, grid)
    return None


def grid_from_img_ids(model: Any, hidden_states: torch.Tensor, kwargs: dict,
                      text: int) -> Optional[ForwardInfo]:
    """Packed tokens with Flux-style ``img_ids``: the grid is read from the ids when asked."""
    ids = kwargs.get("img_ids")
    if hidden_states.dim() != 3 or not isinstance(ids, torch.Tensor):
        return None
    return ForwardInfo(type(model).__name__, hidden_states.shape[1], text, None, ids)


def grid_from_thwl_ids(model: Any, hidden_states: torch.Tensor, kwargs: dict,
                       text: int) -> Optional[ForwardInfo]:
    """Packed tokens with Flux2's ``(t, h, w, l)`` ids (read when asked; ``t`` is 0 for every
    generated token)."""
    ids = kwargs.get("img_ids")
    if hidden_states.dim() != 3 or not isinstance(ids, torch.Tensor) or ids.shape[-1] != 4:
        return None
    return ForwardInfo(type(model).__name__, hidden_states.shape[1], text, None, ids)


#: every grid source, by the name family records use, in the order tried for unknown models
GRID_SOURCES: dict[str, GridSource] = {
    "latents": grid_from_latents,
    "img_shapes": grid_from_img_shapes,
    "img_ids": grid_from_img_ids,
    "img_ids_thwl": grid_from_thwl_ids,
}


#: a module class -> the names of its forward's positional parameters (after self)
_POSITIONAL: dict[type, tuple] = {}


def positional_names(module: Any) -> tuple:
    """The names of ``type(module).forward``'s positional parameters, in order (after self)."""
    cls = type(module)
    names = _POSITIONAL.get(cls)
    if names is None:
        try:
            params = list(inspect.signature(cls.forward).parameters.values())[1:]  # self
        except (TypeError, ValueError, AttributeError):  # no readable forward signature
            params = []
        names = _POSITIONAL[cls] = tuple(
            p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    return names


def forward_arguments(module: Any, args: tuple, kwargs: dict) -> dict:
    """One forward's arguments by name (what a hook with ``with_kwargs=True`` gets): ``args``
    named by :func:`positional_names`, then ``kwargs``; so a value reads the same whether it
    was passed by name or by place (Flux takes ``timestep`` fourth, a UNet second). Extra
    positional values (``*args``) stay unnamed."""
    if not args:
        return kwargs
    return {**dict(zip(positional_names(module), args)), **kwargs}


def forward_info(model: Any, args: tuple, kwargs: dict) -> Optional[ForwardInfo]:
    """The latent grid (in tokens) and text length of one denoiser forward, from its inputs
    (by name or by place)."""
    kwargs = forward_arguments(model, args, kwargs)
    hs = kwargs.get("hidden_states", kwargs.get("sample"))
    if hs is None and args:
        hs = args[0]
    if not isinstance(hs, torch.Tensor):
        return None
    ehs = kwargs.get("encoder_hidden_states")
    text = ehs.shape[1] if isinstance(ehs, torch.Tensor) and ehs.dim() == 3 else 0
    family = model_family(model)
    order = list(GRID_SOURCES)
    if family is not None and family.grid in GRID_SOURCES:
        order.remove(family.grid)
        order.insert(0, family.grid)
    for name in order:
        info = GRID_SOURCES[name](model, hs, kwargs, text)
        if info is not None:
            return info
    if hs.dim() == 3:  # packed tokens without a grid source: the count only
        return ForwardInfo(type(model).__name__, hs.shape[1], text)
    return None
