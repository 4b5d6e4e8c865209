"""patch() on real tiny transformers models through the AttentionInterface: numerics (padding
masks, T5 position bias and scaling=1.0, causal, GQA), routing, exact restore, registrations."""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch import AttnPatchError
from attnpatch.integrations import transformers as itf
from tests.conftest import is_dense
from tests.tiny_models import (TRANSFORMERS, TRANSFORMERS_MODULES, counting_backend, llama,
                               no_attnpatch_state, rel_error, run, seeded)

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def built():
    out = {}
    for name, factory in TRANSFORMERS.items():
        model, kw = factory()
        out[name] = (model, kw, run(model, kw))
    return out


def _valid(name, kw, out):
    """Rows of padded tokens are not compared (their values depend on the kernel)."""
    if "attention_mask" in kw:
        return out[kw["attention_mask"].bool()]
    return out


def _impls(model):
    return {id(c): c.__dict__.get("_attn_implementation_internal")
            for m in model.modules() if (c := getattr(m, "config", None)) is not None}


@pytest.mark.parametrize("name", list(TRANSFORMERS))
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_matches_unpatched_and_restores_bitwise(built, name, backend):
    model, kw, ref = built[name]
    impls = _impls(model)
    keys = list(model.state_dict())
    handle = attnpatch.patch(model, backend=backend)
    try:
        assert itf.registered()
        assert model.config._attn_implementation == itf.ATTN_NAME
        out = run(model, kw)
        assert rel_error(_valid(name, kw, out), _valid(name, kw, ref)) <= 1e-5
        report = handle.report()
        assert len(report) == TRANSFORMERS_MODULES[name]
        assert all(r.routed and r.calls == 1 and r.backend == backend for r in report), report
        assert list(model.state_dict()) == keys
    finally:
        handle.unpatch()
    assert _impls(model) == impls  # every (sub)config exactly as before
    assert torch.equal(run(model, kw), ref)
    assert not itf.registered()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    assert itf.ATTN_NAME not in AttentionInterface._global_mapping
    assert itf.ATTN_NAME not in AttentionMaskInterface._global_mapping
    assert no_attnpatch_state(model) == []


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_every_module_routed(built, name):
    model, kw, ref = built[name]
    with counting_backend() as counting, attnpatch.patch(model, backend="counting") as handle:
        out = run(model, kw)
        report = handle.report()
    assert rel_error(_valid(name, kw, out), _valid(name, kw, ref)) <= 1e-5
    assert all(r.routed and r.kind == "transformers" and r.calls == 1 for r in report)
    assert counting.calls == sum(r.calls for r in report) == TRANSFORMERS_MODULES[name]


def test_padding_mask_reaches_the_backend(built):
    """Without the mask function registered, transformers would drop the padding mask."""
    model, kw, ref = built["t5"]
    seen = []

    class Spy(attnpatch.Backend):
        name = "spy"
        priority = None

        def forward(self, call, **options):
            seen.append((call.mask_kind, tuple(call.attn_mask.shape), call.scale))
            return torch.nn.functional.scaled_dot_product_attention(
                call.query, call.key, call.value, attn_mask=call.attn_mask, scale=call.scale)

    attnpatch.register_backend(Spy)
    try:
        with attnpatch.patch(model, backend="spy"):
            out = run(model, kw)
    finally:
        attnpatch.unregister_backend("spy")
    # T5: position bias folded into a float mask, no 1/sqrt(d) scaling
    assert seen == [("float", (2, 2, 7, 7), 1.0)] * 2
    assert rel_error(_valid("t5", kw, out), _valid("t5", kw, ref)) <= 1e-5


def test_causal_and_gqa():
    """Llama: 4 query heads on 2 kv heads, causal from module.is_causal (no mask passed)."""
    model, _ = llama()
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(3))
    ref = run(model, dict(input_ids=ids))
    calls = []

    class Spy(attnpatch.Backend):
        name = "spy"
        priority = None

        def forward(self, call, **options):
            calls.append((call.is_causal, call.num_heads, call.num_kv_heads, call.mask_kind))
            return torch.nn.functional.scaled_dot_product_attention(
                call.query, call.key, call.value, attn_mask=call.attn_mask,
                is_causal=call.is_causal, scale=call.scale, enable_gqa=call.is_gqa)

    attnpatch.register_backend(Spy)
    try:
        with attnpatch.patch(model, backend="spy"):
            out = run(model, dict(input_ids=ids))
    finally:
        attnpatch.unregister_backend("spy")
    assert calls == [(True, 4, 2, "none")] * 2
    assert rel_error(out, ref) <= 1e-5


def test_excluded_module_keeps_its_implementation(built):
    model, kw, ref = built["clip_text"]
    with attnpatch.patch(model, backend="math", exclude="*layers.1*") as handle:
        out = run(model, kw)
        report = handle.report()
        excluded = model.get_submodule("encoder.layers.1.self_attn")
        assert excluded.__dict__.get("_attnpatch_passthrough") == "sdpa"
    assert [r.name for r in report] == ["encoder.layers.0.self_attn"]
    assert report[0].calls == 1
    assert rel_error(_valid("clip_text", kw, out), _valid("clip_text", kw, ref)) <= 1e-5
    assert no_attnpatch_state(model) == []


def test_model_set_attention_backend(built):
    model, kw, _ = built["clip_vision"]
    with attnpatch.patch(model, backend="sdpa") as handle:
        model.set_attention_backend("math")
        run(model, kw)
        assert {r.backend for r in handle.report()} == {"math"}
        model.reset_attention_backend()
        run(model, kw)
        assert {r.backend for r in handle.report()} == {"sdpa"}
    assert "set_attention_backend" not in vars(model)


def test_eager_model_restores_eager():
    from transformers import CLIPTextConfig, CLIPTextModel
    model = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         max_position_embeddings=16, bos_token_id=0,
                                         eos_token_id=2, attn_implementation="eager")).eval()
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = run(model, dict(input_ids=ids))
    with attnpatch.patch(model, backend="math"):
        assert rel_error(run(model, dict(input_ids=ids)), ref) <= 1e-5
    assert model.config._attn_implementation == "eager"
    assert torch.equal(run(model, dict(input_ids=ids)), ref)


def test_two_models_share_the_registration(built):
    a, kw_a, _ = built["clip_text"]
    b, kw_b, _ = built["t5"]
    ha = attnpatch.patch(a)
    hb = attnpatch.patch(b)
    ha.unpatch()
    assert itf.registered()
    run(b, kw_b)
    assert all(r.calls == 1 for r in hb.report())
    hb.unpatch()
    assert not itf.registered()


def test_unknown_backend_is_refused_before_anything_changes(built):
    model, kw, _ = built["t5"]
    with pytest.raises(AttnPatchError, match="unknown backend 'flsh'; did you mean"):
        attnpatch.patch(model, backend="flsh")
    assert model.config._attn_implementation == "sdpa"
    assert not itf.registered()
    assert no_attnpatch_state(model) == []


def test_implementation_switched_after_patch_is_reported(built):
    model, kw, ref = built["clip_vision"]
    with attnpatch.patch(model, backend="math") as handle:
        model.set_attn_implementation("eager")
        run(model, kw)
        report = handle.report()
        assert not any(r.routed for r in report) and all(r.calls == 0 for r in report)
        assert "switched after patch()" in report[0].note
    # what the user switched to after patching stays (like a swapped diffusers processor)
    assert model.config._attn_implementation == "eager"
    assert no_attnpatch_state(model) == []
    model.set_attn_implementation("sdpa")
    assert torch.equal(run(model, kw), ref)


def _decorate(wraps: bool):
    """A decorator like transformers' ``deprecate_kwarg``: with functools.wraps, or a bare
    wrapper whose own code never mentions ALL_ATTENTION_FUNCTIONS."""
    import functools

    def decorator(fn):
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)
        return functools.wraps(fn)(wrapper) if wraps else wrapper
    return decorator


@pytest.mark.parametrize("wraps", [True, False], ids=["functools.wraps", "bare-closure"])
def test_decorated_attention_forward_is_found_and_routed(wraps):
    from transformers.models.llama.modeling_llama import LlamaAttention
    model, kw = llama()
    ref = run(model, kw)

    class Decorated(LlamaAttention):
        forward = _decorate(wraps)(LlamaAttention.forward)

    attn = [m for m in model.modules() if isinstance(m, LlamaAttention)]
    for m in attn:
        m.__class__ = Decorated
    assert "ALL_ATTENTION_FUNCTIONS" not in Decorated.forward.__code__.co_names
    assert all(itf.is_attention_module(m) for m in attn)
    with counting_backend() as counting, attnpatch.patch(model, backend="counting") as handle:
        out = run(model, kw)
        report = handle.report()
    assert len(report) == len(attn) and all(r.routed and r.calls == 1 for r in report)
    assert counting.calls == len(attn)
    assert rel_error(_valid("llama", kw, out), _valid("llama", kw, ref)) <= 1e-5


# --- softcap (Gemma 2) and attention sinks (GPT-OSS) ---------------------------------------------
def gemma2(softcap):
    """A tiny Gemma2 (eager, as transformers requires for softcapping) whose q/k projections are
    scaled up so that its attention logits are large enough for the cap to matter; sliding
    window 4 on its first layer, so the sliding-window mask is exercised at length 7."""
    from transformers import Gemma2Config, Gemma2Model
    from tests.tiny_models import _ids_and_mask
    torch.manual_seed(0)
    m = Gemma2Model(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=32,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, max_position_embeddings=32,
                                 query_pre_attn_scalar=16, sliding_window=4,
                                 attn_logit_softcapping=softcap,
                                 attn_implementation="eager")).eval()
    with torch.no_grad():
        for layer in m.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    ids, mask = _ids_and_mask()
    return m, dict(input_ids=ids, attention_mask=mask)


def _softcap_backends():
    from attnpatch import registry
    return [b.name for b in registry.all_backends() if b.supports_softcap
            and "cpu" in b.devices and not b.availability_reasons() and is_dense(b.name)]


@pytest.mark.parametrize("backend", ["auto", *_softcap_backends()])
@pytest.mark.parametrize("softcap", [50.0, 1.0])
def test_gemma2_patched_equals_eager(softcap, backend):
    model, kw = gemma2(softcap)
    assert model.config._attn_implementation == "eager"
    ref = run(model, kw)
    attn = [m for m in model.modules() if itf.is_attention_module(m)]
    for m in attn:  # the same model without the cap: the cap must change the result
        m.attn_logit_softcapping = None
    uncapped = run(model, kw)
    for m in attn:
        m.attn_logit_softcapping = softcap
    assert rel_error(_valid("gemma2", kw, uncapped), _valid("gemma2", kw, ref)) > 1e-3
    with attnpatch.patch(model, backend=backend) as handle:
        assert model.config._attn_implementation == itf.ATTN_NAME
        out = run(model, kw)
        report = handle.report()
    assert rel_error(_valid("gemma2", kw, out), _valid("gemma2", kw, ref)) <= 1e-5
    assert len(report) == len(attn) == 2
    from attnpatch import registry
    for r in report:  # every module routed, once, on a backend that computes the cap
        assert r.routed and r.calls == 1, r
        assert registry.get_backend(r.backend).supports_softcap, r.backend
    if backend != "auto":
        assert {r.backend for r in report} == {backend}
    assert model.config._attn_implementation == "eager"
    assert torch.equal(run(model, kw), ref)
    assert no_attnpatch_state(model) == []


def test_gemma2_on_a_backend_without_softcap_is_refused_with_the_reason():
    model, kw = gemma2(50.0)
    with attnpatch.patch(model, backend="sdpa"):
        with pytest.raises(attnpatch.BackendUnavailableError, match="softcap=50.0 not supported"):
            run(model, kw)


def gpt_oss():
    from transformers import GptOssConfig, GptOssModel
    torch.manual_seed(0)
    m = GptOssModel(GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                 num_experts_per_tok=1, max_position_embeddings=32,
                                 sliding_window=4)).eval()
    return m, dict(input_ids=torch.randint(3, 60, (2, 7), generator=torch.Generator()
                                           .manual_seed(1)))


def test_unsupported_reason_finds_attention_sinks():
    model, kw = gpt_oss()
    run(model, kw)  # it builds and runs on CPU (eager)
    attn = [(n, m) for n, m in model.named_modules() if itf.is_attention_module(m)]
    assert [n for n, _ in attn] == ["layers.0.self_attn", "layers.1.self_attn"]
    for name, m in attn:
        reason = itf.unsupported_reason(m, name)
        assert reason == (
            f"{name} (GptOssAttention) passes attention sinks (s_aux=) to its attention "
            f"function, which no attnpatch backend computes: exclude it from the patch "
            f"(patch(..., exclude={name!r})) or leave this model unpatched (attnpatch.unpatch)")
    # transformers >= 5.24 puts this forward behind its deprecate_kwarg decorator, whose own
    # code never names s_aux: the reasons above were found in the wrapped code
    forward = type(attn[0][1]).forward
    if hasattr(forward, "__wrapped__"):
        assert "s_aux" not in {c for t in forward.__code__.co_consts if isinstance(t, tuple)
                               for c in t}
    # a layer whose sinks are None (MiMo-V2-Flash's full-attention layers) passes s_aux=None
    attn[1][1].sinks = None
    assert itf.unsupported_reason(attn[1][1]) is None
    # attention modules that pass no sinks
    gemma, _ = gemma2(50.0)
    others = [m for mod in (gemma, llama()[0], *(f()[0] for f in TRANSFORMERS.values()))
              for m in mod.modules() if itf.is_attention_module(m)]
    assert others and all(itf.unsupported_reason(m) is None for m in others)


def test_patch_refuses_attention_sinks_at_patch_time():
    model, kw = gpt_oss()
    ref = run(model, kw)
    with pytest.raises(AttnPatchError, match=r"layers\.0\.self_attn \(GptOssAttention\) passes "
                                             r"attention sinks \(s_aux=\).*exclude"):
        attnpatch.patch(model, backend="math")
    # refused before anything changed
    assert model.config._attn_implementation == "eager"
    assert not itf.registered()
    assert no_attnpatch_state(model) == []
    assert torch.equal(run(model, kw), ref)


def test_excluding_the_sink_modules_is_the_fix_the_error_names():
    """The refusal names exclude=...; with the sink layers excluded (here: all of them, so
    nothing is left) patch() says what it says for an empty selection, not a sink error."""
    model, _ = gpt_oss()
    with pytest.raises(AttnPatchError, match="leave no attention module"):
        attnpatch.patch(model, exclude=["layers.0.self_attn", "layers.1.self_attn"])
    assert no_attnpatch_state(model) == []


def _new_model(name: str):
    """A transformers class that only newer releases have (the min CI leg pins an older one)."""
    import transformers
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls


def deepseek_v32():
    import transformers
    config = _new_model("DeepseekV32Config")(
        vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2, kv_lora_rank=16,
        q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, head_dim=8,
        index_topk=4, index_head_dim=8, index_n_heads=2, first_k_dense_replace=1,
        max_position_embeddings=64)
    return seeded(transformers.DeepseekV32Model(config))


def inkling2():
    import transformers
    config = _new_model("Inkling2TextConfig")(
        vocab_size=64, unpadded_vocab_size=64, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, swa_num_attention_heads=4,
        swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=4, d_rel=4, rel_extent=8,
        moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
        n_layers_per_attn_res_block=1, max_position_embeddings=64, eos_token_id=1)
    return seeded(transformers.Inkling2TextModel(config))


@pytest.mark.parametrize("factory, what", [
    (deepseek_v32, r"the key indices of a sparse attention indexer \(indices=\)"),
    (inkling2, r"attention sinks \(sinks=\)")])
def test_keywords_no_backend_computes_are_refused_at_patch_time(factory, what):
    """DeepSeek-V3.2's indexer folds its top-k keys into the mask only for "eager"/"sdpa" and
    passes ``indices=`` to any other implementation; Inkling 2 passes per-token ``sinks=``.
    Dropping either changed the output by 0.4-0.8 (relative): patch() refuses such a model
    before anything changes, naming the module, what it passes and the fix."""
    model = factory()
    ids = torch.randint(3, 60, (1, 10), generator=torch.Generator().manual_seed(0))
    kw = dict(input_ids=ids)
    ref = run(model, kw)
    with pytest.raises(AttnPatchError, match=r"layers\.0\.self_attn \(\w+\) passes " + what
                       + r" to its attention function, which no attnpatch backend computes: "
                         r"exclude it"):
        attnpatch.patch(model, backend="math")
    assert not itf.registered()
    assert no_attnpatch_state(model) == []
    assert torch.equal(run(model, kw), ref)


def test_unknown_tensor_keywords_raise_at_the_call():
    """The backstop inside the attention function: a keyword no backend computes, or a tensor
    under a keyword the function does not know, raises naming it and the module; the keywords
    the mask already holds (``position_ids``, packed-sequence lengths) pass."""
    model, kw = llama()
    module = model.layers[0].self_attn
    q, k, v = (torch.randn(2, 4, 5, 8, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    with attnpatch.patch(model, backend="math"):
        out, _ = itf.attnpatch_attention(module, q, k, v, None, position_ids=torch.arange(5),
                                         cu_seq_lens_q=torch.tensor([0, 5]), sliding_window=4)
        assert out.shape == (2, 5, 4, 8)
        with pytest.raises(AttnPatchError, match=r"layers\.0\.self_attn: the key indices of a "
                                                 r"sparse attention indexer \(indices=\)"):
            itf.attnpatch_attention(module, q, k, v, None, indices=torch.zeros(2, 5, 2))
        with pytest.raises(AttnPatchError, match=r"layers\.0\.self_attn: its attention function "
                                                 r"was passed router_bias= \(a tensor\).*exclude"):
            itf.attnpatch_attention(module, q, k, v, None, router_bias=torch.ones(1))


def test_gemma4_queries_cut_to_logits_to_keep_stay_causal():
    """Gemma 4 cuts its KV-shared layers' queries to the last ``logits_to_keep`` after building
    the masks (for every implementation but "sdpa"); a mask left out as causal then arrives
    with more keys than queries. Those queries are the last ones: bottom-right causal, what
    the full mask's rows give (this was top-left with the keys cut, 0.26 off)."""
    import transformers
    config = _new_model("Gemma4TextConfig")(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        sliding_window=16, vocab_size_per_layer_input=64, hidden_size_per_layer_input=8,
        num_kv_shared_layers=2, per_layer_config=None,
        layer_types=["sliding_attention", "full_attention"] * 2)
    model = seeded(transformers.Gemma4ForCausalLM(config))
    ids = torch.randint(3, 64, (1, 10), generator=torch.Generator().manual_seed(0))
    for keep in (0, 1, 3):
        with torch.no_grad():
            ref = model(input_ids=ids, logits_to_keep=keep).logits
            with attnpatch.patch(model, backend="math"):
                out = model(input_ids=ids, logits_to_keep=keep).logits
        assert out.shape == ref.shape and rel_error(out, ref) < 1e-5, keep


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_with_each_cache_equals_unpatched(cache):
    """A static cache's prefill has more keys than queries (the empty slots after them): its
    mask is built in full, never left to the call's causal flag."""
    from transformers import LlamaConfig, LlamaForCausalLM
    model = seeded(LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)))
    ids = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=5, do_sample=False, output_scores=True,
              return_dict_in_generate=True, cache_implementation=cache, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        with attnpatch.patch(model, backend="math") as handle:
            out = model.generate(ids, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert rel_error(torch.stack(out.scores), torch.stack(ref.scores)) < 1e-5
    assert all(r.calls > 0 for r in handle.report())


def test_output_attentions_warns_once_per_module(caplog):
    model, kw = llama()
    with attnpatch.patch(model, backend="math"):
        with caplog.at_level("WARNING", logger="attnpatch.integrations.transformers"):
            run(model, dict(kw, output_attentions=True))
            run(model, dict(kw, output_attentions=True))
    warned = [r.getMessage() for r in caplog.records if "output_attentions" in r.getMessage()]
    assert len(warned) == 2 and warned[0].startswith("layers.0.self_attn: output_attentions=True")
