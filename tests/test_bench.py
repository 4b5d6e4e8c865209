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
    # --processes 4: the parallel suite says why it skips N=4 here (the 2-process gloo launch
    # is test_quick_parallel_launches_two_gloo_processes, marked distributed)
    assert attnpatch.cli.main(["bench", "--quick", "--suite", "all", "--device", "cpu",
                               "--no-progress", "--processes", "4", "--out", str(out)]) == 0
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
                                 "device": "cpu", "model": None, "budget_s": 0.0}
    assert [(e["suite"], e["groups"]) for e in results["runs"]] == [
        ("kernels", None), ("models", None), ("sparse", None), ("parallel", ["N=4"])]


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
        assert "patch_overhead_paired_pct" in patched and patched["fwd_rounds"] == "alternating"
        assert patched["routed_modules"] > 0
    sparse = [m for (suite, name, _), m in by.items() if suite == "sparse"
              and "output" not in name]
    assert {v for (s, _, v) in by if s == "sparse"} == {"dilated", "block_sparse", "dense sdpa"}
    assert all(0 < m["density"] < 1 and m["speedup"] > 0 and m["rel_err_vs_dense"] > 0
               for m in sparse)


def test_quick_all_skips_say_why(quick_all):
    _, results = quick_all
    skipped = [r for r in results["rows"] if r["skipped"] is not None]
    assert all(isinstance(r["skipped"], str) and r["skipped"] for r in skipped)
    parallel = [r for r in results["rows"] if r["suite"] == "parallel"]
    assert parallel and all(r["skipped"] == "--quick on a CPU runs N=2 only (gloo, tiny "
                            "model), not N=4" for r in parallel)
    reasons = {(r["suite"], r["name"], r["variant"]): r["skipped"] for r in skipped}
    # GPU-only parts: the anchor shapes and the CUDA-only backends
    assert reasons[("kernels", "wan_720p", "*")] == "--quick: tiny shapes only"
    assert "no CUDA device" in reasons[("kernels", "tiny", "sdpa_cudnn")]
    assert reasons[("sparse", "image PSNR/SSIM", "*")].startswith("needs --model PATH")


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
    assert "not N=4" in report
    assert "accelerate launch --num_processes N" in report
    assert "GPU: none" in report
    assert {"sparse_speedup_vs_error.png", "sparse_speedup_vs_density.png"} <= set(
        results["charts"])
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
    bad = {"schema_version": 2, "machine": {}, "runs": [], "config": {"suites": ["kernels"], "quick": 1,
                                                           "device": "cpu", "model": None},
           "rows": [{"suite": "nope", "name": "x", "variant": "y", "shape": [1, "a"],
                     "metrics": {"ms": ["x"]}, "skipped": None}], "charts": []}
    problems = "\n".join(schema.validate(bad))
    assert "missing required key 'platform'" in problems
    assert "results.config.quick" in problems
    assert "'nope' is not one of" in problems
    assert "results.rows[0].shape[1]" in problems
    assert "results.rows[0].metrics.ms" in problems


# --- sparse: density sweep, model output, images --------------------------------------------------

def test_quick_sparse_window_sweep_and_model_output(quick_all):
    _, results = quick_all
    rows = [r for r in results["rows"] if r["suite"] == "sparse" and r["skipped"] is None]
    sweep = [r["metrics"] for r in rows if r["name"].startswith("block_sparse flux_tiny_")]
    assert len(sweep) == 3  # windows 1x1, 3x1, 3x3 of the same shape, against one dense run
    assert len({m["dense_fwd_median_ms"] for m in sweep}) == 1
    densities = [m["density"] for m in sweep]
    errors = [m["rel_err_vs_dense"] for m in sweep]
    assert densities == sorted(densities) and errors == sorted(errors, reverse=True)
    output = [r for r in rows if r["name"].endswith(": output")]
    by = {r["metrics"]["config"]: r["metrics"] for r in output}
    assert by["sdpa"]["rel_err_vs_unpatched"] < 1e-5 and "speedup" not in by["sdpa"]
    sparse = [m for c, m in by.items() if c != "sdpa"]
    assert len(sparse) == 3 and {r["variant"] for r in output} == {
        "dense sdpa", "block_sparse", "dilated"}
    for m in sparse:
        assert 0 < m["density"] < 1 and m["speedup"] > 0 and m["routed_modules"] > 0
        assert 1e-6 < m["rel_err_vs_unpatched"] < 1
        assert m["fwd_rounds"] == "alternating" and m["fwd_reps"] == by["sdpa"]["fwd_reps"]
    wide = by["block_sparse tile2d 4x4 window 3x3"]
    narrow = by["block_sparse tile2d 4x4 window 1x1"]
    assert wide["density"] > narrow["density"]
    assert wide["rel_err_vs_unpatched"] < narrow["rel_err_vs_unpatched"]
    for m in sparse:  # the tiny Flux has one double and one single block: two attention calls
        assert len(m["layer_rel_err"]) == 2 and all(0 < e < 2 for e in m["layer_rel_err"])
        assert m["layer_rel_err_max"] == max(m["layer_rel_err"])
    assert wide["layer_rel_err_max"] < narrow["layer_rel_err_max"]


def test_layer_errors_forward_is_the_sparse_forward():
    """The per-layer measurement returns the sparse outputs (the forward is the sparse one),
    and each call's error is the sparse call's against dense attention on the same inputs."""
    import attnpatch
    from attnpatch._bench import models
    from attnpatch._bench.layer_error import NAME, layer_errors

    model = models.flux_net(True, "cpu", torch.float32)
    kwargs = models.flux_kwargs(model.config, 16, 16, 7, "cpu", torch.float32)
    options = dict(pattern="tile2d", tile=(4, 4), window=(1, 1), kernel="mask")
    with torch.no_grad():
        with attnpatch.patch(model, backend="block_sparse", **options):
            sparse = model(**kwargs)[0]
        dense = model(**kwargs)[0]
        with layer_errors(model, "block_sparse", options) as errors:
            out = model(**kwargs)[0]
    torch.testing.assert_close(out, sparse, rtol=1e-5, atol=1e-5)
    assert (out - dense).norm() > 1e-3 * dense.norm()
    assert len(errors) == 2 and all(e > 1e-3 for e in errors)
    assert NAME not in {b.name for b in attnpatch.list_backends()}  # registered for the block


def test_psnr_and_ssim_known_cases():
    from attnpatch._bench.image import SSIM_C1, psnr, ssim

    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, 32, 32, generator=gen)
    assert psnr(image, image.clone()) == float("inf")
    assert ssim(image, image.clone()) == pytest.approx(1.0, abs=1e-12)
    # ±0.1 everywhere (a checkerboard of signs): MSE 0.01, PSNR exactly 20 dB
    signs = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 2 - 1).double()
    flat = torch.full((1, 3, 32, 32), 0.5, dtype=torch.float64)
    assert psnr(flat + 0.1 * signs, flat) == pytest.approx(20.0, abs=1e-9)
    # Gaussian noise of σ 0.05: PSNR ≈ -10·log10(σ²) = 26.02 dB
    noisy = image + 0.05 * torch.randn(image.shape, generator=gen)
    assert psnr(noisy, image) == pytest.approx(26.02, abs=0.15)
    noisier = image + 0.2 * torch.randn(image.shape, generator=gen)
    assert 0 < ssim(noisier, image) < ssim(noisy, image) < 1
    # two flat images: no variance, so SSIM is the luminance term alone
    a, b = torch.full((3, 16, 16), 0.2), torch.full((3, 16, 16), 0.6)
    assert ssim(a, b) == pytest.approx((2 * 0.2 * 0.6 + SSIM_C1) / (0.04 + 0.36 + SSIM_C1))
    with pytest.raises(attnpatch.AttnPatchError, match="smaller than the 11x11 window"):
        ssim(torch.rand(3, 8, 8), torch.rand(3, 8, 8))


def test_model_path_sparse_images_psnr_ssim(tmp_path):
    from attnpatch.tiny_pipelines import build_tiny_pipeline

    build_tiny_pipeline("flux").save_pretrained(tmp_path / "flux")
    out = tmp_path / "out"
    assert attnpatch.cli.main(["bench", "--quick", "--suite", "sparse", "--device", "cpu",
                               "--no-progress", "--model", str(tmp_path / "flux"), "--steps",
                               "2", "--height", "64", "--width", "64", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert schema.validate(results) == []
    images = [r for r in results["rows"] if r["name"] == "image 64x64, 2 steps"]
    assert [r["variant"] for r in images] == ["unpatched", "block_sparse", "block_sparse",
                                              "dilated"]
    assert all(r["skipped"] is None for r in images), images
    assert images[0]["metrics"]["generate_ms"] > 0
    by = {r["metrics"]["config"]: r["metrics"] for r in images[1:]}
    # 64x64 pixels: a 4x4 token grid; a 5x5 tile window covers it, so that image is the dense one
    full = by["block_sparse tile2d 1x1 window 5x5"]
    assert full["identical_to_dense"] and full["psnr_db"] is None and full["ssim"] == 1.0
    dilated = by["dilated (2, 4, 8, 16) x (1, 2, 4, 8)"]
    assert not dilated["identical_to_dense"] and 0 < dilated["psnr_db"] < 100
    assert -1 <= dilated["ssim"] < 1
    report = (out / "report.md").read_text()
    assert "| SSIM |" in report and "PSNR dB" in report


# --- accumulating --out, options ------------------------------------------------------------------

def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_out_accumulates_one_suite_per_call(quick_all, tmp_path):
    src, before = quick_all
    out = _copy(src, tmp_path / "bench")
    (out / "models_forward_ms.png").unlink()
    assert attnpatch.cli.main(["bench", "--quick", "--suite", "models", "--models", "flux",
                               "--resolutions", "1", "--device", "cpu", "--no-progress",
                               "--out", str(out)]) == 0
    after = json.loads((out / "results.json").read_text())
    assert schema.validate(after) == []
    key = lambda r: (r["suite"], r["name"], r["variant"])  # noqa: E731
    old = {key(r): r for r in before["rows"]}
    new = {key(r): r for r in after["rows"]}
    # the other suites and the other models' rows are the former run's, unchanged
    for k, row in old.items():
        if k[0] != "models" or row["group"] != "flux":
            assert new[k] == row
    # flux's rows are the new run's: one resolution now
    flux = {k[1] for k, r in new.items() if k[0] == "models" and r["group"] == "flux"}
    assert flux == {"flux 64²"}
    assert new[("models", "flux 64²", "unpatched")]["metrics"] != old[
        ("models", "flux 64²", "unpatched")]["metrics"]
    assert after["config"]["suites"] == list(schema.SUITES)
    runs = [(e["suite"], e["groups"]) for e in after["runs"]]
    assert runs == [("kernels", None), ("models", None), ("models", ["flux"]),
                    ("sparse", None), ("parallel", ["N=4"])]
    report = (out / "report.md").read_text()
    assert all(f"## {t}" in report for t in ("Kernels", "Models", "Sparse", "Parallel"))
    assert "- models (flux):" in report
    # the charts are drawn again from the whole file
    assert (out / "models_forward_ms.png").read_bytes()[:8] == PNG_MAGIC
    assert set(after["charts"]) == set(before["charts"])


def test_out_with_a_foreign_results_json_names_the_argument(tmp_path, capsys):
    (tmp_path / "results.json").write_text('{"rows": []}')
    with pytest.raises(SystemExit) as exc:
        attnpatch.cli.main(["bench", "--quick", "--suite", "kernels", "--device", "cpu",
                            "--no-progress", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and "not a results file" in err and "delete" in err
    assert (tmp_path / "results.json").read_text() == '{"rows": []}'


@pytest.mark.parametrize("argv, words", [
    (["--budget", "0"], ["--budget", "positive number of seconds"]),
    (["--budget", "abc"], ["--budget", "positive number"]),
    (["--models", "flux,sdxxl"], ["--models", "sdxxl", "flux,sdxl,sd3,wan"]),
    (["--resolutions", "3"], ["--resolutions", "choose from 1, 2"]),
    (["--processes", "0,2"], ["--processes", "positive integers"]),
    (["--height", "100"], ["--height 100", "multiple of 16"]),
])
def test_bad_options_are_argparse_errors(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit) as exc:
        attnpatch.cli.main(["bench", "--suite", "models", "--device", "cpu", "--out",
                            str(tmp_path / "out"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not (tmp_path / "out").exists()


def test_docs_page_regenerated_between_markers(quick_all, tmp_path):
    from attnpatch._bench.report import DOCS_BEGIN, DOCS_END, update_docs

    out, results = quick_all
    page = tmp_path / "BENCHMARKS.md"
    page.write_text(f"# Benchmarks\n\nhand-written intro\n\n{DOCS_BEGIN}\nstale\n{DOCS_END}\n\n"
                    "## From the scripts\n\nkept as written\n")
    assert update_docs(results, tmp_path / "bench") == page
    text = page.read_text()
    assert "stale" not in text and "hand-written intro" in text and "kept as written" in text
    section = text.split(DOCS_BEGIN)[1].split(DOCS_END)[0]
    assert "### Kernels: TFLOP/s per backend" in section and "--quick" in section
    assert "| tiny | sdpa |" in section
    assert "](bench/sparse_speedup_vs_error.png)" in section
    (tmp_path / "plain").mkdir()
    assert update_docs(results, tmp_path / "plain" / "bench") is None  # no page: nothing


@pytest.mark.distributed
def test_quick_parallel_launches_two_gloo_processes(quick_all, tmp_path):
    """--suite parallel --quick on CPU: accelerate launch of 2 processes over gloo on a tiny
    Flux; attnpatch's ring/ulysses/usp equal the single-process forward, diffusers' rows and
    the counts not run say why; the other suites of the --out file stay."""
    src, before = quick_all
    out = _copy(src, tmp_path / "bench")
    assert attnpatch.cli.main(["bench", "--quick", "--suite", "parallel", "--device", "cpu",
                               "--no-progress", "--out", str(out)]) == 0
    after = json.loads((out / "results.json").read_text())
    assert schema.validate(after) == []
    rows = [r for r in after["rows"] if r["suite"] == "parallel"]
    by = {(r["name"], r["variant"]): r for r in rows}
    for variant in ("single", "ring", "ulysses", "usp"):
        row = by[("flux_tiny x2", variant)]
        assert row["skipped"] is None, row
        assert row["metrics"]["ms"] > 0 and row["metrics"]["processes"] == 2
        assert row["metrics"]["rel_error_vs_single"] < 1e-5
        assert row["metrics"]["launcher"] == "accelerate launch"
    assert "needs an accelerator" in by[("flux_tiny x2", "diffusers_ring")]["skipped"]
    for n in (1, 4):
        assert "runs N=2 only" in by[(f"denoiser forward x{n}", "ring")]["skipped"]
    assert [r for r in after["rows"] if r["suite"] != "parallel"] == [
        r for r in before["rows"] if r["suite"] != "parallel"]
    assert "parallel_forward_ms.png" in after["charts"]


def test_committed_docs_have_the_markers_and_a_readable_results_file():
    """docs/bench/results.json (written by an earlier schema) still loads, so the next GPU run
    into docs/bench keeps its suites; docs/BENCHMARKS.md has the generated section."""
    from attnpatch._bench.report import DOCS_BEGIN, DOCS_END
    from attnpatch.bench import _load_previous

    previous = _load_previous(ROOT / "docs" / "bench" / "results.json")
    assert schema.validate(previous) == []
    assert {e["suite"] for e in previous["runs"]} >= {"kernels"}
    page = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    assert page.count(DOCS_BEGIN) == 1 and page.count(DOCS_END) == 1
    assert page.index(DOCS_BEGIN) < page.index(DOCS_END)


def test_parallel_launch_commands():
    from attnpatch._bench.parallel import launch_command

    one = launch_command(1, ["--quick"], "cpu")
    two = launch_command(2, ["--quick"], "cuda")
    for cmd, n in ((one, "1"), (two, "2")):
        assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
        assert cmd[cmd.index("--num_processes") + 1] == n
        assert cmd[-3:] == ["-m", "attnpatch._bench.parallel", "--quick"]
        assert int(cmd[cmd.index("--main_process_port") + 1]) > 0
    assert "--multi_gpu" not in one and "--multi_gpu" in two


def test_time_limit_skips_what_is_left_and_still_writes(tmp_path):
    out = tmp_path / "out"
    assert attnpatch.cli.main(["bench", "--quick", "--suite", "all", "--device", "cpu",
                               "--no-progress", "--time-limit", "1e-9", "--out",
                               str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert schema.validate(results) == []
    assert results["config"]["time_limit_s"] == 1e-9
    rows = results["rows"]
    assert {r["suite"] for r in rows} == set(schema.SUITES)
    assert all(r["skipped"] for r in rows)
    spent = [r for r in rows if "--time-limit of 1e-09 s was spent" in r["skipped"]]
    assert {r["suite"] for r in spent} == set(schema.SUITES)
    assert "was spent" in (out / "report.md").read_text()


def test_render_only_redraws_from_results_json(quick_all, tmp_path, capsys):
    """A results.json copied in from another machine: --render-only writes the report, the
    charts and the docs section from it, measuring nothing."""
    import shutil

    from attnpatch._bench.report import DOCS_BEGIN, DOCS_END

    src, before = quick_all
    (tmp_path / "bench").mkdir()
    shutil.copy(src / "results.json", tmp_path / "bench" / "results.json")
    (tmp_path / "BENCHMARKS.md").write_text(f"intro\n{DOCS_BEGIN}\n{DOCS_END}\n")
    assert attnpatch.cli.main(["bench", "--render-only", "--out", str(tmp_path / "bench")]) == 0
    assert "rendered" in capsys.readouterr().out
    after = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert after == before  # nothing measured
    assert (tmp_path / "bench" / "report.md").read_text() == (src / "report.md").read_text()
    assert all((tmp_path / "bench" / c).read_bytes()[:8] == PNG_MAGIC for c in after["charts"])
    assert "### Models: one denoiser forward" in (tmp_path / "BENCHMARKS.md").read_text()
    with pytest.raises(SystemExit):
        attnpatch.cli.main(["bench", "--render-only", "--out", str(tmp_path / "empty")])
    assert "does not exist; run a suite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        attnpatch.cli.main(["bench", "--render-only", "--suite", "kernels", "--out",
                            str(tmp_path / "bench")])
    assert "drop --suite kernels" in capsys.readouterr().err


def test_alternating_rounds_enter_every_variant_once_per_round_in_rotating_order():
    """Each round sets every variant up once and times one call of it; the order rotates, so
    drift lands on all alike; ratios are paired per round against the first variant."""
    import contextlib

    from attnpatch._bench.timing import alternating_rounds
    entered, called = [], []

    def variant(name):
        @contextlib.contextmanager
        def enter():
            entered.append(name)
            yield
        return enter, lambda: called.append(name)
    stats = alternating_rounds({n: variant(n) for n in "abc"}, "cpu", 0.0, warmup=1, min_reps=4)
    assert entered == called
    rounds = [called[i:i + 3] for i in range(0, len(called), 3)]
    assert rounds == [list("abc"), list("abc"), list("bca"), list("cab"), list("abc")]
    assert all(stats[n]["reps"] == 4 and len(stats[n]["times_ms"]) == 4 for n in "abc")
    assert set(stats["paired"]) == {"b", "c"} and len(stats["paired"]["b"]) == 4


def test_alternating_rounds_drop_a_variant_that_fails_and_time_the_others():
    import contextlib

    from attnpatch._bench.timing import alternating_rounds
    calls = {"a": 0, "b": 0}

    def variant(name, fail_after=None):
        def fn():
            calls[name] += 1
            if fail_after is not None and calls[name] > fail_after:
                raise torch.OutOfMemoryError("round 3")
        return contextlib.nullcontext, fn
    stats = alternating_rounds({"a": variant("a"), "b": variant("b", fail_after=3)}, "cpu",
                               0.0, warmup=1, min_reps=5)
    assert stats["b"] == {"error": "OutOfMemoryError: round 3"}
    assert stats["a"]["reps"] == 5 and stats["paired"] == {}


def test_a_time_limit_keeps_the_rows_an_earlier_call_measured(quick_all, tmp_path, capsys):
    """A call into an accumulating --out that runs out of time keeps what an earlier call
    measured for the rows it skipped (they used to be overwritten with 'not measured'), and
    its summary counts its own rows, not the file's."""
    src, before = quick_all
    out = _copy(src, tmp_path / "bench")
    capsys.readouterr()
    assert attnpatch.cli.main(["bench", "--quick", "--suite", "models", "--models", "flux",
                               "--device", "cpu", "--no-progress", "--time-limit", "1e-9",
                               "--out", str(out)]) == 0
    assert "attnpatch bench: 0 rows measured" in capsys.readouterr().out
    after = json.loads((out / "results.json").read_text())
    assert schema.validate(after) == []
    key = lambda r: (r["suite"], r["name"], r["variant"], r.get("group"))  # noqa: E731
    old = {key(r): r for r in before["rows"]}
    flux = [r for r in after["rows"] if r["suite"] == "models" and r.get("group") == "flux"]
    assert flux and all(r == old[key(r)] for r in flux if old[key(r)]["skipped"] is None)
    assert any(r["skipped"] is None for r in flux)


def test_a_non_finite_error_loses_no_results(quick_all, tmp_path):
    """A sparse row whose error was not finite (stored as null) used to crash the chart step
    after the former charts were deleted and before results.json was written."""
    src, before = quick_all
    out = _copy(src, tmp_path / "bench")
    results = json.loads((out / "results.json").read_text())
    row = next(r for r in results["rows"] if r["suite"] == "sparse"
               and "rel_err_vs_dense" in r["metrics"] and "speedup" in r["metrics"])
    row["metrics"]["rel_err_vs_dense"] = None
    (out / "results.json").write_text(json.dumps(results))
    assert attnpatch.cli.main(["bench", "--render-only", "--out", str(out)]) == 0
    after = json.loads((out / "results.json").read_text())
    assert after["rows"] == results["rows"]
    assert "sparse_speedup_vs_error.png" in after["charts"]


def test_out_problems_are_errors_naming_the_fix(quick_all, tmp_path, capsys):
    from attnpatch._bench.report import DOCS_BEGIN, DOCS_END
    from attnpatch.bench import _csv_ints

    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exc:
        attnpatch.cli.main(["bench", "--quick", "--suite", "kernels", "--device", "cpu",
                            "--no-progress", "--out", str(tmp_path / "file")])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "results.json").write_text('{"schema_version": 1}')
    with pytest.raises(SystemExit):
        attnpatch.cli.main(["bench", "--render-only", "--out", str(tmp_path / "v1")])
    assert "schema-1 results file without its machine" in capsys.readouterr().err
    src, _ = quick_all
    out = _copy(src, tmp_path / "docs" / "bench")
    (tmp_path / "docs" / "BENCHMARKS.md").write_text(f"{DOCS_END}\n{DOCS_BEGIN}\n")
    with pytest.raises(SystemExit):
        attnpatch.cli.main(["bench", "--render-only", "--out", str(out)])
    assert "put the begin marker first" in capsys.readouterr().err
    assert _csv_ints("4,2,2,1") == [1, 2, 4]  # each process count once


def test_sparse_on_cpu_runs_the_tiny_shapes_and_says_why_not_the_full_ones(tmp_path):
    out = tmp_path / "out"
    assert attnpatch.cli.main(["bench", "--suite", "sparse", "--device", "cpu",
                               "--no-progress", "--budget", "0.01", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    full = [r for r in rows if "2048" in r["name"] or "720p" in r["name"]]
    assert full and all("need a CUDA device" in r["skipped"] for r in full)
    assert any(r["skipped"] is None and "tiny" in r["name"] for r in rows)
