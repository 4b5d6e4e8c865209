"""Block-sparse attention (issue 19) against dense attention, same process, same inputs.

Run on a CUDA machine (one command; flash-attn-4 and diffusers installed for every row):

    python benchmarks/block_sparse.py --out benchmarks/results/block_sparse_h200.json

Kernel rows, bf16, inputs in (B, S, H, D) memory as diffusers passes them:

- Flux 2048² (1, 24, 16896, 128): 512 text tokens first (global), image grid 128x128 cut into
  tiles of 8x16 tokens, ``tile2d`` window 7x5 tiles (density 0.317) and 5x3 (0.170);
- Wan-like (1, 40, 69120, 128), grid 18x48x80, ``tile3d`` STA window 3x3x3 tiles of 6x8x8
  (0.150).

For each: dense cuDNN SDPA, dense flash4, ``block_sparse`` through ``attnpatch.attention`` with
``kernel="flex"`` (compiled), ``"flash4"`` and ``"auto"`` (every permute, list lookup and launch
included), and FlashAttention-4 called directly on the same block lists with the tokens already
in tile order (the kernel alone). Forward and forward + backward, CUDA events after warm-up,
median: each call timed alone (synchronized, so the host's time before its first launch
counts), "pipelined" (``--pipelined`` calls back to back per time, as in a model, where the
host runs ahead of the GPU), and every variant again in alternating rounds (speed-ups as the
median of paired per-round ratios to dense). Errors: against dense attention (the
approximation) and against fp32 attention under the layout's element mask on sampled query
rows (correctness). Then, unless
``--no-transformer``: one forward of a full-size Flux transformer at 2048² (random weights,
``tile2d`` 7x5 on all but the first and last two double blocks and the last two single blocks)
and of a Wan 14B-width transformer (2 layers, 720p, 81 frames: 21x45x80 = 75600 tokens,
``tile3d``) against ``sdpa``, with the output's relative error and the reports' notes.

``--quick``: tiny shapes and tiny transformers (CPU works: fp32, the mask and Flex paths).
The table is printed last; ``--out`` writes every number as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import pathlib
import statistics
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout this script is in, not another install
import attnpatch  # noqa: E402
from benchmarks._timing import (PIPELINED, alternating_rounds, available,  # noqa: E402
                                flux_inputs, patched_forwards, pipelined_timer, rel, timer)
from attnpatch.strategies import block_sparse as BSP  # noqa: E402

# the shapes and patterns live in the package, shared with `attnpatch bench`
from attnpatch._bench.sparse import BLOCK_SPARSE_FULL as FULL  # noqa: E402
from attnpatch._bench.sparse import BLOCK_SPARSE_QUICK as QUICK  # noqa: E402


def plan_of(q, k, v, options, layout):
    """The strategy's plan (groups, kernel) for this call, as ``attention`` builds it."""
    ex = attnpatch.explain(q, k, v, layout="bshd", backend="block_sparse", token_layout=layout,
                           **options)
    return BSP._plan(ex.call, ex.call.options)


def masked_rows_reference(q, k, v, plan, rows: torch.Tensor) -> torch.Tensor:
    """fp32 attention of the query ``rows`` (call order) under the layout's element mask:
    (B, R, H, D). ``q``/``k``/``v`` (B, S, H, D)."""
    groups = plan.groups
    gq, gk = groups.group_ids("q", True), groups.group_ids("k", True)
    mask = groups.allow[:, :, gq[rows][:, None], gk[None, :]]  # (1, Hl, R, S)
    qf = q[:, rows].float().transpose(1, 2)
    kf, vf = k.float().transpose(1, 2), v.float().transpose(1, 2)
    scores = (qf @ kf.transpose(-2, -1)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ vf).transpose(1, 2)


def direct_flash4(plan, q, k, v):
    """FlashAttention-4 on the plan's full-block lists, tokens already in tile order: returns
    ``fn(q_tiled, k_tiled, v_tiled)`` and the permuted inputs (the kernel alone)."""
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    full, partial = plan.groups.kernel_blocks(BSP.KERNEL_BLOCK, BSP.KERNEL_BLOCK)
    assert not bool(partial.any()), "the direct call passes every kept block as full"

    def lists(blocks):
        count = blocks.sum(-1, dtype=torch.int32)
        idx = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
        idx = idx[..., :int(count.max())].contiguous()
        return BlockSparseTensorsTorch(
            mask_block_cnt=torch.zeros_like(count), mask_block_idx=torch.zeros_like(idx[..., :1]),
            full_block_cnt=count, full_block_idx=idx,
            block_size=(BSP.KERNEL_BLOCK, BSP.KERNEL_BLOCK))
    fwd, bwd = lists(full), lists(full.transpose(-2, -1))
    perm = plan.groups.perm
    tiled = [t if perm is None else t.index_select(1, perm) for t in (q, k, v)]

    def fn(q_, k_, v_):
        return flash_attn_func(q_, k_, v_, block_sparse_tensors=fwd,
                               block_sparse_tensors_bwd=bwd)[0]
    return fn, tiled, perm


def direct_flex(plan, q, k, v):
    """Plain FlexAttention (compiled ``flex_attention`` on a ``BlockMask`` from the plan's
    full-block lists, no mask_mod work), tokens already in tile order: the issue's "plain Flex"
    row. Returns ``fn(q_tiled, k_tiled, v_tiled)`` ((B, S, H, D) in and out) and the inputs."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    full, partial = plan.groups.kernel_blocks(BSP.KERNEL_BLOCK, BSP.KERNEL_BLOCK)
    assert not bool(partial.any()), "the direct call passes every kept block as full"
    count = full.sum(-1, dtype=torch.int32)
    idx = torch.sort((~full).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    empty = torch.zeros_like(count)
    seq = q.shape[1]
    block_mask = BlockMask.from_kv_blocks(empty, torch.zeros_like(idx), count, idx,
                                          BLOCK_SIZE=BSP.KERNEL_BLOCK, seq_lengths=(seq, seq))
    compiled = torch.compile(flex_attention)
    perm = plan.groups.perm
    tiled = [t if perm is None else t.index_select(1, perm) for t in (q, k, v)]

    def fn(q_, k_, v_):
        out = compiled(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2),
                       block_mask=block_mask)
        return out.transpose(1, 2)
    return fn, tiled, perm


def bench_shape(label, config, device, dtype, budget_s, quick, pipelined=PIPELINED):
    b, h, s, d = config["shape"]
    layout, options = config["layout"], config["options"]
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype, generator=gen)
               for _ in range(3))
    grad = torch.randn(b, s, h, d, device=device, dtype=dtype, generator=gen)
    plan = plan_of(q, k, v, options, layout)
    density = plan.groups.density()
    full, partial = plan.groups.kernel_blocks(BSP.KERNEL_BLOCK, BSP.KERNEL_BLOCK)
    block_density = float((full | partial).float().mean())
    dense_name = "sdpa_cudnn" if device == "cuda" else "sdpa"
    sparse = dict(backend="block_sparse", token_layout=layout, **options)
    variants = [(f"dense {dense_name}", dict(backend=dense_name))]
    if device == "cuda" and available("flash4"):
        variants.append(("dense flash4", dict(backend="flash4")))
    variants.append(("block_sparse kernel=flex" + (" (compiled)" if device == "cuda" else ""),
                     dict(sparse, kernel="flex")))
    if device == "cuda":
        variants.append(("plain Flex compiled, tokens in tile order", dict(direct="flex")))
    if device == "cuda" and available("flash4"):
        variants += [("block_sparse kernel=flash4", dict(sparse, kernel="flash4")),
                     ("flash4 direct, tokens in tile order", dict(direct="flash4"))]
    if device == "cuda":
        variants.append(("block_sparse kernel=auto", sparse))
        if plan.order is not None:
            variants.append(("block_sparse auto, tokens pre-ordered", dict(sparse, pre=True)))
            # the Flex path without its per-call permute: what is left of its gap to plain Flex
            variants.append(("block_sparse kernel=flex, tokens pre-ordered",
                             dict(sparse, kernel="flex", pre=True)))
    else:
        variants.append(("block_sparse kernel=mask", dict(sparse, kernel="mask")))
        if plan.order is not None:
            variants.append(("block_sparse mask, tokens pre-ordered",
                             dict(sparse, kernel="mask", pre=True)))

    dense = attnpatch.attention(q, k, v, layout="bshd", backend=dense_name)
    count = s if quick else 512
    rows = torch.linspace(0, s - 1, count, device=device).round().long().unique()
    exact = masked_rows_reference(q, k, v, plan, rows)
    note = attnpatch.registry.get_backend("block_sparse").report_note(
        attnpatch.explain(q, k, v, layout="bshd", **sparse).call)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    reps = (1, 2) if quick else (3, 5)  # (warm-up, least timed runs)
    results = []
    # name -> fn, for the alternating rounds (they keep every variant's inputs until the shape ends)
    timed = {"fwd": {}, "fwd_bwd": {}}
    for name, kw in variants:
        row = {"shape": label, "B,H,S,D": [b, h, s, d], "grid": layout.grid,
               "text_tokens": layout.text_tokens, "variant": name,
               "options": {n: x for n, x in options.items()},
               "density": 1.0 if name.startswith("dense") else density,
               "kernel_block_density": 1.0 if name.startswith("dense") else block_density}
        kw = dict(kw)
        perm = None
        direct_kind = kw.pop("direct", None)
        if direct_kind:
            try:
                fn, tiled, perm = (direct_flash4 if direct_kind == "flash4" else direct_flex)(
                    plan, q, k, v)
            except Exception as exc:  # report it, keep measuring the others
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                results.append(row)
                continue
            inputs = tiled
            tiled_leaves = [t.detach().requires_grad_() for t in tiled]
            tiled_grad = grad if perm is None else grad.index_select(1, perm)

            def call(q_, k_, v_, fn=fn):
                return fn(q_, k_, v_)
        elif kw.pop("pre", False):  # as in a patched Flux forward (reorder="auto")
            perm = plan.groups.perm
            inputs = [t.index_select(1, perm) for t in (q, k, v)]
            tiled_leaves = [t.detach().requires_grad_() for t in inputs]
            tiled_grad = grad.index_select(1, perm)

            def call(q_, k_, v_, kw=kw):
                token = BSP._PREORDERED.set(plan.order)
                try:
                    return attnpatch.attention(q_, k_, v_, layout="bshd", **kw)
                finally:
                    BSP._PREORDERED.reset(token)
        else:
            inputs, tiled_leaves, tiled_grad = (q, k, v), leaves, grad

            def call(q_, k_, v_, kw=kw):
                return attnpatch.attention(q_, k_, v_, layout="bshd", **kw)
        try:
            with torch.no_grad():
                out = call(*inputs)
                if perm is not None:  # back to the call's order, to compare
                    inv = torch.empty_like(perm)
                    inv[perm] = torch.arange(perm.numel(), device=perm.device)
                    out = out.index_select(1, inv)
                row["rel_err_vs_dense"] = rel(out, dense)
                row["rel_err_vs_fp32_masked"] = rel(out[:, rows], exact)
                del out
                row["fwd_ms"] = timer(lambda: call(*inputs), device, budget_s, *reps)
                if device == "cuda" and pipelined:
                    row["fwd_ms_pipelined"] = pipelined_timer(
                        lambda: call(*inputs), pipelined, device, budget_s, *reps)
            # bound now: the alternating rounds call every variant after the loop
            timed["fwd"][name] = lambda call=call, inputs=inputs: call(*inputs)
            if device == "cuda" or "flex" not in name:  # Flex has no CPU backward

                def step(call=call, leaves=tiled_leaves, grad_out=tiled_grad):
                    out = call(*leaves)
                    torch.autograd.grad(out, leaves, grad_out)
                row["fwd_bwd_ms"] = timer(step, device, budget_s, *reps)
                timed["fwd_bwd"][name] = step
                if device == "cuda" and pipelined:
                    row["fwd_bwd_ms_pipelined"] = pipelined_timer(step, pipelined, device,
                                                                  budget_s, *reps)
        except Exception as exc:  # report it, keep measuring the others
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        results.append(row)
        print(_line(row, results[0]), file=sys.stderr, flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    if device == "cuda":
        _alternating(results, timed, device, budget_s, pipelined)
    base = results[0]
    for row in results:
        for key in ("fwd_ms", "fwd_bwd_ms", "fwd_ms_pipelined", "fwd_bwd_ms_pipelined"):
            if key in row and key in base:
                row[f"{key.replace('_ms', '')}_speedup_vs_dense"] = base[key] / row[key]
        row["ideal_speedup"] = 1 / row["density"]
    if plan.groups.perm is not None:  # what the per-call token reordering costs alone
        perm = plan.groups.perm
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)

        def reorder():
            for t in (q, k, v):
                t.index_select(1, perm)
            q.index_select(1, inv)
        row = {"shape": label, "variant": "token permute (q, k, v) + inverse (out)",
               "density": density, "fwd_ms": timer(reorder, device, budget_s, *reps)}
        if device == "cuda" and pipelined:
            row["fwd_ms_pipelined"] = pipelined_timer(reorder, pipelined, device, budget_s,
                                                      *reps)
        results.append(row)
    by_name = {r["variant"]: r for r in results}
    direct = by_name.get("flash4 direct, tokens in tile order")
    for name in ("block_sparse kernel=auto", "block_sparse kernel=flash4",
                 "block_sparse auto, tokens pre-ordered"):
        ours = by_name.get(name)
        if direct and ours and "fwd_ms" in direct and "fwd_ms" in ours:
            for key in ("fwd_ms", "fwd_bwd_ms", "fwd_ms_pipelined", "fwd_bwd_ms_pipelined",
                        "fwd_ms_alternating", "fwd_bwd_ms_alternating"):
                if key in direct and key in ours:
                    ours[f"{key.replace('_ms', '')}_vs_direct_flash4"] = ours[key] / direct[key]
    plain = by_name.get("plain Flex compiled, tokens in tile order")
    flex = next((r for n, r in by_name.items() if n.startswith("block_sparse kernel=flex")), None)
    if plain and flex:
        for key in ("fwd_speedup_vs_dense", "fwd_bwd_speedup_vs_dense",
                    "fwd_pipelined_speedup_vs_dense", "fwd_bwd_pipelined_speedup_vs_dense"):
            if key in plain and key in flex:
                flex[key.replace("_speedup_vs_dense", "_at_least_plain_flex")] = (
                    flex[key] >= plain[key])
    ours = by_name.get("block_sparse kernel=auto")
    reorder = by_name.get("token permute (q, k, v) + inverse (out)")
    kernel = direct or ours
    if reorder and kernel and "fwd_ms" in kernel:
        reorder["fraction_of_sparse_kernel_fwd"] = reorder["fwd_ms"] / kernel["fwd_ms"]
        if "fwd_ms_pipelined" in reorder and "fwd_ms_pipelined" in kernel:
            reorder["pipelined_fraction_of_sparse_kernel_fwd"] = (
                reorder["fwd_ms_pipelined"] / kernel["fwd_ms_pipelined"])
    results[-1]["plan_note"] = note
    return results


def _alternating(results: list, timed: dict, device: str, budget_s: float, pipelined: int):
    """Every variant that ran, timed again in alternating rounds (one time of each per round,
    the order rotating, so clock and host drift land on all alike): ``{fwd,fwd_bwd}_ms_alternating``
    (median per call; ``pipelined`` calls back to back per time, or one) and
    ``{fwd,fwd_bwd}_alternating_speedup_vs_dense``, the inverse of the median of the per-round
    ratios to the first (dense) variant."""
    rows = {row["variant"]: row for row in results}
    calls = max(1, pipelined)
    for key, fns in timed.items():
        if len(fns) < 2 or results[0]["variant"] not in fns:
            continue
        variants = {name: (contextlib.nullcontext, lambda fn=fn: [fn() for _ in range(calls)])
                    for name, fn in fns.items()}
        with torch.no_grad() if key == "fwd" else contextlib.nullcontext():
            stats = alternating_rounds(variants, device, budget_s)
        for name in fns:
            if "error" in stats[name]:
                rows[name][f"{key}_alternating_error"] = stats[name]["error"]
                continue
            rows[name][f"{key}_ms_alternating"] = stats[name]["median_ms"] / calls
            ratios = stats["paired"].get(name)
            rows[name][f"{key}_alternating_speedup_vs_dense"] = (
                1 / statistics.median(ratios) if ratios else 1.0)
        if device == "cuda":
            torch.cuda.empty_cache()


def _timing_table(rows: list, kind: str, title: str) -> None:
    """Prints the rows' ``kind`` ("pipelined" or "alternating") times and speed-ups, if any."""
    if not any(f"fwd_ms_{kind}" in row for row in rows):
        return
    print(f"\n{title}\n{'shape':14s} {'variant':40s} {'fwd ms':>9s} {'speedup':>7s} "
          f"{'fwd+bwd':>9s} {'speedup':>7s}")
    for row in rows:
        if f"fwd_ms_{kind}" in row:
            print(f"{row['shape']:14s} {row['variant']:40s} {row[f'fwd_ms_{kind}']:9.3f} "
                  f"{row.get(f'fwd_{kind}_speedup_vs_dense', math.nan):6.2f}x "
                  f"{row.get(f'fwd_bwd_ms_{kind}', math.nan):9.3f} "
                  f"{row.get(f'fwd_bwd_{kind}_speedup_vs_dense', math.nan):6.2f}x")


def _line(row, base) -> str:
    if "error" in row:
        return f"{row['shape']:14s} {row['variant']:40s} ERROR {row['error']}"
    fwd, both = row.get("fwd_ms", math.nan), row.get("fwd_bwd_ms", math.nan)
    if "rel_err_vs_dense" not in row:  # the reordering alone: no output, no speedup
        return f"{row['shape']:14s} {row['variant']:40s} {'':6s} {fwd:9.3f}"
    return (f"{row['shape']:14s} {row['variant']:40s} {row['density']:6.3f} "
            f"{fwd:9.3f} {base.get('fwd_ms', math.nan) / fwd:6.2f}x {both:9.3f} "
            f"{base.get('fwd_bwd_ms', math.nan) / both:6.2f}x "
            f"{row.get('rel_err_vs_dense', math.nan):9.2e} "
            f"{row.get('rel_err_vs_fp32_masked', math.nan):9.2e}")


# --- end to end ---------------------------------------------------------------------------------

FLUX = {
    # FLUX.1-dev's transformer at 2048² (128 x 128 latent tokens, 512 text tokens)
    "full": dict(config=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                             attention_head_dim=128, num_attention_heads=24,
                             joint_attention_dim=4096, pooled_projection_dim=768,
                             guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
                 grid=(128, 128), text=512, options=dict(pattern="tile2d", tile=(8, 16),
                                                         window=(7, 5))),
    "tiny": dict(config=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                             attention_head_dim=16, num_attention_heads=2,
                             joint_attention_dim=32, pooled_projection_dim=16,
                             guidance_embeds=True, axes_dims_rope=(4, 4, 8)),
                 grid=(16, 16), text=7, options=dict(pattern="tile2d", tile=(4, 4),
                                                     window=(3, 1))),
}
WAN = {
    # Wan 14B width (5120, 40 heads of 128), 2 layers, 720p 81 frames: latent 21x90x160,
    # patches (1, 2, 2): 21x45x80 = 75600 tokens
    "full": dict(config=dict(patch_size=(1, 2, 2), num_attention_heads=40,
                             attention_head_dim=128, in_channels=16, out_channels=16,
                             text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=2,
                             cross_attn_norm=True, qk_norm="rms_norm_across_heads"),
                 latent=(21, 90, 160), text=512,
                 options=dict(pattern="tile3d", tile=(3, 8, 16), window=(3, 3, 3))),
    "tiny": dict(config=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                             in_channels=4, out_channels=4, text_dim=16, freq_dim=32,
                             ffn_dim=32, num_layers=2, cross_attn_norm=True,
                             qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
                 latent=(4, 16, 16), text=7,
                 options=dict(pattern="tile3d", tile=(1, 4, 4), window=(3, 1, 1))),
}


def flux_transformer(size, device, dtype, budget_s) -> dict:
    from diffusers import FluxTransformer2DModel
    spec = FLUX[size]
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(**spec["config"])
    model = model.to(dtype).eval()
    rows, cols = spec["grid"]
    text, config = spec["text"], spec["config"]
    kw = flux_inputs(config, rows, cols, text, device, dtype)
    double, single = config["num_layers"], config["num_single_layers"]
    dense_blocks = []  # the first and last two double blocks, the last two single blocks
    if double > 4 and single > 2:
        dense_blocks = [f"transformer_blocks.{i}.*" for i in (0, 1, double - 2, double - 1)] + [
            f"single_transformer_blocks.{i}.*" for i in (single - 2, single - 1)]
    backend = {**{name: "sdpa" for name in dense_blocks},
               "*": ("block_sparse", spec["options"])}
    result = {"model": f"FluxTransformer2DModel ({size}, random weights)",
              "tokens": f"{text} text + {rows * cols} image", "options": spec["options"],
              "dense_blocks": dense_blocks}
    result.update(patched_forwards(model, kw, {"sdpa": dict(backend="sdpa"),
                                               "block_sparse": dict(backend=backend)},
                                   device, budget_s))
    return result


def wan_transformer(size, device, dtype, budget_s) -> dict:
    from diffusers import WanTransformer3DModel
    spec = WAN[size]
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**spec["config"])
    model = model.to(dtype).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    f, hh, ww = spec["latent"]
    config = spec["config"]
    kw = dict(hidden_states=torch.randn(1, config["in_channels"], f, hh, ww, device=device,
                                        dtype=dtype, generator=gen),
              timestep=torch.tensor([500], device=device),
              encoder_hidden_states=torch.randn(1, spec["text"], config["text_dim"],
                                                device=device, dtype=dtype, generator=gen),
              return_dict=False)
    result = {"model": f"WanTransformer3DModel ({size}, random weights)",
              "latent": spec["latent"], "options": spec["options"]}
    backend = {"*attn1": ("block_sparse", spec["options"]), "*": "sdpa"}
    result.update(patched_forwards(model, kw, {"sdpa": dict(backend="sdpa"),
                                               "block_sparse": dict(backend=backend)},
                                   device, budget_s))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU works)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed runs per measurement (default 1, quick 0.05)")
    parser.add_argument("--no-transformer", action="store_true",
                        help="skip the Flux and Wan transformer forwards")
    parser.add_argument("--no-kernels", action="store_true",
                        help="skip the kernel rows (only the transformers)")
    parser.add_argument("--pipelined", type=int, default=PIPELINED,
                        help="calls back to back per pipelined time (0: no pipelined rows; "
                             f"default {PIPELINED})")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated subset of the kernel shapes (default: all)")
    args = parser.parse_args(argv)
    if args.pipelined < 0:
        parser.error(f"--pipelined must be 0 (no pipelined rows) or more, got {args.pipelined}")
    quick = args.quick
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    budget = args.budget if args.budget is not None else (0.05 if quick else 1.0)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
              "layout": "(B, S, H, D) memory, layout='bshd'", "rows": []}
    configs = QUICK if quick else FULL
    chosen = args.shapes.split(",") if args.shapes else list(configs)
    unknown = sorted(set(chosen) - set(configs))
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {sorted(configs)}")
    for label in [] if args.no_kernels else chosen:
        result["rows"] += bench_shape(label, configs[label], args.device, dtype, budget, quick,
                                      args.pipelined)
    if not args.no_transformer:
        size = "tiny" if quick else "full"
        for key, fn in (("flux_transformer", flux_transformer),
                        ("wan_transformer", wan_transformer)):
            try:
                result[key] = fn(size, args.device, dtype, budget)
            except Exception as exc:  # report it
                result[key] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print(f"\n{'shape':14s} {'variant':40s} {'dens.':>6s} {'fwd ms':>9s} {'speedup':>7s} "
          f"{'fwd+bwd':>9s} {'speedup':>7s} {'err/dense':>9s} {'err/mask':>9s}")
    base = None
    for row in result["rows"]:
        base = row if base is None or base["shape"] != row["shape"] else base
        print(_line(row, base))
    _timing_table(result["rows"], "pipelined",
                  f"pipelined ({args.pipelined} calls back to back per time)")
    _timing_table(result["rows"], "alternating",
                  f"alternating rounds ({max(1, args.pipelined)} call(s) per time; speed-up: the "
                  "median of the per-round ratios to dense)")
    for row in result["rows"]:
        if "fwd_vs_direct_flash4" in row:
            print(f"  {row['shape']}: {row['variant']} / direct flash4 = "
                  f"{row['fwd_vs_direct_flash4']:.3f} fwd, "
                  f"{row.get('fwd_bwd_vs_direct_flash4', math.nan):.3f} fwd+bwd; pipelined "
                  f"{row.get('fwd_pipelined_vs_direct_flash4', math.nan):.3f} fwd, "
                  f"{row.get('fwd_bwd_pipelined_vs_direct_flash4', math.nan):.3f} fwd+bwd; "
                  f"alternating {row.get('fwd_alternating_vs_direct_flash4', math.nan):.3f} fwd, "
                  f"{row.get('fwd_bwd_alternating_vs_direct_flash4', math.nan):.3f} fwd+bwd")
        if "fraction_of_sparse_kernel_fwd" in row:
            print(f"  {row['shape']}: token reordering = "
                  f"{row['fraction_of_sparse_kernel_fwd']:.1%} of the sparse kernel's forward "
                  f"({row.get('pipelined_fraction_of_sparse_kernel_fwd', math.nan):.1%} "
                  "pipelined; the issue: reorder per denoiser forward instead if over 5%)")
        if "plan_note" in row:
            print(f"  {row['shape']}: {row['plan_note']}")
    for key in ("flux_transformer", "wan_transformer"):
        if key in result:
            r = result[key]
            print(f"  {key}: sdpa {r.get('sdpa_ms', math.nan):.1f} ms, block_sparse "
                  f"{r.get('block_sparse_ms', math.nan):.1f} ms, speedup "
                  f"{r.get('speedup', math.nan):.2f}x, rel err {r.get('rel_err_vs_dense', math.nan):.3g}"
                  f"{'; ' + r['error'] if 'error' in r else ''}"
                  f"{'; ' + r['block_sparse_error'] if 'block_sparse_error' in r else ''}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
