"""The block_sparse strategy's layouts, built from block and tile indices (never a Q×K matrix).

A layout here is a :class:`GroupLayout`: the query and key sequences, in the kernel's token
order (``perm``), are cut into contiguous groups (blocks, tiles, the text), and ``allow`` says
which query group attends which key group. Query i attends key j iff
``allow[b, h, group_q(i), group_k(j)]``: the element mask is exact, whatever the kernel's block
size; a kernel block that straddles groups is a partial block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["GroupLayout", "Geometry", "user_layout", "tile_layout", "sequence_layout",
           "radial_blocks", "window_starts"]


@dataclass(frozen=True)
class Geometry:
    """Where the text and image tokens of a self-attention call are, and the image grid."""

    seq: int
    text: int            # text tokens (0 without joint text)
    text_position: str   # "none", "first" or "last"
    grid: Optional[tuple]  # (frames, height, width) of the image tokens, or None

    @property
    def image(self) -> int:
        return self.seq - self.text

    @property
    def image_start(self) -> int:
        return self.text if self.text_position == "first" else 0

    @property
    def text_start(self) -> int:
        return self.image if self.text_position == "last" else 0


@dataclass
class GroupLayout:
    """Groups of the kernel-order sequences and which pairs attend (see the module docstring).

    ``perm``: None (the call's order) or (S,) long, kernel position -> the call's token.
    ``q_bounds``/``k_bounds``: (G+1,) long group offsets in kernel order. ``allow``: bool
    (Bl, Hl, Gq, Gk), Bl and Hl 1 or the call's batch and query heads. ``notes``: what was
    adjusted (a clamped window).
    """

    perm: Optional[torch.Tensor]
    q_bounds: torch.Tensor
    k_bounds: torch.Tensor
    allow: torch.Tensor
    notes: tuple = ()
    _ids: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        # every token's group, in kernel and in call order, computed here (eagerly: never
        # while torch.compile traces a call that uses the layout)
        for side, bounds in (("q", self.q_bounds), ("k", self.k_bounds)):
            seq = int(bounds[-1])
            ids = torch.bucketize(torch.arange(seq, device=bounds.device), bounds[1:],
                                  right=True)
            self._ids[(side, False)] = ids
            if self.perm is not None:
                ids = torch.empty_like(ids).index_put_((self.perm,), ids)
            self._ids[(side, True)] = ids

    def group_ids(self, side: str, original: bool) -> torch.Tensor:
        """(S,) long: the group of each token, in kernel order or (``original``) call order."""
        return self._ids[(side, original)]

    def element_mask(self, allow: Optional[torch.Tensor] = None) -> torch.Tensor:
        """bool (Bl, Hl, Sq, Sk) in the call's token order."""
        allow = self.allow if allow is None else allow
        gq, gk = self.group_ids("q", True), self.group_ids("k", True)
        return allow[:, :, gq[:, None], gk[None, :]]

    def density(self, allow: Optional[torch.Tensor] = None) -> float:
        """The fraction of (query, key) pairs allowed, averaged over batch and heads."""
        allow = self.allow if allow is None else allow
        sq = self.q_bounds.diff().double()
        sk = self.k_bounds.diff().double()
        pairs = (allow.double() * sq[:, None] * sk[None, :]).sum(dim=(-2, -1))
        return float(pairs.mean() / (sq.sum() * sk.sum()))

    def kernel_blocks(self, block_q: int, block_k: int, allow: Optional[torch.Tensor] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(full, partial): bool (Bl, Hl, nQ, nK) over the kernel's blocks in kernel order; a
        block is full when every pair in it is allowed, partial when some are. Exact from group
        ranges (2-D prefix sums over ``allow``), without expanding to elements."""
        allow = self.allow if allow is None else allow
        gq, gk = self.group_ids("q", False), self.group_ids("k", False)
        sq, sk = gq.numel(), gk.numel()
        q0 = gq[::block_q]
        q1 = gq[torch.clamp(torch.arange(block_q, sq + block_q, block_q, device=gq.device) - 1,
                            max=sq - 1)]
        k0 = gk[::block_k]
        k1 = gk[torch.clamp(torch.arange(block_k, sk + block_k, block_k, device=gk.device) - 1,
                            max=sk - 1)]
        c = torch.nn.functional.pad(allow.long().cumsum(-1).cumsum(-2), (1, 0, 1, 0))
        qa, qb = q0[:, None], q1[:, None] + 1
        ka, kb = k0[None, :], k1[None, :] + 1
        count = c[..., qb, kb] - c[..., qa, kb] - c[..., qb, ka] + c[..., qa, ka]
        area = (qb - qa) * (kb - ka)
        return count == area, (count > 0) & (count < area)


def _bounds(starts: list, end: int, device) -> torch.Tensor:
    return torch.tensor(sorted(set(starts)) + [end], dtype=torch.long, device=device)


def user_layout(seq_q: int, seq_k: int, block_q: int, block_k: int, layout: torch.Tensor,
                device) -> GroupLayout:
    """The user's ``block_layout`` (Hl, nq, nk): groups are its blocks."""
    return GroupLayout(None, _bounds(list(range(0, seq_q, block_q)), seq_q, device),
                       _bounds(list(range(0, seq_k, block_k)), seq_k, device),
                       layout.to(device=device, dtype=torch.bool)[None])


def window_starts(count: int, window: int, device) -> torch.Tensor:
    """(count,) long: the first tile of each tile's window of ``window`` tiles along an axis of
    ``count`` tiles, centred on it and shifted inside at the edges (every window is as wide)."""
    c = torch.arange(count, device=device)
    return torch.clamp(c - (window - 1) // 2, min=0, max=count - window)


def tile_layout(geo: Geometry, tile: tuple, window: tuple, text_global: bool,
                device) -> GroupLayout:
    """STA (sliding tile attention): image tiles of ``tile`` tokens per (frames, height, width)
    axis (ragged at the far edges), each query tile attending the key tiles of its window
    (``window`` tiles per axis, clamped at the grid edge); tokens reordered so that each tile
    is contiguous, the full tiles first and the ragged edge tiles last (each part in C order of
    tile coordinates): with a tile of a multiple of 128 tokens, the kernel's 128-token blocks
    over the full tiles are aligned and whole. Text: one group, global unless ``text_global``
    is False (then it attends itself only, and image tokens attend image tokens only)."""
    grid = geo.grid
    counts = [-(-g // t) for g, t in zip(grid, tile)]
    notes = []
    win = []
    for axis, (n, w) in enumerate(zip(counts, window)):
        if w > n:
            notes.append(f"window {w} > {n} tiles on axis {axis} of grid {tuple(grid)}: "
                         f"clamped to {n}")
            w = n
        win.append(w)
    f, h, w = (torch.arange(g, device=device) for g in grid)
    coords = torch.stack(torch.meshgrid(f, h, w, indexing="ij"), -1).reshape(-1, 3)
    tiles = coords // torch.tensor(tile, device=device)
    tile_id = (tiles[:, 0] * counts[1] + tiles[:, 1]) * counts[2] + tiles[:, 2]
    local = coords % torch.tensor(tile, device=device)
    local_id = (local[:, 0] * tile[1] + local[:, 1]) * tile[2] + local[:, 2]
    # kernel order of the tiles: the full ones first, then the ragged edge tiles (each in C
    # order of tile coordinates), so that with a tile of a multiple of 128 tokens every kernel
    # block over the full tiles is 128-aligned and whole (partial blocks only at the ragged end)
    n_tiles = math.prod(counts)
    t = torch.arange(n_tiles, device=device)
    tc = torch.stack([t // (counts[1] * counts[2]), (t // counts[2]) % counts[1],
                      t % counts[2]], -1)
    ragged = (tc >= torch.tensor([g // s for g, s in zip(grid, tile)], device=device)).any(-1)
    tile_order = torch.argsort(ragged.long() * n_tiles + t)  # kernel tile -> tile id
    rank = torch.empty_like(tile_order).index_put_((tile_order,), t)  # tile id -> kernel tile
    order = torch.argsort(rank[tile_id] * math.prod(tile) + local_id)
    sizes = torch.bincount(tile_id, minlength=n_tiles)[tile_order]
    image_bounds = torch.nn.functional.pad(sizes.cumsum(0), (1, 0))
    # tile windows: allowed per axis, combined over the axes (outer products)
    per_axis = []
    for n, wa in zip(counts, win):
        start = window_starts(n, wa, device)
        t = torch.arange(n, device=device)
        per_axis.append((t[None, :] >= start[:, None]) & (t[None, :] < start[:, None] + wa))
    tiles_allow = (per_axis[0][:, None, None, :, None, None]
                   & per_axis[1][None, :, None, None, :, None]
                   & per_axis[2][None, None, :, None, None, :]).reshape(n_tiles, n_tiles)
    tiles_allow = tiles_allow[tile_order[:, None], tile_order[None, :]]
    return _with_text(geo, order, image_bounds, tiles_allow[None, None], text_global,
                      tuple(notes), device)


def _with_text(geo: Geometry, image_order: Optional[torch.Tensor], image_bounds: torch.Tensor,
               image_allow: torch.Tensor, text_global: bool, notes: tuple,
               device, k_bounds: Optional[torch.Tensor] = None) -> GroupLayout:
    """The whole sequence's layout from the image part's (``image_allow`` (Bl, Hl, Gq, Gk)):
    the text (if any) is one group at its place, global (``text_global``) or attending itself
    only."""
    k_bounds = image_bounds if k_bounds is None else k_bounds
    if image_order is not None:
        image_order = image_order + geo.image_start
    if geo.text == 0:
        return GroupLayout(image_order, image_bounds, k_bounds, image_allow, notes)
    text_idx = torch.arange(geo.text_start, geo.text_start + geo.text, device=device)
    *lead, gi_q, gi_k = image_allow.shape
    allow = torch.zeros(*lead, gi_q + 1, gi_k + 1, dtype=torch.bool, device=device)
    first = geo.text_position == "first"
    img = slice(1, None) if first else slice(0, -1)
    txt = 0 if first else -1
    allow[..., img, img] = image_allow
    allow[..., txt, txt] = True
    if text_global:
        allow[..., txt, :] = True
        allow[..., :, txt] = True
    perm = None
    if image_order is not None:
        perm = torch.cat([text_idx, image_order] if first else [image_order, text_idx])
    if first:
        qb = torch.cat([image_bounds.new_zeros(1), image_bounds + geo.text])
        kb = torch.cat([k_bounds.new_zeros(1), k_bounds + geo.text])
    else:
        end = torch.tensor([geo.seq], device=device)
        qb, kb = torch.cat([image_bounds, end]), torch.cat([k_bounds, end])
    return GroupLayout(perm, qb, kb, allow, notes)


def _image_blocks(n: int, block: int, cuts: tuple, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of the image tokens' groups (blocks of ``block``, also cut at ``cuts``), and the
    block of each group."""
    bounds = _bounds(list(range(0, n, block)) + [c for c in cuts if 0 < c < n], n, device)
    return bounds, bounds[:-1] // block


def sequence_layout(geo: Geometry, block_q: int, block_k: int, block_allow: torch.Tensor,
                    global_tokens: tuple, text_global: bool, device) -> GroupLayout:
    """A 1-D pattern over the image tokens in the call's order: ``block_allow`` (Bl, Hl, nqb,
    nkb) over image blocks of (block_q, block_k) tokens counted from the first image token;
    ``global_tokens`` (first, last): that many first and last image tokens attend and are
    attended by every token; the text group as in :func:`tile_layout`."""
    n = geo.image
    first, last = global_tokens
    cuts = (first, n - last)
    qb, q_block = _image_blocks(n, block_q, cuts, device)
    kb, k_block = _image_blocks(n, block_k, cuts, device)
    allow = block_allow[:, :, q_block[:, None], k_block[None, :]]
    if first or last:
        gq = (qb[:-1] < first) | (qb[:-1] >= n - last)
        gk = (kb[:-1] < first) | (kb[:-1] >= n - last)
        allow = allow | gq[:, None] | gk[None, :]
    return _with_text(geo, None, qb, allow, text_global, (), device, kb)


def radial_frame_rule(distance: int, per_frame: int, block: int) -> tuple[int, bool]:
    """Radial Attention's rule for two frames ``distance`` apart (frames of ``per_frame``
    tokens): (spatial window width, whether the frame pair is kept at all). Distance 0: the
    whole frame. Else, with g = bit_length(distance) and decay = 2^bit_length(per_frame) / 2^g:
    width max(decay, block); when decay < block, only pairs with distance % (block // decay)
    == 0 are kept (the band thins by skipping frames)."""
    if distance == 0:
        return per_frame, True
    decay = 2 ** per_frame.bit_length() / 2 ** distance.bit_length()
    if decay >= block:
        return int(decay), True
    return block, distance % int(block / decay) == 0


def radial_blocks(frames: int, per_frame: int, block_q: int, block_k: int, sink: bool,
                  device) -> torch.Tensor:
    """bool (nqb, nkb): the image blocks that hold at least one pair Radial Attention allows
    (see :func:`radial_frame_rule`; with ``sink`` every token attends the first frame),
    computed from (block, frame) pieces: a piece is a contiguous range of spatial positions."""
    n = frames * per_frame

    def pieces(block):
        starts = torch.unique(torch.cat([torch.arange(0, n, block), torch.arange(0, n, per_frame)]))
        ends = torch.cat([starts[1:], torch.tensor([n])]) - 1
        frame = starts // per_frame
        return starts // block, frame, starts - frame * per_frame, ends - frame * per_frame

    qblk, qf, qlo, qhi = pieces(block_q)
    kblk, kf, klo, khi = pieces(block_k)
    rules = [radial_frame_rule(d, per_frame, block_k) for d in range(frames)]
    width = torch.tensor([r[0] for r in rules])
    kept = torch.tensor([r[1] for r in rules])
    d = (qf[:, None] - kf[None, :]).abs()
    gap = torch.clamp(torch.maximum(qlo[:, None] - khi[None, :], klo[None, :] - qhi[:, None]),
                      min=0)
    ok = (gap <= width[d]) & kept[d]
    if sink:
        ok = ok | (kf[None, :] == 0)
    counts = torch.zeros(-(-n // block_q), -(-n // block_k), dtype=torch.long)
    counts.index_put_((qblk[:, None].expand_as(ok), kblk[None, :].expand_as(ok)), ok.long(),
                      accumulate=True)
    return (counts > 0).to(device)
