"""Overhead of attnpatch.patch() on full-size models: unpatched diffusers vs patched, same kernel.

Models (random weights, built from configs, nothing downloaded):

- Flux transformer: ``FluxTransformer2DModel()`` default config (Flux-dev size, 19 double +
  38 single blocks), bf16, a 1024x1024 image -> 4096 image tokens + 512 text tokens, batch 1;
- SDXL UNet: ``UNet2DConditionModel`` with the SDXL config, fp16, batch 2, 128x128 latents.

For each model the same process times (CUDA events, after warm-up) unpatched forwards, then
``attnpatch.patch(model, backend="sdpa")`` forwards, then unpatched again (to catch drift), and
reports medians and the relative overhead of patched over the unpatched runs. The ``sdpa``
backend calls ``F.scaled_dot_product_attention`` exactly like diffusers' own path, so any
difference is attnpatch's routing cost. Target: within 1%.

    python benchmarks/overhead.py --out benchmarks/results/overhead.json        # GPU
    python benchmarks/overhead.py --tiny --device cpu --repeats 3               # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnpatch  # noqa: E402


def _build(cls, device, dtype, **config):
    """Random weights created directly on ``device`` in ``dtype`` (a 12B model would need 48 GB
    of fp32 host memory and minutes of CPU init otherwise)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


def flux_model(tiny: bool, device, dtype):
    from diffusers import FluxTransformer2DModel
    if tiny:
        config = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                      pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
        h = w = 4
        text = 7
    else:  # the default config is Flux-dev size (19 + 38 blocks, 24 heads x 128); dev has
        config = dict(guidance_embeds=True)  # guidance embeddings
        h = w = 64  # 1024 px / 8 (VAE) / 2 (2x2 packing) -> 4096 image tokens
        text = 512
    model = _build(FluxTransformer2DModel, device, dtype, **config)
    cfg = model.config
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    kwargs = dict(hidden_states=rnd(1, h * w, cfg.in_channels),
                  encoder_hidden_states=rnd(1, text, cfg.joint_attention_dim),
                  pooled_projections=rnd(1, cfg.pooled_projection_dim),
                  timestep=torch.tensor([0.5], device=device, dtype=dtype),
                  img_ids=ids.reshape(-1, 3).to(device), txt_ids=torch.zeros(text, 3, device=device),
                  guidance=torch.tensor([3.5], device=device, dtype=dtype)
                  if cfg.guidance_embeds else None, return_dict=False)
    return model, kwargs


def sdxl_model(tiny: bool, device, dtype):
    from diffusers import UNet2DConditionModel
    if tiny:
        config = dict(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 32), norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
            attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
            use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 16)
        size, text, ctx, pooled = 16, 7, 16, 16
    else:  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
        config = dict(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        size, text, ctx, pooled = 128, 77, 2048, 1280
    model = _build(UNet2DConditionModel, device, dtype, **config)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    kwargs = dict(sample=rnd(2, 4, size, size), timestep=torch.tensor([500, 500], device=device),
                  encoder_hidden_states=rnd(2, text, ctx),
                  added_cond_kwargs={"text_embeds": rnd(2, pooled), "time_ids": rnd(2, 6)},
                  return_dict=False)
    return model, kwargs


MODELS = {"flux": (flux_model, torch.bfloat16), "sdxl": (sdxl_model, torch.float16)}


def time_forwards(model, kwargs, repeats: int, warmup: int, device) -> tuple[list, list]:
    """(device ms, host ms) per forward. Device: CUDA events on a GPU (perf_counter on CPU).
    Host: how long the Python forward took to return (kernel launches, no sync): when it nears
    the device time the model is launch-bound and any per-call Python cost shows."""
    cuda = device.type == "cuda"
    times, host = [], []
    with torch.inference_mode():
        for _ in range(warmup):
            model(**kwargs)
        if cuda:
            torch.cuda.synchronize(device)
        for _ in range(repeats):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                t0 = time.perf_counter()
                model(**kwargs)
                host.append((time.perf_counter() - t0) * 1e3)
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                model(**kwargs)
                times.append((time.perf_counter() - t0) * 1e3)
                host.append(times[-1])
    return times, host


def bench(name: str, args, device) -> dict:
    """Alternate unpatched and patched rounds (patching is cheap and exact), so clock or
    thermal drift lands on both variants alike."""
    build, dtype = MODELS[name]
    if device.type == "cpu":
        dtype = torch.float32
    model, kwargs = build(args.tiny, device, dtype)
    runs = {"unpatched": ([], []), "patched": ([], [])}
    per_round = max(1, args.repeats // args.rounds)
    report = None
    for _ in range(args.rounds):
        for variant in ("unpatched", "patched"):
            handle = attnpatch.patch(model, backend=args.backend) if variant == "patched" else None
            dev, host = time_forwards(model, kwargs, per_round, args.warmup, device)
            runs[variant][0].extend(dev)
            runs[variant][1].extend(host)
            if handle is not None:
                report = handle.report()
                handle.unpatch()
    calls = sum(r.calls for r in report)
    base, med = (statistics.median(runs[v][0]) for v in ("unpatched", "patched"))
    host_base, host_med = (statistics.median(runs[v][1]) for v in ("unpatched", "patched"))
    result = dict(
        model=name, dtype=str(dtype).replace("torch.", ""), backend=args.backend,
        attention_modules=len(report), routed=len(report.routed),
        attention_calls_per_forward=calls // (per_round + args.warmup),
        unpatched_ms=runs["unpatched"][0], patched_ms=runs["patched"][0],
        unpatched_host_ms=runs["unpatched"][1], patched_host_ms=runs["patched"][1],
        unpatched_median_ms=base, patched_median_ms=med,
        overhead_pct=100.0 * (med - base) / base,
        host_unpatched_median_ms=host_base, host_patched_median_ms=host_med,
        host_overhead_us_per_call=1e3 * (host_med - host_base)
        / max(1, calls // (per_round + args.warmup)))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--backend", default="sdpa", help="attnpatch backend for the patched runs")
    p.add_argument("--repeats", type=int, default=12, help="timed forwards per variant (>= 5)")
    p.add_argument("--rounds", type=int, default=4,
                   help="alternations of unpatched and patched runs")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny configs (smoke test, e.g. on CPU)")
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
    results = [bench(name, args, device) for name in args.models]
    print(f"attnpatch patch() overhead, backend={args.backend}, {env['device']}, "
          f"torch {env['torch']}, median of {args.repeats} forwards")
    print(f"{'model':6} {'dtype':9} {'modules':>7} {'calls':>6} {'unpatched ms':>13} "
          f"{'patched ms':>11} {'overhead':>9} {'host unp/pat ms':>16} {'host µs/call':>12}")
    for r in results:
        print(f"{r['model']:6} {r['dtype']:9} {r['routed']:>7} "
              f"{r['attention_calls_per_forward']:>6} {r['unpatched_median_ms']:>13.2f} "
              f"{r['patched_median_ms']:>11.2f} {r['overhead_pct']:>8.2f}% "
              f"{r['host_unpatched_median_ms']:>7.2f}/{r['host_patched_median_ms']:<8.2f} "
              f"{r['host_overhead_us_per_call']:>12.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(env=env, results=results), indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
