"""The dispatcher: precedence, ContextVar isolation, explain == attention, auto for every case."""

from __future__ import annotations

import asyncio
import threading

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import attnpatch
from attnpatch.dispatch import dispatch_call

from .conftest import make_inputs, reference, rel_error


def chosen(q, k, v, **kw):
    return dispatch_call(q, k, v, **kw)[1].backend.name


def test_precedence_argument_context_env(monkeypatch):
    q, k, v, _ = make_inputs()
    assert chosen(q, k, v) == "sdpa"
    monkeypatch.setenv("ATTNPATCH_BACKEND", "math")
    assert chosen(q, k, v) == "math"
    assert chosen(q, k, v, default=("sdpa_math", {})) == "sdpa_math"  # patch default > env
    with attnpatch.attention_backend("sdpa_flash"):
        assert chosen(q, k, v, default=("sdpa_math", {})) == "sdpa_flash"
        assert chosen(q, k, v, backend="math") == "math"
        with attnpatch.attention_backend("native"):
            assert chosen(q, k, v) == "sdpa"
        assert chosen(q, k, v) == "sdpa_flash"
    assert attnpatch.dispatch.current_backend() is None


def test_context_options_reach_the_backend():
    q, k, v, _ = make_inputs(seq_q=8)

    def shift(score, b, h, q_idx, kv_idx):
        return score + (q_idx == kv_idx) * 2.0

    with attnpatch.attention_backend("flex", score_mod=shift):
        out = attnpatch.attention(q, k, v)
    bias = torch.eye(8) * 2.0
    torch.testing.assert_close(out, reference(q, k, v, bias)[0].float())


def test_threads_do_not_interfere():
    q, k, v, _ = make_inputs()
    barrier = threading.Barrier(2)
    seen = {}

    def worker(name):
        with attnpatch.attention_backend(name):
            barrier.wait()
            for _ in range(20):
                seen.setdefault(name, set()).add(chosen(q, k, v))
            barrier.wait()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("math", "sdpa_flash")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"math": {"math"}, "sdpa_flash": {"sdpa_flash"}}


def test_asyncio_tasks_do_not_interfere():
    q, k, v, _ = make_inputs()

    async def task(name):
        with attnpatch.attention_backend(name):
            await asyncio.sleep(0)
            first = chosen(q, k, v)
            await asyncio.sleep(0)
            return first, chosen(q, k, v)

    async def main():
        return await asyncio.gather(task("math"), task("sdpa_math"))

    assert asyncio.run(main()) == [("math", "math"), ("sdpa_math", "sdpa_math")]


def test_selection_is_cached_per_signature():
    q, k, v, _ = make_inputs(seq_q=23)
    attnpatch.dispatch._CACHE.clear()
    attnpatch.attention(q, k, v)
    attnpatch.attention(q, k, v)
    assert len(attnpatch.dispatch._CACHE) == 1
    attnpatch.attention(q[:, :, :5], k, v)                 # new shape: new entry
    with torch.enable_grad():
        attnpatch.attention(q.clone().requires_grad_(), k, v)  # grad mode is part of the key
    assert len(attnpatch.dispatch._CACHE) == 3


def test_grad_requirement_changes_the_choice():
    q, k, v, _ = make_inputs()
    with attnpatch.attention_backend("flex"):
        attnpatch.attention(q, k, v)
        with pytest.raises(attnpatch.BackendUnavailableError, match="no CPU backward"):
            attnpatch.attention(q.requires_grad_(), k, v)


CASES = st.fixed_dictionaries({
    "batch": st.integers(1, 3),
    "kv_heads": st.integers(1, 3),
    "group": st.integers(1, 3),
    "seq_q": st.integers(1, 70),
    "seq_k": st.integers(1, 70),
    "head_dim": st.sampled_from([8, 16, 40, 64, 72, 80, 128]),
    "mask": st.sampled_from([None, "bool", "float", "key_padding"]),
    "is_causal": st.booleans(),
    "dtype": st.sampled_from([torch.float32, torch.float64]),
    "layout": st.sampled_from(["bhsd", "bshd"]),
    "seed": st.integers(0, 2**16),
})


@settings(max_examples=60, deadline=None)
@given(case=CASES)
def test_auto_picks_a_working_backend_and_explain_agrees(case):
    heads = case["kv_heads"] * case["group"]
    q, k, v, mask = make_inputs(batch=case["batch"], heads=heads, kv_heads=case["kv_heads"],
                                seq_q=case["seq_q"], seq_k=case["seq_k"],
                                head_dim=case["head_dim"], dtype=case["dtype"],
                                mask=case["mask"], seed=case["seed"])
    ref, _ = reference(q, k, v, mask, case["is_causal"])
    args = (q, k, v) if case["layout"] == "bhsd" else tuple(t.transpose(1, 2) for t in (q, k, v))
    kw = dict(attn_mask=mask, is_causal=case["is_causal"], layout=case["layout"])
    out, selection = dispatch_call(*args, **kw)
    if case["layout"] == "bshd":
        out = out.transpose(1, 2)
    assert attnpatch.explain(*args, **kw).choice == selection.backend.name
    assert rel_error(out, ref) <= 1e-5


@settings(max_examples=25, deadline=None)
@given(case=CASES, backend=st.sampled_from(["math", "sdpa", "sdpa_flash", "sdpa_math", "flex",
                                            "sdpa_cudnn"]))
def test_named_backend_runs_or_raises_with_reasons(case, backend):
    heads = case["kv_heads"] * case["group"]
    q, k, v, mask = make_inputs(heads=heads, kv_heads=case["kv_heads"], seq_q=case["seq_q"],
                                seq_k=case["seq_k"], head_dim=case["head_dim"],
                                dtype=case["dtype"], mask=case["mask"], seed=case["seed"])
    explanation = attnpatch.explain(q, k, v, attn_mask=mask, is_causal=case["is_causal"],
                                    backend=backend)
    if explanation.choice is None:
        assert explanation.reasons[backend]
        with pytest.raises(attnpatch.BackendUnavailableError) as err:
            attnpatch.attention(q, k, v, attn_mask=mask, is_causal=case["is_causal"],
                                backend=backend)
        assert err.value.reasons[backend] == explanation.reasons[backend]
    else:
        out = attnpatch.attention(q, k, v, attn_mask=mask, is_causal=case["is_causal"],
                                  backend=backend)
        assert rel_error(out, reference(q, k, v, mask, case["is_causal"])[0]) <= 1e-5


@settings(max_examples=40, deadline=None)
@given(case=CASES, scale=st.sampled_from([None, 0.3]))
def test_warm_calls_match_the_first_call_and_the_reference(case, scale):
    """The first call of a signature runs ``Backend.forward``; later ones run the kernel that
    ``specialize`` returned (sdpa, no mask). Both must give the same result."""
    attnpatch.dispatch._CACHE.clear()
    heads = case["kv_heads"] * case["group"]
    q, k, v, mask = make_inputs(batch=case["batch"], heads=heads, kv_heads=case["kv_heads"],
                                seq_q=case["seq_q"], seq_k=case["seq_k"],
                                head_dim=case["head_dim"], dtype=case["dtype"],
                                mask=case["mask"], seed=case["seed"])
    args = (q, k, v) if case["layout"] == "bhsd" else tuple(t.transpose(1, 2) for t in (q, k, v))
    kw = dict(attn_mask=mask, is_causal=case["is_causal"], scale=scale, layout=case["layout"],
              backend="sdpa")
    first, warm = attnpatch.attention(*args, **kw), attnpatch.attention(*args, **kw)
    (entry,) = attnpatch.dispatch._CACHE.values()
    assert (entry[3] is not None) == (mask is None)  # a specialized kernel only without a mask
    assert torch.equal(first, warm)
    if case["layout"] == "bshd":
        warm = warm.transpose(1, 2)
    ref, _ = reference(q, k, v, mask, case["is_causal"], scale)
    assert rel_error(warm, ref) <= 1e-5


def test_warm_calls_keep_gradients():
    q, k, v, _ = make_inputs(heads=4, kv_heads=2, seq_q=13, seq_k=9, requires_grad=True)
    grads = []
    for _ in range(2):  # cold, then warm (specialized kernel)
        out = attnpatch.attention(q, k, v, is_causal=True, backend="sdpa")
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for cold, warm in zip(*grads):
        assert torch.equal(cold, warm)


def test_a_kernel_for_one_option_value_never_serves_another():
    """Option values are part of the cache key: a kernel specialized for one value never runs a
    call with another."""

    class Scaled(attnpatch.Backend):
        name = "scaled_test"
        priority = None
        options = frozenset({"factor"})

        def forward(self, call, factor=1.0):
            return factor * torch.nn.functional.scaled_dot_product_attention(
                call.query, call.key, call.value)

        def specialize(self, call):  # the option's value is baked in, as the contract says
            factor = getattr(call.options, "factor", None)
            factor = 1.0 if factor is None else factor
            return lambda q, k, v: factor * torch.nn.functional.scaled_dot_product_attention(
                q, k, v)

    attnpatch.register_backend(Scaled)
    try:
        q, k, v, _ = make_inputs(seq_q=9)
        one = attnpatch.attention(q, k, v, backend="scaled_test", factor=1.0)
        attnpatch.attention(q, k, v, backend="scaled_test", factor=1.0)
        two = attnpatch.attention(q, k, v, backend="scaled_test", factor=2.0)
        assert torch.equal(two, 2 * one)
        plain = attnpatch.attention(q, k, v, backend="scaled_test")  # no options: specialized
        assert torch.equal(attnpatch.attention(q, k, v, backend="scaled_test"), plain)
    finally:
        attnpatch.unregister_backend("scaled_test")


def test_a_layout_reading_backend_specializes_per_token_layout_and_may_take_bshd():
    """A backend that reads the token layout specializes only when it declares
    ``specializes_per_token_layout``: each kernel then serves only calls with the layout it was
    built for. A kernel with ``bshd = True`` gets a ``layout="bshd"`` caller's
    tensors as they are (and a "bhsd" caller's transposed)."""
    seen = []

    class Kernel:
        bshd = True

        def __init__(self, text_tokens):
            self.text_tokens = text_tokens

        def __call__(self, q, k, v):
            seen.append((self.text_tokens, tuple(q.shape), q.stride()))
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2) * self.text_tokens

    class TextScaled(attnpatch.Backend):
        name = "text_scaled_test"
        priority = None
        reads_token_layout = True
        specializes_per_token_layout = True

        def forward(self, call):
            return torch.nn.functional.scaled_dot_product_attention(
                call.query, call.key, call.value) * call.token_layout.text_tokens

        def specialize(self, call):
            return Kernel(call.token_layout.text_tokens)

    class NotPerLayout(TextScaled):  # reads the layout, never said its kernel bakes it in
        name = "not_per_layout_test"
        specializes_per_token_layout = False

        def specialize(self, call):
            raise AssertionError("a layout-reading backend was asked to specialize")

    attnpatch.register_backend(TextScaled)
    attnpatch.register_backend(NotPerLayout)
    try:
        q, k, v, _ = make_inputs(batch=1, heads=2, seq_q=8, head_dim=16)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        layouts = [attnpatch.TokenLayout(2, "first", 1, 2, 3),
                   attnpatch.TokenLayout(4, "first", 1, 2, 2)]
        for layout in ("bhsd", "bshd"):
            args = (q, k, v) if layout == "bhsd" else tuple(
                t.transpose(1, 2).contiguous() for t in (q, k, v))
            for token_layout in layouts + layouts:  # each layout cold, then warm
                seen.clear()
                for _ in range(2):
                    out = attnpatch.attention(*args, layout=layout, backend="text_scaled_test",
                                              token_layout=token_layout)
                    if layout == "bshd":
                        out = out.transpose(1, 2)
                    assert torch.allclose(out, want * token_layout.text_tokens, atol=1e-6)
                # the kernel of this layout ran the warm call, on (B, S, H, D) views
                assert seen and seen[-1][0] == token_layout.text_tokens
                assert seen[-1][1] == (1, 8, 2, 16)
                assert seen[-1][2] == (args[0] if layout == "bshd"
                                       else args[0].transpose(1, 2)).stride()
        for _ in range(2):
            out = attnpatch.attention(q, k, v, backend="not_per_layout_test",
                                      token_layout=layouts[0])
            assert torch.allclose(out, want * 2, atol=1e-6)
    finally:
        attnpatch.unregister_backend("text_scaled_test")
        attnpatch.unregister_backend("not_per_layout_test")


def test_explain_prints_every_backend():
    q, k, v, _ = make_inputs(dtype=torch.float16)
    text = str(attnpatch.explain(q, k, v, dropout_p=0.1))
    assert "choice: sdpa" in text and "flex" in text and "dropout_p=0.1 not supported" in text


def test_compiled_fullgraph_uses_the_context_backend():
    q, k, v, _ = make_inputs(seq_q=8, head_dim=16)

    def fn(q, k, v):
        return attnpatch.attention(q, k, v, layout="bhsd") * 2

    compiled = torch.compile(fn, fullgraph=True)
    with attnpatch.attention_backend("math"):
        out = compiled(q, k, v)
    torch.testing.assert_close(out, 2 * reference(q, k, v)[0].float())


def test_compiled_graph_serves_changing_sequence_lengths():
    def fn(q, k, v):
        return attnpatch.attention(q, k, v) * 2

    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    for seq in (16, 24, 32):  # dynamo makes the length symbolic from the second size on
        q, k, v, _ = make_inputs(seq_q=seq, head_dim=16)
        torch.testing.assert_close(compiled(q, k, v), 2 * reference(q, k, v)[0].float())


def test_block_options_under_compile_raise_instead_of_vanishing():
    q, k, v, _ = make_inputs(seq_q=8, head_dim=16)
    compiled = torch.compile(lambda q, k, v: attnpatch.attention(q, k, v), backend="eager",
                             fullgraph=True)
    torch._dynamo.reset()
    with attnpatch.attention_backend("flex", compile=False):
        with pytest.raises(Exception, match="a block's options cannot reach the compiled graph"):
            compiled(q, k, v)


def test_a_warm_cache_still_refuses_bad_input():
    q, k, v, _ = make_inputs(seq_q=11)
    attnpatch.attention(q, k, v, backend="math", is_causal=True)
    with pytest.raises(attnpatch.AttnPatchError, match="key dtype torch.float64 != query dtype"):
        attnpatch.attention(q, k.double(), v.double(), backend="math", is_causal=True)
    with pytest.raises(attnpatch.AttnPatchError, match="is_causal must be a bool"):
        attnpatch.attention(q, k, v, backend="math", is_causal=1)


def test_a_bool_number_is_refused_even_when_its_int_is_cached():
    """True == 1 and False == 0: the selection cache keys a bool where a number belongs apart,
    so validate() refuses it every time (dropout_p=True ran as p=1.0, all zeros)."""
    q, k, v, _ = make_inputs(seq_q=9)
    for name, ok, bad in (("scale", 1, True), ("dropout_p", 0, False), ("dropout_p", 1, True),
                          ("softcap", 1, True)):
        attnpatch.attention(q, k, v, backend="math", **{name: ok})
        with pytest.raises(attnpatch.AttnPatchError, match=f"{name} must be"):
            attnpatch.attention(q, k, v, backend="math", **{name: bad})


# --- softcap ----------------------------------------------------------------------------------
def test_softcap_is_part_of_the_cache_key():
    q, k, v, _ = make_inputs(seq_q=13, seq_k=17, head_dim=16)
    attnpatch.dispatch._CACHE.clear()
    outs = {}
    for cap in (None, 0.5, 2.0, None, 0.5, 2.0):  # cold, then warm: never another's entry
        out = attnpatch.attention(q, k, v, softcap=cap, backend="math")
        ref, _ = reference(q, k, v, softcap=cap)
        assert rel_error(out, ref) <= 1e-5, cap
        assert cap not in outs or torch.equal(outs[cap], out)
        outs[cap] = out
    assert len(attnpatch.dispatch._CACHE) == 3
    # auto: sdpa without a cap (a specialized kernel), a backend that computes it with one
    assert dispatch_call(q, k, v)[1].backend.name == "sdpa"
    assert dispatch_call(q, k, v, softcap=0.5)[1].backend.supports_softcap
    assert dispatch_call(q, k, v)[1].backend.name == "sdpa"
    with pytest.raises(attnpatch.BackendUnavailableError, match="softcap=0.5 not supported"):
        attnpatch.attention(q, k, v, softcap=0.5, backend="sdpa")
    attnpatch.attention(q, k, v, softcap=0.5, backend="math")
    with pytest.raises(attnpatch.AttnPatchError, match="softcap must be"):  # warm: still refused
        attnpatch.attention(q, k, v, softcap=-0.5, backend="math")


def test_specialize_is_never_asked_for_a_softcap_it_does_not_compute():
    asked = []

    class Lax(attnpatch.Backend):
        """Declares no softcap support but (wrongly) refuses nothing: the dispatcher must still
        never hand a softcap call to its specialized kernel."""
        name = "lax_test"
        priority = None

        def not_supported_reasons(self, call):
            return []

        def forward(self, call, **options):
            return attnpatch.attention(call.query, call.key, call.value, scale=call.scale,
                                       softcap=call.softcap, backend="math")

        def specialize(self, call):
            asked.append(call.softcap)
            return torch.nn.functional.scaled_dot_product_attention

    class Capping(Lax):
        name = "capping_test"
        supports_softcap = True

        def specialize(self, call):
            asked.append(call.softcap)
            cap = call.softcap
            return lambda q, k, v: attnpatch.attention(q, k, v, softcap=cap, backend="math")

    attnpatch.register_backend(Lax)
    attnpatch.register_backend(Capping)
    try:
        q, k, v, _ = make_inputs(seq_q=9, head_dim=16)
        for _ in range(2):
            out = attnpatch.attention(q, k, v, softcap=0.5, backend="lax_test")
            assert rel_error(out, reference(q, k, v, softcap=0.5)[0]) <= 1e-5
        assert asked == []
        attnpatch.attention(q, k, v, backend="lax_test")
        assert asked == [None]
        for _ in range(2):
            out = attnpatch.attention(q, k, v, softcap=0.5, backend="capping_test")
            assert rel_error(out, reference(q, k, v, softcap=0.5)[0]) <= 1e-5
        assert asked == [None, 0.5]
    finally:
        attnpatch.unregister_backend("lax_test")
        attnpatch.unregister_backend("capping_test")


def test_softcap_under_compile():
    """The traced path selects with the softcap (a constant of the graph) and validates it."""
    q, k, v, _ = make_inputs(seq_q=8, seq_k=11, head_dim=16)

    def compiled(cap):
        # dynamic=False: a float that changes between calls would otherwise turn symbolic, and
        # selection needs it constant (the same holds for `scale`)
        return torch.compile(lambda q, k, v: attnpatch.attention(q, k, v, softcap=cap) * 2,
                             backend="eager", fullgraph=True, dynamic=False)

    for cap in (0.5, 2.0):  # auto picks a backend that computes it, per value
        torch.testing.assert_close(compiled(cap)(q, k, v),
                                   2 * reference(q, k, v, softcap=cap)[0].float())
    with pytest.raises(Exception, match="softcap must be None or a positive finite number"):
        compiled(-1.0)(q, k, v)
    torch._dynamo.reset()  # a later attention_backend block does not retrace a graph
    with attnpatch.attention_backend("sdpa"):
        with pytest.raises(Exception, match="softcap=0.5 not supported"):
            compiled(0.5)(q, k, v)


@pytest.mark.parametrize("bad", [["sdpa"], {"sdpa": 1}, 3, ("sdpa",)])
def test_backend_must_be_a_name(bad):
    q, k, v, _ = make_inputs(seq_q=8)
    with pytest.raises(attnpatch.AttnPatchError, match=r"backend must be a name \(str\)"):
        attnpatch.attention(q, k, v, backend=bad)
    with pytest.raises(attnpatch.AttnPatchError, match=r"backend must be a name \(str\)"):
        with attnpatch.attention_backend(bad):
            pass
    with pytest.raises(attnpatch.AttnPatchError, match=r"backend must be a name \(str\)"):
        attnpatch.explain(q, k, v, backend=bad)


# --- what a backend returns, and what it raises ---------------------------------------------
def _returning(name, make):
    """A user backend whose forward returns ``make(call, sdpa_out)``."""

    class Returning(attnpatch.Backend):
        priority = None
        supports_lse = True

        def forward(self, call):
            out = torch.nn.functional.scaled_dot_product_attention(call.query, call.key,
                                                                   call.value)
            return make(call, out)

    Returning.name = name
    return Returning


def _lse(call):
    return torch.zeros(call.batch_size, call.num_heads, call.seq_len_q)


BAD_RESULTS = {
    "out_shape": (False, lambda c, o: o[:, :, :1],
                  r"output of shape \(2, 4, 1, 16\).*expected output shape \(2, 4, 7, 16\)"),
    "not_tensor": (False, lambda c, o: o.numpy(), r"output a ndarray .*expected output shape"),
    "list": (False, lambda c, o: o.tolist(),
             r"a list of 2 \(a list, a list\) .*expected one tensor"),
    "tuple_no_lse": (False, lambda c, o: (o, _lse(c)),
                     r"a tuple of 2 \(tensor \(2, 4, 7, 16\) torch.float32, "
                     r"tensor \(2, 4, 7\) torch.float32\) .*return_lse=False: expected one tensor"),
    "no_lse": (True, lambda c, o: o, r"of shape \(2, 4, 7, 16\).*expected a tuple \(out, lse\)"),
    "lse_shape": (True, lambda c, o: (o, _lse(c)[..., :3]),
                  r"lse of shape \(2, 4, 3\).*expected lse shape \(2, 4, 7\)"),
    "lse_dtype": (True, lambda c, o: (o, _lse(c).half()),
                  r"lse of shape \(2, 4, 7\) \(torch.float16\).*dtype torch.float32"),
    "out_shape_lse": (True, lambda c, o: (o.transpose(1, 2), _lse(c)),
                      r"output of shape \(2, 7, 4, 16\).*expected output shape \(2, 4, 7, 16\)"),
}


@pytest.mark.parametrize("case", list(BAD_RESULTS))
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_a_user_backend_returning_the_wrong_thing_is_named(case, layout):
    return_lse, make, message = BAD_RESULTS[case]
    attnpatch.register_backend(_returning("bad_result_test", make))
    try:
        q, k, v, _ = make_inputs(seq_q=7, head_dim=16)
        if layout == "bshd":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        for _ in range(2):  # never cached: the second call is checked as well
            with pytest.raises(attnpatch.AttnPatchError,
                               match=r"backend 'bad_result_test' returned .*" + message):
                attnpatch.attention(q, k, v, backend="bad_result_test", layout=layout,
                                    return_lse=return_lse)
    finally:
        attnpatch.unregister_backend("bad_result_test")


def test_a_user_backend_returning_the_right_thing_runs():
    good = _returning("good_result_test",
                      lambda c, o: (o, _lse(c)) if c.return_lse else o.transpose(1, 2)
                      .contiguous().transpose(1, 2))
    attnpatch.register_backend(good)
    try:
        q, k, v, _ = make_inputs(seq_q=7, head_dim=16)
        for layout in ("bhsd", "bshd"):
            args = (q, k, v) if layout == "bhsd" else tuple(t.transpose(1, 2) for t in (q, k, v))
            for return_lse in (False, True, False, True):
                attnpatch.attention(*args, backend="good_result_test", layout=layout,
                                    return_lse=return_lse)
    finally:
        attnpatch.unregister_backend("good_result_test")


def test_a_failing_user_backend_is_named_cold_and_warm():
    class Fragile(attnpatch.Backend):
        name = "fragile_test"
        priority = None
        calls = 0

        def forward(self, call):
            type(self).calls += 1
            if type(self).calls != 2:  # the first call (cold) and the third (warm) fail
                raise ValueError("kernel exploded")
            return torch.nn.functional.scaled_dot_product_attention(call.query, call.key,
                                                                    call.value)

    class FragileKernel(attnpatch.Backend):
        name = "fragile_kernel_test"
        priority = None

        def forward(self, call):
            return torch.nn.functional.scaled_dot_product_attention(call.query, call.key,
                                                                    call.value)

        def specialize(self, call):
            def kernel(q, k, v):
                raise RuntimeError("specialized kernel exploded")
            return kernel

    attnpatch.register_backend(Fragile)
    attnpatch.register_backend(FragileKernel)
    try:
        q, k, v, _ = make_inputs(seq_q=7, head_dim=16)
        message = (r"backend 'fragile_test' failed on AttentionCall\(q=\(2, 4, 7, 16\).*"
                   r"ValueError: kernel exploded")
        with pytest.raises(attnpatch.AttnPatchError, match=message) as err:
            attnpatch.attention(q, k, v, backend="fragile_test")  # cold
        assert isinstance(err.value.__cause__, ValueError)
        attnpatch.attention(q, k, v, backend="fragile_test")
        with pytest.raises(attnpatch.AttnPatchError, match=message) as err:
            attnpatch.attention(q, k, v, backend="fragile_test")  # warm
        assert isinstance(err.value.__cause__, ValueError)
        attnpatch.attention(q, k, v, backend="fragile_kernel_test")  # cold: forward
        with pytest.raises(attnpatch.AttnPatchError,
                           match=r"backend 'fragile_kernel_test' failed on AttentionCall\("
                                 r"q=\(2, 4, 7, 16\).*specialized kernel exploded") as err:
            attnpatch.attention(q, k, v, backend="fragile_kernel_test")  # warm: the kernel
        assert isinstance(err.value.__cause__, RuntimeError)
    finally:
        attnpatch.unregister_backend("fragile_test")
        attnpatch.unregister_backend("fragile_kernel_test")


def test_out_of_memory_and_built_in_errors_keep_their_type():
    class Hungry(attnpatch.Backend):
        name = "hungry_test"
        priority = None

        def forward(self, call):
            raise torch.OutOfMemoryError("out of memory")

    attnpatch.register_backend(Hungry)
    try:
        q, k, v, _ = make_inputs(seq_q=7, head_dim=16)
        with pytest.raises(torch.OutOfMemoryError) as err:
            attnpatch.attention(q, k, v, backend="hungry_test")
        assert "(in attnpatch backend 'hungry_test')" in err.value.__notes__
    finally:
        attnpatch.unregister_backend("hungry_test")
    block_mask = torch.nn.attention.flex_attention.create_block_mask(
        lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 7, 7, device="cpu")
    for _ in range(2):  # cold and warm: the built-in's own error, not wrapped
        with pytest.raises(attnpatch.AttnPatchError, match="^flex: pass block_mask= or "
                                                           "mask_mod=, not both") as err:
            attnpatch.attention(q, k, v, backend="flex", block_mask=block_mask,
                                mask_mod=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)
        assert err.value.__cause__ is None
