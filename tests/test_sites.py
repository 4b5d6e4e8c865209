"""One install/undo mechanism: sites (apply/restore, counted per object, released in reverse)."""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch import AttnPatchError, _sites
from attnpatch.integrations import transformers as itf
from tests.tiny_models import clip_text, flux, no_attnpatch_state

pytest.importorskip("diffusers")


# --- the sites themselves ---------------------------------------------------------------------

class Box:
    """A plain object to change."""


class Flag(_sites.Site):
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
    a = _sites.acquire(box, "_attnpatch_flag", lambda: Flag(box, 1, log))
    b = _sites.acquire(box, "_attnpatch_flag", lambda: Flag(box, 2, log))
    assert a is b and a.refs == 2 and box.flag == 1 and _sites.held(box, "_attnpatch_flag") is a
    _sites.release(a)
    assert box.flag == 1 and log == [("apply", 1)]
    _sites.release(a)
    assert vars(box) == {} and log == [("apply", 1), ("restore", 1)]


def test_a_stale_site_is_replaced_and_comes_back_while_held():
    box, log = Box(), []
    old = _sites.acquire(box, "_attnpatch_flag", lambda: Flag(box, 1, log))
    old.gone = True
    new = _sites.acquire(box, "_attnpatch_flag", lambda: Flag(box, 2, log))
    assert new is not old and box.flag == 2 and _sites.held(box, "_attnpatch_flag") is new
    _sites.release(new)  # the old one is still held: it is what the key holds again
    assert _sites.held(box, "_attnpatch_flag") is old
    _sites.release(old)
    assert vars(box) == {}
    assert log == [("apply", 1), ("apply", 2), ("restore", 2), ("restore", 1)]


def test_a_private_site_is_not_stored_and_a_failing_apply_leaves_nothing():
    box, log = Box(), []
    site = _sites.acquire(box, None, lambda: Flag(box, 1, log))
    assert site.refs == 1 and vars(box) == {"flag": 1}
    _sites.release(site)
    assert vars(box) == {}

    class Refuses(Flag):
        def apply(self):
            raise AttnPatchError("no")

    with pytest.raises(AttnPatchError, match="no"):
        _sites.acquire(box, "_attnpatch_flag", lambda: Refuses(box, 1, log))
    assert vars(box) == {}


def test_unpatch_releases_sites_in_reverse(monkeypatch):
    """Every site a patch holds, restored last-acquired first (a request before its record,
    a model's configs before the transformers registration)."""
    transformer, _ = flux()
    text, _ = clip_text()
    box = torch.nn.ModuleDict({"transformer": transformer, "text": text})
    handle = attnpatch.patch(box, backend="math")
    held = handle.sites
    kinds = [type(s).__name__ for s in held]
    assert kinds[0] == "_Target"
    assert kinds.index("Registration") < kinds.index("ImplementationSite")
    assert all(kinds.index(k) < kinds.index("_Request") for k in ("_ProcessorRecord",
                                                                  "ModuleRecord", "_Methods"))
    restored = []
    defining = {next(k for k in type(s).__mro__ if "restore" in vars(k)) for s in held}
    for cls in defining:
        def logged(self, _original=cls.restore):
            restored.append(self)
            _original(self)
        monkeypatch.setattr(cls, "restore", logged)
    handle.unpatch()
    assert [s for s in restored if any(s is h for h in held)] == list(reversed(held))
    assert no_attnpatch_state(box) == [] and not itf.registered()

