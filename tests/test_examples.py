"""Every example runs (CPU, tiny random-weight pipelines), and the LoRA benchmark's smoke mode."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run(cmd, tmp_path, timeout=300, **env):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path),
                "PYTHONWARNINGS": "ignore", **env}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=full_env,
                            timeout=timeout)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return result.stdout


def test_every_example_is_tested():
    tested = {"patch_pipeline.py", "per_module_backends.py", "explain_rejection.py",
              "train_lora_fast_backend.py", "multi_gpu_generate.sh", "key_split_strategy.py"}
    assert {p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh")} == tested


def test_key_split_strategy_is_exact(tmp_path):
    """The README's write-a-strategy example: exact in forward and backward (float64), and
    refused with its declared reason where it can't run."""
    out = run([sys.executable, str(EXAMPLES / "key_split_strategy.py")], tmp_path)
    diffs = [float(line.rsplit("=", 1)[1]) for line in out.splitlines() if "max |" in line]
    assert len(diffs) == 5 and max(diffs) < 1e-12, out
    assert "patched module ran ['key_split']" in out
    assert "key_split       is_causal=True not supported" in out


def test_patch_pipeline(tmp_path):
    out = run([sys.executable, str(EXAMPLES / "patch_pipeline.py")], tmp_path)
    assert "attention modules routed through attnpatch" in out
    assert "after the switch: ['math']" in out
    assert "unpatched: FluxAttnProcessor" in out


def test_per_module_backends(tmp_path):
    out = run([sys.executable, str(EXAMPLES / "per_module_backends.py")], tmp_path)
    lines = [line.split() for line in out.splitlines() if "requested" in line]
    ran = {parts[0]: (parts[2], parts[4]) for parts in lines}
    assert all(ran[n] == ("sdpa", "sdpa") for n in ran if n.endswith("attn1"))
    assert all(ran[n] == ("math", "math") for n in ran if n.endswith("attn2"))
    assert all(ran[n] == ("sdpa_math", "sdpa_math") for n in ran if n.startswith("text_encoder"))


def test_explain_rejection(tmp_path):
    out = run([sys.executable, str(EXAMPLES / "explain_rejection.py")], tmp_path)
    assert "choice: sdpa" in out
    assert "refused: {'flex'" in out and "backward" in out
    assert "passed over" in out


def test_train_lora_fast_backend(tmp_path):
    out_dir = tmp_path / "lora"
    out = run([sys.executable, str(EXAMPLES / "train_lora_fast_backend.py"), "--out",
               str(out_dir)], tmp_path)
    assert "attention ran on: sdpa" in out
    assert (out_dir / "pytorch_lora_weights.safetensors").is_file()
    assert len(json.loads((out_dir / "train_log.json").read_text())["history"]) == 4


@pytest.mark.distributed
def test_multi_gpu_generate_on_two_cpu_processes(tmp_path):
    out_dir = tmp_path / "gen"
    out = run(["bash", str(EXAMPLES / "multi_gpu_generate.sh"), str(out_dir)], tmp_path,
              PYTHON=sys.executable, NUM_PROCESSES="2")
    assert "wrote 4 file(s)" in out and "2 process(es)" in out
    assert len(list(out_dir.glob("*.png"))) == 4


def test_lora_step_benchmark_smoke(tmp_path):
    out_file = tmp_path / "lora_step.json"
    out = run([sys.executable, str(ROOT / "benchmarks" / "lora_step.py"), "--tiny", "--device",
               "cpu", "--dtype", "fp32", "--steps", "2", "--warmup", "1", "--rounds", "1",
               "--out", str(out_file)], tmp_path)
    assert "attnpatch sdpa" in out
    result = json.loads(out_file.read_text())
    default, patched = result["rows"]
    assert default["variant"] == "diffusers" and default["processor"] == "AttnProcessor2_0"
    assert patched["modules_routed"] > 0 and patched["ran"] == ["sdpa"]
    assert patched["loss_diff"] < 1e-5 and patched["grad_norm_rel_diff"] < 1e-4


def test_text_encoders_benchmark_smoke(tmp_path):
    """The GPU benchmark's code path on CPU with tiny configs: every variant runs or is refused
    with its reason, patched T5 equals unpatched, Gemma2 computes softcap on flex and math."""
    out = run([sys.executable, str(ROOT / "benchmarks" / "text_encoders.py"), "--device", "cpu",
               "--tiny", "--t5-seq", "16", "--gemma-seq", "12", "--out", str(tmp_path)], tmp_path)
    rows = json.loads((tmp_path / "text_encoders.json").read_text())["rows"]
    by = {(r["model"], r["variant"]): r for r in rows}
    assert by[("t5-xxl-encoder", "patch(sdpa)")]["rel_err_vs_unpatched"] == 0.0
    assert "flash4" in by[("t5-xxl-encoder", "patch(flash4)")]["refused"]
    for model in ("gemma2-2b", "gemma2-2b unpadded"):
        for backend in ("flex", "math", "auto"):
            row = by[(model, f"patch({backend})")]
            assert row["routed"] == "2/2" and row["rel_err_vs_unpatched"] < 2e-2, row
    assert "ERROR" not in out


def _probed_package_names() -> set[str]:
    """Top-level names diffusers and transformers probe for optional packages
    (``_is_package_available("kernels")`` ...), read from their own import_utils sources, plus
    every installed distribution's top-level names."""
    import importlib.metadata
    import re

    import diffusers.utils.import_utils as diffusers_imports
    import transformers.utils.import_utils as transformers_imports

    names = set(importlib.metadata.packages_distributions())
    for module in (diffusers_imports, transformers_imports):
        source = pathlib.Path(module.__file__).read_text()
        names.update(re.findall(r"_is_package_available\(\s*[\"']([\w.]+)[\"']", source))
    return names


def test_script_folders_shadow_no_package():
    """``python benchmarks/x.py`` puts ``benchmarks/`` first on sys.path, so a script named like
    a package the libraries probe is imported in its place (``benchmarks/kernels.py`` broke every
    benchmark once transformers 5.25 began importing the ``kernels`` package it found)."""
    probed = _probed_package_names()
    assert "kernels" in probed  # the probe reader works on the names that bit us
    scripts = [p for folder in (ROOT / "benchmarks", EXAMPLES) for p in folder.glob("*.py")]
    shadowing = sorted(str(p.relative_to(ROOT)) for p in scripts if p.stem in probed)
    assert not shadowing, f"rename these scripts, they shadow a package: {shadowing}"
