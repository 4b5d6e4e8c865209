"""``report.md`` and the PNG charts of ``attnpatch bench``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from .._errors import AttnPatchError

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
    "sparse": [("config", "config"), ("density", "density"),
               ("dense fwd ms", "dense_fwd_median_ms"),
               ("sparse fwd ms", "fwd_median_ms"), ("sparse min–max", "fwd_range"),
               ("speed-up", "speedup"), ("ideal", "ideal_speedup"),
               ("rel. err vs dense", "rel_err_vs_dense"),
               ("rel. err of the output", "rel_err_vs_unpatched"),
               ("per-layer err median", "layer_rel_err_median"),
               ("per-layer err max", "layer_rel_err_max"),
               ("image ms", "generate_ms"), ("PSNR dB", "psnr_db"), ("SSIM", "ssim")],
    "parallel": [("ms (median)", "ms"), ("speed-up vs single", "speedup_vs_single"),
                 ("rel. err vs single", "rel_error_vs_single"), ("processes", "processes"),
                 ("launcher", "launcher")],
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
              "`attnpatch.patch(model, backend=...)` on the same model and inputs. A model's "
              "variants are timed in alternating rounds (each round sets every variant up and "
              "times one forward of it, the order rotating), so drift lands on all alike; patch "
              "overhead is patched `sdpa` over unpatched (`patch_overhead_paired_pct` in "
              "results.json: the median of the per-round ratios).",
    "sparse": "Forward only. Attention-call rows (`dilated <shape>`, `block_sparse <shape>_<window>`: "
              "tile windows from small to large): density is the fraction of query-key pairs "
              "computed, the speed-up is over dense attention (cuDNN on CUDA) measured in the "
              "same run, the error is ‖sparse − dense‖ / ‖dense‖ of the call's output on random "
              "inputs (near-uniform attention, so larger than on a trained model's activations). "
              "Model-output rows (`flux transformer …: output`): one Flux transformer forward "
              "(full size at 2048² on CUDA, tiny with --quick; random weights) with every "
              "attention layer sparse, the output's error against the unpatched forward and the "
              "speed-up over patched `sdpa` (timed in alternating rounds), and per layer the error of each attention call's output "
              "against dense attention on the same call (median and max over the layers; the "
              "list is `layer_rel_err` in results.json). Image rows (`--model PATH` only): one image per "
              "config from the same seed and prompt, PSNR and SSIM against the unpatched image "
              "(SSIM: 11×11 Gaussian window, σ 1.5, C1 = 0.01², C2 = 0.03², per RGB channel and "
              "averaged; PSNR `–` with SSIM 1: identical). Backward and the fused merge: "
              "`benchmarks/dilated.py` and `benchmarks/block_sparse.py`.",
    "parallel": "One process per GPU, launched by the bench with `accelerate launch "
                "--num_processes N` (torchrun without accelerate) for N in 1, 2, 4 "
                "(`--processes`): a denoiser forward per config, `single` (one process, no "
                "communication) against attnpatch's `ring`/`ulysses`/`usp` and diffusers' "
                "`ContextParallelConfig` (`diffusers_ring`/`diffusers_ulysses`); the time of a "
                "repeat is the slowest rank's. The worker is `python -m "
                "attnpatch._bench.parallel` (`benchmarks/context_parallel.py` calls it).",
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
             f"- suites in this file: {', '.join(results['config']['suites'])}",
             ""]
    runs = results.get("runs", [])
    if runs:
        lines += ["Runs that wrote these rows (the latest run's machine is above):", ""]
        for run in runs:
            rm, rc = run["machine"], run["config"]
            lines.append(
                f"- {run['suite']}{' (' + ', '.join(run['groups']) + ')' if run['groups'] else ''}"
                f": {rm['date']}, {rm['gpu'] if rc['device'] == 'cuda' else rm['cpu']} "
                f"({rc['device']}), torch {rm['torch']}, diffusers {rm['diffusers']}"
                f"{', --quick' if rc['quick'] else ''}"
                f"{', --model ' + rc['model'] if rc.get('model') else ''}"
                f"{', --budget ' + format(rc['budget_s'], 'g') if rc.get('budget_s') else ''}"
                f"{'; took ' + format(run['elapsed_s'], '.0f') + ' s' if 'elapsed_s' in run else ''}")
        lines.append("")
    for suite in results["config"]["suites"]:
        rows = [r for r in results["rows"] if r["suite"] == suite]
        ran = [r for r in rows if r["skipped"] is None]
        skipped = [r for r in rows if r["skipped"] is not None]
        lines += [f"## {TITLES[suite]}", "", NOTES[suite], ""]
        cols = [(t, k) for t, k in COLUMNS[suite] if any(
            (k[:-6] + "_min_ms" if k.endswith("_range") else k) in r["metrics"] for r in ran)]
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
    sparse = [r for r in rows if r["suite"] == "sparse" and "speedup" in r["metrics"]
              and ("rel_err_vs_dense" in r["metrics"] or "rel_err_vs_unpatched" in r["metrics"])]
    if sparse:
        def error(r):
            m = r["metrics"]
            err = m.get("rel_err_vs_dense", m.get("rel_err_vs_unpatched"))
            return None if err is None else max(err, 1e-12)  # None: not finite (stored null)

        def kind(r):
            return f"{r['variant']}, {'model output' if 'rel_err_vs_unpatched' in r['metrics'] else 'attention call'}"
        for x_of, xlabel, xlog, name, title in (
                (error, "relative error vs dense (attention call) / unpatched (model output)",
                 True, "sparse_speedup_vs_error.png", "sparse attention: speed-up vs error"),
                (lambda r: r["metrics"].get("density"), "density (fraction of query-key pairs)",
                 False, "sparse_speedup_vs_density.png",
                 "sparse attention: speed-up vs density")):
            pts_all = [r for r in sparse if x_of(r) is not None]
            if not pts_all:
                continue
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for label in dict.fromkeys(kind(r) for r in pts_all):
                pts = [r for r in pts_all if kind(r) == label]
                ax.scatter([x_of(r) for r in pts], [r["metrics"]["speedup"] for r in pts],
                           label=label, marker="o" if "call" in label else "s")
                for r in pts:
                    tag = r["name"].split(": ")[0] if "call" in label else r["metrics"].get(
                        "config", "")
                    ax.annotate(tag, (x_of(r), r["metrics"]["speedup"]), fontsize=5)
            if xlog:
                ax.set_xscale("log")
            ax.axhline(1.0, color="grey", lw=0.5)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel("forward speed-up over dense")
            ax.set_title(title)
            ax.legend(fontsize=7)
            save(fig, name)
    par = [r for r in rows if r["suite"] == "parallel" and "ms" in r["metrics"]]
    if par:
        configs = list(dict.fromkeys(r["name"].rsplit(" x", 1)[0] for r in par))
        fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 4), squeeze=False)
        for ax, config in zip(axes[0], configs):
            pts = [r for r in par if r["name"].rsplit(" x", 1)[0] == config]
            for variant in dict.fromkeys(r["variant"] for r in pts):
                vp = sorted((r for r in pts if r["variant"] == variant),
                            key=lambda r: r["metrics"].get("processes", 0))
                ax.plot([r["metrics"].get("processes", 0) for r in vp],
                        [r["metrics"]["ms"] for r in vp], marker="o", label=variant)
            ax.set_xlabel("processes (GPUs)")
            ax.set_ylabel("forward ms (median, slowest rank)")
            ax.set_title(config)
            ax.legend(fontsize=7)
        save(fig, "parallel_forward_ms.png")
    return written


#: docs/BENCHMARKS.md's generated section lies between these lines
DOCS_BEGIN = "<!-- attnpatch bench: begin generated section (do not edit by hand) -->"
DOCS_END = "<!-- attnpatch bench: end generated section -->"


def headline(results: dict, prefix: str = "") -> str:
    """The headline tables of ``results`` (Markdown): per suite, its measured rows with the
    key columns, the date and machine of the run, and its charts (paths under ``prefix``)."""
    lines = []
    for run in results.get("runs", []):
        suite = run["suite"]
        if any(r["suite"] == suite for r in results["rows"]) and \
                not any(l.startswith(f"### {TITLES[suite]}") for l in lines):
            ran = [r for r in results["rows"] if r["suite"] == suite and r["skipped"] is None]
            skipped = sum(r["suite"] == suite and r["skipped"] is not None
                          for r in results["rows"])
            when = "; ".join(
                f"{e['machine']['date'][:10]} on {e['machine']['gpu'] if e['config']['device'] == 'cuda' else 'CPU'}"
                f"{' (' + ', '.join(e['groups']) + ')' if e['groups'] else ''}"
                f"{', --quick' if e['config']['quick'] else ''}"
                for e in results["runs"] if e["suite"] == suite)
            lines += [f"### {TITLES[suite]}", "", f"Measured by `attnpatch bench --suite "
                      f"{suite}`: {when}. {len(ran)} rows measured, {skipped} skipped (reasons "
                      f"in the report).", ""]
            cols = [(t, k) for t, k in COLUMNS[suite] if not k.endswith("_range") and any(
                k in r["metrics"] for r in ran)]
            if ran and cols:
                lines.append("| name | variant | " + " | ".join(t for t, _ in cols) + " |")
                lines.append("|---" * (2 + len(cols)) + "|")
                lines += [f"| {r['name']} | {r['variant']} | "
                          + " | ".join(_cell(r["metrics"], k) for _, k in cols) + " |"
                          for r in ran]
                lines.append("")
            for chart in results["charts"]:
                if chart.startswith(suite):
                    lines += [f"![{suite}]({prefix}{chart})", ""]
    return "\n".join(lines)


def update_docs(results: dict, out: Path) -> Optional[Path]:
    """When ``out``'s parent folder has a ``BENCHMARKS.md`` with the :data:`DOCS_BEGIN` /
    :data:`DOCS_END` lines (``--out docs/bench`` in this repository), rewrite what lies between
    them with :func:`headline` (charts linked under ``out``'s name); the rest of the page stays
    as written. Returns the page's path, or None when there is none to update."""
    page = Path(out).resolve().parent / "BENCHMARKS.md"
    if not page.exists():
        return None
    text = page.read_text()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        return None
    before, rest = text.split(DOCS_BEGIN, 1)
    if DOCS_END not in rest:
        raise AttnPatchError(f"{page}: its '{DOCS_END}' line comes before its '{DOCS_BEGIN}' "
                             "line; put the begin marker first (results.json and report.md "
                             "are written)")
    _, after = rest.split(DOCS_END, 1)
    body = headline(results, prefix=f"{Path(out).resolve().name}/")
    page.write_text(f"{before}{DOCS_BEGIN}\n\n{body}\n{DOCS_END}{after}")
    log.info("attnpatch bench: updated %s", page)
    return page
