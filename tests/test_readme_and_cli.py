"""The README's code runs as written; the CLI prints the backend table."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def python_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_blocks_run():
    blocks = python_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        if "attnpatch.patch(" in block or "pipe" in block:
            continue  # pipeline snippets need a pipeline object: covered by the patch tests
        exec(compile(block, "README.md", "exec"), {})


def test_cli_backends_lists_every_backend():
    result = subprocess.run([sys.executable, "-m", "attnpatch.cli", "backends"],
                            capture_output=True, text=True, check=True)
    for name in ("sdpa", "sdpa_cudnn", "flex", "math"):
        assert name in result.stdout
    assert "no CUDA device" in result.stdout
