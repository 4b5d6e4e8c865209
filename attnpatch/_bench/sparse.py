"""Sparse-attention shapes and patterns (``dilated``, ``block_sparse``), shared by
``attnpatch bench --suite sparse`` and ``benchmarks/dilated.py`` / ``benchmarks/block_sparse.py``,
and the sparse suite itself: speed against density, with the error against dense attention."""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch

import attnpatch
from attnpatch import TokenLayout

from .timing import rel, timer_stats

log = logging.getLogger(__name__)

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


BLOCK_SPARSE_FULL = {
    "flux_2048_7x5": dict(shape=(1, 24, 16896, 128), layout=TokenLayout(512, "first", 1, 128, 128),
                          options=dict(pattern="tile2d", tile=(8, 16), window=(7, 5))),
    "flux_2048_5x3": dict(shape=(1, 24, 16896, 128), layout=TokenLayout(512, "first", 1, 128, 128),
                          options=dict(pattern="tile2d", tile=(8, 16), window=(5, 3))),
    "wan_18x48x80": dict(shape=(1, 40, 69120, 128), layout=TokenLayout(0, "none", 18, 48, 80),
                         options=dict(pattern="tile3d", tile=(6, 8, 8), window=(3, 3, 3))),
}
BLOCK_SPARSE_QUICK = {
    "flux_tiny": dict(shape=(1, 2, 528, 32), layout=TokenLayout(16, "first", 1, 16, 32),
                      options=dict(pattern="tile2d", tile=(4, 8), window=(3, 3))),
    "wan_tiny": dict(shape=(1, 2, 384, 32), layout=TokenLayout(0, "none", 3, 8, 16),
                     options=dict(pattern="tile3d", tile=(1, 2, 4), window=(1, 3, 3))),
}


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


def sparse_suite(device: str, quick: bool, timing: dict, progress: Callable) -> list[dict]:
    """Rows of the sparse suite: per shape, dense attention and the sparse strategy, forward
    time (median and spread), density (the fraction of query-key pairs computed), speed-up over
    dense and the relative error against dense."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dense_name = "sdpa_cudnn" if device == "cuda" else "sdpa"
    cases = [("dilated", label, cfg) for label, cfg in
             (DILATED_QUICK if quick else DILATED_FULL).items()]
    cases += [("block_sparse", label, cfg) for label, cfg in
              (BLOCK_SPARSE_QUICK if quick else BLOCK_SPARSE_FULL).items()]
    rows = []
    bar = progress(total=len(cases), desc="sparse")
    for strategy, label, config in cases:
        b, h, s, d = config["shape"]
        row = {"suite": "sparse", "name": f"{strategy} {label}", "variant": strategy,
               "shape": [b, h, s, d], "metrics": {}, "skipped": None}
        try:
            gen = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype, generator=gen)
                       for _ in range(3))
            if strategy == "dilated":
                kw, density, _ = _dilated_case(config, device, quick)
            else:
                kw, density = _block_sparse_case(config, device, q, k, v)
            row["options"] = {n: x for n, x in config["options"].items()}
            with torch.no_grad():
                dense = attnpatch.attention(q, k, v, layout="bshd", backend=dense_name)
                out = attnpatch.attention(q, k, v, layout="bshd", **kw)
                dense_t = timer_stats(lambda: attnpatch.attention(q, k, v, layout="bshd",
                                                                  backend=dense_name),
                                      device, **timing)
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
        except Exception as exc:  # report it, keep measuring the others
            log.warning("sparse %s %s: %s", strategy, label, exc)
            row["skipped"] = _error(exc)
        rows.append(row)
        bar.update(1)
        if device == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return rows
