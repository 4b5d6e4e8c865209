"""The patch() API itself: bad input, backend specs, containers of several models, the handle,
precedence, the overhead benchmark's smoke mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import attnpatch
from attnpatch import AttnPatchError
from tests.tiny_models import (clip_text, counting_backend, flux, llama, no_attnpatch_state,
                               processors_of, rel_error, run, sd15)

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def unet():
    model, kw = sd15()
    return model, kw, run(model, kw)


# --- bad input: always an AttnPatchError that says what was found ----------------------------

def test_no_attention_modules_lists_what_was_found():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(AttnPatchError, match=r"no attention modules found in Sequential.*"
                                             r"4 modules: .*Linear x2"):
        attnpatch.patch(model)
    assert no_attnpatch_state(model) == []


def test_pipeline_without_attention_lists_its_components():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=8, add_attention=False,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(AttnPatchError, match=r"no attention modules found in DDPMPipeline.*"
                                             r"unet \(UNet2DModel: 0 attention modules\).*"
                                             r"scheduler \(DDPMScheduler, not a torch module\)"):
        attnpatch.patch(pipe)


def test_wrong_target_type():
    with pytest.raises(AttnPatchError, match="patch\\(\\) takes a diffusers DiffusionPipeline"):
        attnpatch.patch("unet")


def test_unknown_backend_names_suggest(unet):
    model, _, _ = unet
    with pytest.raises(AttnPatchError, match="unknown backend 'mathh'; did you mean 'math'"):
        attnpatch.patch(model, backend="mathh")
    with pytest.raises(AttnPatchError, match="unknown backend 'nope'"):
        attnpatch.patch(model, backend={"*attn1": "sdpa", "*attn2": "nope"})
    with pytest.raises(AttnPatchError, match="diffusers backend that attnpatch does not implement"):
        attnpatch.patch(model, backend="sage")
    assert no_attnpatch_state(model) == []


def test_patterns_matching_nothing(unet):
    model, _, _ = unet
    with pytest.raises(AttnPatchError, match=r"include pattern 'transformer\.\*' matches no "
                                             r"attention module; .*named like "
                                             r"'down_blocks\.0\.attentions\.0"):
        attnpatch.patch(model, include="transformer.*")
    with pytest.raises(AttnPatchError, match="exclude pattern 'nope' matches no attention"):
        attnpatch.patch(model, exclude=["nope"])
    with pytest.raises(AttnPatchError, match="backend pattern 'text.*' matches no patched"):
        attnpatch.patch(model, backend={"text.*": "math"})
    with pytest.raises(AttnPatchError, match="leave no attention module to patch"):
        attnpatch.patch(model, include="down_blocks", exclude="*attn*")
    assert no_attnpatch_state(model) == []


def test_options_are_checked_up_front(unet):
    model, _, _ = unet
    with pytest.raises(AttnPatchError, match=r"backend 'math' does not take option\(s\) "
                                             r"\['block_size'\]"):
        attnpatch.patch(model, backend="math", block_size=64)
    with pytest.raises(AttnPatchError, match="a backend tuple is"):
        attnpatch.patch(model, backend=("math",))
    assert no_attnpatch_state(model) == []


# --- backend specs and precedence --------------------------------------------------------------

def test_backend_spec_forms(unet):
    model, kw, ref = unet
    spec = {"*attn1": ("flex", {"compile": False}), "*attn2": {"backend": "sdpa_math"}}
    with attnpatch.patch(model, backend=spec) as handle:
        assert rel_error(run(model, kw), ref) <= 1e-5
        got = {r.name.rsplit(".", 1)[1]: (r.requested, r.backend) for r in handle.report()}
    assert got == {"attn1": ("flex(compile=False)", "flex"), "attn2": ("sdpa_math", "sdpa_math")}


def test_env_var_applies_under_plain_auto(unet, monkeypatch):
    model, kw, ref = unet
    monkeypatch.setenv("ATTNPATCH_BACKEND", "math")
    with attnpatch.patch(model) as handle:  # plain auto: the environment decides
        run(model, kw)
        assert {r.backend for r in handle.report()} == {"math"}
    with attnpatch.patch(model, backend="sdpa") as handle:  # an explicit patch backend wins
        run(model, kw)
        assert {r.backend for r in handle.report()} == {"sdpa"}


def test_explicit_backend_that_cannot_run_raises(unet):
    model, kw, _ = unet

    class Fp16Only(attnpatch.Backend):
        name = "fp16_only"
        priority = None
        dtypes = (torch.float16,)

        def forward(self, call, **options):  # pragma: no cover
            raise AssertionError

    attnpatch.register_backend(Fp16Only)
    try:
        with attnpatch.patch(model, backend="fp16_only"):
            with pytest.raises(attnpatch.BackendUnavailableError, match="fp16_only"):
                run(model, kw)
    finally:
        attnpatch.unregister_backend("fp16_only")


# --- several models in one nn.Module, the handle ----------------------------------------------

def test_container_with_diffusers_and_transformers_models():
    unet_model, unet_kw = sd15()
    text_model, text_kw = clip_text()
    ref_unet, ref_text = run(unet_model, unet_kw), run(text_model, text_kw)
    box = torch.nn.ModuleDict({"unet": unet_model, "text": text_model})
    with attnpatch.patch(box, backend="math") as handle:
        out_unet, out_text = run(unet_model, unet_kw), run(text_model, text_kw)
        report = handle.report()
        # component models get the backend methods too
        box["unet"].set_attention_backend("sdpa")
        run(unet_model, unet_kw)
        assert {r.backend for r in handle.report() if r.name.startswith("unet")} == {"sdpa"}
    assert rel_error(out_unet, ref_unet) <= 1e-5
    mask = text_kw["attention_mask"].bool()
    assert rel_error(out_text[mask], ref_text[mask]) <= 1e-5
    assert {r.kind for r in report} == {"diffusers", "transformers"} and len(report) == 10
    assert all(r.name.startswith(("unet.", "text.")) for r in report)
    assert no_attnpatch_state(box) == []
    assert torch.equal(run(unet_model, unet_kw), ref_unet)


def test_handle_lifecycle(unet):
    model, kw, ref = unet
    handle = attnpatch.patch(model, backend="math")
    assert "8/8 attention modules routed, active" in repr(handle)
    handle.set_backend("sdpa")
    run(model, kw)
    assert {r.backend for r in handle.report()} == {"sdpa"}
    handle.reset_backend()
    assert {r.requested for r in handle.report()} == {"math"}
    attnpatch.unpatch(model)
    assert not handle.active
    handle.unpatch()  # idempotent
    with pytest.raises(AttnPatchError, match="undone"):
        handle.set_backend("math")
    assert torch.equal(run(model, kw), ref)


def test_patched_forward_raises_cleanly_and_recovers(unet):
    """An exception inside a patched forward leaves no layout state behind."""
    model, kw, ref = unet
    with attnpatch.patch(model, backend="math"):
        with pytest.raises(Exception):
            run(model, {**kw, "encoder_hidden_states": torch.randn(2, 7, 5)})
        assert attnpatch.current_token_layout() is None
        assert rel_error(run(model, kw), ref) <= 1e-5


def test_report_records_are_plain_data(unet):
    model, kw, _ = unet
    with attnpatch.patch(model, backend="math") as handle:
        run(model, kw)
        rec = handle.report()[0]
    assert isinstance(rec, attnpatch.ModuleReport)
    assert rec.name == "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert (rec.backend, rec.calls, rec.fallbacks, rec.routed) == ("math", 1, {}, True)
    assert rec.module_type == "Attention" and rec.processor == "AttnProcessor2_0"


def test_processors_unchanged_when_patch_fails_midway(unet):
    """A failing patch (here: a pattern error raised after discovery) leaves nothing behind."""
    model, _, _ = unet
    before = processors_of(model)
    with pytest.raises(AttnPatchError):
        attnpatch.patch(model, backend={"*attn1": "math", "*zzz": "sdpa"})
    assert all(processors_of(model)[k] is before[k] for k in before)
    assert no_attnpatch_state(model) == []


def test_token_layout_outside_models_is_none():
    assert attnpatch.current_token_layout() is None
    layout = attnpatch.TokenLayout(text_tokens=7, text_position="first", frames=1, height=4,
                                   width=4)
    assert layout.image_tokens == 16 and layout.grid == (1, 4, 4)
    assert layout.text_slice == slice(0, 7) and layout.image_slice == slice(7, 23)


def test_flux_under_attention_backend_context_options():
    """Options of an attention_backend block reach the backend through a patched model."""
    model, kw = flux()
    ref = run(model, kw)
    with attnpatch.patch(model) as handle:
        with attnpatch.attention_backend("flex", compile=False):
            out = run(model, kw)
        assert {r.backend for r in handle.report()} == {"flex"}
    assert rel_error(out, ref) <= 1e-5


# --- the GPU benchmark, smoke-tested on CPU ---------------------------------------------------

def test_overhead_benchmark_tiny_cpu(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("overhead", ROOT / "benchmarks" / "overhead.py")
    overhead = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(overhead)
    out = tmp_path / "overhead.json"
    assert overhead.main(["--tiny", "--device", "cpu", "--repeats", "2", "--warmup", "1",
                          "--module-calls", "3", "--module-blocks", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "overhead" in printed and "flux" in printed and "sdxl" in printed
    data = json.loads(out.read_text())
    by_model = {r["model"]: r for r in data["results"]}
    assert by_model["flux"]["routed"] == 2 and by_model["sdxl"]["routed"] == 16
    assert all(r["attention_calls_per_forward"] == r["routed"] for r in data["results"])
    assert all(len(r["patched_ms"]) == 2 == len(r["paired_overhead_pct_each"])
               for r in data["results"])
    assert set(data["module_call"]) == {"module", "routing", "signature"}
    assert all(len(m["blocks_us"]["patched"]) == 2 and m["patched_us"] > 0
               for m in data["module_call"].values())


def test_auto_with_an_option_no_backend_takes_is_refused_at_patch_time():
    model, _ = flux()
    with pytest.raises(AttnPatchError, match="no backend that 'auto' can choose takes option"):
        attnpatch.patch(model, backend="auto", blok_mask=1)
    assert no_attnpatch_state(model) == []


def test_backend_names_are_case_insensitive():
    assert attnpatch.registry.canonical_name("SDPA") == "sdpa"
    assert attnpatch.registry.canonical_name("_Native_Cudnn") == "sdpa_cudnn"


@pytest.mark.parametrize("factory", [flux, clip_text], ids=["diffusers", "transformers"])
def test_report_after_the_with_block_tells_what_ran(factory):
    """``print(handle.report())`` after the ``with`` block: the modules ran through attnpatch
    while patched, so they are reported as routed, with their calls, and the footer says the
    patch is undone (they used to read "NOT ROUTED ... replaced after patch()", blaming the
    user)."""
    model, kw = factory()
    with attnpatch.patch(model, backend="math") as handle:
        run(model, kw)
        during = handle.report()
    after = handle.report()
    assert [(r.name, r.backend, r.calls, r.routed, r.note) for r in after] == [
        (r.name, r.backend, r.calls, r.routed, r.note) for r in during]
    assert all(r.routed and r.calls == 1 and r.undone for r in after)
    assert not any(r.undone for r in during)
    assert "NOT ROUTED" not in str(after)
    assert str(after).endswith(f"{len(after)}/{len(after)} attention modules routed through "
                               f"attnpatch, {len(after)} calls while patched (the patch is "
                               "undone now)")


@pytest.mark.parametrize("factory", [flux, llama], ids=["diffusers", "transformers"])
def test_deepcopy_of_a_patched_model_is_patched_and_unpatches_on_its_own(factory):
    """``copy.deepcopy`` of a patched model (an EMA copy): the copy runs patched, keeps running
    after the original is unpatched (transformers: the copy holds the shared registration
    too), and ``attnpatch.unpatch(copy)`` restores it exactly (diffusers' own
    ``set_attention_backend`` visible again: the saved "nothing was there" survives deepcopy)."""
    import copy

    from attnpatch.integrations import transformers as itf
    model, kw = factory()
    ref = run(model, kw)
    with counting_backend() as counting:
        handle = attnpatch.patch(model, backend="counting")
        twin = copy.deepcopy(model)
        assert rel_error(run(twin, kw), ref) < 1e-6
        handle.unpatch()
        assert no_attnpatch_state(model) == []
        before = counting.calls
        assert rel_error(run(twin, kw), ref) < 1e-6
        assert counting.calls > before  # the copy still runs through attnpatch
    attnpatch.unpatch(twin)
    assert no_attnpatch_state(twin) == [] and not itf.registered()
    assert "set_attention_backend" not in vars(twin)
    assert rel_error(run(twin, kw), ref) < 1e-6
    if hasattr(twin, "config") and hasattr(twin.config, "_attn_implementation"):
        assert twin.config._attn_implementation == model.config._attn_implementation
