"""Which GPU kernels the pre-ordered block_sparse call runs besides flash-attn-4's, against the
direct call (session 12: pipelined pre-ordered was 4.6% slower than direct)."""
import sys, pathlib, time
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the checkout
import torch
import attnpatch
from benchmarks import block_sparse as B
from attnpatch.strategies import block_sparse as BSP
from torch.profiler import profile, ProfilerActivity

cfg = B.FULL["flux_2048_7x5"]
b, h, s, d = cfg["shape"]
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
plan = B.plan_of(q, k, v, cfg["options"], cfg["layout"])
fn, tiled, perm = B.direct_flash4(plan, q, k, v)
sparse = dict(backend="block_sparse", token_layout=cfg["layout"], **cfg["options"])

def pre():
    token = BSP._PREORDERED.set(plan.order)
    try:
        return attnpatch.attention(*tiled, layout="bshd", **sparse)
    finally:
        BSP._PREORDERED.reset(token)

def percall():
    return attnpatch.attention(q, k, v, layout="bshd", **sparse)

def direct():
    return fn(*tiled)

for name, f in (("direct", direct), ("pre-ordered", pre), ("per-call", percall)):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        f()
    host = (time.perf_counter() - t0) / 20 * 1e3
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            f()
        torch.cuda.synchronize()
    print(f"\n=== {name}: host ms per call (async, 20 calls) {host:.3f}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))
