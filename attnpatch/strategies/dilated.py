"""Dilated attention (LongNet), exact to its definition, over token sequences and image grids.

**Definition** (issue 13; the tests pin it). ``segment_lengths = (w_1..w_k)`` and
``dilation_rates = (r_1..r_k)`` give k patterns. Pattern i, for query head h, uses the offset
o = h mod r_i. The image tokens split into segments [s·w_i, min((s+1)·w_i, N)) (the last may be
shorter; nothing is padded). Query p of segment s is kept by pattern i iff (p − s·w_i) mod r_i = o,
and attends the keys of its segment that satisfy the same condition. Pattern i gives
(out_i, lse_i); one that does not keep a query gives it nothing (lse_i = −inf). The output is
Σ_i softmax_i(lse_i)·out_i, which is softmax over the union of the patterns' keys with the bias
log m(p, key), m the number of patterns in which the query and the key meet. A query kept by no
pattern gives zeros.

- ``grid="2d"``/``"3d"``: a segment is a tile of the layout's (frames, height, width) grid
  (ragged at the edges), each segment length and rate a tuple per axis; head h uses the per-axis
  offsets ``unravel(h mod Π r, r)`` in C order and the keep rule holds per axis. ``"2d"`` tiles
  (height, width) of each frame on its own.
- Joint text + image attention (``TokenLayout`` text first or last): text queries attend every
  key, densely; image queries attend every text key once, merged by lse with their patterns.
- Cross-attention (keys are text, or Sq != Sk): dense through ``inner``.
- ``is_causal`` keeps keys at positions <= the query's, a user ``attn_mask`` applies on top (bool
  ANDs, float adds), both by global position. GQA works.
- ``detach_weights=True``: torchscale's LongNet backward (the mixing weights softmax_i(lse_i) are
  detached); the default is the true gradient of the function above.

**Implementation.** A plan, built once per (shapes, options, layout), lists *parts*. A part is
one inner-kernel call over many independent problems of equal size, folded into the batch
(problems whose positions are the same for every head: GQA kept) or into the heads (one problem
per (segment, head)): per pattern one part per distinct kept count (the full segments, the ragged
last one, per-head offsets that keep one more or less), found without a Python loop over
segments. Each part's inputs are a strided view when they are a contiguous range (rate 1), one
strided copy (of 8-byte words) when its rows are an affine function of (offset, head group,
segment, position) (1-D patterns whose rate divides the heads, the segment and the ragged
tail: Flux's and Wan's pattern sets; 3.8x faster than ``index_select`` on the H200), else one
``index_select`` of the kept rows; its output and lse go to the merge:

- ``compile=False``: an fp32 scatter merge (``logaddexp`` of the lses into the kept rows, then
  ``index_add_`` of the weighted outputs);
- ``compile=True`` (default on CUDA): one ``torch.compile``'d gather merge that reads every
  part's output at the rows it keeps and writes the output once (fp32 inside, no fp32 buffer).
- ``cuda_graph=True`` (opt-in, CUDA): a call's launches (the copies, the kernels, the merge; in
  backward the kernels' backward and the gradient sums) replay as one CUDA graph per
  signature, from its second call on. At Flux sizes the launches of an eager call take
  the host about as long as the GPU takes to run them, so a call on its own follows the
  host's speed; a graph makes it GPU-bound, at the cost of copying q, k, v in and the output
  out, and of holding its buffers (its inputs, the parts' copies and outputs, the merged
  output) until ``attnpatch._clear_caches()``: at Flux 2048² (q of 99 MiB, bf16) a forward
  graph held 500-531 MiB allocated (814-984 MiB reserved), and the forward-in-autograd and
  backward graphs another 1247 MiB (2460-2506 MiB reserved), per call signature. Off by
  default: in a model the host issues the next layers' launches while the GPU runs, and a
  full Flux transformer ran no faster with it. Calls with an ``attn_mask``, and parts whose
  inner kernel is not one of :data:`GRAPH_SAFE_INNERS` (math's and flex's masks live in caches
  a graph cannot hold), run without one.

Gradients are exact like :func:`attnpatch.merge_partials`: every part's kernel runs its own
backward with the *merged* out and lse at its rows, and the gradients are summed back (fp32).
Under ``torch.compile`` the same parts run through :func:`attnpatch.attention` and the gather
merge, differentiated by autograd (the inner kernels' lse gradients).
"""

from __future__ import annotations

import itertools
import math
import types
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .._caches import BoundedCache
from .._cuda_graphs import NotCapturable, captured, signature
from .._errors import AttnPatchError, BackendUnavailableError
from ..backends.math import reference_attention
from ..call import AttentionCall
from ..dispatch import attention, run_selected
from ..registry import (Strategy, all_backends, canonical_name, get_backend,
                        option_values, register_backend)

__all__ = ["DilatedAttention", "DilatedOptions"]

NAME = "dilated"
#: grid option -> number of per-axis values in each segment length and rate
_AXES = {None: 1, "2d": 2, "3d": 3}
_AXIS_NAMES = {2: "(height, width)", 3: "(frames, height, width)"}
_EXAMPLES = {1: "(2048, 4096)", 2: "((16, 16), (32, 32))", 3: "((2, 16, 16), (4, 32, 32))"}


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _pattern_values(option: str, value, axes: int, grid: Optional[str]) -> tuple:
    """``value`` as a tuple with one entry per pattern (ints, or per-axis tuples for a grid)."""
    if axes == 1 and _positive_int(value):
        return (value,)
    if not isinstance(value, (tuple, list)) or not value:
        raise AttnPatchError(f"dilated: {option} must be a non-empty sequence with one entry per "
                             f"pattern, e.g. {option}={_EXAMPLES[axes]}; got {value!r}")
    entries = []
    for i, item in enumerate(value):
        if axes == 1:
            if not _positive_int(item):
                hint = (" (per-axis tuples need grid='2d' or grid='3d')"
                        if isinstance(item, (tuple, list)) else "")
                raise AttnPatchError(f"dilated: {option}[{i}] = {item!r} must be a positive "
                                     f"integer{hint}")
            entries.append(item)
        else:
            if not (isinstance(item, (tuple, list)) and len(item) == axes
                    and all(_positive_int(x) for x in item)):
                raise AttnPatchError(
                    f"dilated: with grid={grid!r}, {option}[{i}] must be a tuple of {axes} "
                    f"positive integers {_AXIS_NAMES[axes]}, got {item!r}; e.g. "
                    f"{option}={_EXAMPLES[axes]}")
            entries.append(tuple(item))
    return tuple(entries)


def _inner_name(inner) -> str:
    """The canonical name of an inner backend that can serve the merge (returns the lse)."""
    if not isinstance(inner, str):
        raise AttnPatchError(f"dilated: inner must be a backend name or 'auto', got "
                             f"{type(inner).__name__}")
    try:
        name = canonical_name(inner)
    except AttnPatchError as err:
        raise AttnPatchError(f"dilated: inner={inner!r}: {err}") from None
    if name == NAME:
        raise AttnPatchError("dilated: inner='dilated' would run dilated attention inside itself: "
                             "name a kernel (e.g. 'sdpa_cudnn', 'flash', 'math') or 'auto'")
    if name != "auto" and get_backend(name).spans_processes:
        raise AttnPatchError(f"dilated: inner={inner!r} splits one sequence across processes, "
                             "but dilated gathers each part's rows from the whole local "
                             "sequence: name a kernel (e.g. 'sdpa_cudnn', 'flash') or 'auto'")
    if name != "auto" and not get_backend(name).supports_lse:
        able = sorted(b.name for b in all_backends()
                      if b.supports_lse and b.name != NAME and not b.spans_processes)
        raise AttnPatchError(f"dilated: inner={inner!r} does not return the log-sum-exp that "
                             f"merging the patterns needs: use inner='auto' or one of {able}")
    return name


@dataclass(frozen=True)
class DilatedOptions:
    """The options of :class:`DilatedAttention`, validated when given.

    ``segment_lengths``/``dilation_rates``: one entry per pattern (ints; per-axis tuples with
    ``grid``), equal lengths, positive, each rate at most its segment length. ``inner``: the
    kernel that runs the parts ("auto" or a backend that returns the lse). ``detach_weights``:
    torchscale's backward. ``grid``: None, "2d" or "3d". ``compile``: the fused gather merge
    (default: on CUDA). ``cuda_graph``: replay each signature's launches as a CUDA graph
    (default False; calls with an ``attn_mask``, and calls whose parts run on an inner kernel
    outside :data:`GRAPH_SAFE_INNERS`, run without one).
    """

    segment_lengths: Any = (2048, 4096, 8192, 16384)
    dilation_rates: Any = (1, 2, 4, 8)
    inner: str = "auto"
    detach_weights: bool = False
    grid: Optional[str] = None
    compile: Optional[bool] = None
    cuda_graph: bool = False

    def __post_init__(self):
        if self.grid not in _AXES:
            raise AttnPatchError(f"dilated: grid must be None (segments along the token "
                                 f"sequence), '2d' (tiles of each frame's height x width) or "
                                 f"'3d' (tiles of frames x height x width), got {self.grid!r}")
        axes = _AXES[self.grid]
        lengths = _pattern_values("segment_lengths", self.segment_lengths, axes, self.grid)
        rates = _pattern_values("dilation_rates", self.dilation_rates, axes, self.grid)
        if len(lengths) != len(rates):
            raise AttnPatchError(f"dilated: segment_lengths has {len(lengths)} entries and "
                                 f"dilation_rates {len(rates)}: give one segment length and one "
                                 "dilation rate per pattern")
        for i, (w, r) in enumerate(zip(lengths, rates)):
            if any(ra > wa for wa, ra in zip(_tuple(w), _tuple(r))):
                raise AttnPatchError(
                    f"dilated: dilation_rates[{i}] = {r!r} exceeds segment_lengths[{i}] = {w!r}: "
                    f"a rate must not exceed its segment length (r <= w"
                    f"{' on every axis' if axes > 1 else ''})")
        object.__setattr__(self, "segment_lengths", lengths)
        object.__setattr__(self, "dilation_rates", rates)
        object.__setattr__(self, "inner", _inner_name(self.inner))
        if not isinstance(self.detach_weights, bool):
            raise AttnPatchError(f"dilated: detach_weights must be True or False, got "
                                 f"{self.detach_weights!r}")
        if self.compile is not None and not isinstance(self.compile, bool):
            raise AttnPatchError(f"dilated: compile must be True, False or None (on CUDA only), "
                                 f"got {self.compile!r}")
        if not isinstance(self.cuda_graph, bool):
            raise AttnPatchError(f"dilated: cuda_graph must be True (replay each call signature "
                                 f"as a CUDA graph) or False (the default), got "
                                 f"{self.cuda_graph!r}")

    def patterns(self) -> tuple:
        """((w per axis, r per axis), ...) on the axes the plan uses: (N,) for the sequence,
        (frames, height, width) for a grid ("2d": frames get w = r = 1)."""
        def axes(v):
            v = _tuple(v)
            return (1, *v) if self.grid == "2d" else v
        return tuple((axes(w), axes(r)) for w, r in zip(self.segment_lengths,
                                                          self.dilation_rates))


def _tuple(v) -> tuple:
    return v if isinstance(v, tuple) else (v,)


def _unravel(index: int, shape: tuple) -> tuple:
    """C-order coordinates of ``index`` in ``shape``."""
    coords = []
    for size in reversed(shape):
        index, c = divmod(index, size)
        coords.append(c)
    return tuple(reversed(coords))


# --- the call's geometry ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Geometry:
    """Where the image and text tokens of a self-attention call are."""

    text_position: str  # "none", "first" or "last"
    text: int           # text tokens
    image: int          # image tokens
    image_start: int
    text_start: int
    dims: tuple         # the image tokens' axes: (N,) or (frames, height, width)


def _dense(call: AttentionCall) -> bool:
    """Cross-attention: the keys are not the queries' tokens; runs dense through ``inner``."""
    layout = call.token_layout
    return call.seq_len_q != call.seq_len_kv or (layout is not None
                                                 and layout.text_position == "key")


def _geometry(call: AttentionCall, grid: Optional[str]) -> _Geometry:
    layout = call.token_layout
    position = "none" if layout is None else layout.text_position
    text = layout.text_tokens if position in ("first", "last") else 0
    if not text:
        position = "none"
    n = call.seq_len_q - text
    dims = (n,) if grid is None else tuple(layout.grid)
    return _Geometry(position, text, n, text if position == "first" else 0,
                     n if position == "last" else 0, dims)


def _traced_metadata(call: AttentionCall) -> bool:
    """A call torch.compile selects for from metadata: its sizes are stand-ins."""
    return call.query.device.type == "meta"


def _layout_reasons(call: AttentionCall) -> list[str]:
    """Why the call's token layout can't be followed (whatever the options)."""
    layout = call.token_layout
    if layout is None or _dense(call) or layout.text_position == "none":
        return []
    if layout.text_position == "unknown":
        return ["joint attention whose text position the model does not declare (TokenLayout "
                "text_position 'unknown'): dilating it could cut the prompt; give the layout a "
                "text_position ('first' or 'last'), or use another backend"]
    reasons = []
    if _traced_metadata(call):  # checked again on the real call
        return reasons
    if layout.seq_len_q is not None and layout.seq_len_q != call.seq_len_q:
        reasons.append(f"the token layout describes {layout.seq_len_q} tokens, the call has "
                       f"{call.seq_len_q}")
    if not 0 <= layout.text_tokens < call.seq_len_q:
        reasons.append(f"the token layout has {layout.text_tokens} text tokens for a call of "
                       f"{call.seq_len_q} tokens")
    return reasons


def _option_reasons(call: AttentionCall, opts: DilatedOptions) -> list[str]:
    """Why these options can't run the call."""
    if _dense(call) or _layout_reasons(call):
        return []
    reasons = []
    if opts.grid is not None:
        layout = call.token_layout
        grid = None if layout is None else layout.grid
        text = layout.text_tokens if layout is not None and layout.text_position in (
            "first", "last") else 0
        if grid is None and not _traced_metadata(call):
            reasons.append(
                f"grid={opts.grid!r} needs the image grid (frames, height, width) of the call's "
                f"TokenLayout and this call has {'no layout' if layout is None else 'none'}: use "
                "grid=None (segments along the token sequence), or pass attention(..., "
                "token_layout=TokenLayout(...)) (patched diffusers models set it)")
        elif grid is not None and not _traced_metadata(call) and (
                math.prod(grid) != call.seq_len_q - text):
            reasons.append(f"the layout's grid {grid} has {math.prod(grid)} tokens but the call "
                           f"has {call.seq_len_q - text} image tokens")
    if call.requires_grad and opts.inner != "auto" and not get_backend(
            opts.inner).supports_backward_from_lse:
        able = sorted(b.name for b in all_backends() if b.supports_backward_from_lse
                      and b.supports_lse and b.name != NAME)
        reasons.append(f"inner={opts.inner!r} cannot run its backward from the merged (out, lse) "
                       f"(supports_backward_from_lse), which exact gradients need: use "
                       f"inner='auto' or one of {able}")
    return reasons


# --- the plan -----------------------------------------------------------------------------------

class _Part:
    """One inner-kernel call over ``m`` independent problems of ``cq`` queries and ``ck`` keys.

    ``heads`` None: each problem runs for every query head (its positions do not depend on the
    head; GQA kept): the call is (B·m, H, cq, D). Else ``heads`` (m,) is each problem's query
    head: the call is (B, m, cq, D). ``q_pos`` (m, cq), ``k_pos`` (m, ck): the token positions,
    in order. ``q_view``/``k_view``: ``(start, m, c)`` when the positions are the contiguous
    range start..start+m·c (read as a strided view). ``causal``: top-left causal inside each
    problem; ``keep``: None or a bool (cq, ck) mask every problem applies too.
    """

    __slots__ = ("q_pos", "k_pos", "heads", "q_view", "k_view", "causal", "keep", "affine",
                 "_cache")

    def __init__(self, q_pos, k_pos, heads=None, q_view=None, k_view=None, causal=False,
                 keep=None, affine=None):
        self.q_pos, self.k_pos, self.heads = q_pos, k_pos, heads
        self.q_view, self.k_view = q_view, k_view
        self.causal, self.keep = causal, keep
        #: (base, r, n, w, c) when problem (o, g, s) (in that order, o < r, g < H/r, s < n)
        #: is head o + g·r at positions base + s·w + o + j·r, j < c (for q and k alike): its
        #: rows are one strided view, copied once (see :func:`_affine_copy`)
        self.affine = affine
        self._cache: dict = {}

    @property
    def problems(self) -> int:
        return self.q_pos.shape[0]

    def pairs(self, heads: int) -> int:
        """Query-key pairs per batch element (over all heads)."""
        per_head = 1 if self.heads is not None else heads
        return self.problems * per_head * self.q_pos.shape[1] * self.k_pos.shape[1]

    def rows(self, side: str, width: int, group: int, a: int, b: int) -> torch.Tensor:
        """Flat row indices h·a + p·b of the part's ``side`` ("q" or "k") positions, in the
        order of the sub-call's (problems, heads, positions); ``width``: the heads of the
        tensor read (H or Hkv), ``group``: query heads per kv head (for "k" with per-problem
        heads)."""
        key = ("rows", side, width, group, a, b)
        rows = self._cache.get(key)
        if rows is None:
            pos = self.q_pos if side == "q" else self.k_pos
            if self.heads is None:
                h = torch.arange(width, device=pos.device)
                rows = (h[None, :, None] * a + pos[:, None, :] * b).flatten()
            else:
                h = self.heads if side == "q" else self.heads // group
                rows = (h[:, None] * a + pos * b).flatten()
            if not torch.compiler.is_dynamo_compiling():
                self._cache[key] = rows
        return rows

    def inverse(self, side: str, heads: int, seq: int, transposed: bool) -> torch.Tensor:
        """(heads, seq) (or (seq, heads)) long: the part's row (per batch element) that holds
        head h, position p, or -1. ``heads``: H for "q", Hkv for "k" of a part without
        per-problem heads, H (query heads) for "k" with them."""
        key = ("inverse", side, heads, seq, transposed)
        inv = self._cache.get(key)
        if inv is None:
            pos = self.q_pos if side == "q" else self.k_pos
            m, c = pos.shape
            inv = torch.full((heads, seq), -1, dtype=torch.long, device=pos.device)
            if self.heads is None:
                h = torch.arange(heads, device=pos.device)
                inv[h[None, :, None], pos[:, None, :]] = torch.arange(
                    m * heads * c, device=pos.device).view(m, heads, c)
            else:
                inv[self.heads[:, None], pos] = torch.arange(m * c, device=pos.device).view(m, c)
            if transposed:
                inv = inv.t().contiguous()
            if not torch.compiler.is_dynamo_compiling():
                self._cache[key] = inv
        return inv

    def row_map(self, side: str, heads: int, seq: int, transposed: bool,
                strides: tuple) -> torch.Tensor:
        """:meth:`inverse` in rows of a tensor of the sub-call's shape whose dims 0..2 have
        ``strides`` (in rows; see :func:`_row_view`) instead of the logical order."""
        inv = self.inverse(side, heads, seq, transposed)
        pos = self.q_pos if side == "q" else self.k_pos
        m, hx = (pos.shape[0], heads) if self.heads is None else (1, pos.shape[0])
        count = pos.shape[1]
        if strides == (hx * count, count, 1):
            return inv
        key = ("map", side, heads, seq, transposed, strides)
        mapped = self._cache.get(key)
        if mapped is None:
            row = inv.clamp(min=0)
            mapped = torch.where(inv >= 0, row // (hx * count) * strides[0]
                                 + (row // count) % hx * strides[1] + row % count * strides[2],
                                 -1)
            self._cache[key] = mapped
        return mapped


class _Plan:
    """The parts of one dilated call (or ``dense``: cross-attention through the inner kernel)."""

    __slots__ = ("dense", "parts", "summary", "merges", "__weakref__")

    def __init__(self, dense: bool, parts: list, summary: str):
        self.dense, self.parts, self.summary = dense, parts, summary
        #: the fused merge's signature -> (its compiled function, out maps, lse maps)
        self.merges: dict = {}


def _axis_classes(length: int, w: int, r: int, o: int, device) -> list[tuple]:
    """The kept coordinates of one axis for offset ``o``: ``[(coords (n, c), start)]``, one
    entry for the full segments and one for a ragged last segment that keeps any; ``start``:
    the first coordinate when the coordinates are one contiguous range (rate 1), else None."""
    full, tail = divmod(length, w)
    classes = []
    if full:
        count = -(-(w - o) // r)
        coords = (torch.arange(full, device=device)[:, None] * w + o
                  + torch.arange(count, device=device)[None, :] * r)
        classes.append((coords, 0 if r == 1 else None))
    if tail > o:
        count = -(-(tail - o) // r)
        coords = (full * w + o + torch.arange(count, device=device) * r)[None, :]
        classes.append((coords, full * w if r == 1 else None))
    return classes


def _pattern_parts(dims: tuple, w: tuple, r: tuple, heads: int, base: int, causal: bool,
                   device) -> list[_Part]:
    """The parts of one pattern: (head offset, tile class) pairs grouped by kept count;
    a loop over head offsets and the ≤ 2 classes per axis, never over segments."""
    strides = [math.prod(dims[a + 1:]) for a in range(len(dims))]
    period = math.prod(r)
    groups: dict[int, list] = {}
    for k in range(min(period, heads)):
        offsets = _unravel(k, r)
        axes = [_axis_classes(dims[a], w[a], r[a], offsets[a], device) for a in range(len(dims))]
        for combo in itertools.product(*axes):
            pos = None
            for a, (coords, _) in enumerate(combo):
                term = coords * strides[a]
                pos = term if pos is None else (pos[:, None, :, None] + term[None, :, None, :]
                                                ).reshape(pos.shape[0] * term.shape[0], -1)
            start = combo[0][1] if len(dims) == 1 else None
            groups.setdefault(pos.shape[1], []).append((k, pos + base, start))
    parts = []
    for count in sorted(groups, reverse=True):
        items = groups[count]
        if period == 1:  # the same positions for every head
            pos = torch.cat([p for _, p, _ in items])
            view = (base + items[0][2], pos.shape[0], count) if len(items) == 1 and (
                items[0][2] is not None) else None
            parts.append(_Part(pos, pos, None, view, view, causal))
        else:
            hs = [torch.arange(k, heads, period, device=device) for k, _, _ in items]
            head = torch.cat([h.repeat_interleave(p.shape[0]) for h, (_, p, _) in zip(hs, items)])
            pos = torch.cat([p.repeat(h.shape[0], 1) for h, (_, p, _) in zip(hs, items)])
            affine = (_affine(pos, head, heads, period) if len(dims) == 1
                      and not torch.compiler.is_dynamo_compiling() else None)
            parts.append(_Part(pos, pos, head, None, None, causal, affine=affine))
    return parts


def _affine(pos: torch.Tensor, head: torch.Tensor, heads: int, r: int) -> Optional[tuple]:
    """``(base, r, n, w, c)`` (see :attr:`_Part.affine`) when a per-head part of a 1-D pattern
    with rate ``r`` has that form (checked against its positions and heads), else None."""
    m, c = pos.shape
    if heads % r or m % heads:
        return None
    n = m // heads
    base = int(pos[0, 0])
    w = int(pos[1, 0]) - base if n > 1 else 0
    o, g, s, j = (t.flatten() for t in torch.meshgrid(
        *(torch.arange(size, device=pos.device) for size in (r, heads // r, n, c)),
        indexing="ij"))
    if not (torch.equal(pos.flatten(), base + s * w + o + j * r)
            and torch.equal(head, (o + g * r).view(m, c)[:, 0])):
        return None
    return base, r, n, w, c


def _build_plan(call: AttentionCall, opts: DilatedOptions) -> _Plan:
    heads, device = call.num_heads, call.device
    if _dense(call):
        return _Plan(True, [], f"cross-attention ({call.seq_len_q} queries, "
                                    f"{call.seq_len_kv} keys): dense through inner "
                                    f"{opts.inner!r}")
    geo = _geometry(call, opts.grid)
    seq, causal = call.seq_len_q, call.is_causal
    parts = []
    if geo.text:
        t, n = geo.text, geo.image
        text_q = (geo.text_start + torch.arange(t, device=device))[None]
        keep, text_causal = None, causal
        if causal and geo.text_position == "last":  # text rows see keys <= their position
            keep = (torch.arange(seq, device=device)[None, :]
                    <= (n + torch.arange(t, device=device))[:, None])
            text_causal = False
        parts.append(_Part(text_q, torch.arange(seq, device=device)[None], None,  # text rows
                           (geo.text_start, 1, t), (0, 1, seq), text_causal, keep))
        if not (causal and geo.text_position == "last"):  # (text after every image query)
            parts.append(_Part((geo.image_start + torch.arange(n, device=device))[None],
                               text_q, None, (geo.image_start, 1, n), (geo.text_start, 1, t)))
    for w, r in opts.patterns():
        parts.extend(_pattern_parts(geo.dims, w, r, heads, geo.image_start, causal, device))
    fraction = sum(p.pairs(heads) for p in parts) / (heads * seq * seq)
    where = (f"grid {geo.dims} ({opts.grid})" if opts.grid is not None else
             f"{geo.image} image tokens" if geo.text else f"{seq} tokens")
    text = f", text {geo.text_position} ({geo.text} tokens, dense)" if geo.text else ""
    pats = " ".join(f"(w={w}, r={r})" for w, r in zip(opts.segment_lengths,
                                                        opts.dilation_rates))
    summary = f"dilated {pats} over {where}{text}: {fraction:.1%} of dense FLOPs"
    return _Plan(False, parts, summary)


_PLANS = BoundedCache(64)


def _plan(call: AttentionCall, opts: DilatedOptions) -> _Plan:
    if torch.compiler.is_dynamo_compiling():  # traced into the graph (constants there)
        return _build_plan(call, opts)
    key = (call.seq_len_q, call.seq_len_kv, call.num_heads, call.num_kv_heads, call.device,
           call.is_causal, call.token_layout, opts)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS.put(key, _build_plan(call, opts))
    return plan


# --- gathering and scattering rows ------------------------------------------------------------

def _order(x: torch.Tensor) -> tuple[int, int]:
    """(a, b) such that row h·a + p·b of ``x`` (B, H, S, ...) flattened in its memory order
    holds head h, position p: (S, 1) for (B, H, S) memory, (1, H) for (B, S, H) memory."""
    heads, seq = x.shape[1], x.shape[2]
    if heads > 1 and seq > 1 and x.stride(1) < x.stride(2):
        return 1, heads
    return seq, 1


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``x`` (B, H, S, ...) as rows (B, R, ...) and (a, b) such that row h·a + p·b holds head
    h, position p. In eager mode a strided view of ``x``'s own memory, whatever its strides
    (q, k, v cut from a fused projection included); while torch.compile traces, the rows in
    :func:`_order` (a view for bhsd or bshd memory, else a copy: autograd through it is
    cheap)."""
    b, h, s = x.shape[:3]
    feat = x.shape[3:]
    if not torch.compiler.is_dynamo_compiling() and (not feat or x.stride(-1) == 1 or (
            feat == (1,))):
        sh, ss = (x.stride(1) if h > 1 else 0), (x.stride(2) if s > 1 else 0)
        unit = math.gcd(sh, ss) or 1
        a, step = sh // unit, ss // unit
        count = (h - 1) * a + (s - 1) * step + 1
        return x.as_strided((b, count, *feat), (x.stride(0), unit, *x.stride()[3:])), a, step
    a, step = _order(x)
    if a == 1:
        return x.transpose(1, 2).reshape(b, s * h, *feat), a, step
    return x.reshape(b, h * s, *feat), a, step


def _standard(t: torch.Tensor) -> bool:
    """Whether 4-D ``t`` has the strides of a contiguous (B, H, S, D) or (B, S, H, D) tensor
    (what every kernel takes without a copy)."""
    for order in ((0, 1, 2, 3), (0, 2, 1, 3)):
        expected, ok = 1, True
        for dim in reversed(order):
            if t.shape[dim] != 1 and t.stride(dim) != expected:
                ok = False
                break
            expected *= t.shape[dim]
        if ok:
            return True
    return False


def _take(x: torch.Tensor, rows: tuple, part: _Part, side: str, group: int) -> torch.Tensor:
    """The part's ``side`` rows of ``x`` (B, Hx, S, ...) as its sub-call tensor
    ((B·m, Hx, c, ...) or (B, m, c, ...)); ``rows``: ``_rows(x)``."""
    batch, width = x.shape[0], x.shape[1]
    view = part.q_view if side == "q" else part.k_view
    pos = part.q_pos if side == "q" else part.k_pos
    m, c = pos.shape
    if view is not None:
        start, m, c = view
        t = x[:, :, start:start + m * c].unflatten(2, (m, c)).transpose(1, 2).flatten(0, 1)
        return t if t.dim() != 4 or _standard(t) else t.contiguous()
    if part.affine is not None and (side == "q" or group == 1) and (
            not torch.compiler.is_dynamo_compiling()):
        return _affine_copy(x, part.affine)
    flat, a, b = rows
    taken = flat.index_select(1, part.rows(side, width, group, a, b))
    if part.heads is None:
        return taken.view(batch * m, width, c, *x.shape[3:])
    return taken.view(batch, m, c, *x.shape[3:])


def _affine_copy(x: torch.Tensor, affine: tuple) -> torch.Tensor:
    """The rows of an affine part (:attr:`_Part.affine`) of ``x`` (B, H, S, ...) as a
    contiguous (B, m, c, ...) tensor: one strided copy, of 8-byte words where the feature rows
    and the alignment allow (a strided copy moves one element per thread: of bf16 elements it
    ran at ~1 TB/s on the H200, of 8-byte words 2.3x faster)."""
    base, r, n, w, c = affine
    batch, heads = x.shape[:2]
    feat = x.shape[3:]
    words = x
    if len(feat) == 1 and x.stride(-1) == 1 and x.element_size() < 8 and (
            x.data_ptr() % 8 == 0) and (feat[0] * x.element_size()) % 8 == 0 and all(
            (st * x.element_size()) % 8 == 0 for st in (*x.stride()[:3], x.storage_offset())):
        words = x.view(torch.int64)
    sb, sh, ss = words.stride()[:3]
    wfeat = words.shape[3:]
    view = words.as_strided((batch, r, heads // r, n, c, *wfeat),
                            (sb, sh + ss, r * sh, w * ss, r * ss, *words.stride()[3:]),
                            words.storage_offset() + base * ss)
    taken = view.reshape(batch, r * (heads // r) * n, c, *wfeat)
    return taken.view(x.dtype) if words is not x else taken


def _part_mask(call: AttentionCall, part: _Part) -> Optional[torch.Tensor]:
    """The call's ``attn_mask`` at the part's (head, query, key) entries, broadcastable to the
    sub-call's (B', H', cq, ck), with the part's own ``keep`` mask folded in."""
    mask, keep = call.attn_mask, part.keep
    if mask is None:
        return keep
    device = mask.device
    _, hm, qm, km = mask.shape
    if part.heads is None:  # indices (m|1, H|1, cq|1, ck|1): taken (Bm, m|1, H|1, cq|1, ck|1)
        zero = torch.zeros((1, 1, 1, 1), dtype=torch.long, device=device)
        hi = torch.arange(call.num_heads, device=device)[None, :, None, None] if hm > 1 else zero
        qi = part.q_pos[:, None, :, None] if qm > 1 else zero
        ki = part.k_pos[:, None, None, :] if km > 1 else zero
        taken = mask[:, hi, qi, ki]
        if taken.shape[0] == 1 and taken.shape[1] == 1:
            taken = taken[:, 0]
        else:  # the sub-call's batch is (B, m) flattened
            taken = taken.expand(call.batch_size, part.problems, *taken.shape[2:]).flatten(0, 1)
    else:  # indices (m|1, cq|1, ck|1): taken (Bm, m|1, cq|1, ck|1)
        zero = torch.zeros((1, 1, 1), dtype=torch.long, device=device)
        hi = part.heads[:, None, None] if hm > 1 else zero
        qi = part.q_pos[:, :, None] if qm > 1 else zero
        ki = part.k_pos[:, None, :] if km > 1 else zero
        taken = mask[:, hi, qi, ki]
    if keep is None:
        return taken
    if taken.dtype == torch.bool:
        return taken & keep
    return taken.masked_fill(~keep, float("-inf"))


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- merges -----------------------------------------------------------------------------------

def _safe_logsumexp(values: list) -> torch.Tensor:
    """logsumexp over the list (same shapes), -inf where every value is -inf, with finite
    gradients there (no -inf - -inf)."""
    stacked = torch.stack(values)
    top = stacked.detach().amax(dim=0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.exp(stacked - top).sum(dim=0)
    empty = total == 0
    safe = torch.where(empty, torch.ones_like(total), total)
    return torch.where(empty, torch.full_like(total, float("-inf")), torch.log(safe) + top)


def _row_view(t: torch.Tensor, batch: int) -> tuple[torch.Tensor, tuple]:
    """A part's sub-call tensor ``t`` (B', X, c, F) as rows (B, R, F) in its memory order (a
    view when its storage is dense with the batch outermost, else a contiguous copy), and the
    strides of its dims 0..2 in rows (for :meth:`_Part.row_map`)."""
    feat = t.shape[-1]
    dims = sorted((d for d in range(3) if t.shape[d] != 1), key=t.stride)
    dense = feat == 1 or t.stride(-1) == 1
    expected = feat
    for d in dims:
        dense = dense and t.stride(d) == expected
        expected *= t.shape[d]
    if not dense or (batch > 1 and dims and dims[-1] != 0):
        t = t.contiguous()
    rows = t.numel() // max(batch * feat, 1)
    return (t.as_strided((batch, rows, feat), (rows * feat, feat, 1)),
            tuple(t.stride(d) // feat if t.shape[d] != 1 else 0 for d in range(3)))


def _gather_merge(outs: list, lses: list, out_maps: list, lse_maps: list, dtype: torch.dtype,
                  detach: bool):
    """The merged (out, lse): every part's output read at the rows it keeps, weighted by
    exp(lse_i - lse). ``outs[i]`` (B, R_i, Dv) and ``lses[i]`` (B, R'_i) rows; ``out_maps[i]``
    and ``lse_maps[i]`` (X, Y): the row holding (X, Y), -1 where part i does not keep it.
    Returns out (B, X, Y, Dv) in ``dtype`` and lse (B, X, Y) in fp32 (fp64 for fp64). One
    fused kernel under torch.compile (each part's output read once, the result written once);
    differentiable (``detach``: the mixing weights carry no gradient)."""
    acc = _accumulator(dtype)
    kept = [m >= 0 for m in lse_maps]
    at = [torch.where(k, lse[:, m.clamp(min=0)].to(acc), float("-inf"))
          for lse, m, k in zip(lses, lse_maps, kept)]
    lse = _safe_logsumexp(at)
    base = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = None
    for o, a, m, k in zip(outs, at, out_maps, kept):
        weight = torch.exp(a - base)
        if detach:
            weight = weight.detach()
        term = torch.where(k[..., None], weight[..., None] * o[:, m.clamp(min=0)].to(acc), 0.0)
        out = term if out is None else out + term
    return out.to(dtype), lse


def _gather_sum(grads: list, maps: list, per_query_head: list, group: int, dtype,
                transposed: bool):
    """Σ_i ``grads[i]`` (B, R_i, D) rows read at ``maps[i]`` (X, Y) (-1: nothing):
    (B, X, Y, D) in ``dtype``, summed in fp32. A map over query heads (``per_query_head``) is
    summed over each group of ``group`` heads onto its kv head (the heads are Y when
    ``transposed``, else X)."""
    acc = _accumulator(dtype)
    axis = 2 if transposed else 1
    total = None
    for g, m, per_query in zip(grads, maps, per_query_head):
        term = torch.where((m >= 0)[..., None], g[:, m.clamp(min=0)].to(acc), 0.0)
        if per_query and group > 1:
            term = term.unflatten(axis, (-1, group)).sum(axis + 1)
        total = term if total is None else total + term
    return total.to(dtype)


_COMPILED = BoundedCache(256)


def _compiled(fn, plan: _Plan, signature: tuple):
    """``torch.compile(fn)`` for one plan and one ``signature`` (what else its graph is
    specialised on: batch size, dtype, head dims, memory order): its own code object, so each
    gets its own dynamo cache. Keyed by the plan alone, a model's varying batch sizes
    (``num_images_per_prompt``, CFG on or off) recompiled one code object until dynamo's
    recompile limit, a hard error under ``fullgraph=True``."""
    key = (fn.__name__, plan, signature)
    compiled = _COMPILED.get(key)
    if compiled is None:
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{len(_COMPILED)}")
        fresh = types.FunctionType(code, fn.__globals__, code.co_name)
        compiled = _COMPILED.put(key, torch.compile(fresh, dynamic=False, fullgraph=True))
    return compiled


# --- one eager call -----------------------------------------------------------------------------

class _Run:
    """A dilated call in eager mode: the parts on the inner kernel, the merge, the backward."""

    def __init__(self, call: AttentionCall, plan: _Plan, opts: DilatedOptions, fused: bool):
        self.call, self.plan, self.opts, self.fused = call, plan, opts, fused
        self.group = call.num_heads // call.num_kv_heads
        self.masks = [_part_mask(call, part) for part in plan.parts]
        self.backends: list = []

    def sub_calls(self, q, k, v, grad: bool):
        rq, rk, rv = _rows(q), _rows(k), _rows(v)
        # without a user mask a part's sub-call differs between calls of one signature only in
        # its tensors: the plan's sub-calls are built (and validated) once, then copied with
        # the new ones (one lookup per call)
        key = None if self.call.attn_mask is not None else (
            self.plan, self.call.signature(), grad)
        templates = None if key is None else _TEMPLATES.get(key)
        made = []
        for i, (part, mask) in enumerate(zip(self.plan.parts, self.masks)):
            tensors = (_take(q, rq, part, "q", self.group), _take(k, rk, part, "k", self.group),
                       _take(v, rv, part, "k", self.group))
            if templates is not None:
                yield part, templates[i].with_tensors(*tensors)
                continue
            sub = self.call.replace(query=tensors[0], key=tensors[1], value=tensors[2],
                                    attn_mask=mask, is_causal=part.causal, return_lse=True)
            sub.requires_grad = sub.backward_from_lse = grad
            # the template keeps the shapes, not the memory
            made.append(sub.with_tensors(*(torch.empty_like(t, device="meta") for t in tensors)))
            yield part, sub
        if key is not None and templates is None and not torch.compiler.is_dynamo_compiling():
            _TEMPLATES.put(key, made)

    def forward(self, q, k, v, grad: bool):
        """(out, lse, own): own = every part's (out, lse) when detach_weights needs them."""
        outs, lses = [], []
        self.backends = []
        for part, sub in self.sub_calls(q, k, v, grad):
            (o, lse), backend = run_selected(self.opts.inner, sub, {})
            self.backends.append(backend)
            outs.append(o)
            lses.append(lse)
        out, lse = (self._fused_merge if self.fused else self._scatter_merge)(outs, lses)
        own = [t for pair in zip(outs, lses) for t in pair] if (
            grad and self.opts.detach_weights) else []
        return out, lse, own

    def _scatter_merge(self, outs, lses):
        call = self.call
        batch, heads, seq, dv = call.batch_size, call.num_heads, call.seq_len_q, call.head_dim_v
        acc = _accumulator(call.dtype)
        a, b = _order(call.query)
        merged = torch.zeros(batch, heads * seq, dv, dtype=acc, device=call.device)
        total = torch.full((batch, heads * seq), float("-inf"), dtype=acc, device=call.device)
        index = [part.rows("q", heads, 1, a, b) for part in self.plan.parts]
        lses = [lse.reshape(batch, -1).to(acc) for lse in lses]
        for idx, lse in zip(index, lses):
            total.index_copy_(1, idx, torch.logaddexp(total.index_select(1, idx), lse))
        base = total.nan_to_num(neginf=0.0)
        for idx, o, lse in zip(index, outs, lses):
            weight = torch.exp(lse - base.index_select(1, idx))
            merged.index_add_(1, idx, o.reshape(batch, -1, dv).to(acc) * weight[..., None])
        if a == 1:  # the query's (B, S, H) memory
            out = merged.view(batch, seq, heads, dv).transpose(1, 2)
            total = total.view(batch, seq, heads).transpose(1, 2)
        else:
            out, total = merged.view(batch, heads, seq, dv), total.view(batch, heads, seq)
        return out.to(call.dtype), total

    def _fused_merge(self, outs, lses):
        call = self.call
        batch, heads, seq = call.batch_size, call.num_heads, call.seq_len_q
        bshd = _order(call.query)[0] == 1
        outs = [_row_view(o, batch) for o in outs]
        lses = [_row_view(lse.unsqueeze(-1), batch) for lse in lses]
        signature = (batch, call.dtype, call.head_dim_v, bshd,
                     tuple(st for _, st in outs), tuple(st for _, st in lses))
        merge = self.plan.merges.get(signature)
        if merge is None:
            parts = self.plan.parts
            merge = (_compiled(_gather_merge, self.plan, signature),
                     [p.row_map("q", heads, seq, bshd, st) for p, (_, st) in zip(parts, outs)],
                     [p.row_map("q", heads, seq, bshd, st) for p, (_, st) in zip(parts, lses)])
            if not torch.compiler.is_dynamo_compiling():
                self.plan.merges[signature] = merge
        compiled, out_maps, lse_maps = merge
        out, lse = compiled([o for o, _ in outs], [lse[..., 0] for lse, _ in lses], out_maps,
                            lse_maps, call.dtype, False)
        return (out.transpose(1, 2), lse.transpose(1, 2)) if bshd else (out, lse)

    def backward(self, q, k, v, out, lse, grad_out, own):
        """(dq, dk, dv): every part's kernel backward from the merged (out, lse) at its rows
        (``detach_weights``: from its own (out, lse), for grad_out times its weight)."""
        acc = _accumulator(self.call.dtype)
        lse4 = lse.unsqueeze(-1)
        blocked = lse4.masked_fill(lse4 == float("-inf"), float("inf"))  # P = 0 for empty rows
        rg, ro, rb, rl = _rows(grad_out), _rows(out), _rows(blocked), _rows(lse4)
        grads = []
        for i, (part, sub) in enumerate(self.sub_calls(q, k, v, True)):
            g = _take(grad_out, rg, part, "q", 1)
            if self.opts.detach_weights:
                o, l_own = own[2 * i], own[2 * i + 1]  # the part's own (out, lse)
                merged = _take(lse4, rl, part, "q", 1).squeeze(-1)
                weight = torch.exp(l_own.to(acc) - merged.nan_to_num(neginf=0.0))
                g = (g.to(acc) * weight.unsqueeze(-1)).to(g.dtype)
                lp = l_own.masked_fill(l_own == float("-inf"), float("inf"))
            else:
                o = _take(out, ro, part, "q", 1)
                lp = _take(blocked, rb, part, "q", 1).squeeze(-1)
            grads.append(self.backends[i].backward(sub, g, o, lp))
        if self.fused:
            return self._fused_grads(grads, q, k, v)
        return self._scatter_grads(grads, q, k, v)

    def _scatter_grads(self, parts, q, k, v):
        """(dq, dk, dv) summed by ``index_add_`` into fp32 buffers in the memory order of q,
        k and v."""
        call = self.call
        batch, seq, acc = call.batch_size, call.seq_len_q, _accumulator(call.dtype)
        grads = []
        for i, t in enumerate((q, k, v)):
            heads, dim = t.shape[1], t.shape[-1]
            a, b = _order(t)
            buf = torch.zeros(batch, heads * seq, dim, dtype=acc, device=call.device)
            for part, d in zip(self.plan.parts, parts):
                rows = part.rows("q" if i == 0 else "k", heads, self.group, a, b)
                buf.index_add_(1, rows, d[i].to(acc).reshape(batch, -1, dim))
            grad = (buf.view(batch, seq, heads, dim).transpose(1, 2) if a == 1
                    else buf.view(batch, heads, seq, dim))
            grads.append(grad.to(t.dtype))
        return tuple(grads)

    def _fused_grads(self, parts, q, k, v):
        """(dq, dk, dv) by one compiled gather-sum each, in the memory order of q, k and v."""
        call = self.call
        batch, heads, seq = call.batch_size, call.num_heads, call.seq_len_q
        grads = []
        for i, t in enumerate((q, k, v)):
            transposed = _order(t)[0] == 1
            rows = [_row_view(d[i], batch) for d in parts]
            summed = _compiled(_gather_sum, self.plan, (
                batch, i == 0, t.dtype, tuple(t.shape[1:]), transposed,
                tuple(st for _, st in rows), tuple(r.dtype for r, _ in rows)))
            per_query = [i > 0 and p.heads is not None for p in self.plan.parts]
            maps = [p.row_map("q" if i == 0 else "k", heads if i == 0 or pq else t.shape[1],
                              seq, transposed, st)
                    for p, pq, (_, st) in zip(self.plan.parts, per_query, rows)]
            grad = summed([r for r, _ in rows], maps, per_query, 1 if i == 0 else self.group,
                          t.dtype, transposed)
            grads.append(grad.transpose(1, 2) if transposed else grad)
        return tuple(grads)


#: inner kernels a graph may capture: they read their inputs only (math's causal masks and
#: flex's block masks live in bounded caches, which may free them while a graph still reads them)
GRAPH_SAFE_INNERS = frozenset({"sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flash2", "flash3",
                               "flash4"})
#: (plan, call signature, grad) -> the plan's validated sub-calls, on meta tensors
_TEMPLATES = BoundedCache(256)


def _graphed(call: AttentionCall, opts: DilatedOptions) -> bool:
    """Whether ``call`` runs through CUDA graphs (see ``cuda_graph``)."""
    return opts.cuda_graph and call.device.type == "cuda" and call.attn_mask is None


def _graph_safe(backends: list) -> bool:
    return all(b.name in GRAPH_SAFE_INNERS for b in backends)


class _GraphedRun:
    """A :class:`_Run` whose forward and backward replay CUDA graphs, one per signature (see
    :mod:`attnpatch._cuda_graphs`); a signature's first call, and every call of one that could
    not be captured, runs the :class:`_Run` itself."""

    def __init__(self, run: _Run):
        self.run = run
        call = run.call
        self.key = (NAME, run.plan, run.opts, run.fused, call.scale, call.softcap)

    @property
    def backends(self) -> list:
        return self.run.backends

    def _twin(self, q, k, v) -> _Run:
        """The same run on the graph's own input buffers."""
        run = self.run
        twin = _Run(run.call.replace(query=q, key=k, value=v), run.plan, run.opts, run.fused)
        twin.backends = run.backends
        return twin

    def forward(self, q, k, v, grad: bool):
        def fn(q, k, v):
            twin = self._twin(q, k, v)
            out, lse, own = twin.forward(q, k, v, grad)
            if not _graph_safe(twin.backends):  # in the warm-up, before any capture
                raise NotCapturable(f"parts on {[b.name for b in twin.backends]}")
            return (out, lse, *own), twin.backends

        got = captured((*self.key, "forward", grad, signature(q, k, v)), fn, (q, k, v))
        if got is None:
            return self.run.forward(q, k, v, grad)
        (out, lse, *own), self.run.backends = got
        return out, lse, own

    def backward(self, q, k, v, out, lse, grad_out, own):
        def fn(q, k, v, out, lse, grad_out, *own):
            return self._twin(q, k, v).backward(q, k, v, out, lse, grad_out, list(own)), None

        inputs = (q, k, v, out, lse, grad_out, *own)
        got = None if not _graph_safe(self.run.backends) else captured(
            (*self.key, "backward", tuple(map(id, self.run.backends)), signature(*inputs)),
            fn, inputs)
        if got is None:
            return self.run.backward(q, k, v, out, lse, grad_out, own)
        return got[0]


class _DilatedFunction(torch.autograd.Function):
    """Exact backward of the merge: each part's kernel backward from the merged (out, lse)."""

    @staticmethod
    def forward(ctx, run: _Run, q, k, v):
        out, lse, own = run.forward(q, k, v, True)
        ctx.run = run
        ctx.save_for_backward(q, k, v, out, lse, *own)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, *own = ctx.saved_tensors
        return (None, *ctx.run.backward(q, k, v, out, lse, grad_out, own))


# --- the backend --------------------------------------------------------------------------------

@register_backend
class DilatedAttention(Strategy):
    """LongNet dilated attention (see the module docstring), on any inner kernel with an lse.

    Options (:class:`DilatedOptions`): ``segment_lengths``, ``dilation_rates``, ``inner``
    (default "auto"), ``detach_weights`` (default False), ``grid`` (None, "2d", "3d"),
    ``compile`` (the fused merge; default on CUDA).
    """

    name = NAME
    description = "LongNet dilated attention: segments x dilation rates on an inner kernel"
    Options = DilatedOptions
    supports_dropout = False  # an exact merge runs its parts without dropout
    supports_lse = True       # the merged lse, without a gradient
    supports_softcap = True   # passed to the inner kernel
    reads_token_layout = True

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        reasons = super().not_supported_reasons(call) + _layout_reasons(call)
        if isinstance(call.options, DilatedOptions):
            reasons += _option_reasons(call, call.options)
        return reasons

    def report_note(self, call: AttentionCall) -> Optional[str]:
        opts = call.options
        if not isinstance(opts, DilatedOptions) or _layout_reasons(call) or _option_reasons(
                call, opts):
            return None
        return _plan(call, opts).summary

    def forward(self, call: AttentionCall, **options):
        if torch.compiler.is_dynamo_compiling():  # no ContextVar in a trace: run() directly
            return self.run(call, **options)
        return super().forward(call, **options)

    def run(self, call: AttentionCall, **options):
        opts = call.options if isinstance(call.options, DilatedOptions) else option_values(
            self, options)
        reasons = _layout_reasons(call) + _option_reasons(call, opts)
        if reasons:
            raise BackendUnavailableError(f"backend {NAME!r} cannot run {call}:", {NAME: reasons})
        plan = _plan(call, opts)
        if plan.dense:
            if torch.compiler.is_dynamo_compiling():
                return attention(call.query, call.key, call.value, call.attn_mask,
                                 call.is_causal, call.scale, 0.0, opts.inner,
                                 return_lse=call.return_lse, softcap=call.softcap)
            return run_selected(opts.inner, call.replace(), {})[0]
        if torch.compiler.is_dynamo_compiling():
            out, lse = _traced(call, plan, opts)
        else:
            fused = opts.compile if opts.compile is not None else call.device.type == "cuda"
            run = _Run(call, plan, opts, fused)
            if _graphed(call, opts):
                run = _GraphedRun(run)
            if call.requires_grad:
                out, lse = _DilatedFunction.apply(run, call.query, call.key, call.value)
            else:
                with torch.no_grad():
                    out, lse, _ = run.forward(call.query, call.key, call.value, False)
        return (out, lse) if call.return_lse else out

    def reference(self, call: AttentionCall, options: Any = None):
        """Dense float64 attention with the union of the patterns as a log-multiplicity bias
        (log m, -inf where no pattern lets the query see the key) on top of the call's mask
        and causal pattern, computed from the definition (not from the plan)."""
        opts = options if isinstance(options, DilatedOptions) else option_values(
            self, dict(options or {}))
        if _dense(call):
            return super().reference(call, opts)
        bias = _log_multiplicity(call, opts)
        mask = call.attn_mask
        if mask is not None:
            mask = (torch.zeros(mask.shape, dtype=torch.float64, device=mask.device)
                    .masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                    else mask.double())
            bias = bias + mask
        dense = call.replace(query=call.query.double(), key=call.key.double(),
                             value=call.value.double(), attn_mask=bias, dropout_p=0.0,
                             return_lse=True)
        return reference_attention(dense, accumulate=torch.float64)


def _log_multiplicity(call: AttentionCall, opts: DilatedOptions) -> torch.Tensor:
    """(H, S, S) float64: log of the number of parts (patterns, the text blocks) in which query
    and key meet, -inf for none; written from the definition with masks over all pairs."""
    geo = _geometry(call, opts.grid)
    heads, seq, device = call.num_heads, call.seq_len_q, call.device
    count = torch.zeros(heads, seq, seq, dtype=torch.float64, device=device)
    image = slice(geo.image_start, geo.image_start + geo.image)
    if geo.text:
        text = slice(geo.text_start, geo.text_start + geo.text)
        count[:, text, :] = 1
        count[:, image, text] = 1
    coords = torch.stack(torch.unravel_index(torch.arange(geo.image, device=device), geo.dims),
                         dim=-1)  # (N, axes)
    for w, r in opts.patterns():
        w_t, r_t = torch.tensor(w, device=device), torch.tensor(r, device=device)
        segment, within = coords // w_t, coords % w_t
        same = (segment[:, None, :] == segment[None, :, :]).all(-1)  # (N, N)
        offsets = torch.tensor([_unravel(h % math.prod(r), r) for h in range(heads)],
                               device=device)  # (H, axes)
        kept = ((within[None] % r_t) == offsets[:, None, :]).all(-1)  # (H, N)
        count[:, image, image] += (kept[:, :, None] & kept[:, None, :] & same).double()
    return torch.log(count)


def _traced(call: AttentionCall, plan: _Plan, opts: DilatedOptions):
    """The parts through :func:`attnpatch.attention` and the gather merge, traced by
    torch.compile (autograd differentiates them: the inner kernels' lse gradients)."""
    q, k, v = call.query, call.key, call.value
    batch, heads, seq = call.batch_size, call.num_heads, call.seq_len_q
    group = heads // call.num_kv_heads
    rq, rk, rv = _rows(q), _rows(k), _rows(v)
    outs, lses, invs = [], [], []
    for part in plan.parts:
        o, lse = attention(_take(q, rq, part, "q", group), _take(k, rk, part, "k", group),
                           _take(v, rv, part, "k", group), _part_mask(call, part), part.causal,
                           call.scale, 0.0, opts.inner, return_lse=True, softcap=call.softcap)
        outs.append(o.reshape(batch, -1, o.shape[-1]))
        lses.append(lse.reshape(batch, -1))
        invs.append(part.inverse("q", heads, seq, False))
    return _gather_merge(outs, lses, invs, invs, call.dtype, opts.detach_weights)
