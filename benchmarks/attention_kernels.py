"""Forward TFLOP/s per backend for the anchor shapes, and the dispatcher's per-call overhead.

Run on a CUDA machine: ``python benchmarks/attention_kernels.py --out benchmarks/results``.
Times with CUDA events after warm-up, median of repeated runs; every variant of one shape runs
in the same process on the same inputs, after a correctness check against the math backend.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout this script is in, not another install
import attnpatch  # noqa: E402
from benchmarks._flash_direct import flash4_available, flash4_direct  # noqa: E402
from benchmarks._timing import timer  # noqa: E402

SHAPES = {
    "sdxl_1024": (2, 10, 4096, 64),
    "flux_1024": (1, 24, 4608, 128),
    "flux_2048": (1, 24, 16896, 128),
    "wan_720p": (1, 40, 75600, 128),
}
BACKENDS = ("auto", "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flex", "flash4",
            "flash4_direct")


def cuda_time(fn, warmup=5, min_reps=10, budget_s=2.0):
    """Median CUDA-event milliseconds of ``fn()`` (the kernel table's settings)."""
    return timer(fn, "cuda", budget_s, warmup=warmup, min_reps=min_reps, max_reps=100)


def bench_shapes(shapes, backends, dtype):
    rows = []
    fa4 = flash4_direct if flash4_available() else None
    for label, (b, h, s, d) in shapes.items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype, generator=gen)
                   for _ in range(3))
        flops = 4 * b * h * s * s * d
        small = slice(0, min(s, 2048))
        ref = attnpatch.attention(q[:, :, small], k, v, backend="math") if s <= 20000 else None
        for name in backends:
            row = {"shape": label, "B,H,S,D": [b, h, s, d], "backend": name}
            if name == "flash4_direct" and fa4 is not None:
                # same (B, H, S, D)-strided views the backend gets: no copy on either side
                qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))
                fn = lambda: fa4(qb, kb, vb)
                row["note"] = "flash_attn.cute.flash_attn_func called directly"
            elif name == "flash4_direct":
                row["error"] = "flash_attn.cute not installed"
                rows.append(row)
                continue
            else:
                explanation = attnpatch.explain(q, k, v, backend=None if name == "auto" else name)
                if explanation.choice is None:
                    row["error"] = "; ".join(explanation.reasons.get(name, ["refused"]))
                    rows.append(row)
                    continue
                row["chosen"] = explanation.choice
                kw = {} if name == "auto" else {"backend": name}
                fn = lambda: attnpatch.attention(q, k, v, **kw)
            try:
                out = fn()
                if ref is not None and name != "flash4_direct":
                    err = ((out[:, :, small].float() - ref.float()).norm() / ref.float().norm())
                    row["rel_err_vs_math"] = float(err)
                ms = cuda_time(fn)
            except Exception as exc:  # report, keep measuring the others
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                rows.append(row)
                continue
            row["ms"] = ms
            row["tflops"] = flops / ms / 1e9
            rows.append(row)
            print(f"{label:10s} {name:15s} {ms:9.3f} ms {row['tflops']:7.1f} TFLOP/s",
                  file=sys.stderr, flush=True)
        q = k = v = None  # free them before the next shape
        torch.cuda.empty_cache()
    return rows


def dispatcher_overhead(dtype, calls=2000):
    """Per-call wall time of a CPU-bound loop (tiny shape), attnpatch vs the kernel directly."""
    q, k, v = (torch.randn(1, 2, 64, 64, device="cuda", dtype=dtype) for _ in range(3))
    chosen = attnpatch.explain(q, k, v).choice
    assert chosen == "sdpa", chosen
    variants = {
        "F.scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(q, k, v),
        "attnpatch.attention(auto)": lambda: attnpatch.attention(q, k, v),
        "attnpatch.attention(backend='sdpa')": lambda: attnpatch.attention(q, k, v, backend="sdpa"),
    }
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # genuinely (B, S, H, D)
    variants["F.scaled_dot_product_attention(bshd as transposed views)"] = (
        lambda: F.scaled_dot_product_attention(qt.transpose(1, 2), kt.transpose(1, 2),
                                               vt.transpose(1, 2)).transpose(1, 2))
    variants["attnpatch.attention(layout='bshd')"] = (
        lambda: attnpatch.attention(qt, kt, vt, layout="bshd"))
    results = {name: [] for name in variants}
    with torch.no_grad():
        for _ in range(7):  # interleave the variants, keep the median per variant
            for name, fn in variants.items():
                for _ in range(50):
                    fn()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                torch.cuda.synchronize()
                results[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: statistics.median(v) for name, v in results.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--backends", nargs="*", default=list(BACKENDS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--out", type=pathlib.Path, default=None, help="folder for kernels.json")
    parser.add_argument("--overhead-only", action="store_true",
                        help="measure only the dispatcher's per-call overhead")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    if args.overhead_only:
        args.shapes = []
    rows = bench_shapes({s: SHAPES[s] for s in args.shapes}, args.backends, dtype)
    overhead = dispatcher_overhead(dtype)
    device = torch.cuda.get_device_name()
    print(f"\n## Forward TFLOP/s, {device}, {args.dtype}, torch {torch.__version__}\n")
    print("| shape | " + " | ".join(args.backends) + " | auto chose | auto / best |")
    print("| --- " * (len(args.backends) + 3) + "|")
    for label in args.shapes:
        by = {r["backend"]: r for r in rows if r["shape"] == label}
        cells = [f"{by[b]['tflops']:.0f}" if "tflops" in by.get(b, {}) else "n/a"
                 for b in args.backends]
        best = max((r["tflops"] for r in by.values() if "tflops" in r), default=float("nan"))
        auto = by.get("auto", {})
        ratio = auto.get("tflops", float("nan")) / best
        print(f"| {label} {tuple(SHAPES[label])} | " + " | ".join(cells)
              + f" | {auto.get('chosen', '-')} | {ratio:.1%} |")
    print("\n## Per-call time of a CPU-bound loop (tiny shape, selection cache warm)\n")
    base = overhead["F.scaled_dot_product_attention"]
    base_bshd = overhead["F.scaled_dot_product_attention(bshd as transposed views)"]
    for name, us in overhead.items():
        ref = base_bshd if "bshd" in name else base
        print(f"- {name}: {us:.2f} µs/call (+{us - ref:.2f} µs)")
    errors = [r for r in rows if "error" in r]
    for r in errors:
        print(f"- {r['shape']} {r['backend']}: {r['error']}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / ("overhead.json" if args.overhead_only else "kernels.json")).write_text(json.dumps(
            {"device": device, "torch": torch.__version__, "dtype": args.dtype, "rows": rows,
             "overhead_us": overhead}, indent=1))


if __name__ == "__main__":
    main()
