"""Bounded caches, each forgotten at once when full, and one call that clears them all.

A model's working set is small (a few dozen call signatures, masks and grids), so a full cache
means something keeps changing (shapes, option objects); starting over is then as good as any
eviction order, and cheaper on the hot path.
"""

from __future__ import annotations

__all__ = ["BoundedCache", "clear_caches"]

_ALL: list["BoundedCache"] = []


class BoundedCache(dict):
    """A dict cleared when it holds ``limit`` entries and a new one arrives (see :meth:`put`).
    Reads are plain ``dict.get`` (no Python frame on the hot path)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        _ALL.append(self)

    def put(self, key, value):
        """Store and return ``value``, clearing the cache first when it is full."""
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value


def clear_caches() -> None:
    """Forget every cached selection, causal mask, BlockMask, compiled flex kernel and token
    grid (``attnpatch._clear_caches()``): for tests, and after changing what a cache can't see."""
    for cache in _ALL:
        cache.clear()
