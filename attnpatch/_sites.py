"""One install/undo mechanism for everything :func:`attnpatch.patch` changes.

A :class:`Site` is one change to one object: :meth:`Site.apply` makes it, :meth:`Site.restore`
undoes it exactly. A shared site lives in its object's ``__dict__`` under a key (attribute names
start with ``_attnpatch_``), so that every patch touching the object finds it: :func:`acquire`
counts a patch in (``refs``), :func:`release` counts it out and restores the change when the
last one leaves. A site acquired with key None is private to its one holder (not stored).

A patch holds its sites in one list, in the order it acquired them, and releases them in reverse
(a site never outlives the ones acquired before it), so a half-failed patch rolls back through
the same sites as an ``unpatch``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from ._errors import AttnPatchError

__all__ = ["MISSING", "Site", "ProcessSite", "held", "acquire", "release", "ForwardHooks"]


class _Missing:
    """The type of :data:`MISSING`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"

    def __deepcopy__(self, memo: dict) -> "_Missing":
        return self


#: "nothing was there" in a site's saved values: one object that deepcopy keeps (a deep copy
#: of a patched model compares its copied saved values against this same object)
MISSING = _Missing()


class Site:
    """One change to ``obj``. Subclasses implement :meth:`apply` and :meth:`restore`.

    ``key``: where the site is stored on ``obj`` (set by :func:`acquire`; None for a private
    site); ``refs``: how many holders count it; ``shadowed``: the stale site it replaced under
    the same key, put back if still held when this one is released.
    """

    __slots__ = ("obj", "key", "refs", "shadowed")

    def __init__(self, obj: Any):
        self.obj = obj
        self.key: Optional[str] = None
        self.refs = 0
        self.shadowed: Optional[Site] = None

    def apply(self) -> None:
        """Make the change. Raise only with nothing changed."""

    def restore(self) -> None:
        """Undo the change exactly; what someone else changed on top of it since stays theirs."""

    def stale(self) -> bool:
        """True when the change no longer holds (undone from outside, or never made): the next
        :func:`acquire` makes a new site instead of counting in to this one."""
        return False


class ProcessSite(Site):
    """A site on a process-wide object (a library's registry): ``copy.deepcopy`` of a patch
    that holds it (a patched model deep-copied, an EMA copy) holds this same site, counted in
    once more, instead of a copy whose release would undo the process-wide change while the
    original still needs it (or the original's release undo it under the copy)."""

    __slots__ = ()

    def __deepcopy__(self, memo: dict) -> "ProcessSite":
        memo[id(self)] = self  # deepcopy memoizes no object that is its own copy: count once
        self.refs += 1
        return self


def held(obj: Any, key: str) -> Optional[Site]:
    """The site stored on ``obj`` under ``key``, or None."""
    return vars(obj).get(key)


def acquire(obj: Any, key: Optional[str], factory: Callable[[], Site]) -> Site:
    """Count one holder in to the site under ``key`` on ``obj``; if there is none (or it is
    stale), make one with ``factory()``, apply it and store it. ``key=None``: a private site,
    applied and not stored. Raises what ``apply`` raises, with nothing stored or counted."""
    site = held(obj, key) if key is not None else None
    if site is None or site.stale():
        new = factory()
        new.apply()
        if key is not None:
            new.key = key
            new.shadowed = site
            vars(obj)[key] = new
        site = new
    site.refs += 1
    return site


def release(site: Site) -> None:
    """Count one holder out; the last one restores the change and removes the site from its
    object (putting back a stale site it replaced there, while that one is still held)."""
    site.refs -= 1
    if site.refs > 0:
        return
    site.restore()
    if site.key is not None:
        slots = vars(site.obj)
        if slots.get(site.key) is site:
            previous = site.shadowed
            if previous is not None and previous.refs > 0:
                slots[site.key] = previous
            else:
                del slots[site.key]
    site.shadowed = None


class ForwardHooks(Site):
    """Torch forward hooks on one module and its submodules, from hook objects with optional
    ``pre(module, args, kwargs)`` (may return new ``(args, kwargs)``) and ``post(module, args,
    kwargs, output)`` (may return a new output; runs also when the forward raises, with
    ``output`` None), and an optional ``path``: the submodule to hook, as ``get_submodule``
    spells it (``"proj_out"``, ``"blocks.0"``; ``""`` or none: the module itself).

    Registered with ``register_forward_pre_hook(with_kwargs=True)`` and
    ``register_forward_hook(with_kwargs=True, always_call=True)`` in the hooks' order; every
    path is resolved before anything is registered (a missing one raises with nothing changed);
    a site can be applied again after it was restored (the same hook objects, registered anew)."""

    def __init__(self, module: torch.nn.Module, hooks: Sequence[Any], label: str = ""):
        super().__init__(module)
        self.hooks = list(hooks)
        self.label = label
        self._handles: list = []

    def apply(self) -> None:
        module: torch.nn.Module = self.obj
        targets = []
        for hook in self.hooks:
            path = getattr(hook, "path", "") or ""
            try:
                targets.append(module.get_submodule(path))
            except AttributeError as err:
                raise AttnPatchError(f"hook {hook!r}: path {path!r} is not a submodule of "
                                     f"{type(module).__name__} ({err})") from None
        handles = []
        for hook, target in zip(self.hooks, targets):
            pre, post = getattr(hook, "pre", None), getattr(hook, "post", None)
            if pre is not None:
                handles.append(target.register_forward_pre_hook(pre, with_kwargs=True))
            if post is not None:
                handles.append(target.register_forward_hook(post, with_kwargs=True,
                                                            always_call=True))
        self._handles = handles

    def restore(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles = []

    def __repr__(self) -> str:
        return f"<ForwardHooks {self.label} on {type(self.obj).__name__}: {len(self.hooks)} hook(s)>"
