"""Shared fixtures of the strategy tests: running a function on N gloo ranks, spawned."""

from __future__ import annotations

import datetime
import os
import pickle
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.multiprocessing as mp


def _rank_main(fn: Callable[[int, int], Any], rank: int, world: int, store: str, out: str,
               backend: str) -> None:
    """One spawned rank: a default group (``backend``) over a file store, ``fn(rank, world)``,
    its result (or traceback) pickled to ``out``; then the process ends at once (a process
    group left unusable by a fault case may hang in an orderly teardown)."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share the machine's cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = {"ok": fn(rank, world)}
    except BaseException:  # reported by the parent, with the rank's traceback
        result = {"error": traceback.format_exc()}
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(result, f)
    os.replace(tmp, out)
    os._exit(0)


def run_ranks(fn: Callable[[int, int], Any], world: int, tmp: Path, timeout: float,
              grace: float = 2.0, backend: str = "gloo") -> list[Any]:
    """``fn(rank, world)`` on ``world`` spawned processes, each rank in one default group of
    ``backend`` (gloo; nccl: rank r on GPU r);
    returns the ranks' results in rank order. ``fn`` must be importable (a module-level
    function). Fails the test naming the ranks that raised (with their tracebacks) or did not
    finish within ``timeout`` seconds; a rank that wrote its result but hangs in teardown is
    ended after ``grace`` seconds."""
    ctx = mp.get_context("spawn")
    outs = [tmp / f"rank{rank}.pkl" for rank in range(world)]
    procs = [ctx.Process(target=_rank_main, args=(fn, rank, world, str(tmp / "store"),
                                                   str(outs[rank]), backend), daemon=True)
             for rank in range(world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    done_at = None
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if done_at is None and all(o.exists() for o in outs):
            done_at = time.monotonic()
        if done_at is not None and time.monotonic() > done_at + grace:
            break
        time.sleep(0.05)
    hung = [rank for rank, p in enumerate(procs) if p.is_alive() and not outs[rank].exists()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join()
    results = [pickle.loads(o.read_bytes()) if o.exists() else None for o in outs]
    failed = {rank: r["error"] for rank, r in enumerate(results) if r and "error" in r}
    if hung or failed or any(r is None for r in results):
        pytest.fail(f"ranks that did not finish within {timeout} s: {hung}; ranks that raised: "
                    + "".join(f"\n--- rank {rank}:\n{tb}" for rank, tb in failed.items()))
    return [r["ok"] for r in results]


# --- the inner kernels in half precision: a ring of one rank, and ranks simulated by merges ------
#: call structures of the half-precision checks: make keywords
KERNEL_STRUCTURES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "gqa-causal": dict(kv_heads=2, causal=True),
    "key-padding-causal": dict(mask=True, causal=True),
}
#: the simulated ranks' shard lengths (uneven; queries and keys split alike)
CHUNKS = (40, 25, 63)


def kernel_inputs(structure: str, device: str, seq: int = sum(CHUNKS), seed: int = 0):
    """float64 q, k, v, key-padding mask (or None), loss weights and is_causal."""
    opts = KERNEL_STRUCTURES[structure]
    gen = torch.Generator().manual_seed(seed)
    b, h, d = 2, 4, 64
    hkv = opts.get("kv_heads", h)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)

    q, k, v, w = rnd(b, h, seq, d), rnd(b, hkv, seq, d), rnd(b, hkv, seq, d), rnd(b, h, seq, d)
    mask = None
    if opts.get("mask"):
        lengths = torch.tensor([seq - 17, seq // 2])
        mask = (torch.arange(seq)[None, :] < lengths[:, None])[:, None, None, :].to(device)
    return q, k, v, mask, w, bool(opts.get("causal"))


def half_errors(fn, structure: str, device: str, dtype: torch.dtype) -> dict[str, float]:
    """Relative errors of ``fn(q, k, v, mask, is_causal) -> out`` in ``dtype`` (out and the q/k/v
    gradients of a weighted sum) against float64 dense attention on the same values."""
    from ..conftest import reference, rel_error

    q, k, v, mask, w, causal = kernel_inputs(structure, device)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, mask, causal)
    (out * w.to(dtype)).sum().backward()
    refs = [t.to(dtype).double().requires_grad_() for t in (q, k, v)]  # the same rounded values
    ref, _ = reference(*refs, attn_mask=mask, is_causal=causal)
    (ref * w).sum().backward()
    errors = {"out": rel_error(out.detach(), ref.detach())}
    errors.update({f"d{n}": rel_error(a.grad, b.grad) for n, a, b in zip("qkv", leaves, refs)})
    return errors


def inner_runs(inner: str, q, k, v, mask, causal) -> bool:
    """Whether ``inner`` takes this call with an lse and computes its backward from one."""
    import attnpatch
    from attnpatch import registry

    ex = attnpatch.explain(*(t.detach() for t in (q, k, v)), attn_mask=mask, is_causal=causal,
                           backend=inner, return_lse=True)
    chosen = ex.choice and registry.get_backend(ex.choice)
    return bool(chosen) and chosen.supports_backward_from_lse


def math_errors(structure: str, device: str, dtype: torch.dtype) -> dict[str, float]:
    import attnpatch
    return half_errors(lambda q, k, v, m, c: attnpatch.attention(q, k, v, attn_mask=m,
                                                                 is_causal=c, backend="math"),
                       structure, device, dtype)


def ring_of_one(group, device: str, inners, dtypes) -> dict:
    """``ring`` on a group of one rank with each inner kernel: per (inner, dtype name,
    structure) either ``{"errors", "math"}`` (its errors and math's in that dtype) or
    ``{"refused": message}`` when the inner does not take the call (``expected`` says whether
    :func:`inner_runs` predicted it)."""
    import attnpatch

    results = {}
    for dtype in dtypes:
        for structure in KERNEL_STRUCTURES:
            base = math_errors(structure, device, dtype)
            for inner in inners:
                q, k, v, mask, _, causal = kernel_inputs(structure, device)
                expected = inner_runs(inner, q.to(dtype), k.to(dtype), v.to(dtype), mask,
                                      causal)

                def ring(q, k, v, m, c):
                    return attnpatch.attention(q, k, v, attn_mask=m, is_causal=c, backend="ring",
                                               group=group, inner=inner)
                key = (inner, str(dtype).removeprefix("torch."), structure)
                try:
                    results[key] = {"errors": half_errors(ring, structure, device, dtype),
                                    "math": base, "expected": expected}
                except attnpatch.AttnPatchError as err:
                    results[key] = {"refused": str(err), "expected": expected}
    return results


def simulated_ranks(device: str, inners, dtypes) -> dict:
    """The ring's arithmetic for len(CHUNKS) ranks in one process: per query chunk, the
    partials over the key chunks it sees (the diagonal one top-left causal under
    ``is_causal``) merged by :func:`attnpatch.merge_partials` (exact backward from the merged
    out and lse). Same result layout as :func:`ring_of_one`."""
    import attnpatch

    starts = [sum(CHUNKS[:i]) for i in range(len(CHUNKS))]
    spans = [slice(s, s + n) for s, n in zip(starts, CHUNKS)]

    def simulated(inner):
        def fn(q, k, v, mask, causal):
            outs = []
            for r, rows in enumerate(spans):
                call = attnpatch.explain(q[:, :, rows], k, v, attn_mask=mask,
                                         backend="math").call
                parts = []
                for c, keys in enumerate(spans[:r + 1] if causal else spans):
                    sub = call.replace(key=k[:, :, keys], value=v[:, :, keys],
                                       attn_mask=None if mask is None else mask[..., keys],
                                       is_causal=causal and c == r)
                    parts.append(attnpatch.Partial(sub, backend=inner))
                outs.append(attnpatch.merge_partials(call, parts))
            return torch.cat(outs, dim=2)
        return fn

    results = {}
    for dtype in dtypes:
        for structure in KERNEL_STRUCTURES:
            base = math_errors(structure, device, dtype)
            q, k, v, mask, _, causal = (t.to(dtype) if isinstance(t, torch.Tensor)
                                        and t.is_floating_point() else t
                                        for t in kernel_inputs(structure, device))
            for inner in inners:
                expected = all(
                    inner_runs(inner, q[:, :, rows], k[:, :, keys], v[:, :, keys],
                               None if mask is None else mask[..., keys], causal and c == r)
                    for r, rows in enumerate(spans)
                    for c, keys in enumerate(spans[:r + 1] if causal else spans))
                key = (inner, str(dtype).removeprefix("torch."), structure)
                try:
                    results[key] = {"errors": half_errors(simulated(inner), structure, device,
                                                          dtype),
                                    "math": base, "expected": expected}
                except attnpatch.AttnPatchError as err:
                    results[key] = {"refused": str(err), "expected": expected}
    return results


def check_kernel_results(results: dict) -> None:
    """Every inner that takes the calls ran them within 2 x math's error in the same dtype
    + 1e-3 (out and q/k/v gradients); every one that does not was refused with an error."""
    assert results
    bad = []
    for key, r in results.items():
        if "refused" in r:
            if r["expected"]:
                bad.append(f"{key}: refused although the inner takes the calls: {r['refused']}")
            continue
        if not r["expected"]:
            bad.append(f"{key}: ran although the inner does not take every call")
        for name, err in r["errors"].items():
            bound = 2 * r["math"][name] + 1e-3
            if not err <= bound:
                bad.append(f"{key}: {name} error {err:.2e} > 2 x math's "
                           f"{r['math'][name]:.2e} + 1e-3")
    assert not bad, "\n".join(bad)
