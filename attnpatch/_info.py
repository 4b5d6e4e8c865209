"""``list_backends()``: every registered backend, whether it can run here, and why not."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from . import registry


@dataclass
class BackendInfo:
    name: str
    available: bool
    reasons: list[str]
    priority: Optional[int]
    aliases: tuple[str, ...]
    description: str
    capabilities: dict[str, Any] = field(default_factory=dict)


class BackendTable(list):
    """A list of :class:`BackendInfo` that prints as a table."""

    def __str__(self) -> str:
        rows = [("backend", "available", "auto", "aliases", "why not / notes")]
        for info in self:
            rows.append((info.name, "yes" if info.available else "no",
                         "-" if info.priority is None else str(info.priority),
                         ",".join(info.aliases) or "-",
                         "; ".join(info.reasons) or info.description))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4]
                         for r in rows)


def list_backends() -> BackendTable:
    """Every registered backend (``auto``'s candidates first, in priority order), with whether it
    can run on this machine and, if not, why."""
    table = BackendTable()
    for backend in registry.all_backends():
        reasons = backend.availability_reasons()
        table.append(BackendInfo(backend.name, not reasons, reasons, backend.priority,
                                 tuple(backend.aliases), backend.description,
                                 backend.capabilities()))
    return table
