"""Host time of attention(backend='block_sparse') pre-ordered up to the FA4 call, on CPU with a
stand-in for flash_attn_func (profiling only: where our per-call host time goes)."""
import sys, types, time, cProfile, pstats, collections
import torch
fa = types.ModuleType("flash_attn"); cute = types.ModuleType("flash_attn.cute")
bs = types.ModuleType("flash_attn.cute.block_sparsity")
bs.BlockSparseTensorsTorch = collections.namedtuple("BST", "mask_block_cnt mask_block_idx full_block_cnt full_block_idx block_size")
cute.flash_attn_func = lambda q, k, v, **kw: (q, None)
sys.modules.update({"flash_attn": fa, "flash_attn.cute": cute, "flash_attn.cute.block_sparsity": bs})
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import attnpatch
from benchmarks import block_sparse as B
from attnpatch.strategies import block_sparse as BSP
BSP._kernel_reasons = lambda kernel, call: []
cfg = B.FULL["flux_2048_7x5"]
b, h, s, d = cfg["shape"]
q = torch.randn(b, s, h, d, dtype=torch.bfloat16)
sparse = dict(backend="block_sparse", token_layout=cfg["layout"], kernel="flash4", **cfg["options"])
plan = B.plan_of(q, q, q, cfg["options"], cfg["layout"])
def pre():
    token = BSP._PREORDERED.set(plan.order)
    try:
        return attnpatch.attention(q, q, q, layout="bshd", **sparse)
    finally:
        BSP._PREORDERED.reset(token)
for _ in range(5): pre()
n = 2000
t0 = time.perf_counter()
for _ in range(n): pre()
print(f"host us per call (stub kernel): {(time.perf_counter()-t0)/n*1e6:.1f}")
def direct():
    return cute.flash_attn_func(q, q, q, block_sparse_tensors=None, block_sparse_tensors_bwd=None)
t0 = time.perf_counter()
for _ in range(n): direct()
print(f"stub alone us: {(time.perf_counter()-t0)/n*1e6:.2f}")
if len(sys.argv) > 1:
    cProfile.run("for _ in range(2000): pre()", "/tmp/host.prof")
    pstats.Stats("/tmp/host.prof").sort_stats("tottime").print_stats(25)
