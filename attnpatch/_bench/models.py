"""Random-weight denoisers (Flux transformer, SDXL UNet) and their inputs, built from configs
(nothing downloaded); shared by ``attnpatch bench`` and ``benchmarks/overhead.py``."""

from __future__ import annotations

from typing import Any

import torch


def build(cls, device, dtype, **config):
    """Random weights created directly on ``device`` in ``dtype`` (a 12B model would need 48 GB
    of fp32 host memory and minutes of CPU init otherwise)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


def _rnd(device, dtype):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    return rnd


def flux_kwargs(cfg: Any, h: int, w: int, text: int, device, dtype) -> dict:
    """Inputs of a ``FluxTransformer2DModel`` with config ``cfg``: an ``h`` x ``w`` latent grid
    and ``text`` prompt tokens, batch 1, seeded."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    rnd = _rnd(device, dtype)
    return dict(hidden_states=rnd(1, h * w, cfg.in_channels),
                encoder_hidden_states=rnd(1, text, cfg.joint_attention_dim),
                pooled_projections=rnd(1, cfg.pooled_projection_dim),
                timestep=torch.tensor([0.5], device=device, dtype=dtype),
                img_ids=ids.reshape(-1, 3).to(device), txt_ids=torch.zeros(text, 3, device=device),
                guidance=torch.tensor([3.5], device=device, dtype=dtype)
                if cfg.guidance_embeds else None, return_dict=False)


def unet_kwargs(cfg: Any, batch: int, size: int, text: int, device, dtype) -> dict:
    """Inputs of a ``UNet2DConditionModel`` with config ``cfg``: ``batch`` latents of ``size``²
    and ``text`` prompt tokens (SDXL's ``text_time`` conditioning when the config has it)."""
    rnd = _rnd(device, dtype)
    kwargs = dict(sample=rnd(batch, cfg.in_channels, size, size),
                  timestep=torch.tensor([500] * batch, device=device),
                  encoder_hidden_states=rnd(batch, text, cfg.cross_attention_dim),
                  return_dict=False)
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": rnd(batch, pooled),
                                       "time_ids": rnd(batch, 6)}
    return kwargs


def flux_model(tiny: bool, device, dtype):
    """A Flux-dev-size transformer (tiny: 1 + 1 blocks, 2 heads of 16) and the inputs of a
    1024² image (4096 image + 512 text tokens; tiny: 16 + 7)."""
    from diffusers import FluxTransformer2DModel
    if tiny:
        config = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                      pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
        h = w = 4
        text = 7
    else:  # the default config is Flux-dev size (19 + 38 blocks, 24 heads x 128); dev has
        config = dict(guidance_embeds=True)  # guidance embeddings
        h = w = 64  # 1024 px / 8 (VAE) / 2 (2x2 packing) -> 4096 image tokens
        text = 512
    model = build(FluxTransformer2DModel, device, dtype, **config)
    return model, flux_kwargs(model.config, h, w, text, device, dtype)


def sdxl_model(tiny: bool, device, dtype):
    """An SDXL UNet (tiny: 2 levels of 16/32 channels) and the inputs of batch 2 at 1024²
    (128² latents; tiny: 16²)."""
    from diffusers import UNet2DConditionModel
    if tiny:
        config = dict(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 32), norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
            attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
            use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 16)
        size, text = 16, 7
    else:  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
        config = dict(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        size, text = 128, 77
    model = build(UNet2DConditionModel, device, dtype, **config)
    return model, unet_kwargs(model.config, 2, size, text, device, dtype)


MODELS = {"flux": (flux_model, torch.bfloat16), "sdxl": (sdxl_model, torch.float16)}


class ModelPathError(ValueError):
    """``--model PATH`` could not be loaded or benchmarked."""


def load_denoiser(path: str, device, dtype, tiny: bool):
    """The denoiser (``transformer`` or ``unet``) of the local diffusers pipeline at ``path``
    and inputs for one forward. Raises :class:`ModelPathError` (naming ``--model``)."""
    import os

    if not os.path.isdir(path):
        raise ModelPathError(f"--model {path!r}: no such folder (a local diffusers pipeline "
                             "folder with model_index.json; nothing is downloaded)")
    try:
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    except Exception as exc:
        raise ModelPathError(f"--model {path!r}: could not load a diffusers pipeline: "
                             f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    model = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if model is None:
        raise ModelPathError(f"--model {path!r}: the pipeline has no transformer or unet")
    model = model.to(device=device, dtype=dtype).eval()
    cls = type(model).__name__
    cfg = model.config
    if cls == "FluxTransformer2DModel":
        side = 4 if tiny else 64
        kwargs = flux_kwargs(cfg, side, side, 7 if tiny else 512, device, dtype)
    elif cls == "UNet2DConditionModel":
        kwargs = unet_kwargs(cfg, 1, 16 if tiny else cfg.sample_size, 7 if tiny else 77,
                             device, dtype)
    else:
        raise ModelPathError(f"--model {path!r}: no input builder for {cls} (the models "
                             "suite runs FluxTransformer2DModel and UNet2DConditionModel)")
    return model, kwargs
