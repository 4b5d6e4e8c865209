"""Every backend that runs on CPU (from the registry: built-in, strategies, third-party)
against its float64 reference (``Backend.reference``), within its declared ``tolerance``, or
refused with exactly the reasons ``explain`` gives."""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch import registry

from ..conftest import CPU_BACKENDS, STRUCTURES, check_or_refuse, make_inputs, rel_error

# (Sq, Sk, head_dim) with every S in {1, 77, 113, 1023} and every head_dim in {40, 64, 72, 128}
SHAPES = [(1, 1, 40), (77, 77, 64), (113, 113, 72), (1023, 1023, 128), (77, 113, 40),
          (113, 1, 64), (1, 77, 72), (1023, 77, 40)]
LOW = (torch.bfloat16, torch.float16)


def _case(shape, structure, dtype, seed=0):
    sq, sk, d = shape
    opts = dict(STRUCTURES[structure])
    is_causal = opts.pop("is_causal", False)
    heads = opts.pop("heads", 2)
    batch = 1 if sq * sk > 100_000 else 2
    q, k, v, mask = make_inputs(batch=batch, heads=heads, seq_q=sq, seq_k=sk, head_dim=d,
                                dtype=dtype, seed=seed, **opts)
    return q, k, v, mask, is_causal


def test_the_matrix_comes_from_the_registry():
    assert set(CPU_BACKENDS) == {b.name for b in registry.all_backends()
                                 if "cpu" in b.devices and not b.availability_reasons()}
    assert {"math", "sdpa", "sdpa_flash", "sdpa_math"} <= set(CPU_BACKENDS)


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp32_matches_reference_or_refuses(backend, shape, structure):
    q, k, v, mask, is_causal = _case(shape, structure, torch.float32)
    check_or_refuse(backend, q, k, v, mask, is_causal=is_causal)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("structure", ["plain", "gqa", "bool", "float", "key_padding", "causal"])
@pytest.mark.parametrize("shape", [(77, 77, 64), (113, 77, 72), (1023, 1023, 40)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_low_precision_within_tolerance_or_refuses(backend, shape, structure, dtype):
    """Within the declared tolerance of the reference (an exact backend: within the dtype's
    epsilon), and a backend that is not exact also within twice math's error + 1e-3."""
    q, k, v, mask, is_causal = _case(shape, structure, dtype)
    checked = check_or_refuse(backend, q, k, v, mask, is_causal=is_causal)
    if checked is None or registry.get_backend(backend).exact:
        return
    out, ref = checked
    math_err = rel_error(attnpatch.attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             backend="math"), ref)
    assert rel_error(out, ref) <= 2 * math_err + 1e-3


@pytest.mark.parametrize("structure", ["plain", "gqa", "bool", "float", "key_padding", "causal",
                                       "causal+bool"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lse_matches_reference_or_refuses(backend, structure):
    q, k, v, mask, is_causal = _case((77, 113, 64), structure, torch.float32)
    checked = check_or_refuse(backend, q, k, v, mask, is_causal=is_causal, return_lse=True)
    if not registry.get_backend(backend).supports_lse:
        assert checked is None


@pytest.mark.parametrize("seq", [4, 17, 64])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_with_a_float32_mask_matches_reference_or_refuses(backend, seq):
    """A float32 additive mask on float64 inputs (a mask built once, reused across dtypes):
    exact, and the lse float64 like every float64 call's (torch's CPU SDPA added such a mask
    wrongly from 16 keys on: 2.5 off, silently)."""
    q, k, v, mask = make_inputs(batch=2, heads=2, seq_q=seq, head_dim=8, dtype=torch.float64,
                                mask="float", seed=seq)
    check_or_refuse(backend, q, k, v, mask.float(), return_lse=registry.get_backend(
        backend).supports_lse)


@pytest.mark.parametrize("structure", ["plain", "gqa", "bool", "float", "key_padding", "causal",
                                       "causal+bool"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradients_match_reference_or_refuse(backend, structure):
    q, k, v, mask, is_causal = _case((33, 47, 40), structure, torch.float32)
    check_or_refuse(backend, q, k, v, mask, is_causal=is_causal, grad=True)


def test_math_gradcheck_float64():
    q, k, v, mask = make_inputs(batch=1, heads=2, kv_heads=1, seq_q=5, seq_k=7, head_dim=4,
                                dtype=torch.float64, mask="float", requires_grad=True)
    fn = lambda q, k, v: attnpatch.attention(q, k, v, attn_mask=mask, is_causal=True,
                                             backend="math")
    assert torch.autograd.gradcheck(fn, (q, k, v))
    fn_lse = lambda q, k, v: attnpatch.attention(q, k, v, attn_mask=mask, backend="math",
                                                 return_lse=True)[1]
    assert torch.autograd.gradcheck(fn_lse, (q, k, v))


def test_math_row_without_keys_is_zero_without_nan_gradients():
    q, k, v, _ = make_inputs(batch=1, heads=1, seq_q=3, seq_k=4, head_dim=8, requires_grad=True)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    out, lse = attnpatch.attention(q, k, v, attn_mask=mask, backend="math", return_lse=True)
    assert torch.equal(out[0, 0, 1], torch.zeros(8)) and lse[0, 0, 1] == float("-inf")
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_dropout_is_applied_not_ignored():
    q, k, v, _ = make_inputs(batch=1, heads=2, seq_q=64, head_dim=16)
    torch.manual_seed(0)
    dropped = attnpatch.attention(q, k, v, dropout_p=0.5, backend="math")
    plain = attnpatch.attention(q, k, v, backend="math")
    assert not torch.allclose(dropped, plain)
    assert torch.equal(attnpatch.attention(q, k, v, dropout_p=1.0, backend="math"),
                       torch.zeros_like(plain))
    # sdpa applies the same dropout semantics (torch's RNG): with p=1 everything is dropped
    assert torch.equal(attnpatch.attention(q, k, v, dropout_p=1.0, backend="sdpa"),
                       torch.zeros_like(plain))
