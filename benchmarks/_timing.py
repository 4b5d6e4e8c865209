"""Timing and comparison helpers shared by the benchmark scripts: a re-export of
:mod:`attnpatch._bench.timing` (``attnpatch bench`` uses the same code)."""

from __future__ import annotations

from attnpatch._bench.timing import (alternating_rounds, available, flux_inputs,
                                     patched_forwards, rel, timer, timer_stats)

__all__ = ["alternating_rounds", "available", "flux_inputs", "patched_forwards", "rel", "timer",
           "timer_stats"]
