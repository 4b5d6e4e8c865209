"""One install/undo mechanism: sites (apply/restore, counted per object, released in reverse),
and the model-level hooks a backend asks for (``Backend.denoiser_hooks``), on real tiny
diffusers models with a real registered backend."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import attnpatch
from attnpatch import AttnPatchError
from attnpatch._sites import Site, acquire, held, release
from attnpatch.integrations import diffusers as dif
from attnpatch.integrations import transformers as itf
from tests.tiny_models import (clip_text, flux, flux_ids, flux_pipeline, no_attnpatch_state,
                               processors_of, randn, rel_error, run)

pytest.importorskip("diffusers")


# --- the sites themselves ---------------------------------------------------------------------

class Box:
    """A plain object to change."""


class Flag(Site):
    """Sets ``obj.flag``; logs apply/restore. Restore removes the flag only if it is still
    this site's (a later change stays, as with a processor set after patching)."""

    def __init__(self, obj, value, log):
        super().__init__(obj)
        self.value, self.log, self.gone = value, log, False

    def apply(self):
        self.obj.flag = self.value
        self.log.append(("apply", self.value))

    def restore(self):
        if vars(self.obj).get("flag") == self.value:
            del self.obj.flag
        self.log.append(("restore", self.value))

    def stale(self):
        return self.gone


def test_acquire_counts_holders_and_the_last_release_restores():
    box, log = Box(), []
    a = acquire(box, "_attnpatch_flag", lambda: Flag(box, 1, log))
    b = acquire(box, "_attnpatch_flag", lambda: Flag(box, 2, log))
    assert a is b and a.refs == 2 and box.flag == 1 and held(box, "_attnpatch_flag") is a
    release(a)
    assert box.flag == 1 and log == [("apply", 1)]
    release(a)
    assert vars(box) == {} and log == [("apply", 1), ("restore", 1)]


def test_a_stale_site_is_replaced_and_comes_back_while_held():
    box, log = Box(), []
    old = acquire(box, "_attnpatch_flag", lambda: Flag(box, 1, log))
    old.gone = True
    new = acquire(box, "_attnpatch_flag", lambda: Flag(box, 2, log))
    assert new is not old and box.flag == 2 and held(box, "_attnpatch_flag") is new
    release(new)  # the old one is still held: it is what the key holds again
    assert held(box, "_attnpatch_flag") is old
    release(old)
    assert vars(box) == {}
    assert log == [("apply", 1), ("apply", 2), ("restore", 2), ("restore", 1)]


def test_a_private_site_is_not_stored_and_a_failing_apply_leaves_nothing():
    box, log = Box(), []
    site = acquire(box, None, lambda: Flag(box, 1, log))
    assert site.refs == 1 and vars(box) == {"flag": 1}
    release(site)
    assert vars(box) == {}

    class Refuses(Flag):
        def apply(self):
            raise AttnPatchError("no")

    with pytest.raises(AttnPatchError, match="no"):
        acquire(box, "_attnpatch_flag", lambda: Refuses(box, 1, log))
    assert vars(box) == {}


# --- a backend that asks for denoiser hooks -----------------------------------------------------

@dataclass(frozen=True)
class ShiftOptions:
    shift: float = 1.0

    def __post_init__(self):
        if not isinstance(self.shift, (int, float)):
            raise AttnPatchError(f"shift must be a number, got {self.shift!r}")


class Shift:
    """Adds ``shift`` to the hidden states at the model's entry, negates the output at exit."""

    def __init__(self, shift):
        self.shift = shift
        self.log: list[str] = []

    def pre(self, module, args, kwargs):
        self.log.append("pre")
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + self.shift}

    def post(self, module, args, kwargs, output):
        self.log.append("post")
        return type(output)(sample=-output.sample)


class Shifted(attnpatch.Backend):
    """SDPA, with a Shift hook on every FluxTransformer2DModel it is patched into."""

    name = "test_shifted"
    priority = None
    Options = ShiftOptions
    asked: list = []     # (model class, options) per denoiser_hooks call
    hooks: list = []     # every Shift made

    def forward(self, call, **options):
        return F.scaled_dot_product_attention(call.query, call.key, call.value,
                                              attn_mask=call.combined_mask(), scale=call.scale)

    def denoiser_hooks(self, model, options):
        type(self).asked.append((type(model).__name__, options.shift))
        if type(model).__name__ != "FluxTransformer2DModel":
            return ()
        hook = Shift(options.shift)
        type(self).hooks.append(hook)
        return [hook]


class Refusing(Shifted):
    name = "test_refusing"

    def denoiser_hooks(self, model, options):
        raise RuntimeError("no process group")


class Hookless(Shifted):
    name = "test_hookless"

    def denoiser_hooks(self, model, options):
        return [object()]


class Negate:
    """Negates the output of the submodule at ``path``."""

    def __init__(self, path):
        self.path = path

    def post(self, module, args, kwargs, output):
        return -output


class AtProjOut(Shifted):
    """A hook on a submodule (``path``), for the denoiser only (``denoiser_only``)."""

    name = "test_at_proj_out"
    denoiser_only = True

    def denoiser_hooks(self, model, options):
        type(self).asked.append((type(model).__name__, options.shift))
        return [Negate("proj_out")] if hasattr(model, "proj_out") else ()


class BadPath(Shifted):
    name = "test_bad_path"

    def denoiser_hooks(self, model, options):
        return [Negate("no_such.module")]


BACKENDS = (Shifted, Refusing, Hookless, AtProjOut, BadPath)


@pytest.fixture
def shifted():
    Shifted.asked, Shifted.hooks = [], []
    for cls in BACKENDS:
        attnpatch.register_backend(cls)
    try:
        yield Shifted
    finally:
        for cls in BACKENDS:
            attnpatch.unregister_backend(cls.name)


def hooks_on(model) -> tuple[list, list]:
    return list(model._forward_pre_hooks.values()), list(model._forward_hooks.values())


def shifted_ref(model, kw, shift=1.0) -> torch.Tensor:
    """What the Shift hook makes of the unpatched model."""
    return -run(model, {**kw, "hidden_states": kw["hidden_states"] + shift})


def check_unchanged(model, kw, ref, processors):
    assert hooks_on(model) == ([], [])
    assert all(processors_of(model)[k] is processors[k] for k in processors)
    assert no_attnpatch_state(model) == []
    assert torch.equal(run(model, kw), ref)


@pytest.fixture
def model():
    model, kw = flux()
    return model, kw, run(model, kw), processors_of(model)


def test_hooks_are_installed_run_at_entry_and_exit_and_removed_exactly(shifted, model):
    model, kw, ref, processors = model
    expected = shifted_ref(model, kw)
    with attnpatch.patch(model, backend="test_shifted") as handle:
        (hook,) = shifted.hooks
        pre, post = hooks_on(model)
        # attnpatch's token-layout hook comes first (it sees the unshifted inputs)
        assert pre[-1] == hook.pre and post[-1] == hook.post
        assert isinstance(pre[0].__self__, dif.LayoutHooks)
        out = run(model, kw)
        assert hook.log == ["pre", "post"]
        assert rel_error(out, expected) <= 1e-5
        assert {r.backend for r in handle.report()} == {"test_shifted"}
    assert shifted.asked == [("FluxTransformer2DModel", 1.0)]
    check_unchanged(model, kw, ref, processors)


def test_hooks_follow_set_backend_and_set_attention_backend(shifted, model):
    model, kw, ref, processors = model
    shifted_by_2 = shifted_ref(model, kw, 2.0)
    handle = attnpatch.patch(model, backend="test_shifted")
    (hook,) = shifted.hooks
    handle.set_backend("sdpa")  # no module names test_shifted: its hooks go
    assert hook.pre not in hooks_on(model)[0] and rel_error(run(model, kw), ref) <= 1e-5
    handle.set_backend("test_shifted")  # back: the same hook, not asked again
    assert shifted.asked == [("FluxTransformer2DModel", 1.0)]
    assert hooks_on(model)[0][-1] == hook.pre
    model.set_attention_backend("math")
    assert len(hooks_on(model)[0]) == 1 and rel_error(run(model, kw), ref) <= 1e-5
    model.reset_attention_backend()  # what patch set, with its hooks
    assert hooks_on(model)[0][-1] == hook.pre
    handle.set_backend(("test_shifted", {"shift": 2.0}))  # new options: a new hook set
    assert [h.shift for h in shifted.hooks] == [1.0, 2.0]
    assert hooks_on(model)[0][1:] == [shifted.hooks[1].pre]
    assert rel_error(run(model, kw), shifted_by_2) <= 1e-5
    # one module on test_shifted names it: the model keeps its hooks
    handle.set_backend({"single_transformer_blocks.*": "sdpa", "*": "test_shifted"})
    assert hooks_on(model)[0][1:] == [hook.pre]
    handle.reset_backend()
    assert hooks_on(model)[0][1:] == [hook.pre]
    handle.unpatch()
    check_unchanged(model, kw, ref, processors)


def test_a_switch_the_backend_refuses_changes_nothing(shifted, model):
    model, kw, ref, processors = model
    with attnpatch.patch(model, backend="test_shifted") as handle:
        before = hooks_on(model)
        with pytest.raises(AttnPatchError, match=r"backend 'test_refusing': denoiser_hooks\(\) "
                                                 r"failed for FluxTransformer2DModel: "
                                                 r"RuntimeError: no process group"):
            handle.set_backend("test_refusing")
        with pytest.raises(AttnPatchError, match="test_refusing"):
            model.set_attention_backend({"single*": "test_refusing", "*": "sdpa"})
        with pytest.raises(AttnPatchError, match="with different options on attention modules"):
            handle.set_backend({"single*": ("test_shifted", {"shift": 3.0}), "*": "test_shifted"})
        with pytest.raises(AttnPatchError, match="test_refusing"):  # patch again, same handle
            attnpatch.patch(model, backend="test_refusing")
        assert hooks_on(model) == before and handle.active
        assert {r.requested for r in handle.report()} == {"test_shifted"}
        assert attnpatch.patch(model, backend="sdpa") is handle  # patch again: hooks follow
        assert hooks_on(model)[0][1:] == []
    check_unchanged(model, kw, ref, processors)


@pytest.mark.parametrize("backend,error", [
    ("test_refusing", r"backend 'test_refusing': denoiser_hooks\(\) failed .*no process group"),
    ("test_hookless", r"backend 'test_hookless': denoiser_hooks\(\) returned <object object .*"
                      r"no callable pre\(module, args, kwargs\) or post"),
    ("test_bad_path", r"backend 'test_bad_path': denoiser_hooks\(\) returned <.*Negate .*"
                      r"whose path 'no_such.module' is not a submodule of FluxTransformer2DModel"),
])
def test_a_patch_that_fails_half_way_leaves_nothing_behind(shifted, backend, error):
    """Records, processors, the transformers registration and configs, layout hooks and methods
    are all in place when the hooks are asked for; the failure rolls them back."""
    transformer, transformer_kw = flux()
    text, text_kw = clip_text()
    box = torch.nn.ModuleDict({"transformer": transformer, "text": text})
    refs = run(transformer, transformer_kw), run(text, text_kw)
    processors = processors_of(transformer)
    with pytest.raises(AttnPatchError, match=error):
        attnpatch.patch(box, backend=backend)
    assert not itf.registered() and text.config._attn_implementation == "sdpa"
    assert no_attnpatch_state(box) == []
    check_unchanged(transformer, transformer_kw, refs[0], processors)
    assert torch.equal(run(text, text_kw), refs[1])


def pipe_kw(seed=1):
    """Inputs for the tiny FluxPipeline's transformer (16 latent channels)."""
    return dict(hidden_states=randn(2, 16, 16, seed=seed),
                encoder_hidden_states=randn(2, 7, 16, seed=2),
                pooled_projections=randn(2, 16, seed=3), timestep=torch.tensor([0.5] * 2),
                img_ids=flux_ids(), txt_ids=torch.zeros(7, 3))


def test_hooks_are_counted_per_model_across_two_patches(shifted):
    pipe, _ = flux_pipeline()
    model, kw = pipe.transformer, pipe_kw()
    ref, expected = run(model, kw), shifted_ref(pipe.transformer, kw)
    processors = processors_of(model)
    outer = attnpatch.patch(pipe, backend="test_shifted")
    # asked for both diffusers models holding routed modules; only the transformer is hooked
    assert sorted(shifted.asked) == [("AutoencoderKL", 1.0), ("FluxTransformer2DModel", 1.0)]
    assert hooks_on(pipe.vae)[0][1:] == []
    inner = attnpatch.patch(pipe.transformer, backend="test_shifted")
    assert inner is not outer and len(shifted.hooks) == 1
    assert hooks_on(model)[0][1:] == [shifted.hooks[0].pre]  # installed once
    inner.unpatch()  # the pipeline's patch still holds them
    assert hooks_on(model)[0][1:] == [shifted.hooks[0].pre]
    assert rel_error(run(model, kw), expected) <= 1e-5
    # a patch of the transformer that names another backend: the hooks go while it holds
    inner = attnpatch.patch(pipe.transformer, backend="sdpa")
    assert hooks_on(model)[0][1:] == [] and rel_error(run(model, kw), ref) <= 1e-5
    inner.unpatch()  # back to what the pipeline's patch asked for, the same hook
    assert hooks_on(model)[0][1:] == [shifted.hooks[0].pre] and len(shifted.hooks) == 1
    # a patch of a part (no diffusers model in it) still moves the model's hooks
    outer.set_backend({"transformer.single_transformer_blocks.*": "sdpa", "*": "test_shifted"})
    part = attnpatch.patch(pipe.transformer.transformer_blocks, backend="sdpa")
    assert hooks_on(model)[0][1:] == []
    part.unpatch()
    assert hooks_on(model)[0][1:] == [shifted.hooks[0].pre]
    outer.unpatch()
    check_unchanged(model, kw, ref, processors)
    assert no_attnpatch_state(pipe) == []


def test_unpatch_releases_sites_in_reverse(shifted, monkeypatch):
    """Every site a patch holds, restored last-acquired first (a request before its record,
    a model's configs before the transformers registration, hooks before the layout hook)."""
    transformer, _ = flux()
    text, _ = clip_text()
    box = torch.nn.ModuleDict({"transformer": transformer, "text": text})
    handle = attnpatch.patch(box, backend="test_shifted")
    sites = handle.sites
    kinds = [type(s).__name__ for s in sites]
    assert kinds[0] == "_Target"
    assert kinds.index("Registration") < kinds.index("ImplementationSite")
    assert kinds.index("LayoutHooks") < kinds.index("_BackendHooks")
    assert all(kinds.index(k) < kinds.index("_Request") for k in ("_ProcessorRecord",
                                                                  "ModuleRecord", "_Methods"))
    restored = []
    defining = {next(k for k in type(s).__mro__ if "restore" in vars(k)) for s in sites}
    for cls in defining:
        def logged(self, _original=cls.restore):
            restored.append(self)
            _original(self)
        monkeypatch.setattr(cls, "restore", logged)
    handle.unpatch()
    assert [s for s in restored if any(s is h for h in sites)] == list(reversed(sites))
    assert no_attnpatch_state(box) == [] and not itf.registered()



def test_a_hook_with_a_path_hooks_that_submodule_and_goes_with_the_model(shifted, model):
    model, kw, ref, processors = model
    with attnpatch.patch(model, backend="test_at_proj_out"):
        assert hooks_on(model)[1][1:] == [] and len(model.proj_out._forward_hooks) == 1
        assert rel_error(run(model, kw), -ref) <= 1e-5
    assert model.proj_out._forward_hooks == {}
    check_unchanged(model, kw, ref, processors)


def test_a_denoiser_only_backend_patches_the_denoiser_of_a_pipeline(shifted):
    """``patch(pipe, backend=...)`` with a ``denoiser_only`` backend: the transformer gets it,
    the VAE ``auto`` (not asked for hooks, and not given the backend's options); so do
    ``set_backend`` and ``set_attention_backend`` on the pipeline."""
    pipe, _ = flux_pipeline()
    with attnpatch.patch(pipe, backend="test_at_proj_out", shift=1.0) as handle:
        requested = {r.name.split(".")[0]: r.requested for r in handle.report()}
        assert requested == {"transformer": "test_at_proj_out(shift=1.0)", "vae": "auto"}
        assert shifted.asked == [("FluxTransformer2DModel", 1.0)]
        assert pipe.vae.decoder.mid_block.attentions[0]._forward_hooks == {}
        handle.set_backend("sdpa")
        pipe.set_attention_backend(("test_at_proj_out", {"shift": 2.0}))
        requested = {r.name.split(".")[0]: r.requested for r in handle.report()}
        assert requested == {"transformer": "test_at_proj_out(shift=2.0)", "vae": "auto"}
    assert no_attnpatch_state(pipe) == []
