"""patch() on real tiny diffusers models: numerics, routing, token layout, exact restore, LoRA,
compile, offload hooks, legacy processors."""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch import AttnPatchError
from tests.tiny_models import (DIFFUSERS, EXPECTED_MODULES, counting_backend, flux, no_attnpatch_state,
                               processors_of, rel_error, run, sd15)

pytest.importorskip("diffusers")

MODELS = list(DIFFUSERS)


@pytest.fixture(scope="module")
def built():
    """Each tiny model with its inputs and unpatched reference output (built once)."""
    out = {}
    for name, factory in DIFFUSERS.items():
        model, kw = factory()
        out[name] = (model, kw, run(model, kw))
    return out


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_matches_unpatched_and_restores_bitwise(built, name, backend):
    model, kw, ref = built[name]
    processors = processors_of(model)
    params = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    handle = attnpatch.patch(model, backend=backend)
    try:
        out = run(model, kw)
        assert rel_error(out, ref) <= 1e-5
        report = handle.report()
        assert len(report) == EXPECTED_MODULES[name]
        assert all(r.routed and r.calls >= 1 and r.backend == backend for r in report), report
        # no parameter and no state_dict key changed
        state = model.state_dict()
        assert list(state) == list(params)
        assert all(state[k].data_ptr() == p and torch.equal(state[k], v)
                   for k, (p, v) in params.items())
    finally:
        handle.unpatch()
    assert torch.equal(run(model, kw), ref)
    restored = processors_of(model)
    assert restored.keys() == processors.keys()
    assert all(restored[k] is processors[k] for k in processors)  # the very same objects
    assert no_attnpatch_state(model) == []


@pytest.mark.parametrize("name", MODELS)
def test_every_module_routed(built, name):
    """A counting backend sees exactly the calls the report books, from every module."""
    model, kw, ref = built[name]
    with counting_backend() as counting, attnpatch.patch(model, backend="counting") as handle:
        out = run(model, kw)
        report = handle.report()
    assert rel_error(out, ref) <= 1e-5
    assert len(report) == EXPECTED_MODULES[name]
    assert [r.name for r in report] == [n for n, m in model.named_modules()
                                        if hasattr(m, "processor") and hasattr(m, "set_processor")]
    assert all(r.routed and r.calls >= 1 and r.backend == "counting" for r in report), report
    assert counting.calls == sum(r.calls for r in report)


def test_report_prints_a_table(built):
    model, kw, _ = built["sd15"]
    with attnpatch.patch(model, backend="math") as handle:
        run(model, kw)
        text = str(handle.report())
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1" in text
    assert "8/8 attention modules routed through attnpatch" in text
    assert "AttnProcessor2_0" in text and "math" in text


def test_auto_fallbacks_are_reported(built):
    """A backend auto prefers but that cannot run the call shows up with its reason."""
    model, kw, ref = built["flux"]

    class HalfOnly(attnpatch.Backend):
        name = "half_only"
        priority = 1
        dtypes = (torch.float16,)

        def forward(self, call, **options):  # pragma: no cover - never chosen here
            raise AssertionError

    attnpatch.register_backend(HalfOnly)
    try:
        with attnpatch.patch(model) as handle:
            assert rel_error(run(model, kw), ref) <= 1e-5
            report = handle.report()
    finally:
        attnpatch.unregister_backend("half_only")
    for r in report:
        assert r.requested == "auto" and r.backend == "sdpa"
        assert r.fallbacks["half_only"] == ["dtype torch.float32 not in (float16)"]


def test_per_module_backends_include_exclude(built):
    model, kw, ref = built["flux"]
    with attnpatch.patch(model, backend={"single_transformer_blocks.*": "math", "*": "sdpa"}) as h:
        assert rel_error(run(model, kw), ref) <= 1e-5
        got = {r.name: r.backend for r in h.report()}
    assert got == {"transformer_blocks.0.attn": "sdpa", "single_transformer_blocks.0.attn": "math"}
    with attnpatch.patch(model, backend="math", include="transformer_blocks") as h:
        run(model, kw)
        assert [r.name for r in h.report()] == ["transformer_blocks.0.attn"]
        assert type(model.single_transformer_blocks[0].attn.processor).__dict__.get(
            "_attnpatch_routed") is None
    with attnpatch.patch(model, backend="math", exclude=["*single*"]) as h:
        assert [r.name for r in h.report()] == ["transformer_blocks.0.attn"]
    assert no_attnpatch_state(model) == []


def test_context_block_overrides_patch_backend(built):
    model, kw, ref = built["sd3"]
    with attnpatch.patch(model, backend="sdpa") as handle:
        with attnpatch.attention_backend("math"):
            run(model, kw)
        assert {r.backend for r in handle.report()} == {"math"}
        run(model, kw)
        assert {r.backend for r in handle.report()} == {"sdpa"}
        assert all(r.backends == {"math": 1, "sdpa": 1} for r in handle.report())


def test_idempotent_and_nested_patches(built):
    model, kw, ref = built["sd15"]
    originals = processors_of(model)
    h1 = attnpatch.patch(model, backend="math")
    installed = processors_of(model)
    h2 = attnpatch.patch(model, backend="math")
    assert h2 is h1
    assert all(processors_of(model)[k] is installed[k] for k in installed)  # not wrapped twice
    # patching a part of an already patched model shares its state
    sub = model.down_blocks[0]
    h3 = attnpatch.patch(sub, backend="sdpa")
    assert h3 is not h1 and len(h3.report()) == 2
    run(model, kw)
    h3.unpatch()  # the model's own patch stays in place
    assert all(processors_of(model)[k] is installed[k] for k in installed)
    h1.unpatch()
    assert all(processors_of(model)[k] is originals[k] for k in originals)
    assert torch.equal(run(model, kw), ref)
    assert no_attnpatch_state(model) == []


def test_shared_processor_instance_is_restored_shared():
    from diffusers.models.attention_processor import AttnProcessor2_0
    model, kw = sd15()
    shared = AttnProcessor2_0()
    model.set_attn_processor(shared)
    ref = run(model, kw)
    with attnpatch.patch(model, backend="math") as handle:
        procs = list(processors_of(model).values())
        assert len({id(p) for p in procs}) == len(procs)  # one copy per module
        run(model, kw)
        assert all(r.calls == 1 for r in handle.report())
    assert all(p is shared for p in processors_of(model).values())
    assert torch.equal(run(model, kw), ref)


def test_fused_qkv_processors_are_routed():
    model, kw = sd15()
    ref = run(model, kw)
    model.fuse_qkv_projections()
    fused = run(model, kw)
    assert rel_error(fused, ref) <= 1e-5
    with attnpatch.patch(model, backend="math") as handle:
        assert rel_error(run(model, kw), fused) <= 1e-5
        report = handle.report()
    assert {r.processor for r in report} == {"FusedAttnProcessor2_0"}
    assert all(r.routed and r.calls == 1 for r in report)


def test_legacy_bmm_processor_swapped_for_sdpa_equivalent():
    from diffusers.models.attention_processor import Attention, AttnProcessor
    torch.manual_seed(0)
    # scale_qk=False: attn.scale = 1.0, which AttnProcessor uses and AttnProcessor2_0 would not
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8, scale_qk=False,
                     processor=AttnProcessor()).eval()
    legacy = attn.processor
    hs, ehs = torch.randn(2, 10, 16), torch.randn(2, 5, 12)
    mask = torch.zeros(2, 1, 5)
    mask[0, :, 3:] = -10000.0  # additive key padding, as UNets pass it
    with torch.no_grad():
        ref = attn(hs, encoder_hidden_states=ehs, attention_mask=mask)
    with counting_backend() as counting, attnpatch.patch(attn, backend="counting") as handle:
        with torch.no_grad():
            out = attn(hs, encoder_hidden_states=ehs, attention_mask=mask)
        assert type(attn.processor).__name__ == "AttnProcessor2_0"
        (rec,) = handle.report()
    assert rel_error(out, ref) <= 1e-5 and counting.calls == 1
    assert rec.routed and rec.processor == "AttnProcessor" and rec.calls == 1
    assert attn.processor is legacy


@pytest.mark.parametrize("legacy, equivalent, added_kv", [
    ("XFormersAttnProcessor", "AttnProcessor2_0", False),
    ("XFormersAttnAddedKVProcessor", "AttnAddedKVProcessor2_0", True),
])
def test_xformers_processor_swapped_for_sdpa_equivalent(legacy, equivalent, added_kv):
    """A model left on xformers processors (enable_xformers_memory_efficient_attention) is
    routed through diffusers' SDPA equivalent; xformers itself need not be installed. The
    reference is that equivalent unpatched (xformers cannot run here)."""
    from diffusers.models import attention_processor as ap
    torch.manual_seed(0)
    # added-KV blocks (UnCLIP, Kandinsky) project the context with add_k/add_v_proj and the
    # image tokens with to_k/to_v, so cross_attention_dim is the query's own width there
    extra = dict(added_kv_proj_dim=12, norm_num_groups=4, cross_attention_dim=16) if added_kv \
        else dict(cross_attention_dim=12)
    attn = ap.Attention(query_dim=16, heads=2, dim_head=8, processor=getattr(ap, equivalent)(),
                        **extra).eval()
    hs, ehs = torch.randn(2, 10, 16), torch.randn(2, 5, 12)
    if added_kv:
        hs = torch.randn(2, 16, 3, 3)  # AttnAddedKV processors take (B, C, H, W)
    with torch.no_grad():
        ref = attn(hs, encoder_hidden_states=ehs)
    attn.set_processor(getattr(ap, legacy)())
    xformers_processor = attn.processor
    with counting_backend() as counting, attnpatch.patch(attn, backend="counting") as handle:
        with torch.no_grad():
            out = attn(hs, encoder_hidden_states=ehs)
        assert type(attn.processor).__name__ == equivalent
        (rec,) = handle.report()
    assert rel_error(out, ref) <= 1e-5 and counting.calls == 1
    assert rec.routed and rec.processor == legacy and rec.calls == 1
    assert attn.processor is xformers_processor


def test_legacy_processor_without_equivalent_is_reported_not_routed():
    from diffusers.models.attention_processor import Attention, AttnProcessor
    model, kw = sd15()
    # AttnProcessor ignores qk-norm, AttnProcessor2_0 applies it: not the same computation
    odd = Attention(query_dim=16, heads=2, dim_head=8, qk_norm="layer_norm",
                    processor=AttnProcessor())
    container = torch.nn.ModuleDict({"unet": model, "odd": odd})
    with attnpatch.patch(container, backend="math") as handle:
        report = handle.report().by_name()
        assert not report["odd"].routed
        assert "ignores attn.norm_q" in report["odd"].note
        assert "NOT ROUTED" in str(handle.report())
        assert len(handle.report().routed) == 8
    with pytest.raises(AttnPatchError, match="none of the 1 attention modules"):
        attnpatch.patch(odd)
    assert no_attnpatch_state(container) == []


def test_ip_adapter_legacy_processor_keeps_its_weights():
    from diffusers.models.attention_processor import (Attention, IPAdapterAttnProcessor,
                                                      IPAdapterAttnProcessor2_0)
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    attn.set_processor(IPAdapterAttnProcessor(hidden_size=16, cross_attention_dim=12,
                                              num_tokens=(4,), scale=0.7))
    keys = list(attn.state_dict())
    hs, ehs, ip = torch.randn(2, 10, 16), torch.randn(2, 5, 12), torch.randn(2, 4, 12)
    with torch.no_grad():
        ref = attn(hs, encoder_hidden_states=(ehs, [ip]))
    with attnpatch.patch(attn, backend="math") as handle:
        assert isinstance(attn.processor, IPAdapterAttnProcessor2_0)
        assert list(attn.state_dict()) == keys
        assert attn.processor.to_k_ip[0].weight is handle.records[0].original.to_k_ip[0].weight
        with torch.no_grad():
            out = attn(hs, encoder_hidden_states=(ehs, [ip]))
        assert handle.report()[0].calls == 2  # text and image-prompt attention
    assert rel_error(out, ref) <= 1e-5
    assert isinstance(attn.processor, IPAdapterAttnProcessor) and list(attn.state_dict()) == keys


def test_module_processor_is_routed_once_with_its_attention_module():
    """An nn.Module processor that calls SDPA (IP-adapter) is a child module of its attention
    module: it is routed as that module's processor, not as a module of its own."""
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    original = IPAdapterAttnProcessor2_0(hidden_size=16, cross_attention_dim=12,
                                         num_tokens=(4,), scale=0.7)
    attn.set_processor(original)
    hs, ehs, ip = torch.randn(2, 10, 16), torch.randn(2, 5, 12), torch.randn(2, 4, 12)
    with torch.no_grad():
        ref = attn(hs, encoder_hidden_states=(ehs, [ip]))
    with attnpatch.patch(attn, backend="math") as handle:
        with torch.no_grad():
            out = attn(hs, encoder_hidden_states=(ehs, [ip]))
        report = handle.report()
    assert [(r.name, r.kind, r.calls) for r in report] == [("", "diffusers", 2)]
    assert rel_error(out, ref) <= 1e-5
    assert attn.processor is original and type(original) is IPAdapterAttnProcessor2_0


def test_processor_kwargs_filtering_sees_the_real_signature(built):
    import inspect
    model, kw, _ = built["flux"]
    attn = model.transformer_blocks[0].attn
    before = inspect.signature(attn.processor.__call__)
    with attnpatch.patch(model):
        assert inspect.signature(attn.processor.__call__) == before
        assert isinstance(attn.processor, type(attn.processor).__mro__[1])
        assert type(attn.processor).__name__ == "FluxAttnProcessor"


def test_nothing_global_is_touched(built):
    import diffusers.models.attention_dispatch as ad
    import diffusers.models.attention_processor as ap
    import diffusers.models.transformers.transformer_flux as tf
    model, kw, _ = built["flux"]
    active = ad._AttentionBackendRegistry._active_backend
    with attnpatch.patch(model, backend="math"):
        model.set_attention_backend("sdpa")
        run(model, kw)
        assert ap.F is torch.nn.functional
        assert tf.dispatch_attention_fn is ad.dispatch_attention_fn
        assert ad._AttentionBackendRegistry._active_backend == active
    assert ad._AttentionBackendRegistry._active_backend == active


def test_model_set_attention_backend_after_patch(built):
    model, kw, ref = built["sd3"]
    cls_method = type(model).set_attention_backend
    with attnpatch.patch(model, backend="sdpa") as handle:
        model.set_attention_backend("math")
        run(model, kw)
        assert {r.backend for r in handle.report()} == {"math"}
        model.set_attention_backend("_native_math")  # diffusers' name for SDPA's math kernel
        run(model, kw)
        assert {r.backend for r in handle.report()} == {"sdpa_math"}
        with pytest.raises(AttnPatchError, match="unknown backend 'nope'"):
            model.set_attention_backend("nope")
        model.reset_attention_backend()
        assert rel_error(run(model, kw), ref) <= 1e-5
        assert {r.backend for r in handle.report()} == {"sdpa"}
    assert "set_attention_backend" not in vars(model)
    assert type(model).set_attention_backend is cls_method


def test_set_attention_backend_without_patch_then_reset_restores(built):
    model, kw, ref = built["pixart"]
    processors = processors_of(model)
    handle = attnpatch.set_attention_backend(model, "math")
    run(model, kw)
    assert {r.backend for r in handle.report()} == {"math"}
    assert attnpatch.set_attention_backend(model, "sdpa") is handle
    model.reset_attention_backend()  # the patch came from set_attention_backend: undo it
    assert not handle.active
    assert all(processors_of(model)[k] is processors[k] for k in processors)
    assert torch.equal(run(model, kw), ref)
    assert no_attnpatch_state(model) == []


def test_diffusers_processor_backend_is_honored(built):
    """A backend chosen with diffusers' own API before patching keeps working (mapped)."""
    model, kw, ref = built["wan"]
    for m in model.modules():
        if hasattr(m, "processor") and hasattr(m.processor, "_attention_backend"):
            m.processor._attention_backend = "_native_math"
    try:
        with attnpatch.patch(model) as handle:
            assert rel_error(run(model, kw), ref) <= 1e-5
            assert {r.backend for r in handle.report()} == {"sdpa_math"}
        with attnpatch.patch(model, backend="math") as handle:  # attnpatch's choice wins
            run(model, kw)
            assert {r.backend for r in handle.report()} == {"math"}
    finally:
        for m in model.modules():
            if hasattr(m, "processor") and hasattr(m.processor, "_attention_backend"):
                m.processor._attention_backend = None


def test_context_parallel_config_is_refused(built):
    model, kw, _ = built["flux"]
    proc = model.transformer_blocks[0].attn.processor
    with attnpatch.patch(model):
        model.transformer_blocks[0].attn.processor._parallel_config = object()
        with pytest.raises(AttnPatchError, match="parallel_config"):
            run(model, kw)
    assert model.transformer_blocks[0].attn.processor is proc
    assert proc._parallel_config is None


def test_replaced_processor_is_reported_and_left_alone(built):
    from diffusers.models.attention_processor import AttnProcessor2_0
    model, kw, _ = built["sd15"]
    originals = processors_of(model)
    handle = attnpatch.patch(model, backend="math")
    mine = AttnProcessor2_0()
    model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.set_processor(mine)
    run(model, kw)
    rec = handle.report().by_name()["down_blocks.0.attentions.0.transformer_blocks.0.attn1"]
    assert not rec.routed and "replaced after patch" in rec.note
    assert "7/8 attention modules routed" in str(handle.report())
    assert attnpatch.patch(model, backend="math") is handle  # patch again: routed again
    assert len(handle.report()) == 8 and len(handle.report().routed) == 8
    handle.unpatch()
    # the processor set after patching is what unpatch puts back there
    assert model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.processor is mine
    model.set_attn_processor({f"{k}.processor": v for k, v in originals.items()})
    assert no_attnpatch_state(model) == []


# --- token layout -----------------------------------------------------------------------------

def _layouts(model, kw):
    with counting_backend(record_layouts=True) as counting, \
            attnpatch.patch(model, backend="counting"):
        run(model, kw)
        assert attnpatch.current_token_layout() is None  # outside any forward
    return counting.layouts


def test_token_layout_unet_per_level(built):
    model, kw, _ = built["sd15"]
    layouts = _layouts(model, kw)
    assert len(layouts) == 8
    seen = set()
    for q, k, layout in layouts:
        assert layout.model == "UNet2DConditionModel"
        assert layout.frames * layout.height * layout.width == q[2] == layout.image_tokens
        if q[2] == k[2]:  # attn1
            assert layout.text_position == "none" and layout.text_tokens == 0
        else:  # attn2: the keys are the 7 text tokens
            assert layout.text_position == "key" and layout.text_tokens == 7
            assert layout.text_slice == slice(0, 7)
        seen.add((layout.height, layout.width))
    assert seen == {(16, 16), (8, 8)}  # CrossAttn blocks at level 0, the mid block at level 1


def test_token_layout_flux_text_first(built):
    model, kw, _ = built["flux"]
    layouts = _layouts(model, kw)
    assert len(layouts) == 2
    for q, k, layout in layouts:
        assert q[2] == 7 + 16
        assert layout.text_position == "first" and layout.text_tokens == 7
        assert layout.grid == (1, 4, 4)
        assert layout.text_slice == slice(0, 7) and layout.image_slice == slice(7, 23)


def test_token_layout_sd3_text_last(built):
    model, kw, _ = built["sd3"]
    for q, k, layout in _layouts(model, kw):
        assert q[2] == 64 + 7
        assert layout.text_position == "last" and layout.text_tokens == 7
        assert layout.grid == (1, 8, 8)  # 16x16 latents, patch 2
        assert layout.image_slice == slice(0, 64) and layout.text_slice == slice(64, 71)


def test_token_layout_wan_video_grid(built):
    model, kw, _ = built["wan"]
    got = {(q[2], k[2]): layout for q, k, layout in _layouts(model, kw)}
    self_attn, cross = got[(32, 32)], got[(32, 7)]
    assert self_attn.grid == (2, 4, 4) and self_attn.text_position == "none"
    assert cross.grid == (2, 4, 4) and cross.text_position == "key" and cross.text_tokens == 7


# --- compatibility: LoRA, compile, offload hooks ----------------------------------------------

def _lora(model, name="default", seed=0):
    from peft import LoraConfig
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                      adapter_name=name)


@pytest.mark.parametrize("factory", [sd15, flux], ids=["unet", "flux"])
def test_peft_lora_before_and_after_patch(factory):
    pytest.importorskip("peft")
    model, kw = factory()
    base = run(model, kw)
    # before patching
    _lora(model, "a", seed=1)
    with_a = run(model, kw)
    assert rel_error(with_a, base) > 1e-3
    handle = attnpatch.patch(model, backend="math")
    assert rel_error(run(model, kw), with_a) <= 1e-5
    # after patching: a second adapter, switching, fusing
    _lora(model, "b", seed=2)
    model.set_adapters(["a", "b"], weights=[1.0, 0.5])
    both = run(model, kw)
    model.set_adapters("a")
    assert rel_error(run(model, kw), with_a) <= 1e-5
    model.fuse_lora(adapter_names=["a"])
    assert rel_error(run(model, kw), with_a) <= 1e-4
    model.unfuse_lora()
    assert rel_error(run(model, kw), with_a) <= 1e-5
    assert all(r.routed for r in handle.report())
    handle.unpatch()
    model.set_adapters(["a", "b"], weights=[1.0, 0.5])
    assert rel_error(run(model, kw), both) <= 1e-5


def test_cpu_offload_hooks_keep_working():
    """enable_model_cpu_offload needs an accelerator; on CPU we install the very hook it installs
    per component (accelerate's cpu_offload_with_hook), before and after patching."""
    from accelerate import cpu_offload_with_hook
    from accelerate.hooks import remove_hook_from_module
    model, kw = sd15()
    ref = run(model, kw)
    _, hook = cpu_offload_with_hook(model, "cpu")
    with counting_backend() as counting, attnpatch.patch(model, backend="counting") as handle:
        assert rel_error(run(model, kw), ref) <= 1e-5
        assert counting.calls == 8 and all(r.calls == 1 for r in handle.report())
        hook.remove()
        remove_hook_from_module(model)
        _, hook = cpu_offload_with_hook(model, "cpu")  # hooked after patching
        assert rel_error(run(model, kw), ref) <= 1e-5
        assert counting.calls == 16
    hook.remove()
    remove_hook_from_module(model)
    assert torch.equal(run(model, kw), ref)


def _compile_check(backend, factory=flux):
    import torch._dynamo
    torch._dynamo.reset()
    model, kw = factory()
    ref = run(model, kw)
    with attnpatch.patch(model, backend="sdpa") as handle:
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        with torch.no_grad():
            out = compiled(**kw)[0]
            again = compiled(**kw)[0]
        assert rel_error(out, ref) <= 1e-5 and torch.equal(out, again)
        assert all(r.calls == 0 for r in handle.report())  # compiled calls are not booked
        assert rel_error(run(model, kw), ref) <= 1e-5  # eager still books
        assert all(r.calls == 1 for r in handle.report())
        assert attnpatch.current_token_layout() is None
    torch._dynamo.reset()


@pytest.mark.parametrize("factory", [flux, sd15], ids=["dispatch_attention_fn", "F.sdpa"])
def test_torch_compile_fullgraph_traces_patched_model(factory):
    """fullgraph=True: any graph break in the routed processors (or the layout hooks) would
    raise here. Dynamo's eager backend: the trace is what matters, not inductor's codegen."""
    _compile_check("eager", factory)


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor():
    _compile_check("inductor")


@pytest.mark.parametrize("legacy", [False, True], ids=["AttnAddedKVProcessor2_0",
                                                       "AttnAddedKVProcessor"])
def test_added_kv_processors(legacy):
    from diffusers.models.attention_processor import (Attention, AttnAddedKVProcessor,
                                                      AttnAddedKVProcessor2_0)
    torch.manual_seed(0)
    cls = AttnAddedKVProcessor if legacy else AttnAddedKVProcessor2_0
    attn = Attention(query_dim=16, cross_attention_dim=16, heads=2, dim_head=8,
                     added_kv_proj_dim=12, norm_num_groups=4, only_cross_attention=False,
                     processor=cls()).eval()
    original = attn.processor
    hs, ehs = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 12)  # UnCLIP-style 4-D input
    with torch.no_grad():
        ref = attn(hs, encoder_hidden_states=ehs)
    with counting_backend() as counting, attnpatch.patch(attn, backend="counting") as handle:
        with torch.no_grad():
            out = attn(hs, encoder_hidden_states=ehs)
        assert type(attn.processor).__name__ == "AttnAddedKVProcessor2_0"
        assert handle.report()[0].processor == cls.__name__
    assert counting.calls == 1 and rel_error(out, ref) <= 1e-5
    assert attn.processor is original


def test_qwenimage_routed_text_first_grid_from_img_shapes():
    from diffusers import QwenImageTransformer2DModel
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6)).eval()
    mask = torch.ones(2, 7)
    mask[1, 5:] = 0
    kw = dict(hidden_states=torch.randn(2, 16, 16), encoder_hidden_states=torch.randn(2, 7, 16),
              encoder_hidden_states_mask=mask, timestep=torch.tensor([0.5, 0.5]),
              img_shapes=[[(1, 4, 4)]] * 2)
    ref = run(model, kw)
    with counting_backend(record_layouts=True) as counting, \
            attnpatch.patch(model, backend="counting") as handle:
        out = run(model, kw)
        assert all(r.routed and r.calls == 1 for r in handle.report())
    assert rel_error(out, ref) <= 1e-5 and counting.calls == 2
    for q, k, layout in counting.layouts:
        assert (layout.text_position, layout.text_tokens, layout.grid) == ("first", 7, (1, 4, 4))


def test_attention_backend_block_outranks_a_diffusers_only_backend():
    from diffusers.models.attention_dispatch import AttentionBackendName

    model, kw = flux()
    for module in model.modules():
        if hasattr(module, "processor") and hasattr(module.processor, "_attention_backend"):
            module.processor._attention_backend = AttentionBackendName("sage")
    with attnpatch.patch(model) as handle:
        with attnpatch.attention_backend("math"), torch.no_grad():
            model(**kw)  # diffusers' sage kernel (not installed here) would fail
        assert {r.backend for r in handle.report()} == {"math"}
