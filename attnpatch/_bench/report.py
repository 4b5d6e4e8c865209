"""``report.md`` and the PNG charts of ``attnpatch bench``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: per suite: (column title, metric key) of its Markdown table
COLUMNS = {
    "kernels": [("fwd ms (median)", "fwd_median_ms"), ("fwd min–max", "fwd_range"),
                ("fwd TFLOP/s", "fwd_tflops"), ("fwd+bwd ms", "fwd_bwd_median_ms"),
                ("fwd+bwd min–max", "fwd_bwd_range"), ("fwd+bwd TFLOP/s", "fwd_bwd_tflops"),
                ("auto chose", "chosen"), ("auto / best", "share_of_best_fwd")],
    "models": [("fwd ms (median)", "fwd_median_ms"), ("fwd min–max", "fwd_range"),
               ("patch overhead %", "patch_overhead_pct"),
               ("rel. err vs unpatched", "rel_err_vs_unpatched"),
               ("modules routed", "routed_modules")],
    "sparse": [("density", "density"), ("dense fwd ms", "dense_fwd_median_ms"),
               ("sparse fwd ms", "fwd_median_ms"), ("sparse min–max", "fwd_range"),
               ("speed-up", "speedup"), ("ideal", "ideal_speedup"),
               ("rel. err vs dense", "rel_err_vs_dense")],
    "parallel": [],
}
TITLES = {"kernels": "Kernels: TFLOP/s per backend", "models": "Models: one denoiser forward",
          "sparse": "Sparse: speed against density and error",
          "parallel": "Parallel: context parallelism"}
NOTES = {
    "kernels": "FLOPs: 4·B·H·S²·D forward, 3.5x that for forward + backward. Times: median of "
               "repeated runs (CUDA events after warm-up on a GPU, wall time on a CPU), with "
               "the fastest and slowest run.",
    "models": "One denoiser forward of Flux, SDXL UNet, SD3 and Wan (random weights, two "
              "resolutions each; tiny models with --quick or off CUDA): unpatched diffusers, "
              "diffusers' own `set_attention_backend(name)` for every name diffusers defines "
              "(`diffusers <name>`; most fail off CUDA or without their package and are listed "
              "as skipped with the error; none applies to models whose attention processors do "
              "not dispatch through diffusers' backends, e.g. SDXL's and SD3's; Hub-kernel "
              "backends are skipped unless ATTNPATCH_BENCH_HUB_KERNELS=1), and "
              "`attnpatch.patch(model, backend=...)` on the same model and inputs; patch "
              "overhead is patched `sdpa` over unpatched (the paired measurement is "
              "`benchmarks/overhead.py`).",
    "sparse": "Forward only; density is the fraction of query-key pairs computed; the error is "
              "‖sparse − dense‖ / ‖dense‖ on random inputs (near-uniform attention, so the error "
              "is larger than on a trained model's activations). The full tables (backward, fused merge, "
              "transformers) come from `benchmarks/dilated.py` and `benchmarks/block_sparse.py`.",
    "parallel": "Context parallelism runs one process per GPU: measure it with "
                "`accelerate launch --multi_gpu --num_processes N "
                "benchmarks/context_parallel.py --out cp.json` on a machine with 2+ CUDA GPUs.",
}


def _cell(metrics: dict, key: str) -> str:
    if key.endswith("_range"):
        lo, hi = metrics.get(key[:-6] + "_min_ms"), metrics.get(key[:-6] + "_max_ms")
        return "–" if lo is None or hi is None else f"{lo:.3g}–{hi:.3g}"
    value = metrics.get(key)
    if value is None:
        return "–"
    if isinstance(value, float):
        if "share" in key:
            return f"{value:.0%}"
        return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _shape(shape: Any) -> str:
    return "–" if shape is None else (
        "(" + ", ".join(map(str, shape)) + ")" if isinstance(shape, list) else str(shape))


def markdown(results: dict) -> str:
    """The Markdown report: machine block, one table per suite, skipped rows with reasons,
    charts by relative path."""
    m = results["machine"]
    lines = ["# attnpatch bench", "",
             f"- date (UTC): {m['date']}", f"- platform: {m['platform']}",
             f"- CPU: {m['cpu']}",
             f"- GPU: {m['gpu']} (CUDA {m['cuda'] or 'none'}, driver "
             f"{m.get('driver') or 'unknown'})",
             f"- torch {m['torch']}, diffusers {m['diffusers']}, transformers "
             f"{m['transformers']}, attnpatch {m.get('attnpatch', '?')}",
             f"- run: suites {', '.join(results['config']['suites'])}, device "
             f"{results['config']['device']}{', --quick (tiny shapes)' if results['config']['quick'] else ''}"
             f"{', --model ' + results['config']['model'] if results['config']['model'] else ''}",
             ""]
    for suite in results["config"]["suites"]:
        rows = [r for r in results["rows"] if r["suite"] == suite]
        ran = [r for r in rows if r["skipped"] is None]
        skipped = [r for r in rows if r["skipped"] is not None]
        lines += [f"## {TITLES[suite]}", "", NOTES[suite], ""]
        cols = COLUMNS[suite]
        if ran and cols:
            lines.append("| name | variant | shape / model | "
                         + " | ".join(t for t, _ in cols) + " |")
            lines.append("|---" * (3 + len(cols)) + "|")
            for r in ran:
                lines.append(f"| {r['name']} | {r['variant']} | {_shape(r['shape'])} | "
                             + " | ".join(_cell(r["metrics"], k) for _, k in cols) + " |")
            lines.append("")
            errors = [r for r in ran if any(k.endswith("_error") for k in r["metrics"])]
            for r in errors:
                for k, v in r["metrics"].items():
                    if k.endswith("_error"):
                        lines.append(f"- {r['name']} {r['variant']} {k}: {v}")
            if errors:
                lines.append("")
        elif not ran:
            lines += ["No row of this suite ran on this machine.", ""]
        if skipped:
            lines += [f"Skipped ({len(skipped)}):", ""]
            lines += [f"- {r['name']} / {r['variant']}: {r['skipped']}" for r in skipped]
            lines.append("")
        for chart in results["charts"]:
            if Path(chart).name.startswith(suite):
                lines += [f"![{suite} chart]({chart})", ""]
    return "\n".join(lines)


def charts(results: dict, out: Path) -> list[str]:
    """PNG charts under ``out`` (matplotlib, Agg), relative paths; none without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'attnpatch[bench]'): no charts")
        return []
    written = []
    rows = [r for r in results["rows"] if r["skipped"] is None]

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    kern = [r for r in rows if r["suite"] == "kernels" and "fwd_tflops" in r["metrics"]]
    if kern:
        shapes = list(dict.fromkeys(r["name"] for r in kern))
        backends = list(dict.fromkeys(r["variant"] for r in kern))
        fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(shapes) * len(backends) / 3), 4))
        width = 0.8 / len(backends)
        for i, backend in enumerate(backends):
            vals = [next((r["metrics"]["fwd_tflops"] for r in kern
                          if r["name"] == s and r["variant"] == backend), 0.0) for s in shapes]
            ax.bar([x + i * width for x in range(len(shapes))], vals, width, label=backend)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))], shapes)
        ax.set_ylabel("forward TFLOP/s")
        ax.set_title("attention kernels, forward")
        ax.legend(fontsize=7)
        save(fig, "kernels_tflops.png")
    mod = [r for r in rows if r["suite"] == "models" and "fwd_median_ms" in r["metrics"]]
    if mod:
        labels = [f"{r['name']}\n{r['variant']}" for r in mod]
        fig, ax = plt.subplots(figsize=(min(max(6, 0.35 * len(mod)), 30), 4.5))
        med = [r["metrics"]["fwd_median_ms"] for r in mod]
        err = [[m - r["metrics"]["fwd_min_ms"] for m, r in zip(med, mod)],
               [r["metrics"]["fwd_max_ms"] - m for m, r in zip(med, mod)]]
        ax.bar(range(len(mod)), med, yerr=err, capsize=3)
        ax.set_xticks(range(len(mod)), labels, rotation=60, ha="right", fontsize=6)
        ax.set_ylabel("forward ms (median, min–max)")
        ax.set_title("one denoiser forward")
        save(fig, "models_forward_ms.png")
    sparse = [r for r in rows if r["suite"] == "sparse" and "speedup" in r["metrics"]]
    if sparse:
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant in dict.fromkeys(r["variant"] for r in sparse):
            pts = [r for r in sparse if r["variant"] == variant]
            ax.scatter([max(r["metrics"]["rel_err_vs_dense"], 1e-12) for r in pts],
                       [r["metrics"]["speedup"] for r in pts], label=variant)
            for r in pts:
                ax.annotate(f"{r['name']} ({r['metrics']['density']:.2f})",
                            (max(r["metrics"]["rel_err_vs_dense"], 1e-12),
                             r["metrics"]["speedup"]), fontsize=6)
        ax.set_xscale("log")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xlabel("relative error vs dense attention")
        ax.set_ylabel("forward speed-up over dense")
        ax.set_title("sparse attention: speed-up vs error (density in brackets)")
        ax.legend()
        save(fig, "sparse_speedup_vs_error.png")
    return written
