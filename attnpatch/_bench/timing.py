"""Timing and comparison helpers shared by ``attnpatch bench`` and the benchmark scripts
(``benchmarks/_timing.py`` re-exports them)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional

import torch

import attnpatch


def _spread(times: list[float]) -> dict:
    """Median, min, max and quartiles (ms) of repeated runs."""
    ordered = sorted(times)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median_ms": statistics.median(ordered), "min_ms": ordered[0],
            "max_ms": ordered[-1], "q1_ms": q1, "q3_ms": q3, "reps": len(ordered)}


def timer_stats(fn: Callable[[], object], device: str, budget_s: float, warmup: int = 3,
                min_reps: int = 5, max_reps: int = 200) -> dict:
    """Milliseconds of ``fn()`` over repeated runs: ``median_ms``, ``min_ms``, ``max_ms``,
    ``q1_ms``, ``q3_ms`` and ``reps``. CUDA events on a GPU (after ``warmup`` calls; as many
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
        return _spread(times)
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
    return _spread(times)


def alternating_rounds(variants: dict, device: str, budget_s: float, warmup: int = 1,
                       min_reps: int = 5, max_reps: int = 200) -> dict:
    """Per-forward milliseconds of each variant, timed in alternating rounds (the method of
    ``benchmarks/overhead.py``): every round enters each variant once, in an order that
    rotates from round to round, and times one call of it, so host and clock drift land on
    every variant alike. ``variants``: name -> (enter, fn), ``enter()`` a context manager that
    sets the variant up (a patch, a diffusers backend) and ``fn()`` the forward. ``warmup``
    rounds are not timed; the rounds that fit ``budget_s`` per variant follow (between
    ``min_reps`` and ``max_reps``; ``min_reps`` on a CPU). Returns name -> :func:`_spread`
    stats plus ``times_ms``, and ``"paired"``: name -> the per-round ratios to the first
    variant. A variant that raises (say, out of memory in a later round) leaves the rounds:
    its entry is ``{"error": "<type>: <message>"}`` and the others go on."""
    names = list(variants)
    times: dict[str, list] = {n: [] for n in names}
    errors: dict[str, str] = {}

    def one(name: str) -> float:
        enter, fn = variants[name]
        with enter():
            if device == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                return start.elapsed_time(end)
            begin = time.perf_counter()
            fn()
            return (time.perf_counter() - begin) * 1e3

    def timed(name: str) -> Optional[float]:
        try:
            return one(name)
        except Exception as exc:  # this variant leaves the rounds; the others go on
            errors[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            if device == "cuda":
                torch.cuda.empty_cache()
            return None

    for _ in range(warmup):
        for name in names:
            if name not in errors:
                timed(name)
    rounds, total_ms, done = min_reps, 0.0, 0
    while done < rounds and len(errors) < len(names):
        shift = done % len(names)
        for name in names[shift:] + names[:shift]:
            ms = None if name in errors else timed(name)
            if ms is not None:
                times[name].append(ms)
                total_ms += ms
        done += 1
        if done == 1 and device == "cuda":  # rounds that fit the budget (per variant)
            per_round = max(total_ms, 1e-3) / max(1, len(names) - len(errors))
            rounds = max(min_reps, min(max_reps, int(budget_s * 1e3 / per_round)))
    result: dict = {n: {"error": errors[n]} if n in errors else {**_spread(t), "times_ms": t}
                    for n, t in times.items()}
    base = times[names[0]]
    result["paired"] = {n: [a / b for a, b in zip(times[n], base)] for n in names[1:]
                        if n not in errors and names[0] not in errors}
    return result


def rounds_into_rows(timed: dict, rows: dict, device: str, timing: dict,
                     settings: Any = None) -> None:
    """Times ``timed`` (name -> (enter, fn), see :func:`alternating_rounds`) with the run's
    :func:`timer_stats` options ``timing`` and writes each row's (``rows``: name -> a result
    row with ``metrics`` and ``skipped``) ``fwd_*`` stats, ``fwd_rounds`` and
    ``fwd_paired_vs_first_median`` (the median of its per-round ratios to the first variant).
    A variant that failed while timed, or every one once ``settings``' deadline is spent, is
    skipped with why."""
    if not timed:
        return
    reason = over(settings)
    if reason:
        for name in timed:
            rows[name]["skipped"] = reason
        return
    with torch.no_grad():
        stats = alternating_rounds(timed, device, budget_s=timing.get("budget_s", 0.0),
                                   warmup=1, min_reps=timing.get("min_reps", 5),
                                   max_reps=timing.get("max_reps", 100))
    for name in timed:
        if "error" in stats[name]:
            rows[name]["skipped"] = f"failed while timed: {stats[name]['error']}"
            continue
        metrics = rows[name]["metrics"]
        metrics.update({f"fwd_{key}": val for key, val in stats[name].items()})
        metrics["fwd_rounds"] = "alternating"
        if stats["paired"].get(name):
            metrics["fwd_paired_vs_first_median"] = statistics.median(stats["paired"][name])


def timer(fn: Callable[[], object], device: str, budget_s: float, warmup: int = 3,
          min_reps: int = 5, max_reps: int = 200) -> float:
    """Median milliseconds of ``fn()`` (see :func:`timer_stats`)."""
    return timer_stats(fn, device, budget_s, warmup, min_reps, max_reps)["median_ms"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ‖a − b‖ / ‖b‖ in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def available(name: str) -> bool:
    """Whether backend ``name`` can run here."""
    return any(info.name == name and info.available for info in attnpatch.list_backends())


def flux_inputs(config: dict, rows: int, cols: int, text: int, device, dtype) -> dict:
    """Random inputs of a ``FluxTransformer2DModel`` built from ``config``: a ``rows`` x ``cols``
    latent grid (its ``img_ids``) and ``text`` prompt tokens, batch 1, seeded."""
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)
    return dict(hidden_states=randn(1, rows * cols, config["in_channels"]),
                encoder_hidden_states=randn(1, text, config["joint_attention_dim"]),
                pooled_projections=randn(1, config["pooled_projection_dim"]),
                timestep=torch.tensor([0.5], device=device, dtype=dtype),
                guidance=torch.tensor([3.5], device=device, dtype=dtype)
                if config.get("guidance_embeds", True) else None,
                img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3, device=device),
                return_dict=False)


def patched_forwards(model, kw: dict, variants: dict, device: str, budget_s: float) -> dict:
    """One forward of ``model(**kw)`` under ``attnpatch.patch(model, **variants[name])`` per
    variant (the dense reference first): ``{name}_ms`` (median), ``{name}_notes`` (the
    report's notes) or ``{name}_error``; for each later variant that ran with the first,
    ``{name}_rel_err_vs_dense`` and ``{name}_speedup`` against it (the second one's also as
    ``rel_err_vs_dense`` and ``speedup``)."""
    result, outputs = {}, {}
    reps = (1, 1) if device != "cuda" else (2, 3)  # (warm-up, repetitions): CPU runs are smoke
    with torch.no_grad():
        for name, patch_kw in variants.items():
            try:
                with attnpatch.patch(model, **patch_kw) as handle:
                    outputs[name] = model(**kw)[0]
                    result[f"{name}_ms"] = timer(lambda: model(**kw), device, budget_s, *reps)
                    result[f"{name}_notes"] = sorted({n for r in handle.report()
                                                      for n in r.notes})
            except Exception as exc:  # report it, keep measuring the others
                result[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    dense = next(iter(variants))
    names = [n for n in outputs if n != dense] if dense in outputs else []
    for i, other in enumerate(names):
        err = rel(outputs[other], outputs[dense])
        speedup = result[f"{dense}_ms"] / result[f"{other}_ms"]
        result[f"{other}_rel_err_vs_dense"], result[f"{other}_speedup"] = err, speedup
        if i == 0:
            result["rel_err_vs_dense"], result["speedup"] = err, speedup
    return result


#: how :meth:`Deadline.reason` begins (a row skipped for the time limit starts with it)
OUT_OF_TIME = "not measured: this call's --time-limit"


class Deadline:
    """The wall-clock limit of one ``attnpatch bench`` call (``--time-limit``): once spent,
    the suites skip what is left with :meth:`reason`, and the results are still written."""

    def __init__(self, seconds: Optional[float] = None):
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> Optional[float]:
        """Seconds left (None without a limit)."""
        return None if self.end is None else max(0.0, self.end - time.monotonic())

    def reason(self) -> Optional[str]:
        """None while time is left; else why a row is not measured."""
        if self.end is None or time.monotonic() < self.end:
            return None
        return (f"{OUT_OF_TIME} of {self.seconds:g} s was spent "
                "(run it again for this part: fewer --models or --processes, a smaller "
                "--budget, or --resolutions 1)")


def over(settings: Any) -> Optional[str]:
    """``settings.deadline``'s reason (None without a deadline or while time is left)."""
    deadline = getattr(settings, "deadline", None)
    return None if deadline is None else deadline.reason()
