"""Timing and comparison helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import torch

import attnpatch


def timer(fn, device: str, budget_s: float, warmup: int = 3, min_reps: int = 5,
          max_reps: int = 200) -> float:
    """Median milliseconds of ``fn()``: CUDA events on a GPU (after ``warmup`` calls; as many
    repetitions as fit ``budget_s``, between ``min_reps`` and ``max_reps``), wall time on a CPU
    (``min_reps`` repetitions: smoke runs)."""
    for _ in range(warmup):
        fn()
    if device != "cuda":
        times = []
        for _ in range(min_reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    reps = max(min_reps, min(max_reps, int(budget_s * 1e3 / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ‖a − b‖ / ‖b‖ in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def available(name: str) -> bool:
    """Whether backend ``name`` can run here."""
    return any(info.name == name and info.available for info in attnpatch.list_backends())
