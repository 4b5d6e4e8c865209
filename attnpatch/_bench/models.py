"""Random-weight denoisers (Flux transformer, SDXL UNet, SD3 transformer, Wan transformer) and
their inputs at two resolutions each, built from configs (nothing downloaded); shared by
``attnpatch bench`` and ``benchmarks/overhead.py``."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch

from .._errors import AttnPatchError


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


def sd3_kwargs(cfg: Any, batch: int, h: int, w: int, text: int, device, dtype) -> dict:
    """Inputs of an ``SD3Transformer2DModel`` with config ``cfg``: ``batch`` latents of
    ``h`` x ``w`` (pixels / 8) and ``text`` prompt tokens (CLIP + T5: 77 + 256 = 333)."""
    rnd = _rnd(device, dtype)
    return dict(hidden_states=rnd(batch, cfg.in_channels, h, w),
                encoder_hidden_states=rnd(batch, text, cfg.joint_attention_dim),
                pooled_projections=rnd(batch, cfg.pooled_projection_dim),
                timestep=torch.full((batch,), 500.0, device=device, dtype=dtype),
                return_dict=False)


def wan_kwargs(cfg: Any, batch: int, frames: int, h: int, w: int, text: int, device,
               dtype) -> dict:
    """Inputs of a ``WanTransformer3DModel`` with config ``cfg``: ``batch`` latent videos of
    ``frames`` x ``h`` x ``w`` (video frames (f - 1) / 4 + 1, pixels / 8) and ``text`` T5
    tokens."""
    rnd = _rnd(device, dtype)
    return dict(hidden_states=rnd(batch, cfg.in_channels, frames, h, w),
                encoder_hidden_states=rnd(batch, text, cfg.text_dim),
                timestep=torch.tensor([500] * batch, device=device),
                return_dict=False)


class ModelSpec(NamedTuple):
    """One entry of :data:`MODELS`: ``net(tiny, device, dtype)`` gives the model and
    ``inputs(cfg, res, tiny, device, dtype)`` the inputs of resolution ``res`` (None: the
    first), so a suite builds each model once for both resolutions; ``dtype`` on a GPU;
    resolution keys, full size and tiny."""
    net: Callable
    inputs: Callable
    dtype: torch.dtype
    resolutions: tuple
    tiny_resolutions: tuple

    def sizes(self, tiny: bool) -> tuple:
        return self.tiny_resolutions if tiny else self.resolutions

    def build(self, tiny: bool, device, dtype, res: Optional[str] = None) -> tuple:
        """The model and the inputs of ``res`` (default: the first resolution)."""
        model = self.net(tiny, device, dtype)
        return model, self.inputs(model.config, res, tiny, device, dtype)


# --- Flux ----------------------------------------------------------------------------------------

#: pixels per side -> latent tokens per side (8x VAE, 2x2 packing)
FLUX_RES = {"1024²": 1024, "1536²": 1536}
FLUX_TINY_RES = {"64²": 64, "96²": 96}


def flux_net(tiny: bool, device, dtype):
    """A Flux-dev-size transformer (tiny: 1 + 1 blocks, 2 heads of 16)."""
    from diffusers import FluxTransformer2DModel
    if tiny:
        config = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                      pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    else:  # the default config is Flux-dev size (19 + 38 blocks, 24 heads x 128); dev has
        config = dict(guidance_embeds=True)  # guidance embeddings
    return build(FluxTransformer2DModel, device, dtype, **config)


def flux_inputs(cfg, res: Optional[str], tiny: bool, device, dtype) -> dict:
    """1024²: 4096 image + 512 text tokens; 1536²: 9216 + 512; tiny 64²: 16 + 7, 96²: 36 + 7."""
    table = FLUX_TINY_RES if tiny else FLUX_RES
    side = table[res or next(iter(table))] // 16
    return flux_kwargs(cfg, side, side, 7 if tiny else 512, device, dtype)



# --- SDXL ----------------------------------------------------------------------------------------

SDXL_RES = {"1024²": 1024, "768²": 768}
SDXL_TINY_RES = {"128²": 128, "64²": 64}


def sdxl_net(tiny: bool, device, dtype):
    """An SDXL UNet (tiny: 2 levels of 16/32 channels)."""
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
    return build(UNet2DConditionModel, device, dtype, **config)


def sdxl_inputs(cfg, res: Optional[str], tiny: bool, device, dtype) -> dict:
    """Batch 2 (classifier-free guidance), latents of pixels / 8, 77 text tokens (tiny: 7)."""
    table = SDXL_TINY_RES if tiny else SDXL_RES
    return unet_kwargs(cfg, 2, table[res or next(iter(table))] // 8, 7 if tiny else 77,
                       device, dtype)



# --- SD3 -----------------------------------------------------------------------------------------

SD3_RES = {"1024²": 1024, "1536²": 1536}
SD3_TINY_RES = {"128²": 128, "64²": 64}


def sd3_net(tiny: bool, device, dtype):
    """An SD3-medium-size transformer (24 layers, 24 heads x 64; tiny: 2 layers, 2 heads of 8)."""
    from diffusers import SD3Transformer2DModel
    if tiny:
        config = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                      caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16)
    else:  # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
        config = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                      num_layers=24, attention_head_dim=64, num_attention_heads=24,
                      joint_attention_dim=4096, caption_projection_dim=1536,
                      pooled_projection_dim=2048, pos_embed_max_size=192)
    return build(SD3Transformer2DModel, device, dtype, **config)


def sd3_inputs(cfg, res: Optional[str], tiny: bool, device, dtype) -> dict:
    """Batch 2 (classifier-free guidance), latents of pixels / 8 (1024²: 4096 image tokens,
    1536²: 9216), 333 text tokens (tiny: 7)."""
    table = SD3_TINY_RES if tiny else SD3_RES
    side = table[res or next(iter(table))] // 8
    return sd3_kwargs(cfg, 2, side, side, 7 if tiny else 333, device, dtype)



# --- Wan -----------------------------------------------------------------------------------------

#: (video frames, height, width) in pixels
WAN_RES = {"480p 81f": (81, 480, 832), "480p 33f": (33, 480, 832)}
WAN_TINY_RES = {"64² 5f": (5, 64, 64), "48×80 9f": (9, 48, 80)}


def wan_net(tiny: bool, device, dtype):
    """A Wan2.1-1.3B-size transformer (30 layers, 12 heads x 128; tiny: 1 layer, 2 heads of 8)."""
    from diffusers import WanTransformer3DModel
    if tiny:
        config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                      in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32,
                      num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                      rope_max_seq_len=32)
    else:  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
        config = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                      in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                      ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                      qk_norm="rms_norm_across_heads", eps=1e-6)
    model = build(WanTransformer3DModel, device, dtype, **config)
    # as from_pretrained(torch_dtype=...) does: rope, time embedder, norms stay in float32
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    for name, module in model.named_modules():
        if any(k in name.split(".") for k in keep):
            module.float()
    return model


def wan_inputs(cfg, res: Optional[str], tiny: bool, device, dtype) -> dict:
    """Batch 1 (WanPipeline runs the two guidance branches as separate forwards); 480p 81f:
    21 x 60 x 104 latents (32760 tokens), 33f: 9 x 60 x 104 (14040); 512 text tokens (tiny: 7)."""
    table = WAN_TINY_RES if tiny else WAN_RES
    frames, h, w = table[res or next(iter(table))]
    return wan_kwargs(cfg, 1, (frames - 1) // 4 + 1, h // 8, w // 8, 7 if tiny else 512,
                      device, dtype)



#: name -> the model's builders, its GPU dtype and its two resolutions (full size, tiny)
MODELS = {
    "flux": ModelSpec(flux_net, flux_inputs, torch.bfloat16,
                      tuple(FLUX_RES), tuple(FLUX_TINY_RES)),
    "sdxl": ModelSpec(sdxl_net, sdxl_inputs, torch.float16,
                      tuple(SDXL_RES), tuple(SDXL_TINY_RES)),
    "sd3": ModelSpec(sd3_net, sd3_inputs, torch.bfloat16,
                     tuple(SD3_RES), tuple(SD3_TINY_RES)),
    "wan": ModelSpec(wan_net, wan_inputs, torch.bfloat16,
                     tuple(WAN_RES), tuple(WAN_TINY_RES)),
}


class ModelPathError(AttnPatchError, ValueError):
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
    elif cls == "SD3Transformer2DModel":
        side = 16 if tiny else cfg.sample_size
        kwargs = sd3_kwargs(cfg, 1, side, side, 7 if tiny else 333, device, dtype)
    elif cls == "WanTransformer3DModel":  # tiny: 2 x 8 x 8 latents; else 480p, 81 frames
        frames, h, w = (2, 8, 8) if tiny else (21, 60, 104)
        kwargs = wan_kwargs(cfg, 1, frames, h, w, 7 if tiny else 512, device, dtype)
    else:
        raise ModelPathError(f"--model {path!r}: no input builder for {cls} (the models "
                             "suite runs FluxTransformer2DModel, UNet2DConditionModel, "
                             "SD3Transformer2DModel and WanTransformer3DModel)")
    return model, kwargs
