"""The context-parallel strategies on CUDA kernels, one GPU: every inner kernel in bf16 and fp16
on a ring of one rank over NCCL, and the ring's arithmetic over uneven chunks simulated in one
process (partials, merge, exact backward), each within 2 x math's error in the same dtype
+ 1e-3 against float64, or refused with an error when the kernel does not take the calls.

Run on the GPU machine: ``python -m pytest -m gpu tests/strategies/test_context_parallel_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from .conftest import check_kernel_results, ring_of_one, run_ranks, simulated_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device")]

INNERS = ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flash4", "math")
HALF = (torch.bfloat16, torch.float16)


def _nccl_ring_of_one(rank: int, world: int) -> dict:
    return ring_of_one(None, "cuda", INNERS, HALF)


def test_ring_of_one_rank_over_nccl(tmp_path):
    check_kernel_results(run_ranks(_nccl_ring_of_one, 1, tmp_path, timeout=500,
                                   backend="nccl")[0])


def test_simulated_ranks_on_cuda_kernels():
    check_kernel_results(simulated_ranks("cuda", INNERS, HALF))
