"""Per attention module state of a patch: what was there, what is requested, what actually ran."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from ._sites import Site

__all__ = ["RECORD_KEY", "ModuleRecord", "ModuleReport", "PatchReport"]

#: where a patched module keeps its record (the transformers attention function looks it up)
RECORD_KEY = "_attnpatch_record"


class ModuleRecord(Site):
    """One patched attention module, and the site that routes it (stored on the module under
    :data:`RECORD_KEY`, counted per patch that holds it).

    ``default`` is the patch-level backend handed to the dispatcher, ``(name, options)`` or None
    (None: the ``$ATTNPATCH_BACKEND`` / ``auto`` default). The processor (diffusers) or the
    AttentionInterface function (transformers) calls :meth:`note` after every eager call.

    The base class changes nothing when applied: a transformers module is routed by its record
    being there (its model's configs are switched by another site), and a module attnpatch
    cannot route is held only to be reported. The patcher's subclasses install a diffusers
    processor or a routed module class.
    """

    __slots__ = ("name", "kind", "module_type", "processor", "default", "patch_default",
                 "routed", "note_text", "calls", "backend", "_backends", "fallbacks",
                 "last_selection", "_booked", "scale", "joint_text", "original", "installed",
                 "model_hooks", "extra", "notes")

    def __init__(self, name: str, kind: str, module: Any, processor: str):
        super().__init__(module)
        self.name = name
        self.kind = kind                  # "diffusers" | "transformers" | "module"
        self.module_type = type(module).__name__
        self.processor = processor        # original processor class name / "AttentionInterface"
        self.default: Optional[tuple[str, dict]] = None
        self.patch_default: Optional[tuple[str, dict]] = None
        self.routed = False
        self.note_text: Optional[str] = None
        self.calls = 0
        self.backend: Optional[str] = None
        self._backends: Counter = Counter()
        self._booked = 0                  # calls already counted in _backends
        self.fallbacks: dict[str, list[str]] = {}
        self.last_selection = None        # the dispatcher's Selection of the last call
        self.scale: Optional[float] = None   # scale for processors that ignore it (legacy swap)
        self.joint_text: Optional[str] = None  # "first"/"last": text position in joint attention
        self.original: Any = None         # the processor / implementation to restore
        self.installed: Any = None        # what we installed (to detect later replacement)
        self.model_hooks: Any = None      # the backend-hooks site of the model holding the module
        self.extra: dict = {}
        self.notes: list[str] = []        # the backends' report notes (distinct, the last 8)

    @property
    def module(self) -> Any:
        """The attention module."""
        return self.obj

    def stale(self) -> bool:
        """Routes nothing now: never routed, or its processor or class replaced after patching
        (a new patch of the module makes a new record). A transformers model switched away
        after patching stays as its user set it: patching again reuses the record."""
        return not self.routed or (self.kind != "transformers" and self.replaced())

    def note(self, selection) -> None:
        """Book one eager call that ran through the dispatcher's ``selection``.

        Runs after every attention call (the dispatcher inlines it on its fastest path:
        ``calls += 1``, then :meth:`switch` if the selection changed). Per-backend counts are
        settled only when the selection changes, and when read."""
        self.calls += 1
        if selection is not self.last_selection:
            self.switch(selection)

    def switch(self, selection) -> None:
        """The call just booked (``calls`` already counts it) ran through a new ``selection``."""
        self._switch(selection.backend.name, self.calls - 1)
        self.last_selection = selection
        if selection.note is not None and selection.note not in self.notes:
            self.notes = [*self.notes[-7:], selection.note]
        for name, reasons in selection.rejected.items():
            known = self.fallbacks.setdefault(name, [])
            known.extend(r for r in reasons if r not in known)

    def note_external(self, name: str) -> None:
        """Book one call that attnpatch handed to another library's kernel (named ``name``)."""
        self.calls += 1
        self._switch(name, self.calls - 1)
        self.last_selection = None

    def _switch(self, backend: str, booked_until: int) -> None:
        """Count the calls so far for the backend that ran them; ``backend`` runs from now on."""
        if self.backend is not None and booked_until > self._booked:
            self._backends[self.backend] += booked_until - self._booked
        self._booked = booked_until
        self.backend = backend

    @property
    def backends(self) -> Counter:
        """Calls per backend since patching."""
        counts = Counter(self._backends)
        if self.backend is not None and self.calls > self._booked:
            counts[self.backend] += self.calls - self._booked
        return counts

    def requested(self) -> str:
        if self.default is None:
            return "auto"
        name, options = self.default
        if not options:
            return name
        return f"{name}(" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")"

    def replaced(self) -> bool:
        """True when someone took the module out of attnpatch after patching: swapped our
        diffusers processor, or switched a transformers config to another implementation."""
        if self.kind == "transformers":
            impl = self.extra.get("impl")
            cfg = getattr(self.module, "config", None)
            return impl is not None and getattr(cfg, "_attn_implementation", impl) != impl
        if self.kind == "module":
            return self.installed is not None and type(self.module) is not self.installed
        return (self.installed is not None
                and getattr(self.module, "processor", None) is not self.installed)

    def report(self) -> "ModuleReport":
        note, routed = self.note_text, self.routed
        undone = routed and self.refs == 0  # released by every patch that held it
        if routed and not undone and self.replaced():
            routed = False
            note = ("processor replaced after patch() (set_attn_processor, "
                    "fuse_qkv_projections, ...): not routed now; call patch() again"
                    if self.kind == "diffusers" else
                    "module class changed after patch(): not routed now; call patch() again"
                    if self.kind == "module" else
                    "attention implementation switched after patch() (set_attn_implementation):"
                    " not routed now")
        return ModuleReport(name=self.name, backend=self.backend, calls=self.calls,
                            fallbacks={k: list(v) for k, v in self.fallbacks.items()},
                            requested=self.requested(), backends=dict(self.backends),
                            routed=routed, kind=self.kind, module_type=self.module_type,
                            processor=self.processor, note=note, notes=list(self.notes),
                            undone=undone)

    def __repr__(self) -> str:
        return f"<ModuleRecord {self.name} {self.kind} routed={self.routed} calls={self.calls}>"


@dataclass
class ModuleReport:
    """What happened in one attention module since it was patched.

    ``backend`` is the backend that ran the last call (None before the first call, and while
    compiled: calls inside a ``torch.compile`` graph are not counted), ``backends`` counts calls
    per backend, ``fallbacks`` maps every backend ``auto`` passed over to its reasons.
    ``routed`` is False for a module attnpatch could not route; ``note`` says why. ``notes``:
    what the backends said about the calls they ran (e.g. a dilated pattern set and its
    fraction of dense FLOPs, or that a cross-attention call ran dense). ``undone``: the patch
    was undone since (``unpatch()``, the end of its ``with`` block); the rest tells what ran
    while it was active.
    """

    name: str
    backend: Optional[str]
    calls: int
    fallbacks: dict[str, list[str]] = field(default_factory=dict)
    requested: str = "auto"
    backends: dict[str, int] = field(default_factory=dict)
    routed: bool = True
    kind: str = "diffusers"
    module_type: str = ""
    processor: str = ""
    note: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    undone: bool = False


class PatchReport(list):
    """A list of :class:`ModuleReport`, one per attention module; prints as a table."""

    @property
    def routed(self) -> list[ModuleReport]:
        return [r for r in self if r.routed]

    @property
    def not_routed(self) -> list[ModuleReport]:
        return [r for r in self if not r.routed]

    def by_name(self) -> dict[str, ModuleReport]:
        return {r.name: r for r in self}

    def __str__(self) -> str:
        head = ("module", "type / processor", "requested", "ran", "calls", "fallbacks / notes")
        rows = [head]
        for r in self:
            fb = "; ".join(f"{n}: {', '.join(why)}" for n, why in r.fallbacks.items())
            if len(fb) > 100:
                fb = fb[:97] + "..."
            notes = r.note if r.note else "; ".join([*r.notes, *([fb] if fb else [])]) or "-"
            ran = r.backend or "-"
            if len(r.backends) > 1:
                ran = ",".join(f"{n}x{c}" for n, c in r.backends.items())
            rows.append((r.name or "<root>", f"{r.module_type}/{r.processor}", r.requested,
                         ran if r.routed else "NOT ROUTED", str(r.calls), notes))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5]
                 for row in rows]
        routed = len(self.routed)
        undone = " while patched (the patch is undone now)" if any(r.undone for r in self) else ""
        lines.append(f"{routed}/{len(self)} attention modules routed through attnpatch, "
                     f"{sum(r.calls for r in self)} calls{undone}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)
