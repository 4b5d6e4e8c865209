"""Block-sparse attention, exact to the layout it states (issue 19).

**Contract.** ``block_layout`` is a bool tensor (H or 1, ceil(Sq / bq), ceil(Sk / bk)) and
``block_size`` an int or (bq, bk) (default 128): query i attends key j iff
``block_layout[h, i // bq, j // bk]`` (the last blocks may be ragged). The result equals dense
attention under that expanded element mask, to fp rounding; a user ``attn_mask`` and
``is_causal`` apply on top. A query row the layout (with ``is_causal``) leaves without a key is
an error, unless ``empty_rows="zeros"`` (then its output is 0 and its lse -inf). Without a
layout or pattern every block is kept: dense attention (the report says so).

**Patterns** (``pattern=``), each an element mask built from block or tile indices (never a
Q×K matrix); with joint text+image attention (the call's ``TokenLayout`` puts text first or
last) text queries attend every key and every query attends the text keys, unless
``text="local"`` (text attends text only, image attends image only). Cross-attention calls run
dense.

- ``"tile2d"`` / ``"tile3d"``: Sliding Tile Attention (STA, FastVideo). The layout's image grid
  (frames, height, width) is cut into tiles of ``tile`` tokens per axis ((h, w) for 2-D, per
  frame; (t, h, w) for 3-D; defaults (8, 16) and (2, 8, 8): 128 tokens), ragged at the far
  edges. Query tile c attends the key tiles of its ``window`` (tiles per axis, default 3): on
  each axis the tiles start..start+window-1 with start = clamp(c - (window-1)//2, 0,
  n_tiles - window), so the window shifts inside the grid at the edges and every window has
  the same size. A window larger than the grid is clamped to it (the report says so). The
  kernel sees the tokens reordered so that each tile is contiguous (permuted before the kernel,
  back after).
- ``"local1d"``: image blocks of ``block_size`` in sequence order; query block i attends key
  blocks j with |c - j| <= ``window`` (default 1), c = (i·bq) // bk.
- ``"strided"``: Child et al. 2019's strided pattern on blocks: |c - j| <= ``window``
  (default 0) or (c - j) % ``stride`` == 0.
- ``"global_tokens"``: ``local1d`` plus ``global_tokens`` (n, or (first n, last m) image
  tokens) that attend and are attended by every token. ``global_tokens`` also applies to the
  other 1-D patterns.
- ``"radial"``: Radial Attention's static O(n log n) video mask (Li et al., "Radial Attention:
  O(n log n) Sparse Attention with Energy Decay for Long Video Generation", 2025,
  arXiv:2506.19852; rule of its reference code ``radial_attn/attn_mask.py``): for query frame
  i and key frame j at distance d = |i - j| (frames of s = height·width tokens): d = 0 the
  whole frame; else, with decay = 2^bit_length(s) / 2^bit_length(d), tokens at spatial
  positions x, y attend iff |x - y| <= max(decay, bk) and, when decay < bk, d is a multiple of
  bk // decay (density and band width halve as distance doubles). ``sink=True`` (default):
  every token attends the first frame. The layout keeps each (bq, bk) block of image tokens
  that holds at least one such pair (the kernel then attends whole blocks: exact to that
  layout).
- ``"topk"``: chosen per call from the values: q and k are mean-pooled per image block; each
  query block keeps the ceil(``keep``·n_blocks) key blocks (``keep`` in (0, 1], default 0.25)
  with the highest pooled score q̄·k̄ᵀ, plus its local blocks (|c - j| <= ``window``, default
  1) and the global ones (text, ``global_tokens``). Exact to the layout it chose.
- ``"mask_mod"``: a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (tensor
  indices; it must broadcast): exact attention under that element mask.

**Kernels** (``kernel=``, default "auto"): ``"mask"`` (the CPU path; any device): the expanded
element mask (and the user's mask, causal) through the ``auto`` dense kernel, exact, with its
gradients. ``"flash4"``: FlashAttention-4's block sparsity (``flash_attn.cute.flash_attn_func``
with ``block_sparse_tensors`` / ``block_sparse_tensors_bwd``, 128×128 blocks): full blocks with
no mask work, partial ones (ragged tiles, text not block-aligned, top-k blocks straddling groups)
through a CuTe ``mask_mod`` that looks the token groups up in aux tensors; with a user mask or
``is_causal`` ``auto`` takes Flex, and the report says why. ``"flex"``:
FlexAttention (compiled on CUDA) with a ``BlockMask`` built from the block lists
(``BlockMask.from_kv_blocks``: full blocks skip the mask, partial blocks run a ``mask_mod`` that
looks the groups up). ``auto``: flash4 on CUDA where it can, else flex; the mask path on CPU.
After the first call of a signature, a static layout on flash4 (no mask) runs through the
dispatcher's specialized kernel (:meth:`BlockSparseAttention.specialize`): the same computation,
without the per-call Python that a call timed alone shows before its kernel starts.

**Token order.** A tile pattern permutes the tokens into tile order before the kernel and
back after, per call (full tiles first, ragged edge tiles last: with tiles of a multiple of 128
tokens the kernel blocks over the full tiles are whole). On a denoiser whose family has a
token-order plan (:mod:`attnpatch.pipelines.token_order`: Flux-like models taking ``img_ids``,
Wan, SD3) ``reorder="auto"`` (default) does it once per forward instead, where the plan says
the tokens enter and leave (Flux: image tokens, ids and ControlNet residuals at the entry, the
output at the exit; Wan: the first block's input, the rotary tables and per-token modulation
where they are made, back before ``norm_out``; SD3: ``pos_embed``'s output, back before
``norm_out``); the calls then permute nothing. Under ``torch.compile`` the calls permute
themselves. Other grid-aware strategies in that model would see the tile order: give them
``reorder="call"`` models.

**Schedules.** ``dense_steps=N``: in a patched pipeline the first N denoising steps of every
pipeline call run dense (a forward hook on the denoiser counts steps by its timestep changing;
a rising timestep starts a new call). Per-module control is ``patch(..., backend={glob:
...})``.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from .._caches import BoundedCache
from .._errors import AttnPatchError, BackendUnavailableError
from .._layout import current_token_layout
from ..backends.math import reference_attention
from ..call import AttentionCall
from ..dispatch import attention, run_backend
from ..registry import Strategy, get_backend, option_values, register_backend
from ..pipelines.families import token_order_plan
from ..pipelines.grid import forward_arguments, positional_names
from ..pipelines.token_order import TokenOrder, Tokens, token_dim
from . import _block_patterns as P

__all__ = ["BlockSparseAttention", "BlockSparseOptions", "topk_allow"]

logger = logging.getLogger(__name__)

NAME = "block_sparse"
PATTERNS = ("tile2d", "tile3d", "local1d", "strided", "global_tokens", "radial", "topk",
            "mask_mod")
GRID_PATTERNS = ("tile2d", "tile3d", "radial")
KERNELS = ("auto", "mask", "flex", "flash4")
#: the block size of the GPU kernels' lists (FlashAttention-4 on sm90 and Flex: 128×128)
KERNEL_BLOCK = 128
_DEFAULT_TILE = {"tile2d": (8, 16), "tile3d": (2, 8, 8)}
_DEFAULT_WINDOW = {"local1d": 1, "strided": 0, "global_tokens": 1, "topk": 1}


class _FrozenLayout:
    """A ``block_layout`` tensor as an option value: hashed by identity and version (cheap per
    call), equal to another with the same content."""

    __slots__ = ("tensor", "_key")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self._key = (id(tensor), tensor._version, tuple(tensor.shape), tensor.device)

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other) -> bool:
        return isinstance(other, _FrozenLayout) and (
            self._key == other._key or (self.tensor.shape == other.tensor.shape
                                        and self.tensor.device == other.tensor.device
                                        and bool(torch.equal(self.tensor, other.tensor))))

    def __repr__(self) -> str:
        return f"block_layout{tuple(self.tensor.shape)}"


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _ints(option: str, value, axes: int, allow_zero: bool = False) -> tuple:
    """``value`` (an int for every axis, or one per axis) as a tuple of ``axes`` ints."""
    ok = (lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0) if allow_zero \
        else _positive_int
    if ok(value):
        return (value,) * axes
    if isinstance(value, (tuple, list)) and len(value) == axes and all(ok(x) for x in value):
        return tuple(value)
    kind = "non-negative" if allow_zero else "positive"
    raise AttnPatchError(f"block_sparse: {option} must be a {kind} int or a tuple of {axes} "
                         f"{kind} ints, got {value!r}")


@dataclass(frozen=True)
class BlockSparseOptions:
    """The options of :class:`BlockSparseAttention` (see the module docstring), validated when
    given. Give ``block_layout`` or ``pattern`` (``mask_mod`` alone means
    ``pattern="mask_mod"``); with neither, every block is kept (dense attention, and the
    report says so)."""

    block_layout: Any = None
    block_size: Any = None
    pattern: Optional[str] = None
    tile: Any = None
    window: Any = None
    stride: Optional[int] = None
    global_tokens: Any = 0
    keep: Optional[float] = None
    sink: Optional[bool] = None
    text: Optional[str] = None
    mask_mod: Optional[Callable] = None
    empty_rows: str = "error"
    kernel: str = "auto"
    dense_steps: int = 0
    reorder: str = "auto"

    def __post_init__(self):
        set_ = object.__setattr__
        layout = self.block_layout
        if isinstance(layout, torch.Tensor):
            if layout.dtype != torch.bool or layout.dim() != 3:
                raise AttnPatchError(
                    f"block_sparse: block_layout must be a bool tensor (H or 1, n_q_blocks, "
                    f"n_k_blocks), got {layout.dtype} of shape {tuple(layout.shape)}: build it "
                    "with a comparison (e.g. scores > t) or .bool(), and index heads first")
            set_(self, "block_layout", _FrozenLayout(layout))
        elif layout is not None and not isinstance(layout, _FrozenLayout):
            raise AttnPatchError(f"block_sparse: block_layout must be a bool torch.Tensor (H or "
                                 f"1, n_q_blocks, n_k_blocks) or None, got "
                                 f"{type(layout).__name__}")
        if self.mask_mod is not None:
            if not callable(self.mask_mod):
                raise AttnPatchError(f"block_sparse: mask_mod must be a callable "
                                     f"fn(b, h, q_idx, kv_idx) -> bool, got "
                                     f"{type(self.mask_mod).__name__}")
            if self.pattern is None:
                set_(self, "pattern", "mask_mod")
        pattern = self.pattern
        if pattern is not None and pattern not in PATTERNS:
            raise AttnPatchError(f"block_sparse: unknown pattern {pattern!r}; patterns: "
                                 f"{', '.join(PATTERNS)}")
        if pattern == "mask_mod" and self.mask_mod is None:
            raise AttnPatchError("block_sparse: pattern='mask_mod' needs mask_mod=fn(b, h, q_idx, "
                                 "kv_idx) -> bool")
        if self.mask_mod is not None and pattern != "mask_mod":
            raise AttnPatchError(f"block_sparse: mask_mod is the 'mask_mod' pattern, not an "
                                 f"option of pattern={pattern!r}: drop one of them")
        if layout is not None and pattern is not None:
            raise AttnPatchError("block_sparse: pass block_layout= or pattern=, not both")
        # an option the call would not read is refused, not ignored (defaults: None = not given)
        if self.block_size is not None and pattern in ("tile2d", "tile3d", "mask_mod"):
            raise AttnPatchError(
                f"block_sparse: block_size is not an option of pattern={pattern!r} ("
                + ("its blocks are its tiles: set tile=" if pattern != "mask_mod" else
                   "it runs on FlexAttention's 128-token blocks") + ")")
        set_(self, "block_size", _ints("block_size", 128 if self.block_size is None
                                       else self.block_size, 2))
        if self.sink is not None and pattern != "radial":
            given = pattern or ("block_layout" if layout is not None else "no pattern")
            raise AttnPatchError(f"block_sparse: sink is an option of pattern='radial', not of "
                                 f"{given!r}")
        if self.text is not None and pattern in (None, "mask_mod"):
            raise AttnPatchError(
                "block_sparse: text is an option of the patterns built from the call's "
                "TokenLayout (tile2d, tile3d, local1d, strided, global_tokens, radial, topk), "
                f"not of {'a block_layout' if layout is not None else pattern or 'no pattern'}: "
                "write the text rows and columns into the layout yourself")
        set_(self, "sink", True if self.sink is None else self.sink)
        set_(self, "text", "global" if self.text is None else self.text)
        if pattern in ("tile2d", "tile3d"):
            axes = 2 if pattern == "tile2d" else 3
            set_(self, "tile", _ints("tile", self.tile if self.tile is not None
                                     else _DEFAULT_TILE[pattern], axes))
            set_(self, "window", _ints("window", self.window if self.window is not None
                                       else 3, axes))
        else:
            for name in ("tile",):
                if getattr(self, name) is not None:
                    raise AttnPatchError(f"block_sparse: {name} is an option of the tile2d and "
                                         f"tile3d patterns, not of pattern={pattern!r}")
            if pattern in _DEFAULT_WINDOW:
                window = self.window if self.window is not None else _DEFAULT_WINDOW[pattern]
                set_(self, "window", _ints("window", window, 1, allow_zero=True)[0])
            elif self.window is not None:
                raise AttnPatchError(f"block_sparse: window is not an option of "
                                     f"pattern={pattern!r} (patterns with a window: tile2d, "
                                     f"tile3d, {', '.join(_DEFAULT_WINDOW)})")
        if pattern == "strided":
            stride = 4 if self.stride is None else self.stride
            if not _positive_int(stride):
                raise AttnPatchError(f"block_sparse: stride must be a positive int (blocks), "
                                     f"got {stride!r}")
            set_(self, "stride", stride)
        elif self.stride is not None:
            raise AttnPatchError("block_sparse: stride is an option of pattern='strided'")
        glob = self.global_tokens
        glob = (glob, 0) if isinstance(glob, int) and not isinstance(glob, bool) else glob
        if not (isinstance(glob, (tuple, list)) and len(glob) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in glob)):
            raise AttnPatchError(f"block_sparse: global_tokens must be n (the first n image "
                                 f"tokens) or (first, last), non-negative ints; got "
                                 f"{self.global_tokens!r}")
        set_(self, "global_tokens", tuple(glob))
        if pattern == "global_tokens" and not any(glob):
            raise AttnPatchError("block_sparse: pattern='global_tokens' needs global_tokens=n "
                                 "or (first, last) with at least one token")
        if any(glob) and pattern not in ("local1d", "strided", "global_tokens", "topk"):
            raise AttnPatchError(f"block_sparse: global_tokens applies to the 1-D patterns "
                                 f"(local1d, strided, global_tokens, topk), not to "
                                 f"{pattern or 'block_layout'!r}")
        if pattern == "topk":
            keep = 0.25 if self.keep is None else self.keep
            if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not (
                    0 < keep <= 1):
                raise AttnPatchError(f"block_sparse: keep must be in (0, 1] (the fraction of key "
                                     f"blocks each query block keeps), got {keep!r}")
            set_(self, "keep", float(keep))
        elif self.keep is not None:
            raise AttnPatchError("block_sparse: keep is an option of pattern='topk'")
        if not isinstance(self.sink, bool):
            raise AttnPatchError(f"block_sparse: sink must be True or False, got {self.sink!r}")
        if self.text not in ("global", "local"):
            raise AttnPatchError(f"block_sparse: text must be 'global' (text tokens attend and "
                                 f"are attended by every token) or 'local', got {self.text!r}")
        if self.empty_rows not in ("error", "zeros"):
            raise AttnPatchError(f"block_sparse: empty_rows must be 'error' or 'zeros', got "
                                 f"{self.empty_rows!r}")
        if self.kernel not in KERNELS:
            raise AttnPatchError(f"block_sparse: kernel must be one of {KERNELS}, got "
                                 f"{self.kernel!r}")
        if self.reorder not in ("auto", "call"):
            raise AttnPatchError(f"block_sparse: reorder must be 'auto' (tile order once per "
                                 f"denoiser forward where the model allows it, else per call) "
                                 f"or 'call', got {self.reorder!r}")
        steps = self.dense_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise AttnPatchError(f"block_sparse: dense_steps must be an int >= 0 (the first "
                                 f"denoising steps of each pipeline call that run dense), got "
                                 f"{steps!r}")


# --- the plan -----------------------------------------------------------------------------------

@dataclass
class _Plan:
    """What a call of one signature runs: ``groups`` (None: dense, or element-level
    ``mask_mod``), a summary for the report, a refusal (rows without keys), and the kernels'
    block lists, built on first use."""

    groups: Optional[P.GroupLayout]
    mode: str             # "dense", "groups", "topk", "mask_mod" or "refused"
    summary: str
    refusal: Optional[str] = None
    lists: dict = field(default_factory=dict)
    #: why the call can't run (layout, kernel, empty rows); [] if it can
    reasons: list = field(default_factory=list)
    #: (kernel, why): the kernel that runs the call
    kernel: tuple = ("mask", "")
    #: (grid, tile) of a tile pattern's token order (a denoiser hook may apply it per forward)
    order: Optional[tuple] = None


_PLANS = BoundedCache(64)


def _is_cross(call: AttentionCall) -> bool:
    layout = call.token_layout
    return call.seq_len_q != call.seq_len_kv or (layout is not None
                                                 and layout.text_position == "key")


def _geometry(call: AttentionCall) -> P.Geometry:
    layout = call.token_layout
    position = "none" if layout is None else layout.text_position
    text = layout.text_tokens if position in ("first", "last") else 0
    if not text:
        position = "none"
    grid = None if layout is None else layout.grid
    return P.Geometry(call.seq_len_q, text, position, grid)


def _meta(call: AttentionCall) -> bool:
    return call.query.device.type == "meta"


def _layout_reasons(call: AttentionCall, opts: BlockSparseOptions) -> list[str]:
    """Why these options can't run this call (independent of the tensors' values)."""
    bq, bk = opts.block_size
    if opts.block_layout is not None:
        shape = tuple(opts.block_layout.tensor.shape)
        want = (-(-call.seq_len_q // bq), -(-call.seq_len_kv // bk))
        if _meta(call):
            return []
        if shape[0] not in (1, call.num_heads) or shape[1:] != want:
            return [f"block_layout has shape {shape}; this call ({call.num_heads} heads, "
                    f"{call.seq_len_q} queries, {call.seq_len_kv} keys, block_size {(bq, bk)}) "
                    f"needs ({call.num_heads} or 1, {want[0]}, {want[1]})"]
        return []
    if opts.pattern is None or opts.pattern == "mask_mod" or _is_cross(call):
        return []
    layout = call.token_layout
    if layout is not None and layout.text_position == "unknown":
        return ["joint attention whose text position the model does not declare (TokenLayout "
                "text_position 'unknown'): a pattern could cut the prompt off; give the layout "
                "a text_position ('first' or 'last'), or use another backend"]
    geo = _geometry(call)
    if _meta(call):
        return []
    if not 0 <= geo.text < call.seq_len_q:
        return [f"the token layout has {geo.text} text tokens for a call of "
                f"{call.seq_len_q} tokens"]
    if opts.pattern in GRID_PATTERNS:
        if geo.grid is None:
            return [f"pattern={opts.pattern!r} needs the image grid (frames, height, width) of "
                    "the call's TokenLayout and this call has "
                    f"{'no layout' if layout is None else 'none'}: pass attention(..., "
                    "token_layout=TokenLayout(...)) (patched diffusers models set it), or use "
                    "a 1-D pattern (local1d, strided, global_tokens, topk)"]
        if math.prod(geo.grid) != geo.image:
            return [f"the layout's grid {geo.grid} has {math.prod(geo.grid)} tokens but the "
                    f"call has {geo.image} image tokens"]
    if opts.pattern == "radial" and bq != bk:
        return [f"pattern='radial' needs square blocks (block_size={opts.block_size})"]
    if opts.pattern == "global_tokens" or any(opts.global_tokens):
        first, last = opts.global_tokens
        if first + last > geo.image:
            return [f"global_tokens={opts.global_tokens} exceeds the {geo.image} image tokens"]
    return []


def _empty_rows(groups: P.GroupLayout, causal: bool) -> Optional[str]:
    """A description of the query rows that see no key, or None."""
    allow = groups.allow
    if causal:
        seq_q = int(groups.q_bounds[-1])
        pos = torch.arange(seq_q, device=allow.device) if groups.perm is None else groups.perm
        gq, gk = groups.group_ids("q", False), groups.group_ids("k", False)
        posk = torch.arange(int(groups.k_bounds[-1]), device=allow.device
                            ) if groups.perm is None else groups.perm
        big = max(seq_q, int(groups.k_bounds[-1])) + 1
        min_q = torch.full((groups.q_bounds.numel() - 1,), big, device=allow.device
                           ).scatter_reduce(0, gq, pos, "amin")
        min_k = torch.full((groups.k_bounds.numel() - 1,), big, device=allow.device
                           ).scatter_reduce(0, gk, posk, "amin")
        allow = allow & (min_k[None, :] <= min_q[:, None])
    empty = ~allow.any(-1)  # (Bl, Hl, Gq)
    if not bool(empty.any()):
        return None
    index = empty.nonzero()[0].tolist()
    start = int(groups.q_bounds[index[2]])
    rows = int(empty.sum())
    return (f"the layout{' with is_causal' if causal else ''} leaves query rows without any key "
            f"({rows} group(s) of rows, first: head {index[1]}, the rows from kernel position "
            f"{start}): give each query block a key block, or pass empty_rows='zeros' (out 0, "
            "lse -inf there)")


def _build(call: AttentionCall, opts: BlockSparseOptions) -> _Plan:
    device = call.device
    bq, bk = opts.block_size
    if opts.block_layout is not None:
        groups = P.user_layout(call.seq_len_q, call.seq_len_kv, bq, bk,
                               opts.block_layout.tensor, device)
        plan = _Plan(groups, "groups", f"block_layout {tuple(opts.block_layout.tensor.shape)} "
                     f"of {bq}x{bk} blocks")
    elif opts.pattern is None:
        return _Plan(None, "dense", "no block_layout or pattern: the full layout (dense)")
    elif opts.pattern == "mask_mod":
        plan = _Plan(None, "mask_mod", f"mask_mod {getattr(opts.mask_mod, '__name__', '')}")
        if opts.empty_rows == "error" and not _meta(call):
            plan.refusal = _mask_mod_empty_rows(call, opts.mask_mod)
        return plan
    elif _is_cross(call):
        return _Plan(None, "dense", f"{opts.pattern}: cross-attention ({call.seq_len_q} queries, "
                     f"{call.seq_len_kv} keys) runs dense")
    else:
        geo = _geometry(call)
        text_global = opts.text == "global"
        what, order = opts.pattern, None
        if opts.pattern in ("tile2d", "tile3d"):
            tile, window = opts.tile, opts.window
            if opts.pattern == "tile2d":
                tile, window = (1, *tile), (1, *window)
            groups = P.tile_layout(geo, tile, window, text_global, device)
            what = f"{opts.pattern} tiles {opts.tile} window {opts.window}"
            order = (tuple(geo.grid), tile)
        elif opts.pattern == "radial":
            frames, height, width = geo.grid
            blocks = P.radial_blocks(frames, height * width, bq, bk, opts.sink, device)
            groups = P.sequence_layout(geo, bq, bk, blocks[None, None], (0, 0), text_global,
                                       device)
            what = f"radial ({frames} frames of {height * width} tokens, sink={opts.sink})"
        else:
            nqb, nkb = -(-geo.image // bq), -(-geo.image // bk)
            blocks = _band(nqb, nkb, bq, bk, opts.window, device)
            if opts.pattern == "strided":
                c = (torch.arange(nqb, device=device) * bq) // bk
                blocks = blocks | ((c[:, None] - torch.arange(nkb, device=device)[None, :])
                                   % opts.stride == 0)
                what = f"strided stride {opts.stride} window {opts.window}"
            else:
                what = f"{opts.pattern} window {opts.window}"
            if any(opts.global_tokens):
                what += f" global_tokens {opts.global_tokens}"
            groups = P.sequence_layout(geo, bq, bk, blocks[None, None], opts.global_tokens,
                                       text_global, device)
            if opts.pattern == "topk":
                return _Plan(groups, "topk", f"topk keep {opts.keep} local window "
                             f"{opts.window}{_text_note(geo, opts)}")
        plan = _Plan(groups, "groups", what + _text_note(geo, opts), order=order)
    if plan.groups.perm is not None:
        _inverse(plan)  # now, not while torch.compile traces a call
    plan.summary += f": density {plan.groups.density():.3f}"
    if plan.groups.notes:
        plan.summary += " (" + "; ".join(plan.groups.notes) + ")"
    if opts.empty_rows == "error":
        plan.refusal = _empty_rows(plan.groups, call.is_causal)
    return plan


def _text_note(geo: P.Geometry, opts: BlockSparseOptions) -> str:
    return f", {geo.text} text tokens {opts.text}" if geo.text else ""


def _band(nqb: int, nkb: int, bq: int, bk: int, window: int, device) -> torch.Tensor:
    """bool (nqb, nkb): key blocks within ``window`` of the query block's (c = i·bq // bk)."""
    c = (torch.arange(nqb, device=device) * bq) // bk
    return (c[:, None] - torch.arange(nkb, device=device)[None, :]).abs() <= window


def _plan(call: AttentionCall, opts: BlockSparseOptions) -> _Plan:
    """The plan of this call signature, options and token layout (built once, cached): its
    reasons to refuse, or its groups, summary and kernel."""
    key = (opts, call.signature(), call.token_layout)
    plan = _PLANS.get(key)
    if plan is None:
        reasons = _layout_reasons(call, opts)
        if reasons:
            plan = _Plan(None, "refused", "", reasons=reasons)
        else:
            plan = _build(call, opts)
            if opts.kernel != "auto":
                plan.reasons += _kernel_reasons(opts.kernel, call)
                if opts.kernel == "flash4" and plan.mode in ("dense", "mask_mod"):
                    plan.reasons.append(f"kernel='flash4' runs block layouts; this call is "
                                        f"{plan.summary}")
            if plan.refusal:
                plan.reasons.append(plan.refusal)
            if not plan.reasons:
                plan.kernel = _choose_kernel(call, opts, plan)
        plan = _PLANS.put(key, plan)
    return plan


def _preordered(plan: _Plan, order: tuple) -> _Plan:
    """The plan for calls whose tokens a denoiser hook already put in tile order (``order``:
    (grid, tile)): the same groups with no permutation, when the plan's order is that one."""
    if plan.order != order:
        return plan
    same = plan.lists.get("preordered")
    if same is None:
        g = plan.groups
        same = plan.lists["preordered"] = _Plan(
            P.GroupLayout(None, g.q_bounds, g.k_bounds, g.allow, g.notes), plan.mode,
            plan.summary, kernel=plan.kernel)
    return same


def topk_allow(query: torch.Tensor, key: torch.Tensor, groups: P.GroupLayout,
               geo: P.Geometry, opts: BlockSparseOptions, scale: float) -> torch.Tensor:
    """bool (B, H, Gq, Gk): ``groups.allow`` (local, global and text groups) plus, for each
    query image block, the ceil(keep·n) key image blocks of highest mean-pooled score
    (q̄ · k̄ᵀ · scale, per batch and query head)."""
    bq, bk = opts.block_size
    with torch.no_grad():
        start, n = geo.image_start, geo.image
        nqb, nkb = -(-n // bq), -(-n // bk)
        group = query.shape[1] // key.shape[1]

        def pooled(x, block, nb):
            x = x[:, :, start:start + n].float()
            pad = nb * block - n
            sums = torch.nn.functional.pad(x, (0, 0, 0, pad)).reshape(
                *x.shape[:2], nb, block, x.shape[-1]).sum(3)
            sizes = torch.full((nb,), block, device=x.device, dtype=x.dtype)
            sizes[-1] = n - (nb - 1) * block
            return sums / sizes[:, None]

        q_bar = pooled(query, bq, nqb)
        k_bar = pooled(key, bk, nkb).repeat_interleave(group, dim=1)
        scores = q_bar @ k_bar.transpose(-2, -1) * scale  # (B, H, nqb, nkb)
        count = max(1, math.ceil(opts.keep * nkb))
        top = scores.topk(count, dim=-1).indices
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
        # the image groups' blocks: groups of the image part in order (text is one group)
        offset = 1 if geo.text and geo.text_position == "first" else 0
        gq = groups.q_bounds.numel() - 1 - (1 if geo.text else 0)
        gk = groups.k_bounds.numel() - 1 - (1 if geo.text else 0)
        q_block = (groups.q_bounds[offset:offset + gq] - start) // bq
        k_block = (groups.k_bounds[offset:offset + gk] - start) // bk
        allow = groups.allow.expand(query.shape[0], query.shape[1], -1, -1).clone()
        allow[:, :, offset:offset + gq, offset:offset + gk] |= chosen[
            :, :, q_block[:, None], k_block[None, :]]
    return allow


# --- the kernels --------------------------------------------------------------------------------

def _kernel_reasons(kernel: str, call: AttentionCall) -> list[str]:
    """Why ``kernel`` can't run this call whatever the layout (its availability, the call)."""
    if kernel == "flex":
        flex = get_backend("flex")
        reasons = flex.availability_reasons()
        if call.device.type == "cpu" and call.requires_grad:
            reasons.append("kernel='flex' has no backward on CPU (FlexAttention): use "
                           "kernel='mask' or 'auto'")
        return reasons
    if kernel == "flash4":
        fa4 = get_backend("flash4")
        reasons = list(fa4.availability_reasons())
        if call.device.type != "cuda":
            reasons.append("kernel='flash4' needs a CUDA device")
            return reasons
        if reasons:
            return reasons
        if torch.cuda.get_device_capability(call.device)[0] < 9:
            reasons.append("kernel='flash4' needs compute capability >= 9.0")
        if call.dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"kernel='flash4' takes float16/bfloat16, not {call.dtype}")
        if call.head_dim != call.head_dim_v or call.head_dim not in (64, 96, 128):
            reasons.append(f"kernel='flash4' block sparsity is used here with head_dim 64, 96 "
                           f"or 128 (equal for value), not {call.head_dim}/{call.head_dim_v}")
        if call.attn_mask is not None or call.is_causal:
            reasons.append("kernel='flash4': a user attn_mask or is_causal makes partial "
                           "blocks, which need a mask_mod (run on flex)")
        if call.softcap is not None:
            reasons.append("kernel='flash4' block-sparse path does not apply softcap")
        return reasons
    return []


def _choose_kernel(call: AttentionCall, opts: BlockSparseOptions, plan: _Plan) -> tuple[str, str]:
    """(kernel, why) for this call: the requested one, or auto's choice with its reason."""
    if opts.kernel != "auto":
        return opts.kernel, "requested"
    if call.device.type != "cuda":
        return "mask", "CPU: exact mask path"
    why = []
    if plan.mode in ("groups", "topk"):
        fa4 = _kernel_reasons("flash4", call)
        if not fa4 and plan.mode == "groups":
            full, partial = _lists(plan, "partial")
            n_partial = int(partial.sum())
            if not n_partial:
                return "flash4", "every kept 128x128 block is full"
            return "flash4", (f"{n_partial} of {n_partial + int(full.sum())} kept 128x128 "
                              f"blocks partial: its mask_mod masks them")
        if not fa4:
            return "flash4", "the chosen blocks; partial ones through its mask_mod"
        why = fa4
    if not _kernel_reasons("flex", call):
        return "flex", "; ".join(why) or "FlexAttention"
    return "mask", "; ".join(why + ["flex unavailable"])


def _lists(plan: _Plan, kind: str, allow: Optional[torch.Tensor] = None):
    """(full, partial) bool (Bl, Hl, nQ, nK) kernel blocks, cached on the plan for a static
    layout."""
    if allow is not None:
        return plan.groups.kernel_blocks(KERNEL_BLOCK, KERNEL_BLOCK, allow)
    cached = plan.lists.get(kind)
    if cached is None:
        cached = plan.lists[kind] = plan.groups.kernel_blocks(KERNEL_BLOCK, KERNEL_BLOCK)
    return cached


def _index_lists(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``blocks`` (..., n, m): the count (int32) and the kept column indices first,
    ascending (int32; the rest follow)."""
    blocks = blocks.contiguous()  # a transposed layout: standard strides (flash-attn-4 needs them)
    count = blocks.sum(-1, dtype=torch.int32)
    order = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return count, order


class _Reorder(torch.autograd.Function):
    """``x.index_select(dim, index)`` whose backward is the inverse gather (``inverse``), not
    ``index_select``'s scatter-add: a permutation's gradient is a permutation too, and a
    gather is several times faster than the atomic scatter on a GPU."""

    @staticmethod
    def forward(ctx, x, index, inverse, dim):
        ctx.dim = dim
        ctx.save_for_backward(inverse)
        return x.index_select(dim, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(ctx.dim, inverse), None, None, None


def _permute(x: torch.Tensor, perm: Optional[torch.Tensor], dim: int,
             inverse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x`` along ``dim`` in ``perm``'s order; with ``inverse`` (``perm``'s inverse) and a
    tensor that needs grad, differentiated by a gather."""
    if perm is None:
        return x
    if inverse is not None and x.requires_grad and torch.is_grad_enabled():
        return _Reorder.apply(x, perm, inverse, dim)
    return x.index_select(dim, perm)


def _permute_tokens(x: torch.Tensor, perm: Optional[torch.Tensor],
                    inverse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x`` (B, H, S, D) along S in ``perm``'s order, gathered in ``x``'s memory order: an input
    in (B, S, H, D) memory (as diffusers passes it) stays in that memory, as plain Flex reads it
    (a gather along S of that memory into (B, H, S, D) memory is a transposing copy, slower, and
    gives the kernel other strides)."""
    if perm is not None and x.stride(1) < x.stride(2):
        return _permute(x.transpose(1, 2), perm, 1, inverse).transpose(1, 2)
    return _permute(x, perm, 2, inverse)


def _inverse(plan: _Plan) -> torch.Tensor:
    """The inverse of the plan's token permutation (cached on the plan)."""
    inv = plan.lists.get("inverse")
    if inv is None:
        inv = plan.lists["inverse"] = _inverse_of(plan.groups.perm)
    return inv


def _inverse_of(perm: torch.Tensor) -> torch.Tensor:
    """The inverse of the permutation ``perm`` (a 1-D long tensor)."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def _run_flash4(call: AttentionCall, plan: _Plan, full: torch.Tensor, partial: torch.Tensor,
                allow: Optional[torch.Tensor] = None):
    """FlashAttention-4's block sparsity: ``full`` blocks with no mask work, ``partial`` ones
    (bool (Bl, Hl, nQ, nK) in kernel order) through a ``mask_mod`` that looks the groups up
    (``allow``: a top-k layout of this call, else the plan's)."""
    from flash_attn.cute import flash_attn_func

    if allow is None:
        cached = _static_fa4_inputs(plan, full, partial, call.batch_size, call.num_heads)
    else:  # a top-k layout is built per call: its backward lists only when a backward can follow
        cached = _fa4_inputs(plan.groups, full, partial, allow, call.batch_size, call.num_heads,
                             call.requires_grad)
    kw = {} if call.default_scale else {"softmax_scale": call.scale}
    result = _launch_flash4(flash_attn_func, plan, cached, *call.bshd(), kw, call.return_lse)
    if call.return_lse:
        return result[0].transpose(1, 2), result[1]
    return result.transpose(1, 2)


def _static_fa4_inputs(plan: _Plan, full: torch.Tensor, partial: torch.Tensor, batch: int,
                       heads: int) -> tuple:
    """:func:`_fa4_inputs` of the plan's static layout (forward and backward lists), built
    once and cached on the plan."""
    cached = plan.lists.get("fa4")
    if cached is None:
        cached = plan.lists["fa4"] = _fa4_inputs(plan.groups, full, partial, plan.groups.allow,
                                                 batch, heads)
    return cached


def _launch_flash4(flash_attn_func: Callable, plan: _Plan, cached: tuple, query: torch.Tensor,
                   key: torch.Tensor, value: torch.Tensor, kw: dict,
                   return_lse: bool) -> Any:
    """``flash_attn_func`` on (B, S, H, D) ``query``/``key``/``value`` with the plan's token
    order and ``cached`` lists (:func:`_fa4_inputs`); ``kw``: its scale, if not the default.
    Returns out (B, Sq, H, Dv) in the call's token order (and the float32 lse (B, H, Sq))."""
    tensors, mask_mod, aux = cached
    perm = plan.groups.perm
    inv = None if perm is None else _inverse(plan)
    q, k, v = (_permute(t, perm, 1, inv) for t in (query, key, value))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if mask_mod is not None:
        kw = dict(kw, mask_mod=mask_mod, aux_tensors=aux)
    out, lse = flash_attn_func(q, k, v, block_sparse_tensors=tensors[0],
                               block_sparse_tensors_bwd=tensors[1], return_lse=return_lse, **kw)
    out = _permute(out, inv, 1, perm)
    if return_lse:
        return out, _permute(lse, inv, 2, perm).float()
    return out


def _flash4_failed(plan: _Plan, err: Exception, call: Any) -> None:
    """``kernel="auto"``'s flash-attn-4 refused this configuration: the plan runs on Flex from
    now on, and the warning says why."""
    why = f"flash4 failed: {type(err).__name__}: {str(err)[:200]}"
    logger.warning("block_sparse: %s; running %s on flex", why, call)
    plan.kernel = ("flex", why)
    plan.lists.pop("fa4", None)


class _Flash4Kernel:
    """The dispatcher's kernel (:meth:`BlockSparseAttention.specialize`) for one call signature
    of a static layout that runs on flash-attn-4: what :meth:`~BlockSparseAttention.run` does for
    such a call, minus what it would repeat per call (an :class:`AttentionCall`, the plan lookup,
    the strategy's context). That host time is what a call timed alone shows before its kernel
    starts. A dense step, a plan whose kernel fell back to Flex, or a flash-attn-4 error under
    ``kernel="auto"`` goes through ``forward`` instead, which handles them."""

    __slots__ = ("backend", "call", "plan", "flash_attn_func", "kw", "dense_steps", "explicit")
    #: takes and returns (B, S, H, D) tensors, flash-attn-4's order: a ``layout="bshd"``
    #: caller's tensors (diffusers') reach the kernel without transposes
    bshd = True

    def __init__(self, backend: "BlockSparseAttention", call: AttentionCall, plan: _Plan,
                 opts: BlockSparseOptions, flash_attn_func: Callable):
        self.backend, self.plan = backend, plan
        # the signature's call without its tensors (a cached kernel must not keep them alive)
        self.call = call.with_tensors(*(torch.empty_like(t, device="meta")
                                        for t in (call.query, call.key, call.value)))
        self.flash_attn_func = flash_attn_func
        self.kw = {} if call.default_scale else {"softmax_scale": call.scale}
        self.dense_steps = bool(opts.dense_steps)
        self.explicit = opts.kernel == "flash4"

    def __call__(self, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor) -> torch.Tensor:
        """Attention of (B, S, H, D) tensors; returns (B, Sq, H, Dv)."""
        plan = self.plan
        if self.dense_steps and _DENSE_NOW.get():
            return self._forward(query, key, value)
        order = _PREORDERED.get()
        if order is not None and plan.groups.perm is not None:
            plan = _preordered(plan, order)
        if plan.kernel[0] != "flash4":
            return self._forward(query, key, value)
        cached = plan.lists.get("fa4")
        if cached is None:
            full, partial = _lists(plan, "partial")
        try:  # as run(): flash-attn-4's own lists and launch; a refusal falls back under auto
            if cached is None:
                cached = _static_fa4_inputs(plan, full, partial, query.shape[0], query.shape[2])
            return _launch_flash4(self.flash_attn_func, plan, cached, query, key, value,
                                  self.kw, False)
        except Exception as err:  # noqa: BLE001 - as run(): raise, or fall back to Flex
            if self.explicit or isinstance(err, torch.OutOfMemoryError):
                raise
            _flash4_failed(plan, err, self.call)
            return self._forward(query, key, value)

    def _forward(self, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor) -> torch.Tensor:
        call = self.call.with_tensors(query.transpose(1, 2), key.transpose(1, 2),
                                      value.transpose(1, 2))
        return self.backend.forward(call).transpose(1, 2)


#: the largest tile flash-attn-4 uses along a sequence (SM90/SM100 forward and backward)
_FA4_TILE = 256


def _fa4_inputs(groups: P.GroupLayout, full: torch.Tensor, partial: torch.Tensor,
                allow: torch.Tensor, batch: int, heads: int, backward: bool = True) -> tuple:
    """flash-attn-4's (forward, backward) block lists (per query block / per key block: the
    full blocks, and the partial ones its ``mask_mod`` masks; the backward's None unless
    ``backward``), the ``mask_mod`` (None without partial blocks) and its aux tensors: the
    kernel-order group ids and the allow table as int32, of rank 2 (one layout), 3 (per head)
    or 4 (per batch and head)."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    def lists(blocks):
        cnt, idx = _index_lists(blocks)
        return cnt, idx[..., :max(1, int(cnt.max()))].contiguous()

    def tensors_of(f, p):
        f_cnt, f_idx = lists(f)
        p_cnt, p_idx = lists(p)
        return BlockSparseTensorsTorch(mask_block_cnt=p_cnt, mask_block_idx=p_idx,
                                       full_block_cnt=f_cnt, full_block_idx=f_idx,
                                       block_size=(KERNEL_BLOCK, KERNEL_BLOCK))
    tensors = (tensors_of(full, partial),
               tensors_of(full.transpose(-2, -1), partial.transpose(-2, -1)) if backward
               else None)
    if not bool(partial.any()):
        return tensors, None, None
    from ._fa4_masks import GROUP_MASKS

    bl, hl = allow.shape[:2]
    if bl == 1 and hl == 1:
        table = allow[0, 0]
    elif bl == 1:
        table = allow[0]
    else:
        table = allow.expand(batch, heads, *allow.shape[2:])
    def ids(side):
        # padded past the last kernel tile with a valid group: the kernel may look up rows and
        # columns of the ragged last block before it masks them by length
        g = groups.group_ids(side, False).to(torch.int32)
        return torch.nn.functional.pad(g, (0, 2 * _FA4_TILE - g.numel() % _FA4_TILE))
    aux = [ids("q"), ids("k"), table.to(torch.int32).contiguous()]
    return tensors, GROUP_MASKS[table.dim()], aux


def _run_flex(call: AttentionCall, plan: _Plan, allow: Optional[torch.Tensor]):
    """FlexAttention with a BlockMask from the block lists (kernel order); partial blocks run a
    mask_mod that looks the groups up (and the causal pattern by original positions)."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    if plan.mode == "mask_mod":
        opts = call.options
        mask_mod = opts.mask_mod
        if call.is_causal:
            user = mask_mod

            def mask_mod(b, h, q, k):
                return user(b, h, q, k) & (q >= k)
        block_mask = plan.lists.get("flex")
        if block_mask is None:
            # per batch element and head: a mask_mod may read b and h, and a BlockMask built
            # for (b, h) = (0, 0) alone would skip (or leave unmasked) the others' blocks
            block_mask = plan.lists["flex"] = create_block_mask(
                mask_mod, call.batch_size, call.num_heads, call.seq_len_q, call.seq_len_kv,
                device=call.device, _compile=call.device.type == "cuda")
        sub = call.replace(is_causal=False)
        return _run_inner("flex", sub, block_mask=block_mask)
    groups = plan.groups
    static = allow is None
    block_mask = plan.lists.get("flex") if static else None
    perm = groups.perm
    if block_mask is None:
        full, partial = _lists(plan, "partial", allow)
        if call.is_causal:  # every kept block may be cut by the causal pattern: partial
            partial, full = partial | full, torch.zeros_like(full)
        # one mask_mod per plan, reading the layout from a box: a top-k layout changes per call
        # without giving torch.compile a new function to trace
        box = plan.lists.setdefault("allow", [None])
        box[0] = groups.allow if static else allow
        mask_mod = plan.lists.get("mask_mod")
        if mask_mod is None:
            mask_mod = plan.lists["mask_mod"] = _group_mask_mod(groups, box, call.is_causal)
        if static and call.device.type == "cuda" and not bool(partial.any()):
            # every kept block is full: no mask_mod in the compiled kernel (one that gathers
            # the layout made the full blocks slower than plain Flex on the H200); eager Flex
            # (the CPU) evaluates mask_mod on every pair, so it keeps it
            mask_mod = None
        p_cnt, p_idx = _index_lists(partial)
        f_cnt, f_idx = _index_lists(full)
        block_mask = BlockMask.from_kv_blocks(
            p_cnt, p_idx, f_cnt, f_idx, BLOCK_SIZE=KERNEL_BLOCK, mask_mod=mask_mod,
            seq_lengths=(call.seq_len_q, call.seq_len_kv))
        if static:
            plan.lists["flex"] = block_mask
    inv = None if perm is None else _inverse(plan)
    q, k, v = (_permute_tokens(t, perm, inv) for t in (call.query, call.key, call.value))
    mask = call.attn_mask
    if mask is not None and perm is not None:
        for dim in (2, 3):  # a broadcast (size-1) dim stays
            mask = _permute(mask, perm, dim) if mask.shape[dim] > 1 else mask
    sub = call.replace(query=q, key=k, value=v, attn_mask=mask, is_causal=False)
    result = _run_inner("flex", sub, block_mask=block_mask)
    if perm is None:
        return result
    if call.return_lse:
        out, lse = result
        return _permute_tokens(out, inv, perm), _permute(lse, inv, 2, perm)
    return _permute_tokens(result, inv, perm)


def _group_mask_mod(groups: P.GroupLayout, box: list, causal: bool) -> Callable:
    """A Flex ``mask_mod`` on kernel-order indices: the groups' ``allow`` (``box[0]``, (Bl, Hl,
    Gq, Gk)) and, with ``causal``, the call-order positions."""
    gq, gk = groups.group_ids("q", False), groups.group_ids("k", False)
    perm = groups.perm
    pos_q = torch.arange(gq.numel(), device=gq.device) if perm is None else perm
    pos_k = torch.arange(gk.numel(), device=gk.device) if perm is None else perm

    def mask_mod(b, h, q, k):
        allow = box[0]
        bl, hl, n_q, n_k = allow.shape
        # one gather from the flattened table: torch 2.10's Flex cannot trace a 4-index lookup
        # that mixes a constant with tensor indices (a data-dependent integer)
        row = (b if bl > 1 else 0) * hl + (h if hl > 1 else 0)
        ok = allow.reshape(-1)[(row * n_q + gq[q]) * n_k + gk[k]]
        if causal:
            ok = ok & (pos_q[q] >= pos_k[k])
        return ok
    return mask_mod


def _run_inner(backend: str, sub: AttentionCall, **options):
    """``run_backend(backend, sub)``; while torch.compile traces (no ContextVar there) the same
    call through :func:`attnpatch.attention`."""
    if torch.compiler.is_dynamo_compiling():
        return attention(sub.query, sub.key, sub.value, sub.attn_mask, sub.is_causal, sub.scale,
                         0.0, backend, return_lse=sub.return_lse, softcap=sub.softcap,
                         **options)
    return run_backend(backend, sub, **options)


def _combined_mask(call: AttentionCall, element: torch.Tensor) -> torch.Tensor:
    """The call's mask with the layout's element mask (Bl, Hl, Sq, Sk) on top: bool AND, or a
    float mask with -inf outside the layout."""
    mask = call.attn_mask
    if mask is None:
        return element
    if mask.dtype == torch.bool:
        return mask & element
    return mask.masked_fill(~element, float("-inf"))


def _mask_mod_elements(call: AttentionCall, mask_mod: Callable,
                       rows: Optional[range] = None) -> torch.Tensor:
    """bool (B, H, Sq, Sk) from a Flex-style ``mask_mod`` evaluated on broadcast indices (only
    the query ``rows``, when given: (B, H, len(rows), Sk))."""
    dev = call.device
    rows = range(call.seq_len_q) if rows is None else rows
    b = torch.arange(call.batch_size, device=dev)[:, None, None, None]
    h = torch.arange(call.num_heads, device=dev)[None, :, None, None]
    q = torch.arange(rows.start, rows.stop, device=dev)[None, None, :, None]
    k = torch.arange(call.seq_len_kv, device=dev)[None, None, None, :]
    try:
        out = torch.as_tensor(mask_mod(b, h, q, k), device=dev)
    except Exception as err:
        raise AttnPatchError(f"block_sparse: mask_mod({b.shape}, {h.shape}, {q.shape}, "
                             f"{k.shape}) failed on broadcast index tensors ({err}); write it "
                             "with elementwise tensor ops") from err
    if out.dtype != torch.bool:
        raise AttnPatchError(f"block_sparse: mask_mod must return bool, got {out.dtype}")
    shape = (call.batch_size, call.num_heads, len(rows), call.seq_len_kv)
    try:
        return out.expand(shape)
    except RuntimeError as err:
        raise AttnPatchError(f"block_sparse: mask_mod returned shape {tuple(out.shape)}, which "
                             f"does not broadcast to (batch, heads, queries, keys) = {shape}: "
                             "combine its index arguments elementwise") from err


def _mask_mod_empty_rows(call: AttentionCall, mask_mod: Callable) -> Optional[str]:
    """A description of the query rows ``mask_mod`` (with ``is_causal``) leaves without a key,
    or None; evaluated over chunks of query rows (never the whole B·H·Sq·Sk mask at once)."""
    chunk = max(1, (1 << 24) // max(1, call.batch_size * call.num_heads * call.seq_len_kv))
    for start in range(0, call.seq_len_q, chunk):
        rows = range(start, min(start + chunk, call.seq_len_q))
        keep = _mask_mod_elements(call, mask_mod, rows)
        if call.is_causal:
            q = torch.arange(rows.start, rows.stop, device=call.device)[:, None]
            keep = keep & (torch.arange(call.seq_len_kv, device=call.device)[None, :] <= q)
        empty = ~keep.any(-1)
        if bool(empty.any()):
            b, h, row = empty.nonzero()[0].tolist()
            return (f"mask_mod{' with is_causal' if call.is_causal else ''} leaves query rows "
                    f"without any key (first: batch {b}, head {h}, query {start + row}): let "
                    "each query see a key, or pass empty_rows='zeros' (out 0, lse -inf there)")
    return None


def _element_mask(call: AttentionCall, opts: BlockSparseOptions, plan: _Plan
                  ) -> Optional[torch.Tensor]:
    """bool (Bl, Hl, Sq, Sk): the pattern's element mask in the call's order (None: dense)."""
    if plan.mode == "dense":
        return None
    if plan.mode == "mask_mod":
        return _mask_mod_elements(call, opts.mask_mod)
    allow = None
    if plan.mode == "topk":
        allow = topk_allow(call.query, call.key, plan.groups, _geometry(call), opts,
                           call.scale)
    return plan.groups.element_mask(allow)


# --- dense_steps --------------------------------------------------------------------------------

#: True while a patched denoiser runs one of its first ``dense_steps`` denoising steps
_DENSE_NOW: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "attnpatch_block_sparse_dense_step", default=False)


class _HookTokens:
    """The ContextVar tokens that forward pre-hooks set and their post-hooks reset, as (hook,
    token) on a stack of the running thread's context (innermost forward last): forwards of
    one model in several threads at once, and a post-hook whose pre never ran (an earlier
    pre-hook raised; torch still calls the post), never reset another forward's token."""

    def __init__(self, name: str):
        self.var: contextvars.ContextVar[tuple] = contextvars.ContextVar(name, default=())

    def push(self, hook: Any, token: Any) -> None:
        self.var.set((*self.var.get(), (hook, token)))

    def pop(self, hook: Any) -> tuple[bool, Any]:
        """(True, token) of ``hook``'s entry if it is the innermost one, else (False, None)."""
        stack = self.var.get()
        if not stack or stack[-1][0] is not hook:
            return False, None
        self.var.set(stack[:-1])
        return True, stack[-1][1]


class _DenseSteps:
    """Forward hooks on a denoiser that count denoising steps by its ``timestep``: the step
    advances when the timestep changes (CFG passes of one step share it), and a timestep that
    rises (or the first forward) starts a new pipeline call at step 0. While a forward of one of
    the first ``steps`` steps runs, block_sparse attends densely. Reading the timestep syncs
    once per forward. Counted per denoiser from its timesteps alone: a second denoiser that
    takes over mid-call (Wan 2.2's ``transformer_2``) starts its own count, and a call whose
    first timestep is below the previous call's last (img2img at low strength right after
    text-to-image) is not seen as a new call."""

    def __init__(self, steps: int):
        self.steps = steps
        self.last: Optional[float] = None
        self.step = 0

    def pre(self, module, args, kwargs):
        if torch.compiler.is_dynamo_compiling():  # compiled: no step count, every step sparse
            return None
        t = forward_arguments(module, args, kwargs).get("timestep")  # by name or by place
        if torch.is_tensor(t):
            # the step's noise level: the largest entry (a per-token timestep, as Wan 2.2 TI2V
            # passes, holds 0 for the conditioning frame's tokens at every step)
            t = t.detach().amax().item() if t.numel() else None
        value = None if t is None else float(t)
        if value is None:  # no timestep: not a denoising step
            dense = False
        else:
            if self.last is None or value > self.last:
                self.step = 0
            elif value != self.last:
                self.step += 1
            self.last = value
            dense = self.step < self.steps
        _DENSE_TOKENS.push(self, _DENSE_NOW.set(dense))
        return None

    def post(self, module, args, kwargs, output):
        if torch.compiler.is_dynamo_compiling():
            return None
        found, token = _DENSE_TOKENS.pop(self)
        if found:
            _DENSE_NOW.reset(token)
        return None


#: the :class:`_DenseSteps` hooks' ``_DENSE_NOW`` tokens
_DENSE_TOKENS = _HookTokens("attnpatch_block_sparse_dense_tokens")


#: (grid, tile) while a patched denoiser runs with its image tokens already in that tile order
_PREORDERED: contextvars.ContextVar[Optional[tuple]] = contextvars.ContextVar(
    "attnpatch_block_sparse_preordered", default=None)


#: the :class:`_TileOrder` hooks' ``_PREORDERED`` tokens (None for a forward they left in the
#: model's order)
_ORDER_TOKENS = _HookTokens("attnpatch_block_sparse_order_tokens")
#: (grid, tile, device) -> (perm, inverse, tokens): a tile order, kernel position -> token
_ORDERS = BoundedCache(16)


class _TileOrder:
    """A denoiser's image tokens in tile order for the length of each forward, where its
    family's :class:`~attnpatch.pipelines.token_order.TokenOrder` says they enter and leave.

    The model's pre-hook reads the forward's grid (its token layout) and publishes it in
    ``_PREORDERED`` (before any block runs: gradient checkpointing recomputes blocks in a copy
    of that context); the plan's tensors go to tile order where they enter (Flux: the model's
    ``hidden_states``, ``img_ids`` and ControlNet residuals; Wan: ``blocks.0``'s input, the
    rotary tables and per-token modulation; SD3: ``pos_embed``'s output) and back where they
    leave. Every op between is per token, so the result is the same as reordering in each
    attention call, which now finds its tokens in kernel order and permutes nothing. Tables
    made once per forward (rotary) are reordered once, where they are made. Under
    ``torch.compile`` (no ContextVar in a trace) or when a hooked submodule is compiled on its
    own, the calls reorder themselves instead."""

    path = ""

    def __init__(self, plan: TokenOrder, tile: tuple):
        self.plan = plan
        self.tile = tile
        self.at = [_TileOrderAt(self, path) for path in plan.paths() if path]

    def hooks(self) -> list:
        """This model-level hook, then one per submodule the plan names."""
        return [self, *self.at]

    @staticmethod
    def order(device: torch.device) -> Optional[tuple[torch.Tensor, torch.Tensor, int]]:
        """(perm, inverse, tokens) of the running forward's tile order on ``device``; None
        outside a reordered forward (or in a checkpointed block's recompute: the copy of the
        forward's context it runs in has the order)."""
        key = _PREORDERED.get()
        if key is None:
            return None
        grid, tile = key
        found = _ORDERS.get((grid, tile, device))
        if found is None:
            geo = P.Geometry(math.prod(grid), 0, "none", grid)
            perm = P.tile_layout(geo, tile, (1, 1, 1), True, device).perm
            found = _ORDERS.put((grid, tile, device), (perm, _inverse_of(perm), perm.numel()))
        return found

    def _compiled_parts(self, module: torch.nn.Module) -> bool:
        """Whether a hooked submodule runs compiled on its own (regional compilation): its
        hooks can't see the order there, so this forward keeps the model's order."""
        return any(getattr(module.get_submodule(a.path), "_compiled_call_impl", None)
                   is not None for a in self.at)

    def pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        if torch.compiler.is_dynamo_compiling():  # no ContextVar in a trace: calls reorder
            return None
        key = None
        if not self._compiled_parts(module):
            layout = current_token_layout()
            grid = None if layout is None else layout.grid
            if grid is not None and math.prod(grid) > 1:
                key = (tuple(grid), self.tile)
        token = None if key is None else _PREORDERED.set(key)
        _ORDER_TOKENS.push(self, token)
        if token is None:
            return None
        return _move_inputs(self, self.plan.enter, "", module, args, kwargs, False)

    def post(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if torch.compiler.is_dynamo_compiling():
            return None
        _, token = _ORDER_TOKENS.pop(self)
        if token is None:
            return None
        try:
            if output is None:
                return None
            return _move_output(self, self.plan.leave, "", output, True)
        finally:
            _PREORDERED.reset(token)


class _TileOrderAt:
    """The hooks of a :class:`_TileOrder` on one submodule (``path``): its arguments that enter
    or leave tile order before it runs, its outputs after."""

    def __init__(self, owner: _TileOrder, path: str):
        self.owner = owner
        self.path = path

    def pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        if torch.compiler.is_dynamo_compiling():
            return None
        plan = self.owner.plan
        moved = _move_inputs(self.owner, plan.enter, self.path, module, args, kwargs, False)
        if moved is not None:
            args, kwargs = moved
        return _move_inputs(self.owner, plan.leave, self.path, module, args, kwargs,
                            True) or moved

    def post(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if torch.compiler.is_dynamo_compiling() or output is None:
            return None
        plan = self.owner.plan
        moved = _move_output(self.owner, plan.enter, self.path, output, False)
        if moved is not None:
            output = moved
        return _move_output(self.owner, plan.leave, self.path, output, True) or moved

    def __repr__(self) -> str:
        return f"<block_sparse tile order at {self.path!r}>"


def _move(value: Any, where: Tokens, order: tuple, inverse: bool) -> Any:
    """``value`` (a tensor, a list or tuple of them, or None) with its image tokens permuted
    into tile order (``inverse``: back)."""
    perm, inv, tokens = order
    if isinstance(value, (list, tuple)):
        return type(value)(_move(v, where, order, inverse) for v in value)
    dim = token_dim(value, where, tokens) if torch.is_tensor(value) else None
    if dim is None:
        if where.required:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise AttnPatchError(f"block_sparse: the tile order once per forward expected "
                                 f"{tokens} image tokens at {where}, got {shape}: pass "
                                 "reorder='call'")
        return value
    index = inv if inverse else perm
    if index.device != value.device:
        index = index.to(value.device)
    return value.index_select(dim, index)


def _first_tensor(value: Any) -> Optional[torch.Tensor]:
    """The first tensor in ``value`` (a tensor, or tuples, lists and ModelOutputs of them)."""
    if torch.is_tensor(value):
        return value
    items = value.values() if hasattr(value, "values") else (
        value if isinstance(value, (list, tuple)) else ())
    for v in items:
        found = _first_tensor(v)
        if found is not None:
            return found
    return None


def _move_inputs(owner: _TileOrder, points: tuple, path: str, module: torch.nn.Module,
                 args: tuple, kwargs: dict, inverse: bool) -> Optional[tuple[tuple, dict]]:
    """(args, kwargs) of ``module`` (at ``path``) with the plan's arguments moved, found by
    name or by place; None when none is there or no reordered forward runs."""
    args, kwargs, order = list(args), dict(kwargs), None
    for p in points:
        if p.path != path or p.output:
            continue
        index = p.index
        if index is None and p.name is not None and p.name not in kwargs and args:
            names = positional_names(module)  # passed by place?
            index = names.index(p.name) if p.name in names else None
        if p.name is not None and p.name in kwargs:
            slot, key = kwargs, p.name
        elif index is not None and index < len(args):
            slot, key = args, index
        elif p.required:
            raise AttnPatchError(f"block_sparse: the tile order once per forward found no "
                                 f"argument at {p}: pass reorder='call'")
        else:
            continue
        tensor = _first_tensor(slot[key])
        if tensor is None:
            if p.required:
                raise AttnPatchError(f"block_sparse: the tile order once per forward expected "
                                     f"the image tokens at {p}, got {slot[key]!r}: pass "
                                     "reorder='call'")
            continue
        if order is None:
            order = owner.order(tensor.device)
            if order is None:
                return None
        slot[key] = _move(slot[key], p, order, inverse)
    return None if order is None else (tuple(args), kwargs)


def _move_output(owner: _TileOrder, points: tuple, path: str, output: Any, inverse: bool) -> Any:
    """``output`` with the plan's outputs at ``path`` moved; None when none is there or no
    reordered forward runs."""
    points = [p for p in points if p.path == path and p.output]
    if not points:
        return None
    tensor = _first_tensor(output)
    order = None if tensor is None else owner.order(tensor.device)
    if order is None:
        if tensor is None and _PREORDERED.get() is not None and any(p.required for p in points):
            raise AttnPatchError(f"block_sparse: the tile order once per forward expected the "
                                 f"image tokens in the output of {path!r}, got {output!r}: "
                                 "pass reorder='call'")
        return None
    for p in points:
        if p.index is None:
            output = _move(output, p, order, inverse)
        elif isinstance(output, tuple):
            output = (*output[:p.index], _move(output[p.index], p, order, inverse),
                      *output[p.index + 1:])
        elif hasattr(output, "keys"):  # a diffusers ModelOutput
            name = list(output.keys())[p.index]
            output = type(output)(**{**output, name: _move(output[name], p, order, inverse)})
        else:
            output = _move(output, p, order, inverse)
    return output


# --- the backend --------------------------------------------------------------------------------

@register_backend
class BlockSparseAttention(Strategy):
    """Block-sparse attention exact to its layout (see the module docstring).

    Options (:class:`BlockSparseOptions`): ``block_layout``, ``block_size``, ``pattern`` and
    its ``tile``/``window``/``stride``/``global_tokens``/``keep``/``sink``/``mask_mod``;
    ``text`` ("global"/"local"), ``empty_rows`` ("error"/"zeros"), ``kernel``
    ("auto"/"mask"/"flex"/"flash4"), ``dense_steps`` (the first N denoising steps of each
    pipeline call run dense, counted by the patched denoiser's timestep).
    """

    name = NAME
    description = "block-sparse attention (layouts, STA tiles, radial, top-k) exact to its layout"
    Options = BlockSparseOptions
    supports_dropout = False
    supports_lse = True
    supports_softcap = True
    reads_token_layout = True
    specializes_per_token_layout = True  # _Flash4Kernel: the plan of its call's layout
    #: patch(pipe, ...) sparsifies the denoiser; text encoders and VAE stay on auto
    denoiser_only = True

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        reasons = super().not_supported_reasons(call)
        opts = call.options
        if isinstance(opts, BlockSparseOptions):
            reasons += self._option_reasons(call, opts)
        return reasons

    def _option_reasons(self, call: AttentionCall, opts: BlockSparseOptions) -> list[str]:
        if _meta(call):  # torch.compile selecting from metadata: checked on the real call
            return []
        return _plan(call, opts).reasons

    def denoiser_hooks(self, model: torch.nn.Module, options: Any) -> Sequence[Any]:
        """A tile pattern with ``reorder="auto"`` on a model whose family has a token-order
        plan (Flux-like models with ``img_ids``, Wan, SD3: :func:`~attnpatch.pipelines.
        families.token_order_plan`): its image tokens in tile order for the whole forward.
        ``dense_steps``: a step counter on each model whose forward takes a ``timestep`` (the
        denoisers)."""
        if not isinstance(options, BlockSparseOptions):
            return ()
        hooks: list = []
        if options.reorder == "auto" and options.pattern in ("tile2d", "tile3d"):
            plan = token_order_plan(model)
            if plan is not None:
                tile = options.tile if len(options.tile) == 3 else (1, *options.tile)
                hooks += _TileOrder(plan, tile).hooks()
        if options.dense_steps and "timestep" in inspect.signature(model.forward).parameters:
            hooks.append(_DenseSteps(options.dense_steps))
        return hooks

    def density(self, call: AttentionCall) -> float:
        """The fraction of the call's query-key pairs the layout keeps (1.0 without a layout; a
        ``topk`` layout: the one it chooses for this call's q and k), from group ranges.
        Raises :class:`AttnPatchError` for options this backend refuses, and for a
        ``mask_mod`` pattern (its mask is per element)."""
        opts = call.options
        if not isinstance(opts, BlockSparseOptions):
            opts = option_values(self, dict(opts or {}))
        reasons = self._option_reasons(call, opts)
        if reasons:
            raise AttnPatchError(f"block_sparse: {'; '.join(reasons)}")
        plan = _plan(call, opts)
        if plan.mode == "dense":
            return 1.0
        if plan.groups is None:
            raise AttnPatchError(f"block_sparse: no block-level density for pattern "
                                 f"{opts.pattern!r} ({plan.mode}: its mask is per element)")
        if plan.mode == "topk":
            return float(plan.groups.density(topk_allow(call.query, call.key, plan.groups,
                                                        _geometry(call), opts, call.scale)))
        return float(plan.groups.density())

    def report_note(self, call: AttentionCall) -> Optional[str]:
        opts = call.options
        if not isinstance(opts, BlockSparseOptions) or _meta(call) or self._option_reasons(
                call, opts):
            return None
        plan = _plan(call, opts)
        kernel, why = plan.kernel
        note = f"{plan.summary}; kernel {kernel} ({why})"
        if opts.dense_steps:
            note += f"; the first {opts.dense_steps} denoising steps dense"
        if plan.mode == "topk":
            allow = topk_allow(call.query, call.key, plan.groups, _geometry(call), opts,
                               call.scale)
            note += f"; chosen density {plan.groups.density(allow):.3f} on the first call"
        return note

    def specialize(self, call: AttentionCall) -> Optional[Callable]:
        """For a static layout on flash-attn-4 without a softcap (the dispatcher asks only for
        calls without a mask or lse, and uses the kernel only for this call's token layout): a
        kernel that skips the per-call Python :meth:`run` repeats (:class:`_Flash4Kernel`).
        None for anything else."""
        opts = call.options
        if not isinstance(opts, BlockSparseOptions) or call.softcap is not None:
            return None
        plan = _plan(call, opts)
        if plan.reasons or plan.mode != "groups" or plan.kernel[0] != "flash4":
            return None
        try:
            from flash_attn.cute import flash_attn_func
        except ImportError:  # forward() meets it too, and says so (auto falls back to Flex)
            return None
        return _Flash4Kernel(self, call, plan, opts, flash_attn_func)

    def forward(self, call: AttentionCall, **options):
        if torch.compiler.is_dynamo_compiling():  # no ContextVar in a trace: run() directly
            return self.run(call, **options)
        return super().forward(call, **options)

    def run(self, call: AttentionCall, **options):
        opts = call.options if isinstance(call.options, BlockSparseOptions) else option_values(
            self, options)
        call.options = opts
        plan = _plan(call, opts)
        if plan.reasons:
            raise BackendUnavailableError(f"backend {NAME!r} cannot run {call}:",
                                          {NAME: plan.reasons})
        if plan.mode == "dense" or (opts.dense_steps and not torch.compiler.is_dynamo_compiling()
                                    and _DENSE_NOW.get()):
            return _run_inner("auto", call.replace())
        if plan.groups is not None and plan.groups.perm is not None and (
                not torch.compiler.is_dynamo_compiling()) and _PREORDERED.get() is not None:
            plan = _preordered(plan, _PREORDERED.get())
        kernel = plan.kernel[0]
        allow = None
        if plan.mode == "topk" and kernel != "mask":
            allow = topk_allow(call.query, call.key, plan.groups, _geometry(call), opts,
                               call.scale)
        if kernel == "flash4":
            full, partial = _lists(plan, "partial", allow)
            try:
                return _run_flash4(call, plan, full, partial, allow)
            except Exception as err:  # noqa: BLE001 - any refusal: auto falls back, says why
                if opts.kernel == "flash4" or isinstance(err, torch.OutOfMemoryError):
                    raise
                _flash4_failed(plan, err, call)
            kernel = "flex"
        if kernel == "flex":
            return _run_flex(call, plan, allow)
        element = _element_mask(call, opts, plan)
        return _run_inner("auto", call.replace(attn_mask=_combined_mask(call, element)))

    def reference(self, call: AttentionCall, options: Any = None):
        """Dense float64 attention under the layout's element mask (expanded from the layout's
        blocks or groups, in the call's token order), the call's mask and causal pattern.
        Without a layout or pattern: the full layout, dense attention."""
        opts = options if isinstance(options, BlockSparseOptions) else option_values(
            self, dict(options or {}))
        call.options = opts
        reasons = _layout_reasons(call, opts)
        if reasons:
            raise BackendUnavailableError(f"backend {NAME!r} cannot run {call}:", {NAME: reasons})
        plan = _plan(call, opts)
        element = _element_mask(call, opts, plan)
        mask = call.attn_mask if element is None else _combined_mask(call, element)
        if mask is not None and mask.is_floating_point():
            mask = mask.double()
        dense = call.replace(query=call.query.double(), key=call.key.double(),
                             value=call.value.double(), attn_mask=mask, dropout_p=0.0,
                             return_lse=True)
        return reference_attention(dense, accumulate=torch.float64)
