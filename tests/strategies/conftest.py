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


def _rank_main(fn: Callable[[int, int], Any], rank: int, world: int, store: str,
               out: str) -> None:
    """One spawned rank: a gloo default group over a file store, ``fn(rank, world)``, its
    result (or traceback) pickled to ``out``; then the process ends at once (a process group
    left unusable by a fault case may hang in an orderly teardown)."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
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
              grace: float = 2.0) -> list[Any]:
    """``fn(rank, world)`` on ``world`` spawned processes, each rank in one gloo default group;
    returns the ranks' results in rank order. ``fn`` must be importable (a module-level
    function). Fails the test naming the ranks that raised (with their tracebacks) or did not
    finish within ``timeout`` seconds; a rank that wrote its result but hangs in teardown is
    ended after ``grace`` seconds."""
    ctx = mp.get_context("spawn")
    outs = [tmp / f"rank{rank}.pkl" for rank in range(world)]
    procs = [ctx.Process(target=_rank_main, args=(fn, rank, world, str(tmp / "store"),
                                                   str(outs[rank])), daemon=True)
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
