"""Tiny random-weight diffusers pipelines, built locally without any download: for demos and
tests, never for images.

Used by ``attnpatch demo``, the scripts' ``--tiny`` flag, the examples and the tests. Every
component is built from a config: the denoiser, the VAE, CLIP / T5 text encoders, and their
tokenizers, which are built from a small character-level vocabulary written in code
(transformers' ``CLIPTokenizer`` takes a BPE vocab dict, ``T5Tokenizer`` a Unigram vocab list),
so nothing is read from the Hub.
``save_pretrained`` writes a normal diffusers folder (``model_index.json``, ``tokenizer.json``)
that ``DiffusionPipeline.from_pretrained(folder)`` loads offline.

Random weights make noise images: these pipelines exercise every attention path of the real
architectures (joint text/image attention with RoPE in Flux, self/cross attention in UNets,
causal CLIP and T5 with relative position bias in the text encoders), not image quality.

``size="test"`` is the smallest that runs each architecture; ``size="demo"`` is a bit larger
(more heads and layers), still a fraction of a second per step on a CPU.
"""

from __future__ import annotations

import string
from typing import Any, Callable

import torch

__all__ = ["KINDS", "build_tiny_pipeline", "tiny_call_kwargs", "clip_tokenizer",
           "t5_tokenizer"]

_CHARS = string.ascii_lowercase + string.digits + string.punctuation

#: tiny pipeline kinds and the diffusers pipeline class each builds
KINDS = {
    "flux": "FluxPipeline",
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "wan": "WanPipeline",
}

_SIZES = {
    # width of the text encoders / denoisers; head_dim of the transformers
    "test": dict(clip=32, t5=32, heads=2, head_dim=16, layers=1, unet=(16, 32),
                 vae=(8, 16, 16, 16)),
    "demo": dict(clip=64, t5=64, heads=4, head_dim=32, layers=2, unet=(32, 64),
                 vae=(16, 32, 32, 32)),
}


def clip_tokenizer(model_max_length: int = 77):
    """A CLIP BPE tokenizer over single characters (no merges): no files, no download."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
    for c in _CHARS:
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def t5_tokenizer(model_max_length: int = 512):
    """A T5 Unigram tokenizer over single characters: no sentencepiece file, no download."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in _CHARS] + [("\u2581" + c, -3.0) for c in _CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _clip(dim: int, layers: int, heads: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(clip_tokenizer()), hidden_size=dim,
                            intermediate_size=2 * dim, num_hidden_layers=layers,
                            num_attention_heads=heads, max_position_embeddings=77,
                            projection_dim=dim, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _t5(dim: int, layers: int, heads: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    cfg_cls, cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = cfg_cls(vocab_size=len(t5_tokenizer()), d_model=dim, d_kv=dim // heads,
                     d_ff=2 * dim, num_layers=layers, num_heads=heads,
                     relative_attention_num_buckets=8, decoder_start_token_id=0)
    return cls(config).eval()


def _vae(channels: tuple, latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=channels,
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, latent_channels=latent_channels,
                         norm_num_groups=8, sample_size=64, **extra).eval()


def _flux(s: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    head_dim = s["head_dim"]
    rope = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=s["layers"], num_single_layers=s["layers"],
        attention_head_dim=head_dim, num_attention_heads=s["heads"], joint_attention_dim=s["t5"],
        pooled_projection_dim=s["clip"], guidance_embeds=False, axes_dims_rope=rope)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(
        scheduler=scheduler, vae=_vae(s["vae"], 4, shift_factor=0.0609, scaling_factor=1.5035,
                                      use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(s["clip"], 2, s["heads"]), tokenizer=clip_tokenizer(),
        text_encoder_2=_t5(s["t5"], 2, s["heads"]), tokenizer_2=t5_tokenizer(),
        transformer=transformer.eval())


def _sd3(s: dict):
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)

    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=s["layers"],
        attention_head_dim=s["head_dim"], num_attention_heads=s["heads"],
        joint_attention_dim=s["t5"], caption_projection_dim=s["heads"] * s["head_dim"],
        pooled_projection_dim=2 * s["clip"], pos_embed_max_size=64)
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(s["vae"], 4, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip(s["clip"], 2, s["heads"], True), tokenizer=clip_tokenizer(),
        text_encoder_2=_clip(s["clip"], 2, s["heads"], True), tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5(s["t5"], 2, s["heads"]), tokenizer_3=t5_tokenizer())


def _unet(s: dict, xl: bool):
    from diffusers import UNet2DConditionModel

    c = s["unet"]
    if not xl:
        return UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=c, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=s["clip"], attention_head_dim=s["heads"]).eval()
    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=c, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * s["clip"], attention_head_dim=(s["heads"], 2 * s["heads"]),
        transformer_layers_per_block=(1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + s["clip"]).eval()


def _sd(s: dict):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=_vae(s["vae"], 4), text_encoder=_clip(s["clip"], 2, s["heads"]),
        tokenizer=clip_tokenizer(), unet=_unet(s, xl=False),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                         beta_schedule="scaled_linear", timestep_spacing="leading",
                                         steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _sdxl(s: dict):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=_vae(s["vae"], 4), text_encoder=_clip(s["clip"], 2, s["heads"]),
        text_encoder_2=_clip(s["clip"], 2, s["heads"], True), tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(), unet=_unet(s, xl=True),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                         beta_schedule="scaled_linear", timestep_spacing="leading",
                                         steps_offset=1))


def _wan(s: dict):
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline,
                           WanTransformer3DModel)

    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=s["heads"], attention_head_dim=s["head_dim"],
        in_channels=16, out_channels=16, text_dim=s["t5"], freq_dim=32, ffn_dim=2 * s["t5"],
        num_layers=s["layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32).eval()
    return WanPipeline(tokenizer=t5_tokenizer(), text_encoder=_t5(s["t5"], 2, s["heads"], True),
                       vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


_BUILDERS: dict[str, Callable[[dict], Any]] = {
    "flux": _flux, "sd": _sd, "sdxl": _sdxl, "sd3": _sd3, "wan": _wan}


def build_tiny_pipeline(kind: str, size: str = "test", seed: int = 0,
                        dtype: torch.dtype = torch.float32):
    """A random-weight ``kind`` pipeline (one of :data:`KINDS`) built locally; no download.

    Weights come from ``torch.manual_seed(seed)`` (the global RNG state is restored afterwards),
    so the same arguments give the same pipeline.
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny pipeline {kind!r}; choose one of {sorted(_BUILDERS)}")
    if size not in _SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(_SIZES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _BUILDERS[kind](_SIZES[size])
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype) if dtype != torch.float32 else pipe


def tiny_call_kwargs(kind: str) -> dict:
    """Call arguments that keep a tiny ``kind`` pipeline fast (short T5 sequences, few frames)."""
    if kind in ("flux", "sd3"):
        return {"max_sequence_length": 32}
    if kind == "wan":
        return {"max_sequence_length": 32, "num_frames": 5}
    return {}
