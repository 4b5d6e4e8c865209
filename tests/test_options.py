"""Typed backend options: a frozen dataclass per backend, validated where the user gives them,
part of the selection cache key by value, and visible to the backend as ``call.options``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch

import attnpatch
from attnpatch import registry
from attnpatch.dispatch import _CACHE

from .conftest import make_inputs, reference, rel_error


@dataclass(frozen=True)
class ScaledOptions:
    factor: float = 1.0
    transform: Optional[Callable] = None

    def __post_init__(self):
        if not isinstance(self.factor, (int, float)) or isinstance(self.factor, bool):
            raise attnpatch.AttnPatchError(f"scaled_out: factor must be a number, got "
                                           f"{self.factor!r}")


class ScaledOut(attnpatch.Backend):
    """Reference attention times ``factor`` (then ``transform``): its options are observable."""

    name = "scaled_out"
    priority = None
    Options = ScaledOptions
    seen: list = []

    def delegate(self, call):
        type(self).seen.append(("delegate", call.options))
        return self

    def specialize(self, call):
        type(self).seen.append(("specialize", call.options))
        return None

    def forward(self, call, **given):
        options = call.options
        type(self).seen.append(("forward", options, dict(given)))
        out = attnpatch.attention(call.query, call.key, call.value, backend="math") * options.factor
        return options.transform(out) if options.transform else out


@pytest.fixture
def scaled():
    attnpatch.register_backend(ScaledOut)
    ScaledOut.seen = []
    yield
    attnpatch.unregister_backend("scaled_out")


def test_options_are_validated_where_given(scaled):
    """A bad value or an unknown name raises AttnPatchError naming the option, at the call, at
    attention_backend(), at patch() and at set_attention_backend(), before anything runs."""
    q, k, v, _ = make_inputs(seq_q=8, head_dim=16)
    module = torch.nn.MultiheadAttention(16, 2)
    for bad, message in (({"factor": "x"}, "factor must be a number"),
                         ({"facter": 2.0}, r"does not take option\(s\) \['facter'\]; it takes "
                                           r"\['factor', 'transform'\]")):
        with pytest.raises(attnpatch.AttnPatchError, match=message):
            attnpatch.attention(q, k, v, backend="scaled_out", **bad)
        with pytest.raises(attnpatch.AttnPatchError, match=message):
            with attnpatch.attention_backend("scaled_out", **bad):
                pass
        with pytest.raises(attnpatch.AttnPatchError, match=message):
            attnpatch.patch(module, backend="scaled_out", **bad)
        with pytest.raises(attnpatch.AttnPatchError, match=message):
            attnpatch.set_attention_backend(module, "scaled_out", **bad)
    assert not hasattr(module, "_attnpatch_record") or True
    assert [s for s in ScaledOut.seen if s[0] == "forward"] == []


def test_option_values_key_the_cache(scaled):
    """Equal values share one selection; different values (callables by identity) are different
    selections, so a warm call never runs with another call's options."""
    q, k, v, _ = make_inputs(seq_q=8, head_dim=16)
    ref = reference(q, k, v)[0]
    _CACHE.clear()
    for factor in (2.0, 3.0, 2.0):
        out = attnpatch.attention(q, k, v, backend="scaled_out", factor=factor)
        assert rel_error(out, ref * factor) < 1e-5
    keys = [key for key in _CACHE if key[0] == "scaled_out"]
    assert len(keys) == 2
    first = lambda t: t + 1  # noqa: E731
    second = lambda t: t - 1  # noqa: E731
    assert rel_error(attnpatch.attention(q, k, v, backend="scaled_out", transform=first),
                     ref + 1) < 1e-5
    assert rel_error(attnpatch.attention(q, k, v, backend="scaled_out", transform=second),
                     ref - 1) < 1e-5
    # True and 1 are different values: the validation of one never lets the other through
    with pytest.raises(attnpatch.AttnPatchError, match="compile must be a bool"):
        attnpatch.attention(q, k, v, backend="flex", compile=False)
        attnpatch.attention(q, k, v, backend="flex", compile=0)


def test_delegate_specialize_and_forward_receive_the_validated_instance(scaled):
    q, k, v, _ = make_inputs(seq_q=8, head_dim=16)
    attnpatch.attention(q, k, v, backend="scaled_out", factor=2)
    stages = {s[0]: s for s in ScaledOut.seen}
    assert set(stages) == {"delegate", "specialize", "forward"}
    assert stages["delegate"][1] == ScaledOptions(factor=2)
    assert stages["specialize"][1] == ScaledOptions(factor=2)
    assert stages["forward"][1:] == (ScaledOptions(factor=2), {"factor": 2})
    with attnpatch.attention_backend("scaled_out", factor=3.0):
        attnpatch.attention(q, k, v)
    assert ScaledOut.seen[-1][1] == ScaledOptions(factor=3.0)  # the warm path too


def test_names_only_backend_gets_an_options_dataclass():
    """A backend that declares only option names (the older form) still works: its Options
    are made from the names, values unvalidated."""

    class Named(attnpatch.Backend):
        name = "named_options"
        priority = None
        options = frozenset({"tag"})

        def forward(self, call, tag=None):
            return attnpatch.attention(call.query, call.key, call.value, backend="math")

    attnpatch.register_backend(Named)
    try:
        q, k, v, _ = make_inputs(seq_q=8, head_dim=16)
        attnpatch.attention(q, k, v, backend="named_options", tag="x")
        assert registry.get_backend("named_options").options == frozenset({"tag"})
        with pytest.raises(attnpatch.AttnPatchError, match="does not take option"):
            attnpatch.attention(q, k, v, backend="named_options", other=1)
    finally:
        attnpatch.unregister_backend("named_options")


def test_clear_caches_forgets_every_bounded_cache():
    """attnpatch._clear_caches() empties every cache attnpatch keeps (selection, causal masks,
    BlockMasks, compiled flex kernels, token grids); each cache is bounded."""
    from attnpatch import _caches

    q, k, v, _ = make_inputs(seq_q=8, head_dim=16)
    attnpatch.attention(q, k, v, is_causal=True, backend="math")
    assert len(_CACHE) > 0
    assert all(cache.limit > 0 for cache in _caches._ALL) and len(_caches._ALL) >= 5
    attnpatch._clear_caches()
    assert all(len(cache) == 0 for cache in _caches._ALL)
    full = _caches.BoundedCache(2)
    for i in range(3):
        full.put(i, i)
    assert dict(full) == {2: 2}
    _caches._ALL.remove(full)
