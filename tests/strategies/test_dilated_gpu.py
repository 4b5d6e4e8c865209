"""dilated on CUDA: the CUDA-graph path (``cuda_graph``) replays exactly what the eager path
computes, forward and backward, call after call with new inputs, and stays within bf16 rounding
of the float64 definition.

Run on the GPU machine: ``python -m pytest -m gpu tests/strategies/test_dilated_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch import TokenLayout, registry
from attnpatch._cuda_graphs import captured_graphs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device")]

#: joint text + image like Flux, at a small size: 40 text tokens first, a 24x40 grid; rates
#: that divide the heads (strided copies) and one that does not (a gather)
LAYOUT = TokenLayout(40, "first", 1, 24, 40)
OPTIONS = dict(segment_lengths=(96, 192, 500, 1000), dilation_rates=(1, 2, 3, 4),
               inner="sdpa_cudnn", compile=True)


def _inputs(seed: int, heads=8, kv=8, seq=1000, dim=128):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(1, seq, h, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
            for h in (heads, kv, kv)]


def _call(q, k, v, graph: bool, **extra):
    return attnpatch.attention(q, k, v, layout="bshd", backend="dilated", token_layout=LAYOUT,
                               cuda_graph=graph, **OPTIONS, **extra)


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("kv", [8, 2], ids=["mha", "gqa"])
def test_graph_replays_equal_the_eager_path_call_after_call(kv):
    attnpatch._clear_caches()
    for seed in range(4):  # call 1 eager, call 2 captures, calls 3-4 replay
        q, k, v = _inputs(seed, kv=kv)
        with torch.no_grad():
            eager = _call(q, k, v, False)
            graphed = _call(q, k, v, True)
        torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    assert captured_graphs() == 1  # the graph ran (not a silent fallback to the eager path)
    call = attnpatch.explain(q, k, v, layout="bshd", backend="dilated", token_layout=LAYOUT,
                             **OPTIONS).call
    ref, _ = registry.get_backend("dilated").reference(call, call.options)
    assert _rel(graphed.transpose(1, 2), ref) < 1e-2


def test_graph_backward_equals_the_eager_backward():
    attnpatch._clear_caches()
    for seed in range(4):
        q, k, v = _inputs(seed)
        grad = torch.randn_like(q)
        results = []
        for graph in (False, True):
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = _call(*leaves, graph)
            results.append((out.detach(), torch.autograd.grad(out, leaves, grad)))
        (eager, eager_grads), (graphed, graphed_grads) = results
        torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
        for a, b in zip(graphed_grads, eager_grads):  # cuDNN's dQ sums in no fixed order
            assert _rel(a, b) < 2e-3
    assert captured_graphs() == 2  # forward with grad and backward


def test_an_expanded_gradient_and_a_mask_take_the_eager_way_correctly():
    attnpatch._clear_caches()
    mask = torch.rand(1, 1, 1000, 1000, device="cuda") > 0.2
    for seed in range(3):
        q, k, v = _inputs(seed)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        grads = torch.autograd.grad(_call(*leaves, True).float().sum(), leaves)
        ref_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        want = torch.autograd.grad(_call(*ref_leaves, False).float().sum(), ref_leaves)
        for a, b in zip(grads, want):
            assert _rel(a, b) < 2e-3
        with torch.no_grad():
            torch.testing.assert_close(_call(q, k, v, True, attn_mask=mask),
                                       _call(q, k, v, False, attn_mask=mask), rtol=0, atol=0)
