"""One LoRA training step on a full-size SDXL UNet: diffusers' default attention processors vs
``attnpatch.patch(unet, backend=...)``, in the same process on the same inputs.

    python benchmarks/lora_step.py --out benchmarks/results/lora_step_h100.json
    python benchmarks/lora_step.py --backend sdpa --backend sdpa_cudnn --backend flash
    python benchmarks/lora_step.py --tiny --device cpu          # smoke mode (CPU tests)

Setup: SDXL-base UNet config with random weights (no download), bf16 weights (``--dtype``), a
1024x1024 image (128x128 latents, ``--resolution``), batch 1, gradient checkpointing, LoRA
rank 16 on to_q/to_k/to_v/to_out.0 (fp32 LoRA weights under autocast, as accelerate's mixed
precision does), AdamW. A step is forward + MSE loss + backward + optimizer step.

Variants are measured in interleaved rounds (default, patched, default, patched, ...) so drift
of clocks or of the allocator affects both; each round runs ``--warmup`` steps, then times
``--steps`` steps with CUDA events. Reported: median ms per step over all rounds, peak memory
(``torch.cuda.max_memory_allocated`` over the variant's steps), and, as a correctness check, the
loss and LoRA gradient norm of one step from the same LoRA weights for every variant.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch

import attnpatch

DEFAULT = "diffusers"

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0)

TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
    attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 32, norm_num_groups=8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", action="append", default=[],
                   help="attnpatch backend(s) to compare with diffusers' default (repeatable; "
                        "default: sdpa)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--resolution", type=int, default=None, help="image size (default 1024; "
                   "--tiny: 64)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per round")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per variant")
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true", help="a tiny SDXL-like UNet (smoke test)")
    p.add_argument("--out", default=None, help="JSON file (or folder) for the results")
    return p.parse_args(argv)


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            args.dtype]
        from diffusers import UNet2DConditionModel
        from diffusers.utils import logging as diffusers_logging
        from peft import LoraConfig

        diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []"

        config = TINY_UNET if args.tiny else SDXL_UNET
        torch.manual_seed(0)
        with torch.device(self.device):
            unet = UNet2DConditionModel(**config)
        unet.to(dtype=self.dtype).requires_grad_(False)
        unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        for prm in unet.parameters():
            if prm.requires_grad:
                prm.data = prm.data.float()
        with torch.no_grad():  # non-zero LoRA B so that gradients flow through both factors
            for name, prm in unet.named_parameters():
                if "lora_B" in name:
                    prm.normal_(std=1e-3)
        if not args.no_gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        self.unet = unet
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.lora_init = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.params, lr=1e-5)
        res = args.resolution or (64 if args.tiny else 1024)
        lat = res // 8
        g = torch.Generator(device="cpu").manual_seed(1)
        b = args.batch
        text_dim = config["cross_attention_dim"]
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config[
            "addition_time_embed_dim"]

        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(self.device, self.dtype)

        self.inputs = dict(sample=rnd(b, 4, lat, lat), timestep=torch.full((b,), 500,
                                                                           device=self.device),
                           encoder_hidden_states=rnd(b, 77, text_dim),
                           added_cond_kwargs={"text_embeds": rnd(b, pooled),
                                              "time_ids": torch.tensor(
                                                  [[res, res, 0, 0, res, res]] * b,
                                                  device=self.device, dtype=self.dtype)})
        self.target = rnd(b, 4, lat, lat)
        self.processor = type(next(iter(unet.attn_processors.values()))).__name__
        self.params_total = sum(p.numel() for p in unet.parameters())
        self.params_lora = sum(p.numel() for p in self.params)
        self.resolution = res

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def step(self):
        with torch.autocast(self.device.type, dtype=self.dtype,
                            enabled=self.dtype != torch.float32):
            pred = self.unet(**self.inputs, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), self.target.float())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def check(self) -> dict:
        """Loss and LoRA grad norm of one step from the initial LoRA weights."""
        with torch.no_grad():
            for p, p0 in zip(self.params, self.lora_init):
                p.copy_(p0)
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.dtype,
                            enabled=self.dtype != torch.float32):
            pred = self.unet(**self.inputs, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), self.target.float())
        loss.backward()
        grad = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self.params
                              if p.grad is not None))
        self.opt.zero_grad(set_to_none=True)
        return {"loss": loss.item(), "grad_norm": grad.item()}

    def measure(self, n_warm: int, n: int) -> tuple[list[float], int]:
        for _ in range(n_warm):
            self.step()
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(n):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                self.step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                self.step()
                times.append((time.perf_counter() - t0) * 1e3)
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else 0
        return times, peak


def run(args) -> dict:
    backends = args.backend or ["sdpa"]
    bench = Bench(args)
    variants = [DEFAULT, *backends]
    results = {v: {"ms": [], "peak_bytes": 0} for v in variants}
    reports = {}

    def enter(variant):
        if variant == DEFAULT:
            return None
        return attnpatch.patch(bench.unet, backend=variant)

    for variant in variants:  # correctness: same LoRA weights, same inputs
        handle = enter(variant)
        try:
            results[variant]["check"] = bench.check()
        finally:
            if handle is not None:
                handle.unpatch()
    for _ in range(args.rounds):
        for variant in variants:
            handle = enter(variant)
            try:
                times, peak = bench.measure(args.warmup, args.steps)
                if handle is not None:
                    rep = handle.report()
                    reports[variant] = {"routed": len(rep.routed),
                                        "ran": sorted({b for r in rep for b in r.backends})}
            finally:
                if handle is not None:
                    handle.unpatch()
            results[variant]["ms"] += times
            results[variant]["peak_bytes"] = max(results[variant]["peak_bytes"], peak)
    base = results[DEFAULT]
    base_ms = statistics.median(base["ms"])
    rows = []
    for v in variants:
        r = results[v]
        ms = statistics.median(r["ms"])
        rows.append({
            "variant": v if v == DEFAULT else f"attnpatch {v}",
            "processor": bench.processor if v == DEFAULT else "attnpatch",
            "ms_per_step": round(ms, 3), "ms_all": [round(t, 3) for t in r["ms"]],
            "vs_default": round(ms / base_ms, 4),
            "peak_mib": round(r["peak_bytes"] / 2**20, 1),
            "peak_vs_default": (round(r["peak_bytes"] / base["peak_bytes"], 4)
                                if base["peak_bytes"] else None),
            "loss": r["check"]["loss"], "grad_norm": r["check"]["grad_norm"],
            "loss_diff": abs(r["check"]["loss"] - base["check"]["loss"]),
            "grad_norm_rel_diff": abs(r["check"]["grad_norm"] - base["check"]["grad_norm"])
            / max(base["check"]["grad_norm"], 1e-30),
            **({"modules_routed": reports[v]["routed"], "ran": reports[v]["ran"]}
               if v in reports else {}),
        })
    device_name = torch.cuda.get_device_name(bench.device) if bench.cuda else "cpu"
    return {
        "benchmark": "lora_step", "device": device_name, "torch": torch.__version__,
        "model": "tiny SDXL-like UNet" if args.tiny else "SDXL-base UNet (random weights)",
        "params": bench.params_total, "lora_params": bench.params_lora, "rank": args.rank,
        "dtype": args.dtype, "resolution": bench.resolution, "batch": args.batch,
        "gradient_checkpointing": not args.no_gradient_checkpointing,
        "steps_per_round": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "rows": rows,
    }


def format_table(result: dict) -> str:
    head = ("variant", "ms/step", "vs default", "peak MiB", "vs default", "loss diff",
            "grad rel diff")
    lines = [head]
    for r in result["rows"]:
        lines.append((r["variant"], f"{r['ms_per_step']:.1f}", f"{r['vs_default']:.3f}",
                      f"{r['peak_mib']:.0f}",
                      "-" if r["peak_vs_default"] is None else f"{r['peak_vs_default']:.3f}",
                      f"{r['loss_diff']:.2e}", f"{r['grad_norm_rel_diff']:.2e}"))
    widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
    body = "\n".join("  ".join(c.ljust(w) for c, w in zip(l, widths)) for l in lines)
    title = (f"LoRA step, {result['model']}, {result['dtype']}, {result['resolution']}px, "
             f"batch {result['batch']}, rank {result['rank']}, gradient checkpointing "
             f"{'on' if result['gradient_checkpointing'] else 'off'}, {result['device']}")
    return title + "\n" + body


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in args.backend:
        try:
            attnpatch.explain(torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8),
                              torch.zeros(1, 1, 1, 8), backend=name)
        except attnpatch.AttnPatchError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    result = run(args)
    print(format_table(result))
    if args.out:
        out = pathlib.Path(args.out)
        if out.suffix != ".json":
            out.mkdir(parents=True, exist_ok=True)
            out = out / "lora_step.json"
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
