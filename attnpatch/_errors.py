"""Exceptions raised by attnpatch."""

from __future__ import annotations

__all__ = ["AttnPatchError", "BackendUnavailableError"]


class AttnPatchError(Exception):
    """Base class of every error attnpatch raises (bad input, bad option, no backend)."""


class BackendUnavailableError(AttnPatchError):
    """No requested backend can run a call.

    ``reasons`` maps each backend that was considered to the list of reasons it was rejected;
    ``str(error)`` prints all of them.
    """

    def __init__(self, message: str, reasons: dict[str, list[str]]):
        self.reasons = {name: list(r) for name, r in reasons.items()}
        lines = [message]
        for name, why in self.reasons.items():
            lines.append(f"  {name}: " + ("; ".join(why) if why else "(no reason recorded)"))
        super().__init__("\n".join(lines))
