"""``attnpatch demo``: generate with every backend that runs here and compare them.

With no ``--model`` it builds two small random-weight pipelines locally (a Flux-like and an
SD-like one, :mod:`attnpatch.tiny_pipelines`; no download), so it works offline on a fresh
machine. For each pipeline it generates once with diffusers' own attention (unpatched), then
once per backend with ``attnpatch.patch(pipe, backend=...)``, the same prompt and seed, and
prints: seconds per denoising step (median over steps), the largest and the relative deviation
of the image from the ``sdpa`` one, and how many attention modules were routed. Images, a chart
(``chart.png``, with matplotlib) and ``results.json`` go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from . import scripting
from .pipelines import denoiser_components
from .scripting import ScriptError

DEFAULT_PROMPT = "a red fox in the snow, watercolor"
UNPATCHED = "unpatched"
NOISE_NOTE = ("note: the built-in pipelines have random weights, so their images are noise; "
              "they show that every backend computes the same thing, not image quality")


@dataclass
class Row:
    pipeline: str
    backend: str
    seconds_per_step: Optional[float] = None
    max_abs_dev: Optional[float] = None
    rel_dev: Optional[float] = None
    modules_patched: int = 0
    calls: int = 0
    ran: str = ""
    image: Optional[str] = None
    error: Optional[str] = None
    step_seconds: list = field(default_factory=list)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo", help="generate with every backend available here and compare speed and output",
        description=__doc__.split("\n\n", 1)[1].replace("\n", " ") if __doc__ else None)
    p.add_argument("--model", metavar="PATH", default=None,
                   help="a local diffusers model folder (with model_index.json); default: two "
                        "built-in tiny random-weight pipelines (Flux-like, SD-like)")
    p.add_argument("--backend", action="append", default=[], metavar="NAME",
                   help="backend(s) to run (repeatable or comma-separated); default: every "
                        "backend available on this machine. sdpa always runs as the reference")
    p.add_argument("--backend-option", dest="backend_options", action="append", default=[],
                   metavar="KEY=VALUE",
                   help="an option for the --backend(s) (repeatable; int/float/bool/JSON/str)")
    scripting.add_scope_argument(p)
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default: 4)")
    p.add_argument("--height", type=int, default=None,
                   help="image height (default: 256 for the built-in pipelines, else the model's)")
    p.add_argument("--width", type=int, default=None, help="image width (as --height)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default="attnpatch-demo", metavar="DIR",
                   help="folder for images, chart.png and results.json (default: ./attnpatch-demo)")
    p.add_argument("--no-chart", action="store_true", help="skip chart.png")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    return scripting.run_script(lambda: _run(args))


# --- planning -----------------------------------------------------------------------------------

def _backends(args) -> tuple[list[str], bool]:
    """The backends to run (sdpa first, the reference) and whether the user named them."""
    options = scripting.parse_options(args.backend_options)
    names = [n.strip() for item in args.backend for n in item.split(",") if n.strip()]
    explicit = bool(names)
    if explicit:
        checked = []
        for n in names:
            c = scripting.check_backend(n, options)
            if c not in checked:
                checked.append(c)
    else:
        checked = scripting.available_backends()
        if options:
            from . import registry

            takes = [n for n in checked if set(options) <= set(registry.get_backend(n).options)]
            if not takes:
                raise ScriptError(f"no available backend takes option(s) "
                                  f"{', '.join(sorted(options))}; name the backend with --backend")
            checked = takes
    if "sdpa" not in checked:
        checked.insert(0, "sdpa")
    else:
        checked.remove("sdpa")
        checked.insert(0, "sdpa")
    return checked, explicit


def _options_for(name: str, options: dict) -> dict:
    from . import registry

    if name == "auto" or not options:
        return dict(options) if name == "auto" else {}
    accepted = registry.get_backend(name).options
    return {k: v for k, v in options.items() if k in accepted}


def _dtype_device(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    return dtype, device


def _pipelines(args, dtype, device) -> list[tuple[str, Any, dict, tuple]]:
    """(label, pipeline, extra call kwargs, default (height, width)) for each pipeline."""
    if args.model:
        pipe = scripting.load_local_pipeline(args.model, "--model", dtype=dtype)
        label = pathlib.Path(args.model).resolve().name or "model"
        return [(label, pipe.to(device), {}, (None, None))]
    from .tiny_pipelines import build_tiny_pipeline, tiny_call_kwargs

    out = []
    for kind, label in (("flux", "tiny-flux"), ("sd", "tiny-sd")):
        pipe = build_tiny_pipeline(kind, size="demo", seed=args.seed, dtype=dtype).to(device)
        out.append((label, pipe, tiny_call_kwargs(kind), (256, 256)))
    return out


class _StepTimer:
    """Times each denoiser forward (forward pre/post hooks); per step = the sum of a step's
    forwards (pipelines with separate conditional/unconditional passes make 2 per step)."""

    def __init__(self, modules, sync):
        self.durations: list[float] = []
        self._start = None
        self._sync = sync
        self._hooks = []
        for m in modules:
            self._hooks.append(m.register_forward_pre_hook(self._pre))
            self._hooks.append(m.register_forward_hook(self._post))

    def _pre(self, *_):
        self._sync()
        self._start = time.perf_counter()

    def _post(self, *_):
        self._sync()
        if self._start is not None:
            self.durations.append(time.perf_counter() - self._start)
            self._start = None

    def per_step(self, steps: int) -> list[float]:
        if not self.durations or steps <= 0:
            return []
        per = max(1, len(self.durations) // steps)
        return [sum(self.durations[i:i + per]) for i in range(0, per * steps, per)
                if i + per <= len(self.durations)]

    def remove(self):
        for h in self._hooks:
            h.remove()


def _call_kwargs(pipe, args, extra: dict, size: tuple, seed: int, device: str) -> dict:
    import inspect

    import torch

    params = inspect.signature(pipe.__call__).parameters
    kwargs = {"prompt": args.prompt, "num_inference_steps": args.steps, "output_type": "np",
              "generator": torch.Generator(device="cpu").manual_seed(seed)}
    height = args.height or size[0]
    width = args.width or size[1]
    if height:
        kwargs["height"] = height
    if width:
        kwargs["width"] = width
    kwargs.update(extra)
    return {k: v for k, v in kwargs.items() if k in params}


def _as_array(output):
    import numpy as np

    frames = getattr(output, "frames", None)
    if frames is not None:
        return np.asarray(frames[0], dtype=np.float32)   # (F, H, W, C)
    return np.asarray(output.images[0], dtype=np.float32)  # (H, W, C)


def _save_image(array, path: pathlib.Path) -> str:
    import numpy as np
    from PIL import Image

    data = (np.clip(np.nan_to_num(array), 0.0, 1.0) * 255).round().astype("uint8")
    if data.ndim == 4:  # video frames -> animated GIF
        frames = [Image.fromarray(f) for f in data]
        path = path.with_suffix(".gif")
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=125, loop=0)
    else:
        path = path.with_suffix(".png")
        Image.fromarray(data).save(path)
    return path.name


def _generate(pipe, label, backend, args, extra, size, device, stage, options):
    """One generation; returns (Row, image array or None)."""
    import torch

    import attnpatch

    row = Row(label, backend)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    handle = None
    timer = _StepTimer([m for _, m in denoiser_components(pipe)], sync)
    try:
        if backend != UNPATCHED:
            handle = scripting.patch_pipeline(pipe, backend, _options_for(backend, options),
                                              args.backend_scope)
        pipe.set_progress_bar_config(desc=f"{label} {backend}", leave=False, disable=False)
        with torch.inference_mode():
            output = pipe(**_call_kwargs(pipe, args, extra, size, args.seed, device))
        array = _as_array(output)
        steps = timer.per_step(args.steps)
        row.step_seconds = [round(s, 5) for s in steps]
        row.seconds_per_step = statistics.median(steps) if steps else None
        if handle is not None:
            report = handle.report()
            row.modules_patched = len(report.routed)
            row.calls = sum(r.calls for r in report)
            scope = scripting.denoiser_names(pipe) if args.backend_scope == "denoiser" else None
            row.ran = ",".join(scripting.ran_in(report, scope or None))
        else:
            row.ran = "diffusers/transformers default"
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in backend)
        row.image = _save_image(array, stage / f"{label}-{safe}")
        return row, array
    except attnpatch.AttnPatchError as err:
        row.error = scripting.one_line(err)
        return row, None
    except (TypeError, ValueError) as err:
        if not _options_for(backend, options):
            raise
        used = _options_for(backend, options)
        row.error = f"with options {used}: {scripting.one_line(err)[:300]}"
        return row, None
    finally:
        timer.remove()
        if handle is not None:
            handle.unpatch()


def _deviation(array, reference) -> tuple[float, float]:
    import numpy as np

    a = np.asarray(array, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    diff = a - r
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    norm = float(np.linalg.norm(r))
    rel = float(np.linalg.norm(diff) / norm) if norm > 0 else float(np.linalg.norm(diff))
    return max_abs, rel


# --- output -------------------------------------------------------------------------------------

def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def format_table(rows: list[Row]) -> str:
    head = ("pipeline", "backend", "s/step", "max dev", "rel dev", "modules patched",
            "ran (denoiser)")
    lines = [head]
    for r in rows:
        if r.error:
            lines.append((r.pipeline, r.backend, "failed", "-", "-", str(r.modules_patched),
                          r.error[:90]))
            continue
        lines.append((r.pipeline, r.backend, _fmt(r.seconds_per_step, ".4f"),
                      _fmt(r.max_abs_dev, ".2e"), _fmt(r.rel_dev, ".2e"),
                      str(r.modules_patched), r.ran))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1]
                     for row in lines)


def _chart(rows: list[Row], path: pathlib.Path) -> Optional[str]:
    """chart.png: seconds per step and relative deviation per backend; None if no matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if r.error is None and r.seconds_per_step is not None]
    pipelines = list(dict.fromkeys(r.pipeline for r in ok))
    backends = list(dict.fromkeys(r.backend for r in ok))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(pipelines))
    for i, pl in enumerate(pipelines):
        by = {r.backend: r for r in ok if r.pipeline == pl}
        xs = [j + i * width for j in range(len(backends))]
        axes[0].bar(xs, [by[b].seconds_per_step if b in by else 0 for b in backends], width,
                    label=pl)
        devs = [max(by[b].rel_dev or 0.0, 1e-12) if b in by and by[b].rel_dev is not None
                else 0 for b in backends]
        axes[1].bar(xs, devs, width, label=pl)
    for ax, title in ((axes[0], "seconds per denoising step (lower is faster)"),
                      (axes[1], "relative deviation from sdpa (log; identical drawn at 1e-12)")):
        ax.set_xticks([j + width * (len(pipelines) - 1) / 2 for j in range(len(backends))])
        ax.set_xticklabels(backends, rotation=30, ha="right")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    fig.suptitle("attnpatch demo", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise ScriptError(f"--steps {args.steps}: use 1 or more")
    for flag in ("height", "width"):
        v = getattr(args, flag)
        if v is not None and (v < 16 or v % 16):
            raise ScriptError(f"--{flag} {v}: use a multiple of 16 (e.g. 256)")
    backends, explicit = _backends(args)
    options = scripting.parse_options(args.backend_options)
    if args.model:
        scripting.check_model_folder(args.model, "--model")
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        raise ScriptError(f"--out {args.out!r} exists and is not a folder; pass a folder")

    import torch

    dtype, device = _dtype_device(args)
    print(f"attnpatch demo: torch {torch.__version__}, {device}, {str(dtype).replace('torch.', '')}"
          f"; backends: {', '.join(backends)}")
    pipelines = _pipelines(args, dtype, device)
    if not args.model:
        print(NOISE_NOTE)
    rows: list[Row] = []
    with scripting.staged_output(out) as stage:
        for label, pipe, extra, size in pipelines:
            # warm-up (lazy initialisation, allocator) so the first row is not penalised
            warm = argparse.Namespace(**{**vars(args), "steps": 1})
            pipe.set_progress_bar_config(disable=True)
            with torch.inference_mode():
                pipe(**_call_kwargs(pipe, warm, extra, size, args.seed, device))
            reference = None
            arrays = {}
            for backend in [UNPATCHED, *backends]:
                row, array = _generate(pipe, label, backend, args, extra, size, device, stage,
                                       options)
                if row.error and explicit and backend != UNPATCHED:
                    raise ScriptError(f"backend {backend!r} failed on {label}: {row.error}; "
                                      "pick another --backend (`attnpatch backends`) or change "
                                      "its --backend-option")
                if backend == "sdpa":
                    reference = array
                arrays[backend] = array
                rows.append(row)
            for row in rows:
                if row.pipeline == label and arrays.get(row.backend) is not None \
                        and reference is not None:
                    row.max_abs_dev, row.rel_dev = _deviation(arrays[row.backend], reference)
        chart = None
        if not args.no_chart:
            chart = _chart(rows, stage / "chart.png")
        results = {"device": device, "dtype": str(dtype).replace("torch.", ""),
                   "steps": args.steps, "prompt": args.prompt, "seed": args.seed,
                   "model": args.model, "random_weights": not args.model,
                   "rows": [asdict(r) for r in rows]}
        (stage / "results.json").write_text(json.dumps(results, indent=2))
    print()
    print(format_table(rows))
    print()
    print("s/step: median seconds per denoising step; max/rel dev: largest pixel difference and "
          "relative L2 difference of the image from the sdpa one (pixels in [0, 1]); "
          "modules patched: attention modules attnpatch routed (with --backend-scope denoiser, "
          "the default, the text encoders and VAE run 'auto')")
    if not args.model:
        print(NOISE_NOTE)
    saved = f"images, results.json{', chart.png' if chart else ''} saved to {out}/"
    print(saved)
    if chart is None and not args.no_chart:
        print("chart skipped: matplotlib is not installed (pip install matplotlib)")
    failed = [r for r in rows if r.error]
    for r in failed:
        print(f"{r.pipeline} {r.backend}: {r.error}")
    return 0
