"""Every declared capability is honoured, for every registered backend that runs on this
machine's CPU (generated from the registry, so a new built-in, strategy or third-party backend
is covered without editing a list), and for a strategy registered here at test time.

For each capability: a call that uses it (and otherwise the plain call) is either run and
matches ``backend.reference`` within the backend's declared tolerance, or refused with exactly
``explain``'s reasons. A declared capability adds no reason to the plain call's, except one
naming this machine's device (a kernel's CPU limitation, e.g. flex has no CPU backward); an
undeclared one adds at least one reason to the plain call's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import attnpatch
from attnpatch import registry

from ..conftest import (CPU_BACKENDS, STRUCTURES, check_or_refuse, cpu_backends, make_inputs,
                        reference, run_or_refuse)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "key_split_strategy.py"

#: capability -> (declared by backend b, make_inputs keywords, call keywords, baseline
#: structures whose reasons the call may share)
CAPABILITIES = {
    "gqa": (lambda b: b.supports_gqa, dict(heads=4, kv_heads=2), {}, ["plain"]),
    "mqa": (lambda b: b.supports_gqa, dict(heads=4, kv_heads=1), {}, ["plain"]),
    "bool_mask": (lambda b: "bool" in b.mask_kinds, dict(mask="bool"), {}, ["plain"]),
    "float_mask": (lambda b: "float" in b.mask_kinds, dict(mask="float"), {}, ["plain"]),
    "key_padding": (lambda b: "key_padding" in b.mask_kinds, dict(mask="key_padding"), {},
                    ["plain"]),
    "causal": (lambda b: b.supports_causal, {}, dict(is_causal=True), ["plain"]),
    "causal_with_mask": (lambda b: b.supports_causal and b.supports_causal_with_mask
                         and "bool" in b.mask_kinds, dict(mask="bool"), dict(is_causal=True),
                         ["causal", "bool_mask"]),
    "value_head_dim": (lambda b: b.supports_value_head_dim, dict(head_dim_v=24), {},
                       ["plain"]),
    "softcap": (lambda b: b.supports_softcap, {}, dict(softcap=0.7), ["plain"]),
    "lse": (lambda b: b.supports_lse, {}, dict(return_lse=True), ["plain"]),
    "backward": (lambda b: b.supports_backward, {}, dict(grad=True), ["plain"]),
    "lse_with_grad": (lambda b: b.supports_lse and b.supports_backward and b.lse_has_grad, {},
                      dict(return_lse=True, grad=True), ["lse", "backward"]),
    "dropout": (lambda b: b.supports_dropout, {}, dict(dropout_p=0.5), ["plain"]),
}


def _inputs(**kw):
    return make_inputs(batch=2, heads=kw.pop("heads", 2), seq_q=9, seq_k=11, head_dim=16,
                       **kw)


def _reasons(backend, capability) -> list[str]:
    if capability == "plain":
        make, call = {}, {}
    else:
        _, make, call, _ = CAPABILITIES[capability]
    call = dict(call)
    grad = call.pop("grad", False)
    q, k, v, mask = _inputs(requires_grad=grad, **make)
    return attnpatch.explain(q, k, v, attn_mask=mask, backend=backend, **call).reasons[backend]


def check_capability(backend: str, capability: str) -> None:
    b = registry.get_backend(backend)
    declared, make, call, baselines = CAPABILITIES[capability]
    reasons = _reasons(backend, capability)
    if not declared(b):  # refused for something the plain call does not have
        plain = _reasons(backend, "plain")
        assert [r for r in reasons if r not in plain], (
            f"{backend} does not declare {capability} but takes the call")
        return
    base = {r for name in baselines for r in _reasons(backend, name)}
    added = [r for r in reasons if r not in base]
    assert all("cpu" in r.lower() for r in added), (
        f"{backend} declares {capability} but refuses it: {added}")
    q, k, v, mask = _inputs(**make)
    if capability == "dropout":  # applied, not ignored: only that (it is random)
        torch.manual_seed(0)
        dropped = run_or_refuse(backend, q, k, v, attn_mask=mask, **call)
        if dropped is not None:
            plain = attnpatch.attention(q, k, v, attn_mask=mask, backend=backend)
            assert not torch.allclose(dropped, plain), f"{backend} ignored dropout_p"
        return
    check_or_refuse(backend, q, k, v, mask, **call)


def check_structure(backend: str, structure: str, **call) -> None:
    """One cell of the structure matrix (as tests/backends/test_correctness.py runs it)."""
    opts = dict(STRUCTURES[structure])
    is_causal = opts.pop("is_causal", False)
    q, k, v, mask = make_inputs(batch=2, heads=opts.pop("heads", 2), seq_q=13, seq_k=17,
                                head_dim=16, **opts)
    check_or_refuse(backend, q, k, v, mask, is_causal=is_causal, **call)


@pytest.mark.parametrize("capability", list(CAPABILITIES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_declared_capability_is_honoured(backend, capability):
    check_capability(backend, capability)


def test_capabilities_report_the_declared_accuracy():
    for info in attnpatch.list_backends():
        b = registry.get_backend(info.name)
        assert info.capabilities["exact"] is b.exact
        assert info.capabilities["tolerance"] == {
            str(d).removeprefix("torch."): t for d, t in b.tolerance.items()}
        assert set(b.tolerance) >= set(b.dtypes), info.name
    assert registry.get_backend("math").exact


def test_default_reference_is_float64_attention():
    q, k, v, mask = _inputs(mask="float")
    call = attnpatch.explain(q, k, v, attn_mask=mask, is_causal=True, softcap=0.7).call
    out, lse = registry.get_backend("sdpa").reference(call)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    ref_out, ref_lse = reference(q, k, v, mask, True, softcap=0.7)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


@pytest.fixture
def key_split():
    """The key-split example strategy, registered for this test (as a user would)."""
    registered = "key_split" not in {b.name for b in registry.all_backends()}
    if registered:
        spec = importlib.util.spec_from_file_location("_key_split_example", EXAMPLE)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    yield registry.get_backend("key_split")
    if registered:
        registry.unregister_backend("key_split")


def test_a_strategy_registered_at_test_time_gets_the_same_matrix(key_split):
    assert isinstance(key_split, attnpatch.Strategy)
    assert "key_split" in cpu_backends() and "key_split" not in CPU_BACKENDS
    for capability in CAPABILITIES:
        check_capability("key_split", capability)
    for structure in STRUCTURES:
        check_structure("key_split", structure)
        check_structure("key_split", structure, return_lse=True)
        check_structure("key_split", structure, grad=True)
