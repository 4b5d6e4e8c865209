"""scripts/generate.py and scripts/train_lora.py with a context-parallel backend under
``accelerate launch --multi_gpu --num_processes 2`` on CPU (gloo): every process runs every
sample, the main process alone writes, and the results are the single-process ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from .conftest import ROOT

pytestmark = pytest.mark.distributed

SMALL = ["--steps", "2", "--height", "64", "--width", "64"]
PROMPTS = ["a lighthouse at dusk", "a red fox in the snow"]


def launch(script: str, args: list) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(ROOT / "scripts" / f"{script}.py"),
           *[str(a) for a in args]]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]


def test_generate_under_ring_writes_each_prompt_once_as_one_process_would(
        tiny_model, tmp_path, run_script):
    out = tmp_path / "ring"
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    result = launch("generate", ["--model", tiny_model("flux"), *prompts, *SMALL,
                                 "--backend", "ring", "--backend-option", "inner=math",
                                 "--out", out])
    assert result.returncode == 0, result.stderr[-3000:]
    got = records(out)
    assert [r["prompt"] for r in got] == PROMPTS and {r["process"] for r in got} == {0}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [r["file"] for r in got] + ["generations.jsonl"])
    single = tmp_path / "single"
    assert run_script("generate", ["--model", tiny_model("flux"), *prompts, *SMALL,
                                   "--backend", "math", "--out", single]) == 0
    for a, b in zip(got, records(single)):
        x = np.asarray(Image.open(out / a["file"]), dtype=np.int16)
        y = np.asarray(Image.open(single / b["file"]), dtype=np.int16)
        assert np.abs(x - y).max() <= 1


def test_train_lora_under_ring_matches_one_process(tiny_model, dataset, tmp_path, run_script):
    """2 steps on the tiny Flux: the same losses and LoRA weights as one process (same batches
    and noise on both ranks; DDP averages the ranks' gradients)."""
    from safetensors.torch import load_file

    common = ["--pretrained_model_name_or_path", tiny_model("flux"), "--train_data_dir",
              dataset, "--max_train_steps", "2", "--checkpointing_steps", "100",
              "--learning_rate", "1e-3", "--rank", "4", "--resolution", "32", "--seed", "0",
              "--max_sequence_length", "16", "--gradient_checkpointing"]
    out = tmp_path / "ring"
    result = launch("train_lora", [*common, "--output_dir", out, "--attention_backend", "ring",
                                   "--attention_backend_option", "inner=math"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es), attention: ring" in result.stdout
    single = tmp_path / "single"
    assert run_script("train_lora", [*common, "--output_dir", single,
                                     "--attention_backend", "math"]) == 0
    logs = [json.loads((d / "train_log.json").read_text())["history"] for d in (out, single)]
    assert [h["loss"] for h in logs[0]] == pytest.approx([h["loss"] for h in logs[1]],
                                                         rel=1e-5)
    a, b = load_file(str(out / "pytorch_lora_weights.safetensors")), load_file(
        str(single / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_ring_without_accelerate_launch_is_one_line(run_script, capsys, tiny_model, tmp_path):
    code = run_script("generate", ["--model", tiny_model("flux"), "--prompt", "x", *SMALL,
                                   "--backend", "ring", "--out", tmp_path / "out"])
    err = capsys.readouterr().err
    assert code == 2 and "torch.distributed is not initialized" in err, err
    assert "accelerate launch" in err and not (tmp_path / "out").exists()
