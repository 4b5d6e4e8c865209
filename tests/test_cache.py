"""The selection cache never changes an answer: a warm call (a cached signature with the same
shapes and dtypes) gives what a cold call gives, the same error or the same correct result,
also when what differs is not a shape or dtype (devices, a mask that requires grad)."""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch.dispatch import _CACHE

from .conftest import cpu_backends, make_inputs, reference

BACKENDS = ["auto", *cpu_backends()]


def _outcome(fn):
    """("ok", result) or ("error", exception type, message) of ``fn()``."""
    try:
        return ("ok", fn())
    except Exception as err:  # noqa: BLE001 - compared below
        return ("error", type(err), str(err))


def _cold_and_warm(plain, variant):
    """The outcome of ``variant()`` with an empty cache, then after ``plain()`` (a valid call
    with the same shapes and dtypes) filled it."""
    _CACHE.clear()
    cold = _outcome(variant)
    _CACHE.clear()
    plain()
    return cold, _outcome(variant)


def _describe(outcome) -> str:
    if outcome[0] == "ok":
        return "returned a result"
    return f"raised {outcome[1].__name__}: {outcome[2]}"


def _assert_same_error(cold, warm):
    assert cold[0] == "error", "the cold call " + _describe(cold)
    assert warm[:3] == cold[:3], f"the warm call {_describe(warm)}; the cold call {_describe(cold)}"
    assert issubclass(cold[1], attnpatch.AttnPatchError), "the call " + _describe(cold)


@pytest.mark.parametrize("mask", ["bool", "float"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_on_another_device_raises_cold_and_warm(backend, mask):
    """A mask on another device (meta stands in for it on CPU) is refused with the same
    AttnPatchError whether the signature is cached or not."""
    q, k, v, attn_mask = make_inputs(batch=2, heads=2, seq_q=5, seq_k=7, head_dim=16, mask=mask)
    cold, warm = _cold_and_warm(
        lambda: attnpatch.attention(q, k, v, attn_mask=attn_mask, backend=backend),
        lambda: attnpatch.attention(q, k, v, attn_mask=attn_mask.to("meta"), backend=backend))
    _assert_same_error(cold, warm)
    assert "attn_mask is on meta but query is on cpu" in cold[2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_and_value_on_another_device_raise_cold_and_warm(backend):
    """Key and value on another device (meta) are refused with the same AttnPatchError whether
    the signature is cached or not."""
    q, k, v, _ = make_inputs(batch=2, heads=2, seq_q=5, seq_k=7, head_dim=16)
    cold, warm = _cold_and_warm(
        lambda: attnpatch.attention(q, k, v, backend=backend),
        lambda: attnpatch.attention(q, k.to("meta"), v.to("meta"), backend=backend))
    _assert_same_error(cold, warm)
    assert "key is on meta but query is on cpu" in cold[2]


@pytest.mark.parametrize("qkv_grad", [False, True], ids=["mask-grad", "mask-and-qkv-grad"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_requiring_grad_cold_and_warm(backend, qkv_grad):
    """A float mask that requires grad, after the same call without grad filled the cache:
    the warm call gives what the cold call gives, either the same refusal (an AttnPatchError:
    a backend that cannot differentiate the mask says so) or the same output with the mask
    gradient of the float64 reference."""
    q, k, v, bias = make_inputs(batch=2, heads=2, seq_q=5, seq_k=7, head_dim=16, mask="float")
    qg, kg, vg = (t.clone().requires_grad_(qkv_grad) for t in (q, k, v))
    ref_bias = bias.double().requires_grad_()
    ref, _ = reference(q, k, v, ref_bias)
    ref.sum().backward()

    def with_grad():
        mask = bias.clone().requires_grad_()
        out = attnpatch.attention(qg, kg, vg, attn_mask=mask, backend=backend)
        out.sum().backward()
        return out.detach(), mask.grad

    cold, warm = _cold_and_warm(
        lambda: attnpatch.attention(q, k, v, attn_mask=bias, backend=backend), with_grad)
    if cold[0] == "error" or warm[0] == "error":
        _assert_same_error(cold, warm)
        return
    for outcome in (cold, warm):
        out, grad = outcome[1]
        torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-5)
        assert grad is not None, "no gradient reached the mask"
        torch.testing.assert_close(grad.double(), ref_bias.grad, rtol=1e-4, atol=1e-5)
