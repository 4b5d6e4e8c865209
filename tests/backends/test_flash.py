"""FlashAttention backends on a machine without them: every refusal is a specific reason.

Numerics run on the GPU machine (tests/backends/test_flash_gpu.py); the exact helpers they
rely on are proven on CPU in test_padding.py.
"""

from __future__ import annotations

import importlib
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import attnpatch
from attnpatch import constraints as C
from attnpatch import registry
from attnpatch.backends import flash as F
from attnpatch.backends.flash import Flash2Backend, Flash3Backend, Flash4Backend, FlashBackend

from ..conftest import make_inputs

NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"
VERSIONS = (Flash4Backend, Flash3Backend, Flash2Backend)
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the CPU reasons")


@pytest.fixture
def fresh_lookups(monkeypatch, tmp_path):
    """A temporary sys.path entry; presence/import caches cleared before and after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    C.module_present.cache_clear()
    F._import.cache_clear()
    importlib.invalidate_caches()
    yield tmp_path
    C.module_present.cache_clear()
    F._import.cache_clear()
    for name in [m for m in sys.modules if m.split(".")[0] in ("flash_attn", "attnpatch_broken")]:
        del sys.modules[name]


def call_for(**kw):
    """The normalized call attnpatch builds for these inputs (no backend runs)."""
    mask_kind = kw.pop("mask", None)
    is_causal = kw.pop("is_causal", False)
    dropout_p = kw.pop("dropout_p", 0.0)
    return_lse = kw.pop("return_lse", False)
    kw.setdefault("dtype", torch.float16)
    q, k, v, mask = make_inputs(mask=mask_kind, **kw)
    return attnpatch.explain(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                             return_lse=return_lse).call


# --- environment: package, import, device -------------------------------------------------------
class AbsentFlash4(Flash4Backend):  # test doubles: a package that is certainly not installed
    name = "test_absent_flash4"
    probe = "attnpatch_absent_pkg.cute"


class AbsentFlash3(Flash3Backend):
    name = "test_absent_flash3"
    probe = "attnpatch_absent_pkg_interface"


class AbsentFlash2(Flash2Backend):
    name = "test_absent_flash2"
    probe = "attnpatch_absent_pkg.flash_attn_interface"


@needs_no_cuda
def test_missing_package_reasons_are_exact():
    assert AbsentFlash4().availability_reasons() == [
        "package flash_attn.cute not installed (pip install flash-attn-4)", NO_CUDA]
    assert AbsentFlash3().availability_reasons() == [
        "package flash_attn_interface not installed (build FlashAttention-3: "
        "flash-attention/hopper, python setup.py install)", NO_CUDA]
    assert AbsentFlash2().availability_reasons()[0] == (
        "package flash_attn not installed (pip install flash-attn)")


@needs_no_cuda
def test_registered_backends_on_this_machine():
    for cls in VERSIONS:
        backend = registry.get_backend(cls.name)
        if C.module_present(cls.probe):
            pytest.skip(f"{cls.package} is installed here")
        assert backend.availability_reasons() == [backend.missing_reason(), NO_CUDA]
    info = {i.name: i for i in attnpatch.list_backends()}
    for name in ("flash", "flash2", "flash3", "flash4"):
        assert not info[name].available and info[name].reasons


def test_flash2_reason_says_only_flash4_is_there(fresh_lookups):
    cute = fresh_lookups / "flash_attn" / "cute"  # flash-attn-4 has no flash_attn/__init__.py
    cute.mkdir(parents=True)
    (cute / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    assert C.module_present("flash_attn.cute")
    assert not C.module_present("flash_attn.flash_attn_interface")
    assert Flash2Backend().availability_reasons()[0] == (
        "package flash_attn not installed (pip install flash-attn); only flash-attn-4's "
        "flash_attn.cute is there (backend flash4)")
    assert "flash_attn" not in sys.modules  # presence is checked without importing


def test_installed_but_broken_package(fresh_lookups):
    pkg = fresh_lookups / "attnpatch_broken"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "raise ImportError('attnpatch_broken_C.so: undefined symbol: _ZN3c104cuda9SetDevice')\n")

    class Broken(Flash4Backend):
        name = "test_broken"
        probe = module = package = "attnpatch_broken"

    reasons = Broken().availability_reasons()
    assert reasons[0] == (
        "attnpatch_broken is installed but does not import (ImportError: attnpatch_broken_C.so: "
        "undefined symbol: _ZN3c104cuda9SetDevice); it may be built for another torch: "
        f"reinstall it for torch {torch.__version__} (CUDA {torch.version.cuda})")


def test_module_present_finds_modules_files_and_packages(fresh_lookups):
    (fresh_lookups / "attnpatch_broken").mkdir()
    (fresh_lookups / "attnpatch_broken" / "__init__.py").write_text("raise ImportError\n")
    (fresh_lookups / "attnpatch_broken" / "iface.py").write_text("raise ImportError\n")
    assert C.module_present("attnpatch_broken")
    assert C.module_present("attnpatch_broken.iface")
    assert not C.module_present("attnpatch_broken.nope")
    assert not C.module_present("attnpatch_broken.iface.deeper")
    assert C.module_present("torch.nn.functional") and not C.module_present("torch.nope")
    assert "attnpatch_broken" not in sys.modules


def test_importing_attnpatch_loads_no_kernel_package():
    """Nor do list_backends/explain on a machine without them, nor the benchmark's helper."""
    code = textwrap.dedent("""
        import sys, torch, attnpatch
        from benchmarks._flash_direct import flash4_available, flash4_direct
        attnpatch.list_backends()
        q = torch.randn(1, 2, 8, 16)
        print(attnpatch.explain(q, q, q))
        loaded = [m for m in sys.modules if m.split('.')[0] in ('flash_attn', 'xformers',
                  'flash_attn_interface', 'flash_attn_2_cuda')]
        assert not loaded, loaded
        if not torch.cuda.is_available():
            assert flash4_available() is False
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=str(pathlib.Path(__file__).resolve().parents[2]))
    assert result.returncode == 0, result.stderr


# --- per call: the capabilities, as reasons ------------------------------------------------------
@pytest.mark.parametrize("cls", VERSIONS, ids=lambda c: c.name)
def test_call_reasons_are_exact(cls):
    backend = cls()
    cpu = "device cpu not supported (needs cuda)"
    assert backend.not_supported_reasons(call_for()) == [cpu]
    assert backend.not_supported_reasons(call_for(dtype=torch.float32)) == [
        cpu, "dtype torch.float32 not in (float16, bfloat16)"]
    assert backend.not_supported_reasons(call_for(head_dim=320)) == [cpu, "head_dim 320 > 256"]
    assert backend.not_supported_reasons(call_for(mask="bool")) == [
        cpu, "bool attn_mask not supported (supports: key_padding, none)"]
    assert backend.not_supported_reasons(call_for(mask="float")) == [
        cpu, "float attn_mask not supported (supports: key_padding, none)"]
    assert backend.not_supported_reasons(call_for(mask="key_padding", is_causal=True)) == [
        cpu, "is_causal=True together with attn_mask not supported"]
    # accepted: key padding (varlen), GQA, cross-attention, causal with Sq != Sk, lse
    for kw in (dict(mask="key_padding"), dict(heads=8, kv_heads=2), dict(seq_q=5, seq_k=9),
               dict(is_causal=True, seq_q=9, seq_k=5), dict(return_lse=True)):
        assert backend.not_supported_reasons(call_for(**kw)) == [cpu], kw


def test_version_specific_reasons():
    cpu = "device cpu not supported (needs cuda)"
    dropout = call_for(dropout_p=0.1)
    assert Flash4Backend().not_supported_reasons(dropout) == [
        cpu, "dropout_p=0.1 not supported (only 0.0)"]
    assert Flash3Backend().not_supported_reasons(dropout) == [
        cpu, "dropout_p=0.1 not supported (only 0.0)"]
    assert Flash2Backend().not_supported_reasons(dropout) == [cpu]

    lse_grad = call_for(return_lse=True, requires_grad=True)
    assert Flash4Backend().not_supported_reasons(lse_grad) == [cpu]  # FA4's lse has gradients
    assert Flash2Backend().not_supported_reasons(lse_grad) == [
        cpu, "return_lse=True with backward not supported (flash2 gives no gradient "
             "through the lse)"]
    assert Flash3Backend().not_supported_reasons(lse_grad)[1].startswith(
        "return_lse=True with backward not supported (flash3 gives")
    assert Flash2Backend().not_supported_reasons(call_for(return_lse=True, dropout_p=0.1)) == [
        cpu, "return_lse=True with dropout_p > 0 not supported (flash_attn would materialize "
             "the attention probabilities)"]

    other_dv = call_for(head_dim=64, head_dim_v=128)
    assert Flash2Backend().not_supported_reasons(other_dv) == [
        cpu, "value head_dim 128 != query head_dim 64"]
    assert Flash4Backend().not_supported_reasons(other_dv) == [cpu]  # checked per GPU generation


def test_flash4_limits_per_gpu_generation():
    fa4 = Flash4Backend()
    hopper, blackwell, sm120 = (9, 0), (10, 0), (12, 0)
    for d in (8, 64, 72, 100, 128, 160, 256):
        assert fa4.device_reasons(call_for(head_dim=d), hopper) == [], d
    assert fa4.device_reasons(call_for(head_dim=256), blackwell) == []
    assert fa4.device_reasons(call_for(head_dim=192, head_dim_v=128), blackwell) == []
    assert fa4.device_reasons(call_for(head_dim=160), blackwell) == [
        "head_dim 160 not supported on compute capability 10.0 (flash4 takes <= 128, 192 with "
        "value 128, or 256)"]
    assert fa4.device_reasons(call_for(head_dim=192), sm120) == [
        "head_dim 192 > 128 on compute capability 12.0"]
    assert fa4.device_reasons(call_for(head_dim=100), blackwell) == []  # padded to 128
    assert fa4.device_reasons(call_for(head_dim=64, head_dim_v=128), hopper) == [
        "value head_dim 128 != query head_dim 64 (flash4 takes equal head dims, or 192 with "
        "value 128)"]
    assert fa4.padded_head_dims(call_for(head_dim=3, head_dim_v=17)) == (8, 24)
    # sm90's backward does not compile at 104/112: those pad to 128
    assert fa4.padded_head_dims(call_for(head_dim=100, head_dim_v=100)) == (128, 128)
    assert fa4.padded_head_dims(call_for(head_dim=72, head_dim_v=72)) == (72, 72)


# --- selection -----------------------------------------------------------------------------------
def test_flash_requested_on_cpu_raises_with_every_members_reasons():
    q, k, v, _ = make_inputs(dtype=torch.float16)
    with pytest.raises(attnpatch.BackendUnavailableError) as err:
        attnpatch.attention(q, k, v, backend="flash")
    reasons = err.value.reasons["flash"]
    if not torch.cuda.is_available():
        assert "flash4, flash3, flash2: " + NO_CUDA in reasons
    for member in ("flash4", "flash3", "flash2"):
        assert any(member in r for r in reasons)
    for name in ("flash4", "fa3", "flash2", "flash_varlen"):
        with pytest.raises(attnpatch.BackendUnavailableError):
            attnpatch.attention(q, k, v, backend=name)


def test_flash_union_merges_identical_reasons():
    assert FlashBackend._union([("flash4", ["a", "b"]), ("flash3", ["b"]), ("flash2", ["c"])]) \
        == ["flash4: a", "flash4, flash3: b", "flash2: c"]


def test_priorities_and_aliases():
    prio = {b.name: b.priority for b in registry.all_backends()}
    # measured order (benchmarks/results/kernels_h100.json): flash4 first, but only where it won
    assert prio["flash4"] < prio["sdpa"] < prio["flash3"] < prio["flash2"] < prio["xformers"]
    assert (prio["flash4"], prio["flash3"], prio["flash2"], prio["xformers"]) == (90, 160, 250,
                                                                                  300)
    assert prio["flash"] is None and "flash" not in [b.name for b in registry.priority_list()]
    for alias, name in (("fa4", "flash4"), ("flash_4", "flash4"), ("fa3", "flash3"),
                        ("_flash_3", "flash3"), ("_flash_varlen_3", "flash3"), ("fa2", "flash2"),
                        ("flash_varlen", "flash2"), ("flash", "flash")):
        assert registry.canonical_name(alias) == name
    caps = registry.get_backend("flash4").capabilities()
    assert caps["dtypes"] == "float16, bfloat16" and caps["devices"] == ["cuda"]
    assert caps["mask_kinds"] == ["key_padding", "none"] and not caps["dropout"]


@needs_no_cuda
def test_auto_passes_over_flash_on_cpu_with_reasons():
    q, k, v, mask = make_inputs(dtype=torch.float16, mask="key_padding")
    ex = attnpatch.explain(q, k, v, attn_mask=mask)
    assert ex.choice == "sdpa"
    for name in ("flash4", "flash3", "flash2", "xformers", "flash"):
        assert NO_CUDA in " ".join(ex.reasons[name]), name


def test_split_result():
    out, lse = torch.zeros(1, 5, 2, 8), torch.zeros(1, 2, 7)
    assert F._split_result(out, 5, False, "x") == (out, None)
    got_out, got_lse = F._split_result((out, lse, None), 5, True, "x")
    assert got_out is out and got_lse.shape == (1, 2, 5)
    packed = torch.zeros(2, 10)
    assert F._split_result((out, packed), 5, True, "x")[1] is packed
    with pytest.raises(attnpatch.AttnPatchError, match="returned no log-sum-exp"):
        F._split_result(out, 5, True, "x")



def test_cli_lists_them_with_reasons(capsys):
    from attnpatch.cli import main

    assert main(["backends"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:] if line}
    for name in ("flash", "flash4", "flash3", "flash2", "xformers"):
        assert name in lines, name
        if not torch.cuda.is_available():
            assert " no " in lines[name] and NO_CUDA in lines[name], lines[name]


@pytest.mark.parametrize("shape,flash4_first", [
    ((1, 24, 16896, 128), True),   # Flux 2048²
    ((2, 24, 8192, 128), True),
    ((1, 24, 4608, 128), False),   # Flux 1024²: cuDNN measured faster in forward
    ((2, 24, 4429, 64), True),     # SD3 1024² with CFG
    ((1, 24, 4429, 64), True),
    ((2, 10, 9216, 64), True),     # SDXL 1536², first level
    ((2, 10, 4096, 64), False),    # SDXL 1024², first level
    ((2, 20, 1024, 64), False),    # SDXL 1024², second level
    ((1, 24, 16896, 96), False),   # a head_dim not measured
])
def test_auto_prefers_flash4_only_where_it_measured_faster(shape, flash4_first):
    """auto's flash4 rule (the H200 measurements in Flash4Backend.auto_min_scores), on the
    shapes it was measured at: a reason names the rule where cuDNN stays first."""
    from attnpatch.call import build_call
    flash4 = registry.get_backend("flash4")
    call = build_call(*(torch.empty(*shape, device="meta"),) * 3, None, False, None, 0.0, "bhsd",
                      False, False)
    reasons = flash4.auto_reasons(call)
    if flash4_first:
        assert reasons == []
    else:
        assert len(reasons) == 1 and reasons[0].startswith("auto prefers sdpa"), reasons
        assert f"head_dim {shape[-1]}" in reasons[0]


# --- softcap: the kernels' own softcap=, exercised through stand-in entry points ----------------
# A module with flash-attn's two entry points, computed by the math backend with flash's own
# masking rule (bottom-right causal/window; see test_padding.py). Every call is recorded, so the
# tests see what each backend passes to the kernel.
FAKE_FLASH = '''
import torch
import attnpatch
from attnpatch.backends import _padding as P

calls = []


def _attend(q, k, v, visible, softmax_scale, softcap):
    return attnpatch.attention(q, k, v, attn_mask=visible, scale=softmax_scale,
                               softcap=softcap or None, backend="math", layout="bshd",
                               return_lse=True)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), {softcap}return_attn_probs=False, return_lse=False):
    softcap = locals().get("softcap", 0.0)
    calls.append(("dense", softcap))
    window = tuple(None if w is None or w < 0 else w for w in window_size)
    visible = P.flash_visible(q.shape[1], k.shape[1], causal, window)
    return _attend(q, k, v, visible, softmax_scale, softcap)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, {softcap}
                           return_attn_probs=False, return_lse=False):
    softcap = locals().get("softcap", 0.0)
    calls.append(("varlen", softcap))
    assert not causal
    outs, lses = [], []
    for b in range(cu_seqlens_q.numel() - 1):
        qs = q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]][None]
        ks = k[cu_seqlens_k[b]:cu_seqlens_k[b + 1]][None]
        vs = v[cu_seqlens_k[b]:cu_seqlens_k[b + 1]][None]
        out, lse = _attend(qs, ks, vs, None, softmax_scale, softcap)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)
'''


@pytest.fixture
def fake_flash(fresh_lookups):
    """Make module ``name`` (with or without ``softcap=`` on its entry points) importable, and
    a backend of each FlashAttention version running it."""
    made = []

    def make(cls, name="attnpatch_fake_flash", softcap=True):
        path = fresh_lookups / f"{name}.py"
        if not path.exists():
            path.write_text(FAKE_FLASH.replace("{softcap}", "softcap=0.0, " if softcap else ""))
            made.append(name)
        fake = type(f"Fake{cls.__name__}", (cls,), dict(
            name=f"test_fake_{cls.name}", probe=name, module=name, package=name))
        return fake(), importlib.import_module(name)

    yield make
    for name in made:
        sys.modules.pop(name, None)


SOFTCAP_CASES = {
    "dense": dict(seq_q=33, seq_k=47, head_dim=64),                      # one call, no padding
    "padded_head_dim": dict(seq_q=33, seq_k=47, head_dim=36),             # zero-padded to 40
    "gqa": dict(heads=4, kv_heads=2, seq_q=33, seq_k=47, head_dim=64),
    "causal_q_longer": dict(seq_q=47, seq_k=33, head_dim=64, is_causal=True),  # window plan
    "causal_k_longer": dict(seq_q=33, seq_k=47, head_dim=64, is_causal=True),  # key slice
    "key_padding": dict(seq_q=33, seq_k=47, head_dim=64, mask="key_padding"),  # varlen
}


@pytest.mark.parametrize("case", list(SOFTCAP_CASES))
@pytest.mark.parametrize("cls", VERSIONS, ids=lambda c: c.name)
def test_softcap_reaches_the_kernel_and_equals_math(fake_flash, cls, case):
    backend, fake = fake_flash(cls)
    kw = dict(SOFTCAP_CASES[case])
    is_causal = kw.pop("is_causal", False)
    q, k, v, mask = make_inputs(dtype=torch.float64, mask=kw.pop("mask", None), **kw)
    for cap in (0.7, None):
        fake.calls.clear()
        call = attnpatch.explain(q, k, v, attn_mask=mask, is_causal=is_causal, softcap=cap,
                                 return_lse=True).call
        out, lse = backend.forward(call)
        ref, ref_lse = attnpatch.attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           softcap=cap, backend="math", return_lse=True)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-6, atol=1e-6)
        assert fake.calls and all(c == fake.calls[0] for c in fake.calls), fake.calls
        assert fake.calls[0][0] == ("varlen" if case == "key_padding" else "dense")
        assert fake.calls[0][1] == (cap or 0.0)  # no cap: the kernel's default (off)


@pytest.mark.parametrize("cls", VERSIONS, ids=lambda c: c.name)
def test_a_build_without_softcap_refuses_it(fake_flash, cls):
    old, _ = fake_flash(cls, name="attnpatch_fake_flash_old", softcap=False)
    new, _ = fake_flash(cls)
    dense, _ = _calls_with_cap()
    padded, _ = _calls_with_cap(mask="key_padding")
    assert old.softcap_reasons(dense) == [
        "softcap=0.7 not supported by this attnpatch_fake_flash_old build "
        "(attnpatch_fake_flash_old.flash_attn_func takes no softcap=)"]
    assert old.softcap_reasons(padded) == [
        "softcap=0.7 not supported by this attnpatch_fake_flash_old build "
        "(attnpatch_fake_flash_old.flash_attn_varlen_func takes no softcap=)"]
    assert old.softcap_reasons(dense)[0] in old.not_supported_reasons(dense)
    assert new.softcap_reasons(dense) == new.softcap_reasons(padded) == []
    assert AbsentFlash4().softcap_reasons(dense) == []  # not installed: nothing imported


def _calls_with_cap(**kw):
    q, k, v, mask = make_inputs(dtype=torch.float16, seq_q=9, seq_k=11, head_dim=16, **kw)
    return (attnpatch.explain(q, k, v, attn_mask=mask, softcap=0.7).call,
            attnpatch.explain(q, k, v, attn_mask=mask).call)


def test_flash4_refuses_softcap_at_head_dim_256_on_blackwell():
    fa4 = Flash4Backend()
    q, k, v, _ = make_inputs(dtype=torch.float16, seq_q=9, head_dim=256)
    capped = attnpatch.explain(q, k, v, softcap=30.0).call
    assert fa4.device_reasons(capped, (10, 0)) == [
        "softcap=30.0 with head_dim 256 not supported on compute capability 10.0"]
    assert fa4.device_reasons(capped, (9, 0)) == []
    assert fa4.device_reasons(attnpatch.explain(q, k, v).call, (10, 0)) == []
    q, k, v, _ = make_inputs(dtype=torch.float16, seq_q=9, head_dim=128)
    assert fa4.device_reasons(attnpatch.explain(q, k, v, softcap=30.0).call, (10, 0)) == []


# --- backward from a merged (out, lse): declared, and refused where it cannot run -------------
# The kernels' backward runs on the GPU machine (test_flash_gpu.py); the helpers it runs on are
# proven in test_padding.py. Here: declarations and every refusal, with stand-in modules only
# for builds that lack what the backward needs.
def _partial(**kw):
    """A sub-call as merge_partials runs it: return_lse, backward from the merged (out, lse)."""
    kw.setdefault("dtype", torch.float16)
    softcap = kw.pop("softcap", None)
    q, k, v, mask = make_inputs(requires_grad=True, seq_q=9, seq_k=11, head_dim=16, **kw)
    sub = attnpatch.explain(q, k, v, attn_mask=mask, return_lse=True, softcap=softcap).call
    sub.backward_from_lse = True
    return sub


def test_backward_from_lse_is_declared():
    for cls in (*VERSIONS, FlashBackend):
        assert cls.supports_backward_from_lse, cls.name
        assert cls.capabilities()["backward_from_lse"] is True
    assert registry.get_backend("flash").capabilities()["backward_from_lse"] is True


@pytest.mark.parametrize("cls", VERSIONS, ids=lambda c: c.name)
def test_a_partial_needs_no_gradient_through_its_lse(cls):
    """flash2/flash3 give no lse gradient, so return_lse with backward is refused, except for a
    partial of an exact merge: its backward runs from the merged (out, lse)."""
    sub = _partial()
    assert cls().not_supported_reasons(sub) == ["device cpu not supported (needs cuda)"]
    sub.backward_from_lse = False
    lse_reason = (f"return_lse=True with backward not supported ({cls.name} gives no gradient "
                  "through the lse)")
    assert (lse_reason in cls().not_supported_reasons(sub)) is (not cls.lse_has_grad)


@needs_no_cuda
@pytest.mark.parametrize("backend", ["flash4", "flash3", "flash2", "flash"])
def test_merge_with_flash_partials_is_refused_here_with_the_reasons(backend):
    q, k, v, _ = make_inputs(dtype=torch.float16, seq_q=9, seq_k=12, head_dim=16,
                             requires_grad=True)
    call = attnpatch.explain(q, k, v).call
    parts = [attnpatch.Partial(call.replace(key=k[:, :, s], value=v[:, :, s]), backend)
             for s in (slice(0, 5), slice(5, 12))]
    with pytest.raises(attnpatch.BackendUnavailableError) as err:
        attnpatch.merge_partials(call, parts)
    expected = attnpatch.explain(q, k[:, :, :5], v[:, :, :5], backend=backend).reasons[backend]
    assert err.value.reasons == {backend: expected} and expected


@needs_no_cuda
def test_flash_backward_without_a_member_raises_the_members_reasons():
    sub = _partial()
    flash = FlashBackend()
    with pytest.raises(attnpatch.BackendUnavailableError) as err:
        flash.backward(sub, sub.query, sub.query, sub.query[..., 0].float())
    assert err.value.reasons == {"flash": flash.not_supported_reasons(sub)}


FAKE_BWD = '''
def {entry}(q, k, v, out, dout, lse, softmax_scale=None, causal=False):
    raise AssertionError("never run: a stand-in for a build's backward signature")
'''


@pytest.mark.parametrize("cls", VERSIONS, ids=lambda c: c.name)
def test_a_build_without_the_backward_entry_point_refuses_backward_from_lse(fake_flash, cls):
    backend, _ = fake_flash(cls)
    fake = type(backend)
    fake.backward_module = fake.module  # the fake module has the forward entry points only
    dense, padded = _partial(), _partial(mask="key_padding")
    for sub in (dense, padded):
        entry = cls.backward_entries[sub.mask_kind == "key_padding"]
        reason = ("backward from a merged (out, lse) not supported by this attnpatch_fake_flash "
                  f"build (attnpatch_fake_flash: it has no {entry})")
        assert backend.backward_reasons(sub) == [reason]
        assert reason in backend.not_supported_reasons(sub)
        sub.backward_from_lse = False  # a plain call does not need it
        assert backend.backward_reasons(sub) == [reason]
        assert reason not in backend.not_supported_reasons(sub)
    assert AbsentFlash4().backward_reasons(dense) == []  # not installed: nothing imported


@pytest.mark.parametrize("cls", VERSIONS, ids=lambda c: c.name)
def test_a_backward_entry_point_without_softcap_refuses_a_capped_partial(fresh_lookups, cls):
    name = f"attnpatch_fake_bwd_{cls.name}"
    (fresh_lookups / f"{name}.py").write_text("".join(
        FAKE_BWD.replace("{entry}", e) for e in set(cls.backward_entries)))
    fake = type("FakeBwd", (cls,), dict(name=f"test_fake_bwd_{cls.name}", probe=name,
                                         backward_module=name, package=name))()
    capped = _partial(softcap=0.7)
    entry = cls.backward_entries[0]
    assert fake.backward_reasons(capped) == [
        f"softcap=0.7 with backward from a merged (out, lse) not supported by this {name} build "
        f"({name}.{entry} takes no softcap=)"]
    assert fake.backward_reasons(_partial()) == []
    sys.modules.pop(name, None)


def test_a_backward_module_that_does_not_import_is_a_reason(fresh_lookups):
    (fresh_lookups / "attnpatch_broken_bwd.py").write_text(
        "raise ImportError('undefined symbol: mha_bwd')\n")
    fake = type("BrokenBwd", (Flash4Backend,), dict(
        name="test_broken_bwd", probe="attnpatch_broken_bwd",
        backward_module="attnpatch_broken_bwd"))()
    assert fake.backward_reasons(_partial()) == [
        "backward from a merged (out, lse) not supported by this flash_attn.cute build "
        "(attnpatch_broken_bwd: ImportError: undefined symbol: mha_bwd)"]


def test_takes_reads_torch_library_operators():
    """flash-attn's backward entry points are torch.library operators (a custom_op
    definition, or its torch.ops packet) whose Python signature is (*args, **kwargs)."""
    @torch.library.custom_op("attnpatch_test::bwd_like", mutates_args=())
    def bwd_like(x: torch.Tensor, softcap: float = 0.0) -> torch.Tensor:
        return x.clone()

    for fn in (bwd_like, torch.ops.attnpatch_test.bwd_like):
        assert F._takes(fn, "softcap") and not F._takes(fn, "window_size_left")
