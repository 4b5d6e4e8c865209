"""The registry: declared capabilities become specific reasons; third-party backends."""

from __future__ import annotations

import logging

import pytest
import torch

import attnpatch
from attnpatch import AttnPatchError, Backend, BackendUnavailableError
from attnpatch.registry import get_backend

from .conftest import make_inputs


@pytest.fixture
def registered():
    names = []

    def register(cls):
        attnpatch.register_backend(cls)
        names.append(cls.name)
        return cls
    yield register
    for name in names:
        attnpatch.unregister_backend(name)


class _Recording(Backend):
    """A real (if simple) backend: SDPA underneath, counting its calls."""

    calls = 0

    def forward(self, call, **options):
        type(self).calls += 1
        return torch.nn.functional.scaled_dot_product_attention(
            call.query, call.key, call.value, attn_mask=call.combined_mask(), scale=call.scale,
            enable_gqa=call.is_gqa)


def test_specific_reasons_from_capabilities(registered):
    @registered
    class Narrow(_Recording):
        name = "narrow"
        priority = None
        devices = ("cuda",)
        dtypes = (torch.float16, torch.bfloat16)
        max_head_dim = 256
        mask_kinds = frozenset({"none"})
        supports_dropout = False
        supports_gqa = False

    q, k, v, mask = make_inputs(heads=4, kv_heads=2, head_dim=320, mask="bool")
    reasons = attnpatch.explain(q, k, v, attn_mask=mask, dropout_p=0.1).reasons["narrow"]
    assert "no CUDA device (torch.cuda.is_available() is False)" in reasons or reasons == [
        "device cpu not supported (needs cuda)"]
    backend = get_backend("narrow")
    call = attnpatch.explain(q, k, v, attn_mask=mask, dropout_p=0.1).call
    assert backend.not_supported_reasons(call) == [
        "device cpu not supported (needs cuda)",
        "dtype torch.float32 not in (float16, bfloat16)",
        "head_dim 320 > 256",
        "bool attn_mask not supported (supports: none)",
        "dropout_p=0.1 not supported (only 0.0)",
        "grouped-query attention (4 query heads, 2 kv heads) not supported",
    ]


def test_missing_package_is_a_reason_not_an_import_error(registered):
    @registered
    class NeedsPackage(_Recording):
        name = "needs_pkg"
        requires_package = "surely_not_installed_pkg"
        requires_pip_name = "surely-not-installed-pkg"

    info = {i.name: i for i in attnpatch.list_backends()}["needs_pkg"]
    assert not info.available
    assert info.reasons == ["package surely_not_installed_pkg not installed "
                            "(pip install surely-not-installed-pkg)"]
    q, k, v, _ = make_inputs()
    with pytest.raises(BackendUnavailableError) as err:
        attnpatch.attention(q, k, v, backend="needs_pkg")
    assert err.value.reasons == {"needs_pkg": info.reasons}
    assert "surely_not_installed_pkg not installed" in str(err.value)
    # auto passes over it and still runs
    assert attnpatch.explain(q, k, v).choice == "sdpa"


def test_third_party_backend_is_first_class_in_auto(registered, caplog):
    @registered
    class First(_Recording):
        name = "first"
        priority = 10
        dtypes = (torch.float64,)
        aliases = ("premier",)

    q, k, v, _ = make_inputs(dtype=torch.float64)
    assert attnpatch.explain(q, k, v).choice == "first"
    before = First.calls
    attnpatch.attention(q, k, v)
    attnpatch.attention(q, k, v, backend="premier")
    assert First.calls == before + 2
    # float32: auto falls back to sdpa and logs why, once per signature
    q32, k32, v32, _ = make_inputs(seq_q=19)
    with caplog.at_level(logging.INFO, logger="attnpatch.dispatch"):
        attnpatch.attention(q32, k32, v32)
        attnpatch.attention(q32, k32, v32)
    logged = [r.getMessage() for r in caplog.records if "passed over" in r.getMessage()]
    assert len(logged) == 1 and "first: dtype torch.float32 not in (float64)" in logged[0]
    assert First.calls == before + 2


def test_registration_errors(registered):
    class NoName(_Recording):
        name = ""

    class NoForward(Backend):
        name = "noforward"

    class Clash(_Recording):
        name = "sdpa"

    with pytest.raises(AttnPatchError, match="non-empty lowercase"):
        attnpatch.register_backend(NoName)
    with pytest.raises(AttnPatchError, match="must implement forward"):
        attnpatch.register_backend(NoForward)
    with pytest.raises(AttnPatchError, match="already registered"):
        attnpatch.register_backend(Clash)
    with pytest.raises(AttnPatchError, match="expects a Backend"):
        attnpatch.register_backend(object)


def test_explicit_backend_that_cannot_run_raises_with_reasons():
    q, k, v, _ = make_inputs()
    with pytest.raises(BackendUnavailableError) as err:
        attnpatch.attention(q, k, v, backend="sdpa_cudnn")
    assert list(err.value.reasons) == ["sdpa_cudnn"]
    with pytest.raises(BackendUnavailableError, match="dropout_p=0.2 not supported"):
        attnpatch.attention(q, k, v, backend="flex", dropout_p=0.2)


def test_diffusers_names_are_aliases():
    for alias, name in [("native", "sdpa"), ("_native_cudnn", "sdpa_cudnn"),
                        ("_native_flash", "sdpa_flash"), ("_native_efficient", "sdpa_efficient"),
                        ("_native_math", "sdpa_math"), ("flex", "flex")]:
        assert get_backend(alias).name == name


def test_list_backends_table():
    table = attnpatch.list_backends()
    names = [i.name for i in table]
    assert names[:2] == ["flash4", "sdpa"] and names[-1] != "math" and "math" in names
    by_name = {i.name: i for i in table}
    assert by_name["math"].available and by_name["math"].capabilities["returns_lse"]
    assert not by_name["sdpa_cudnn"].available
    text = str(table)
    assert "sdpa_cudnn" in text and "no CUDA device" in text


def test_family_backend_delegates_once_per_signature(registered):
    @registered
    class Family(_Recording):
        name = "family"
        priority = None
        chosen = 0

        def delegate(self, call):
            type(self).chosen += 1
            return get_backend("math")

    q, k, v, _ = make_inputs(seq_q=17)
    selection = attnpatch.dispatch.dispatch_call(q, k, v, backend="family")[1]
    assert selection.backend.name == "math" and selection.requested == "family"
    before = (Family.calls, Family.chosen)
    for _ in range(3):
        attnpatch.attention(q, k, v, backend="family")
    assert (Family.calls, Family.chosen) == before  # the member runs; no per-call choosing
    assert attnpatch.explain(q, k, v, backend="family").choice == "math"


def test_register_backend_refuses_a_non_backend_class_without_instantiating_it():
    built = []

    class NotABackend:
        def __init__(self):
            built.append(self)

    for bad in (torch.nn.Linear, NotABackend, NotABackend.__init__):
        with pytest.raises(AttnPatchError, match="expects a Backend subclass or instance"):
            attnpatch.register_backend(bad)
    assert built == []
