"""Where a denoiser's image tokens can be put in another order for the length of one forward.

A strategy that wants its attention calls to find the image tokens in its own order (the
block_sparse tile patterns: each tile contiguous) can reorder them once per denoiser forward
instead of in every call, when every op between the attentions is per token (norms, MLPs,
modulation, cross-attention to text: keys that are not image tokens). Where the tokens enter
(and where the tables that say each token's position, the rotary tables, are made) depends on
the model: Flux takes packed tokens and their ids, Wan and SD3 patchify inside their forward.
A :class:`TokenOrder` names those places for one model class, like diffusers' context-parallel
plans name where to shard and gather:

- ``enter``: tensors put in the new order (image tokens, rotary tables, per-token
  modulation, ControlNet residuals), as arguments or outputs of submodules;
- ``leave``: tensors put back in the model's order (before the first op that is not per token,
  or the model's output).

Each family's record (:attr:`attnpatch.pipelines.families.Family.token_order`) gives the plan
of its models; a model outside the table whose forward takes ``hidden_states`` and ``img_ids``
(Flux-like) gets :data:`IMG_IDS`. The paths were read from diffusers 0.41 and 0.42.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch

__all__ = ["Tokens", "TokenOrder", "IMG_IDS", "WAN", "SD3", "img_ids_token_order",
           "wan_token_order", "sd3_token_order", "token_dim"]


@dataclass(frozen=True)
class Tokens:
    """One tensor (or list of tensors) that carries the image tokens: an argument or the output
    of the module at ``path`` (``""``: the model itself).

    ``index``/``name``: the positional index and keyword of the argument; for an output, the
    item of a tuple (or ``ModelOutput``) output, None for the output itself or every tensor of
    a tuple output. ``dims``: the token dim is the first of these whose size is the image-token
    count; ``ndim``: only tensors with that many dims carry tokens (others are left alone: Wan's
    modulation is per token only in Wan 2.2 TI2V). ``required``: a tensor that must be there
    with the tokens (else the forward is refused rather than computed in two orders).
    """

    path: str = ""
    output: bool = False
    index: Optional[int] = None
    name: Optional[str] = None
    dims: tuple[int, ...] = (1,)
    ndim: Optional[int] = None
    required: bool = False


@dataclass(frozen=True)
class TokenOrder:
    """A model's places where the image tokens enter a new order and leave it (module
    docstring)."""

    enter: tuple[Tokens, ...]
    leave: tuple[Tokens, ...]

    def paths(self) -> tuple[str, ...]:
        """The submodules the plan hooks, in first-use order (``""``: the model)."""
        return tuple(dict.fromkeys(t.path for t in self.enter + self.leave))


def token_dim(tensor: torch.Tensor, where: Tokens, tokens: int) -> Optional[int]:
    """The dim of ``tensor`` that holds the ``tokens`` image tokens, per ``where``; None when
    it has none."""
    if where.ndim is not None and tensor.dim() != where.ndim:
        return None
    for d in where.dims:
        if -tensor.dim() <= d < tensor.dim() and tensor.shape[d] == tokens:
            return d
    return None


#: Flux-like: packed tokens ``(B, N, C)`` with ``img_ids`` ``(N, 3)`` (the rotary tables are
#: made from the ids, so they follow), ControlNet residuals added per block, the output
#: ``(B, N, C)`` per token
IMG_IDS = TokenOrder(
    enter=(Tokens(index=0, name="hidden_states", required=True),
           Tokens(name="img_ids", dims=(-2,), required=True),
           Tokens(name="controlnet_block_samples"),
           Tokens(name="controlnet_single_block_samples")),
    leave=(Tokens(output=True, index=0, required=True),))

#: ``WanTransformer3DModel``: the patch embedding and the rotary tables are made inside the
#: forward, so the tokens enter where the first block starts (as in diffusers' ``_cp_plan``),
#: the rotary tables where ``rope`` ends (``(cos, sin)``, each ``(1, N, 1, D)``; a complex
#: ``(1, 1, N, D/2)`` table in older diffusers), Wan 2.2 TI2V's per-token modulation
#: ``timestep_proj`` ``(B, N, 6D)`` where ``condition_embedder`` ends; they leave where
#: ``norm_out`` starts (its shift and scale are per token in TI2V, in the model's order).
#: Blocks: self-attention, cross-attention to text, per-token norms, modulation and MLP.
WAN = TokenOrder(
    enter=(Tokens("rope", output=True, dims=(1, 2), ndim=4, required=True),
           Tokens("condition_embedder", output=True, index=1, ndim=3),
           Tokens("blocks.0", index=0, name="hidden_states", required=True)),
    leave=(Tokens("norm_out", index=0, name="inputs", required=True),))

#: ``SD3Transformer2DModel``: the image tokens (with their positional embedding) enter where
#: ``pos_embed`` ends and leave where ``norm_out`` starts; ControlNet residuals are model
#: arguments. Joint blocks keep the text in ``encoder_hidden_states``; per-token ops only
#: besides attention (and SD3.5's image-only second attention).
SD3 = TokenOrder(
    enter=(Tokens("pos_embed", output=True, ndim=3, required=True),
           Tokens(name="block_controlnet_hidden_states")),
    leave=(Tokens("norm_out", index=0, name="x", required=True),))


def _has_paths(model: torch.nn.Module, plan: TokenOrder) -> bool:
    for path in plan.paths():
        try:
            model.get_submodule(path)
        except AttributeError:
            return False
    return True


def img_ids_token_order(model: Any) -> Optional[TokenOrder]:
    """:data:`IMG_IDS` for a model whose forward takes ``hidden_states`` and ``img_ids``; None
    for a ControlNet (``controlnet_cond``): its conditioning image tokens enter and its
    per-block residuals leave where the plan does not cover them (per-call order there)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if "controlnet_cond" in params:
        return None
    return IMG_IDS if {"hidden_states", "img_ids"} <= set(params) else None


def wan_token_order(model: Any) -> Optional[TokenOrder]:
    """:data:`WAN` for ``WanTransformer3DModel`` itself (VACE and Animate add control and face
    tokens whose order the plan does not cover: None, per-call order there)."""
    if type(model).__name__ != "WanTransformer3DModel" or not _has_paths(model, WAN):
        return None
    return WAN


def sd3_token_order(model: Any) -> Optional[TokenOrder]:
    """:data:`SD3` for ``SD3Transformer2DModel``."""
    if type(model).__name__ != "SD3Transformer2DModel" or not _has_paths(model, SD3):
        return None
    return SD3
