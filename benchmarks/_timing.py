"""Timing and comparison helpers shared by the benchmark scripts: a re-export of
:mod:`attnpatch._bench.timing` (``attnpatch bench`` uses the same code), and the scripts'
"pipelined" time."""

from __future__ import annotations

from typing import Callable

from attnpatch._bench.timing import (alternating_rounds, available, flux_inputs,
                                     patched_forwards, rel, timer, timer_stats)

__all__ = ["PIPELINED", "alternating_rounds", "available", "flux_inputs", "patched_forwards",
           "pipelined_timer", "rel", "timer", "timer_stats"]

#: calls issued back to back between the two CUDA events of a "pipelined" time (as in a model,
#: where the host launches the next calls while the GPU runs: the host's own time per call is
#: hidden unless it exceeds the GPU's); the plain time syncs after every call, so it counts the
#: host's time before the first launch too
PIPELINED = 10


def pipelined_timer(fn: Callable[[], object], calls: int, device: str, budget_s: float,
                    *reps: int) -> float:
    """Median milliseconds per call of ``calls`` calls of ``fn()`` issued back to back between
    one pair of CUDA events (``reps``: :func:`timer`'s warm-up and least repetitions)."""
    return timer(lambda: [fn() for _ in range(calls)], device, budget_s, *reps) / calls
