"""Fixtures for the script tests: tiny local model folders, a 4-image dataset, and a way to run
``scripts/*.py`` in this process (imports are the slow part of a subprocess)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"


def load_script(name: str):
    """``scripts/<name>.py`` as a module (its ``main(argv)`` returns the exit code)."""
    spec = importlib.util.spec_from_file_location(f"_attnpatch_script_{name}",
                                                  SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def run_script():
    """run_script("train_lora", [...]) -> exit code, with accelerate's singletons reset."""
    modules = {}

    def run(name: str, argv: list[str]) -> int:
        if name not in modules:
            modules[name] = load_script(name)
        reset_accelerate()
        try:
            return modules[name].main([str(a) for a in argv])
        finally:
            reset_accelerate()

    return run


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model("sd" | "flux" | ...) -> a saved diffusers pipeline folder (built once)."""
    made = {}

    def get(kind: str) -> pathlib.Path:
        if kind not in made:
            from attnpatch.tiny_pipelines import build_tiny_pipeline

            folder = tmp_path_factory.mktemp(f"tiny-{kind}")
            build_tiny_pipeline(kind, size="test", seed=0).save_pretrained(folder)
            made[kind] = folder
        return made[kind]

    return get


CAPTIONS = ["a red square", "a green square", "a blue square", "a yellow square"]


def write_dataset(folder: pathlib.Path, captions=True) -> pathlib.Path:
    """4 images (80x96, a colored square on its complement) and, optionally, metadata.jsonl."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    lines = []
    for i, (rgb, caption) in enumerate(zip(colors, CAPTIONS)):
        a = np.zeros((80, 96, 3), np.uint8)
        a[:] = rgb
        a[20:60, 20:60] = 255 - np.array(rgb)
        Image.fromarray(a).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    if captions:
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> pathlib.Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "squares")
