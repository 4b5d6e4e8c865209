"""Context parallelism at the pipeline level: ``patch(model, backend="ring"|"ulysses"|"usp")``
splits a tiny denoiser's inputs as its family's plan says and gathers its output; on 2 and 4
gloo ranks the output equals the single-process forward (fp32, 1e-5), a LoRA training step
gives the single-process gradients (mean over the ranks, as DDP computes), and unpatch leaves
no hook behind. Each spawned run covers several models: spawning costs seconds per process."""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch import AttnPatchError

from ..tiny_models import flux, no_attnpatch_state, output_of, rel_error, run, sd3, sd15, sdxl, \
    seeded, wan
from .conftest import run_ranks

pytest.importorskip("diffusers")
pytestmark = pytest.mark.distributed

TOL = 1e-5


def _zoo(name: str):
    """A model of the zoo (small config, its forward kwargs) that brings diffusers' plan."""
    def build():
        from ..zoo_models import build as zoo_build

        case = zoo_build(name)
        return case.model, case.kwargs
    return build


MODELS = dict(flux=flux, sd3=sd3, wan=wan, sd15=sd15, sdxl=sdxl,
              qwenimage=_zoo("QwenImageTransformer2DModel"),
              flux2=_zoo("Flux2Transformer2DModel"))


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _forward_case(name: str, backend: str, options: dict) -> dict:
    """On this rank: the patched forward's error against the unpatched one, and what unpatch
    leaves behind."""
    model, kw = MODELS[name]()
    seeded(model)
    hooks_before = _hook_count(model)
    first = next(m for m in model.modules() if hasattr(m, "processor"))
    lengths = []
    seen = first.register_forward_pre_hook(
        lambda m, args, kw_: lengths.append((args[0] if args else kw_["hidden_states"]).shape[1]),
        with_kwargs=True)
    ref = run(model, kw)
    handle = attnpatch.patch(model, backend=backend, inner="math", **options)
    hooked = _hook_count(model) - hooks_before - 1
    out = run(model, kw)
    seen.remove()
    ran = sorted({b for r in handle.report() for b in r.backends})
    handle.unpatch()
    after = run(model, kw)
    return dict(error=rel_error(out, ref), shape_ok=out.shape == ref.shape, hooked=hooked,
                lengths=lengths,
                ran=ran, left=no_attnpatch_state(model),
                hooks_left=_hook_count(model) - hooks_before, restored=torch.equal(after, ref))


FORWARD_2 = [("flux", "ring", {}), ("sd3", "ring", {}), ("wan", "ring", {}),
             ("sd15", "ring", {}), ("sdxl", "ring", {}), ("flux", "ulysses", {}),
             ("sd3", "ulysses", {}), ("qwenimage", "ring", {}), ("flux2", "ulysses", {})]
FORWARD_4 = [("wan", "usp", {"ring_degree": 2, "ulysses_degree": 2}),
             ("flux", "ring", {})]


def _lora_grads(name: str, checkpointing: bool) -> dict[str, torch.Tensor]:
    """One LoRA training step's gradients on a seeded tiny model, on this process (patched
    or not, whatever the caller set up)."""
    from peft import LoraConfig

    model, kw = MODELS[name]()
    seeded(model)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():  # nonzero B matrices: every LoRA weight gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    model.train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model, kw


def _step(model, kw) -> dict[str, torch.Tensor]:
    out = output_of(model(**kw))
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    loss = ((out.float() - target) ** 2).mean()
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


LORA = [("flux", "ring", False), ("flux", "ring", True), ("sd15", "ring", True),
        ("sd3", "ulysses", False)]


def _lora_case(name: str, backend: str, checkpointing: bool) -> dict:
    """Single-process LoRA gradients vs this rank's under ``backend``, averaged over the ranks
    (what DDP's all-reduce does); with DDP itself too for the first case."""
    import torch.distributed as dist

    model, kw = _lora_grads(name, checkpointing)
    ref = _step(model, kw)
    model, kw = _lora_grads(name, checkpointing)
    with attnpatch.patch(model, backend=backend, inner="math"):
        grads = _step(model, kw)
    errors = []
    for n, g in grads.items():
        dist.all_reduce(g)
        g /= dist.get_world_size()
        errors.append(rel_error(g, ref[n]))
    return dict(count=len(grads), same_names=sorted(grads) == sorted(ref), error=max(errors))


def _ddp_case() -> dict:
    """The tiny Flux under ``ring`` wrapped in torch's DDP (as ``accelerator.prepare`` does):
    its averaged gradients are the single-process ones."""
    from torch.nn.parallel import DistributedDataParallel

    model, kw = _lora_grads("flux", False)
    ref = _step(model, kw)
    model, kw = _lora_grads("flux", False)
    with attnpatch.patch(model, backend="ring", inner="math"):
        ddp = DistributedDataParallel(model)
        out = output_of(ddp(**kw))
        target = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        ((out.float() - target) ** 2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return dict(error=max(rel_error(g, ref[n]) for n, g in grads.items()))


def _refusals() -> dict:
    """A denoiser without a plan and a bad usp degree are refused at patch time, nothing
    changed; a VAE gets no hooks."""
    from diffusers import UNet2DModel

    from ..tiny_models import vae

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)
    messages = {}
    for key, (model, backend, options) in {
            "unet2d": (unet, "ring", {}),
            "usp": (flux()[0], "usp", {"ring_degree": 3})}.items():
        try:
            attnpatch.patch(model, backend=backend, **options)
            messages[key] = None
        except AttnPatchError as err:
            messages[key] = str(err)
        messages[key + "_left"] = no_attnpatch_state(model)
    autoencoder, _ = vae()
    with attnpatch.patch(autoencoder, backend="sdpa"):
        layout_only = _hook_count(autoencoder)
    with attnpatch.patch(autoencoder, backend="ring"):
        messages["vae_hooks"] = _hook_count(autoencoder) - layout_only
    return messages


def _pipeline_case(name: str) -> dict:
    """``patch(pipe, backend="ring")`` on a whole tiny pipeline: the denoiser runs ring, the
    text encoder (causal CLIP) and the VAE stay on auto; the images equal one process's."""
    from ..tiny_models import flux_pipeline, run_pipe, sd_pipeline

    pipe, kw = {"flux": flux_pipeline, "sd": sd_pipeline}[name]()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            seeded(component, 3)
    ref = run_pipe(pipe, kw)
    with attnpatch.patch(pipe, backend="ring", inner="math") as handle:
        out = run_pipe(pipe, kw)
        ran = {r.name.split(".")[0]: sorted(r.backends) for r in handle.report()}
    return dict(error=rel_error(out, ref), ran=ran, left=no_attnpatch_state(pipe))


def _lora_into_parallel_pipeline() -> dict:
    """``pipe.load_lora_weights`` into a pipeline already patched with ``ring``: the images
    equal the unpatched pipeline's with the same LoRA (the hooks touch no weight)."""
    import tempfile

    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from ..tiny_models import flux_pipeline, run_pipe

    donor, _ = flux_pipeline()
    donor.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                             target_modules=["to_q", "to_k", "to_v"]))
    with torch.no_grad():
        for n, p in donor.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n)))
    images = []
    with tempfile.TemporaryDirectory() as path:
        FluxPipeline.save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(
            donor.transformer), safe_serialization=True)
        for parallel in (False, True):
            pipe, kw = flux_pipeline()
            handle = attnpatch.patch(pipe, backend="ring", inner="math") if parallel else None
            pipe.load_lora_weights(path, weight_name="pytorch_lora_weights.safetensors")
            images.append(run_pipe(pipe, kw))
            if handle is not None:
                handle.unpatch()
    plain, _ = flux_pipeline()
    return dict(error=rel_error(images[1], images[0]),
                changed=rel_error(run_pipe(plain, kw), images[0]))


def _worker_2(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    return dict(forward={f"{n}-{b}": _forward_case(n, b, o) for n, b, o in FORWARD_2},
                pipelines={n: _pipeline_case(n) for n in ("flux", "sd")},
                lora_loaded=_lora_into_parallel_pipeline(),
                lora={f"{n}-{b}-{'ckpt' if c else 'plain'}": _lora_case(n, b, c)
                      for n, b, c in LORA},
                ddp=_ddp_case(), refusals=_refusals())


def _worker_4(rank: int, world: int) -> dict:
    return {f"{n}-{b}": _forward_case(n, b, o) for n, b, o in FORWARD_4}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(_worker_2, 2, tmp_path_factory.mktemp("cp2"), timeout=240)


@pytest.mark.parametrize("case", [f"{n}-{b}" for n, b, _ in FORWARD_2])
def test_forward_on_2_ranks_equals_one_process_and_unpatch_removes_everything(two_ranks, case):
    for rank, result in enumerate(two_ranks):
        r = result["forward"][case]
        assert r["shape_ok"] and r["error"] <= TOL, (rank, r)
        assert r["hooked"] > 2, (rank, r)  # the layout hooks and the plan's
        whole, shard = r["lengths"]  # the first attention's tokens: this rank's share
        assert shard == len(torch.arange(whole).tensor_split(2)[rank]), (rank, r)
        assert r["ran"] == [case.split("-")[1]], (rank, r)
        assert r["left"] == [] and r["hooks_left"] == 0 and r["restored"], (rank, r)


@pytest.mark.parametrize("name", ["flux", "sd"])
def test_patching_a_pipeline_shards_only_its_denoiser(two_ranks, name):
    for rank, result in enumerate(two_ranks):
        r = result["pipelines"][name]
        assert r["error"] <= TOL and r["left"] == [], (rank, r)
        denoiser = "transformer" if name == "flux" else "unet"
        assert r["ran"].pop(denoiser) == ["ring"], (rank, r)
        assert r["ran"] and "ring" not in {b for v in r["ran"].values() for b in v}, (rank, r)


def test_lora_loads_into_a_ring_patched_pipeline(two_ranks):
    for rank, result in enumerate(two_ranks):
        r = result["lora_loaded"]
        assert r["error"] <= TOL and r["changed"] > 1e-3, (rank, r)


@pytest.mark.parametrize("case", [f"{n}-{b}-{'ckpt' if c else 'plain'}" for n, b, c in LORA])
def test_lora_step_on_2_ranks_gives_the_single_process_gradients(two_ranks, case):
    for rank, result in enumerate(two_ranks):
        r = result["lora"][case]
        assert r["same_names"] and r["count"] > 0 and r["error"] <= TOL, (rank, r)


def test_ddp_over_a_ring_patched_model_gives_the_single_process_gradients(two_ranks):
    for rank, result in enumerate(two_ranks):
        assert result["ddp"]["error"] <= TOL, (rank, result["ddp"])


def test_refusals_name_the_model_and_leave_nothing(two_ranks):
    r = two_ranks[0]["refusals"]
    assert "UNet2DModel has no context-parallel plan" in r["unet2d"], r
    assert "ring_degree=3" in r["usp"] and "2 ranks" in r["usp"], r
    assert r["unet2d_left"] == [] and r["usp_left"] == [], r
    assert r["vae_hooks"] == 0, r


def test_forward_on_4_ranks_usp_and_ring(tmp_path_factory):
    results = run_ranks(_worker_4, 4, tmp_path_factory.mktemp("cp4"), timeout=240)
    for rank, result in enumerate(results):
        for case, r in result.items():
            assert r["shape_ok"] and r["error"] <= TOL, (rank, case, r)
            assert r["left"] == [] and r["hooks_left"] == 0 and r["restored"], (rank, case, r)


def test_patch_without_a_process_group_is_refused_with_nothing_changed():
    model, _ = flux()
    with pytest.raises(AttnPatchError, match="torch.distributed is not initialized"):
        attnpatch.patch(model, backend="ring")
    assert no_attnpatch_state(model) == []


def test_accelerate_launch_runs_the_tiny_flux_under_ring(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` works on a CPU machine: the script's
    ``PartialState(cpu=True)`` sets up gloo, which the ring uses as its default group."""
    import json
    import os
    import shutil
    import socket
    import subprocess
    import sys
    from pathlib import Path

    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    root = Path(__file__).resolve().parents[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
         str(root / "tests" / "strategies" / "accelerate_ring_flux.py"), str(out)],
        cwd=root, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["backend"] == "gloo", result
    assert max(result["errors"]) <= TOL, result


@pytest.mark.parametrize("processes", [1, 2])
def test_benchmark_quick_runs_every_variant(tmp_path, processes):
    """``benchmarks/context_parallel.py --quick``: one process (its own group of one) and two
    under ``accelerate launch``; every attnpatch variant equals the single-process forward,
    diffusers' rows say why they can't run on CPU."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "cp.json"
    script = [str(root / "benchmarks" / "context_parallel.py"), "--quick", "--configs",
              "flux_tiny", "--repeats", "2", "--warmup", "1", "--out", str(out)]
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", *script]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert result["processes"] == processes and list(rows) == [
        "single", "ring", "ulysses", "usp", "diffusers_ring", "diffusers_ulysses"]
    for name in ("ring", "ulysses", "usp"):
        assert rows[name]["rel_error_vs_single"] <= TOL and rows[name]["ms"] > 0, rows[name]
    assert all("error" in rows[d] for d in ("diffusers_ring", "diffusers_ulysses"))
