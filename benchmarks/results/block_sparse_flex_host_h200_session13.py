"""Session 13: where block_sparse's Flex path (kernel="flex", tokens pre-ordered) spends the time
that plain compiled Flex does not, when a call is timed alone (session 13's bench: 1.80-1.82x
against plain Flex's 1.94-2.01x timed alone, equal pipelined). Flux 2048² 7x5, bf16, a machine
without flash-attn-4. Variants in alternating rounds (1 call, and 10 back to back, per time):
plain compiled flex_attention on the plan's BlockMask, attnpatch's `flex` backend given that
BlockMask, block_sparse pre-ordered; then host microseconds per call (20 calls after a sync)
and the CPU-side profile of 5 calls of each."""
import sys, pathlib, statistics, contextlib, time
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the checkout
import torch
import attnpatch
from benchmarks import block_sparse as B
from benchmarks._timing import alternating_rounds
from attnpatch.strategies import block_sparse as BSP
from torch.profiler import profile, ProfilerActivity

cfg = B.FULL["flux_2048_7x5"]
b, h, s, d = cfg["shape"]
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
           for _ in range(3))
plan = B.plan_of(q, k, v, cfg["options"], cfg["layout"])
plain, tiled, perm = B.direct_flex(plan, q, k, v)
sparse = dict(backend="block_sparse", token_layout=cfg["layout"], kernel="flex", **cfg["options"])


def ours():
    token = BSP._PREORDERED.set(plan.order)
    try:
        return attnpatch.attention(*tiled, layout="bshd", **sparse)
    finally:
        BSP._PREORDERED.reset(token)


ours()
call = attnpatch.explain(*tiled, layout="bshd", **sparse).call
ours_plan = BSP._plan(call, call.options)  # kernel="flex": not the bench's auto plan
block_mask = BSP._preordered(ours_plan, ours_plan.order).lists["flex"]


def flex_backend():
    return attnpatch.attention(*tiled, layout="bshd", backend="flex", block_mask=block_mask)


variants = {"plain compiled Flex": lambda: plain(*tiled), "attnpatch flex backend": flex_backend,
            "block_sparse kernel=flex pre-ordered": ours}
with torch.no_grad():
    ref = plain(*tiled)
    for name, f in variants.items():
        out = f()
        err = float((out.float() - ref.float()).norm() / ref.float().norm())
        print(f"{name:40s} rel err vs plain {err:.2e}")
    for n in (1, 10):
        stats = alternating_rounds(
            {k_: (contextlib.nullcontext, (lambda f=f: [f() for _ in range(n)]))
             for k_, f in variants.items()}, "cuda", budget_s=1.0, warmup=2, min_reps=10,
            max_reps=100)
        print(f"--- {n} call(s) per time (alternating rounds; ratio: median of paired ratios)")
        for k_ in variants:
            r = stats["paired"].get(k_)
            print(f"{k_:40s} {stats[k_]['median_ms'] / n:8.3f} ms  vs plain "
                  f"{statistics.median(r) if r else 1.0:.3f}  reps {stats[k_]['reps']}")
    print("--- host microseconds per call (20 calls after a sync, median of 20 loops)")
    for name, f in variants.items():
        host = []
        for _ in range(20):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                f()
            host.append((time.perf_counter() - t0) / 20 * 1e6)
        print(f"{name:40s} {statistics.median(host):8.1f} us/call")
    torch.cuda.synchronize()
    for name, f in variants.items():
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                f()
            torch.cuda.synchronize()
        print(f"\n=== {name}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14,
                                        max_name_column_width=60))
print(torch.cuda.get_device_name(), torch.__version__)
