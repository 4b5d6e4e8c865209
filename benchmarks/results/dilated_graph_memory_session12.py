"""GPU memory a dilated call's CUDA graphs hold (Flux 2048² shape, bf16): allocated and reserved
after the eager call, after the forward graph, after the forward-in-autograd + backward graphs."""
import sys, pathlib
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the checkout
import torch
import attnpatch
from attnpatch._bench.sparse import DILATED_FULL
from attnpatch._cuda_graphs import captured_graphs

cfg = DILATED_FULL["flux_2048"]
b, h, s, d = cfg["shape"]
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
MB = 2 ** 20
print(f"q, k, v: {q.numel() * 2 / MB:.0f} MB each")
for inner in ("sdpa_cudnn", "flash4"):
    kw = dict(backend="dilated", layout="bshd", inner=inner, **cfg["options"])
    torch.cuda.synchronize(); torch.cuda.empty_cache()
    a0, r0 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    with torch.no_grad():
        torch.cuda.reset_peak_memory_stats()
        out = attnpatch.attention(q, k, v, cuda_graph=False, **kw); del out
        torch.cuda.synchronize()
        eager_peak = torch.cuda.max_memory_allocated() - a0
        n0 = captured_graphs()
        for _ in range(3):
            out = attnpatch.attention(q, k, v, cuda_graph=True, **kw)
        del out
    torch.cuda.synchronize(); torch.cuda.empty_cache()
    a1, r1 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    n1 = captured_graphs()
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    for _ in range(3):
        out = attnpatch.attention(*leaves, cuda_graph=True, **kw)
        torch.autograd.grad(out, leaves, torch.ones_like(out))
    del out
    torch.cuda.synchronize(); torch.cuda.empty_cache()
    a2, r2 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    n2 = captured_graphs()
    print(f"inner={inner}: eager forward peak {eager_peak / MB:.0f} MB; forward graph "
          f"({n1 - n0}) holds {(a1 - a0) / MB:.0f} MB allocated, {(r1 - r0) / MB:.0f} MB reserved; "
          f"+ autograd forward and backward graphs ({n2 - n1}) {(a2 - a1) / MB:.0f} MB allocated, "
          f"{(r2 - r1) / MB:.0f} MB reserved")
