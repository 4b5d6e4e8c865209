"""The model zoo's results table: rows collected by tests/integrations/test_zoo.py, printed at
the end of the session (and written to $ATTNPATCH_ZOO_TABLE when that is set)."""

from __future__ import annotations

import os

import pytest

ZOO_ROWS = pytest.StashKey[list]()
COLUMNS = ("model", "routed/counted", "not routed", "max rel err", "status")


@pytest.fixture
def zoo_table(request) -> list:
    return request.config.stash.setdefault(ZOO_ROWS, [])


def _lines(rows: list) -> list[str]:
    cells = [COLUMNS] + [(r["model"], f"{r['routed']}/{r['counted']}", str(r["not_routed"]),
                          r["max_rel_err"], r["status"]) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    out = ["  ".join(c[i].ljust(widths[i]) for i in range(len(COLUMNS))).rstrip() for c in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    reasons = [f"  {r['model']}: {r['reasons']}" for r in rows if r.get("reasons")]
    if reasons:
        out += ["", "not routed (the report's notes), unreported attention, errors:"] + reasons
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = config.stash.get(ZOO_ROWS, [])
    if not rows:
        return
    rows = sorted(rows, key=lambda r: r["model"])
    lines = _lines(rows)
    terminalreporter.write_sep("=", f"attnpatch model zoo ({len(rows)} models)")
    for line in lines:
        terminalreporter.write_line(line)
    path = os.environ.get("ATTNPATCH_ZOO_TABLE")
    if path:
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
