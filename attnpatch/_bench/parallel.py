"""Context parallelism (issue 15): a denoiser forward on 1 GPU against N GPUs with attnpatch's
``ring``, ``ulysses`` and ``usp`` and with diffusers' own ``ContextParallelConfig``, all in one
run, on the same random-weight model and inputs.

    accelerate launch --num_processes 1 -m attnpatch._bench.parallel --out cp_1gpu.json
    accelerate launch --multi_gpu --num_processes 8 -m attnpatch._bench.parallel --out cp_8.json

(``benchmarks/context_parallel.py`` is a thin caller of this worker; ``attnpatch bench --suite
parallel`` launches it once per process count and collects its rows: :func:`parallel_suite`.)

Configs (bf16, random weights, batch 1, 512 text tokens): ``flux_2048`` and ``flux_4096``
(Flux-dev transformer, 16384 and 65536 image tokens), ``wan_720p`` (Wan 2.1 14B transformer,
81 frames at 1280x720: 21x45x80 = 75600 tokens; ``--wan-layers`` of its 40 blocks, default 8).
Variants, in this order on the same model: ``single`` (every rank runs the whole forward alone,
no communication: the 1-GPU time), ``ring``/``ulysses``/``usp`` (``attnpatch.patch(model,
backend=...)`` over all ranks; usp: ``--usp-ring-degree`` x the rest), then diffusers'
``model.enable_parallelism(ContextParallelConfig(ring_degree=N))`` (``diffusers_ring``) and
``ulysses_degree=N`` (``diffusers_ulysses``) with its ``_native_cudnn`` attention; diffusers'
parallelism cannot be undone, so each of those builds the model again (it needs 2+ GPUs).

Timing: a barrier, then the forward, timed with CUDA events (wall clock on CPU) after
``--warmup`` forwards; the time of a repeat is the slowest rank's; the row gives the median over
``--repeats`` and the speed-up over ``single``. Each row also gives the output's relative error
against ``single`` (every variant computes the same forward). A variant that can't run (diffusers'
degree 1 with one process, heads or lengths its sharder refuses, out of memory) is a row with
its ``error`` message. Rank 0 writes the JSON (``--out``) and prints a table.

With one process the script sets up a group of one rank itself (``ring`` is then one block, the
overhead of the machinery). ``--quick``: tiny configs in fp32 on CPU over gloo (tests).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

import attnpatch

# random weights made on the device in the dtype, seeded: the same on every rank
from .models import build as _build
from .timing import over

log = logging.getLogger(__name__)

VARIANTS = ("single", "ring", "ulysses", "usp", "diffusers_ring", "diffusers_ulysses")


def _inputs(device, dtype) -> Callable[..., torch.Tensor]:
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    return rnd


def flux(side: int, tiny: bool) -> Callable:
    """The Flux transformer at ``side`` x ``side`` pixels (VAE /8, 2x2 packing)."""
    def make(device, dtype):
        from diffusers import FluxTransformer2DModel
        if tiny:
            config = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                          attention_head_dim=16, num_attention_heads=4, joint_attention_dim=16,
                          pooled_projection_dim=16, guidance_embeds=True,
                          axes_dims_rope=(4, 4, 8))
            h = w = side // 16
            text = 8
        else:
            config = dict(guidance_embeds=True)  # the class defaults are Flux-dev's sizes
            h = w = side // 16
            text = 512
        model = _build(FluxTransformer2DModel, device, dtype, **config)
        cfg, rnd = model.config, _inputs(device, dtype)
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
        kwargs = dict(hidden_states=rnd(1, h * w, cfg.in_channels),
                      encoder_hidden_states=rnd(1, text, cfg.joint_attention_dim),
                      pooled_projections=rnd(1, cfg.pooled_projection_dim),
                      timestep=torch.tensor([0.5], device=device, dtype=dtype),
                      img_ids=ids.reshape(-1, 3).to(device),
                      txt_ids=torch.zeros(text, 3, device=device),
                      guidance=torch.tensor([3.5], device=device, dtype=dtype),
                      return_dict=False)
        return model, kwargs, h * w + text
    return make


def wan(layers: int, tiny: bool) -> Callable:
    """The Wan 2.1 14B transformer at 81 frames of 1280x720 (latents 21 x 90 x 160)."""
    def make(device, dtype):
        from diffusers import WanTransformer3DModel
        if tiny:
            config = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8,
                          in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32,
                          num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                          rope_max_seq_len=32)
            latent, text = (2, 8, 12), 8
        else:  # Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json, fewer blocks
            config = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128,
                          in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                          ffn_dim=13824, num_layers=layers, cross_attn_norm=True,
                          qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
            latent, text = (21, 90, 160), 512
        model = _build(WanTransformer3DModel, device, dtype, **config)
        cfg, rnd = model.config, _inputs(device, dtype)
        kwargs = dict(hidden_states=rnd(1, cfg.in_channels, *latent),
                      encoder_hidden_states=rnd(1, text, cfg.text_dim),
                      timestep=torch.tensor([500], device=device), return_dict=False)
        tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)
        return model, kwargs, tokens
    return make


def configs(args) -> dict[str, Callable]:
    if args.quick:
        return {"flux_tiny": flux(256, True), "wan_tiny": wan(1, True)}
    return {"flux_2048": flux(2048, False), "flux_4096": flux(4096, False),
            "wan_720p": wan(args.wan_layers, False)}


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int
          ) -> tuple[list[float], Any]:
    """Per repeat, the slowest rank's milliseconds (barrier first; CUDA events on a GPU after
    ``warmup`` calls, wall clock on CPU), and the last output."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        if device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            out = fn()
            ms = (time.perf_counter() - t0) * 1e3
        slowest = torch.tensor([ms], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            slowest = slowest.to(device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        times.append(slowest.item())
    return times, out


def usp_degrees(world: int, ring: Optional[int]) -> tuple[int, int]:
    if ring is None:
        ring = 2 if world >= 4 and world % 2 == 0 else 1
    if world % ring:
        raise SystemExit(f"--usp-ring-degree {ring} does not divide the {world} processes")
    return ring, world // ring


def run_variant(name: str, make: Callable, model, kwargs, args, device, dtype, world: int
                ) -> tuple[Optional[list[float]], Any, Any, str]:
    """(times, output, the model to use next, error) of one variant."""
    def forward(m):
        with torch.inference_mode():
            return m(**kwargs)[0]

    if name == "single":
        times, out = timed(lambda: forward(model), device, args.warmup, args.repeats)
        return times, out, model, ""
    if name in ("ring", "ulysses", "usp"):
        options = {"inner": args.inner}
        if name == "usp":
            ring, uly = usp_degrees(world, args.usp_ring_degree)
            options.update(ring_degree=ring, ulysses_degree=uly)
        with attnpatch.patch(model, backend=name, **options):
            times, out = timed(lambda: forward(model), device, args.warmup, args.repeats)
        return times, out, model, ""
    # diffusers' own context parallelism: irreversible, on a fresh model
    try:
        from diffusers import ContextParallelConfig
    except ImportError:
        import diffusers
        return None, None, model, (f"diffusers {diffusers.__version__} has no "
                                   "ContextParallelConfig (a newer diffusers has it)")

    if world == 1:
        return None, None, model, "diffusers' ContextParallelConfig needs 2 or more processes"
    if device.type == "cpu":
        return None, None, model, ("diffusers' context parallelism needs an accelerator (it "
                                   "places ranks by torch.accelerator.device_count())")
    degree = {"ring_degree": world} if name == "diffusers_ring" else {"ulysses_degree": world}
    fresh, _, _ = make(device, dtype)  # the same weights (seeded), a second copy in memory
    fresh.set_attention_backend("_native_cudnn" if device.type == "cuda" else "native")
    try:
        fresh.enable_parallelism(config=ContextParallelConfig(**degree))
    except Exception as err:  # its refusal (degree, heads, lengths) is this row's result
        return None, None, fresh, f"{type(err).__name__}: {err}"
    times, out = timed(lambda: forward(fresh), device, args.warmup, args.repeats)
    return times, out, fresh, ""


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def start_group(quick: bool) -> None:
    """accelerate's process group under ``accelerate launch``; otherwise a group of one."""
    from accelerate import PartialState

    state = PartialState(cpu=quick)
    if state.device.type == "cuda":
        torch.cuda.set_device(state.local_process_index)  # a single process gets a bare "cuda"
    if not dist.is_initialized():  # one process, not launched by accelerate/torchrun
        store = tempfile.mktemp(prefix="attnpatch-cp-store-")
        backend = "nccl" if state.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=600))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnpatch._bench.parallel",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--configs", default=None,
                   help="comma-separated: flux_2048,flux_4096,wan_720p (default: all; "
                        "--quick: flux_tiny,wan_tiny)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, in this order: {','.join(VARIANTS)}")
    p.add_argument("--inner", default="auto", help="attnpatch's kernel inside ring/ulysses/usp")
    p.add_argument("--usp-ring-degree", type=int, default=None,
                   help="usp's ring degree (default: 2 on 4+ even processes, else 1)")
    p.add_argument("--wan-layers", type=int, default=8, help="Wan blocks (the 14B has 40)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny configs, fp32, CPU over gloo")
    p.add_argument("--out", type=pathlib.Path, help="write the results as JSON here (rank 0)")
    args = p.parse_args(argv)

    start_group(args.quick)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu") if args.quick else torch.device(
        "cuda", torch.cuda.current_device())
    dtype = torch.float32 if args.quick else torch.bfloat16
    if args.quick:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    available = configs(args)
    chosen = args.configs.split(",") if args.configs else list(available)
    unknown = [c for c in chosen if c not in available]
    variants = args.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if unknown or bad:
        raise SystemExit(f"unknown --configs {unknown} / --variants {bad}; choose from "
                         f"{list(available)} / {list(VARIANTS)}")

    rows = []
    for config in chosen:
        make = available[config]
        model, kwargs, tokens = make(device, dtype)
        reference, single_ms = None, None
        for variant in variants:
            try:
                times, out, model, error = run_variant(variant, make, model, kwargs, args, device,
                                                       dtype, world)
            except torch.OutOfMemoryError as err:
                times, out, error = None, None, f"out of memory: {str(err)[:200]}"
            row = {"config": config, "variant": variant, "processes": world,
                   "tokens": tokens, "dtype": str(dtype).replace("torch.", ""),
                   "inner": args.inner if variant in ("ring", "ulysses", "usp") else None}
            if variant == "usp":
                row["ring_degree"], row["ulysses_degree"] = usp_degrees(world,
                                                                        args.usp_ring_degree)
            if times is None:
                row["error"] = error
            else:
                median = statistics.median(times)
                row.update(ms=round(median, 3), times_ms=[round(t, 3) for t in times])
                if variant == "single":
                    reference, single_ms = out.float().cpu(), median
                if single_ms is not None:
                    row["speedup_vs_single"] = round(single_ms / median, 3)
                if reference is not None:
                    row["rel_error_vs_single"] = rel_error(out.float().cpu(), reference)
            rows.append(row)
            if rank == 0:
                print(_line(row), flush=True)
        del model, kwargs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if rank == 0:
        result = {"processes": world, "device": _device_name(device),
                  "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
                  "rows": rows}
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))
            print(f"wrote {args.out}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def _line(row: dict) -> str:
    head = f"{row['config']:>10} {row['variant']:>17} x{row['processes']}"
    if "error" in row:
        return f"{head}: not run ({row['error'][:160]})"
    extra = ""
    if "speedup_vs_single" in row:
        extra += f"  {row['speedup_vs_single']:.2f}x"
    if "rel_error_vs_single" in row:
        extra += f"  rel.err {row['rel_error_vs_single']:.1e}"
    return f"{head}: {row['ms']:10.2f} ms{extra}"



# --- the parent: attnpatch bench --suite parallel ------------------------------------------------

#: the configs the bench's parallel suite runs (the worker's default adds flux_4096)
BENCH_CONFIGS = {"cuda": "flux_2048,wan_720p", "cpu": "flux_tiny"}
#: environment of a CUDA launch unless already set: NVLink multicast off (it is not available
#: on every machine, and NCCL / symmetric memory fail at start-up where it is missing)
NCCL_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                 "NVSHMEM_DISABLE_NVLS": "1"}
#: wall-clock limit of one launch (seconds)
LAUNCH_TIMEOUT = {"cuda": 540, "cpu": 180}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(processes: int, worker_args: list[str], device: str) -> list[str]:
    """The command that runs the worker on ``processes`` processes: ``accelerate launch``
    (``--multi_gpu`` for 2+), or ``torchrun`` when accelerate is not importable."""
    import importlib.util

    port = str(_free_port())
    if importlib.util.find_spec("accelerate") is None:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                str(processes), "--master_port", port, "-m", "attnpatch._bench.parallel",
                *worker_args]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", port]
    if processes > 1:
        cmd.append("--multi_gpu")
    return [*cmd, "-m", "attnpatch._bench.parallel", *worker_args]


def _prow(name: str, variant: str, shape: Any, group: str, skipped: Optional[str] = None,
          **metrics: Any) -> dict:
    return {"suite": "parallel", "name": name, "variant": variant, "shape": shape,
            "metrics": metrics, "skipped": skipped, "group": group}


def parallel_suite(device: str, quick: bool, timing: dict, progress: Callable,
                   settings: Any = None) -> list[dict]:
    """Context parallelism: for each process count N of ``settings.processes`` (default 1, 2,
    4) that this machine has GPUs for, ``accelerate launch --num_processes N`` of this module's
    worker (one denoiser forward per config: ``single``, attnpatch's ``ring``/``ulysses``/
    ``usp`` and diffusers' ``ContextParallelConfig`` ring/Ulysses); the worker writes JSON,
    which becomes rows ``"<config> xN"``. A count the machine lacks gives rows that say so.
    On CPU, ``quick`` runs N=2 over gloo on a tiny Flux (the other counts say so); without
    ``quick`` a CPU run skips the suite with the reason."""
    counts = list(getattr(settings, "processes", None) or (1, 2, 4))
    gpus = torch.cuda.device_count() if device == "cuda" and torch.cuda.is_available() else 0
    rows: list[dict] = []
    bar = progress(total=len(counts), desc="parallel")
    for n in counts:
        group = f"N={n}"
        name = f"denoiser forward x{n}"
        reason = None
        if device != "cuda" and not quick:
            reason = ("needs CUDA GPUs (on a CPU, --quick runs N=2 over gloo on a tiny model)")
        elif device != "cuda" and n != 2:
            reason = f"--quick on a CPU runs N=2 only (gloo, tiny model), not N={n}"
        elif device == "cuda" and n > gpus:
            reason = f"needs {n} CUDA GPUs; this machine has {gpus}"
        elif over(settings):
            reason = over(settings)
        if reason is not None:
            rows += [_prow(name, v, None, group, reason) for v in VARIANTS]
            bar.update(1)
            continue
        bar.set_postfix_str(f"launching {n} process(es)")
        deadline = getattr(settings, "deadline", None)
        rows += _launch(n, device, quick, group, None if deadline is None else deadline.left())
        bar.update(1)
    bar.close()
    return rows


def _launch(n: int, device: str, quick: bool, group: str,
            left: Optional[float] = None) -> list[dict]:
    """The rows of one launch of ``n`` processes; ``left``: seconds of ``--time-limit`` left
    (the launch is stopped then, its rows say why)."""
    import subprocess

    kind = "cuda" if device == "cuda" else "cpu"
    timeout = LAUNCH_TIMEOUT[kind] if left is None else max(1.0, min(LAUNCH_TIMEOUT[kind], left))
    with tempfile.TemporaryDirectory(prefix="attnpatch-bench-parallel-") as tmp:
        out = pathlib.Path(tmp) / "rows.json"
        args = ["--configs", BENCH_CONFIGS[kind], "--out", str(out),
                "--warmup", "1", "--repeats", "2" if quick else "3"]
        if device != "cuda":
            args.append("--quick")
        cmd = launch_command(n, args, device)
        root = str(pathlib.Path(attnpatch.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        if device != "cuda":
            env["OMP_NUM_THREADS"] = "1"
        else:  # NVLink multicast (NVLS) off unless the caller set these: see NCCL_DEFAULTS
            for key, value in NCCL_DEFAULTS.items():
                env.setdefault(key, value)
        failure = None
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=timeout)
            if proc.returncode != 0 or not out.exists():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                failure = (f"the launch of {n} process(es) failed (exit {proc.returncode}): "
                           + " | ".join(tail)[-400:])
        except subprocess.TimeoutExpired:
            failure = (f"the launch of {n} process(es) ran past {timeout:g} s "
                       "(use fewer --processes per call, or a larger --time-limit)")
        if failure is not None:
            log.warning("parallel: %s", failure)
            return [_prow(f"denoiser forward x{n}", v, None, group, failure) for v in VARIANTS]
        result = json.loads(out.read_text())
    rows = []
    launcher = "accelerate launch" if "accelerate.commands.launch" in cmd else "torchrun"
    for r in result["rows"]:
        metrics = {k: r[k] for k in ("ms", "speedup_vs_single", "rel_error_vs_single",
                                     "processes", "tokens", "dtype", "inner", "ring_degree",
                                     "ulysses_degree") if r.get(k) is not None}
        if "times_ms" in r:
            metrics["times_ms"] = r["times_ms"]
        metrics["launcher"] = launcher
        metrics["device_name"] = result.get("device")
        rows.append(_prow(f"{r['config']} x{n}", r["variant"],
                          f"{r['tokens']} tokens, {r['dtype']}", group,
                          r.get("error"), **metrics))
    return rows


if __name__ == "__main__":
    sys.exit(main())
