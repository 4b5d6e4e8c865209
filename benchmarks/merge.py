"""Exact partial merges on the GPU: correctness of each kernel's backward from a merged (out, lse),
and the speed of a two-partial key split against one dense call, forward + backward.

Run on a CUDA machine: ``python benchmarks/merge.py --out benchmarks/results``. The key split is
``examples/key_split_strategy.py``'s ``KeySplit`` strategy (two halves of the keys on an inner
kernel, merged by ``attnpatch.merge_partials``). Times with CUDA events after warm-up, median of
repeated runs, dense and split in the same process on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout this script is in, not another install
sys.path.insert(0, str(ROOT / "examples"))
import attnpatch  # noqa: E402
from benchmarks.attention_kernels import cuda_time  # noqa: E402
from key_split_strategy import KeySplit  # noqa: E402,F401  (registers "key_split")

INNER = ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "math")
SPEED_SHAPE = (1, 24, 16896, 128)  # Flux 2048²


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def correctness(dtype: torch.dtype) -> list[dict]:
    """Key split on each inner kernel vs float64 dense attention: out and q/k/v gradients,
    next to the same errors of one dense call of that kernel."""
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, h, sq, sk, d = 2, 8, 1000, 1531, 128
    q64, k64, v64 = (torch.randn(b, h, s, d, device="cuda", dtype=torch.float64, generator=gen)
                     for s in (sq, sk, sk))
    grad64 = torch.randn(b, h, sq, d, device="cuda", dtype=torch.float64, generator=gen)
    leaves64 = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    ref = attnpatch.attention(*leaves64, backend="math")
    ref_grads = torch.autograd.grad(ref, leaves64, grad64)
    for inner in INNER:
        row = {"inner": inner, "dtype": str(dtype).replace("torch.", "")}
        for variant in ("dense", "split"):
            leaves = [t.to(dtype).requires_grad_() for t in (q64, k64, v64)]
            try:
                if variant == "dense":
                    out = attnpatch.attention(*leaves, backend=inner)
                else:
                    out = attnpatch.attention(*leaves, backend="key_split", inner=inner)
                grads = torch.autograd.grad(out, leaves, grad64.to(dtype))
            except attnpatch.AttnPatchError as err:
                row[variant] = f"refused: {str(err).splitlines()[-1].strip()}"
                continue
            row[variant] = {"out": rel(out, ref),
                            **{f"d{n}": rel(g, r) for n, g, r in zip("qkv", grads, ref_grads)}}
        rows.append(row)
    return rows


def speed(dtype: torch.dtype, inner: str) -> dict:
    b, h, s, d = SPEED_SHAPE
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype, generator=gen)
               .requires_grad_() for _ in range(3))
    grad = torch.randn(b, h, s, d, device="cuda", dtype=dtype, generator=gen)

    def step(**kw):
        out = attnpatch.attention(q, k, v, **kw)
        torch.autograd.grad(out, (q, k, v), grad)

    dense_ms = cuda_time(lambda: step(backend=inner), budget_s=3.0)
    split_ms = cuda_time(lambda: step(backend="key_split", inner=inner), budget_s=3.0)
    dense_fwd = cuda_time(lambda: attnpatch.attention(q.detach(), k.detach(), v.detach(),
                                                      backend=inner), budget_s=2.0)
    split_fwd = cuda_time(lambda: attnpatch.attention(q.detach(), k.detach(), v.detach(),
                                                      backend="key_split", inner=inner),
                          budget_s=2.0)
    return {"shape": SPEED_SHAPE, "dtype": str(dtype).replace("torch.", ""), "inner": inner,
            "dense_fwd_bwd_ms": dense_ms, "split_fwd_bwd_ms": split_ms,
            "ratio_fwd_bwd": split_ms / dense_ms, "dense_fwd_ms": dense_fwd,
            "split_fwd_ms": split_fwd, "ratio_fwd": split_fwd / dense_fwd}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="folder for merge.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("merge.py needs a CUDA device (it times kernels that run only there)")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "correctness": [r for dt in (torch.bfloat16, torch.float16) for r in correctness(dt)],
              "speed": [speed(torch.bfloat16, inner) for inner in ("sdpa_cudnn", "sdpa_flash")]}
    for row in result["correctness"]:
        print(row)
    print(f"{'inner':<12} {'dense fwd+bwd ms':>17} {'split fwd+bwd ms':>17} {'ratio':>6} "
          f"{'fwd ratio':>9}")
    for r in result["speed"]:
        print(f"{r['inner']:<12} {r['dense_fwd_bwd_ms']:>17.2f} {r['split_fwd_bwd_ms']:>17.2f} "
              f"{r['ratio_fwd_bwd']:>6.3f} {r['ratio_fwd']:>9.3f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "merge.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
