"""Overhead of attnpatch.patch() on full-size models: unpatched diffusers vs patched, same kernel.

Models (random weights, built from configs, nothing downloaded):

- Flux transformer: ``FluxTransformer2DModel()`` default config (Flux-dev size, 19 double +
  38 single blocks), bf16, a 1024x1024 image -> 4096 image tokens + 512 text tokens, batch 1;
- SDXL UNet: ``UNet2DConditionModel`` with the SDXL config, fp16, batch 2, 128x128 latents.

For each model the process builds two copies with the same weights, patches the second with
``attnpatch.patch(model, backend="sdpa")`` and alternates their forwards (CUDA events, after
warm-up; the order swaps every pair; no garbage collection while timing). It reports the
medians and the overhead of patched over unpatched, plus the median over pairs of neighbouring
forwards' ratios ("paired": host drift between pairs cancels) and the ratio of the fastest
forwards. It also times one SDXL-sized ``Attention`` module, whose call is launch-bound, to give
the host cost per attention call directly: the whole module forward, attnpatch's routing of the
``F.scaled_dot_product_attention`` call alone, and diffusers' per-forward
``inspect.signature(processor.__call__)``. The ``sdpa`` backend calls
``F.scaled_dot_product_attention`` like diffusers' own path (same kernel). Target: within 1%.

    python benchmarks/overhead.py --out benchmarks/results/overhead.json        # GPU
    python benchmarks/overhead.py --tiny --device cpu --repeats 3 --module-calls 10  # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnpatch  # noqa: E402


# the models and their inputs live in the package, shared with `attnpatch bench`
from attnpatch._bench.models import MODELS  # noqa: E402
from attnpatch._bench.models import build as _build  # noqa: E402

#: the model and inputs of one forward: (tiny, device, dtype) -> (model, kwargs)
flux_model, sdxl_model = MODELS["flux"].build, MODELS["sdxl"].build

__all__ = ["MODELS", "bench", "flux_model", "main", "module_call_cost", "sdxl_model"]


@contextlib.contextmanager
def _gc_paused():
    """No garbage collection inside a timed block: a collection pass lands on whichever variant
    happens to allocate the threshold-crossing object, adding milliseconds at random."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def time_forward(model, kwargs, device) -> tuple[float, float]:
    """(device ms, host ms) of one forward. Device: CUDA events on a GPU (perf_counter on CPU).
    Host: how long the Python forward took to return (kernel launches, no sync): when it nears
    the device time the model is launch-bound and any per-call Python cost shows."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        model(**kwargs)
        elapsed = (time.perf_counter() - t0) * 1e3
        return elapsed, elapsed
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    model(**kwargs)
    host = (time.perf_counter() - t0) * 1e3
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end), host


def bench(name: str, args, device) -> dict:
    """Two copies of the model (same seed, same weights), the second patched; their forwards
    alternate (order swapped every pair), so host and clock drift land on both alike and each
    pair of neighbouring forwards gives one paired ratio."""
    build, dtype = MODELS[name].build, MODELS[name].dtype
    if device.type == "cpu":
        dtype = torch.float32
    model, kwargs = build(args.tiny, device, dtype)
    patched, _ = build(args.tiny, device, dtype)
    handle = attnpatch.patch(patched, backend=args.backend)
    variants = {"unpatched": model, "patched": patched}
    runs = {v: ([], []) for v in variants}
    paired = []
    with torch.inference_mode(), _gc_paused():
        for _ in range(args.warmup):
            for m in variants.values():
                m(**kwargs)
        for i in range(args.repeats):
            pair = {}
            for variant in tuple(variants)[::1 if i % 2 == 0 else -1]:
                dev, host = time_forward(variants[variant], kwargs, device)
                runs[variant][0].append(dev)
                runs[variant][1].append(host)
                pair[variant] = dev
            paired.append(100.0 * (pair["patched"] / pair["unpatched"] - 1))
    report = handle.report()
    calls = sum(r.calls for r in report) // (args.repeats + args.warmup)
    base, med = (statistics.median(runs[v][0]) for v in variants)
    host_base, host_med = (statistics.median(runs[v][1]) for v in variants)
    best_base, best = (min(runs[v][0]) for v in variants)
    result = dict(
        model=name, dtype=str(dtype).replace("torch.", ""), backend=args.backend,
        attention_modules=len(report), routed=len(report.routed),
        attention_calls_per_forward=calls,
        unpatched_ms=runs["unpatched"][0], patched_ms=runs["patched"][0],
        unpatched_host_ms=runs["unpatched"][1], patched_host_ms=runs["patched"][1],
        unpatched_median_ms=base, patched_median_ms=med,
        overhead_pct=100.0 * (med - base) / base,
        paired_overhead_pct=statistics.median(paired), paired_overhead_pct_each=paired,
        unpatched_min_ms=best_base, patched_min_ms=best,
        min_overhead_pct=100.0 * (best - best_base) / best_base,
        host_unpatched_median_ms=host_base, host_patched_median_ms=host_med,
        host_overhead_us_per_call=1e3 * (host_med - host_base) / max(1, calls))
    handle.unpatch()
    del model, patched, variants
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _paired_blocks(pair: dict, args, device) -> dict:
    """Alternate blocks of ``args.module_calls`` calls of the two callables in ``pair``
    (``{"unpatched": fn, "patched": fn}``); µs per call: the best block of each and the median
    difference of neighbouring blocks."""
    blocks = {v: [] for v in pair}
    diffs = []
    for fn in pair.values():
        for _ in range(50):
            fn()
    for i in range(args.module_blocks):
        for variant in tuple(pair)[::1 if i % 2 == 0 else -1]:
            fn = pair[variant]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(args.module_calls):
                fn()
            blocks[variant].append((time.perf_counter() - t0) * 1e6 / args.module_calls)
        diffs.append(blocks["patched"][-1] - blocks["unpatched"][-1])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    best = {v: min(b) for v, b in blocks.items()}
    return dict(unpatched_us=best["unpatched"], patched_us=best["patched"],
                overhead_us=best["patched"] - best["unpatched"],
                paired_overhead_us=statistics.median(diffs), blocks_us=blocks)


def module_call_cost(args, device) -> dict:
    """Host µs per attention call, on one SDXL-sized diffusers ``Attention`` (640 channels,
    10 heads, 64 tokens: the kernels are tiny, so a call is launch-bound and its time is host
    time), an unpatched and a patched copy:

    - ``module``: the whole ``Attention`` forward (what a model pays per attention module);
    - ``routing``: the patched processor's ``F.scaled_dot_product_attention`` (attnpatch's
      dispatch) against torch's own, on the same q/k/v;
    - ``signature``: ``inspect.signature(processor.__call__)``, which diffusers runs on every
      attention forward; the patched processor answers it from a precomputed ``__signature__``.
    """
    import inspect

    from diffusers.models.attention_processor import Attention
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    plain = _build(Attention, device, dtype, query_dim=640, heads=10, dim_head=64)
    patched = _build(Attention, device, dtype, query_dim=640, heads=10, dim_head=64)
    handle = attnpatch.patch(patched, backend=args.backend)
    x = torch.randn(2, 64, 640, device=device, dtype=dtype)
    q, k, v = (torch.randn(2, 10, 64, 64, device=device, dtype=dtype) for _ in range(3))
    torch_sdpa = torch.nn.functional.scaled_dot_product_attention
    routed_sdpa = type(patched.processor).__call__.__globals__["F"].scaled_dot_product_attention
    assert routed_sdpa is not torch_sdpa, "the patched processor does not route F.sdpa"
    pairs = {
        "module": {"unpatched": lambda: plain(x), "patched": lambda: patched(x)},
        "routing": {
            "unpatched": lambda: torch_sdpa(q, k, v, attn_mask=None, dropout_p=0.0,
                                            is_causal=False),
            "patched": lambda: routed_sdpa(q, k, v, attn_mask=None, dropout_p=0.0,
                                           is_causal=False)},
        "signature": {"unpatched": lambda: inspect.signature(plain.processor.__call__),
                      "patched": lambda: inspect.signature(patched.processor.__call__)},
    }
    with torch.inference_mode(), _gc_paused():
        result = {name: _paired_blocks(pair, args, device) for name, pair in pairs.items()}
    handle.unpatch()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["flux", "sdxl"], choices=list(MODELS))
    p.add_argument("--backend", default="sdpa", help="attnpatch backend for the patched runs")
    p.add_argument("--repeats", type=int, default=40, help="timed forwards per variant (>= 5)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny configs (smoke test, e.g. on CPU)")
    p.add_argument("--module-calls", type=int, default=500,
                   help="calls per block when timing one Attention module's host cost (0: skip)")
    p.add_argument("--module-blocks", type=int, default=40, help="blocks per variant")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.repeats < 5 and not args.tiny:
        p.error("--repeats must be >= 5 for a median worth reporting")
    device = torch.device(args.device)
    env = dict(torch=torch.__version__, device=torch.cuda.get_device_name(device)
               if device.type == "cuda" else platform.processor() or "cpu",
               python=platform.python_version(), tiny=args.tiny)
    try:
        import diffusers
        env["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover
        pass
    module = module_call_cost(args, device) if args.module_calls else None
    results = [bench(name, args, device) for name in args.models]
    print(f"attnpatch patch() overhead, backend={args.backend}, {env['device']}, "
          f"torch {env['torch']}, median of {args.repeats} forwards")
    print(f"{'model':6} {'dtype':9} {'modules':>7} {'calls':>6} {'unpatched ms':>13} "
          f"{'patched ms':>11} {'overhead':>9} {'paired':>8} {'min unp/pat ms':>15} {'min':>7} "
          f"{'host unp/pat ms':>16} {'host µs/call':>12}")
    for r in results:
        print(f"{r['model']:6} {r['dtype']:9} {r['routed']:>7} "
              f"{r['attention_calls_per_forward']:>6} {r['unpatched_median_ms']:>13.2f} "
              f"{r['patched_median_ms']:>11.2f} {r['overhead_pct']:>8.2f}% "
              f"{r['paired_overhead_pct']:>7.2f}% "
              f"{r['unpatched_min_ms']:>7.2f}/{r['patched_min_ms']:<7.2f} "
              f"{r['min_overhead_pct']:>6.2f}% "
              f"{r['host_unpatched_median_ms']:>7.2f}/{r['host_patched_median_ms']:<8.2f} "
              f"{r['host_overhead_us_per_call']:>12.2f}")
    if module is not None:
        print(f"host µs per attention call, one SDXL-sized Attention (64 tokens), "
              f"{args.module_blocks} alternating blocks of {args.module_calls} calls:")
        print(f"{'':10} {'best unpatched':>15} {'best patched':>13} {'difference':>11} "
              f"{'paired median':>14}")
        for name, m in module.items():
            print(f"{name:10} {m['unpatched_us']:>15.2f} {m['patched_us']:>13.2f} "
                  f"{m['overhead_us']:>+11.2f} {m['paired_overhead_us']:>+14.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(env=env, results=results, module_call=module),
                                       indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
