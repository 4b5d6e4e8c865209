"""Shared by the attnpatch.pipelines tests: the zoo models of the family table, and what a
denoiser's forward pre-hook sees."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from attnpatch.pipelines import FAMILIES
from tests import zoo_models


def _zoo_cases() -> list[tuple[str, str]]:
    first: dict[str, str] = {}
    for family in FAMILIES.values():
        for name in family.models:
            first.setdefault(name, family.name)
    return [(family, name) for name, family in first.items() if name in zoo_models.FACTORIES]


#: (family, model class) for every class of the family table the model zoo builds, each class
#: once, under the first family that lists it
ZOO_CASES = _zoo_cases()
ZOO_IDS = [f"{family}-{name}" for family, name in ZOO_CASES]


def seen_by_forward(model: torch.nn.Module, kwargs: dict,
                    call: Optional[Callable[[Any, dict], Any]] = None) -> tuple[tuple, dict]:
    """The (args, kwargs) that ``model``'s outermost forward receives when run on ``kwargs``
    (``call(model, kwargs)`` where the model needs a special call)."""
    seen: list = []

    def hook(module, args, kw):
        if not seen:
            seen.append((args, dict(kw)))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            call(model, kwargs) if call else model(**kwargs)
    finally:
        handle.remove()
    return seen[0]
