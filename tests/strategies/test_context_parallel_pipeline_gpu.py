"""The pipeline level of context parallelism on CUDA, one GPU: tiny Flux and Wan transformers
patched with ``ring``/``ulysses``/``usp`` on a group of one rank over NCCL (the plan's splits
and gathers, the NCCL collectives, the CUDA inner kernels): bf16 forwards against the unpatched
model, and a fp32 LoRA step's gradients against the unpatched model's.

Run on the GPU machine: ``python -m pytest -m gpu tests/strategies/test_context_parallel_pipeline_gpu.py``
(the same checks run on CPU over gloo in the CPU suite, so the logic is tested everywhere).
"""

from __future__ import annotations

import pytest
import torch

import attnpatch

from ..tiny_models import flux, no_attnpatch_state, output_of, rel_error, seeded, wan
from .conftest import run_ranks

CASES = [("flux", "ring", {}), ("flux", "ulysses", {}), ("wan", "ring", {}),
         ("wan", "usp", {"ring_degree": 1})]
BUILD = dict(flux=flux, wan=wan)


def _to(kw: dict, device, dtype) -> dict:
    return {k: v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor)
            and v.is_floating_point() else (v.to(device) if isinstance(v, torch.Tensor) else v)
            for k, v in kw.items()}


def _check(device: str, inner: str) -> dict:
    """Per case: the bf16 forward error against the unpatched model, the fp32 LoRA gradients'
    worst error, and what unpatch leaves."""
    from peft import LoraConfig

    results = {}
    for name, backend, options in CASES:
        model, kw = BUILD[name]()
        model = seeded(model).to(device=device, dtype=torch.bfloat16)
        kw16 = _to(kw, device, torch.bfloat16)
        with torch.no_grad():
            ref = output_of(model(**kw16)).float()
            with attnpatch.patch(model, backend=backend, inner=inner, **options):
                out = output_of(model(**kw16)).float()
        forward = rel_error(out, ref)
        left = no_attnpatch_state(model)

        model = model.float().requires_grad_(False)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v"]))
        kw32 = _to(kw, device, torch.float32)

        def grads():
            model.zero_grad(set_to_none=True)
            output_of(model(**kw32)).square().mean().backward()
            return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

        expected = grads()
        with attnpatch.patch(model, backend=backend, inner=inner, **options):
            got = grads()
        results[f"{name}-{backend}"] = dict(
            forward=forward, grads=max(rel_error(got[n], expected[n]) for n in expected),
            left=left)
    return results


def _gpu_worker(rank: int, world: int) -> dict:
    return _check("cuda", "auto")  # per block, a CUDA kernel with an lse and its backward


def _cpu_worker(rank: int, world: int) -> dict:
    return _check("cpu", "math")


def _assert(results: dict, forward_tol: float, grad_tol: float) -> None:
    for case, r in results.items():
        assert r["forward"] <= forward_tol and r["grads"] <= grad_tol, (case, r)
        assert r["left"] == [], (case, r)


@pytest.mark.distributed
def test_group_of_one_over_gloo_on_cpu(tmp_path):
    _assert(run_ranks(_cpu_worker, 1, tmp_path, timeout=120)[0], 2e-2, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_group_of_one_over_nccl_on_cuda(tmp_path):
    _assert(run_ranks(_gpu_worker, 1, tmp_path, timeout=300, backend="nccl")[0], 2e-2, 1e-3)
