"""Is pre-ordered block_sparse's FA4 kernel slower than the direct call? Alternating rounds of
10 back-to-back calls: direct (bench's lists), flash_attn_func on our plan's cached fa4 inputs,
attnpatch.attention pre-ordered, and direct again."""
import sys, pathlib, statistics, contextlib
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the checkout
import torch
import attnpatch
from benchmarks import block_sparse as B
from benchmarks._timing import alternating_rounds
from attnpatch.strategies import block_sparse as BSP
from flash_attn.cute import flash_attn_func

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
pre()
pplan = BSP._preordered(plan, plan.order)
tensors, mask_mod, aux = pplan.lists["fa4"]
print("our fa4 inputs: mask_mod", mask_mod, "aux", aux)
for name, t in (("ours", tensors[0]), ):
    for f in ("mask_block_cnt", "mask_block_idx", "full_block_cnt", "full_block_idx"):
        x = getattr(t, f)
        print(name, f, tuple(x.shape), x.stride(), x.dtype)
ours_lists = lambda: flash_attn_func(*tiled, block_sparse_tensors=tensors[0], block_sparse_tensors_bwd=tensors[1], return_lse=False)[0]
variants = {"direct": lambda: fn(*tiled),
            "fa4 on our lists": ours_lists, "attention pre-ordered": pre, "direct again": lambda: fn(*tiled)}
with torch.no_grad():
    for n in (1, 10):
        stats = alternating_rounds({k: (contextlib.nullcontext, (lambda f=f: [f() for _ in range(n)])) for k, f in variants.items()},
                                   "cuda", budget_s=1.0, warmup=2, min_reps=10, max_reps=100)
        print(f"--- {n} call(s) per time")
        for k in variants:
            r = stats["paired"].get(k)
            print(f"{k:24s} {stats[k]['median_ms']/n:8.3f} ms  vs direct {statistics.median(r) if r else 1.0:.3f}  reps {stats[k]['reps']}")
