"""The xformers backend: exact reasons without it; xFormers' own reasons when it can't run.

The GPU tests (``-m gpu``) check, on a CUDA machine with xformers installed, either the
rejection path (xformers' operators don't load: its per-operator reasons become ours) or, where
a matching build loads, the numerics against the math backend.
"""

from __future__ import annotations

import sys

import pytest
import torch

import attnpatch
from attnpatch import constraints as C
from attnpatch.backends.xformers import XFormersBackend, parse_xformers_reasons

from ..conftest import make_inputs

NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"
CPU = "device cpu not supported (needs cuda)"


def call_for(mask=None, dtype=torch.float16, device="cpu", is_causal=False, return_lse=False,
             **kw):
    q, k, v, attn_mask = make_inputs(mask=mask, dtype=dtype, device=device, **kw)
    return attnpatch.explain(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                             return_lse=return_lse).call


@pytest.mark.skipif(torch.cuda.is_available() or C.module_present("xformers"),
                    reason="asserts the reasons of a CPU machine without xformers")
def test_missing_package_reason_is_exact():
    assert XFormersBackend().availability_reasons() == [
        "package xformers not installed (pip install xformers)", NO_CUDA]
    with pytest.raises(attnpatch.BackendUnavailableError) as err:
        attnpatch.attention(*make_inputs(dtype=torch.float16)[:3], backend="xformers")
    assert err.value.reasons == {"xformers": [
        "package xformers not installed (pip install xformers)", NO_CUDA]}


def test_call_reasons_are_exact():
    backend = XFormersBackend()
    assert backend.not_supported_reasons(call_for()) == [CPU]
    assert backend.not_supported_reasons(call_for(dtype=torch.float64)) == [
        CPU, "dtype torch.float64 not in (float16, bfloat16, float32)"]
    assert backend.not_supported_reasons(call_for(return_lse=True)) == [
        CPU, "return_lse=True not supported"]
    for kw in (dict(mask="bool"), dict(mask="float"), dict(mask="key_padding"),
               dict(mask="key_padding", is_causal=True), dict(heads=8, kv_heads=2),
               dict(dtype=torch.float32), dict(seq_q=7, seq_k=12, is_causal=True)):
        assert backend.not_supported_reasons(call_for(**kw)) == [CPU], kw


def test_installed_but_ops_do_not_import(monkeypatch, tmp_path):
    """What the GPU machine shows with xformers next to flash-attn-4: xformers.ops imports
    flash_attn.flash_attn_interface whenever a flash_attn package exists."""
    from attnpatch.backends import xformers

    (tmp_path / "xformers" / "ops").mkdir(parents=True)
    (tmp_path / "xformers" / "__init__.py").write_text("")
    (tmp_path / "xformers" / "ops" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'flash_attn.flash_attn_interface'\")\n")
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    caches = (C.module_present, xformers._load)
    for cache in caches:
        cache.cache_clear()
    try:
        reasons = XFormersBackend().availability_reasons()
        assert reasons[0] == (
            "xformers is installed but xformers.ops does not import (ModuleNotFoundError: No "
            "module named 'flash_attn.flash_attn_interface'); xformers imports flash-attn 2 "
            "whenever a flash_attn package exists, and flash-attn-4 installs only "
            "flash_attn.cute")
        assert XFormersBackend().description == "xFormers memory_efficient_attention"
    finally:
        for cache in caches:
            cache.cache_clear()
        for name in [m for m in sys.modules if m.split(".")[0] in ("xformers", "flash_attn")]:
            del sys.modules[name]


# The shape of xFormers' dispatcher error (xformers/ops/fmha/dispatch.py, _run_priority_list).
NO_OPERATOR = """No operator found for `memory_efficient_attention_forward` with inputs:
     query       : shape=(2, 16, 8, 64) (torch.float16)
     key         : shape=(2, 16, 8, 64) (torch.float16)
     value       : shape=(2, 16, 8, 64) (torch.float16)
     attn_bias   : <class 'NoneType'>
     p           : 0.0
`fa3F@0.0.0` is not supported because:
    operator wasn't built - see `python -m xformers.info` for more info
`fa2F@2.8.3` is not supported because:
    dtype=torch.float32 (supported: {torch.float16, torch.bfloat16})
    operator wasn't built - see `python -m xformers.info` for more info
`cutlassF-pt` is not supported because:
    xFormers wasn't build with CUDA support"""


def test_parse_xformers_reasons():
    assert parse_xformers_reasons(NO_OPERATOR) == [
        "xformers fa3F@0.0.0: operator wasn't built - see `python -m xformers.info` for more "
        "info",
        "xformers fa2F@2.8.3: dtype=torch.float32 (supported: {torch.float16, torch.bfloat16}); "
        "operator wasn't built - see `python -m xformers.info` for more info",
        "xformers cutlassF-pt: xFormers wasn't build with CUDA support",
    ]
    assert parse_xformers_reasons("something\n  else", prefix="xformers backward") == [
        "xformers backward: something else"]


# --- GPU machine ---------------------------------------------------------------------------------
CASES = [dict(), dict(is_causal=True, seq_q=40, seq_k=72), dict(mask="key_padding"),
         dict(mask="key_padding", is_causal=True), dict(mask="float"), dict(mask="bool"),
         dict(heads=8, kv_heads=2), dict(heads=8, kv_heads=2, mask="key_padding")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not C.module_present("xformers"), reason="xformers not installed")
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_gpu_xformers_rejects_with_its_own_reasons_or_matches_math(case, grad):
    from attnpatch.backends.xformers import _extension_error

    case = dict(case)
    is_causal = case.pop("is_causal", False)
    q, k, v, mask = make_inputs(dtype=torch.float16, device="cuda", seq_q=case.pop("seq_q", 48),
                                seq_k=case.pop("seq_k", None), head_dim=64,
                                requires_grad=grad, **case)
    backend = XFormersBackend()
    unavailable = backend.availability_reasons()
    if unavailable:  # e.g. xformers.ops does not import next to flash-attn-4
        assert unavailable[0].startswith("xformers is installed but xformers.ops does not "
                                         "import ("), unavailable
        with pytest.raises(attnpatch.BackendUnavailableError) as err:
            attnpatch.attention(q, k, v, attn_mask=mask, is_causal=is_causal, backend="xformers")
        assert err.value.reasons["xformers"] == unavailable
        return
    call = attnpatch.explain(q, k, v, attn_mask=mask, is_causal=is_causal).call
    reasons = backend.not_supported_reasons(call)
    if reasons:  # e.g. xformers' C++/CUDA operators were built for another torch
        assert all(r.startswith("xformers") and ": " in r for r in reasons), reasons
        if _extension_error():
            assert reasons[0].startswith("xformers C++/CUDA extension not loaded: xFormers")
            assert len(reasons) >= 2  # and then each operator's own reasons
        with pytest.raises(attnpatch.BackendUnavailableError) as err:
            attnpatch.attention(q, k, v, attn_mask=mask, is_causal=is_causal, backend="xformers")
        assert err.value.reasons["xformers"] == reasons
        return
    out = attnpatch.attention(q, k, v, attn_mask=mask, is_causal=is_causal, backend="xformers")
    ref = attnpatch.attention(q, k, v, attn_mask=mask, is_causal=is_causal, backend="math")
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    if grad:
        g = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        r = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
        for a, b in zip(g, r):
            torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
