"""flash4 against SDPA's kernels at head_dim 64 (SDXL, SD3, SD3.5-large attention shapes) and at
head_dim 128 below auto's 12288-key threshold: alternating rounds, forward and forward+backward,
(B, S, H, D) memory as diffusers passes it."""
import sys, pathlib, statistics, contextlib, json, os
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the checkout
import torch
import attnpatch
from attnpatch._bench.timing import alternating_rounds

SHAPES = {  # name: (B, H, S, D)
    "sdxl_1024_l1": (2, 10, 4096, 64), "sdxl_1024_l2": (2, 20, 1024, 64),
    "sdxl_1536_l1": (2, 10, 9216, 64),
    "sd3_1024": (2, 24, 4429, 64), "sd3_1536": (2, 24, 9549, 64), "sd3_1024_b1": (1, 24, 4429, 64),
    "sd35l_1024": (2, 38, 4429, 64), "h64_16896": (1, 24, 16896, 64),
    "h128_4608": (1, 24, 4608, 128), "h128_8192": (2, 24, 8192, 128), "h128_12288": (1, 24, 12288, 128),
}
NAMES = ["sdpa_cudnn", "sdpa_flash", "flash4", "auto"]
out = {}
for label, (b, h, s, d) in SHAPES.items():
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    g = torch.randn_like(q)
    picked = str(attnpatch.explain(q, k, v, layout="bshd").choice)
    row = {"shape": [b, h, s, d], "auto_picks": picked}
    for mode in ("fwd", "fwd_bwd"):
        fns = {}
        for n in NAMES:
            if mode == "fwd":
                fns[n] = lambda n=n: [attnpatch.attention(q, k, v, layout="bshd", backend=n) for _ in range(5)]
            else:
                def step(n=n):
                    for _ in range(5):
                        o = attnpatch.attention(*leaves, layout="bshd", backend=n)
                        torch.autograd.grad(o, leaves, g)
                fns[n] = step
        with torch.no_grad() if mode == "fwd" else contextlib.nullcontext():
            st = alternating_rounds({n: (contextlib.nullcontext, f) for n, f in fns.items()}, "cuda",
                                    budget_s=0.25, warmup=2, min_reps=7, max_reps=60)
        flops = 4 * b * h * s * s * d * (1 if mode == "fwd" else 3.5)
        for n in NAMES:
            if "error" in st[n]:
                row[f"{n}_{mode}"] = st[n]["error"][:120]
                continue
            ms = st[n]["median_ms"] / 5
            ratio = statistics.median(st["paired"][n]) if n in st["paired"] else 1.0
            row[f"{n}_{mode}_ms"] = ms
            row[f"{n}_{mode}_tflops"] = flops / ms / 1e9
            row[f"{n}_{mode}_vs_cudnn"] = ratio
    out[label] = row
    cells = "  ".join(f"{n} {row.get(f'{n}_fwd_tflops', float('nan')):5.0f}/{row.get(f'{n}_fwd_bwd_tflops', float('nan')):5.0f} ({row.get(f'{n}_fwd_vs_cudnn', float('nan')):.3f}/{row.get(f'{n}_fwd_bwd_vs_cudnn', float('nan')):.3f})" for n in NAMES)
    print(f"{label:13s} {str((b, h, s, d)):22s} auto={picked:10s} {cells}", flush=True)
    del q, k, v, leaves, g
    torch.cuda.empty_cache()
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "h64.json"), "w"), indent=1)
