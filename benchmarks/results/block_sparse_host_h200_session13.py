"""Session 13: the host time of block_sparse's pre-ordered call before and after the dispatcher's
specialized flash-attn-4 kernel, on the GPU machine (the stamp at FA4's entry adds a little to the two attention() variants'
host time; the direct call keeps the unwrapped function). Flux 2048² tile2d 7x5, bf16, (B, S, H, D)
memory. Variants in alternating rounds (1 call and 10 back to back per time): FA4 called
directly (the bench's lists), attnpatch.attention pre-ordered (specialized kernel), the same
through forward() every call (a registered subclass whose specialize() returns None: the
session-12 path), and direct again. Then the host microseconds per call (no sync inside the
timed loop of 20 calls, each loop after a sync) and the same with a CPU timestamp at the entry
of flash_attn_func: our Python before FA4 is entered."""
import sys, pathlib, statistics, contextlib, time
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the checkout
import torch
import attnpatch
from benchmarks import block_sparse as B
from benchmarks._timing import alternating_rounds
from attnpatch.strategies import block_sparse as BSP


class General(BSP.BlockSparseAttention):
    name = "block_sparse_general"

    def specialize(self, call):
        return None


attnpatch.register_backend(General)
cfg = B.FULL["flux_2048_7x5"]
b, h, s, d = cfg["shape"]
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
           for _ in range(3))
plan = B.plan_of(q, k, v, cfg["options"], cfg["layout"])
fn, tiled, perm = B.direct_flash4(plan, q, k, v)


def pre(name):
    kw = dict(backend=name, token_layout=cfg["layout"], **cfg["options"])

    def call():
        token = BSP._PREORDERED.set(plan.order)
        try:
            return attnpatch.attention(*tiled, layout="bshd", **kw)
        finally:
            BSP._PREORDERED.reset(token)
    return call


ours, general = pre("block_sparse"), pre("block_sparse_general")
with torch.no_grad():
    ref = fn(*tiled)
    for f in (ours, general):
        f()
        assert torch.equal(f(), ref), "pre-ordered output differs from direct FA4"
    entries = [e for e in attnpatch.dispatch._CACHE.values()
               if isinstance(e[3], BSP._Flash4Kernel)]
    print("specialized kernels:", [type(e[3]).__name__ for e in entries])
    variants = {"direct": lambda: fn(*tiled), "attention pre-ordered (specialized)": ours,
                "attention pre-ordered via forward()": general, "direct again": lambda: fn(*tiled)}
    for n in (1, 10):
        stats = alternating_rounds(
            {k_: (contextlib.nullcontext, (lambda f=f: [f() for _ in range(n)]))
             for k_, f in variants.items()}, "cuda", budget_s=1.5, warmup=2, min_reps=10,
            max_reps=150)
        print(f"--- {n} call(s) per time (alternating rounds; ratio: median of paired ratios)")
        for k_ in variants:
            r = stats["paired"].get(k_)
            print(f"{k_:40s} {stats[k_]['median_ms'] / n:8.3f} ms  vs direct "
                  f"{statistics.median(r) if r else 1.0:.3f}  reps {stats[k_]['reps']}")

    import flash_attn.cute as cute
    real = cute.flash_attn_func
    entered = []

    def stamped(*a, **kw):
        entered.append(time.perf_counter())
        return real(*a, **kw)
    print("--- host microseconds per call (20 calls, median of 30 loops)")
    for name, f in variants.items():
        if name == "direct again":
            continue
        host, before = [], []
        for _ in range(30):
            torch.cuda.synchronize()
            cute.flash_attn_func = stamped  # the forward() path imports it per call
            for e in entries:  # the specialized kernel holds it
                e[3].flash_attn_func = stamped
            entered.clear()
            starts = []
            t0 = time.perf_counter()
            for _ in range(20):
                starts.append(time.perf_counter())
                f()
            t1 = time.perf_counter()
            cute.flash_attn_func = real
            for e in entries:
                e[3].flash_attn_func = real
            host.append((t1 - t0) / 20 * 1e6)
            if len(entered) == 20:
                before.append(statistics.median(e - s0 for e, s0 in zip(entered, starts)) * 1e6)
        line = f"{name:40s} host {statistics.median(host):7.1f} us/call"
        if before:
            line += f"   entry -> flash_attn_func {statistics.median(before):6.1f} us"
        print(line)
print(torch.cuda.get_device_name(), torch.__version__)
