"""``attnpatch bench`` on CPU: the quick suites run for real (tiny shapes and models), write a
schema-valid results.json, a report.md naming every suite, PNG charts, and skip rows that say
why (GPU-only parts, the multi-GPU parallel suite)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import attnpatch.cli
from attnpatch._bench import schema

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_all(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_all")
    assert attnpatch.cli.main(["bench", "--quick", "--suite", "all", "--device", "cpu",
                               "--no-progress", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_all_writes_a_valid_results_json(quick_all):
    out, results = quick_all
    assert schema.validate(results) == []
    machine = results["machine"]
    assert machine["gpu"] == "none" and machine["cuda"] == torch.version.cuda  # the build's
    assert machine["date"].endswith("+00:00")
    assert os.uname().nodename not in machine["platform"]
    assert {r["suite"] for r in results["rows"]} == set(schema.SUITES)
    assert results["config"] == {"suites": list(schema.SUITES), "quick": True,
                                 "device": "cpu", "model": None}


def test_quick_all_measures_with_spread(quick_all):
    _, results = quick_all
    ran = [r for r in results["rows"] if r["skipped"] is None]
    by = {(r["suite"], r["name"], r["variant"]): r["metrics"] for r in ran}
    sdpa = by[("kernels", "tiny", "sdpa")]
    assert sdpa["fwd_min_ms"] <= sdpa["fwd_median_ms"] <= sdpa["fwd_max_ms"]
    assert sdpa["fwd_q1_ms"] <= sdpa["fwd_median_ms"] <= sdpa["fwd_q3_ms"]
    assert sdpa["fwd_tflops"] > 0 and sdpa["fwd_bwd_tflops"] > 0
    auto = by[("kernels", "tiny", "auto")]
    assert auto["chosen"] == "sdpa" and 0 < auto["share_of_best_fwd"] <= 1.5
    for name in QUICK_MODEL_ROWS:
        assert by[("models", name, "unpatched")]["fwd_median_ms"] > 0
        patched = by[("models", name, "attnpatch sdpa")]
        assert "patch_overhead_pct" in patched and patched["rel_err_vs_unpatched"] < 1e-5
        assert patched["routed_modules"] > 0
    sparse = [m for (suite, _, _), m in by.items() if suite == "sparse"]
    assert {v for (s, _, v) in by if s == "sparse"} == {"dilated", "block_sparse"}
    assert all(0 < m["density"] < 1 and m["speedup"] > 0 and m["rel_err_vs_dense"] > 0
               for m in sparse)


def test_quick_all_skips_say_why(quick_all):
    _, results = quick_all
    skipped = [r for r in results["rows"] if r["skipped"] is not None]
    assert all(isinstance(r["skipped"], str) and r["skipped"] for r in skipped)
    parallel = [r for r in results["rows"] if r["suite"] == "parallel"]
    assert parallel and all(r["skipped"] == "needs 2 CUDA devices; this machine has 0"
                            for r in parallel)
    reasons = {(r["suite"], r["name"], r["variant"]): r["skipped"] for r in skipped}
    # GPU-only parts: the anchor shapes and the CUDA-only backends
    assert reasons[("kernels", "wan_720p", "*")] == "--quick: tiny shapes only"
    assert "no CUDA device" in reasons[("kernels", "tiny", "sdpa_cudnn")]
    assert reasons[("models", "flux", "image PSNR/SSIM")] == "not implemented"


#: the quick models suite's rows: four models at two tiny resolutions each
QUICK_MODEL_ROWS = ("flux 64²", "flux 96²", "sdxl 128²", "sdxl 64²", "sd3 128²", "sd3 64²",
                    "wan 64² 5f", "wan 48×80 9f")


def test_quick_models_four_models_two_sizes_every_diffusers_backend(quick_all):
    from attnpatch._bench.suites import diffusers_backends

    _, results = quick_all
    rows = [r for r in results["rows"] if r["suite"] == "models"]
    names = {r["name"] for r in rows if r["variant"] == "unpatched"}
    assert names == set(QUICK_MODEL_ROWS)
    backends = diffusers_backends()
    assert backends[0] == "native" and len(backends) == len(set(backends))
    by = {(r["name"], r["variant"]): r for r in rows}
    for name in QUICK_MODEL_ROWS:
        for backend in backends:
            row = by[(name, f"diffusers {backend}")]
            # measured, or skipped with a reason
            assert (row["skipped"] is None and row["metrics"]["fwd_median_ms"] > 0) or (
                isinstance(row["skipped"], str) and row["skipped"].strip()), row
        native = by[(name, "diffusers native")]
        if name.startswith(("flux", "wan")):  # their processors dispatch through diffusers
            assert native["skipped"] is None, native["skipped"]
            assert native["metrics"]["rel_err_vs_unpatched"] < 1e-5
            assert native["metrics"]["backend_modules"] > 0
        else:  # SDXL's and SD3's processors ignore set_attention_backend: said, not timed
            assert "set_attention_backend changes nothing" in native["skipped"]
    if len(backends) > 1:  # a CUDA-only backend fails on this CPU run and says why
        cudnn = by[("flux 64²", "diffusers _native_cudnn")]
        assert cudnn["skipped"].startswith("error: ") and "on cpu" in cudnn["skipped"]
        hub = by[("wan 64² 5f", "diffusers flash_hub")]
        assert "Hugging Face Hub" in hub["skipped"]
    # set_attention_backend's global active backend was put back after every row
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    assert _AttentionBackendRegistry.get_active_backend()[0].value == "native"


def test_models_registry_has_two_full_size_resolutions_each():
    from attnpatch._bench.models import MODELS

    assert set(MODELS) == {"flux", "sdxl", "sd3", "wan"}
    assert MODELS["flux"].resolutions == ("1024²", "1536²")
    assert MODELS["sdxl"].resolutions == ("1024²", "768²")
    assert MODELS["sd3"].resolutions == ("1024²", "1536²")
    assert MODELS["wan"].resolutions == ("480p 81f", "480p 33f")
    assert all(len(spec.tiny_resolutions) == 2 for spec in MODELS.values())


def test_full_size_inputs_have_the_documented_shapes():
    from types import SimpleNamespace

    from attnpatch._bench.models import sd3_inputs, wan_inputs

    sd3 = SimpleNamespace(in_channels=16, joint_attention_dim=4096, pooled_projection_dim=2048)
    kw = sd3_inputs(sd3, "1536²", False, "cpu", torch.float32)
    assert kw["hidden_states"].shape == (2, 16, 192, 192)
    assert kw["encoder_hidden_states"].shape == (2, 333, 4096)
    assert kw["pooled_projections"].shape == (2, 2048)
    wan = SimpleNamespace(in_channels=16, text_dim=4096)
    assert wan_inputs(wan, "480p 81f", False, "meta", torch.float32)[
        "hidden_states"].shape == (1, 16, 21, 60, 104)
    kw = wan_inputs(wan, "480p 33f", False, "meta", torch.float32)
    assert kw["hidden_states"].shape == (1, 16, 9, 60, 104)
    assert kw["encoder_hidden_states"].shape == (1, 512, 4096)


def test_quick_all_report_and_charts(quick_all):
    out, results = quick_all
    report = (out / "report.md").read_text()
    for title in ("Kernels", "Models", "Sparse", "Parallel"):
        assert f"## {title}" in report
    assert "needs 2 CUDA devices; this machine has 0" in report
    assert "benchmarks/context_parallel.py" in report
    assert "GPU: none" in report
    assert "sparse_speedup_vs_error.png" in results["charts"]
    for chart in results["charts"]:
        assert f"]({chart})" in report
        assert (out / chart).read_bytes()[:8] == PNG_MAGIC
    assert len(list(out.glob("*.png"))) >= 1


def test_python_m_attnpatch_bench_kernels(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "attnpatch.bench", "--quick", "--suite",
                             "kernels", "--device", "cpu", "--out", str(tmp_path)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "report.md" in result.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert schema.validate(results) == []
    assert {r["suite"] for r in results["rows"]} == {"kernels"}
    assert (tmp_path / "kernels_tflops.png").read_bytes()[:8] == PNG_MAGIC
    assert "## Kernels" in (tmp_path / "report.md").read_text()


def test_model_path_loads_a_local_pipeline(tmp_path):
    from attnpatch.tiny_pipelines import build_tiny_pipeline

    build_tiny_pipeline("flux").save_pretrained(tmp_path / "flux")
    out = tmp_path / "out"
    assert attnpatch.cli.main(["bench", "--quick", "--suite", "models", "--device", "cpu",
                               "--no-progress", "--model", str(tmp_path / "flux"),
                               "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["model"] == str(tmp_path / "flux")
    by = {r["variant"]: r for r in results["rows"]}
    assert by["unpatched"]["name"] == "FluxTransformer2DModel"
    assert by["attnpatch sdpa"]["metrics"]["fwd_median_ms"] > 0


@pytest.mark.parametrize("kind", ["sd3", "wan"])
def test_model_path_builds_sd3_and_wan_inputs(tmp_path, kind):
    from attnpatch._bench.models import load_denoiser
    from attnpatch.tiny_pipelines import build_tiny_pipeline

    build_tiny_pipeline(kind).save_pretrained(tmp_path / kind)
    model, kwargs = load_denoiser(str(tmp_path / kind), "cpu", torch.float32, tiny=True)
    assert type(model).__name__ == {"sd3": "SD3Transformer2DModel",
                                    "wan": "WanTransformer3DModel"}[kind]
    with torch.no_grad():
        out = model(**kwargs)[0]
    assert out.shape[0] == 1 and torch.isfinite(out).all()


def test_unknown_suite_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        attnpatch.cli.main(["bench", "--suite", "kernelz", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "kernelz" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_missing_model_path_names_the_argument(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        attnpatch.cli.main(["bench", "--suite", "models", "--device", "cpu", "--out",
                            str(tmp_path / "out"), "--model", str(tmp_path / "missing")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--model" in err and "missing" in err


def test_unloadable_model_path_names_the_argument(tmp_path):
    from attnpatch._bench.models import ModelPathError, load_denoiser

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPathError, match="--model .*could not load a diffusers pipeline"):
        load_denoiser(str(tmp_path / "empty"), "cpu", torch.float32, tiny=True)


def test_schema_validator_reports_problems():
    bad = {"schema_version": 1, "machine": {}, "config": {"suites": ["kernels"], "quick": 1,
                                                           "device": "cpu", "model": None},
           "rows": [{"suite": "nope", "name": "x", "variant": "y", "shape": [1, "a"],
                     "metrics": {"ms": [1]}, "skipped": None}], "charts": []}
    problems = "\n".join(schema.validate(bad))
    assert "missing required key 'platform'" in problems
    assert "results.config.quick" in problems
    assert "'nope' is not one of" in problems
    assert "results.rows[0].shape[1]" in problems
    assert "results.rows[0].metrics.ms" in problems
