"""scripts/train_lora.py on CPU: tiny UNet and tiny Flux folders, a 4-image dataset."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from .conftest import write_dataset

# named when loading: older diffusers (0.37 at least) won't guess it under HF_HUB_OFFLINE
LORA_FILE = "pytorch_lora_weights.safetensors"
COMMON = ["--resolution", "32", "--seed", "0", "--max_sequence_length", "16"]


def history(folder):
    return json.loads((folder / "train_log.json").read_text())["history"]


def lora_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


def generate(pipe, kind):
    from attnpatch.tiny_pipelines import tiny_call_kwargs

    pipe.set_progress_bar_config(disable=True)
    return pipe("a red square", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0), **tiny_call_kwargs(kind)).images


@pytest.fixture(scope="module")
def unet_run(tiny_model, dataset, tmp_path_factory):
    """5 steps on the tiny UNet, checkpoints every 2 steps (module-scoped: shared by tests)."""
    from .conftest import load_script, reset_accelerate

    out = tmp_path_factory.mktemp("lora-sd") / "out"
    reset_accelerate()
    code = load_script("train_lora").main([
        "--pretrained_model_name_or_path", str(tiny_model("sd")), "--train_data_dir",
        str(dataset), "--output_dir", str(out), "--max_train_steps", "5",
        "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--random_flip",
        "--attention_backend", "sdpa", *COMMON])
    reset_accelerate()
    assert code == 0
    return out


def test_unet_five_steps_finite_loss_and_checkpoints(unet_run):
    steps = history(unet_run)
    assert [h["step"] for h in steps] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(h["loss"]) for h in steps)
    assert sorted(p.name for p in unet_run.iterdir()) == [
        "checkpoint-2", "checkpoint-4", "pytorch_lora_weights.safetensors", "train_log.json"]
    assert (unet_run / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    assert not list(unet_run.glob(".*"))  # no partial folders left behind
    weights = lora_weights(unet_run)
    assert weights and all(k.startswith("unet.") for k in weights)
    ups = [v for k, v in weights.items() if "lora.up" in k or "lora_B" in k]
    assert ups and all(v.abs().max() > 0 for v in ups)  # trained: B left its zero init


def test_unet_lora_loads_and_changes_output(unet_run, tiny_model):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_model("sd"), local_files_only=True)
    before = generate(pipe, "sd")
    pipe.load_lora_weights(str(unet_run), weight_name=LORA_FILE)
    after = generate(pipe, "sd")
    assert abs(after - before).max() > 1e-4
    # what was loaded is what was trained
    from peft.utils import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=pipe.get_active_adapters()[0])
    assert len(loaded) == len(lora_weights(unet_run))


def test_resume_continues_at_the_right_step(unet_run, tiny_model, dataset, tmp_path,
                                            run_script, capsys):
    """Resuming from checkpoint-2 gives exactly the uninterrupted run's steps 3-5."""
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(unet_run / "checkpoint-2", out / "checkpoint-2")
    code = run_script("train_lora", [
        "--pretrained_model_name_or_path", tiny_model("sd"), "--train_data_dir", dataset,
        "--output_dir", out, "--max_train_steps", "5", "--checkpointing_steps", "2",
        "--learning_rate", "1e-3", "--random_flip", "--attention_backend", "sdpa",
        "--resume_from_checkpoint", "latest", *COMMON])
    assert code == 0
    assert "resuming from" in capsys.readouterr().out
    full, resumed = history(unet_run), history(out)
    assert [h["step"] for h in resumed] == [1, 2, 3, 4, 5]
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in full], rel=1e-5)
    assert (out / "checkpoint-4").is_dir()
    a, b = lora_weights(unet_run), lora_weights(out)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_flux_five_steps_bf16_gradient_checkpointing_and_load(tiny_model, dataset, tmp_path,
                                                              run_script):
    out = tmp_path / "flux"
    code = run_script("train_lora", [
        "--pretrained_model_name_or_path", tiny_model("flux"), "--train_data_dir", dataset,
        "--output_dir", out, "--max_train_steps", "5", "--checkpointing_steps", "100",
        "--learning_rate", "1e-3", "--mixed_precision", "bf16", "--gradient_checkpointing",
        "--rank", "8", *COMMON])
    assert code == 0
    steps = history(out)
    assert len(steps) == 5 and all(math.isfinite(h["loss"]) for h in steps)
    weights = lora_weights(out)
    assert weights and all(k.startswith("transformer.") for k in weights)

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_model("flux"), local_files_only=True)
    before = generate(pipe, "flux")
    pipe.load_lora_weights(str(out), weight_name=LORA_FILE)
    assert abs(generate(pipe, "flux") - before).max() > 1e-5


def test_loss_goes_down_with_a_fixed_seed(tiny_model, dataset, tmp_path, run_script):
    """Noise, timesteps and batch order depend only on the seed and the step, so a run with
    learning rate 0 gives the loss of the untrained model on the very same samples: training
    lowers the loss against it, step by step, over the last steps."""
    args = ["--pretrained_model_name_or_path", tiny_model("sd"), "--train_data_dir", dataset,
            "--max_train_steps", "30", "--checkpointing_steps", "1000", "--rank", "8", *COMMON]
    assert run_script("train_lora", [*args, "--output_dir", tmp_path / "trained",
                                     "--learning_rate", "1e-2"]) == 0
    assert run_script("train_lora", [*args, "--output_dir", tmp_path / "frozen",
                                     "--learning_rate", "0"]) == 0
    trained = [h["loss"] for h in history(tmp_path / "trained")]
    frozen = [h["loss"] for h in history(tmp_path / "frozen")]
    assert trained[0] == pytest.approx(frozen[0], rel=1e-5)   # same first sample
    diffs = [t - f for t, f in zip(trained[-10:], frozen[-10:])]
    assert sum(diffs) / len(diffs) < -0.01, diffs
    assert sum(trained[-10:]) < sum(trained[:10])


# --- bad input: one line, exit code 2, nothing written ----------------------------------------

def _bad(run_script, capsys, tmp_path, argv, *needles):
    out = tmp_path / "out"
    code = run_script("train_lora", [*argv, "--output_dir", out, "--max_train_steps", "1",
                                     *COMMON])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err  # one line, the last one
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not out.exists()
    return errors[0]


def test_missing_model_folder(run_script, capsys, tmp_path, dataset):
    _bad(run_script, capsys, tmp_path, ["--pretrained_model_name_or_path", tmp_path / "nope",
                                        "--train_data_dir", dataset], "does not exist",
         "model_index.json")


def test_folder_that_is_not_a_diffusers_model(run_script, capsys, tmp_path, dataset):
    folder = tmp_path / "notamodel"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    _bad(run_script, capsys, tmp_path, ["--pretrained_model_name_or_path", folder,
                                        "--train_data_dir", dataset], "not a diffusers model")


def test_dataset_without_images(run_script, capsys, tmp_path, tiny_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text("")
    _bad(run_script, capsys, tmp_path, ["--pretrained_model_name_or_path", tiny_model("sd"),
                                        "--train_data_dir", empty], "no images")


def test_dataset_without_captions(run_script, capsys, tmp_path, tiny_model):
    data = write_dataset(tmp_path / "nocaptions", captions=False)
    _bad(run_script, capsys, tmp_path, ["--pretrained_model_name_or_path", tiny_model("sd"),
                                        "--train_data_dir", data], "metadata.jsonl",
         "--instance_prompt")


def test_unknown_backend(run_script, capsys, tmp_path, tiny_model, dataset):
    _bad(run_script, capsys, tmp_path, ["--pretrained_model_name_or_path", tiny_model("sd"),
                                        "--train_data_dir", dataset, "--attention_backend",
                                        "flsh"], "unknown backend 'flsh'", "attnpatch backends")


def test_option_the_backend_does_not_take(run_script, capsys, tmp_path, tiny_model, dataset):
    _bad(run_script, capsys, tmp_path, ["--pretrained_model_name_or_path", tiny_model("sd"),
                                        "--train_data_dir", dataset, "--attention_backend",
                                        "sdpa", "--attention_backend_option", "window=4"],
         "does not take option(s) ['window']")


def test_backend_that_cannot_train_here(run_script, capsys, tmp_path, tiny_model, dataset):
    """flex has no CPU backward: refused at the first step, before anything is written."""
    _bad(run_script, capsys, tmp_path, ["--pretrained_model_name_or_path", tiny_model("sd"),
                                        "--train_data_dir", dataset, "--attention_backend",
                                        "flex"], "backward", "--attention_backend")
