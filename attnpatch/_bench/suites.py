"""The suites of ``attnpatch bench``: ``kernels``, ``models``, ``sparse`` (in
:mod:`attnpatch._bench.sparse`) and ``parallel``, plus the machine description.

Every suite returns rows ``{"suite", "name", "variant", "shape", "metrics", "skipped"}``:
``skipped`` is ``None`` for a measured row, else the reason it was not measured.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import platform
from typing import Any, Callable, Optional

import torch

import attnpatch

from .timing import over, rel, rounds_into_rows, timer_stats

log = logging.getLogger(__name__)

#: the anchor shapes (B, H, S, D) of the kernel table
KERNEL_SHAPES = {
    "sdxl_1024": (2, 10, 4096, 64),
    "flux_1024": (1, 24, 4608, 128),
    "flux_2048": (1, 24, 16896, 128),
    "wan_720p": (1, 40, 75600, 128),
}
QUICK_KERNEL_SHAPES = {"tiny": (1, 2, 64, 16)}
#: backends whose S x S scores are materialised: skipped above this sequence length
REFERENCE_BACKENDS = ("math", "sdpa_math")
REFERENCE_MAX_SEQ = 8192
#: attnpatch backends the models suite patches in (besides sdpa, the overhead reference)
MODEL_BACKENDS = {"cuda": ("auto", "sdpa_cudnn", "flash4", "flash3", "flex"),
                  "cpu": ("auto", "sdpa_math")}


def _error(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _driver_version() -> Optional[str]:
    """The NVIDIA driver's version (from ``nvidia-smi``), or None without one."""
    import shutil
    import subprocess

    if not torch.cuda.is_available() or shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def machine_info(device: str) -> dict:
    """The machine, without its hostname: platform, CPU, GPU, CUDA, library versions, date."""
    info: dict[str, Any] = {
        "platform": platform.platform(),  # OS, kernel, architecture: no hostname
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cuda": torch.version.cuda,
        "driver": _driver_version(),
        "torch": torch.__version__,
        "attnpatch": attnpatch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for lib in ("diffusers", "transformers"):
        try:
            info[lib] = __import__(lib).__version__
        except ImportError:
            info[lib] = None
    return info


def _row(suite: str, name: str, variant: str, shape: Any, skipped: Optional[str] = None,
         **metrics: Any) -> dict:
    return {"suite": suite, "name": name, "variant": variant, "shape": shape,
            "metrics": metrics, "skipped": skipped}


def _stats(prefix: str, stats: dict) -> dict:
    return {f"{prefix}_{key}": val for key, val in stats.items()}


# --- kernels -------------------------------------------------------------------------------------

def kernels_suite(device: str, quick: bool, timing: dict, progress: Callable,
                  settings: Any = None) -> list[dict]:
    """TFLOP/s per backend, forward and forward + backward, for the anchor shapes (GPU) or a
    tiny shape (``quick`` / CPU); ``auto``'s choice and its share of the best backend."""
    rows = []
    infos = [i for i in attnpatch.list_backends() if i.priority is not None]  # auto's candidates
    names = ["auto"] + [i.name for i in infos]
    why_not = {i.name: "; ".join(i.reasons) for i in infos if not i.available}
    if quick or device != "cuda":
        shapes = QUICK_KERNEL_SHAPES
        reason = ("--quick: tiny shapes only" if quick else
                  "anchor shapes need a CUDA device (run with --device cuda on a GPU)")
        rows += [_row("kernels", label, "*", list(shape), reason)
                 for label, shape in KERNEL_SHAPES.items()]
    else:
        shapes = KERNEL_SHAPES
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bar = progress(total=len(shapes) * len(names), desc="kernels")
    for label, (b, h, s, d) in shapes.items():
        shape_rows = []
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v, grad = (torch.randn(b, h, s, d, device=device, dtype=dtype, generator=gen)
                         for _ in range(4))
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        flops = 4 * b * h * s * s * d  # QK^T and PV, 2 FLOPs per multiply-add
        for name in names:
            row = _row("kernels", label, name, [b, h, s, d], dtype=str(dtype)[6:])
            shape_rows.append(row)
            bar.update(1)
            bar.set_postfix_str(f"{label} {name}")
            if over(settings):
                row["skipped"] = over(settings)
                continue
            if name in why_not:
                row["skipped"] = why_not[name]
                continue
            if name in REFERENCE_BACKENDS and s > REFERENCE_MAX_SEQ:
                row["skipped"] = (f"reference kernel materialises the {s}x{s} scores "
                                  f"(skipped above S={REFERENCE_MAX_SEQ})")
                continue
            ex = attnpatch.explain(q, k, v, backend=None if name == "auto" else name)
            if ex.choice is None:
                row["skipped"] = "; ".join(ex.reasons.get(name, ["refused"])) or "refused"
                continue
            kw = {} if name == "auto" else {"backend": name}
            if name == "auto":
                row["metrics"]["chosen"] = ex.choice
            try:
                with torch.no_grad():
                    fwd = timer_stats(lambda: attnpatch.attention(q, k, v, **kw), device,
                                      **timing)
                row["metrics"].update(_stats("fwd", fwd))
                row["metrics"]["fwd_tflops"] = flops / fwd["median_ms"] / 1e9
            except Exception as exc:  # report it, keep measuring the others
                row["skipped"] = _error(exc)
                continue
            try:
                def step():
                    out = attnpatch.attention(*leaves, **kw)
                    torch.autograd.grad(out, leaves, grad)
                both = timer_stats(step, device, **timing)
                row["metrics"].update(_stats("fwd_bwd", both))
                # the backward is 2.5x the forward's FLOPs (5 matmuls of the same size)
                row["metrics"]["fwd_bwd_tflops"] = 3.5 * flops / both["median_ms"] / 1e9
            except Exception as exc:
                row["metrics"]["fwd_bwd_error"] = _error(exc)
        measured = [r for r in shape_rows if r["variant"] != "auto" and "fwd_tflops" in r["metrics"]]
        auto = shape_rows[0]["metrics"]
        if measured and "fwd_tflops" in auto:
            best = max(measured, key=lambda r: r["metrics"]["fwd_tflops"])
            auto["best_fwd_backend"] = best["variant"]
            auto["share_of_best_fwd"] = auto["fwd_tflops"] / best["metrics"]["fwd_tflops"]
        rows += shape_rows
        q = k = v = grad = leaves = None  # free them before the next shape
        if device == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return rows


# --- models --------------------------------------------------------------------------------------

#: set to 1 to let the models suite try diffusers' ``*_hub`` backends (they download kernels)
HUB_KERNELS_ENV = "ATTNPATCH_BENCH_HUB_KERNELS"


def diffusers_backends() -> list[str]:
    """Every value of diffusers' ``AttentionBackendName`` (``native`` first), or just
    ``native`` when this diffusers has no attention dispatcher."""
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName
    except Exception:  # older diffusers, or none
        return ["native"]
    names = [member.value for member in AttentionBackendName]
    return ["native"] + [n for n in names if n != "native"]


def _dispatching_processors(model) -> dict[str, int]:
    """Processor class -> count of the model's attention modules whose processor has
    diffusers' ``_attention_backend`` slot (what ``set_attention_backend`` sets); with the
    other processors under the key ``""``."""
    counts: dict[str, int] = {}
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is None or not callable(processor):
            continue
        key = type(processor).__name__ if hasattr(processor, "_attention_backend") else ""
        counts[key] = counts.get(key, 0) + 1
    return counts


class _diffusers_backend:
    """``model.set_attention_backend(name)`` on entry; on exit ``reset_attention_backend()`` and
    the dispatcher's global active backend put back (``set_attention_backend`` also sets that
    global, which ``reset_attention_backend`` leaves behind)."""

    def __init__(self, model, name: str):
        self.model, self.name = model, name

    def __enter__(self):
        try:
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry
            self.registry = _AttentionBackendRegistry
            self.active = getattr(_AttentionBackendRegistry, "_active_backend", None)
        except Exception:
            self.registry = self.active = None
        try:
            self.model.set_attention_backend(self.name)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        try:
            self.model.reset_attention_backend()
        finally:
            if self.registry is not None and self.active is not None:
                self.registry._active_backend = self.active
        return False


def _diffusers_skip(model, backend: str) -> Optional[str]:
    """Why ``diffusers <backend>`` is not measured on ``model`` before trying it, or None."""
    if not hasattr(model, "set_attention_backend"):
        return "this diffusers model has no set_attention_backend"
    counts = _dispatching_processors(model)
    if not any(k for k in counts):
        others = ", ".join(sorted({type(m.processor).__name__ for m in model.modules()
                                   if callable(getattr(m, "processor", None))}))
        return (f"set_attention_backend changes nothing on this model: its {counts.get('', 0)} "
                f"attention processors ({others}) do not dispatch through diffusers' attention "
                "backends (the row would time the unpatched forward)")
    if backend.endswith("_hub") and os.environ.get(HUB_KERNELS_ENV) != "1":
        return (f"a Hub kernel backend: set_attention_backend downloads its kernel from the "
                f"Hugging Face Hub; the bench downloads nothing unless {HUB_KERNELS_ENV}=1")
    return None


def models_suite(device: str, quick: bool, timing: dict, progress: Callable,
                 settings: Any = None) -> list[dict]:
    """One denoiser forward per model and resolution (Flux, SDXL, SD3, Wan at two resolutions
    each; tiny models with ``quick`` or off CUDA): unpatched diffusers, diffusers' own
    ``set_attention_backend(name)`` for every name it defines (rows ``skipped`` with the error
    where one fails: most need CUDA or a package), and ``attnpatch.patch(model, backend=...)``,
    with the patch overhead (patched ``sdpa`` over unpatched) and each output's error against
    unpatched. ``settings`` (:class:`attnpatch.bench.Settings`): ``model`` (a local pipeline
    instead of the built-in models), ``models`` (a subset of the built-in ones), ``resolutions``
    (the first 1 or 2 of each). Every row's ``group`` is its model (what ``--models``
    replaces in an accumulating ``--out``)."""
    from . import models

    model_path = getattr(settings, "model", None)
    only = getattr(settings, "models", None)
    first = getattr(settings, "resolutions", None)
    tiny = quick or device != "cuda"
    # (group, name, make the model, [(row name, make its inputs)])
    entries: list[tuple[str, str, Callable, list[tuple[str, Callable]]]] = []
    if model_path is not None:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        loaded = models.load_denoiser(model_path, device, dtype, tiny)
        cls = type(loaded[0]).__name__
        entries.append(("model", cls, lambda: loaded[0], [(cls, lambda cfg: loaded[1])]))
    else:
        for key, spec in models.MODELS.items():
            if only is not None and key not in only:
                continue
            dtype = spec.dtype if device == "cuda" else torch.float32
            sizes = [(f"{key} {res}",
                      lambda cfg, spec=spec, res=res, dtype=dtype:
                      spec.inputs(cfg, res, tiny, device, dtype))
                     for res in spec.sizes(tiny)[:first]]
            entries.append((key, key, lambda spec=spec, dtype=dtype: spec.net(tiny, device, dtype),
                            sizes))
    infos = {i.name: i for i in attnpatch.list_backends()}
    extra = MODEL_BACKENDS["cuda" if device == "cuda" else "cpu"]
    variants = (["unpatched"] + [f"diffusers {b}" for b in diffusers_backends()]
                + ["attnpatch sdpa"] + [f"attnpatch {b}" for b in extra])
    rows = []
    bar = progress(total=sum(len(sizes) * len(variants) for *_, sizes in entries),
                   desc="models")
    for group, name, make, sizes in entries:
        bar.set_postfix_str(f"building {name}")
        if over(settings):
            for row_name, _ in sizes:
                for variant in variants:
                    rows.append(dict(_row("models", row_name, variant, name), group=group,
                                     skipped=over(settings)))
                    bar.update(1)
            continue
        try:
            model = make()
        except Exception as exc:  # e.g. diffusers not installed: say it, measure the rest
            log.warning("models %s: %s", name, exc)
            for row_name, _ in sizes:
                for variant in variants:
                    rows.append(dict(_row("models", row_name, variant, name),
                                     skipped=f"could not build the model: {_error(exc)}",
                                     group=group))
                    bar.update(1)
            continue
        for row_name, make_inputs in sizes:
            for row in _model_rows(row_name, model, make_inputs, variants, infos, tiny, device,
                                   timing, bar, settings):
                rows.append(dict(row, group=group))
        model = None  # free it before the next model
        if device == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return rows


def _self_attention_tokens(kwargs: dict) -> Optional[int]:
    """The longest self-attention sequence of a denoiser forward with ``kwargs`` (image or
    video tokens; a UNet's first attention level is at half the latent size), or None."""
    x = kwargs.get("hidden_states", kwargs.get("sample"))
    if not isinstance(x, torch.Tensor):
        return None
    if "sample" in kwargs and x.dim() == 4:
        return (x.shape[-2] // 2) * (x.shape[-1] // 2)
    if x.dim() == 3:
        return x.shape[1]
    if x.dim() == 4:  # SD3: 2x2 patches
        return (x.shape[-2] // 2) * (x.shape[-1] // 2)
    if x.dim() == 5:  # Wan: (1, 2, 2) patches
        return x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)
    return None


#: diffusers backends that materialise the S x S scores (math; flex uncompiled): skipped with
#: a reason above REFERENCE_MAX_SEQ tokens, as the kernels suite skips its reference kernels
DIFFUSERS_REFERENCE_BACKENDS = ("_native_math", "flex")


def _variant_context(model, kind: str, backend: str, variant: str) -> Callable:
    """A factory of the context that sets ``variant`` up on ``model`` (entered once per timed
    round): nothing, a diffusers backend, or an attnpatch patch (yielding its handle)."""
    if variant == "unpatched":
        return contextlib.nullcontext
    if kind == "diffusers":
        return lambda: _diffusers_backend(model, backend)
    return lambda: attnpatch.patch(model, backend=backend)


def _model_rows(name: str, model, make_inputs: Callable, variants: list[str], infos: dict,
                tiny: bool, device: str, timing: dict, bar, settings: Any = None) -> list[dict]:
    """The rows of one model at one resolution: every variant, then the patch overhead."""
    dtype = next(model.parameters()).dtype
    rows = []
    try:
        kwargs = make_inputs(model.config)
    except Exception as exc:
        log.warning("models %s: %s", name, exc)
        for variant in variants:
            rows.append(_row("models", name, variant, type(model).__name__,
                             f"could not build the inputs: {_error(exc)}"))
            bar.update(1)
        return rows
    first = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    desc = (f"{type(model).__name__}{' (tiny)' if tiny else ''}, {str(dtype)[6:]}, "
            f"{first} {tuple(kwargs[first].shape)}")
    outputs: dict[str, torch.Tensor] = {}
    timed: dict[str, tuple] = {}
    tokens = _self_attention_tokens(kwargs)
    for variant in variants:
        row = _row("models", name, variant, desc)
        rows.append(row)
        bar.update(1)
        bar.set_postfix_str(f"{name} {variant}")
        kind, _, backend = variant.partition(" ")
        if over(settings):
            row["skipped"] = over(settings)
            continue
        if (kind == "diffusers" and backend in DIFFUSERS_REFERENCE_BACKENDS and device == "cuda"
                and tokens is not None and tokens > REFERENCE_MAX_SEQ):
            row["skipped"] = (f"materialises the {tokens}x{tokens} scores per head (skipped "
                              f"above {REFERENCE_MAX_SEQ} tokens, as the kernels suite does)")
            continue
        if kind == "attnpatch" and backend in infos and not infos[backend].available:
            row["skipped"] = "; ".join(infos[backend].reasons)
            continue
        if kind == "diffusers":
            row["skipped"] = _diffusers_skip(model, backend)
            if row["skipped"] is not None:
                continue
        enter = _variant_context(model, kind, backend, variant)
        try:
            with torch.no_grad(), enter() as handle:
                outputs[variant] = model(**kwargs)[0]
                if kind == "diffusers":
                    row["metrics"]["backend_modules"] = sum(
                        n for k, n in _dispatching_processors(model).items() if k)
                elif kind == "attnpatch":
                    report = handle.report()
                    row["metrics"]["routed_modules"] = len(report.routed)
                    row["metrics"]["backends_used"] = ",".join(
                        sorted({r.backend for r in report if r.backend}))
        except Exception as exc:  # report it, keep measuring the others
            # most diffusers backends fail off CUDA or without their package: expected
            (log.info if kind == "diffusers" else log.warning)(
                "models %s %s: %s", name, variant, exc)
            row["skipped"] = _error(exc) + (
                f" (on {device}; most diffusers backends need CUDA or an extra package)"
                if kind == "diffusers" and device != "cuda" else "")
            continue
        timed[variant] = (enter, lambda: model(**kwargs))
        if "unpatched" in outputs and variant != "unpatched":
            row["metrics"]["rel_err_vs_unpatched"] = rel(outputs[variant], outputs["unpatched"])
    by = {r["variant"]: r for r in rows}
    # every variant in alternating rounds: drift lands on all alike (benchmarks/overhead.py)
    rounds_into_rows(timed, by, device, timing, settings)
    base = by.get("unpatched", {}).get("metrics", {})
    patched = by.get("attnpatch sdpa", {}).get("metrics", {})
    if "fwd_median_ms" in base and "fwd_median_ms" in patched:
        patched["patch_overhead_pct"] = 100.0 * (
            patched["fwd_median_ms"] / base["fwd_median_ms"] - 1)
        if "fwd_paired_vs_first_median" in patched and next(iter(timed)) == "unpatched":
            patched["patch_overhead_paired_pct"] = 100.0 * (
                patched["fwd_paired_vs_first_median"] - 1)
    kwargs = outputs = None
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


# --- parallel ------------------------------------------------------------------------------------

def parallel_suite(device: str, quick: bool, timing: dict, progress: Callable,
                   settings: Any = None) -> list[dict]:
    """See :func:`attnpatch._bench.parallel.parallel_suite` (accelerate launch per count)."""
    from .parallel import parallel_suite as run

    return run(device, quick, timing, progress, settings)
