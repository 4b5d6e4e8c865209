"""`attnpatch demo` end to end (small settings) and its bad-input errors."""

from __future__ import annotations

import json
import re
import sys

import pytest

from attnpatch import cli
from attnpatch.scripting import available_backends

from .conftest import is_dense

SMALL = ["--steps", "1", "--height", "32", "--width", "32"]


def test_demo_every_available_backend(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", *SMALL, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "random weights" in text and "noise" in text
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    backends = available_backends()
    assert {r["pipeline"] for r in rows} == {"tiny-flux", "tiny-sd"}
    for pipeline in ("tiny-flux", "tiny-sd"):
        mine = {r["backend"]: r for r in rows if r["pipeline"] == pipeline}
        assert set(mine) == {"unpatched", *backends}
        for name, r in mine.items():
            assert r["error"] is None, r
            assert r["seconds_per_step"] > 0
            assert (out / r["image"]).is_file()
            if name == "unpatched" or is_dense(name):
                assert r["rel_dev"] < 1e-3, r      # every dense backend computes the same image
            else:  # a pattern strategy (dilated) differs by definition: the demo says how much
                assert 0 <= r["rel_dev"] < 1, r
            if name != "unpatched":
                assert r["modules_patched"] > 0 and r["ran"] == name
        assert mine["sdpa"]["max_abs_dev"] == 0.0
        for name in mine:                            # the table lists every row
            assert re.search(rf"^{pipeline}\s+{name}\s", text, flags=re.M), name
    assert (out / "chart.png").stat().st_size > 1000
    assert not list(out.glob(".attnpatch-partial-*"))


def test_demo_local_model_folder_and_named_backends(tmp_path, capsys):
    from attnpatch.tiny_pipelines import build_tiny_pipeline

    model = tmp_path / "my-sd"
    build_tiny_pipeline("sd").save_pretrained(model)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--model", str(model), "--backend", "math", "--steps", "1",
                     "--height", "64", "--width", "64", "--out", str(out), "--no-chart"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["pipeline"], r["backend"]) for r in rows] == [
        ("my-sd", "unpatched"), ("my-sd", "sdpa"), ("my-sd", "math")]
    assert not (out / "chart.png").exists()
    assert "random weights" not in capsys.readouterr().out


def test_demo_without_matplotlib_still_works(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    out = tmp_path / "demo"
    assert cli.main(["demo", "--backend", "sdpa", "--steps", "1", "--height", "32",
                     "--width", "32", "--out", str(out)]) == 0
    assert "chart skipped: matplotlib is not installed" in capsys.readouterr().out
    assert (out / "results.json").is_file() and not (out / "chart.png").exists()


@pytest.mark.parametrize("argv, needles", [
    (["--model", "{tmp}/missing"], ["does not exist", "model_index.json"]),
    (["--model", "{tmp}/plain"], ["not a diffusers model folder"]),
    (["--backend", "flashh"], ["unknown backend 'flashh'", "attnpatch backends"]),
    (["--backend", "sdpa", "--backend-option", "window=8"], ["does not take option(s) ['window']"]),
    (["--backend", "flex", "--backend-option", "block_mask=1", "--backend-option", "mask_mod=2"],
     ["flex", "--backend-option"]),
    (["--height", "50"], ["multiple of 16"]),
])
def test_demo_bad_input(tmp_path, capsys, argv, needles):
    (tmp_path / "plain").mkdir()
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = cli.main(["demo", *argv, "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and sum(e.startswith("error: ") for e in err) == 1
    for needle in needles:
        assert needle in err[-1], err[-1]
    assert not out.exists()


def test_readme_main_command_is_the_demo_and_runs_as_a_command(tmp_path):
    """The Quickstart's first command ends in `attnpatch demo`; the command line entry point
    runs it (small settings here; the defaults take well under 2 minutes on 2 CPU cores)."""
    import pathlib
    import subprocess

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in quickstart.strip().splitlines() if line.strip()]
    assert len(commands) == 2 and "&& attnpatch demo" in commands[0]
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "attnpatch.cli", "demo", "--backend", "sdpa",
                             "--steps", "1", "--height", "32", "--width", "32", "--no-chart",
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "modules patched" in result.stdout and (out / "tiny-flux-sdpa.png").is_file()
