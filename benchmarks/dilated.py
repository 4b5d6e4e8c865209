"""Dilated attention (LongNet, issue 13) against dense attention, same process, same inputs.

Run on a CUDA machine (one command, several minutes on an H200):

    python benchmarks/dilated.py --out benchmarks/results/dilated_h200.json

(or in parts: ``--shapes flux_2048`` then ``--shapes wan_720p,wan_720p_grid --no-transformer``).

For each shape (Flux 2048² (1, 24, 16896, 128) with segments (2048, 4096, 8192, 16896) and
rates (1, 2, 4, 8), as in the issue; Wan 720p (1, 40, 75600, 128) with a ~20% pattern set along
the sequence and one on its 21x45x80 latent grid), bf16, inputs in (B, S, H, D) memory as
diffusers passes them: dense cuDNN SDPA, dense flash4 when installed, and every dilated variant,
forward and forward + backward, timed with CUDA events (warm-up, median of repeated runs). Each
row gives the time, the ratio to dense in the same run, the issue's target (1.5 x the FLOPs
fraction), the relative error against dense attention (the approximation) and against the
dilated function computed in fp32 (correctness). Then one forward of a full-size Flux
transformer (random weights) at 2048², ``sdpa`` against ``dilated`` on its attention
(``--no-transformer`` skips it).

``--quick`` runs tiny shapes and a tiny Flux transformer (CPU works: fp32, ``sdpa`` for dense,
no compiled merge).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import torch
import torch._dynamo

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout this script is in, not another install
import attnpatch  # noqa: E402
from benchmarks._timing import (PIPELINED, available, flux_inputs,  # noqa: E402
                                patched_forwards, pipelined_timer, rel, timer)
from attnpatch import TokenLayout  # noqa: E402

# the shapes, patterns and FLOPs count live in the package, shared with `attnpatch bench`
from attnpatch._bench.sparse import DILATED_FULL as FULL  # noqa: E402
from attnpatch._bench.sparse import DILATED_QUICK as QUICK  # noqa: E402
from attnpatch._bench.sparse import flops_fraction  # noqa: E402


def plain_dilated(q, k, v, segments, rates, inner):
    """The plain approach the issue measured at 1.16x (1-D patterns): per pattern and head
    offset, gather the kept positions (full segments folded into the batch, then the ragged
    last one), one inner call with lse, scatter into full-size out and lse, then merge by lse.
    ``q``/``k``/``v`` (B, S, H, D)."""
    b, s, h, d = q.shape
    outs, lses = [], []
    for w, r in zip(segments, rates):
        out = q.new_zeros(b, s, h, d)
        lse = torch.full((b, h, s), float("-inf"), device=q.device)
        for o in range(min(r, h)):
            heads = torch.arange(o, h, r, device=q.device)
            full, tail = divmod(s, w)
            groups = []
            if full:
                pos = (torch.arange(full, device=q.device)[:, None] * w
                       + torch.arange(o, w, r, device=q.device)[None, :])
                groups.append(pos)
            if tail > o:
                groups.append(torch.arange(full * w + o, s, r, device=q.device)[None, :])
            for pos in groups:
                n, c = pos.shape
                take = lambda t: t[:, pos][:, :, :, heads].flatten(0, 1)  # (B·n, c, Hg, D)
                o_, l_ = attnpatch.attention(take(q), take(k), take(v), backend=inner,
                                             layout="bshd", return_lse=True)
                out = out.index_put((torch.arange(b, device=q.device)[:, None, None, None],
                                     pos[None, :, :, None], heads[None, None, None, :]),
                                    o_.unflatten(0, (b, n)))
                lse = lse.index_put((torch.arange(b, device=q.device)[:, None, None, None],
                                     heads[None, None, None, :], pos[None, :, :, None]),
                                    l_.unflatten(0, (b, n)).transpose(2, 3))
        outs.append(out)
        lses.append(lse)
    total = torch.logsumexp(torch.stack(lses), dim=0)
    merged = sum(torch.exp(l - total.nan_to_num(neginf=0.0)).transpose(1, 2)[..., None]
                 * o.float() for o, l in zip(outs, lses))
    return merged.to(q.dtype)


def bench_shape(label, config, device, dtype, budget_s, quick, skip=()):
    b, h, s, d = config["shape"]
    grid = config.get("grid")
    options = config["options"]
    layout = None if grid is None else TokenLayout(0, "none", *grid, seq_len_q=s, seq_len_kv=s)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype, generator=gen)
               for _ in range(3))
    grad = torch.randn(b, s, h, d, device=device, dtype=dtype, generator=gen)
    dense_name = "sdpa_cudnn" if device == "cuda" else "sdpa"
    inner = "sdpa_cudnn" if device == "cuda" else "auto"
    fraction = flops_fraction(s, h, grid or (s,), options["segment_lengths"],
                              options["dilation_rates"], grid is not None)
    variants = [(f"dense {dense_name}", 1.0, dict(backend=dense_name))]
    if available("flash4"):
        variants.append(("dense flash4", 1.0, dict(backend="flash4")))
    dil = dict(backend="dilated", token_layout=layout, **options)
    fused = device == "cuda" or not quick
    variants += [(f"dilated eager merge, inner={inner}", fraction,
                  dict(dil, inner=inner, compile=False, cuda_graph=False))]
    if device == "cuda":
        variants += [(f"dilated fused merge + CUDA graph, inner={inner}", fraction,
                      dict(dil, inner=inner, compile=True, cuda_graph=True))]
    if fused:
        variants += [(f"dilated fused merge, inner={inner}", fraction,
                      dict(dil, inner=inner, compile=True, cuda_graph=False)),
                     ("dilated fused merge, inner=auto", fraction,
                      dict(dil, compile=True, cuda_graph=False))]
        if available("flash4"):
            variants.append(("dilated fused merge + CUDA graph, inner=flash4", fraction,
                             dict(dil, inner="flash4", compile=True, cuda_graph=True)))
        variants.append(("dilated under torch.compile", fraction, dict(dil, inner=inner,
                                                                        traced=True)))
    if grid is None:
        variants.append((f"plain gather/scatter/merge, inner={inner}", fraction,
                         dict(plain=True)))

    variants = [v for v in variants if not any(word in v[0] for word in skip)]
    # references: dense attention (the approximation), and the dilated function in fp32
    dense = attnpatch.attention(q, k, v, layout="bshd", backend=dense_name)
    exact_inner = "sdpa_efficient" if device == "cuda" else "math"
    exact = attnpatch.attention(q.float(), k.float(), v.float(), layout="bshd", inner=exact_inner,
                                compile=False, **{n: x for n, x in dil.items()})
    explained = attnpatch.explain(q, k, v, layout="bshd", **dil)
    summary = attnpatch.registry.get_backend("dilated").report_note(explained.call)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    rows = []
    for name, frac, kw in variants:
        row = {"shape": label, "B,H,S,D": [b, h, s, d], "grid": grid, "variant": name,
               "flops_fraction": frac, "options": {n: x for n, x in options.items()},
               "plan": summary if frac < 1 else None}
        kw = dict(kw)
        traced, plain = kw.pop("traced", False), kw.pop("plain", False)
        if plain:
            def call(q_, k_, v_):
                return plain_dilated(q_, k_, v_, options["segment_lengths"],
                                     options["dilation_rates"], inner)
        else:
            def call(q_, k_, v_, kw=kw):
                return attnpatch.attention(q_, k_, v_, layout="bshd", **kw)
        if traced:
            torch._dynamo.reset()
            call = torch.compile(call)
        try:
            with torch.no_grad():
                for _ in range(3):  # a graph variant: the third call replays the graph
                    out = call(q, k, v)
                row["rel_err_vs_dense"] = rel(out, dense)
                row["rel_err_vs_fp32_dilated"] = rel(out, exact)
                del out
                row["fwd_ms"] = timer(lambda: call(q, k, v), device, budget_s)
                if device == "cuda":
                    row["fwd_ms_pipelined"] = pipelined_timer(lambda: call(q, k, v), PIPELINED,
                                                              device, budget_s)

            def step():
                out = call(*leaves)
                torch.autograd.grad(out, leaves, grad)
            row["fwd_bwd_ms"] = timer(step, device, budget_s)
            if device == "cuda":
                row["fwd_bwd_ms_pipelined"] = pipelined_timer(step, PIPELINED, device, budget_s)
        except Exception as exc:  # report it, keep measuring the others
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        rows.append(row)
        print(_line(row, rows[0]), file=sys.stderr, flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    base = rows[0]
    for row in rows:
        for key in ("fwd_ms", "fwd_bwd_ms", "fwd_ms_pipelined", "fwd_bwd_ms_pipelined"):
            if key in row and key in base:
                row[f"{key}_vs_dense"] = row[key] / base[key]
        if row["flops_fraction"] < 1:
            row["target_vs_dense"] = 1.5 * row["flops_fraction"]
            row["fwd_target_met"] = row.get("fwd_ms_vs_dense", math.inf) <= row["target_vs_dense"]
            row["fwd_bwd_target_met"] = (row.get("fwd_bwd_ms_vs_dense", math.inf)
                                         <= row["target_vs_dense"])
            for key in ("fwd_ms_pipelined", "fwd_bwd_ms_pipelined"):
                if f"{key}_vs_dense" in row:
                    row[f"{key.removesuffix('_ms_pipelined')}_pipelined_target_met"] = (
                        row[f"{key}_vs_dense"] <= row["target_vs_dense"])
    return rows


def _line(row, base) -> str:
    if "error" in row:
        return f"{row['shape']:14s} {row['variant']:44s} ERROR {row['error']}"
    fwd, both = row.get("fwd_ms", math.nan), row.get("fwd_bwd_ms", math.nan)
    return (f"{row['shape']:14s} {row['variant']:44s} {row['flops_fraction']:6.3f} "
            f"{fwd:9.3f} {fwd / base.get('fwd_ms', math.nan):6.3f}x {both:9.3f} "
            f"{both / base.get('fwd_bwd_ms', math.nan):6.3f}x "
            f"{row.get('rel_err_vs_dense', math.nan):9.2e} "
            f"{row.get('rel_err_vs_fp32_dilated', math.nan):9.2e} "
            f"{row.get('fwd_ms_pipelined', math.nan):9.3f} "
            f"{row.get('fwd_bwd_ms_pipelined', math.nan):9.3f}")


FLUX_CONFIGS = {
    # FLUX.1-dev's transformer at 2048² (128 x 128 latent tokens, 512 text tokens)
    "full": dict(config=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                             attention_head_dim=128, num_attention_heads=24,
                             joint_attention_dim=4096, pooled_projection_dim=768,
                             guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
                 grid=(128, 128), text=512,
                 patterns=dict(segment_lengths=(2048, 4096, 8192, 16384),
                               dilation_rates=(1, 2, 4, 8))),
    "tiny": dict(config=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                             attention_head_dim=16, num_attention_heads=2,
                             joint_attention_dim=32, pooled_projection_dim=16,
                             guidance_embeds=True, axes_dims_rope=(4, 4, 8)),
                 grid=(8, 8), text=7,
                 patterns=dict(segment_lengths=(8, 16, 32, 64), dilation_rates=(1, 2, 4, 8))),
}


def flux_transformer(size, device, dtype, budget_s, inner):
    """One forward of a Flux transformer (random weights) on its own attention: ``sdpa``
    against ``dilated`` (joint attention, text first: the text stays dense, the patterns run on
    the image tokens), with the output's relative error against dense and the report's notes."""
    from diffusers import FluxTransformer2DModel
    spec = FLUX_CONFIGS[size]
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(**spec["config"])
    model = model.to(dtype).eval()
    rows, cols = spec["grid"]
    text, config = spec["text"], spec["config"]
    kw = flux_inputs(config, rows, cols, text, device, dtype)
    result = {"model": f"FluxTransformer2DModel ({size}, random weights)",
              "tokens": f"{text} text + {rows * cols} image", "patterns": spec["patterns"],
              "inner": inner}
    result.update(patched_forwards(model, kw, {
        "sdpa": dict(backend="sdpa"),
        "dilated": dict(backend="dilated", inner=inner, **spec["patterns"]),
        "dilated, CUDA graph": dict(backend="dilated", inner=inner, cuda_graph=True,
                                    **spec["patterns"])}, device, budget_s))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU works)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed runs per measurement (default 1, quick 0.2)")
    parser.add_argument("--skip", default="",
                        help="comma-separated words: skip the variants whose name contains one "
                             "(e.g. 'plain,torch.compile' on the long Wan shapes)")
    parser.add_argument("--no-transformer", action="store_true",
                        help="skip the full-size Flux transformer forward")
    parser.add_argument("--no-kernels", action="store_true",
                        help="skip the attention-shape rows (the transformer only)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated subset of the shapes (default: all)")
    args = parser.parse_args(argv)
    quick = args.quick
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    budget = args.budget if args.budget is not None else (0.2 if quick else 1.0)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
              "layout": "(B, S, H, D) memory, layout='bshd'", "rows": []}
    print(f"{'shape':14s} {'variant':44s} {'FLOPs':>6s} {'fwd ms':>9s} {'/dense':>7s} "
          f"{'fwd+bwd':>9s} {'/dense':>7s} {'err/dense':>9s} {'err/fp32':>9s} "
          f"{'fwd pipe':>9s} {'both pipe':>9s}",
          file=sys.stderr)
    configs = QUICK if quick else FULL
    chosen = args.shapes.split(",") if args.shapes else list(configs)
    unknown = sorted(set(chosen) - set(configs))
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {sorted(configs)}")
    for label in [] if args.no_kernels else chosen:
        result["rows"] += bench_shape(label, configs[label], args.device, dtype, budget, quick,
                                      [w for w in args.skip.split(",") if w])
    if not args.no_transformer:
        inner = "sdpa_cudnn" if args.device == "cuda" else "auto"
        try:
            result["flux_transformer"] = flux_transformer("tiny" if quick else "full",
                                                          args.device, dtype, budget, inner)
        except Exception as exc:  # report it
            result["flux_transformer"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    print("\ntargets (time / dense <= 1.5 x FLOPs fraction):")
    for row in result["rows"]:
        if "target_vs_dense" in row and "error" not in row:
            print(f"  {row['shape']:14s} {row['variant']:44s} target {row['target_vs_dense']:.3f}:"
                  f" fwd {row.get('fwd_ms_vs_dense', math.nan):.3f} "
                  f"({'met' if row['fwd_target_met'] else 'missed'}), fwd+bwd "
                  f"{row.get('fwd_bwd_ms_vs_dense', math.nan):.3f} "
                  f"({'met' if row['fwd_bwd_target_met'] else 'missed'}); pipelined fwd "
                  f"{row.get('fwd_ms_pipelined_vs_dense', math.nan):.3f}, fwd+bwd "
                  f"{row.get('fwd_bwd_ms_pipelined_vs_dense', math.nan):.3f}")
    if "flux_transformer" in result:
        print(f"  flux transformer: {json.dumps(result['flux_transformer'])}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
