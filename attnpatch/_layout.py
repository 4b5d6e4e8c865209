"""``TokenLayout``: which tokens of an attention call are text and which are image, and the grid.

Captured per forward by a hook on each patched denoiser (UNet, transformer, VAE) and refined per
attention call by the patched processor (which knows the call's query/key lengths and whether its
model puts the text first or last in joint attention). The dispatcher attaches it to the call
(``AttentionCall.token_layout``) for a backend that declares ``reads_token_layout``; any backend
can also ask :func:`current_token_layout`. Nothing is computed unless someone asks (a Flux grid
read from ``img_ids`` costs a device sync, so it is done lazily and at most once per forward).

Under ``torch.compile`` the same objects are built while dynamo traces, from shapes only, and
published through a plain attribute instead of a ContextVar (which dynamo cannot trace): the
layout is a constant of the graph, guarded by the shapes it was read from. A grid that only
``img_ids`` values tell (Flux) comes from the grids this denoiser saw in eager forwards, keyed by
image-token count.

This module imports nothing from the rest of attnpatch: the patcher writes, strategies read.
"""

from __future__ import annotations

import contextvars
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ._caches import BoundedCache

__all__ = ["TokenLayout", "current_token_layout"]

@dataclass(frozen=True)
class TokenLayout:
    """The token structure of one attention call (or, outside a call, of one model forward).

    ``text_position``:

    - ``"none"``: every query and key token is an image token (self-attention over the latent
      grid: UNet ``attn1``, Wan self-attention, a VAE mid-block);
    - ``"first"``: joint attention, the sequence is ``[text | image]`` (Flux, QwenImage);
    - ``"last"``: joint attention, the sequence is ``[image | text]`` (SD3);
    - ``"key"``: cross-attention, queries are image tokens and every key is a text (context)
      token (UNet ``attn2``, PixArt, Wan cross-attention);
    - ``"unknown"``: joint attention whose text position this model does not declare.

    ``frames``/``height``/``width`` are the image grid in tokens at this call's resolution
    (after patchification; per resolution level in a UNet); ``None`` where it can't be known
    (e.g. a VAE decode, which has no forward hook, or packed latents without ids).
    """

    text_tokens: int = 0
    text_position: str = "none"
    frames: int = 1
    height: Optional[int] = None
    width: Optional[int] = None
    seq_len_q: Optional[int] = None
    seq_len_kv: Optional[int] = None
    model: Optional[str] = None

    @property
    def grid(self) -> Optional[tuple[int, int, int]]:
        """(frames, height, width) in tokens, or None when unknown."""
        if self.height is None or self.width is None:
            return None
        return (self.frames, self.height, self.width)

    @property
    def image_tokens(self) -> Optional[int]:
        """The number of image tokens in the query sequence."""
        if self.grid is not None:
            return self.frames * self.height * self.width
        if self.seq_len_q is None:
            return None
        if self.text_position in ("first", "last"):
            return self.seq_len_q - self.text_tokens
        return self.seq_len_q

    @property
    def image_slice(self) -> Optional[slice]:
        """Where the image tokens are in the query (and, except for ``"key"``, key) sequence."""
        n = self.image_tokens
        if n is None:
            return None
        if self.text_position == "first":
            return slice(self.text_tokens, self.text_tokens + n)
        return slice(0, n)

    @property
    def text_slice(self) -> Optional[slice]:
        """Where the text tokens are: in the joint sequence, or (``"key"``) in the keys."""
        if self.text_position == "first":
            return slice(0, self.text_tokens)
        if self.text_position == "last":
            n = self.image_tokens
            return None if n is None else slice(n, n + self.text_tokens)
        if self.text_position == "key":
            return slice(0, self.text_tokens)
        if self.text_position == "none":
            return slice(0, 0)
        return None


class ForwardInfo:
    """What a denoiser's forward pre-hook saw: the model, its latent grid and text length.

    ``grid`` is resolved lazily (``img_ids`` live on the device: reading them syncs).
    """

    __slots__ = ("model", "image_tokens", "text_tokens", "_grid", "_ids", "_cache", "previous",
                 "known_grids")

    def __init__(self, model: str, image_tokens: Optional[int], text_tokens: int,
                 grid: Optional[tuple[int, int, int]] = None, ids: Any = None):
        self.model = model
        self.image_tokens = image_tokens
        self.text_tokens = text_tokens
        self._grid = grid
        self._ids = ids
        self._cache: dict = {}
        self.previous: Optional[ForwardInfo] = None
        #: image-token count -> grid read from ids in earlier eager forwards of this denoiser
        #: (set by its hooks): the grid under torch.compile, where ids values can't be read
        self.known_grids: Optional[dict] = None

    def grid(self) -> Optional[tuple[int, int, int]]:
        if self._grid is None and self._ids is not None:
            if torch.compiler.is_dynamo_compiling():
                if self.known_grids is not None and self.image_tokens is not None:
                    return self.known_grids.get(int(self.image_tokens))
                return None
            self._grid = _grid_from_ids(self._ids, self.image_tokens)
            self._ids = None
            if self._grid is not None and self.known_grids is not None:
                self.known_grids[self.image_tokens] = self._grid
        return self._grid

    def layout(self) -> TokenLayout:
        grid = self.grid()
        f, h, w = grid if grid is not None else (1, None, None)
        return TokenLayout(self.text_tokens, "unknown" if self.text_tokens else "none", f, h, w,
                           model=self.model)


_ID_GRIDS = BoundedCache(64)


def _grid_from_ids(ids: torch.Tensor, image_tokens: Optional[int]):
    """Position ids (S, C) or (B, S, C): Flux's columns are (0, row, col), Flux2's (t, row,
    col, l); with C == 2, (row, col). One extent per column, read with a few device syncs."""
    try:
        # the same ids tensor comes back every denoising step: reuse its grid without the
        # device syncs below. Keyed on the tensor object itself (a weak reference), never on its
        # address, which the CUDA caching allocator hands to the next tensor once it is freed.
        # Inference-mode tensors track no version, so an in-place edit could not be seen:
        # those are read every time.
        key = None if ids.is_inference() else id(ids)
        cached = None if key is None else _ID_GRIDS.get(key)
        if (cached is not None and cached[0]() is ids and cached[1] == ids._version
                and cached[2] == image_tokens):
            return cached[3]
        flat = ids.reshape(-1, ids.shape[-1])
        if image_tokens is not None and ids.dim() == 3:
            flat = ids[0]
        extent = (flat.amax(dim=0) - flat.amin(dim=0) + 1).tolist()  # one sync
        if len(extent) == 2:
            grid = (1, int(extent[0]), int(extent[1]))
        else:
            grid = (int(extent[0]), int(extent[1]), int(extent[2]))
        if image_tokens is not None and grid[0] * grid[1] * grid[2] != image_tokens:
            grid = None
    except Exception:  # ids in an unexpected format: leave the grid unknown
        return None
    if key is not None:
        _ID_GRIDS.put(key, (weakref.ref(ids), ids._version, image_tokens, grid))
    return grid


# The innermost running patched denoiser forward, and the attention call in flight. The
# processors set LAYOUT_CALL to (joint_text, query, key, seq_dim) around each call: tensors, not
# lengths, so shapes are read only by the (rare) backend that asks current_token_layout().
_FORWARD: contextvars.ContextVar[Optional[ForwardInfo]] = contextvars.ContextVar(
    "attnpatch_forward", default=None)
LAYOUT_CALL: contextvars.ContextVar[Optional[tuple]] = contextvars.ContextVar(
    "attnpatch_call", default=None)


class _Traced:
    """What the two ContextVars hold, while dynamo traces (it cannot trace a ContextVar). Only
    written and read in traced code: dynamo runs traces one at a time, and the values (objects
    of the trace) never reach the compiled graph except as the constants read from them."""

    __slots__ = ("forward", "call")

    def __init__(self):
        self.forward: Optional[ForwardInfo] = None
        self.call: Optional[tuple] = None  # (joint_text, seq_len_q, seq_len_kv)


_TRACED = _Traced()


def enter_forward(info: ForwardInfo) -> None:
    if torch.compiler.is_dynamo_compiling():
        info.previous = _TRACED.forward
        _TRACED.forward = info
        return
    info.previous = _FORWARD.get()
    _FORWARD.set(info)


def exit_forward() -> None:
    if torch.compiler.is_dynamo_compiling():
        info = _TRACED.forward
        _TRACED.forward = None if info is None else info.previous
        return
    info = _FORWARD.get()
    _FORWARD.set(None if info is None else info.previous)


def call_layout(joint_text: Optional[str], seq_len_q: int, seq_len_kv: int
                ) -> TokenLayout:
    """The layout of one attention call of ``seq_len_q`` queries and ``seq_len_kv`` keys made
    inside the running patched forward (eager or traced); ``joint_text`` is where the calling
    module's model puts text in joint attention ("first"/"last"/None). Outside any patched
    forward: self-attention over image tokens, or cross-attention when the lengths differ."""
    traced = torch.compiler.is_dynamo_compiling()
    info = _TRACED.forward if traced else _FORWARD.get()
    if info is None:
        cross = seq_len_q != seq_len_kv
        return TokenLayout(seq_len_kv if cross else 0, "key" if cross else "none",
                           seq_len_q=seq_len_q, seq_len_kv=seq_len_kv)
    if traced:  # no cache: a dict mutated in a trace makes dynamo refuse later mappingproxies
        return _call_layout(info, joint_text, seq_len_q, seq_len_kv)
    key = (joint_text, seq_len_q, seq_len_kv)
    layout = info._cache.get(key)
    if layout is None:
        layout = _call_layout(info, joint_text, seq_len_q, seq_len_kv)
        info._cache[key] = layout
    return layout


def set_traced_call(call: Optional[tuple]) -> Optional[tuple]:
    """While dynamo traces: make ``call``, ``(joint_text, seq_len_q, seq_len_kv)``, the call in
    flight (for :func:`current_token_layout`); returns the previous one, to put back."""
    previous = _TRACED.call
    _TRACED.call = call
    return previous


def current_token_layout() -> Optional[TokenLayout]:
    """The :class:`TokenLayout` of the attention call in flight (inside a patched model), or of
    the innermost running patched model's forward between calls; None outside both. The same
    in eager mode and while ``torch.compile`` traces (``fullgraph=True`` included).

    A backend gets it as ``call.token_layout`` when it declares ``reads_token_layout``; this
    function serves the others (and code between calls).
    """
    if torch.compiler.is_dynamo_compiling():
        if _TRACED.call is not None:
            joint_text, sq, sk = _TRACED.call
            return call_layout(joint_text, int(sq), int(sk))
        info = _TRACED.forward
        return None if info is None else info.layout()
    info = _FORWARD.get()
    call = LAYOUT_CALL.get()
    if call is None:
        return None if info is None else info.layout()
    joint_text, query, key, seq_dim = call
    return call_layout(joint_text, query.shape[seq_dim], key.shape[seq_dim])


def _call_layout(info: ForwardInfo, joint_text: Optional[str], sq: int, sk: int) -> TokenLayout:
    grid = info.grid()
    level = _level_grid(grid, sq) if grid is not None else None
    if level is None and grid is None and info.image_tokens == sq:
        level = (1, None, None)
    if sq == sk:
        if level is not None:
            return TokenLayout(0, "none", *level, sq, sk, info.model)
        if info.image_tokens is not None and sq > info.image_tokens:
            f, h, w = grid if grid is not None else (1, None, None)
            return TokenLayout(sq - info.image_tokens, joint_text or "unknown", f, h, w, sq, sk,
                               info.model)
        return TokenLayout(0, "none", 1, None, None, sq, sk, info.model)
    f, h, w = level if level is not None else (1, None, None)
    return TokenLayout(sk, "key", f, h, w, sq, sk, info.model)


def _level_grid(grid: tuple[int, int, int], tokens: int) -> Optional[tuple[int, int, int]]:
    """The grid at the resolution level with ``tokens`` tokens: the input grid halved (rounding
    up, like a stride-2 conv with padding 1) until it matches; None if no level matches."""
    f, h, w = grid
    for _ in range(10):
        if f * h * w == tokens:
            return (f, h, w)
        if h <= 1 and w <= 1:
            break
        h, w = (h + 1) // 2, (w + 1) // 2
    return None
