"""scripts/generate.py: data-parallel over 2 gloo processes, videos, and bad input."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from .conftest import ROOT

PROMPTS = ["a lighthouse at dusk", "a red fox in the snow", "a bowl of ramen"]
SMALL = ["--steps", "2", "--height", "64", "--width", "64"]


def prompt_args(prompts=PROMPTS):
    return [a for p in prompts for a in ("--prompt", p)]


def read_records(out: pathlib.Path):
    return [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]


def test_single_process_writes_each_prompt(run_script, tiny_model, tmp_path):
    out = tmp_path / "single"
    assert run_script("generate", ["--model", tiny_model("sd"), *prompt_args(), *SMALL,
                                   "--backend", "sdpa", "--out", out]) == 0
    records = read_records(out)
    assert [r["prompt"] for r in records] == PROMPTS
    assert [r["seed"] for r in records] == [0, 1, 2]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [r["file"] for r in records] + ["generations.jsonl"])
    first = np.asarray(Image.open(out / records[0]["file"]))
    assert first.shape == (64, 64, 3)


@pytest.mark.distributed
def test_two_gloo_processes_split_prompts_and_write_each_once(tiny_model, tmp_path,
                                                              run_script):
    out = tmp_path / "dp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(ROOT / "scripts" / "generate.py"),
           "--model", str(tiny_model("sd")), *prompt_args(), *SMALL, "--backend", "sdpa",
           "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    records = read_records(out)
    assert sorted(r["prompt"] for r in records) == sorted(PROMPTS)       # each prompt once
    assert len({r["file"] for r in records}) == len(PROMPTS)
    assert {r["process"] for r in records} == {0, 1}                      # both worked
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([r["file"] for r in records] + ["generations.jsonl"])  # written once
    # prompt i always uses seed + i: the same image as a single-process run
    single = tmp_path / "single"
    assert run_script("generate", ["--model", tiny_model("sd"), "--prompt", PROMPTS[2], *SMALL,
                                   "--backend", "sdpa", "--out", single, "--seed", "2"]) == 0
    a = np.asarray(Image.open(out / records[2]["file"]), dtype=np.int16)
    b = np.asarray(Image.open(single / read_records(single)[0]["file"]), dtype=np.int16)
    assert np.abs(a - b).max() <= 1


def test_video_pipeline_writes_gif(run_script, tmp_path):
    out = tmp_path / "video"
    assert run_script("generate", ["--tiny", "wan", "--prompt", "waves", "--steps", "2",
                                   "--height", "64", "--width", "64", "--num-frames", "9",
                                   "--out", out]) == 0
    (record,) = read_records(out)
    gif = Image.open(out / record["file"])
    assert record["file"].endswith(".gif") and gif.n_frames == 9   # --num-frames wins


def test_backend_options_pass_through(run_script, tiny_model, tmp_path):
    out = tmp_path / "flex"
    assert run_script("generate", ["--model", tiny_model("sd"), "--prompt", "a cat", *SMALL,
                                   "--backend", "flex", "--backend-option", "compile=false",
                                   "--out", out]) == 0
    assert read_records(out)[0]["backend"] == "flex"


# --- bad input: one line, exit code 2, nothing written ----------------------------------------

def _bad(run_script, capsys, tmp_path, argv, *needles):
    out = tmp_path / "out"
    code = run_script("generate", [*argv, "--out", out, *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not out.exists()


def test_missing_model_folder(run_script, capsys, tmp_path):
    _bad(run_script, capsys, tmp_path, ["--model", tmp_path / "nope", "--prompt", "x"],
         "does not exist", "model_index.json")


def test_not_a_diffusers_model(run_script, capsys, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    _bad(run_script, capsys, tmp_path, ["--model", folder, "--prompt", "x"],
         "not a diffusers model folder")


def test_no_prompt(run_script, capsys, tmp_path, tiny_model):
    _bad(run_script, capsys, tmp_path, ["--model", tiny_model("sd")], "--prompt")


def test_unknown_backend(run_script, capsys, tmp_path, tiny_model):
    _bad(run_script, capsys, tmp_path, ["--model", tiny_model("sd"), "--prompt", "x",
                                        "--backend", "sdpa_flsh"], "unknown backend",
         "did you mean 'sdpa_flash'")


def test_option_the_backend_does_not_take(run_script, capsys, tmp_path, tiny_model):
    _bad(run_script, capsys, tmp_path, ["--model", tiny_model("sd"), "--prompt", "x",
                                        "--backend", "math", "--backend-option", "block_size=64"],
         "does not take option(s) ['block_size']")


def test_option_value_the_backend_rejects(run_script, capsys, tmp_path, tiny_model):
    """Refused before the model loads (the value is checked where it is given)."""
    _bad(run_script, capsys, tmp_path, ["--model", tiny_model("sd"), "--prompt", "x",
                                        "--backend", "flex", "--backend-option", "block_mask=1",
                                        "--backend-option", "mask_mod=2"],
         "block_mask", "--backend-option")


def test_malformed_option(run_script, capsys, tmp_path, tiny_model):
    _bad(run_script, capsys, tmp_path, ["--model", tiny_model("sd"), "--prompt", "x",
                                        "--backend-option", "compile"], "key=value")


@pytest.fixture
def kernel_without_bias():
    """A backend that, like the FlashAttention kernels, takes no float bias (T5 needs one)."""
    import torch.nn.functional as F

    import attnpatch

    class NoBias(attnpatch.Backend):
        name = "test_no_bias"
        priority = None
        mask_kinds = frozenset({"none", "key_padding", "bool"})

        def forward(self, call, **options):
            return F.scaled_dot_product_attention(call.query, call.key, call.value,
                                                  attn_mask=call.combined_mask(),
                                                  scale=call.scale, enable_gqa=call.is_gqa)

    attnpatch.register_backend(NoBias)
    yield NoBias.name
    attnpatch.unregister_backend(NoBias.name)


def test_backend_scope(run_script, tiny_model, tmp_path, capsys, kernel_without_bias):
    """Default scope: --backend runs the denoiser, 'auto' the text encoders (T5's position bias)
    and the VAE; --backend-scope all puts it everywhere, and T5 then refuses it."""
    out = tmp_path / "denoiser"
    assert run_script("generate", ["--model", tiny_model("flux"), "--prompt", "x", *SMALL,
                                   "--max-sequence-length", "16", "--backend",
                                   kernel_without_bias, "--report", "--out", out]) == 0
    table = capsys.readouterr().out
    # the report table: module, type/processor, requested, ran, calls, notes
    ran = {r[0]: r[3] for r in (line.split() for line in table.splitlines())
           if len(r) >= 5 and "/" in r[1]}
    assert all(v == kernel_without_bias for k, v in ran.items() if k.startswith("transformer."))
    assert ran["text_encoder_2.encoder.block.0.layer.0.SelfAttention"] == "sdpa"
    _bad(run_script, capsys, tmp_path, ["--model", tiny_model("flux"), "--prompt", "x",
                                        "--max-sequence-length", "16", "--backend",
                                        kernel_without_bias, "--backend-scope", "all"],
         kernel_without_bias, "mask")
