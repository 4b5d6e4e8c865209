"""patch() on whole tiny pipelines (FluxPipeline, StableDiffusionPipeline), 2 steps from prompt
embeddings: numerics, routing of every component, pipeline-level backend API, LoRA loading,
model-offload hooks."""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch import AttnPatchError
from tests.tiny_models import (counting_backend, flux_pipeline, no_attnpatch_state, processors_of,
                               rel_error, run_pipe, sd_pipeline)

pytest.importorskip("diffusers")

# named when loading: older diffusers (0.37 at least) won't guess it under HF_HUB_OFFLINE
LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def flux_pipe():
    pipe, kw = flux_pipeline()
    return pipe, kw, run_pipe(pipe, kw)


@pytest.fixture(scope="module")
def sd_pipe():
    pipe, kw = sd_pipeline()
    return pipe, kw, run_pipe(pipe, kw)


@pytest.mark.parametrize("which", ["flux", "sd"])
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_pipeline_matches_unpatched(request, which, backend):
    pipe, kw, ref = request.getfixturevalue(f"{which}_pipe")
    handle = attnpatch.patch(pipe, backend=backend)
    try:
        assert rel_error(run_pipe(pipe, kw), ref) <= 1e-5
        report = handle.report()
        ran = [r for r in report if r.calls]
        assert ran and all(r.backend == backend for r in ran)
    finally:
        handle.unpatch()
    assert torch.equal(run_pipe(pipe, kw), ref)
    assert no_attnpatch_state(pipe) == []


def test_flux_pipeline_every_component_routed(flux_pipe):
    pipe, kw, ref = flux_pipe
    with counting_backend() as counting, attnpatch.patch(pipe, backend="counting") as handle:
        assert rel_error(run_pipe(pipe, kw), ref) <= 1e-5
        report = handle.report()
    names = sorted(r.name for r in report)
    assert names == sorted(["transformer.transformer_blocks.0.attn",
                     "transformer.single_transformer_blocks.0.attn",
                     "vae.encoder.mid_block.attentions.0", "vae.decoder.mid_block.attentions.0"])
    assert all(r.routed for r in report)
    calls = {r.name: r.calls for r in report}
    assert calls["transformer.transformer_blocks.0.attn"] == 2  # 2 steps
    assert calls["vae.decoder.mid_block.attentions.0"] == 1     # one decode
    assert calls["vae.encoder.mid_block.attentions.0"] == 0     # text-to-image never encodes
    assert counting.calls == sum(calls.values())


def test_sd_pipeline_routes_unet_vae_and_text_encoder(sd_pipe):
    pipe, kw, ref = sd_pipe
    ids = torch.randint(3, 60, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text_ref = pipe.text_encoder(ids).last_hidden_state
    with counting_backend() as counting, attnpatch.patch(pipe, backend="counting") as handle:
        assert rel_error(run_pipe(pipe, kw), ref) <= 1e-5
        with torch.no_grad():
            text = pipe.text_encoder(ids).last_hidden_state
        report = handle.report()
    assert rel_error(text, text_ref) <= 1e-5
    kinds = {r.name.split(".")[0]: r.kind for r in report}
    assert kinds == {"unet": "diffusers", "vae": "diffusers", "text_encoder": "transformers"}
    assert all(r.routed for r in report) and len(report) == 8 + 2 + 2
    assert all(r.calls > 0 for r in report if not r.name.startswith("vae.encoder"))
    assert counting.calls == sum(r.calls for r in report)


def test_pipeline_set_attention_backend(sd_pipe):
    pipe, kw, ref = sd_pipe
    processors = processors_of(pipe.unet)
    with attnpatch.patch(pipe, backend="sdpa") as handle:
        pipe.set_attention_backend("math")
        run_pipe(pipe, kw)
        assert {r.backend for r in handle.report() if r.calls} == {"math"}
        pipe.unet.set_attention_backend("sdpa_math")  # one component only
        run_pipe(pipe, kw)
        got = {r.name.split(".")[0]: r.backend for r in handle.report() if r.calls}
        assert got == {"unet": "sdpa_math", "vae": "math"}
        pipe.set_attention_backend({"vae.*": "sdpa", "unet.*": "native"})  # diffusers' name
        run_pipe(pipe, kw)
        assert {r.backend for r in handle.report() if r.calls} == {"sdpa"}
        pipe.reset_attention_backend()
        assert all(r.requested == "sdpa" for r in handle.report())
    assert "set_attention_backend" not in vars(pipe)
    assert all(processors_of(pipe.unet)[k] is processors[k] for k in processors)


def test_set_attention_backend_on_unpatched_pipeline(flux_pipe):
    pipe, kw, ref = flux_pipe
    handle = attnpatch.set_attention_backend(pipe, "math")
    assert rel_error(run_pipe(pipe, kw), ref) <= 1e-5
    assert {r.backend for r in handle.report() if r.calls} == {"math"}
    pipe.reset_attention_backend()
    assert not handle.active and no_attnpatch_state(pipe) == []
    assert torch.equal(run_pipe(pipe, kw), ref)
    with pytest.raises(AttnPatchError, match="is not patched"):
        attnpatch.unpatch(pipe)


def test_unpatch_by_target_and_part(flux_pipe):
    pipe, kw, ref = flux_pipe
    attnpatch.patch(pipe)
    with pytest.raises(AttnPatchError, match="patched as part of a larger target"):
        attnpatch.unpatch(pipe.transformer)
    attnpatch.unpatch(pipe)
    assert no_attnpatch_state(pipe) == []


def test_load_lora_weights_before_and_after_patch(tmp_path):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    src, _ = sd_pipeline()
    torch.manual_seed(3)
    src.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(
            get_peft_model_state_dict(src.unet)))

    pipe, kw = sd_pipeline()
    base = run_pipe(pipe, kw)
    pipe.load_lora_weights(tmp_path, weight_name=LORA_FILE, adapter_name="a")  # before patching
    with_a = run_pipe(pipe, kw)
    assert rel_error(with_a, base) > 1e-3
    handle = attnpatch.patch(pipe, backend="math")
    assert rel_error(run_pipe(pipe, kw), with_a) <= 1e-5
    pipe.load_lora_weights(tmp_path, weight_name=LORA_FILE, adapter_name="b")  # after patching
    pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 0.5])
    assert rel_error(run_pipe(pipe, kw), with_a) <= 1e-5
    pipe.set_adapters("a")
    assert rel_error(run_pipe(pipe, kw), with_a) <= 1e-5
    pipe.fuse_lora(components=["unet"], adapter_names=["a"])
    assert rel_error(run_pipe(pipe, kw), with_a) <= 1e-4
    pipe.unfuse_lora(components=["unet"])
    assert rel_error(run_pipe(pipe, kw), with_a) <= 1e-5
    assert all(r.routed for r in handle.report())
    assert all(r.calls > 0 for r in handle.report() if r.name.startswith("unet."))
    handle.unpatch()
    assert rel_error(run_pipe(pipe, kw), with_a) <= 1e-5


def test_model_offload_hooks_on_every_component():
    """What enable_model_cpu_offload installs (it refuses to run without an accelerator): a
    chain of accelerate cpu_offload_with_hook hooks, one per component."""
    from accelerate import cpu_offload_with_hook
    from accelerate.hooks import remove_hook_from_module
    pipe, kw = sd_pipeline()
    ref = run_pipe(pipe, kw)
    hook, hooks = None, []
    for name in ("text_encoder", "unet", "vae"):
        _, hook = cpu_offload_with_hook(getattr(pipe, name), "cpu", prev_module_hook=hook)
        hooks.append(hook)
    with counting_backend() as counting, attnpatch.patch(pipe, backend="counting") as handle:
        assert rel_error(run_pipe(pipe, kw), ref) <= 1e-5
        assert counting.calls == sum(r.calls for r in handle.report()) > 0
    for name in ("text_encoder", "unet", "vae"):
        remove_hook_from_module(getattr(pipe, name))
    assert torch.equal(run_pipe(pipe, kw), ref)
    assert no_attnpatch_state(pipe) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_cpu_offload_on_cuda(offload):
    """diffusers' real enable_model_cpu_offload / enable_sequential_cpu_offload (both need an
    accelerator): patched before or after offloading, the pipeline runs and matches."""
    pipe, kw = sd_pipeline()
    getattr(pipe, f"enable_{offload}_cpu_offload")(device="cuda")
    ref = run_pipe(pipe, kw)
    with attnpatch.patch(pipe, backend="sdpa") as handle:
        assert rel_error(run_pipe(pipe, kw), ref) <= 1e-5
        # prompt_embeds are given (no text encoder run) and txt2img never runs the VAE encoder
        ran = [r for r in handle.report().routed if r.name.startswith(("unet.", "vae.decoder."))]
        assert ran and all(r.calls > 0 and r.backend == "sdpa" for r in ran)
    assert torch.equal(run_pipe(pipe, kw), ref)
    pipe, kw = sd_pipeline()  # patched first, offloaded after
    with attnpatch.patch(pipe, backend="sdpa") as handle:
        getattr(pipe, f"enable_{offload}_cpu_offload")(device="cuda")
        assert rel_error(run_pipe(pipe, kw), ref) <= 1e-5
        assert sum(r.calls for r in handle.report()) > 0
