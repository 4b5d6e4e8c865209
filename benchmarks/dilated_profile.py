"""Where `dilated`'s time goes on the GPU: host (Python) time against GPU kernel time.

Flux 2048² shape (1, 24, 16896, 128) in (B, S, H, D) memory, bf16, the issue's patterns
(2048, 4096, 8192, 16896) x (1, 2, 4, 8), fused merge, inner cuDNN. Prints, for dense cuDNN
forward + backward and for dilated forward and forward + backward: the synced time per call,
the pipelined time (calls back to back), and the host's own time per call (Python, no sync);
then torch.profiler tables (GPU kernels; CPU self time) over five calls. A call whose host
time exceeds its GPU kernel time is host-bound.

    python benchmarks/dilated_profile.py        # needs a CUDA device
"""

from __future__ import annotations

import pathlib
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout this script is in, not another install
import attnpatch  # noqa: E402
from attnpatch._bench.sparse import FLUX_PATTERNS  # noqa: E402
from benchmarks._timing import PIPELINED, pipelined_timer, timer  # noqa: E402

#: seconds of timed runs per measurement
BUDGET_S = 0.5


def timing(fn, n: int = 30) -> tuple[float, float, float]:
    """(synced, pipelined, host) median milliseconds per call of ``fn``: CUDA events around
    one call, around ``PIPELINED`` calls back to back (per call), and the host's own time of
    one call (no sync)."""
    synced = timer(fn, "cuda", BUDGET_S, min_reps=n)
    pipelined = pipelined_timer(fn, PIPELINED, "cuda", BUDGET_S)
    host = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return synced, pipelined, sorted(host)[n // 2]


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("dilated_profile.py needs a CUDA device")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(1, 16896, 24, 128, device="cuda", dtype=torch.bfloat16,
                                 generator=gen) for _ in range(4))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    kw = dict(layout="bshd", backend="dilated", inner="sdpa_cudnn", compile=True,
              **FLUX_PATTERNS)

    def forward():
        with torch.no_grad():
            return attnpatch.attention(q, k, v, **kw)

    def both():
        out = attnpatch.attention(*leaves, **kw)
        torch.autograd.grad(out, leaves, grad)

    def dense_both():
        out = attnpatch.attention(*leaves, layout="bshd", backend="sdpa_cudnn")
        torch.autograd.grad(out, leaves, grad)

    for name, fn in (("dense fwd+bwd", dense_both), ("dilated fwd", forward),
                     ("dilated fwd+bwd", both)):
        synced, pipelined, host = timing(fn)
        print(f"{name:18s} synced {synced:7.3f} ms  pipelined {pipelined:7.3f} ms  "
              f"host (python, no sync) {host:7.3f} ms", flush=True)
    for name, fn in (("dilated fwd", forward), ("dilated fwd+bwd", both)):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        events = prof.key_averages()
        print(f"\n=== {name}: five calls", flush=True)
        print(events.table(sort_by="self_device_time_total", row_limit=14,
                           max_name_column_width=60))
        print(events.table(sort_by="self_cpu_time_total", row_limit=18,
                           max_name_column_width=60))


if __name__ == "__main__":
    main()
