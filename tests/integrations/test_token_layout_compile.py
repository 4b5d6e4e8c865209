"""The token layout reaches a backend that reads it, the same in eager mode, under
``torch.compile`` and under ``torch.compile(fullgraph=True)``: Flux (text first), SD3 (text
last), Wan (video grid) and the UNet's levels, on tiny random-weight diffusers models."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import attnpatch
from attnpatch import TokenLayout
from tests.tiny_models import flux, rel_error, run, sd15, sd3, wan

pytest.importorskip("diffusers")


#: what LayoutReader saw, per call. A module-level list: torch 2.10's dynamo cannot trace an
#: append to a list held as a class attribute (a graph break, and under fullgraph an error)
SEEN: list = []


class LayoutReader(attnpatch.Backend):
    """SDPA that records in ``SEEN``, per call, the layout it was given and the one
    ``current_token_layout()`` returns (they must agree)."""

    name = "layout_reader"
    priority = None
    reads_token_layout = True

    def forward(self, call, **options):
        SEEN.append(((call.seq_len_q, call.seq_len_kv), call.token_layout,
                                attnpatch.current_token_layout()))
        return F.scaled_dot_product_attention(call.query, call.key, call.value,
                                              attn_mask=call.combined_mask(), scale=call.scale)


@contextlib.contextmanager
def layout_reader():
    SEEN.clear()
    attnpatch.register_backend(LayoutReader, replace=True)
    try:
        yield LayoutReader
    finally:
        attnpatch.unregister_backend("layout_reader")


def _layouts(factory, mode: str):
    """{(Sq, Sk): layout} seen by the backend in one forward run ``mode``-wise."""
    import torch._dynamo
    torch._dynamo.reset()
    model, kw = factory()
    ref = run(model, kw)
    with layout_reader(), attnpatch.patch(model, backend="layout_reader"):
        if mode == "eager":
            out = run(model, kw)
        else:
            run(model, kw)  # an eager forward first: Flux's grid is learnt from its ids here
            SEEN.clear()
            compiled = torch.compile(model, backend="eager", fullgraph=mode == "fullgraph")
            with torch.no_grad():
                out = compiled(**kw)[0]
        seen = list(SEEN)
    torch._dynamo.reset()
    assert rel_error(out, ref) <= 1e-5
    assert seen, "the backend was never traced or run"
    layouts = {}
    for lengths, given, current in seen:
        assert isinstance(given, TokenLayout)
        assert given == current, "call.token_layout and current_token_layout() disagree"
        assert layouts.setdefault(lengths, given) == given  # one layout per call shape
    return layouts


MODES = ["eager", "compile", "fullgraph"]


@pytest.mark.parametrize("mode", MODES)
def test_flux_text_first(mode):
    layouts = _layouts(flux, mode)
    assert set(layouts) == {(23, 23)}
    layout = layouts[(23, 23)]
    assert (layout.text_position, layout.text_tokens, layout.grid) == ("first", 7, (1, 4, 4))
    assert layout.image_slice == slice(7, 23) and layout.model == "FluxTransformer2DModel"


@pytest.mark.parametrize("mode", MODES)
def test_sd3_text_last(mode):
    layouts = _layouts(sd3, mode)
    layout = layouts[(71, 71)]
    assert (layout.text_position, layout.text_tokens, layout.grid) == ("last", 7, (1, 8, 8))
    assert layout.text_slice == slice(64, 71)


@pytest.mark.parametrize("mode", MODES)
def test_wan_video_grid(mode):
    layouts = _layouts(wan, mode)
    assert layouts[(32, 32)].grid == (2, 4, 4) and layouts[(32, 32)].text_position == "none"
    assert layouts[(32, 7)].text_position == "key" and layouts[(32, 7)].text_tokens == 7


@pytest.mark.parametrize("mode", MODES)
def test_unet_levels(mode):
    layouts = _layouts(sd15, mode)
    grids = {lengths: (layout.height, layout.width) for lengths, layout in layouts.items()}
    assert grids[(256, 256)] == (16, 16) and grids[(64, 64)] == (8, 8)
    assert layouts[(256, 7)].text_position == "key"


def test_the_same_layout_in_every_mode():
    for factory in (flux, sd3, wan, sd15):
        eager = _layouts(factory, "eager")
        assert _layouts(factory, "compile") == eager
        assert _layouts(factory, "fullgraph") == eager


def test_compiled_flux_without_an_eager_forward_has_no_grid():
    """A compiled Flux transformer whose grid was never seen in eager mode can't read it from
    ids values at trace time: the layout says so (grid None), it never guesses."""
    import torch._dynamo
    torch._dynamo.reset()
    model, kw = flux()
    with layout_reader(), attnpatch.patch(model, backend="layout_reader"):
        with torch.no_grad():
            torch.compile(model, backend="eager", fullgraph=True)(**kw)
        layout = SEEN[0][1]
    torch._dynamo.reset()
    assert layout.grid is None and layout.text_position == "first" and layout.text_tokens == 7


def test_bare_call_takes_token_layout_argument():
    q, k, v = (torch.randn(1, 2, 20, 8) for _ in range(3))
    given = TokenLayout(4, "first", 1, 4, 4, 20, 20)
    with layout_reader():
        attnpatch.attention(q, k, v, backend="layout_reader", token_layout=given)
        attnpatch.attention(q, k, v, backend="layout_reader")  # cached entry, another layout
        attnpatch.attention(q, k, v, backend="layout_reader", token_layout=given)
        assert [s[1] for s in SEEN] == [given, None, given]
        assert attnpatch.explain(q, k, v, backend="layout_reader",
                                 token_layout=given).call.token_layout == given
    with pytest.raises(attnpatch.AttnPatchError, match="token_layout must be"):
        attnpatch.attention(q, k, v, token_layout=(1, 4, 4))


def test_selection_sees_the_layout():
    """A backend that refuses calls without a grid is refused, with its reason, and accepted
    once a layout with a grid comes (the cached selection is not reused across layouts)."""

    class NeedsGrid(LayoutReader):
        name = "needs_grid"

        def not_supported_reasons(self, call):
            reasons = super().not_supported_reasons(call)
            if call.token_layout is None or call.token_layout.grid is None:
                reasons.append("needs a token layout with a grid")
            return reasons

    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    attnpatch.register_backend(NeedsGrid, replace=True)
    try:
        with pytest.raises(attnpatch.BackendUnavailableError, match="needs a token layout"):
            attnpatch.attention(q, k, v, backend="needs_grid")
        grid = TokenLayout(0, "none", 1, 4, 4, 16, 16)
        out = attnpatch.attention(q, k, v, backend="needs_grid", token_layout=grid)
        assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6)
        with pytest.raises(attnpatch.BackendUnavailableError, match="needs a token layout"):
            attnpatch.attention(q, k, v, backend="needs_grid")
    finally:
        attnpatch.unregister_backend("needs_grid")


def test_layout_readers_without_specializes_per_token_layout_are_never_specialized():
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    with layout_reader():
        for _ in range(3):
            attnpatch.attention(q, k, v, backend="layout_reader")
        assert len(SEEN) == 3  # forward ran each time: no kernel replaced it
