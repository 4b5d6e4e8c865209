"""ModuleRecord bookkeeping: calls per backend, fallbacks, the last backend that ran."""

from __future__ import annotations

from attnpatch import registry
from attnpatch._record import ModuleRecord


def selection(name, rejected=None):
    return registry.Selection(registry.get_backend(name), "auto", rejected or {})


def test_counts_per_backend_across_switches_and_external_kernels():
    record = ModuleRecord("blocks.0.attn", "diffusers", object(), "AttnProcessor2_0")
    sdpa, math = selection("sdpa", {"flash4": ["not installed"]}), selection("math")
    for sel in (sdpa, sdpa, sdpa, math, math, sdpa):
        record.note(sel)
    assert record.backends == {"sdpa": 4, "math": 2}
    record.note_external("diffusers:sage")
    record.note_external("diffusers:sage")
    record.note(math)
    report = record.report()
    assert report.calls == 9
    assert report.backend == "math"
    assert report.backends == {"sdpa": 4, "math": 3, "diffusers:sage": 2}
    assert report.fallbacks == {"flash4": ["not installed"]}


def test_inlined_booking_matches_note():
    """The dispatcher books warm calls as ``calls += 1`` plus ``switch`` on a new selection."""
    inlined = ModuleRecord("a", "diffusers", object(), "p")
    noted = ModuleRecord("a", "diffusers", object(), "p")
    for sel in [selection("sdpa")] * 2 + [selection("math")] * 3:
        noted.note(sel)
        inlined.calls += 1
        if sel is not inlined.last_selection:
            inlined.switch(sel)
    assert inlined.report() == noted.report()
