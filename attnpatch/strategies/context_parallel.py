"""Context parallelism: one attention over a sequence split across the ranks of a process group.

Three backends, all exact in forward and backward:

- ``ring``: each rank keeps its query shard; the key/value shards travel around the ring with
  point-to-point sends (``batch_isend_irecv``), each step's transfer overlapped with the inner
  kernel's work on the block already there. The blocks' partial results merge in fp32 by their
  log-sum-exp. Backward: the K/V blocks travel the ring again, each block's kernel backward runs
  with the *merged* out and lse (:meth:`Backend.backward`), and each block's dK/dV accumulator
  (fp32) travels with it and comes home after the last hop. Per rank, K/V memory stays at a
  couple of shards: nothing gathers the whole sequence.
- ``ulysses``: all-to-all from sequence shards to head shards (every rank gets the whole
  sequence for some heads), the inner kernel on that, all-to-all back. Heads that the degree
  does not divide are split unevenly (whole key/value head groups when there are enough of them;
  otherwise query heads, each rank getting the key/value heads its query heads read); uneven
  shards are uneven splits of ``all_to_all_single``. The all-to-alls are autograd functions
  whose backward is the reverse all-to-all, so the inner kernel's own backward is used.
- ``usp``: Ulysses inside a ring (``ring_degree`` x ``ulysses_degree`` ranks): consecutive
  ranks form a Ulysses group, whose sequence chunk is the concatenation of its members' shards;
  the chunks travel the ring between the ranks that hold the same heads.

The contract, for every backend: each rank passes its own contiguous shard of the sequence for
``query``, ``key`` and ``value``, in rank order (the shards may differ in length, and a rank's
query and key shards may too); each rank gets back its shard of the output of attention over the
whole sequence. Every key is attended exactly once and every query row is computed by one rank.
``is_causal`` is top-left over global positions. A key-padding mask (bool ``(B|1, 1, 1, Sk)``,
True = attend) is passed by each rank for its own keys: its key axis is sharded like the keys.
GQA and different value head dims work; a joint text+image sequence is a sequence like any
other (the text may sit on any ranks: attention does not depend on where a key is, except
through ``is_causal``).

Faults: every call first exchanges a small metadata row per rank (shapes, dtype, flags, options,
and whether the rank failed while preparing), so a rank that fails inside the call makes every
rank raise, naming it and its error, and inputs that must match across ranks but don't (heads,
head dims, dtype, mask, ``is_causal``, scale, gradients, options) raise on every rank naming the
ranks that differ. The first call of each configuration also checks, on every rank, that the
inner kernel takes each of the rank's block calls, and exchanges the verdict. A rank that never
reaches the call (it raised before) makes the others raise after ``timeout`` seconds (default:
the process group's own timeout); so does a rank whose kernel fails in the middle of the ring
(out of memory). After a timeout the process group cannot be used any more.

Only ``torch.distributed`` collectives are used (``all_gather`` for the metadata,
``batch_isend_irecv`` for the ring, ``all_to_all_single`` for Ulysses).

Pipeline level: ``patch(pipe, backend="ring")`` gives these backends to the denoiser (text
encoders and VAE stay on ``auto``, replicated: ``denoiser_only``), and their
``denoiser_hooks`` split the denoiser's inputs along the sequence and gather its output, as its
family's plan says (:mod:`attnpatch.strategies.cp_hooks`).
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import logging
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.distributed as dist

from .._errors import AttnPatchError, BackendUnavailableError
from ..call import AttentionCall
from ..dispatch import run_backend, run_selected
from ..registry import (VERSION, Strategy, all_backends, canonical_name, get_backend,
                        register_backend, running_strategies, select)

__all__ = ["RingBackend", "UlyssesBackend", "USPBackend", "RingOptions", "UlyssesOptions",
           "USPOptions", "resolve_group"]

logger = logging.getLogger(__name__)

_NAMES = ("ring", "ulysses", "usp")


# --- options -----------------------------------------------------------------------------------
def _check_group(group) -> None:
    if group is None:
        return
    if dist.is_available() and isinstance(group, dist.ProcessGroup):
        return
    mesh_type = _device_mesh_type()
    if mesh_type is not None and isinstance(group, mesh_type):
        if group.ndim != 1:
            names = group.mesh_dim_names
            raise AttnPatchError(
                f"group: a DeviceMesh of {group.ndim} dimensions {names or ''}; pass the one "
                "dimension the sequence is split over, e.g. mesh['cp']")
        return
    raise AttnPatchError(f"group must be a torch.distributed ProcessGroup, a 1-D DeviceMesh or "
                         f"None (the default group), got {type(group).__name__}")


def _device_mesh_type():
    if not dist.is_available():
        return None
    from torch.distributed.device_mesh import DeviceMesh
    return DeviceMesh


def _lse_inners() -> list[str]:
    return [b.name for b in all_backends() if b.supports_lse and b.supports_backward_from_lse
            and b.name not in _NAMES]


@dataclass(frozen=True)
class UlyssesOptions:
    """Options of ``ulysses``.

    ``group``: a ProcessGroup or 1-D DeviceMesh; None: the default group (the one accelerate's
    ``PartialState()`` or ``torch.distributed.init_process_group`` set up).
    ``inner``: the backend that runs the attention on each rank's heads (any backend; ``auto``
    picks one per call).
    ``timeout``: seconds a rank waits for the others in a collective before raising; None: the
    process group's own timeout.
    """

    group: Any = None
    inner: str = "auto"
    timeout: Optional[float] = None

    #: the inner kernel must return an lse (and compute its backward from a merged one)
    needs_lse: ClassVar[bool] = False

    def __post_init__(self):
        _check_group(self.group)
        if not isinstance(self.inner, str):
            raise AttnPatchError(f"inner must be a backend name, got {type(self.inner).__name__}")
        try:
            inner = canonical_name(self.inner)
        except AttnPatchError as err:
            raise AttnPatchError(f"inner={self.inner!r}: {err}") from None
        if inner in _NAMES:
            raise AttnPatchError(f"inner={self.inner!r} is a context-parallel backend itself: "
                                 "for Ulysses inside a ring use backend='usp' with ring_degree "
                                 "and ulysses_degree")
        if self.needs_lse and inner != "auto" and not get_backend(inner).supports_lse:
            raise AttnPatchError(
                f"inner={self.inner!r} returns no log-sum-exp, which the ring needs to merge its "
                f"blocks: use one of {_lse_inners()} (or 'auto')")
        object.__setattr__(self, "inner", inner)
        if self.timeout is not None and (
                isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float))
                or not math.isfinite(self.timeout) or self.timeout <= 0):
            raise AttnPatchError(f"timeout must be None (the process group's own) or a positive "
                                 f"number of seconds, got {self.timeout!r}")


@dataclass(frozen=True)
class RingOptions(UlyssesOptions):
    """Options of ``ring``: those of :class:`UlyssesOptions`; ``inner`` must return an lse
    (``sdpa_cudnn``, ``sdpa_flash``, ``sdpa_efficient``, ``flash4``, ``math``...) and, for a
    backward, compute its gradients from a merged lse (``supports_backward_from_lse``)."""

    needs_lse: ClassVar[bool] = True


@dataclass(frozen=True)
class USPOptions(RingOptions):
    """Options of ``usp``: those of :class:`RingOptions`, and ``ring_degree`` x
    ``ulysses_degree`` = the group's size (give one, or both)."""

    ring_degree: Optional[int] = None
    ulysses_degree: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        for name in ("ring_degree", "ulysses_degree"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise AttnPatchError(f"{name} must be a positive int, got {value!r}")
        if self.ring_degree is None and self.ulysses_degree is None:
            raise AttnPatchError("usp needs ring_degree or ulysses_degree (or both): their "
                                 "product is the number of ranks in the group")


# --- the group -----------------------------------------------------------------------------------
def resolve_group(group=None):
    """The ProcessGroup that ``group`` (a ProcessGroup, a 1-D DeviceMesh, or None) means: None is
    torch.distributed's default group, which accelerate's ``PartialState()`` initializes under
    ``accelerate launch``. Raises :class:`AttnPatchError` naming ``group`` when torch.distributed
    is not initialized, or this rank is not in the group."""
    if not dist.is_available() or not dist.is_initialized():
        raise AttnPatchError(
            "group: torch.distributed is not initialized. Launch the processes with "
            "`accelerate launch` (and create accelerate's PartialState()) or torchrun and call "
            "torch.distributed.init_process_group(), then pass group=... or leave it None for "
            "the default group")
    _check_group(group)
    if group is None:
        pg = dist.group.WORLD
    elif isinstance(group, dist.ProcessGroup):
        pg = group
    else:
        pg = group.get_group()
    if dist.get_rank(pg) < 0:
        raise AttnPatchError(f"group: this process (global rank {dist.get_rank()}) is not in the "
                             f"group of ranks {dist.get_process_group_ranks(pg)}")
    return pg


class _Comm:
    """The collectives of one call on one process group, each bounded by ``timeout``."""

    def __init__(self, pg, timeout: Optional[float], backend: str):
        self.pg = pg
        self.rank = dist.get_rank(pg)
        self.size = dist.get_world_size(pg)
        self.ranks = dist.get_process_group_ranks(pg)  # group rank -> global rank
        self.timeout = None if timeout is None else datetime.timedelta(seconds=timeout)
        self.backend = backend
        # metadata on the CPU where the group carries CPU tensors (no device sync)
        self.meta_device = "cpu" if "gloo" in str(dist.get_backend(pg)) else None

    def check_device(self, device: torch.device) -> None:
        """Raise naming ``group`` when its backend cannot carry tensors on ``device``."""
        kinds = str(dist.get_backend(self.pg))
        if device.type == "cpu" and kinds == "nccl" or device.type == "cuda" and kinds == "gloo":
            raise AttnPatchError(
                f"group: its backend {kinds!r} cannot carry {device.type} tensors: use a gloo "
                "group for CPU tensors, an NCCL group for CUDA ones (or "
                "init_process_group('cpu:gloo,cuda:nccl'))")

    def who(self, rank: int) -> str:
        glob = self.ranks[rank]
        return f"rank {rank}" + ("" if glob == rank else f" (global rank {glob})")

    def wait(self, works, what: str) -> None:
        for work in works:
            try:
                if self.timeout is None:
                    work.wait()
                else:
                    work.wait(self.timeout)
            except RuntimeError as err:
                limit = ("the process group's timeout" if self.timeout is None
                         else f"{self.timeout.total_seconds():g} s")
                raise AttnPatchError(
                    f"{self.backend} on {self.who(self.rank)}: {what} failed or did not complete "
                    f"within {limit} ({err}). A rank of the group raised before or during this "
                    "attention call, or does not call it; this process group cannot be used "
                    "any more") from err

    def all_gather_rows(self, row: list[int], device, what: str) -> list[list[int]]:
        t = torch.tensor(row, dtype=torch.int64, device=self.meta_device or device)
        outs = [torch.empty_like(t) for _ in range(self.size)]
        self.wait([dist.all_gather(outs, t, group=self.pg, async_op=True)], what)
        return torch.stack(outs).tolist()

    def all_to_all(self, x: torch.Tensor, in_splits, out_splits) -> torch.Tensor:
        y = x.new_empty(sum(out_splits))
        work = dist.all_to_all_single(y, x.contiguous(), list(out_splits), list(in_splits),
                                      group=self.pg, async_op=True)
        self.wait([work], "an all-to-all")
        return y

    def exchange(self, peer_next: int, peer_prev: int, sends, recvs, tag: int):
        """Send ``sends`` to group rank ``peer_next`` and receive ``recvs`` from ``peer_prev``,
        asynchronously; returns what :meth:`wait` takes."""
        ops = [dist.P2POp(dist.isend, t, self.ranks[peer_next], self.pg, tag + i)
               for i, t in enumerate(sends)]
        ops += [dist.P2POp(dist.irecv, t, self.ranks[peer_prev], self.pg, tag + i)
                for i, t in enumerate(recvs)]
        return dist.batch_isend_irecv(ops)


# --- the metadata exchange ---------------------------------------------------------------------
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: the metadata row, one int64 each; all but the first three must be equal on every rank
_FIELDS = ("failed", "seq_q", "seq_kv", "batch", "heads", "kv_heads", "head_dim", "head_dim_v",
           "dtype", "device", "mask", "is_causal", "scale", "return_lse", "grad query",
           "grad key", "grad value", "options")
_MATCH_FROM = 3
_TEXT_BYTES = 1024
_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "npu")


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _options_text(options) -> str:
    """The options that must match across ranks (all but the group, a per-rank object)."""
    return ", ".join(f"{f.name}={getattr(options, f.name)!r}"
                     for f in dataclasses.fields(options) if f.name != "group")


def _device_code(device: torch.device) -> int:
    kind = device.type
    return _DEVICES.index(kind) if kind in _DEVICES else zlib.crc32(kind.encode())


def _metadata(call: AttentionCall, name: str, options, failed: bool) -> list[int]:
    q, k, v = call.query, call.key, call.value
    grad = torch.is_grad_enabled()
    return [int(failed), call.seq_len_q, call.seq_len_kv, call.batch_size, call.num_heads,
            call.num_kv_heads, call.head_dim, call.head_dim_v,
            _DTYPES.index(call.dtype) if call.dtype in _DTYPES else -1,
            _device_code(call.device), int(call.attn_mask is not None),
            int(call.is_causal), _float_bits(call.scale), int(call.return_lse),
            int(grad and q.requires_grad), int(grad and k.requires_grad),
            int(grad and v.requires_grad),
            zlib.crc32(f"{name}: {_options_text(options)}".encode())]


def _describe(name: str, value: int) -> str:
    if name == "dtype":
        return str(_DTYPES[value]) if 0 <= value < len(_DTYPES) else "another dtype"
    if name == "scale":
        return f"{struct.unpack('<d', struct.pack('<q', value))[0]:g}"
    if name == "device":
        return _DEVICES[value] if 0 <= value < len(_DEVICES) else f"#{value:08x}"
    if name in ("mask", "is_causal", "return_lse") or name.startswith("grad "):
        return str(bool(value))
    return str(value)


def _texts(comm: _Comm, text: str, device) -> list[str]:
    """Every rank's ``text`` (UTF-8, cut at 1 kB), in group-rank order: for error messages."""
    data = text.encode("utf-8", "replace")[:_TEXT_BYTES]
    buf = torch.zeros(_TEXT_BYTES + 2, dtype=torch.uint8)
    buf[:2 + len(data)] = torch.tensor([len(data) // 256, len(data) % 256, *data],
                                       dtype=torch.uint8)
    buf = buf.to(comm.meta_device or device)
    outs = [torch.empty_like(buf) for _ in range(comm.size)]
    comm.wait([dist.all_gather(outs, buf, group=comm.pg, async_op=True)],
              "the exchange of error messages")
    texts = []
    for out in outs:
        raw = out.cpu().tolist()
        texts.append(bytes(raw[2:2 + raw[0] * 256 + raw[1]]).decode("utf-8", "replace"))
    return texts


def _raise_failures(comm: _Comm, rows, message: str, err: Optional[BaseException],
                    device, stage: str) -> None:
    """Every rank calls this when some row says ``failed``: the failed ranks' messages are
    exchanged and every rank raises one error naming them."""
    texts = _texts(comm, message, device)
    failed = [f"{comm.who(rank)} failed: {text}" for rank, (row, text) in
              enumerate(zip(rows, texts)) if row[0]]
    raise AttnPatchError(f"{comm.backend} on {comm.who(comm.rank)}: {stage}; "
                         + "; ".join(failed)) from err


def _check_rows(comm: _Comm, rows, options, device) -> None:
    """Raise naming every rank whose must-match fields differ from rank 0's (every rank sees
    the same rows, so all raise, or none)."""
    diffs = []
    opt = _FIELDS.index("options")
    texts = None
    if any(row[opt] != rows[0][opt] for row in rows):
        texts = _texts(comm, _options_text(options), device)
    for rank, row in enumerate(rows[1:], start=1):
        for i in range(_MATCH_FROM, len(_FIELDS)):
            if row[i] == rows[0][i]:
                continue
            if i == opt:
                diffs.append(f"{comm.who(rank)} has options {texts[rank]} but rank 0 has "
                             f"{texts[0]}")
            else:
                diffs.append(f"{comm.who(rank)} has {_FIELDS[i]}="
                             f"{_describe(_FIELDS[i], row[i])} but rank 0 has "
                             f"{_describe(_FIELDS[i], rows[0][i])}")
    if diffs:
        raise AttnPatchError(
            f"{comm.backend} on {comm.who(comm.rank)}: the ranks' inputs do not match: "
            + "; ".join(diffs) + ". Every rank passes its own sequence shard with the same batch, "
            "heads, head dims, dtype, device type, mask (present or not), is_causal, scale, "
            "requires_grad and backend options")


# --- the plan ----------------------------------------------------------------------------------
def _even_split(n: int, parts: int) -> list[int]:
    return [n // parts + (i < n % parts) for i in range(parts)]


def _head_split(heads: int, kv_heads: int, degree: int):
    """(query heads, key/value heads) per Ulysses rank, as tuples of head indices: whole
    key/value head groups when there are at least ``degree`` of them; else the query heads
    split evenly, each rank with the key/value heads its query heads read (a head shared by
    ranks is sent to each)."""
    group = heads // kv_heads
    if kv_heads >= degree:
        q_ranges, kv_lists, start = [], [], 0
        for n in _even_split(kv_heads, degree):
            q_ranges.append(tuple(range(start * group, (start + n) * group)))
            kv_lists.append(tuple(range(start, start + n)))
            start += n
        return tuple(q_ranges), tuple(kv_lists)
    q_ranges, kv_lists, start = [], [], 0
    for n in _even_split(heads, degree):
        needed = [h // group for h in range(start, start + n)]
        unique = sorted(set(needed))
        counts = {needed.count(h) for h in unique}
        # each needed head read by the same number of query heads: local GQA; else one
        # key/value head per query head
        kv_lists.append(tuple(unique) if len(counts) <= 1 else tuple(needed))
        q_ranges.append(tuple(range(start, start + n)))
        start += n
    return tuple(q_ranges), tuple(kv_lists)


def _block_parts(q_off: int, sq: int, k_off: int, sk: int, causal: bool):
    """The sub-calls of one (query chunk, key chunk) block: ``(first row, first key, key stop,
    is_causal)``, each top-left causal or unmasked, together exactly the global top-left causal
    pattern (query at global position i sees keys at j <= i) on the block; () for a block no
    query sees."""
    if not causal:
        return ((0, 0, sk, False),)
    d = q_off - k_off  # local row i sees local key j <= i + d
    if sk - 1 <= d:
        return ((0, 0, sk, False),)
    if d + sq - 1 < 0:
        return ()
    row = max(0, -d)
    d += row  # >= 0: row i' = i - row sees key j <= i' + d
    parts = []
    if d > 0:
        parts.append((row, 0, d, False))
    parts.append((row, d, sk, True))
    return tuple(parts)


@dataclass(frozen=True)
class _Plan:
    ring_degree: int
    ulysses_degree: int
    ring_index: int
    ulysses_index: int
    #: group ranks of this rank's Ulysses group, and of its ring neighbours
    members: tuple
    ring_next: int
    ring_prev: int
    seq_q: tuple  # per group rank
    seq_kv: tuple
    chunk_q: tuple  # per ring index: (offset, length) of its query chunk
    chunk_kv: tuple
    q_heads: tuple  # per Ulysses index
    kv_heads: tuple
    parts: tuple  # per ring index c: the parts of (this rank's query chunk, chunk c's keys)


def _plan(rows, rank: int, ring_degree: int, ulysses_degree: int, causal: bool) -> _Plan:
    seq_q = tuple(row[1] for row in rows)
    seq_kv = tuple(row[2] for row in rows)
    heads, kv_heads = rows[0][4], rows[0][5]
    chunk_q, chunk_kv, oq, ok = [], [], 0, 0
    for c in range(ring_degree):
        ranks = range(c * ulysses_degree, (c + 1) * ulysses_degree)
        nq, nk = sum(seq_q[g] for g in ranks), sum(seq_kv[g] for g in ranks)
        chunk_q.append((oq, nq))
        chunk_kv.append((ok, nk))
        oq, ok = oq + nq, ok + nk
    r, u = divmod(rank, ulysses_degree)
    q_heads, kv_heads_ = _head_split(heads, kv_heads, ulysses_degree)
    parts = tuple(_block_parts(*chunk_q[r], *chunk_kv[c], causal) for c in range(ring_degree))
    return _Plan(ring_degree, ulysses_degree, r, u,
                 tuple(range(r * ulysses_degree, (r + 1) * ulysses_degree)),
                 ((r + 1) % ring_degree) * ulysses_degree + u,
                 ((r - 1) % ring_degree) * ulysses_degree + u,
                 seq_q, seq_kv, tuple(chunk_q), tuple(chunk_kv), q_heads, kv_heads_, parts)


# --- Ulysses: all-to-all between sequence shards and head shards ----------------------------------
class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of a flat tensor; its backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, comm, in_splits, out_splits):
        ctx.comm, ctx.in_splits, ctx.out_splits = comm, in_splits, out_splits
        return comm.all_to_all(x, in_splits, out_splits)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return ctx.comm.all_to_all(grad, ctx.out_splits, ctx.in_splits), None, None, None


def _take_heads(x: torch.Tensor, heads: tuple) -> torch.Tensor:
    """``x[:, heads]``: a view for a run of consecutive heads, else a gather (repeats allowed)."""
    if not heads:
        return x[:, :0]
    start = heads[0]
    if heads == tuple(range(start, start + len(heads))):
        return x[:, start:start + len(heads)]
    return x.index_select(1, torch.tensor(heads, device=x.device))


def _seq_to_heads(comm: _Comm, plan: _Plan, x: torch.Tensor, heads: tuple, seq: tuple):
    """``x`` (B, Hx, S_rank, D), this rank's shard -> (B, |heads[u]|, S_chunk, D): its Ulysses
    group's chunk (its members' shards in order) for the heads of this rank (``heads`` per
    Ulysses index, ``seq`` per group rank)."""
    b, d = x.shape[0], x.shape[-1]
    n_me = len(heads[plan.ulysses_index])
    pieces, in_splits, out_splits = [], [0] * comm.size, [0] * comm.size
    for u, g in enumerate(plan.members):
        piece = _take_heads(x, heads[u]).reshape(-1)
        pieces.append(piece)
        in_splits[g] = piece.numel()
        out_splits[g] = b * n_me * seq[g] * d
    y = _AllToAll.apply(torch.cat(pieces), comm, tuple(in_splits), tuple(out_splits))
    chunks = y.split([out_splits[g] for g in plan.members])
    return torch.cat([c.view(b, n_me, seq[g], d) for c, g in zip(chunks, plan.members)], dim=2)


def _heads_to_seq(comm: _Comm, plan: _Plan, y: torch.Tensor, heads: tuple, seq: tuple):
    """The reverse of :func:`_seq_to_heads` for query heads: (B, |heads[u]|, S_chunk, Dv) ->
    (B, H, S_rank, Dv)."""
    b, d = y.shape[0], y.shape[-1]
    me = comm.rank
    pieces = y.split([seq[g] for g in plan.members], dim=2)
    in_splits, out_splits = [0] * comm.size, [0] * comm.size
    for u, (g, piece) in enumerate(zip(plan.members, pieces)):
        in_splits[g] = piece.numel()
        out_splits[g] = b * len(heads[u]) * seq[me] * d
    x = _AllToAll.apply(torch.cat([p.reshape(-1) for p in pieces]), comm, tuple(in_splits),
                        tuple(out_splits))
    chunks = x.split([out_splits[g] for g in plan.members])
    return torch.cat([c.view(b, len(heads[u]), seq[me], d)
                      for u, c in enumerate(chunks)], dim=1)


def _gather_mask(comm: _Comm, plan: _Plan, mask: torch.Tensor, seq: tuple) -> torch.Tensor:
    """The key-padding mask (B, 1, 1, S_rank) of this rank -> its Ulysses group's chunk."""
    b = mask.shape[0]
    flat = mask.reshape(-1).to(torch.uint8)
    in_splits, out_splits = [0] * comm.size, [0] * comm.size
    for g in plan.members:
        in_splits[g] = flat.numel()
        out_splits[g] = b * seq[g]
    y = comm.all_to_all(torch.cat([flat] * len(plan.members)), in_splits, out_splits)
    chunks = y.split([out_splits[g] for g in plan.members])
    return torch.cat([c.view(b, 1, 1, seq[g]) for c, g in zip(chunks, plan.members)],
                     dim=-1).bool()


# --- the ring ----------------------------------------------------------------------------------
class _Ring:
    """One ring attention call on a rank: its plan, its communicator, its inner kernel."""

    def __init__(self, call: AttentionCall, comm: _Comm, plan: _Plan, inner: str, grad: bool):
        self.call, self.comm, self.plan, self.inner, self.grad = call, comm, plan, inner, grad

    def sub_call(self, q, k, v, mask, part) -> AttentionCall:
        row, k0, k1, causal = part
        # the mask travels as (B, 1, Sk, 1), keys on dim 2 like k and v; the call takes the
        # key-padding view (B, 1, 1, Sk)
        sub = self.call.replace(query=q[:, :, row:], key=k[:, :, k0:k1], value=v[:, :, k0:k1],
                                attn_mask=None if mask is None else
                                mask[:, :, k0:k1].transpose(2, 3),
                                is_causal=causal, return_lse=True)
        sub.requires_grad = self.grad  # the blocks that travel carry no autograd history
        sub.backward_from_lse = self.grad
        return sub

    def blocks_like(self, blocks, c: int, dtype=None):
        """Empty tensors shaped like ``blocks`` (keys on dim 2) for the keys of ring chunk
        ``c``."""
        n = self.plan.chunk_kv[c][1]
        return tuple(t.new_empty((*t.shape[:2], n, t.shape[3]), dtype=dtype or t.dtype)
                     for t in blocks)

    def forward(self, q, k, v, mask):
        # the kernels get tensors without autograd history, as _precheck checked them: the
        # autograd Function around this computes the gradients
        q, k, v = q.detach(), k.detach(), v.detach()
        plan, comm = self.plan, self.comm
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        b, h, sq, dv = q.shape[0], q.shape[1], q.shape[2], v.shape[-1]
        out = torch.zeros(b, h, sq, dv, dtype=acc, device=q.device)
        lse = torch.full((b, h, sq), float("-inf"), dtype=acc, device=q.device)
        if q.shape[1] == 0:  # a Ulysses rank without heads (fewer heads than ranks)
            return out.to(q.dtype), lse, ()
        blocks = tuple(t.contiguous() for t in (k, v) + (() if mask is None else (mask,)))
        ring, r = plan.ring_degree, plan.ring_index
        ran = []
        for t in range(ring):
            c = (r - t) % ring
            works = recv = None
            if t < ring - 1:
                recv = self.blocks_like(blocks, (r - t - 1) % ring)
                works = comm.exchange(plan.ring_next, plan.ring_prev, blocks, recv, 0)
            try:
                step = []
                for part in plan.parts[c]:
                    mk = blocks[2] if len(blocks) > 2 else None
                    sub = self.sub_call(q, blocks[0], blocks[1], mk, part)
                    (o, l), backend = run_selected(self.inner, sub, {})
                    _merge_into(out, lse, o, l, part[0])
                    step.append(backend)
                ran.append(tuple(step))
            finally:  # also when the kernel raised: the neighbours' transfers complete
                if works is not None:
                    comm.wait(works, f"the ring's K/V transfer at step {t + 1} of {ring}")
            if recv is not None:
                blocks = recv
        return out.to(q.dtype), lse, tuple(ran)

    def backward(self, grad_out, q, k, v, mask, out, lse, ran):
        q, k, v = q.detach(), k.detach(), v.detach()
        plan, comm = self.plan, self.comm
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        if q.shape[1] == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        # a row that sees no key (lse = -inf): +inf gives every kernel P = exp(s - lse) = 0
        lse = lse.masked_fill(lse == float("-inf"), float("inf"))
        grad_q = torch.zeros(q.shape, dtype=acc, device=q.device)
        blocks = tuple(t.contiguous() for t in (k, v) + (() if mask is None else (mask,)))
        ring, r = plan.ring_degree, plan.ring_index
        pending = None  # (works, the accumulators being sent, the ones being received)
        for t in range(ring):
            c = (r - t) % ring
            works = recv = None
            if t < ring - 1:
                recv = self.blocks_like(blocks, (r - t - 1) % ring)
                works = comm.exchange(plan.ring_next, plan.ring_prev, blocks, recv, 0)
            try:
                grad_k = torch.zeros(blocks[0].shape, dtype=acc, device=q.device)
                grad_v = torch.zeros(blocks[1].shape, dtype=acc, device=q.device)
                mk = blocks[2] if len(blocks) > 2 else None
                for part, backend in zip(plan.parts[c], ran[t]):
                    row, k0, k1, _ = part
                    sub = self.sub_call(q, blocks[0], blocks[1], mk, part)
                    gq, gk, gv = backend.backward(sub, grad_out[:, :, row:], out[:, :, row:],
                                                  lse[:, :, row:])
                    grad_q[:, :, row:] += gq
                    grad_k[:, :, k0:k1] += gk
                    grad_v[:, :, k0:k1] += gv
                if pending is not None:  # this block's gradients from the ranks before
                    comm.wait(pending[0], f"the ring's dK/dV transfer at step {t} of {ring}")
                    grad_k += pending[2][0]
                    grad_v += pending[2][1]
                    pending = None
                if ring > 1:  # on to the next rank; the last hop takes them home
                    incoming = self.blocks_like(blocks[:2], (r - t - 1) % ring, dtype=acc)
                    sends = (grad_k, grad_v)
                    pending = (comm.exchange(plan.ring_next, plan.ring_prev, sends, incoming, 3),
                               sends, incoming)
            finally:
                if works is not None:
                    comm.wait(works, f"the ring's K/V transfer at step {t + 1} of {ring} "
                                     "(backward)")
            if recv is not None:
                blocks = recv
        if pending is not None:
            comm.wait(pending[0], f"the ring's dK/dV transfer home at step {ring} of {ring}")
            grad_k, grad_v = pending[2]
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


def _merge_into(out, lse, o, l, row: int) -> None:
    """Merge a partial (o, l) over rows ``row:`` into the fp32 accumulators, in place."""
    acc_out, acc_lse = out[:, :, row:], lse[:, :, row:]
    l = l.to(lse.dtype)
    new = torch.logaddexp(acc_lse, l)
    safe = new.nan_to_num(neginf=0.0)  # a row without any key yet: both weights 0
    acc_out.mul_(torch.exp(acc_lse - safe).unsqueeze(-1))
    acc_out.add_(torch.exp(l - safe).unsqueeze(-1) * o.to(out.dtype))
    acc_lse.copy_(new)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ring, q, k, v, mask):
        out, lse, ran = ring.forward(q, k, v, mask)
        ctx.ring, ctx.ran = ring, ran
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        grads = ctx.ring.backward(grad_out, q, k, v, mask, out, lse, ctx.ran)
        return (None, *grads, None)


# --- the backends -------------------------------------------------------------------------------
class _ContextParallel(Strategy):
    """The base of ``ring``, ``ulysses`` and ``usp``. Its inherited :meth:`reference` (dense
    attention over the call's own tensors) is what it computes on a group of one rank; on more
    ranks the result is attention over every rank's shard, which no rank holds alone (tests
    build the whole sequence for their reference)."""

    priority = None
    denoiser_only = True  # the shards exist only inside the denoiser's hooks
    spans_processes = True
    mask_kinds = frozenset({"none", "key_padding"})
    supports_dropout = False
    supports_lse = True  # the merged lse, without a gradient
    #: runs a ring (over the group's ranks, or usp's ring_degree) / Ulysses all-to-alls
    uses_ring: ClassVar[bool] = True
    uses_ulysses: ClassVar[bool] = False

    def __init__(self):
        #: the plans of each process group (by id): every rank of a group makes the same calls
        #: in it, so its ranks' caches hit and miss alike (one cache shared by a rank's groups
        #: filled and emptied differently on ranks in different groups: one rank then ran the
        #: first call's check exchange while another went on to the ring, and both waited)
        self._plans: dict[int, dict] = {}

    def availability_reasons(self) -> list[str]:
        reasons = super().availability_reasons()
        if not dist.is_available():
            reasons.append("torch.distributed is not available in this torch build")
        elif not dist.is_initialized():
            reasons.append("torch.distributed is not initialized: launch the ranks with "
                           "`accelerate launch` or torchrun and initialize the default group "
                           "(accelerate's PartialState() or "
                           "torch.distributed.init_process_group())")
        return reasons

    def degrees(self, size: int, options) -> tuple[int, int]:
        """(ring degree, Ulysses degree) on a group of ``size`` ranks."""
        if self.uses_ring and self.uses_ulysses:
            ring, uly = options.ring_degree, options.ulysses_degree
            if ring is None and size % uly == 0:
                ring = size // uly
            if uly is None and size % ring == 0:
                uly = size // ring
            if ring is None or uly is None or ring * uly != size:
                raise AttnPatchError(
                    f"usp: ring_degree={options.ring_degree} x ulysses_degree="
                    f"{options.ulysses_degree} must equal the group's {size} ranks")
            return ring, uly
        return (size, 1) if self.uses_ring else (1, size)

    def run(self, call: AttentionCall, **options: Any):
        opts = call.options if isinstance(call.options, self.Options) else self.Options(**options)
        return _attention(self, call, opts)

    def denoiser_hooks(self, model: torch.nn.Module, options: Any) -> list:
        """Split the denoiser's inputs along the sequence where its plan says, gather where it
        ends (:mod:`attnpatch.strategies.cp_hooks`); ``()`` for a model that is no denoiser
        (a VAE stays replicated). Raises naming the model class when a denoiser has no plan,
        or torch.distributed is not initialized."""
        from ..pipelines import model_family, sharding_plan
        from .cp_hooks import plan_hooks

        family = model_family(model)
        plan = sharding_plan(model)
        if plan is None:
            if family is None and not _looks_like_denoiser(model):
                return ()
            raise AttnPatchError(
                f"{self.name}: {type(model).__name__} has no context-parallel plan (diffusers' "
                "_cp_plan, or attnpatch's own for SD3 and UNet2DConditionModel), so its inputs "
                "can't be split along the sequence: use another backend for it, or give its "
                "family a `sharding` plan in attnpatch.pipelines.families")
        comm = _Comm(resolve_group(options.group), options.timeout, self.name)
        self.degrees(comm.size, options)  # usp: the degrees must fit the group
        hooks = plan_hooks(model, plan, comm)
        logger.info("%s on %s: %d plan hooks over %d ranks", self.name, type(model).__name__,
                    len(hooks), comm.size)
        return hooks


def _looks_like_denoiser(model: torch.nn.Module) -> bool:
    """A diffusers model outside the family table that is no autoencoder (those take images,
    not latents with a timestep): treated as a denoiser, which must bring a plan."""
    forward = inspect.signature(type(model).forward).parameters
    return "timestep" in forward or "timesteps" in forward


@torch.compiler.disable  # collectives and host-side plans: eager, a graph break under compile
def _attention(backend: _ContextParallel, call: AttentionCall, opts):
    comm = _Comm(resolve_group(opts.group), opts.timeout, backend.name)
    error, message = None, ""
    try:  # what fails here fails on every rank: it goes through the exchange
        ring_degree, ulysses_degree = backend.degrees(comm.size, opts)
        comm.check_device(call.device)
    except AttnPatchError as err:
        error, message = err, str(err)
    rows = comm.all_gather_rows(_metadata(call, backend.name, opts, error is not None),
                                call.device, "the exchange of shapes and options")
    if any(row[0] for row in rows):
        _raise_failures(comm, rows, message, error, call.device,
                        "a rank failed before the attention")
    _check_rows(comm, rows, opts, call.device)
    grad = any(rows[0][_FIELDS.index(f"grad {t}")] for t in ("query", "key", "value"))
    key = (id(comm.pg), ring_degree, ulysses_degree, tuple(map(tuple, rows)), grad,
           VERSION[0])
    plans = backend._plans.setdefault(id(comm.pg), {})
    plan = plans.get(key)
    if plan is None:  # first call of this configuration (on every rank alike)
        plan = _plan(rows, comm.rank, ring_degree, ulysses_degree, call.is_causal)
        message = _precheck(backend, call, plan, opts.inner, grad)
        rows = comm.all_gather_rows([int(bool(message))], call.device,
                                    "the exchange of the inner kernel's checks")
        if any(row[0] for row in rows):
            _raise_failures(comm, rows, message, None, call.device,
                            f"the inner kernel {opts.inner!r} cannot run every block")
        if len(plans) >= 256:
            plans.clear()
        plans[key] = plan
        logger.debug("%s plan on %s: %s", backend.name, comm.who(comm.rank), plan)
    return _run_plan(backend, call, comm, plan, opts.inner, grad)


def _local_heads(call: AttentionCall, plan: _Plan) -> tuple[int, int]:
    """The number of query and key/value heads this rank computes."""
    if plan.ulysses_degree == 1:
        return call.num_heads, call.num_kv_heads
    u = plan.ulysses_index
    return len(plan.q_heads[u]), len(plan.kv_heads[u])


def _precheck(backend: _ContextParallel, call: AttentionCall, plan: _Plan, inner: str,
              grad: bool) -> str:
    """'' when ``inner`` takes every sub-call this rank will run, else why not."""
    seen = set()
    for sub in _sub_calls(backend, call, plan, inner, grad):
        sig = sub.signature()
        if sig in seen:
            continue
        seen.add(sig)
        try:
            select(inner, sub, {}, exclude=running_strategies())
        except (AttnPatchError, BackendUnavailableError) as err:
            return f"inner {inner!r} cannot run {sub}: {err}"
    return ""


def _sub_calls(backend: _ContextParallel, call: AttentionCall, plan: _Plan, inner: str,
               grad: bool):
    """The calls this rank's inner kernel will get, on empty tensors of their shapes; one
    chunk's keys at a time (a generator), so checking them takes O(S/P) memory."""
    heads, kv_heads = _local_heads(call, plan)
    if heads == 0:
        return
    b, d, dv = call.batch_size, call.head_dim, call.head_dim_v

    def empty(*shape, dtype=call.dtype, like=None):
        # Ulysses' inner kernel gets tensors with the caller's autograd state; the ring's none
        needs = not backend.uses_ring and like is not None and like.requires_grad
        return torch.empty(shape, dtype=dtype, device=call.device, requires_grad=needs)

    q = empty(b, heads, plan.chunk_q[plan.ring_index][1], d, like=call.query)
    if not backend.uses_ring:
        sk = plan.chunk_kv[0][1]
        mask = None if call.attn_mask is None else empty(b, 1, 1, sk, dtype=torch.bool)
        yield call.replace(query=q, key=empty(b, kv_heads, sk, d, like=call.key),
                           value=empty(b, kv_heads, sk, dv, like=call.value), attn_mask=mask)
        return
    ring = _Ring(call, None, plan, inner, grad)
    for c, parts in enumerate(plan.parts):
        if not parts:
            continue
        sk = plan.chunk_kv[c][1]
        k, v = empty(b, kv_heads, sk, d), empty(b, kv_heads, sk, dv)
        mask = None if call.attn_mask is None else empty(b, 1, sk, 1, dtype=torch.bool)
        for part in parts:
            yield ring.sub_call(q, k, v, mask, part)


def _run_plan(backend: _ContextParallel, call: AttentionCall, comm: _Comm, plan: _Plan,
              inner: str, grad: bool):
    q, k, v = call.query, call.key, call.value
    mask = call.attn_mask
    if mask is not None:  # one key-padding row per batch element, as every rank sends it
        mask = mask.expand(call.batch_size, 1, 1, call.seq_len_kv).contiguous()
    uly = plan.ulysses_degree > 1
    if uly:
        q = _seq_to_heads(comm, plan, q, plan.q_heads, plan.seq_q)
        k = _seq_to_heads(comm, plan, k, plan.kv_heads, plan.seq_kv)
        v = _seq_to_heads(comm, plan, v, plan.kv_heads, plan.seq_kv)
        if mask is not None:
            mask = _gather_mask(comm, plan, mask, plan.seq_kv)
    if backend.uses_ring:
        ring_mask = None if mask is None else mask.transpose(2, 3).contiguous()
        out, lse = _RingAttention.apply(_Ring(call, comm, plan, inner, grad), q, k, v,
                                        ring_mask)
    elif q.shape[1] == 0:  # more Ulysses ranks than heads: nothing to compute here
        out = q.new_zeros(*q.shape[:3], call.head_dim_v) + (q.sum() + k.sum() + v.sum()) * 0
        lse = torch.full(q.shape[:3], float("-inf"), device=q.device,
                         dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    else:
        sub = call.replace(query=q, key=k, value=v, attn_mask=mask, return_lse=call.return_lse)
        result = run_backend(inner, sub)
        out, lse = result if call.return_lse else (result, None)
    if uly:
        out = _heads_to_seq(comm, plan, out, plan.q_heads, plan.seq_q)
        if call.return_lse:
            lse = _heads_to_seq(comm, plan, lse.detach().unsqueeze(-1), plan.q_heads,
                                plan.seq_q).squeeze(-1)
    return (out, lse.detach()) if call.return_lse else out


@register_backend
class RingBackend(_ContextParallel):
    """Ring attention over the ranks of a process group (see the module docstring)."""

    name = "ring"
    description = ("context parallel: K/V shards travel a ring of ranks (P2P), merged by lse; "
                   "exact backward")
    Options = RingOptions


@register_backend
class UlyssesBackend(_ContextParallel):
    """Ulysses (DeepSpeed) sequence parallelism: all-to-all to head shards and back."""

    name = "ulysses"
    description = "context parallel: all-to-all from sequence shards to head shards and back"
    Options = UlyssesOptions
    uses_ring = False
    uses_ulysses = True


@register_backend
class USPBackend(_ContextParallel):
    """Unified sequence parallelism: Ulysses inside a ring (``ring_degree`` x
    ``ulysses_degree`` ranks)."""

    name = "usp"
    description = "context parallel: Ulysses groups inside a ring (ring_degree x ulysses_degree)"
    Options = USPOptions
    uses_ulysses = True
