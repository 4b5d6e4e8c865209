"""CI's minimum-versions leg pins exactly the lower bounds pyproject.toml declares."""

from __future__ import annotations

import pathlib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
ROOT = pathlib.Path(__file__).resolve().parent.parent


def _lower_bounds() -> dict[str, Version]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["test"]
    bounds = {}
    for req in map(Requirement, reqs):
        for spec in req.specifier:
            if spec.operator == ">=":
                bounds[req.name.lower()] = Version(spec.version)
    return bounds


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / ".ci" / "constraints-min.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = Version(version.strip())
    return pins


def test_constraints_min_pins_every_lower_bound():
    bounds, pins = _lower_bounds(), _pins()
    assert bounds and set(pins) == set(bounds), (sorted(pins), sorted(bounds))
    assert pins == bounds
