"""ring, ulysses and usp: each rank's shard of the output (and of the q/k/v gradients) equals
dense attention over the whole sequence (float64 reference), on 2, 3 and 4 gloo ranks; faults
raise on every rank, naming the rank, within a bounded time.

Every distributed case runs in one spawned run of 4 ranks (one default group, subgroups of 2 and
3 ranks, fresh groups for the faults that leave a group unusable): spawning costs seconds per
process on a 2-core machine, a case costs milliseconds.
"""

from __future__ import annotations

import datetime
import time
import zlib
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

import attnpatch
from attnpatch import AttnPatchError, register_backend
from attnpatch.backends.math import MathBackend
from attnpatch.strategies.context_parallel import (RingOptions, UlyssesOptions, USPOptions,
                                                   resolve_group)
from attnpatch.strategies.cp_hooks import split_piece

from ..conftest import reference, rel_error
from .conftest import check_kernel_results, ring_of_one, run_ranks, simulated_ranks

WORLD = 4  # the spawned run; cases use its default group or subgroups of its first ranks
CPU_INNERS = ("math", "sdpa_flash", "auto")
TIMEOUT = 2.0  # seconds, the fault cases' timeout


@dataclass(frozen=True)
class Case:
    """One distributed attention call: ``lens`` the query shard lengths in rank order (the
    group is the first ``len(lens)`` ranks), ``kv_lens`` the key shard lengths (default: the
    same). ``text``: a joint text+image sequence, the text ``"first"`` or ``"last"`` in the
    global sequence, or ``"per_rank"``: each rank's shard is its part of the text followed by
    its part of the image (how diffusers' context-parallel plans shard Flux; the shard lengths
    then follow from ``sum(lens)``), compared with attention over ``[text | image]``.
    ``group``: "sub" (a group of the first ranks), "default" (None) or "mesh" (a 1-D
    DeviceMesh)."""

    name: str
    backend: str
    lens: tuple
    kv_lens: Optional[tuple] = None
    heads: int = 4
    kv_heads: Optional[int] = None
    head_dim: int = 8
    head_dim_v: Optional[int] = None
    mask: bool = False
    causal: bool = False
    inner: str = "math"
    dtype: torch.dtype = torch.float32
    options: dict = field(default_factory=dict)
    layout: str = "bhsd"
    text: Optional[str] = None
    grad: bool = True
    group: str = "sub"

    @property
    def world(self) -> int:
        return len(self.lens)


CASES = [
    # 2 ranks
    Case("ring-even-auto", "ring", (4, 4), inner="auto"),
    Case("ring-uneven-causal", "ring", (3, 7), causal=True),
    Case("ring-gqa-mask-causal-sdpa_flash", "ring", (5, 2), kv_heads=2, mask=True, causal=True,
         inner="sdpa_flash"),
    Case("ring-qk-shards-differ-causal-mask", "ring", (6, 3), kv_lens=(2, 9), mask=True,
         causal=True),
    Case("ring-value-head-dim", "ring", (4, 5), head_dim_v=12, mask=True),
    Case("ring-text-first", "ring", (5, 6), mask=True, text="first"),
    Case("ring-text-last", "ring", (7, 4), mask=True, text="last"),
    Case("ring-text-per-rank", "ring", (6, 6), mask=True, text="per_rank"),
    Case("ring-lse-no-grad", "ring", (3, 6), causal=True, mask=True, grad=False),
    Case("ring-float64-exact", "ring", (5, 3), kv_heads=2, causal=True, mask=True,
         dtype=torch.float64),
    Case("ulysses-even-value-head-dim", "ulysses", (4, 4), head_dim_v=12),
    Case("ulysses-uneven-3-heads-causal-mask", "ulysses", (3, 6), heads=3, causal=True,
         mask=True),
    Case("ulysses-mqa-auto", "ulysses", (5, 4), kv_heads=1, inner="auto"),
    Case("ulysses-bshd-lse-no-grad", "ulysses", (2, 7), heads=3, mask=True, layout="bshd",
         grad=False),
    Case("ulysses-text-per-rank", "ulysses", (5, 5), mask=True, text="per_rank",
         inner="sdpa"),
    Case("usp-1x2", "usp", (3, 5), heads=3, causal=True, options=dict(ring_degree=1)),
    Case("usp-2x1-value-head-dim", "usp", (3, 5), mask=True, head_dim_v=4,
         options=dict(ulysses_degree=1)),
    # 3 ranks
    Case("ring-3-gqa-mask-causal-sdpa_flash", "ring", (2, 5, 4), kv_heads=2, mask=True,
         causal=True, inner="sdpa_flash"),
    Case("ring-3-qk-shards-differ-causal", "ring", (4, 4, 4), kv_lens=(6, 1, 5), causal=True),
    Case("ring-3-text-first-bshd", "ring", (5, 5, 6), mask=True, text="first", layout="bshd"),
    Case("ulysses-3-4-heads-causal-mask", "ulysses", (4, 1, 6), heads=4, causal=True,
         mask=True),
    Case("ulysses-3-fewer-heads-than-ranks", "ulysses", (3, 3, 3), heads=2, kv_heads=1,
         causal=True),
    Case("usp-3x1-text-last", "usp", (4, 3, 5), mask=True, text="last",
         options=dict(ring_degree=3)),
    # 4 ranks
    Case("ring-4-causal-mask", "ring", (3, 1, 6, 2), causal=True, mask=True),
    Case("ring-4-default-group", "ring", (3, 3, 3, 3), kv_heads=1, group="default"),
    Case("ulysses-4-kv-heads-fewer-than-ranks", "ulysses", (2, 3, 4, 5), heads=6, kv_heads=2,
         causal=True),
    Case("ulysses-4-device-mesh", "ulysses", (4, 2, 3, 1), heads=5, mask=True, group="mesh"),
    Case("usp-2x2-3-heads-causal-mask", "usp", (2, 5, 3, 4), heads=3, causal=True, mask=True,
         options=dict(ulysses_degree=2)),
    Case("usp-2x2-gqa-text-per-rank-sdpa_flash", "usp", (4, 5, 3, 6), heads=6, kv_heads=3,
         mask=True, text="per_rank", inner="sdpa_flash",
         options=dict(ring_degree=2, ulysses_degree=2)),
    Case("usp-2x2-fewer-heads-than-ulysses", "usp", (3, 2, 4, 3), heads=1, causal=True,
         options=dict(ring_degree=2)),
    Case("usp-1x4-text-last", "usp", (3, 4, 2, 5), heads=4, kv_heads=2, mask=True,
         text="last", options=dict(ulysses_degree=4)),
]


# --- run on every rank ---------------------------------------------------------------------------
def _global_inputs(case: Case):
    """The whole sequence's q, k, v, key-padding mask and loss weights (float64), the same on
    every rank, and each rank's query and key positions in it."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    kv_lens = case.kv_lens or case.lens
    sq, sk = sum(case.lens), sum(kv_lens)
    b, h = 2, case.heads
    hkv, d, dv = case.kv_heads or h, case.head_dim, case.head_dim_v or case.head_dim

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v, w = rnd(b, h, sq, d), rnd(b, hkv, sk, d), rnd(b, hkv, sk, dv), rnd(b, h, sq, dv)
    mask = None
    if case.mask:
        mask = torch.rand(b, 1, 1, sk, generator=gen) > 0.3
        mask[1, ..., :] = False  # batch 1: some rows see no key at all (out 0, lse -inf) ...
        mask[1, ..., sk // 2] = True  # ... except under the causal pattern's reach
        mask[0, ..., 0] = True
    if case.text is None:
        q_pos = _contiguous(case.lens)
        k_pos = _contiguous(kv_lens)
    else:  # a joint sequence: text tokens, then image tokens, in the reference's order
        text = max(2, sq // 3)
        if case.mask:  # the text's padding: its last tokens masked, images always visible
            mask[..., :] = True
            mask[0, ..., text - 1:text] = False
            mask[1, ..., text - 2:text] = False
        if case.text == "first":
            q_pos = _contiguous(case.lens)
        elif case.text == "last":  # the sequence [image | text]: permute the reference's
            order = torch.cat([torch.arange(text, sq), torch.arange(text)])
            q_pos = [order[p] for p in _contiguous(case.lens)]
        else:  # per rank: its part of the text, then its part of the image
            t_parts = _contiguous(_split(text, case.world))
            i_parts = _contiguous(_split(sq - text, case.world))
            q_pos = [torch.cat([t, text + i]) for t, i in zip(t_parts, i_parts)]
        k_pos = q_pos
    return q, k, v, mask, w, q_pos, k_pos


def _split(n: int, parts: int) -> tuple:
    return tuple(n // parts + (i < n % parts) for i in range(parts))


def _contiguous(lens) -> list[torch.Tensor]:
    starts = [sum(lens[:i]) for i in range(len(lens))]
    return [torch.arange(s, s + n) for s, n in zip(starts, lens)]


def _run_case(case: Case, rank: int, group) -> dict:
    q, k, v, mask, w, q_pos, k_pos = _global_inputs(case)
    qi, ki = q_pos[rank], k_pos[rank]

    def shard(t, idx):
        t = t[:, :, idx].to(case.dtype)
        if case.layout == "bshd":
            t = t.transpose(1, 2).contiguous()
        return t.requires_grad_(case.grad)

    ql, kl, vl = shard(q, qi), shard(k, ki), shard(v, ki)
    ml = None if mask is None else mask[..., ki]
    with torch.set_grad_enabled(case.grad):
        result = attnpatch.attention(ql, kl, vl, attn_mask=ml, is_causal=case.causal,
                                     backend=case.backend, layout=case.layout,
                                     return_lse=not case.grad, group=group, inner=case.inner,
                                     **case.options)
    out, lse = (result, None) if case.grad else result
    if case.layout == "bshd":
        out = out.transpose(1, 2)
    # the dense reference over the whole sequence, in its own order (causal: global positions)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference(*leaves, attn_mask=mask, is_causal=case.causal)
    errors = {"out": rel_error(out.detach(), ref_out[:, :, qi].detach())}
    assert out.dtype == case.dtype and out.shape == ref_out[:, :, qi].shape
    if lse is not None:
        ref = ref_lse[:, :, qi]
        finite = torch.isfinite(ref)
        assert lse.dtype == (torch.float64 if case.dtype == torch.float64 else torch.float32)
        assert torch.equal(torch.isfinite(lse), finite), "rows without keys: lse -inf"
        errors["lse"] = rel_error(lse[finite], ref[finite])
    if case.grad:
        (out * w[:, :, qi].to(out.dtype)).sum().backward()
        (ref_out * w).sum().backward()
        for name, ours, ref, idx in zip("qkv", (ql, kl, vl), leaves, (qi, ki, ki)):
            grad = ours.grad.transpose(1, 2) if case.layout == "bshd" else ours.grad
            errors[f"d{name}"] = rel_error(grad, ref.grad[:, :, idx])
    return errors


class RefusesOnRank1(MathBackend):
    """``math``, except that rank 1 of the default group refuses every call (registered in the
    spawned ranks only)."""

    name = "test_refuses_on_rank_1"
    aliases = ()
    priority = None

    def not_supported_reasons(self, call):
        import torch.distributed as dist
        reasons = super().not_supported_reasons(call)
        if dist.get_rank() == 1:
            reasons.append("this rank's kernel does not take the call")
        return reasons


class RaisesOnRank1(MathBackend):
    """``math``, except that its kernel raises on rank 1 of the default group (registered in
    the spawned ranks only)."""

    name = "test_raises_on_rank_1"
    aliases = ()
    priority = None

    def forward(self, call, **options):
        import torch.distributed as dist
        if dist.get_rank() == 1:
            raise RuntimeError("kernel failure on rank 1")
        return super().forward(call, **options)


def _fault(fn) -> dict:
    """Run ``fn``; what it raised (type, message) and how long it took."""
    t0 = time.monotonic()
    try:
        fn()
    except Exception as err:
        return {"raised": type(err).__name__, "message": str(err),
                "elapsed": time.monotonic() - t0}
    return {"raised": None, "elapsed": time.monotonic() - t0}


def _faults(rank: int, g2, g3) -> dict:
    """The fault cases; the ones that leave a group unusable run on fresh groups."""
    def qkv(heads=2, seq=4, dtype=torch.float32):
        torch.manual_seed(rank)
        return [torch.randn(1, heads, seq, 8, dtype=dtype) for _ in range(3)]

    results = {}
    if rank < 2:
        heads = 4 if rank == 1 else 2
        results["mismatched-heads"] = _fault(lambda: attnpatch.attention(
            *qkv(heads), backend="ring", group=g2, inner="math"))
        dtype = torch.float64 if rank == 1 else torch.float32
        results["mismatched-dtype"] = _fault(lambda: attnpatch.attention(
            *qkv(dtype=dtype), backend="ulysses", group=g2))
        results["mismatched-causal"] = _fault(lambda: attnpatch.attention(
            *qkv(), is_causal=rank == 1, backend="ring", group=g2, inner="math"))
        inner = "sdpa_flash" if rank == 1 else "math"
        results["mismatched-options"] = _fault(lambda: attnpatch.attention(
            *qkv(), backend="usp", group=g2, inner=inner, ring_degree=2))
        results["one-rank-refuses"] = _fault(lambda: attnpatch.attention(
            *qkv(), backend="ring", group=g2, inner="test_refuses_on_rank_1"))
        # the group is still usable after every one of these
        results["usable-after"] = _fault(lambda: attnpatch.attention(
            *qkv(), backend="ring", group=g2, inner="math"))
    import torch.distributed as dist
    fresh3 = dist.new_group([0, 1, 2], timeout=datetime.timedelta(seconds=30))
    fresh2 = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=TIMEOUT))
    if rank < 3:  # a kernel raises in the middle of the ring: the others raise by the timeout
        # option, at the latest in their next call (a rank whose transfers all completed
        # returns from this one)
        def two_calls():
            for _ in range(2):
                attnpatch.attention(*qkv(seq=3), backend="ring", group=fresh3,
                                    inner="test_raises_on_rank_1", timeout=TIMEOUT)
        results["raises-mid-ring"] = _fault(two_calls)
    if rank < 2:  # rank 1 raises before reaching the strategy: the group's own timeout
        mask = torch.ones(1, 1, 4, 4) if rank == 1 else None  # a float mask: refused
        results["absent-rank"] = _fault(lambda: attnpatch.attention(
            *qkv(), attn_mask=mask, backend="ring", group=fresh2, inner="math"))
    dist.barrier()  # a rank that raised stays alive: the others see a timeout, not its exit
    return results


def _worker(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    register_backend(RefusesOnRank1)
    register_backend(RaisesOnRank1)
    groups = {n: dist.new_group(list(range(n))) for n in (1, 2, 3)}
    mesh = init_device_mesh("cpu", (world,))
    results = {"default-group": resolve_group(None) is dist.group.WORLD}
    for case in CASES:
        if rank >= case.world:
            continue
        group = {"sub": groups.get(case.world), "default": None, "mesh": mesh}[case.group]
        if case.world == world and case.group == "sub":
            group = dist.group.WORLD
        try:
            results[case.name] = _run_case(case, rank, group)
        except Exception as err:  # the case fails, naming the error; the others still run
            results[case.name] = {"exception": f"{type(err).__name__}: {err}"}
    if rank == 0:  # the kernel path in half precision, on a ring of one rank
        results["ring-of-one"] = ring_of_one(groups[1], "cpu", CPU_INNERS,
                                             (torch.bfloat16, torch.float32))
    results["faults"] = _faults(rank, groups[2], groups[3])
    results["plan-caches"] = _plan_caches(rank)
    return results


def _plan_caches(rank: int) -> dict:
    """Rank 0 is in two groups, ranks 1 and 2 in one each: rank 0 makes more first calls of
    new shapes (plans) than ranks 1 or 2, past the cache's 256. Its group A's plans must still
    hit and miss as rank 1's do, or one rank runs the first call's check exchange while the
    other is in the ring (both waited until the timeout)."""
    import torch.distributed as dist
    group_a, group_b = dist.new_group([0, 1]), dist.new_group([0, 2])

    def call(group, seq):
        q = torch.randn(1, 2, seq, 8, generator=torch.Generator().manual_seed(seq))
        return attnpatch.attention(q, q, q, backend="ring", group=group, inner="math",
                                   timeout=TIMEOUT)
    if rank in (0, 1):
        for seq in range(1, 201):
            call(group_a, seq)
    if rank in (0, 2):
        for seq in range(1, 101):
            call(group_b, seq)
    return _fault(lambda: call(group_a, 1)) if rank in (0, 1) else {"raised": None}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The results of every case on each of the 4 spawned ranks."""
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("cp"), timeout=240)


# --- the tests ---------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_equals_dense_attention(ranks, case):
    """Each rank's output shard, lse and q/k/v gradient shards against float64 dense attention
    over the whole sequence: within 1e-5 relative in float32, 1e-12 in float64."""
    tol = 1e-12 if case.dtype == torch.float64 else 1e-5
    for rank in range(case.world):
        errors = ranks[rank][case.name]
        assert "exception" not in errors, f"rank {rank}: {errors['exception']}"
        assert set(errors) == ({"out", "dq", "dk", "dv"} if case.grad else {"out", "lse"})
        worst = {name: err for name, err in errors.items() if not err <= tol}
        assert not worst, f"rank {rank}: relative errors above {tol:g}: {worst}"


@pytest.mark.distributed
def test_ring_of_one_rank_within_twice_maths_error_in_bfloat16(ranks):
    """On CPU, the GPU test's check of each inner kernel (tests/strategies/
    test_context_parallel_gpu.py runs it over NCCL with the CUDA kernels)."""
    check_kernel_results(ranks[0]["ring-of-one"])


def test_simulated_ranks_within_twice_maths_error_in_bfloat16():
    """The ring's arithmetic over uneven chunks (partials, merge, exact backward) with each
    CPU inner kernel; the GPU test runs it with the CUDA kernels."""
    check_kernel_results(simulated_ranks("cpu", CPU_INNERS[:2], (torch.bfloat16, torch.float32)))


@pytest.mark.distributed
def test_default_group_is_the_default_process_group(ranks):
    assert all(r["default-group"] for r in ranks)


@pytest.mark.distributed
@pytest.mark.parametrize("fault, field", [("mismatched-heads", "heads=4"),
                                          ("mismatched-dtype", "dtype=torch.float64"),
                                          ("mismatched-causal", "is_causal=True"),
                                          ("mismatched-options",
                                           "options inner='sdpa_flash', timeout=None, "
                                           "ring_degree=2, ulysses_degree=None")])
def test_mismatched_inputs_raise_on_every_rank_naming_rank_1(ranks, fault, field):
    for rank in (0, 1):
        result = ranks[rank]["faults"][fault]
        assert result["raised"] == "AttnPatchError", result
        assert f"rank 1 has {field}" in result["message"], result["message"]
        assert "rank 0 has" in result["message"]


@pytest.mark.distributed
def test_a_rank_whose_kernel_refuses_makes_every_rank_raise(ranks):
    for rank in (0, 1):
        result = ranks[rank]["faults"]["one-rank-refuses"]
        assert result["raised"] == "AttnPatchError", result
        assert "rank 1 failed" in result["message"]
        assert "this rank's kernel does not take the call" in result["message"]


@pytest.mark.distributed
def test_the_group_stays_usable_after_detected_faults(ranks):
    for rank in (0, 1):
        assert ranks[rank]["faults"]["usable-after"]["raised"] is None


@pytest.mark.distributed
def test_a_kernel_raising_mid_ring_makes_the_others_raise_within_the_timeout(ranks):
    own = ranks[1]["faults"]["raises-mid-ring"]
    assert own["raised"] == "AttnPatchError" and "kernel failure on rank 1" in own["message"]
    for rank in (0, 2):
        result = ranks[rank]["faults"]["raises-mid-ring"]
        assert result["raised"] == "AttnPatchError", result
        assert "did not complete within 2 s" in result["message"], result["message"]
        assert result["elapsed"] < 2 * TIMEOUT + 5, result["elapsed"]


@pytest.mark.distributed
def test_a_rank_that_never_arrives_makes_the_others_raise_within_the_group_timeout(ranks):
    assert ranks[1]["faults"]["absent-rank"]["raised"] == "BackendUnavailableError"
    result = ranks[0]["faults"]["absent-rank"]
    assert result["raised"] == "AttnPatchError", result
    assert "the exchange of shapes and options" in result["message"]
    assert "within the process group's timeout" in result["message"]
    assert result["elapsed"] < TIMEOUT + 5, result["elapsed"]


# --- in this process: options and an uninitialized torch.distributed ---------------------------
@pytest.mark.distributed
def test_plan_caches_agree_across_ranks_in_different_groups(ranks):
    for r in ranks[:3]:
        assert r["plan-caches"]["raised"] is None, r["plan-caches"]


def test_a_split_that_leaves_a_rank_nothing_raises_naming_the_input():
    """Two prompt tokens over three ranks: the plan's split would give one rank no keys. The
    input is the same on every rank before the split, so every rank raises this alike."""
    text = torch.randn(1, 2, 8)
    for rank in range(3):
        with pytest.raises(AttnPatchError, match=r"context parallel over 3 ranks: the prompt has "
                                                 r"2 entries along dim 1 .*fewer than the ranks"):
            split_piece(text, 1, rank, 3, "the prompt")
    assert [split_piece(text, 1, r, 2).shape[1] for r in range(2)] == [1, 1]


def test_not_initialized_is_a_reason_naming_the_fix():
    q = torch.randn(1, 2, 4, 8)
    for name in ("ring", "ulysses", "usp"):
        reasons = attnpatch.explain(q, q, q, backend=name).reasons[name]
        assert any("torch.distributed is not initialized" in r and "group" in r
                   for r in reasons), reasons
        with pytest.raises(attnpatch.BackendUnavailableError, match="not initialized"):
            attnpatch.attention(q, q, q, backend=name)
    with pytest.raises(AttnPatchError, match="^group: torch.distributed is not initialized"):
        resolve_group(None)


@pytest.mark.parametrize("options, match", [
    (dict(inner="sdpa"), "inner='sdpa' returns no log-sum-exp"),
    (dict(inner="nope"), "inner='nope': unknown backend"),
    (dict(inner="ulysses"), "context-parallel backend itself"),
    (dict(inner=3), "inner must be a backend name"),
    (dict(timeout=0), "timeout must be None"),
    (dict(timeout=True), "timeout must be None"),
    (dict(group="world"), "group must be a torch.distributed ProcessGroup"),
])
def test_ring_options_are_checked(options, match):
    with pytest.raises(AttnPatchError, match=match):
        RingOptions(**options)


def test_ulysses_takes_any_inner_and_usp_needs_a_degree():
    assert UlyssesOptions(inner="sdpa").inner == "sdpa"
    assert UlyssesOptions(inner="native").inner == "sdpa"  # aliases resolve
    with pytest.raises(AttnPatchError, match="usp needs ring_degree or ulysses_degree"):
        USPOptions()
    with pytest.raises(AttnPatchError, match="ring_degree must be a positive int"):
        USPOptions(ring_degree=0)
    assert USPOptions(ring_degree=2).ulysses_degree is None


def test_options_are_checked_where_given():
    with pytest.raises(AttnPatchError, match="returns no log-sum-exp"):
        with attnpatch.attention_backend("ring", inner="sdpa"):
            pass
