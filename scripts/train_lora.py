#!/usr/bin/env python
"""LoRA fine-tuning of a diffusers denoiser (SD 1.5/2.x or SDXL UNet, Flux, SD3 transformer) with
peft and accelerate, its attention run by any attnpatch backend.

    accelerate launch scripts/train_lora.py \\
        --pretrained_model_name_or_path PATH --train_data_dir DATA --output_dir OUT \\
        --resolution 1024 --train_batch_size 1 --learning_rate 1e-4 --rank 16 \\
        --max_train_steps 1000 --mixed_precision bf16 --gradient_checkpointing \\
        --checkpointing_steps 250 --attention_backend sdpa

Flags follow diffusers' own LoRA scripts (``examples/dreambooth/train_dreambooth_lora*.py``,
``examples/text_to_image/train_text_to_image_lora.py``). ``--train_data_dir`` is an imagefolder:
images plus a ``metadata.jsonl`` with one ``{"file_name": "0001.png", "text": "a caption"}``
per line (or ``--instance_prompt`` as the caption of every image). ``--attention_backend`` is
any attnpatch backend (``none``: the model's own attention), ``--attention_backend_option
key=value`` passes options to it.

Checkpoints: ``--output_dir/checkpoint-<step>`` via ``accelerator.save_state`` (the LoRA weights in
diffusers' format, optimizer, lr scheduler, loss history); ``--resume_from_checkpoint latest``
(or a path) continues at that step with the same data order and noise. The final LoRA goes to
``--output_dir/pytorch_lora_weights.safetensors``: ``pipe.load_lora_weights(output_dir)`` loads
it. Data parallel over GPUs with ``accelerate launch --multi_gpu --num_processes N``; with a
context-parallel backend (``--attention_backend ring``, ``ulysses``, ``usp``) the processes
share each sample's sequence instead: every process gets the same batches and noise, and DDP's
averaged gradients equal the single-process ones.

Bad input (missing model folder, not a diffusers model, a dataset without images or captions,
an unknown backend or option) exits with code 2 and a one-line error before anything is
written; checkpoints and the final weights are written into temporary folders and renamed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import sys
import time

from attnpatch import scripting
from attnpatch.pipelines import FAMILIES, denoiser_components, family_of
from attnpatch.scripting import ScriptError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
#: the families this script trains (names of attnpatch.pipelines.FAMILIES; also --tiny kinds)
TRAINED = ("sd", "sdxl", "flux", "sd3")
LORA_FILE = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes
CAPTIONS_HINT = 'a metadata.jsonl with one {"file_name": "0001.png", "text": "a caption"} per line'


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="local diffusers model folder (with model_index.json)")
    p.add_argument("--tiny", nargs="?", const="sd", choices=TRAINED, default=None,
                   help="train a built-in tiny random-weight pipeline instead (CPU tests, demos)")
    p.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    p.add_argument("--train_data_dir", "--instance_data_dir", dest="train_data_dir",
                   default=None, help=f"folder of training images with {CAPTIONS_HINT}")
    p.add_argument("--caption_column", default="text", help="caption key in metadata.jsonl")
    p.add_argument("--instance_prompt", default=None,
                   help="caption for images without one (all of them if there is no metadata)")
    p.add_argument("--output_dir", default="lora-output")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--center_crop", action="store_true",
                   help="center crop (default: random crop)")
    p.add_argument("--random_flip", action="store_true")
    p.add_argument("--train_batch_size", type=int, default=1, help="per device")
    p.add_argument("--num_train_epochs", type=int, default=1)
    p.add_argument("--max_train_steps", type=int, default=None,
                   help="overrides --num_train_epochs")
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' or a checkpoint-<step> folder")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--scale_lr", action="store_true",
                   help="scale lr by batch size x accumulation x processes")
    p.add_argument("--lr_scheduler", default="constant",
                   help="linear, cosine, cosine_with_restarts, polynomial, constant, "
                        "constant_with_warmup")
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--lr_num_cycles", type=int, default=1)
    p.add_argument("--lr_power", type=float, default=1.0)
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_weight_decay", type=float, default=1e-4)
    p.add_argument("--adam_epsilon", type=float, default=1e-8)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--lora_alpha", type=float, default=None, help="default: --rank")
    p.add_argument("--lora_dropout", type=float, default=0.0)
    p.add_argument("--lora_layers", default=None,
                   help="comma-separated module names to adapt (default: to_k,to_q,to_v,to_out.0)")
    p.add_argument("--mixed_precision", default=None, choices=("no", "fp16", "bf16"))
    p.add_argument("--allow_tf32", action="store_true")
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    p.add_argument("--prediction_type", default=None,
                   help="UNet models: epsilon or v_prediction (default: the scheduler's)")
    p.add_argument("--noise_offset", type=float, default=0.0)
    p.add_argument("--weighting_scheme", default="none",
                   choices=("sigma_sqrt", "logit_normal", "mode", "cosmap", "none"),
                   help="flow-matching models (Flux, SD3)")
    p.add_argument("--logit_mean", type=float, default=0.0)
    p.add_argument("--logit_std", type=float, default=1.0)
    p.add_argument("--mode_scale", type=float, default=1.29)
    p.add_argument("--guidance_scale", type=float, default=3.5,
                   help="Flux models with guidance embeddings")
    p.add_argument("--precondition_outputs", type=int, default=1,
                   help="SD3: precondition the model outputs (as diffusers' script)")
    p.add_argument("--max_sequence_length", type=int, default=None,
                   help="T5 tokens (Flux: 512, SD3: 77 by default)")
    p.add_argument("--report_to", default=None,
                   help="tensorboard, wandb, ... (an accelerate tracker; default: none). The loss "
                        "per step always goes to --output_dir/train_log.json")
    p.add_argument("--logging_dir", default="logs", help="tracker folder inside --output_dir")
    p.add_argument("--cpu", action="store_true", help="train on CPU even if CUDA is available")
    scripting.add_backend_arguments(
        p, names=("--attention_backend", "--backend"),
        option_names=("--attention_backend_option", "--backend-option"), default="auto",
        help_extra=", or 'none' for diffusers' own processors")
    args = p.parse_args(argv)
    if args.lora_alpha is None:
        args.lora_alpha = args.rank
    return args


# --- input checks (before anything is loaded or written) ---------------------------------------

def read_examples(data_dir, caption_column: str, instance_prompt) -> list[tuple[str, str]]:
    """(image path, caption) pairs from an imagefolder; :class:`ScriptError` when unusable."""
    if data_dir is None:
        raise ScriptError(f"no --train_data_dir given; pass a folder of images with "
                          f"{CAPTIONS_HINT}")
    root = pathlib.Path(data_dir)
    if not root.is_dir():
        raise ScriptError(f"--train_data_dir {str(data_dir)!r} does not exist or is not a "
                          f"folder; pass a folder of images with {CAPTIONS_HINT}")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not images:
        raise ScriptError(f"--train_data_dir {str(data_dir)!r} has no images "
                          f"({'/'.join(sorted(IMAGE_EXTS))}); put the training images there "
                          f"with {CAPTIONS_HINT}")
    captions: dict[pathlib.Path, str] = {}
    meta = root / "metadata.jsonl"
    if meta.is_file():
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                name = entry["file_name"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ScriptError(f"{meta} line {n} is not a JSON object with a file_name; "
                                  f"write {CAPTIONS_HINT}") from None
            path = (root / name).resolve()
            if not path.is_file():
                raise ScriptError(f"{meta} line {n}: image {name!r} does not exist in "
                                  f"--train_data_dir; fix the file_name or add the image")
            caption = entry.get(caption_column)
            if not isinstance(caption, str) or not caption.strip():
                if instance_prompt is None:
                    raise ScriptError(f"{meta} line {n} has no {caption_column!r} caption; add "
                                      f"one, set --caption_column, or pass --instance_prompt")
                caption = instance_prompt
            captions[path] = caption
    elif instance_prompt is None:
        raise ScriptError(f"--train_data_dir {str(data_dir)!r} has no metadata.jsonl with "
                          f"captions; add {CAPTIONS_HINT}, or pass --instance_prompt to use one "
                          "caption for every image")
    examples, missing = [], []
    for path in images:
        caption = captions.get(path.resolve(), instance_prompt)
        if caption is None:
            missing.append(path.name)
        else:
            examples.append((str(path), caption))
    if missing:
        raise ScriptError(f"{len(missing)} image(s) have no caption in metadata.jsonl (e.g. "
                          f"{missing[0]!r}); add a line for each or pass --instance_prompt")
    return examples


def check_inputs(args):
    examples = read_examples(args.train_data_dir, args.caption_column, args.instance_prompt)
    options = scripting.parse_options(args.backend_options, flag="--attention_backend_option")
    if args.backend.lower() not in ("none", "default", "off"):
        import torch

        scripting.start_processes(args.backend, cpu=args.cpu or not torch.cuda.is_available())
    backend = scripting.check_backend(args.backend, options, allow_none=True)
    if args.tiny is None:
        if args.pretrained_model_name_or_path is None:
            raise ScriptError("no model given; pass --pretrained_model_name_or_path PATH (a local "
                              "diffusers model folder) or --tiny sd|sdxl|flux|sd3")
        scripting.check_model_folder(args.pretrained_model_name_or_path,
                                     "--pretrained_model_name_or_path")
    out = pathlib.Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ScriptError(f"--output_dir {args.output_dir!r} exists and is not a folder")
    for flag in ("resolution", "train_batch_size", "rank", "gradient_accumulation_steps",
                 "checkpointing_steps"):
        if getattr(args, flag) < 1:
            raise ScriptError(f"--{flag} {getattr(args, flag)}: use 1 or more")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ScriptError(f"--max_train_steps {args.max_train_steps}: use 1 or more")
    if args.resolution % 16:
        raise ScriptError(f"--resolution {args.resolution}: use a multiple of 16")
    if args.report_to and args.report_to != "none":
        import importlib.util

        for tracker in args.report_to.split(","):
            module = {"tensorboard": "tensorboard"}.get(tracker.strip(), tracker.strip())
            if module != "all" and importlib.util.find_spec(module.replace("-", "_")) is None:
                raise ScriptError(f"--report_to {tracker}: {module} is not installed (pip "
                                  f"install {module}); or drop --report_to")
    resume = None
    if args.resume_from_checkpoint:
        resume = find_checkpoint(args.resume_from_checkpoint, out)
    return examples, backend, options, resume


def find_checkpoint(spec: str, out: pathlib.Path):
    """The checkpoint folder to resume from, None for 'latest' without any checkpoint."""
    if spec == "latest":
        found = sorted((p for p in out.glob("checkpoint-*") if p.is_dir() and
                        p.name.split("-", 1)[1].isdigit()),
                       key=lambda p: int(p.name.split("-", 1)[1])) if out.is_dir() else []
        return found[-1] if found else None
    path = pathlib.Path(spec)
    if not path.is_dir() and (out / spec).is_dir():
        path = out / spec
    if not path.is_dir():
        raise ScriptError(f"--resume_from_checkpoint {spec!r} does not exist; pass 'latest' or "
                          f"a checkpoint-<step> folder in --output_dir")
    if not path.name.startswith("checkpoint-") or not path.name.split("-", 1)[1].isdigit():
        raise ScriptError(f"--resume_from_checkpoint {spec!r} is not a checkpoint-<step> folder")
    return path


# --- data ----------------------------------------------------------------------------------------

class ImageCaptions:
    """Images resized and cropped to ``resolution`` in [-1, 1]; augmentations seeded per
    (seed, epoch, index) so a resumed run sees the same data."""

    def __init__(self, examples, resolution: int, center_crop: bool, random_flip: bool,
                 seed: int):
        self.examples = examples
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        import random

        import numpy as np
        import torch
        from PIL import Image, ImageOps

        path, caption = self.examples[index]
        rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
        with Image.open(path) as im:
            image = ImageOps.exif_transpose(im).convert("RGB")
        r = self.resolution
        scale = r / min(image.size)
        size = (max(r, round(image.width * scale)), max(r, round(image.height * scale)))
        image = image.resize(size, Image.BILINEAR)
        if self.center_crop:
            left, top = (image.width - r) // 2, (image.height - r) // 2
        else:
            left, top = rng.randint(0, image.width - r), rng.randint(0, image.height - r)
        image = image.crop((left, top, left + r, top + r))
        if self.random_flip and rng.random() < 0.5:
            image = ImageOps.mirror(image)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        return {"pixel_values": pixels.permute(2, 0, 1).contiguous(), "caption": caption}


def collate(examples):
    import torch

    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "captions": [e["caption"] for e in examples]}


class EpochShuffle:
    """A sampler whose order depends only on (seed, epoch): resumable without saved state."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        import torch

        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


# --- model families -------------------------------------------------------------------------------

def detect_family(pipe) -> str:
    """The pipeline's model family (one of :data:`TRAINED`), from attnpatch's family table."""
    family = family_of(pipe)
    if family is None or family.name not in TRAINED:
        denoisers = ", ".join(type(m).__name__ for _, m in denoiser_components(pipe)) or "none"
        raise ScriptError(f"{type(pipe).__name__} (denoiser {denoisers}) is not supported by "
                          "train_lora.py; it trains SD 1.5/2.x and SDXL UNets, Flux and SD3; use "
                          "one of those models")
    return family.name


def denoiser_attr(family: str) -> str:
    """The pipeline attribute that holds the denoiser of ``family`` (``unet``, ``transformer``)."""
    return FAMILIES[family].components[0]


def encode_prompts(family: str, pipe, captions, device, args) -> dict:
    """Frozen text encoders -> the denoiser's conditioning, with the pipeline's own encoder."""
    import torch

    with torch.no_grad():
        if family == "sd":
            embeds, _ = pipe.encode_prompt(captions, device, 1, False)
            return {"encoder_hidden_states": embeds}
        if family == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=captions, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=False)
            r = args.resolution
            time_ids = torch.tensor([[r, r, 0, 0, r, r]], device=device, dtype=embeds.dtype)
            return {"encoder_hidden_states": embeds,
                    "added_cond_kwargs": {"text_embeds": pooled,
                                          "time_ids": time_ids.repeat(len(captions), 1)}}
        if family == "flux":
            embeds, pooled, text_ids = pipe.encode_prompt(
                prompt=captions, prompt_2=None, device=device, num_images_per_prompt=1,
                max_sequence_length=args.max_sequence_length or 512)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled,
                    "txt_ids": text_ids}
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=captions, prompt_2=None, prompt_3=None, device=device,
            num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=args.max_sequence_length or 77)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


class Objective:
    """Noise, timesteps and the loss of one family, as in diffusers' training scripts."""

    def __init__(self, family: str, pipe, args):
        self.family, self.args = family, args
        self.vae_config = pipe.vae.config
        self.vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        if family in ("sd", "sdxl"):
            from diffusers import DDPMScheduler

            self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
            if args.prediction_type is not None:
                self.scheduler.register_to_config(prediction_type=args.prediction_type)
        else:
            from diffusers import FlowMatchEulerDiscreteScheduler

            self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.pipeline_cls = type(pipe)

    def latents(self, vae, pixels, gen):
        import torch

        with torch.no_grad():
            lat = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator=gen)
        shift = getattr(self.vae_config, "shift_factor", None) or 0.0
        return (lat - shift) * self.vae_config.scaling_factor

    def loss(self, denoiser, latents, cond, gen, dtype):
        import torch
        import torch.nn.functional as F

        bsz, dev = latents.shape[0], latents.device
        noise = torch.randn(latents.shape, generator=gen, device=dev, dtype=latents.dtype)
        if self.family in ("sd", "sdxl"):
            if self.args.noise_offset:
                noise = noise + self.args.noise_offset * torch.randn(
                    (bsz, latents.shape[1], 1, 1), generator=gen, device=dev, dtype=noise.dtype)
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (bsz,),
                              generator=gen, device=dev).long()
            noisy = self.scheduler.add_noise(latents, noise, t)
            pred_type = self.scheduler.config.prediction_type
            if pred_type == "epsilon":
                target = noise
            elif pred_type == "v_prediction":
                target = self.scheduler.get_velocity(latents, noise, t)
            else:
                raise ScriptError(f"prediction_type {pred_type!r} is not supported; pass "
                                  "--prediction_type epsilon or v_prediction")
            pred = denoiser(noisy.to(dtype), t, return_dict=False,
                            **_cast(cond, dtype))[0]
            return F.mse_loss(pred.float(), target.float(), reduction="mean")

        from diffusers.training_utils import (compute_density_for_timestep_sampling,
                                              compute_loss_weighting_for_sd3)

        a = self.args
        u = compute_density_for_timestep_sampling(
            weighting_scheme=a.weighting_scheme, batch_size=bsz, logit_mean=a.logit_mean,
            logit_std=a.logit_std, mode_scale=a.mode_scale, device="cpu",
            generator=torch.Generator().manual_seed(int(torch.randint(
                0, 2**31 - 1, (1,), generator=gen, device=dev).item())))
        sch = self.scheduler
        indices = (u * sch.config.num_train_timesteps).long().clamp_(
            0, len(sch.timesteps) - 1)
        timesteps = sch.timesteps[indices].to(dev)
        sigmas = sch.sigmas[indices].to(device=dev, dtype=latents.dtype)
        sigmas = sigmas.view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=a.weighting_scheme,
                                                   sigmas=sigmas)
        if self.family == "flux":
            from diffusers import FluxPipeline

            b, c, h, w = latents.shape
            packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
            img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, dev, dtype)
            guidance = None
            if getattr(_config(denoiser), "guidance_embeds", False):
                guidance = torch.full((b,), a.guidance_scale, device=dev, dtype=torch.float32)
            pred = denoiser(hidden_states=packed.to(dtype), timestep=(timesteps / 1000).to(dtype),
                            guidance=guidance, img_ids=img_ids, return_dict=False,
                            **_cast(cond, dtype))[0]
            pred = FluxPipeline._unpack_latents(pred, h * self.vae_scale, w * self.vae_scale,
                                                self.vae_scale)
            target = noise - latents
        else:  # sd3
            pred = denoiser(hidden_states=noisy.to(dtype), timestep=timesteps, return_dict=False,
                            **_cast(cond, dtype))[0]
            if a.precondition_outputs:
                pred = pred * (-sigmas) + noisy
                target = latents
            else:
                target = noise - latents
        per = (weighting.float() * (pred.float() - target.float()) ** 2).reshape(bsz, -1)
        return per.mean(1).mean()


def _move(model, device, dtype):
    """``model.to(device, dtype)``, skipping the dtype cast (and diffusers' warning about it)
    when the weights already have it."""
    current = next(model.parameters()).dtype
    return model.to(device) if current == dtype else model.to(device, dtype=dtype)


def _config(model):
    return getattr(getattr(model, "module", model), "config", None)


def _cast(cond: dict, dtype) -> dict:
    import torch

    out = {}
    for k, v in cond.items():
        if isinstance(v, dict):
            out[k] = _cast(v, dtype)
        elif isinstance(v, torch.Tensor) and v.is_floating_point() and k != "txt_ids":
            out[k] = v.to(dtype)
        else:
            out[k] = v
    return out


def lora_state(family: str, model) -> dict:
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    if family in ("sd", "sdxl"):
        from diffusers.utils import convert_state_dict_to_diffusers

        state = convert_state_dict_to_diffusers(state)
    return state


def save_lora(pipeline_cls, family: str, model, folder) -> None:
    import inspect

    attr = denoiser_attr(family)
    kwargs = {f"{attr}_lora_layers": lora_state(family, model)}
    params = inspect.signature(pipeline_cls.save_lora_weights).parameters
    if f"{attr}_lora_adapter_metadata" in params:
        kwargs[f"{attr}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    pipeline_cls.save_lora_weights(str(folder), safe_serialization=True, **kwargs)


def load_lora_into(pipeline_cls, family: str, model, folder) -> None:
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict

    attr = denoiser_attr(family)
    # named: older diffusers (0.37 at least) won't guess the file name under HF_HUB_OFFLINE
    loaded = pipeline_cls.lora_state_dict(str(folder), weight_name=LORA_FILE)
    state = loaded[0] if isinstance(loaded, tuple) else loaded
    state = {k[len(attr) + 1:]: v for k, v in state.items() if k.startswith(attr + ".")}
    state = convert_unet_state_dict_to_peft(state)
    result = set_peft_model_state_dict(model, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ScriptError(f"checkpoint {folder} does not match this model's LoRA layers "
                          f"(unexpected keys such as {unexpected[0]!r}); resume with the same "
                          "--rank and --lora_layers, or start a new --output_dir")


# --- training ------------------------------------------------------------------------------------

def load_pipeline(args, weight_dtype):
    if args.tiny:
        from attnpatch.tiny_pipelines import build_tiny_pipeline

        return build_tiny_pipeline(args.tiny, size="test", seed=0)
    kwargs = {"dtype": weight_dtype}
    if args.variant:
        kwargs["variant"] = args.variant
    return scripting.load_local_pipeline(args.pretrained_model_name_or_path,
                                         "--pretrained_model_name_or_path", **kwargs)


def main(argv=None) -> int:
    args = parse_args(argv)
    return scripting.run_script(lambda: run(args))


def run(args) -> int:
    examples, backend, options, resume = check_inputs(args)

    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from tqdm.auto import tqdm

    import attnpatch

    from accelerate.utils import ProjectConfiguration

    report_to = None if args.report_to in (None, "none") else args.report_to
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision,
                              cpu=args.cpu or not torch.cuda.is_available(),
                              log_with=report_to.split(",") if report_to else None,
                              project_config=ProjectConfiguration(
                                  project_dir=args.output_dir,
                                  logging_dir=str(pathlib.Path(args.output_dir)
                                                  / args.logging_dir)) if report_to else None)
    main_proc = accelerator.is_main_process
    # context parallelism: every process trains on the same batch and noise, each a share of
    # its sequence; DDP (accelerator.prepare) averages the gradients, which are then exactly
    # the single-process ones. Otherwise data parallel: each process its share of the data.
    together = scripting.spans_processes(backend)
    data_procs = 1 if together else accelerator.num_processes
    seed = 0 if args.seed is None else args.seed
    set_seed(seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32)

    pipe = load_pipeline(args, weight_dtype)
    family = detect_family(pipe)
    attr = denoiser_attr(family)
    denoiser = getattr(pipe, attr)
    device = accelerator.device
    _move(pipe.vae, device, torch.float32)  # encode in fp32: fp16 VAEs overflow
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        enc = getattr(pipe, name, None)
        if enc is not None:
            _move(enc, device, weight_dtype).requires_grad_(False)
    pipe.vae.requires_grad_(False)
    denoiser.requires_grad_(False)
    _move(denoiser, device, weight_dtype)
    objective = Objective(family, pipe, args)

    targets = ([m.strip() for m in args.lora_layers.split(",") if m.strip()]
               if args.lora_layers else ["to_k", "to_q", "to_v", "to_out.0"])
    try:
        denoiser.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha,
                                        lora_dropout=args.lora_dropout,
                                        init_lora_weights="gaussian", target_modules=targets))
    except ValueError as err:
        raise ScriptError(f"--lora_layers {','.join(targets)}: {scripting.one_line(err)[:200]}; "
                          "name Linear modules of the denoiser (e.g. to_q,to_k,to_v,to_out.0)"
                          ) from None
    cast_training_params(denoiser, dtype=torch.float32)
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    handle = None
    if backend != "none":
        handle = attnpatch.patch(denoiser, backend=backend, **options)

    def unwrap(model):
        model = accelerator.unwrap_model(model)
        return getattr(model, "_orig_mod", model)

    def save_hook(models, weights, output_dir):
        for model in models:
            if main_proc:
                save_lora(objective.pipeline_cls, family, unwrap(model), output_dir)
            if weights:
                weights.pop()

    def load_hook(models, input_dir):
        while models:
            load_lora_into(objective.pipeline_cls, family, unwrap(models.pop()), input_dir)
        cast_training_params(denoiser, dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    if args.scale_lr:
        args.learning_rate *= (args.gradient_accumulation_steps * args.train_batch_size
                               * data_procs)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    dataset = ImageCaptions(examples, args.resolution, args.center_crop, args.random_flip, seed)
    sampler = EpochShuffle(len(dataset), seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size,
                                         sampler=sampler, collate_fn=collate,
                                         num_workers=args.dataloader_num_workers, drop_last=False)
    steps_per_epoch = math.ceil(math.ceil(len(dataset) / (args.train_batch_size * data_procs))
                                / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    if together:  # the same batches on every process: the loader is not split
        denoiser, optimizer, lr_scheduler = accelerator.prepare(denoiser, optimizer,
                                                                lr_scheduler)
    else:
        denoiser, optimizer, loader, lr_scheduler = accelerator.prepare(
            denoiser, optimizer, loader, lr_scheduler)
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    epochs = math.ceil(max_steps / steps_per_epoch)

    out = pathlib.Path(args.output_dir)
    global_step, history = 0, []
    if args.resume_from_checkpoint and resume is None and main_proc:
        print(f"no checkpoint in {out}; starting a new training run")
    if resume is not None:
        accelerator.load_state(str(resume))
        global_step = int(resume.name.split("-", 1)[1])
        log = resume / "train_log.json"
        if log.is_file():
            history = [h for h in json.loads(log.read_text())["history"]
                       if h["step"] <= global_step]
        if main_proc:
            print(f"resuming from {resume} at step {global_step}")
    first_epoch = global_step // steps_per_epoch
    skip = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    if main_proc:
        print(f"training {family} LoRA (rank {args.rank}) on {len(dataset)} images: {max_steps} "
              f"steps, batch {args.train_batch_size} x {args.gradient_accumulation_steps} accum x "
              f"{accelerator.num_processes} process(es), attention: {backend}"
              f"{' ' + json.dumps(options) if options else ''}")
    if report_to:
        accelerator.init_trackers("attnpatch-train-lora", config={  # trackers take scalars
            k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in vars(args).items()})
    bar = tqdm(total=max_steps, initial=global_step, desc="steps", disable=not main_proc)
    denoiser.train()
    micro = global_step * args.gradient_accumulation_steps
    losses, t_start = [], time.perf_counter()

    def checkpoint(step: int):
        final = out / f"checkpoint-{step}"
        tmp = out / f".checkpoint-{step}.partial"
        if main_proc:
            out.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main_proc:
            (tmp / "train_log.json").write_text(json.dumps(
                {"history": history, "args": _jsonable(vars(args))}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            prune_checkpoints(out, args.checkpoints_total_limit)
        accelerator.wait_for_everyone()

    try:
        for epoch in range(first_epoch, epochs):
            dataset.epoch = epoch
            batches = loader
            if epoch == first_epoch and skip:
                batches = accelerator.skip_first_batches(loader, skip)
            # accelerate's loaders set their sampler's epoch from their own iteration count on
            # every pass; set it explicitly so that a resumed run sees the same order
            if hasattr(batches, "set_epoch"):
                batches.set_epoch(epoch)
            sampler.set_epoch(epoch)
            for batch in batches:
                gen = torch.Generator(device=device).manual_seed(
                    seed * 1_000_003 + micro * 1_009
                    + (0 if together else accelerator.process_index))
                micro += 1
                with accelerator.accumulate(denoiser):
                    pixels = batch["pixel_values"].to(device)
                    latents = objective.latents(pipe.vae, pixels, gen).to(weight_dtype)
                    cond = encode_prompts(family, pipe, batch["captions"], device, args)
                    loss = objective.loss(denoiser, latents, cond, gen, weight_dtype)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                losses.append(accelerator.gather(loss.detach().reshape(1)).mean().item())
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                step_loss = sum(losses) / len(losses)
                losses = []
                if not math.isfinite(step_loss):
                    raise ScriptError(f"loss is {step_loss} at step {global_step}; lower "
                                      "--learning_rate or use --mixed_precision bf16")
                history.append({"step": global_step, "loss": step_loss,
                                "lr": lr_scheduler.get_last_lr()[0]})
                if report_to:
                    accelerator.log({"loss": step_loss, "lr": history[-1]["lr"]},
                                    step=global_step)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}",
                                refresh=False)
                bar.update(1)
                if global_step % args.checkpointing_steps == 0:
                    checkpoint(global_step)
                if global_step >= max_steps:
                    break
            if global_step >= max_steps:
                break
    except attnpatch.AttnPatchError as err:
        raise ScriptError(f"attention backend {backend!r} failed in training: "
                          f"{scripting.one_line(err)}; pick another --attention_backend "
                          "(`attnpatch backends`) or change its --attention_backend_option"
                          ) from None
    except (TypeError, ValueError) as err:
        if not options or global_step > 0:
            raise
        raise ScriptError(f"attention backend {backend!r} failed with options {options}: "
                          f"{scripting.one_line(err)[:300]}; check the "
                          "--attention_backend_option values") from None
    finally:
        bar.close()

    accelerator.wait_for_everyone()
    if main_proc:
        model = unwrap(denoiser)
        with scripting.staged_output(out) as stage:
            save_lora(objective.pipeline_cls, family, model, stage)
            (stage / "train_log.json").write_text(json.dumps(
                {"family": family, "steps": global_step, "backend": backend,
                 "options": _jsonable(options), "seconds": round(time.perf_counter() - t_start, 2),
                 "history": history, "args": _jsonable(vars(args))}, indent=1))
        print(f"saved LoRA weights to {out}/pytorch_lora_weights.safetensors "
              f"(load with pipe.load_lora_weights({str(out)!r})); "
              f"final loss {history[-1]['loss']:.4f}" if history else f"saved LoRA to {out}")
        if handle is not None:
            ran = sorted({b for r in handle.report() for b in r.backends})
            print(f"attention ran on: {', '.join(ran) or '-'} "
                  f"({len(handle.report().routed)} modules routed)")
    accelerator.wait_for_everyone()
    if handle is not None:  # hooks and processors released before the process group goes
        handle.unpatch()
    accelerator.end_training()
    return 0


def prune_checkpoints(out: pathlib.Path, limit) -> None:
    if not limit:
        return
    found = sorted((p for p in out.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()),
                   key=lambda p: int(p.name.split("-", 1)[1]))
    for old in found[:-limit]:
        shutil.rmtree(old, ignore_errors=True)


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else str(v))
            for k, v in d.items()}


if __name__ == "__main__":
    sys.exit(main())
