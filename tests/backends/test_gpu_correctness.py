"""The correctness matrix on CUDA (bf16/fp16), generated from the registry: every registered
backend whose declared devices include cuda (kernels, strategies, third-party), so a new one is
covered without editing a list.

Run on the GPU machine: ``python -m pytest -m gpu tests/backends/test_gpu_correctness.py``.
Every cell runs the backend and compares it with ``backend.reference(call)`` in float64 (dense
attention for a kernel, what a strategy means to compute for a strategy) within the backend's
declared per-dtype ``tolerance`` (and the dtype's epsilon when it declares ``exact``), or asserts
that it refuses the call with exactly the reasons ``explain`` gives (never a wrong answer). A
backend that is not available on the machine (a package not installed) refuses every cell so.
"""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch import registry

from ..conftest import (STRUCTURES, check_or_refuse, make_inputs, reference, rel_error,
                        run_or_refuse)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device")]

#: the backends of the GPU matrices, from the registry (``auto``'s order)
GPU_BACKENDS = tuple(b.name for b in registry.all_backends() if "cuda" in b.devices)
SHAPES = [(1, 1, 40), (77, 77, 64), (113, 113, 72), (1023, 1023, 128), (77, 1023, 64),
          (1023, 77, 128)]
DTYPES = (torch.bfloat16, torch.float16)
#: a cost limit, not a coverage list: these compile one kernel per signature (seconds each), so
#: they run the forward matrix on COMPILED_SHAPES in bf16 only (flash4 and flash have their own
#: full matrix in test_flash_gpu.py)
COMPILED = {"flex", "flash4", "flash"}
COMPILED_SHAPES = [(77, 77, 64), (1023, 77, 128)]


def _case(shape, structure, dtype):
    sq, sk, d = shape
    opts = dict(STRUCTURES[structure])
    is_causal = opts.pop("is_causal", False)
    q, k, v, mask = make_inputs(batch=2, heads=opts.pop("heads", 2), seq_q=sq, seq_k=sk,
                                head_dim=d, dtype=dtype, device="cuda", **opts)
    return q, k, v, mask, is_causal


def test_the_matrix_comes_from_the_registry():
    assert set(GPU_BACKENDS) == {b.name for b in attnpatch.list_backends()
                                 if "cuda" in b.capabilities["devices"]}
    assert {"sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "flex", "math",
            "flash4"} <= set(GPU_BACKENDS)


FORWARD_CASES = [
    pytest.param(backend, shape, structure, dtype,
                 id=f"{backend}-{'x'.join(map(str, shape))}-{structure}-{str(dtype)[6:]}")
    for backend in GPU_BACKENDS for shape in SHAPES for structure in STRUCTURES
    for dtype in DTYPES
    if backend not in COMPILED or (shape in COMPILED_SHAPES and dtype == torch.bfloat16)
]


@pytest.mark.parametrize("backend, shape, structure, dtype", FORWARD_CASES)
def test_forward(backend, shape, structure, dtype):
    q, k, v, mask, is_causal = _case(shape, structure, dtype)
    checked = check_or_refuse(backend, q, k, v, mask, is_causal=is_causal)
    if checked is not None:
        # the second call of a signature takes the warm path (for sdpa without a mask: the
        # kernel from Backend.specialize, no AttentionCall): same result
        again = attnpatch.attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                    backend=backend)
        assert torch.equal(again, checked[0])


@pytest.mark.parametrize("structure", ["plain", "gqa", "float", "key_padding", "causal",
                                       "causal+bool"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_lse(backend, structure):
    q, k, v, mask, is_causal = _case((113, 1023, 64), structure, torch.bfloat16)
    checked = check_or_refuse(backend, q, k, v, mask, is_causal=is_causal, return_lse=True)
    if not registry.get_backend(backend).supports_lse:
        assert checked is None


@pytest.mark.parametrize("structure", ["plain", "gqa", "float", "key_padding", "causal"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gradients(backend, structure):
    q, k, v, mask, is_causal = _case((113, 77, 64), structure, torch.bfloat16)
    checked = check_or_refuse(backend, q, k, v, mask, is_causal=is_causal, grad=True)
    if not registry.get_backend(backend).supports_backward:
        assert checked is None


def test_auto_prefers_a_fast_kernel_on_large_shapes():
    q, k, v, _ = make_inputs(batch=1, heads=24, seq_q=4608, head_dim=128, dtype=torch.bfloat16,
                             device="cuda")
    explanation = attnpatch.explain(q, k, v)
    assert explanation.choice not in ("math", "sdpa_math")


def test_auto_with_lse_takes_cudnn_over_torchs_flash_kernel_on_hopper():
    """A call plain `sdpa` cannot run (return_lse=True, as a strategy's partial) goes to
    cuDNN on compute capability 9.0+, where it measured 1.5-1.9x faster than torch's
    FlashAttention-2 kernel; before Hopper auto keeps its priority order."""
    q, k, v, _ = make_inputs(batch=2, heads=8, seq_q=2048, head_dim=128, dtype=torch.bfloat16,
                             device="cuda")
    explanation = attnpatch.explain(q, k, v, return_lse=True)
    if torch.cuda.get_device_capability() >= (9, 0):
        assert explanation.choice == "sdpa_cudnn", str(explanation)
        assert "auto prefers sdpa_cudnn" in explanation.reasons["sdpa_flash"][0]
    else:
        assert explanation.choice is not None, str(explanation)


# --- softcap: computed by the backends that declare it, refused by the others --------------------
SOFTCAP_BACKENDS = [b for b in GPU_BACKENDS if registry.get_backend(b).supports_softcap]


@pytest.mark.parametrize("structure", ["plain", "gqa", "bool", "float", "key_padding", "causal",
                                       "causal+bool"])
@pytest.mark.parametrize("backend", SOFTCAP_BACKENDS)
def test_softcap_forward_and_gradients(backend, structure):
    """Out and gradients against the capped reference within the declared tolerance, or a
    refusal with explain's reasons, never for the softcap itself (e.g. flash4's masks)."""
    q, k, v, mask, is_causal = _case((113, 77, 64), structure, torch.bfloat16)
    ref, _ = reference(q, k, v, mask, is_causal, softcap=0.5)
    assert rel_error(reference(q, k, v, mask, is_causal)[0], ref) > 1e-2  # the cap matters
    checked = check_or_refuse(backend, q, k, v, mask, is_causal=is_causal, softcap=0.5,
                              grad=True)
    if checked is None:
        reasons = attnpatch.explain(q, k, v, attn_mask=mask, is_causal=is_causal, softcap=0.5,
                                    backend=backend).reasons[backend]
        assert not any(r.startswith("softcap") for r in reasons), reasons


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b not in SOFTCAP_BACKENDS])
def test_softcap_refused_with_the_reason(backend):
    """A backend that does not declare softcap refuses it, saying so (one that cannot run on
    this machine at all: with its availability reasons, which come first)."""
    q, k, v, mask, is_causal = _case((77, 77, 64), "plain", torch.bfloat16)
    assert run_or_refuse(backend, q, k, v, softcap=0.5) is None
    reasons = attnpatch.explain(q, k, v, softcap=0.5, backend=backend).reasons[backend]
    unavailable = registry.get_backend(backend).availability_reasons()
    if unavailable:
        assert reasons == unavailable
    else:
        assert "softcap=0.5 not supported" in reasons


def test_auto_with_softcap_takes_a_backend_that_computes_it():
    q, k, v, _ = make_inputs(batch=1, heads=8, seq_q=1024, head_dim=128, dtype=torch.bfloat16,
                             device="cuda")
    choice = attnpatch.explain(q, k, v, softcap=30.0).choice
    assert choice in SOFTCAP_BACKENDS, choice
    out = attnpatch.attention(q, k, v, softcap=30.0)
    ref, _ = reference(q, k, v, softcap=30.0)
    assert rel_error(out, ref) <= registry.get_backend(choice).tolerance[torch.bfloat16]
