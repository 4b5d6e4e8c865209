"""Sparse-attention shapes and patterns (``dilated``, ``block_sparse``), shared by
``attnpatch bench --suite sparse`` and ``benchmarks/dilated.py`` / ``benchmarks/block_sparse.py``,
and the sparse suite itself: speed against density, with the error against dense attention."""

from __future__ import annotations

import logging
import math
import re
import statistics
import time
from typing import Any, Callable

import torch

import attnpatch
from attnpatch import TokenLayout

from .timing import over, rel, rounds_into_rows, timer_stats

log = logging.getLogger(__name__)

_DENSITY = re.compile(r"density ([0-9.]+)")

FLUX_PATTERNS = dict(segment_lengths=(2048, 4096, 8192, 16896), dilation_rates=(1, 2, 4, 8))
DILATED_FULL = {
    "flux_2048": dict(shape=(1, 24, 16896, 128), options=FLUX_PATTERNS),
    "wan_720p": dict(shape=(1, 40, 75600, 128), options=dict(
        segment_lengths=(8192, 16384, 32768, 75600), dilation_rates=(1, 2, 4, 8))),
    "wan_720p_grid": dict(shape=(1, 40, 75600, 128), grid=(21, 45, 80), options=dict(
        segment_lengths=((3, 45, 80), (21, 45, 80)), dilation_rates=((1, 1, 1), (1, 2, 2)),
        grid="3d")),
}
DILATED_QUICK = {
    "flux_tiny": dict(shape=(1, 4, 330, 32), options=dict(
        segment_lengths=(40, 80, 160, 330), dilation_rates=(1, 2, 4, 8))),
    "wan_tiny": dict(shape=(1, 4, 600, 32), options=dict(
        segment_lengths=(64, 128, 256, 600), dilation_rates=(1, 2, 4, 8))),
    "wan_tiny_grid": dict(shape=(1, 4, 600, 32), grid=(3, 10, 20), options=dict(
        segment_lengths=((1, 10, 20), (3, 10, 20)), dilation_rates=((1, 1, 1), (1, 2, 2)),
        grid="3d")),
}


def flops_fraction(seq: int, heads: int, dims: tuple, segments, rates, grid) -> float:
    """Query-key pairs the patterns compute over the dense count, counted from the definition
    (per head offset: the kept positions per segment, squared), independently of attnpatch."""
    pairs = 0
    for w, r in zip(segments, rates):
        w, r = (w, r) if grid else ((w,), (r,))
        period = math.prod(r)
        for h in range(heads):
            offsets, index = [], h % period
            for size in reversed(r):
                index, o = divmod(index, size)
                offsets.append(o)
            offsets.reverse()
            per_axis = []  # kept counts of every segment along each axis
            for length, wa, ra, oa in zip(dims, w, r, offsets):
                counts = [max(0, -(-(min(wa, length - s) - oa) // ra))
                          for s in range(0, length, wa)]
                per_axis.append(counts)
            total = 1
            for counts in per_axis:
                total *= sum(c * c for c in counts)
            pairs += total
    return pairs / (heads * seq * seq)


_FLUX_2048 = TokenLayout(512, "first", 1, 128, 128)
_WAN_18x48x80 = TokenLayout(0, "none", 18, 48, 80)
_FLUX_TINY = TokenLayout(16, "first", 1, 16, 32)
_WAN_TINY = TokenLayout(0, "none", 3, 8, 16)


def _tiles(prefix: str, shape: tuple, layout: TokenLayout, pattern: str, tile: tuple,
           windows: list) -> dict:
    """A window sweep (small to large) of one tile pattern on one shape."""
    return {f"{prefix}_{'x'.join(map(str, w))}": dict(
        shape=shape, layout=layout, options=dict(pattern=pattern, tile=tile, window=w))
        for w in windows}


#: the configs of ``benchmarks/block_sparse.py`` (its table: Flux 2048² tile2d 7x5 and 5x3, Wan
#: 18x48x80 tile3d 3x3x3)
BLOCK_SPARSE_FULL = {
    "flux_2048_7x5": dict(shape=(1, 24, 16896, 128), layout=_FLUX_2048,
                          options=dict(pattern="tile2d", tile=(8, 16), window=(7, 5))),
    "flux_2048_5x3": dict(shape=(1, 24, 16896, 128), layout=_FLUX_2048,
                          options=dict(pattern="tile2d", tile=(8, 16), window=(5, 3))),
    "wan_18x48x80": dict(shape=(1, 40, 69120, 128), layout=_WAN_18x48x80,
                         options=dict(pattern="tile3d", tile=(6, 8, 8), window=(3, 3, 3))),
}
BLOCK_SPARSE_QUICK = {
    "flux_tiny": dict(shape=(1, 2, 528, 32), layout=_FLUX_TINY,
                      options=dict(pattern="tile2d", tile=(4, 8), window=(3, 3))),
    "wan_tiny": dict(shape=(1, 2, 384, 32), layout=_WAN_TINY,
                     options=dict(pattern="tile3d", tile=(1, 2, 4), window=(1, 3, 3))),
}
#: the bench's block_sparse density sweeps: Flux 2048² (tiles of 8x16 tokens: a 16 x 8 tile
#: grid) and Wan 18x48x80 latents (tiles 6x8x8: 3 x 6 x 10 tiles), tile windows from small to
#: large
BLOCK_SPARSE_SWEEP_FULL = {
    **_tiles("flux_2048", (1, 24, 16896, 128), _FLUX_2048, "tile2d", (8, 16),
             [(3, 3), (5, 3), (7, 5), (11, 7)]),
    **_tiles("wan_18x48x80", (1, 40, 69120, 128), _WAN_18x48x80, "tile3d", (6, 8, 8),
             [(1, 3, 3), (3, 3, 3), (3, 5, 5), (3, 5, 7)]),
}
BLOCK_SPARSE_SWEEP_QUICK = {
    **_tiles("flux_tiny", (1, 2, 528, 32), _FLUX_TINY, "tile2d", (4, 8),
             [(1, 1), (3, 1), (3, 3)]),
    **_tiles("wan_tiny", (1, 2, 384, 32), _WAN_TINY, "tile3d", (1, 2, 4),
             [(1, 1, 1), (1, 3, 3), (3, 3, 3)]),
}
#: the bench's dilated pattern sets: ``benchmarks/dilated.py``'s, and on Flux 2048² a sparser
#: and a denser set
DILATED_SWEEP_FULL = {
    **DILATED_FULL,
    "flux_2048_sparse": dict(shape=(1, 24, 16896, 128), options=dict(
        segment_lengths=(1024, 2048, 4096, 8192), dilation_rates=(1, 2, 4, 8))),
    "flux_2048_dense": dict(shape=(1, 24, 16896, 128), options=dict(
        segment_lengths=(4096, 8192, 16896), dilation_rates=(1, 2, 4))),
}
DILATED_SWEEP_QUICK = {
    **DILATED_QUICK,
    "flux_tiny_sparse": dict(shape=(1, 4, 330, 32), options=dict(
        segment_lengths=(20, 40, 80, 160), dilation_rates=(1, 2, 4, 8))),
    "flux_tiny_dense": dict(shape=(1, 4, 330, 32), options=dict(
        segment_lengths=(80, 160, 330), dilation_rates=(1, 2, 4))),
}

#: the model-output rows: a Flux transformer forward (full size at 2048² on CUDA: 128 x 128
#: latent tokens and 512 text tokens; tiny on --quick / CPU: 16 x 16 and 7) patched with each
#: sparse config, against the unpatched forward (timed against patched ``sdpa``)
MODEL_FULL = dict(grid=(128, 128), text=512, configs={
    "block_sparse tile2d 8x16 window 5x3": dict(pattern="tile2d", tile=(8, 16), window=(5, 3)),
    "block_sparse tile2d 8x16 window 7x5": dict(pattern="tile2d", tile=(8, 16), window=(7, 5)),
    "block_sparse tile2d 8x16 window 11x7": dict(pattern="tile2d", tile=(8, 16),
                                                 window=(11, 7)),
    "dilated (2048, 4096, 8192, 16384) x (1, 2, 4, 8)": dict(
        segment_lengths=(2048, 4096, 8192, 16384), dilation_rates=(1, 2, 4, 8)),
})
MODEL_QUICK = dict(grid=(16, 16), text=7, configs={
    "block_sparse tile2d 4x4 window 1x1": dict(pattern="tile2d", tile=(4, 4), window=(1, 1)),
    "block_sparse tile2d 4x4 window 3x3": dict(pattern="tile2d", tile=(4, 4), window=(3, 3)),
    "dilated (32, 64, 128, 256) x (1, 2, 4, 8)": dict(
        segment_lengths=(32, 64, 128, 256), dilation_rates=(1, 2, 4, 8)),
})


def _error(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"


def _dilated_case(config: dict, device: str, quick: bool) -> tuple[dict, float, TokenLayout]:
    b, h, s, d = config["shape"]
    grid = config.get("grid")
    options = config["options"]
    layout = None if grid is None else TokenLayout(0, "none", *grid, seq_len_q=s, seq_len_kv=s)
    density = flops_fraction(s, h, grid or (s,), options["segment_lengths"],
                             options["dilation_rates"], grid is not None)
    kw = dict(backend="dilated", token_layout=layout,
              inner="sdpa_cudnn" if device == "cuda" else "auto", **options)
    if device != "cuda":
        kw["compile"] = False  # no compiled merge on CPU
    return kw, density, layout


def _block_sparse_case(config: dict, device: str, q, k, v) -> tuple[dict, float]:
    kw = dict(backend="block_sparse", token_layout=config["layout"], **config["options"])
    ex = attnpatch.explain(q, k, v, layout="bshd", **kw)
    density = attnpatch.registry.get_backend("block_sparse").density(ex.call)
    if device != "cuda":
        kw["kernel"] = "mask"  # Flex is compiled on CUDA only; the mask path runs anywhere
    return kw, density


def _row(name: str, variant: str, shape, skipped=None, **metrics) -> dict:
    return {"suite": "sparse", "name": name, "variant": variant, "shape": shape,
            "metrics": metrics, "skipped": skipped}


def _backend_kwargs(strategy: str, options: dict, device: str) -> dict:
    """``attnpatch.patch`` / ``attention`` keyword arguments of a sparse config on ``device``."""
    kw = dict(backend=strategy, **options)
    if strategy == "dilated":
        kw["inner"] = "sdpa_cudnn" if device == "cuda" else "auto"
        if device != "cuda":
            kw["compile"] = False  # no compiled merge on CPU
    elif strategy == "block_sparse" and device != "cuda":
        kw["kernel"] = "mask"  # Flex is compiled on CUDA only; the mask path runs anywhere
    return kw


def sparse_suite(device: str, quick: bool, timing: dict, progress: Callable,
                 settings: Any = None) -> list[dict]:
    """Rows of the sparse suite: the attention-call sweep (:func:`kernel_rows`), the
    model-output rows (:func:`model_rows`) and, with ``settings.model``, the image rows
    (:func:`image_rows`: PSNR and SSIM of generated images against the dense one)."""
    rows = kernel_rows(device, quick, timing, progress, settings)
    rows += model_rows(device, quick, timing, progress, settings)
    if getattr(settings, "model", None) is not None:
        rows += image_rows(settings, device, quick, progress)
    else:
        rows.append(_row("image PSNR/SSIM", "*", None,
                         "needs --model PATH: a local diffusers pipeline with real weights "
                         "(random weights make noise images, so PSNR/SSIM would say nothing)"))
    return rows


def kernel_rows(device: str, quick: bool, timing: dict, progress: Callable,
                settings: Any = None) -> list[dict]:
    """Per shape and sparse config, one attention call: dense (cuDNN on CUDA; measured once
    per shape, in the same run) and the sparse strategy, forward time (median and spread),
    density (the fraction of query-key pairs computed), speed-up over dense and the relative
    error of the call's output against dense attention on the same inputs."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dense_name = "sdpa_cudnn" if device == "cuda" else "sdpa"
    tiny = quick or device != "cuda"  # the full shapes take minutes per call on a CPU
    cases = [("dilated", label, cfg) for label, cfg in
             (DILATED_SWEEP_QUICK if tiny else DILATED_SWEEP_FULL).items()]
    cases += [("block_sparse", label, cfg) for label, cfg in
              (BLOCK_SPARSE_SWEEP_QUICK if tiny else BLOCK_SPARSE_SWEEP_FULL).items()]
    cases.sort(key=lambda c: tuple(c[2]["shape"]))  # one shape's inputs and dense at a time
    rows = []
    if tiny and not quick:  # said, not hidden
        rows += [_row(f"{strategy} {label}", strategy, list(cfg["shape"]),
                      "the full shapes need a CUDA device (run with --device cuda on a GPU)")
                 for strategy, sweep in (("dilated", DILATED_SWEEP_FULL),
                                         ("block_sparse", BLOCK_SPARSE_SWEEP_FULL))
                 for label, cfg in sweep.items()]
    bar = progress(total=len(cases), desc="sparse attention calls")
    current = None  # (shape, q, k, v, dense output, dense timing)
    for strategy, label, config in cases:
        b, h, s, d = config["shape"]
        row = _row(f"{strategy} {label}", strategy, [b, h, s, d])
        bar.set_postfix_str(row["name"])
        if over(settings):
            row["skipped"] = over(settings)
            rows.append(row)
            bar.update(1)
            continue
        try:
            if current is None or current[0] != config["shape"]:
                current = None
                if device == "cuda":
                    torch.cuda.empty_cache()
                gen = torch.Generator(device=device).manual_seed(0)
                q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype, generator=gen)
                           for _ in range(3))
                with torch.no_grad():
                    dense = attnpatch.attention(q, k, v, layout="bshd", backend=dense_name)
                    dense_t = timer_stats(lambda: attnpatch.attention(
                        q, k, v, layout="bshd", backend=dense_name), device, **timing)
                current = (config["shape"], q, k, v, dense, dense_t)
            _, q, k, v, dense, dense_t = current
            if strategy == "dilated":
                kw, density, _ = _dilated_case(config, device, quick)
            else:
                kw, density = _block_sparse_case(config, device, q, k, v)
            row["options"] = {n: x for n, x in config["options"].items()}
            with torch.no_grad():
                out = attnpatch.attention(q, k, v, layout="bshd", **kw)
                sparse_t = timer_stats(lambda: attnpatch.attention(q, k, v, layout="bshd", **kw),
                                       device, **timing)
            m = row["metrics"]
            m["density"] = density
            m["dense_backend"] = dense_name
            m.update({f"dense_fwd_{key}": val for key, val in dense_t.items()})
            m.update({f"fwd_{key}": val for key, val in sparse_t.items()})
            m["speedup"] = dense_t["median_ms"] / sparse_t["median_ms"]
            m["ideal_speedup"] = 1 / density if density > 0 else math.inf
            m["rel_err_vs_dense"] = rel(out, dense)
            out = None
        except Exception as exc:  # report it, keep measuring the others
            log.warning("sparse %s %s: %s", strategy, label, exc)
            row["skipped"] = _error(exc)
        rows.append(row)
        bar.update(1)
    current = None
    bar.close()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def model_rows(device: str, quick: bool, timing: dict, progress: Callable,
               settings: Any = None) -> list[dict]:
    """One Flux transformer forward (full size at 2048² on CUDA, tiny with ``quick`` or on a
    CPU; random weights) unpatched, patched with ``sdpa`` (the time reference) and patched
    with each sparse config of :data:`MODEL_FULL` / :data:`MODEL_QUICK` (every attention
    layer): the output's relative error against the unpatched forward, the time and the
    speed-up over patched ``sdpa``, the density the strategy reports, and per layer the
    relative error of each attention call's output against dense attention on the same call
    (``layer_rel_err``, in call order, with its median and maximum; one more forward through
    :func:`attnpatch._bench.layer_error.layer_errors`)."""
    from . import models
    from .layer_error import layer_errors

    tiny = quick or device != "cuda"
    spec = MODEL_QUICK if tiny else MODEL_FULL
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    (gh, gw), text = spec["grid"], spec["text"]
    name = f"flux transformer {gh * 16}²{' (tiny)' if tiny else ''}"
    shape = f"FluxTransformer2DModel, {text} text + {gh}x{gw} image tokens, {str(dtype)[6:]}"
    variants = {"sdpa": ("sdpa", {})}
    variants.update({label: ("dilated" if "segment_lengths" in opts else "block_sparse", opts)
                     for label, opts in spec["configs"].items()})
    rows: list[dict] = []
    bar = progress(total=len(variants) + 1, desc="sparse model output")
    bar.set_postfix_str(f"building {name}")
    if over(settings):
        bar.close()
        return [_row(f"{name}: output", label, shape, over(settings)) for label in variants]
    try:
        model = models.flux_net(tiny, device, dtype)
        kwargs = models.flux_kwargs(model.config, gh, gw, text, device, dtype)
        with torch.no_grad():
            reference = model(**kwargs)[0]
    except Exception as exc:
        log.warning("sparse model rows: %s", exc)
        bar.close()
        return [_row(f"{name}: output", label, shape, f"could not run the model: {_error(exc)}")
                for label in variants]
    bar.update(1)
    timed: dict[str, tuple] = {}
    by_label: dict[str, dict] = {}
    for label, (strategy, opts) in variants.items():
        row = _row(f"{name}: output", strategy if strategy != "sdpa" else "dense sdpa", shape)
        row["metrics"]["config"] = label
        if opts:
            row["options"] = dict(opts)
        bar.set_postfix_str(label)
        if over(settings):
            row["skipped"] = over(settings)
            rows.append(row)
            bar.update(1)
            continue
        try:
            kw = _backend_kwargs(strategy, opts, device)
            with torch.no_grad(), attnpatch.patch(model, **kw) as handle:
                out = model(**kwargs)[0]
                report = handle.report()
            m = row["metrics"]
            m["rel_err_vs_unpatched"] = rel(out, reference)
            m["routed_modules"] = len(report.routed)
            densities = [float(x) for r in report for note in r.notes
                         for x in _DENSITY.findall(note)]
            if densities:  # block_sparse reports each layer's plan density
                m["density"] = sum(densities) / len(densities)
            elif strategy == "dilated":  # of the image-image pairs, from the definition
                heads = model.config.num_attention_heads
                m["density"] = flops_fraction(gh * gw, heads, (gh * gw,),
                                              opts["segment_lengths"], opts["dilation_rates"],
                                              False)
            timed[label] = (lambda kw=kw: attnpatch.patch(model, **kw), lambda: model(**kwargs))
            if strategy != "sdpa":
                # per layer: each attention call's sparse output against dense attention on
                # the same call (the inputs are the sparse forward's activations)
                inner = {k: v for k, v in kw.items() if k != "backend"}
                with torch.no_grad(), layer_errors(model, strategy, inner) as errors:
                    model(**kwargs)
                if errors:
                    m["layer_rel_err"] = errors
                    m["layer_rel_err_median"] = statistics.median(errors)
                    m["layer_rel_err_max"] = max(errors)
            out = None
        except Exception as exc:  # report it, keep measuring the others
            log.warning("sparse model %s: %s", label, exc)
            row["skipped"] = _error(exc)
        rows.append(row)
        by_label[label] = row
        bar.update(1)
    # every config's forward in alternating rounds: drift lands on all alike
    rounds_into_rows(timed, by_label, device, timing, settings)
    for label, row in by_label.items():  # speed-up: the median of the per-round ratios to sdpa
        paired = row["metrics"].get("fwd_paired_vs_first_median")
        if label != "sdpa" and paired and "sdpa" in timed:
            row["metrics"]["speedup"] = 1.0 / paired
    bar.close()
    model = kwargs = reference = None
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def image_configs(grid: tuple[int, int]) -> dict[str, tuple[str, dict]]:
    """Sparse configs for images whose denoiser sees a ``grid`` (rows, cols) of image tokens:
    ``block_sparse`` tile2d with tiles of 1/8 of each side (at least 1 token) and windows of 3
    and 5 tiles, and ``dilated`` over segments of 1/8, 1/4, 1/2 and all the image tokens with
    rates 1, 2, 4, 8."""
    gh, gw = grid
    tile = (max(1, gh // 8), max(1, gw // 8))
    n = gh * gw
    segments = tuple(max(1, n // f) for f in (8, 4, 2, 1))
    configs = {
        f"block_sparse tile2d {tile[0]}x{tile[1]} window {w}x{w}":
            ("block_sparse", dict(pattern="tile2d", tile=tile, window=(w, w)))
        for w in (3, 5)}
    configs[f"dilated {segments} x (1, 2, 4, 8)"] = (
        "dilated", dict(segment_lengths=segments, dilation_rates=(1, 2, 4, 8)))
    return configs


def image_rows(settings: Any, device: str, quick: bool, progress: Callable) -> list[dict]:
    """With ``--model PATH``: one image (``settings.prompt``, ``steps``, ``height`` x
    ``width``, generator seeded with ``seed``) from the unpatched pipeline and one per sparse
    config of :func:`image_configs` (every attention layer patched), each with its PSNR and SSIM
    against the unpatched (dense) image and its generation time. Raises
    :class:`attnpatch._bench.models.ModelPathError` when the pipeline cannot be loaded."""
    from . import image as I
    from .models import ModelPathError

    path = settings.model
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    try:
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    except Exception as exc:
        raise ModelPathError(f"--model {path!r}: could not load a diffusers pipeline: "
                             f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    scale = getattr(pipe, "vae_scale_factor", 8)
    default = getattr(pipe, "default_sample_size", None) or getattr(
        getattr(denoiser, "config", None), "sample_size", 128)
    height = settings.height or default * scale
    width = settings.width or default * scale
    grid = (height // (scale * 2), width // (scale * 2))  # 2x2 patches / packing
    name = f"image {height}x{width}, {settings.steps} steps"
    shape = f"{type(pipe).__name__} ({type(denoiser).__name__}), {str(dtype)[6:]}, seed " \
            f"{settings.seed}"

    def generate():
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            images = pipe(settings.prompt, num_inference_steps=settings.steps, height=height,
                          width=width, output_type="pt",
                          generator=torch.Generator(device=device).manual_seed(settings.seed)
                          ).images
        if device == "cuda":
            torch.cuda.synchronize()
        return images[:1].float().clamp(0, 1).cpu(), (time.perf_counter() - start) * 1e3

    configs = image_configs(grid)
    bar = progress(total=len(configs) + 1, desc="sparse images")
    bar.set_postfix_str("dense")
    rows = []
    try:
        generate()  # warm-up: first-call work (CUDA, kernels, the VAE) is not timed
        dense, dense_ms = generate()
    except Exception as exc:
        bar.close()
        return [_row(name, "unpatched", shape, f"the unpatched pipeline failed: {_error(exc)}")]
    rows.append(_row(name, "unpatched", shape, None, generate_ms=dense_ms,
                     prompt=settings.prompt))
    bar.update(1)
    for label, (strategy, opts) in configs.items():
        row = _row(name, strategy, shape, None, config=label)
        row["options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}
        bar.set_postfix_str(label)
        if over(settings):
            row["skipped"] = over(settings)
            rows.append(row)
            bar.update(1)
            continue
        try:
            with attnpatch.patch(pipe, **_backend_kwargs(strategy, opts, device)) as handle:
                generate()  # warm-up: plans, block lists and kernel compiles are not timed
                image, ms = generate()
                report = handle.report()
            m = row["metrics"]
            m["generate_ms"] = ms
            m["speedup"] = dense_ms / ms
            m["psnr_db"] = I.psnr(image, dense)
            m["ssim"] = I.ssim(image, dense)
            m["identical_to_dense"] = bool(torch.equal(image, dense))
            m["routed_modules"] = len(report.routed)
        except Exception as exc:  # report it, keep measuring the others
            log.warning("sparse image %s: %s", label, exc)
            row["skipped"] = _error(exc)
        rows.append(row)
        bar.update(1)
    bar.close()
    pipe = None
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows
