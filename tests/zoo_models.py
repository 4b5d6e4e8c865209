"""Factories for the model zoo test (tests/integrations/test_zoo.py): every model class of the
installed ``diffusers.models``, and the text/image encoders diffusers pipelines load, built tiny
from a config (random weights, nothing downloaded) with small inputs.

``FACTORIES[class name](cls) -> Case``; ``build(name)`` looks the class up in the installed
library (a missing one skips), calls the factory, gives every all-zero parameter (adaLN-zero
gates, zero-init output projections, ControlNet zero convs) small random values so that "equal
output" proves something, and puts the model in eval mode, fp32. Configs follow diffusers' own
tests (tests/models/**/test_models_*.py) where they exist. Nothing here imports attnpatch.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
import torch

logging.getLogger("diffusers").setLevel(logging.ERROR)
logging.getLogger("transformers").setLevel(logging.ERROR)


@dataclass
class Case:
    model: torch.nn.Module
    kwargs: dict
    valid: Optional[torch.Tensor] = None        # (B, S) bool: query rows compared (padding)
    call: Optional[Callable[[Any, dict], Any]] = None   # default: model(**kwargs)


FACTORIES: dict[str, tuple[str, Callable[[type], Case]]] = {}

#: diffusers model classes without softmax attention: ``patch()`` must refuse them
NO_SOFTMAX_ATTENTION: dict[str, str] = {}

#: ModelMixin classes that are not a model to run on their own (reason)
NOT_STANDALONE: dict[str, str] = {
    "ModelMixin": "the base class",
    "LegacyModelMixin": "the base class of legacy-config models",
    "MultiAdapter": "a list of T2IAdapters (tested alone)",
    "MultiControlNetModel": "a list of ControlNetModels (tested alone)",
    "MultiControlNetUnionModel": "a list of ControlNetUnionModels (tested alone)",
    "FluxMultiControlNetModel": "a list of FluxControlNetModels (tested alone)",
    "SD3MultiControlNetModel": "a list of SD3ControlNetModels (tested alone)",
    "HunyuanDiT2DMultiControlNetModel": "a list of HunyuanDiT2DControlNetModels (tested alone)",
    "QwenImageMultiControlNetModel": "a list of QwenImageControlNetModels (tested alone)",
    "MotionAdapter": "motion modules loaded into UNetMotionModel, which builds the same "
                     "modules itself (tested)",
    "ControlNetXSAdapter": "the control half of UNetControlNetXSModel (tested); no forward "
                           "of its own",
}


def _model(name: str, library: str = "diffusers", no_softmax: Optional[str] = None):
    def register(fn):
        FACTORIES[name] = (library, fn)
        if no_softmax:
            NO_SOFTMAX_ATTENTION[name] = no_softmax
        return fn
    return register


@functools.lru_cache(maxsize=None)
def installed_model_classes() -> dict[str, type]:
    """Every ModelMixin subclass defined in the installed ``diffusers.models`` packages."""
    import diffusers.models as dm
    from diffusers.models.modeling_utils import ModelMixin
    found = {}
    for info in pkgutil.walk_packages(dm.__path__, dm.__name__ + "."):
        if info.name.endswith("_flax"):  # Flax (JAX) models of older diffusers: not torch
            continue
        module = importlib.import_module(info.name)
        for attr, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, ModelMixin)
                    and obj.__module__ == module.__name__):
                found[attr] = obj
    return found


def _lookup(name: str, library: str):
    lib = importlib.import_module(library)
    cls = getattr(lib, name, None)
    if cls is None and library == "diffusers":
        cls = installed_model_classes().get(name)
    if cls is None:
        pytest.skip(f"{name} not in {library} {lib.__version__}")
    return cls


def randomize_zero_parameters(model: torch.nn.Module, seed: int = 1234) -> int:
    """Every all-zero parameter gets randn * 0.02 (seeded); returns how many there were."""
    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.numel() and p.is_floating_point() and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.02)
                n += 1
    return n


def build(name: str) -> Case:
    library, factory = FACTORIES[name]
    cls = _lookup(name, library)
    torch.manual_seed(0)
    case = factory(cls)
    case.model = case.model.float().eval()
    randomize_zero_parameters(case.model)
    return case


# --- inputs -----------------------------------------------------------------------------------

def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rnd(*shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=_g(seed))


def ids(*shape, high: int = 60, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, high, shape, generator=_g(seed))


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# === autoencoders ==============================================================================

def _vae2d(cls, **extra):
    cfg = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
               down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2,
               latent_channels=4, norm_num_groups=4)
    cfg.update(extra)
    return Case(cls(**cfg), dict(sample=rnd(1, 3, 16, 16)))


@_model("AutoencoderKL")
def _autoencoder_kl(cls):
    return _vae2d(cls)


@_model("AutoencoderKLFlux2")
def _autoencoder_kl_flux2(cls):
    return _vae2d(cls, latent_channels=2)


@_model("VQModel")
def _vq_model(cls):
    return _vae2d(cls, latent_channels=3)


@_model("AsymmetricAutoencoderKL")
def _asym_kl(cls):
    m = cls(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            down_block_out_channels=(8, 16), layers_per_down_block=1,
            up_block_types=("UpDecoderBlock2D",) * 2, up_block_out_channels=(8, 16),
            layers_per_up_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)
    return Case(m, dict(sample=rnd(1, 3, 16, 16), mask=torch.ones(1, 1, 16, 16)))


@_model("AutoencoderKLTemporalDecoder")
def _kl_temporal_decoder(cls):
    m = cls(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            block_out_channels=(32, 32), layers_per_block=1, latent_channels=4)
    return Case(m, dict(sample=rnd(2, 3, 16, 16), num_frames=2))


@_model("ConsistencyDecoderVAE")
def _consistency_decoder_vae(cls):
    m = cls(encoder_block_out_channels=(8, 16), encoder_in_channels=3, encoder_out_channels=4,
            encoder_down_block_types=("DownEncoderBlock2D",) * 2, decoder_add_attention=True,
            decoder_block_out_channels=(8, 16),
            decoder_down_block_types=("ResnetDownsampleBlock2D",) * 2,
            decoder_downsample_padding=1, decoder_in_channels=7, decoder_layers_per_block=1,
            decoder_norm_eps=1e-5, decoder_norm_num_groups=4, encoder_norm_num_groups=4,
            decoder_num_train_timesteps=1024, decoder_out_channels=6,
            decoder_resnet_time_scale_shift="scale_shift", decoder_time_embedding_type="learned",
            decoder_up_block_types=("ResnetUpsampleBlock2D",) * 2, scaling_factor=1,
            latent_channels=4)
    # the decoder samples noise: a fresh seeded generator per forward
    return Case(m, dict(sample=rnd(1, 3, 16, 16)),
                call=lambda mod, kw: mod(**kw, generator=_g(0)))


@_model("AutoencoderKLAllegro")
def _kl_allegro(cls):
    m = cls(in_channels=3, out_channels=3, down_block_types=("AllegroDownBlock3D",) * 4,
            up_block_types=("AllegroUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
            latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    # encode/decode exist only tiled (24-frame tiles): run the encoder and decoder directly
    return Case(m, dict(sample=rnd(1, 3, 4, 16, 16)),
                call=lambda mod, kw: mod.decoder(mod.encoder(kw["sample"])[:, :4]))


@_model("AutoencoderKLCogVideoX", no_softmax="convolutional video VAE, no attention")
def _kl_cogvideox(cls):
    m = cls(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
            latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    return Case(m, dict(sample=rnd(1, 3, 5, 16, 16)))


@_model("AutoencoderKLCosmos")
def _kl_cosmos(cls):
    m = cls(in_channels=3, out_channels=3, latent_channels=4,
            encoder_block_out_channels=(8, 8, 8, 8),
            decode_block_out_channels=(8, 8, 8, 8), attention_resolutions=(8,), resolution=64,
            num_layers=2, patch_size=4, patch_type="haar", scaling_factor=1.0,
            spatial_compression_ratio=4, temporal_compression_ratio=4)
    return Case(m, dict(sample=rnd(1, 3, 9, 32, 32)))


@_model("AutoencoderKLHunyuanVideo")
def _kl_hunyuan_video(cls):
    m = cls(in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
            layers_per_block=1, act_fn="silu", norm_num_groups=4, spatial_compression_ratio=8,
            temporal_compression_ratio=4, mid_block_add_attention=True)
    return Case(m, dict(sample=rnd(1, 3, 5, 16, 16)))


@_model("AutoencoderKLHunyuanImage")
def _kl_hunyuan_image(cls):
    m = cls(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
            layers_per_block=1, spatial_compression_ratio=2, sample_size=16)
    return Case(m, dict(sample=rnd(1, 3, 16, 16)))


@_model("AutoencoderKLHunyuanImageRefiner")
def _kl_hunyuan_image_refiner(cls):
    m = cls(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
            layers_per_block=1, spatial_compression_ratio=4, temporal_compression_ratio=2,
            downsample_match_channel=False, upsample_match_channel=False)
    return Case(m, dict(sample=rnd(1, 3, 3, 16, 16)))


@_model("AutoencoderKLHunyuanVideo15")
def _kl_hunyuan_video15(cls):
    m = cls(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
            layers_per_block=1, spatial_compression_ratio=4, temporal_compression_ratio=2,
            downsample_match_channel=False, upsample_match_channel=False)
    return Case(m, dict(sample=rnd(1, 3, 3, 16, 16)))


@_model("AutoencoderKLKVAE", no_softmax="convolutional VAE, no attention")
def _kl_kvae(cls):
    m = cls(in_channels=3, channels=32, num_enc_blocks=1, num_dec_blocks=1, z_channels=4,
            double_z=True, ch_mult=(1, 2), sample_size=16)
    return Case(m, dict(sample=rnd(1, 3, 16, 16)))


@_model("AutoencoderKLKVAEVideo", no_softmax="convolutional video VAE, no attention")
def _kl_kvae_video(cls):
    m = cls(ch=32, ch_mult=(1, 1), num_res_blocks=1, in_channels=3, out_ch=3, z_channels=4,
            temporal_compress_times=2)
    return Case(m, dict(sample=rnd(1, 3, 3, 16, 16)))


@_model("AutoencoderKLKVAEAudio")
def _kl_kvae_audio(cls):
    m = cls(encoder_dim=4, encoder_rates=[2, 2], latent_dim=16, codebook_dim=4, decoder_dim=16,
            decoder_rates=[2, 2], attn_num_heads=2)
    return Case(m, dict(sample=rnd(1, 1, 32)))


@_model("AutoencoderKLLTXVideo", no_softmax="convolutional video VAE, no attention")
def _kl_ltx(cls):
    m = cls(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False),
            decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
            upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1, patch_size_t=1,
            encoder_causal=True, decoder_causal=False)
    return Case(m, dict(sample=rnd(1, 3, 9, 16, 16)))


@_model("AutoencoderKLLTX2Video", no_softmax="convolutional video VAE, no attention")
def _kl_ltx2(cls):
    m = cls(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(16, 32, 64), layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1), spatio_temporal_scaling=(True,) * 4,
            decoder_spatio_temporal_scaling=(True,) * 3, decoder_inject_noise=(False,) * 4,
            downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
            upsample_residual=(True,) * 3, upsample_factor=(2, 2, 2), timestep_conditioning=False,
            patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
            encoder_spatial_padding_mode="zeros", decoder_spatial_padding_mode="zeros")
    return Case(m, dict(sample=rnd(1, 3, 9, 16, 16)))


@_model("AutoencoderKLLTX2Audio")
def _kl_ltx2_audio(cls):
    m = cls(in_channels=2, output_channels=2, latent_channels=4, base_channels=8, ch_mult=(1, 2),
            resolution=16, attn_resolutions=(8,), num_res_blocks=1, norm_type="pixel",
            causality_axis="height", mid_block_add_attention=True, sample_rate=16000,
            mel_hop_length=160, mel_bins=16, is_causal=True, double_z=True)
    return Case(m, dict(sample=rnd(1, 2, 8, 16)))


@_model("AutoencoderKLMagvit", no_softmax="convolutional video VAE, no attention")
def _kl_magvit(cls):
    m = cls(in_channels=3, latent_channels=4, out_channels=3, block_out_channels=(8, 8, 8, 8),
            down_block_types=("SpatialDownBlock3D",) + ("SpatialTemporalDownBlock3D",) * 3,
            up_block_types=("SpatialUpBlock3D",) + ("SpatialTemporalUpBlock3D",) * 3,
            layers_per_block=1, norm_num_groups=8, spatial_group_norm=True)
    return Case(m, dict(sample=rnd(1, 3, 9, 16, 16)))


@_model("AutoencoderKLMiniMaxH3")
def _kl_minimax_h3(cls):
    m = cls(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
            layers_per_block=1, spatial_downsample_factors=(2, 2),
            temporal_downsample_factors=(2, 2), norm_num_groups=8, decoder_num_layers=1,
            decoder_num_attention_heads=2, decoder_attention_head_dim=8,
            decoder_num_register_tokens=2, decoder_ffn_mult=2, clip_length=17, token_drop=3,
            latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
    return Case(m, dict(sample=rnd(1, 3, 22, 8, 8)))


@_model("AutoencoderKLMiniMaxH3Audio")
def _kl_minimax_h3_audio(cls):
    m = cls(encoder_dim=4, encoder_rates=(2, 2), latent_dim=32, latent_channels=8,
            num_attention_heads=2, decoder_dim=16, decoder_rates=(2, 2),
            decoder_kernel_sizes=(4, 4), resblock_kernel_sizes=(3,),
            resblock_dilation_sizes=((1, 3),), sampling_rate=32000, latents_mean=[0.0] * 8,
            latents_std=[1.0] * 8)
    return Case(m, dict(sample=rnd(1, 1, 4 * 8)))


@_model("AutoencoderKLMochi")
def _kl_mochi(cls):
    m = cls(in_channels=15, out_channels=3, latent_channels=4,
            encoder_block_out_channels=(32, 32, 32, 32),
            decoder_block_out_channels=(32, 32, 32, 32),
            layers_per_block=(1, 1, 1, 1, 1), act_fn="silu", scaling_factor=1)
    return Case(m, dict(sample=rnd(1, 3, 7, 16, 16)))


@_model("AutoencoderKLQwenImage")
def _kl_qwenimage(cls):
    m = cls(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return Case(m, dict(sample=rnd(1, 3, 5, 16, 16)))


@_model("AutoencoderKLQwenImage21")
def _kl_qwenimage21(cls):
    m = cls(base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
            temperal_downsample=[True, False], latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
            in_channels=3, out_channels=3, patch_size=None, scale_factor_temporal=2,
            scale_factor_spatial=2)
    return Case(m, dict(sample=rnd(1, 3, 1, 16, 16)))  # an image VAE: one frame


@_model("AutoencoderKLWan")
def _kl_wan(cls):
    m = cls(base_dim=3, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return Case(m, dict(sample=rnd(1, 3, 5, 16, 16)))


@_model("AutoencoderOobleck", no_softmax="convolutional audio VAE, no attention")
def _oobleck(cls):
    m = cls(encoder_hidden_size=4, decoder_channels=4, decoder_input_channels=2, audio_channels=2,
            downsampling_ratios=[2, 2], channel_multiples=[1, 2])
    return Case(m, dict(sample=rnd(1, 2, 16)))


@_model("AutoencoderTiny", no_softmax="convolutional VAE (TAESD), no attention")
def _tiny(cls):
    m = cls(in_channels=3, out_channels=3, encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))
    return Case(m, dict(sample=rnd(1, 3, 16, 16)))


@_model("AutoencoderDC", no_softmax="linear (ReLU) multiscale attention only")
def _dc(cls):
    m = cls(in_channels=3, latent_channels=4, attention_head_dim=2,
            encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
            encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
            downsample_block_type="conv", upsample_block_type="interpolate",
            decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    return Case(m, dict(sample=rnd(1, 3, 16, 16)))


@_model("AutoencoderVidTok")
def _vidtok(cls):
    m = cls(is_causal=False, in_channels=3, out_channels=3, ch=8, ch_mult=[1, 2], z_channels=4,
            double_z=False, num_res_blocks=1, regularizer="fsq", codebook_size=8 ** 4)
    return Case(m, dict(sample=rnd(1, 3, 5, 16, 16)))


@_model("MMAudioVAE")
def _mmaudio_vae(cls):
    m = cls(mel_bins=16, latent_channels=4, hidden_channels=8, channel_multipliers=(1, 2),
            layers_per_block=1, sample_rate=16000, n_fft=64, hop_length=16)
    return Case(m, dict(sample=rnd(1, 16 * 16)))


@_model("MMAudioVocoder", no_softmax="HiFi-GAN style convolutional vocoder, no attention")
def _mmaudio_vocoder(cls):
    m = cls(num_mels=8, upsample_initial_channel=8, upsample_rates=(2, 2),
            upsample_kernel_sizes=(4, 4), resblock_kernel_sizes=(3,),
            resblock_dilation_sizes=((1, 3),))
    return Case(m, dict(mel=rnd(1, 8, 6)))


@_model("LongCatAudioDiTVae", no_softmax="convolutional audio VAE, no attention")
def _longcat_vae(cls):
    m = cls(in_channels=1, channels=8, c_mults=[1, 2], strides=[2], latent_dim=4,
            encoder_latent_dim=8, downsampling_ratio=2, sample_rate=24000)
    return Case(m, dict(sample=rnd(1, 1, 16)))


@_model("Kandinsky6SRVAE", no_softmax="convolutional video VAE, no attention")
def _k6_sr_vae(cls):
    m = cls(in_channels=3, out_channels=3, latent_channels=4, encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8), layers_per_block=1, temporal_compression_ratio=2,
            temporal_compression_start_level=1)
    return Case(m, dict(sample=rnd(1, 3, 3, 16, 16)))


@_model("Cosmos3AVAEAudioTokenizer", no_softmax="convolutional audio tokenizer, no attention")
def _cosmos3_audio(cls):
    m = cls(sampling_rate=16, hop_size=4, input_channels=1, stereo=True, normalize_volume=True,
            enc_dim=4, enc_num_blocks=1, enc_n_fft=8, enc_hop_length=2, enc_latent_dim=8,
            enc_c_mults=(1,), enc_strides=(2,), vocoder_input_dim=4, dec_dim=4,
            dec_c_mults=(1, 2), dec_strides=(2, 2), dec_out_channels=2)
    return Case(m, dict(sample=rnd(1, 2, 16)))


@_model("AutoencoderSAME")
def _same(cls):
    m = cls(audio_channels=2, patch_size=4, encoder_channels=8, encoder_c_mults=[1, 2],
            encoder_strides=[2, 2], encoder_transformer_depths=[1, 1], latent_dim=8,
            use_differential_attention=True, dim_heads=8, ff_mult=2, sampling_rate=44100)
    return Case(m, dict(sample=rnd(1, 2, 64)))


@_model("AutoencoderRAE")
def _rae(cls):
    # a real (tiny) DINOv2-with-registers encoder from transformers: head_dim 64, one head
    m = cls(encoder_type="dinov2", encoder_hidden_size=64, encoder_patch_size=8,
            encoder_num_hidden_layers=1, encoder_input_size=16, patch_size=4, image_size=8,
            decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
            decoder_intermediate_size=32, num_channels=3, encoder_norm_mean=[0.5] * 3,
            encoder_norm_std=[0.5] * 3, noise_tau=0.0, reshape_to_2d=True, scaling_factor=1.0)
    return Case(m, dict(sample=rnd(1, 3, 16, 16)))


@_model("LTX2VideoDiffusionDecoderModel")
def _ltx2_diffusion_decoder(cls):
    # neighborhood attention through FlexAttention (a BlockMask); grids just above the 3^3 kernel
    m = cls(out_channels=3, latent_channels=8, patch_size=1, decoder_head_dim=8,
            decoder_stage_channels=(16,) * 5, decoder_stage_depths=(1, 1, 1, 1, 1),
            decoder_stage_kernels=((3, 3, 3),) * 4,
            decoder_upsample_strides=((1, 1, 1), (1, 1, 1), (1, 1, 1), (2, 2, 2)),
            decoder_upsample_channel_reductions=(1, 1, 1, 1), decoder_stage5_kernel=(3, 3, 3),
            decoder_t_emb_dim=16, spatial_compression_ratio=1, temporal_compression_ratio=1)
    # the decoder denoises from fresh noise: a seeded generator per forward
    return Case(m, dict(z=rnd(1, 8, 2, 3, 3)), call=lambda mod, kw: mod(**kw, generator=_g(0)))


@_model("MiniMaxMusic3Vocoder", no_softmax="convolutional vocoder, no attention")
def _minimax_music3_vocoder(cls):
    m = cls(latent_channels=4, decoder_input_dim=8, decoder_hidden_dim=8,
            upsampling_ratios=(2, 2), sampling_rate=16000)
    return Case(m, dict(latents=rnd(1, 4, 6)))


@_model("RFD4ProteinaAutoencoder")
def _rfd4_autoencoder(cls):
    n_res, n_tok = 4, 2
    m = cls(atom37_mask=[[True] * 37] * n_res, allowed_residue_types=[[True] * n_res] * n_tok,
            latent_dim=4, n_residue_types=n_res, num_token_types=n_tok, nlayers=1, token_dim=16,
            nheads=2, dim_cond=8, pair_repr_dim=8, token_type_emb_dim=4)
    kw = dict(z_latent=rnd(1, 6, 4), ca_coors_nm=rnd(1, 6, 3, seed=2),
              padding_mask=torch.ones(1, 6, dtype=torch.bool),
              token_type=torch.zeros(1, 6, dtype=torch.long),
              conditioning=dict(is_in_context_conditioning=torch.zeros(1, 6, dtype=torch.bool),
                                supports_local_latent=torch.ones(1, 6, dtype=torch.bool)))
    return Case(m, kw)


# === UNets =====================================================================================

def _unet_kw(b=1, c=4, hw=8, ctx=8, text=4):
    return dict(sample=rnd(b, c, hw, hw), timestep=t(10.0),
                encoder_hidden_states=rnd(b, text, ctx, seed=2))


@_model("UNet2DConditionModel")
def _unet2d_condition(cls):
    # SDXL-like: text_time added conditioning, linear projection, two transformer layers
    m = cls(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(8, 16), norm_num_groups=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
            attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
            use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=4, projection_class_embeddings_input_dim=4 * 6 + 8)
    kw = _unet_kw()
    kw["added_cond_kwargs"] = {"text_embeds": rnd(1, 8, seed=3), "time_ids": rnd(1, 6, seed=4)}
    return Case(m, kw)


@_model("UNet2DModel")
def _unet2d(cls):
    m = cls(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(4, 8),
            norm_num_groups=2, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=2,
            layers_per_block=1)
    return Case(m, dict(sample=rnd(1, 3, 8, 8), timestep=t(10.0)))


@_model("UNet1DModel")
def _unet1d(cls):
    # the default (Dance Diffusion) block set: self-attention in AttnDownBlock1D / AttnUpBlock1D
    m = cls(sample_size=32, in_channels=2, out_channels=2, extra_in_channels=8,
            time_embedding_dim=8, block_out_channels=(32, 32, 64), norm_num_groups=8)
    return Case(m, dict(sample=rnd(1, 2, 32), timestep=t(10.0)))


@_model("UNet3DConditionModel")
def _unet3d(cls):
    m = cls(block_out_channels=(4, 8), norm_num_groups=4,
            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=8,
            attention_head_dim=2, out_channels=4, in_channels=4, layers_per_block=1,
            sample_size=8)
    return Case(m, dict(sample=rnd(1, 4, 2, 8, 8), timestep=t(10.0),
                        encoder_hidden_states=rnd(1, 4, 8, seed=2)))


@_model("I2VGenXLUNet")
def _i2vgen_xl(cls):
    m = cls(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), layers_per_block=1,
            norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2)
    kw = dict(sample=rnd(1, 4, 2, 8, 8), timestep=t(10.0), fps=torch.tensor([8]),
              image_latents=rnd(1, 4, 2, 8, 8, seed=2), image_embeddings=rnd(1, 8, seed=3),
              encoder_hidden_states=rnd(1, 4, 8, seed=4))
    return Case(m, kw)


@_model("UNetMotionModel")
def _unet_motion(cls):
    m = cls(block_out_channels=(8, 16), norm_num_groups=4,
            down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
            up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), cross_attention_dim=8,
            num_attention_heads=2, out_channels=4, in_channels=4, layers_per_block=1,
            sample_size=8, motion_num_attention_heads=2, motion_max_seq_length=4)
    return Case(m, dict(sample=rnd(1, 4, 2, 8, 8), timestep=t(10.0),
                        encoder_hidden_states=rnd(2, 4, 8, seed=2)))


@_model("UNetSpatioTemporalConditionModel")
def _unet_svd(cls):
    m = cls(block_out_channels=(32, 32),
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            cross_attention_dim=8, num_attention_heads=2, out_channels=4, in_channels=4,
            layers_per_block=1, sample_size=8, projection_class_embeddings_input_dim=4 * 3,
            addition_time_embed_dim=4, num_frames=2)
    return Case(m, dict(sample=rnd(1, 2, 4, 8, 8), timestep=t(10.0),
                        encoder_hidden_states=rnd(1, 1, 8, seed=2),
                        added_time_ids=torch.tensor([[6.0, 127.0, 0.02]])))


@_model("DreamLiteUNetModel")
def _dreamlite_unet(cls):
    m = cls(sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DreamLiteCrossAttnNoSelfAttnDownBlock2D",
                              "DreamLiteCrossAttnDownBlock2D"),
            up_block_types=("DreamLiteCrossAttnUpBlock2D", "DreamLiteUpBlock2D"),
            block_out_channels=(16, 32), cross_attention_dim=8, attention_head_dim=8,
            layers_per_block=1, norm_num_groups=8, transformer_layers_per_block=1)
    return Case(m, _unet_kw())


@_model("Kandinsky3UNet")
def _kandinsky3_unet(cls):
    m = cls(in_channels=4, time_embedding_dim=4, groups=2, attention_head_dim=4,
            layers_per_block=3, block_out_channels=(32, 64), cross_attention_dim=4,
            encoder_hid_dim=32)
    mask = torch.ones(1, 4)
    mask[0, 3:] = 0
    return Case(m, dict(sample=rnd(1, 4, 8, 8), timestep=t(10.0),
                        encoder_hidden_states=rnd(1, 4, 32, seed=2), encoder_attention_mask=mask))


@_model("StableCascadeUNet")
def _stable_cascade_unet(cls):
    m = cls(in_channels=4, out_channels=4, conditioning_dim=16, block_out_channels=(8, 16),
            num_attention_heads=(1, 2), down_num_layers_per_block=(1, 1),
            up_num_layers_per_block=(1, 1), down_blocks_repeat_mappers=(1, 1),
            up_blocks_repeat_mappers=(1, 1),
            block_types_per_layer=(("SDCascadeResBlock", "SDCascadeTimestepBlock",
                                    "SDCascadeAttnBlock"),) * 2,
            clip_text_pooled_in_channels=8, clip_text_in_channels=8, dropout=(0.0, 0.0),
            switch_level=None)
    kw = dict(sample=rnd(1, 4, 8, 8), timestep_ratio=t(0.5), clip_text_pooled=rnd(1, 1, 8, seed=2),
              clip_text=rnd(1, 3, 8, seed=3))
    return Case(m, kw)


@_model("UVit2DModel")
def _uvit2d(cls):
    m = cls(hidden_size=16, cond_embed_dim=8, micro_cond_encode_dim=2, micro_cond_embed_dim=10,
            encoder_hidden_size=8, vocab_size=32, codebook_size=16, in_channels=8,
            block_out_channels=8, num_res_blocks=1, downsample=True, upsample=True,
            block_num_heads=2, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
            sample_size=4)
    kw = dict(input_ids=ids(1, 4, 4, high=16), encoder_hidden_states=rnd(1, 3, 8, seed=2),
              pooled_text_emb=rnd(1, 8, seed=3), micro_conds=rnd(1, 5, seed=4))
    return Case(m, kw)


# === ControlNets and adapters ==================================================================

def _sd_controlnet_kw():
    kw = _unet_kw()
    kw["controlnet_cond"] = rnd(1, 3, 32, 32, seed=6)
    return kw


@_model("ControlNetModel")
def _controlnet(cls):
    m = cls(block_out_channels=(8, 16), layers_per_block=1, in_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=8,
            attention_head_dim=2, conditioning_embedding_out_channels=(4, 8), norm_num_groups=4)
    kw = _unet_kw()
    kw["controlnet_cond"] = rnd(1, 3, 16, 16, seed=6)
    return Case(m, kw)


@_model("ControlNetUnionModel")
def _controlnet_union(cls):
    m = cls(block_out_channels=(8, 16), layers_per_block=1, in_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=8,
            attention_head_dim=2, conditioning_embedding_out_channels=(4, 8),
            norm_num_groups=4, num_control_type=2, num_trans_channel=8, num_trans_head=2,
            num_trans_layer=1, num_proj_channel=8, addition_embed_type="text_time",
            addition_time_embed_dim=4, projection_class_embeddings_input_dim=4 * 6 + 8)
    kw = _unet_kw()
    kw.update(controlnet_cond=[rnd(1, 3, 16, 16, seed=6), rnd(1, 3, 16, 16, seed=7)],
              control_type=torch.tensor([[1.0, 1.0]]), control_type_idx=[0, 1],
              added_cond_kwargs={"text_embeds": rnd(1, 8, seed=3), "time_ids": rnd(1, 6, seed=4)})
    return Case(m, kw)


@_model("SparseControlNetModel")
def _sparse_controlnet(cls):
    m = cls(block_out_channels=(8, 16), layers_per_block=1, in_channels=4, conditioning_channels=3,
            down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
            cross_attention_dim=8, attention_head_dim=2, conditioning_embedding_out_channels=(4, 8),
            norm_num_groups=4, use_simplified_condition_embedding=False,
            motion_num_attention_heads=2, motion_max_seq_length=4)
    kw = dict(sample=rnd(1, 4, 2, 8, 8), timestep=t(10.0),
              encoder_hidden_states=rnd(2, 4, 8, seed=2),
              controlnet_cond=rnd(1, 3, 2, 16, 16, seed=6),
              conditioning_mask=torch.ones(1, 1, 2, 16, 16))
    return Case(m, kw)


@_model("UNetControlNetXSModel")
def _controlnet_xs(cls):
    m = cls(sample_size=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(4, 8),
            cross_attention_dim=8, transformer_layers_per_block=1, num_attention_heads=2,
            norm_num_groups=4, upcast_attention=False, ctrl_block_out_channels=(2, 4),
            ctrl_num_attention_heads=4, ctrl_max_norm_num_groups=2,
            ctrl_conditioning_embedding_out_channels=(2, 2))
    kw = _unet_kw()
    kw.update(controlnet_cond=rnd(1, 3, 16, 16, seed=6), conditioning_scale=1.0)
    return Case(m, kw)


@_model("T2IAdapter", no_softmax="convolutional adapter, no attention")
def _t2i_adapter(cls):
    m = cls(in_channels=3, channels=[8, 16], num_res_blocks=1, downscale_factor=4,
            adapter_type="full_adapter")
    return Case(m, dict(x=rnd(1, 3, 16, 16)))


@_model("FluxControlNetModel")
def _flux_controlnet(cls):
    m = cls(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
            axes_dims_rope=[4, 4, 8])
    return Case(m, dict(controlnet_cond=rnd(1, 16, 4, seed=6), **_flux_kw()))


@_model("SD3ControlNetModel")
def _sd3_controlnet(cls):
    m = cls(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
            pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8,
            dual_attention_layers=(0,), qk_norm="rms_norm")
    kw = _sd3_kw()
    kw["controlnet_cond"] = rnd(1, 4, 8, 8, seed=6)
    return Case(m, kw)


@_model("HunyuanDiT2DControlNetModel")
def _hunyuan_dit_controlnet(cls):
    m = cls(sample_size=8, transformer_num_layers=4, patch_size=2, attention_head_dim=8,
            num_attention_heads=2, in_channels=4, cross_attention_dim=8, cross_attention_dim_t5=8,
            pooled_projection_dim=4, hidden_size=16, text_len=4, text_len_t5=4,
            activation_fn="gelu-approximate")
    kw = _hunyuan_dit_kw()
    kw["controlnet_cond"] = rnd(1, 4, 8, 8, seed=9)
    return Case(m, kw)


@_model("QwenImageControlNetModel")
def _qwenimage_controlnet(cls):
    m = cls(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4))
    kw = _qwenimage_kw()
    kw["controlnet_cond"] = rnd(1, 16, 16, seed=6)
    return Case(m, kw)


@_model("SanaControlNetModel")
def _sana_controlnet(cls):
    m = cls(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2,
            attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4,
            cross_attention_dim=8, caption_channels=8, sample_size=8)
    kw = _sana_kw()
    kw["controlnet_cond"] = rnd(1, 4, 8, 8, seed=6)
    return Case(m, kw)


# === transformers (DiTs) =======================================================================

def _flux_ids(h=4, w=4):
    i = torch.zeros(h, w, 3)
    i[..., 1] = torch.arange(h)[:, None]
    i[..., 2] = torch.arange(w)[None, :]
    return i.reshape(-1, 3)


def _flux_kw(text=6, dim=16, in_ch=4, pooled=16):
    kw = dict(hidden_states=rnd(1, 16, in_ch), encoder_hidden_states=rnd(1, text, dim, seed=2),
              timestep=t(0.5), img_ids=_flux_ids(), txt_ids=torch.zeros(text, 3))
    if pooled:
        kw["pooled_projections"] = rnd(1, pooled, seed=3)
    return kw


def _flux2_ids(text=6, h=4, w=4):
    img = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    txt = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1),
                               torch.arange(text))
    return img[None], txt[None]


def _sd3_kw(hw=8, in_ch=4):
    return dict(hidden_states=rnd(1, in_ch, hw, hw), encoder_hidden_states=rnd(1, 6, 16, seed=2),
                pooled_projections=rnd(1, 16, seed=3), timestep=t(10.0))


def _hunyuan_dit_rope(grid=4, head_dim=8):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    return get_2d_rotary_pos_embed(head_dim, ((0, 0), (grid, grid)), (grid, grid), use_real=True)


def _hunyuan_dit_kw():
    return dict(hidden_states=rnd(1, 4, 8, 8), timestep=t(10.0),
                encoder_hidden_states=rnd(1, 4, 8, seed=2), text_embedding_mask=torch.ones(1, 4),
                encoder_hidden_states_t5=rnd(1, 4, 8, seed=3),
                text_embedding_mask_t5=torch.ones(1, 4),
                image_meta_size=torch.tensor([[1024.0, 1024, 16, 16, 0, 0]]),
                style=torch.zeros(1, dtype=torch.long),
                image_rotary_emb=_hunyuan_dit_rope())


def _qwenimage_kw(text=6, mask_pad=True):
    mask = torch.ones(1, text, dtype=torch.long)
    if mask_pad:
        mask[0, -2:] = 0  # padded prompt: exercises the joint key-padding mask
    return dict(hidden_states=rnd(1, 16, 16), encoder_hidden_states=rnd(1, text, 16, seed=2),
                encoder_hidden_states_mask=mask, timestep=t(1.0), img_shapes=[(1, 4, 4)])


def _sana_kw(hw=8):
    return dict(hidden_states=rnd(1, 4, hw, hw), encoder_hidden_states=rnd(1, 6, 8, seed=2),
                timestep=t(10.0))


def _video_kw(c=4, f=2, hw=8, text=6, dim=16, layout="bcfhw"):
    hs = rnd(1, c, f, hw, hw) if layout == "bcfhw" else rnd(1, f, c, hw, hw)
    return dict(hidden_states=hs, timestep=t(10.0), encoder_hidden_states=rnd(1, text, dim, seed=2))


@_model("FluxTransformer2DModel")
def _flux(cls):
    m = cls(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
            guidance_embeds=True, axes_dims_rope=[4, 4, 8])
    return Case(m, dict(guidance=t(3.5), **_flux_kw()))


@_model("Flux2Transformer2DModel")
def _flux2(cls):
    m = cls(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=256,
            axes_dims_rope=[4, 4, 4, 4])
    img_ids, txt_ids = _flux2_ids()
    return Case(m, dict(hidden_states=rnd(1, 16, 4), encoder_hidden_states=rnd(1, 6, 16, seed=2),
                        img_ids=img_ids, txt_ids=txt_ids, timestep=t(1.0), guidance=t(1.0)))


@_model("ChromaTransformer2DModel")
def _chroma(cls):
    m = cls(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=[4, 4, 8],
            approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1)
    return Case(m, _flux_kw(pooled=0))


@_model("BriaTransformer2DModel")
def _bria(cls):
    m = cls(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=None,
            axes_dims_rope=[0, 4, 4])
    return Case(m, _flux_kw(pooled=0))


@_model("BriaFiboTransformer2DModel")
def _bria_fibo(cls):
    m = cls(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, text_encoder_dim=8,
            pooled_projection_dim=None, axes_dims_rope=[0, 4, 4])
    kw = _flux_kw(pooled=0)
    ehs = kw["encoder_hidden_states"]
    kw["text_encoder_layers"] = [ehs[:, :, :8], ehs[:, :, 8:]]
    return Case(m, kw)


@_model("LongCatImageTransformer2DModel")
def _longcat_image(cls):
    m = cls(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
            axes_dims_rope=[4, 4, 8])
    kw = _flux_kw(pooled=0)
    kw["guidance"] = t(3.5)
    return Case(m, kw)


@_model("OvisImageTransformer2DModel")
def _ovis_image(cls):
    m = cls(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
            axes_dims_rope=(4, 4, 8))
    return Case(m, _flux_kw(pooled=0))


@_model("SD3Transformer2DModel")
def _sd3(cls):
    # SD3.5-like: a dual-attention (MMDiT-X) layer and RMS qk-norm
    m = cls(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
            pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8,
            dual_attention_layers=(0,), qk_norm="rms_norm")
    return Case(m, _sd3_kw())


@_model("AuraFlowTransformer2DModel")
def _auraflow(cls):
    m = cls(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
            attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
            joint_attention_dim=16, out_channels=4, pos_embed_max_size=16)
    return Case(m, dict(hidden_states=rnd(1, 4, 8, 8), encoder_hidden_states=rnd(1, 6, 16, seed=2),
                        timestep=t(10.0)))


@_model("PixArtTransformer2DModel")
def _pixart(cls):
    m = cls(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
            caption_channels=16, in_channels=4, cross_attention_dim=16, out_channels=8,
            attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    mask = torch.ones(1, 6)
    mask[0, 4:] = 0  # padded caption: an additive key mask
    return Case(m, dict(hidden_states=rnd(1, 4, 8, 8), encoder_hidden_states=rnd(1, 6, 16, seed=2),
                        timestep=t(10.0), encoder_attention_mask=mask,
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}))


@_model("DiTTransformer2DModel")
def _dit(cls):
    m = cls(in_channels=4, out_channels=8, activation_fn="gelu-approximate", num_attention_heads=2,
            attention_head_dim=4, attention_bias=True, num_layers=1, norm_type="ada_norm_zero",
            num_embeds_ada_norm=8, patch_size=2, sample_size=8)
    return Case(m, dict(hidden_states=rnd(1, 4, 8, 8), timestep=torch.tensor([10]),
                        class_labels=torch.tensor([1])))


@_model("Transformer2DModel")
def _transformer2d(cls):
    # the continuous-input, cross-attention variant used inside SD-style UNets
    m = cls(num_attention_heads=2, attention_head_dim=4, in_channels=8, num_layers=1,
            cross_attention_dim=8, norm_num_groups=4)
    return Case(m, dict(hidden_states=rnd(1, 8, 4, 4), encoder_hidden_states=rnd(1, 4, 8, seed=2)))


@_model("PriorTransformer")
def _prior(cls):
    m = cls(num_attention_heads=2, attention_head_dim=4, num_layers=2, embedding_dim=8,
            num_embeddings=7, additional_embeddings=4)
    return Case(m, dict(hidden_states=rnd(1, 8), timestep=2, proj_embedding=rnd(1, 8, seed=2),
                        encoder_hidden_states=rnd(1, 7, 8, seed=3)))


@_model("TransformerTemporalModel")
def _transformer_temporal(cls):
    m = cls(num_attention_heads=2, attention_head_dim=4, in_channels=4, num_layers=1,
            norm_num_groups=1)
    return Case(m, dict(hidden_states=rnd(2, 4, 4, 4), timestep=t(10.0), num_frames=2))


@_model("SanaTransformer2DModel")
def _sana(cls):
    m = cls(patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=4,
            num_attention_heads=2, num_cross_attention_heads=2, cross_attention_head_dim=4,
            cross_attention_dim=8, caption_channels=8, sample_size=8)
    return Case(m, _sana_kw())


@_model("SanaVideoTransformer3DModel")
def _sana_video(cls):
    m = cls(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
            num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=12,
            cross_attention_dim=24, caption_channels=16, mlp_ratio=2.5, sample_size=8,
            patch_size=(1, 2, 2), norm_elementwise_affine=False, norm_eps=1e-6,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return Case(m, _video_kw())


@_model("LatteTransformer3DModel")
def _latte(cls):
    m = cls(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=4, num_attention_heads=2,
            caption_channels=8, in_channels=4, cross_attention_dim=8, out_channels=8,
            attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
            video_length=2)
    kw = dict(hidden_states=rnd(1, 4, 2, 8, 8), encoder_hidden_states=rnd(1, 6, 8, seed=2),
              timestep=t(10.0), enable_temporal_attentions=True)
    return Case(m, kw)


@_model("AllegroTransformer3DModel")
def _allegro(cls):
    m = cls(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            num_layers=1, cross_attention_dim=16, sample_width=8, sample_height=8,
            sample_frames=8, caption_channels=8)
    kw = dict(hidden_states=rnd(1, 4, 2, 8, 8), encoder_hidden_states=rnd(1, 6, 8, seed=2),
              timestep=t(10.0))
    return Case(m, kw)


@_model("CogVideoXTransformer3DModel")
def _cogvideox(cls):
    m = cls(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            time_embed_dim=2, text_embed_dim=8, num_layers=1, sample_width=8, sample_height=8,
            sample_frames=8, patch_size=2, patch_size_t=None, temporal_compression_ratio=4,
            max_text_seq_length=6, use_rotary_positional_embeddings=True)
    return Case(m, _video_kw(f=1, dim=8, layout="bfchw"))


@_model("ConsisIDTransformer3DModel")
def _consisid(cls):
    m = cls(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            time_embed_dim=2, text_embed_dim=8, num_layers=1, sample_width=8, sample_height=8,
            sample_frames=8, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=6,
            cross_attn_interval=1, is_kps=False, is_train_face=True, cross_attn_dim_head=1,
            cross_attn_num_heads=1, LFE_id_dim=2, LFE_vit_dim=2, LFE_depth=5, LFE_dim_head=8,
            LFE_num_heads=2, LFE_num_id_token=1, LFE_num_querie=1, LFE_output_dim=10,
            LFE_ff_mult=1, LFE_num_scale=1)
    kw = _video_kw(f=1, dim=8, layout="bfchw")
    kw.update(id_vit_hidden=[rnd(1, 2, 2, seed=7)], id_cond=rnd(1, 2, seed=8))
    return Case(m, kw)


@_model("CogView3PlusTransformer2DModel")
def _cogview3plus(cls):
    m = cls(patch_size=2, in_channels=4, num_layers=1, attention_head_dim=4, num_attention_heads=2,
            out_channels=4, text_embed_dim=8, time_embed_dim=8, condition_dim=2,
            pos_embed_max_size=8, sample_size=8)
    s = torch.tensor([[64.0, 64.0]])
    return Case(m, dict(hidden_states=rnd(1, 4, 8, 8), encoder_hidden_states=rnd(1, 6, 8, seed=2),
                        original_size=s, target_size=s, crop_coords=torch.zeros(1, 2),
                        timestep=t(10.0)))


@_model("CogView4Transformer2DModel")
def _cogview4(cls):
    m = cls(patch_size=2, in_channels=4, num_layers=1, attention_head_dim=4, num_attention_heads=4,
            out_channels=4, text_embed_dim=8, time_embed_dim=8, condition_dim=4)
    s = torch.tensor([[64.0, 64.0]])
    return Case(m, dict(hidden_states=rnd(1, 4, 8, 8), encoder_hidden_states=rnd(1, 6, 8, seed=2),
                        original_size=s, target_size=s, crop_coords=torch.zeros(1, 2),
                        timestep=t(10.0)))


@_model("GlmImageTransformer2DModel")
def _glm_image(cls):
    m = cls(patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
            num_attention_heads=2, text_embed_dim=16, time_embed_dim=16, condition_dim=8,
            prior_vq_quantizer_codebook_size=64)
    return Case(m, dict(hidden_states=rnd(1, 4, 8, 8), encoder_hidden_states=rnd(1, 6, 16, seed=2),
                        prior_token_id=torch.tensor([3]),
                        prior_token_drop=torch.zeros(1, dtype=torch.bool),
                        timestep=t(10.0), target_size=torch.tensor([[8.0, 8.0]]),
                        crop_coords=torch.zeros(1, 2)))


@_model("HunyuanDiT2DModel")
def _hunyuan_dit(cls):
    m = cls(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
            num_attention_heads=2, cross_attention_dim=8, cross_attention_dim_t5=8,
            pooled_projection_dim=4, hidden_size=16, text_len=4, text_len_t5=4,
            activation_fn="gelu-approximate")
    return Case(m, _hunyuan_dit_kw())


@_model("LuminaNextDiT2DModel")
def _lumina_next(cls):
    m = cls(sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=1,
            num_attention_heads=3, num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None,
            norm_eps=1e-5, learn_sigma=False, qk_norm=True, cross_attention_dim=16,
            scaling_factor=1.0)
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina
    rope = get_2d_rotary_pos_embed_lumina(8, 16, 16)  # head_dim 8
    mask = torch.ones(1, 6)
    mask[0, 4:] = 0
    return Case(m, dict(hidden_states=rnd(1, 4, 8, 8), encoder_hidden_states=rnd(1, 6, 16, seed=2),
                        timestep=t(0.5), encoder_mask=mask, image_rotary_emb=rope,
                        cross_attention_kwargs={}))


@_model("Lumina2Transformer2DModel")
def _lumina2(cls):
    m = cls(sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=1,
            num_refiner_layers=1, num_attention_heads=3, num_kv_heads=1, multiple_of=2,
            ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=(4, 2, 2),
            axes_lens=(128, 128, 128), cap_feat_dim=16)
    mask = torch.ones(1, 6, dtype=torch.bool)
    mask[0, 4:] = False
    return Case(m, dict(hidden_states=rnd(1, 4, 8, 8), encoder_hidden_states=rnd(1, 6, 16, seed=2),
                        timestep=t(0.5), encoder_attention_mask=mask))


@_model("MochiTransformer3DModel")
def _mochi(cls):
    m = cls(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1,
            pooled_projection_dim=16, in_channels=4, out_channels=None, qk_norm="rms_norm",
            text_embed_dim=16, time_embed_dim=4, activation_fn="swiglu", max_sequence_length=8)
    mask = torch.ones(1, 6, dtype=torch.bool)
    mask[0, 4:] = False
    kw = _video_kw()
    kw["encoder_attention_mask"] = mask
    return Case(m, kw)


@_model("HunyuanVideoTransformer3DModel")
def _hunyuan_video(cls):
    m = cls(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
            num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1,
            guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
            rope_axes_dim=(2, 4, 4), image_condition_type=None)
    mask = torch.ones(1, 6)
    mask[0, 4:] = 0
    kw = _video_kw(f=1, hw=4)
    kw.update(pooled_projections=rnd(1, 8, seed=3), encoder_attention_mask=mask, guidance=t(3.5))
    return Case(m, kw)


@_model("HunyuanVideoFramepackTransformer3DModel")
def _hunyuan_framepack(cls):
    m = cls(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
            num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1,
            guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
            rope_axes_dim=(2, 4, 4), image_condition_type=None, has_image_proj=True,
            image_proj_dim=16, has_clean_x_embedder=True)
    f, hw = 3, 4
    kw = dict(hidden_states=rnd(1, 4, f, hw, hw), timestep=t(10.0),
              encoder_hidden_states=rnd(1, 6, 16, seed=2), pooled_projections=rnd(1, 8, seed=3),
              encoder_attention_mask=torch.ones(1, 6), guidance=t(3.5),
              image_embeds=rnd(1, 6, 16, seed=4), indices_latents=torch.arange(f).float(),
              latents_clean=rnd(1, 4, f - 1, hw, hw, seed=5),
              indices_latents_clean=torch.ones(f - 1),
              latents_history_2x=rnd(1, 4, f - 1, hw, hw, seed=6),
              indices_latents_history_2x=torch.ones(f - 1),
              latents_history_4x=rnd(1, 4, (f - 1) * 4, hw, hw, seed=7),
              indices_latents_history_4x=torch.ones((f - 1) * 4))
    return Case(m, kw)


@_model("HunyuanVideo15Transformer3DModel")
def _hunyuan_video15(cls):
    m = cls(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
            num_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
            text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(2, 2, 4),
            target_size=16, task_type="t2v")
    mask = torch.ones(1, 6)
    mask[0, 4:] = 0
    kw = _video_kw(f=1, hw=4)
    kw.update(encoder_hidden_states_2=rnd(1, 4, 8, seed=3), encoder_attention_mask=mask,
              encoder_attention_mask_2=torch.ones(1, 4), image_embeds=torch.zeros(1, 3, 12))
    return Case(m, kw)


@_model("HunyuanImageTransformer2DModel")
def _hunyuan_image(cls):
    m = cls(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
            num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1),
            text_embed_dim=16, rope_axes_dim=(4, 4))
    mask = torch.ones(1, 6)
    mask[0, 4:] = 0
    return Case(m, dict(hidden_states=rnd(1, 4, 4, 4), timestep=t(10.0),
                        encoder_hidden_states=rnd(1, 6, 16, seed=2), encoder_attention_mask=mask))


def _wan_cfg(**extra):
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
               out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1,
               cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    cfg.update(extra)
    return cfg


@_model("WanTransformer3DModel")
def _wan(cls):
    # Wan 2.1 I2V-like: image embeddings through the added-KV cross-attention
    # the image tokens are split off as everything before the last 512 (text) tokens
    m = cls(**_wan_cfg(image_dim=16, added_kv_proj_dim=24))
    kw = _video_kw(text=512)
    kw["encoder_hidden_states_image"] = rnd(1, 4, 16, seed=3)
    return Case(m, kw)


@_model("SkyReelsV2Transformer3DModel")
def _skyreels_v2(cls):
    return Case(cls(**_wan_cfg()), _video_kw())


@_model("ChronoEditTransformer3DModel")
def _chronoedit(cls):
    m = cls(**_wan_cfg(rope_temporal_skip_len=8))
    return Case(m, _video_kw())


@_model("WanVACETransformer3DModel")
def _wan_vace(cls):
    m = cls(**_wan_cfg(num_layers=2, vace_layers=[0], vace_in_channels=12))
    kw = _video_kw()
    kw["control_hidden_states"] = rnd(1, 12, 2, 8, 8, seed=4)
    return Case(m, kw)


@_model("HeliosTransformer3DModel")
def _helios(cls):
    cfg = _wan_cfg(rope_dim=(4, 4, 4), has_multi_term_memory_patch=True, guidance_cross_attn=True,
                   zero_history_timestep=True, is_amplify_history=False)
    del cfg["rope_max_seq_len"]
    m = cls(**cfg)
    f, hw = 2, 8
    kw = dict(hidden_states=rnd(1, 4, f, hw, hw), timestep=t(10.0),
              encoder_hidden_states=rnd(1, 6, 16, seed=2),
              indices_hidden_states=torch.ones(1, f),
              indices_latents_history_short=torch.ones(1, f - 1),
              indices_latents_history_mid=torch.ones(1, f - 1),
              indices_latents_history_long=torch.ones(1, (f - 1) * 4),
              latents_history_short=rnd(1, 4, f - 1, hw, hw, seed=3),
              latents_history_mid=rnd(1, 4, f - 1, hw, hw, seed=4),
              latents_history_long=rnd(1, 4, (f - 1) * 4, hw, hw, seed=5))
    return Case(m, kw)


@_model("AnyFlowTransformer3DModel")
def _anyflow(cls):
    m = cls(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
            out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1,
            cross_attn_norm=True, rope_max_seq_len=32, gate_value=0.25, deltatime_type="r")
    return Case(m, dict(hidden_states=rnd(1, 2, 4, 8, 8), timestep=torch.full((1, 2), 500.0),
                        r_timestep=torch.full((1, 2), 250.0),
                        encoder_hidden_states=rnd(1, 6, 16, seed=2)))


@_model("AnyFlowFARTransformer3DModel")
def _anyflow_far(cls):
    m = cls(patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4), full_chunk_limit=3,
            num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1, cross_attn_norm=True,
            rope_max_seq_len=32, gate_value=0.25, deltatime_type="r")
    # no attention_mask: the model builds its causal chunk mask itself
    return Case(m, dict(hidden_states=rnd(1, 2, 4, 8, 8), timestep=torch.full((1, 2), 500.0),
                        r_timestep=torch.full((1, 2), 250.0),
                        encoder_hidden_states=rnd(1, 6, 16, seed=2), chunk_partition=[1, 1]))


@_model("QwenImageTransformer2DModel")
def _qwenimage(cls):
    m = cls(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False,
            axes_dims_rope=(8, 4, 4))
    return Case(m, _qwenimage_kw())


@_model("NucleusMoEImageTransformer2DModel")
def _nucleus_moe(cls):
    m = cls(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
            moe_enabled=True, capacity_factors=[8.0, 8.0])
    return Case(m, _qwenimage_kw())


@_model("ZImageTransformer2DModel")
def _z_image(cls):
    m = cls(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=16, n_layers=1,
            n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=16,
            rope_theta=256.0, t_scale=1000.0, axes_dims=[4, 2, 2], axes_lens=[64, 16, 16])
    return Case(m, dict(x=[rnd(16, 1, 8, 8)], cap_feats=[rnd(6, 16, seed=2)], t=t(0.5)))


@_model("ErnieImageTransformer2DModel")
def _ernie_image(cls):
    m = cls(hidden_size=16, num_attention_heads=2, num_layers=1, ffn_hidden_size=16,
            in_channels=16, out_channels=16, patch_size=1, text_in_dim=16, rope_theta=256,
            rope_axes_dim=(4, 2, 2), eps=1e-6, qk_layernorm=True)
    return Case(m, dict(hidden_states=rnd(1, 16, 4, 4), timestep=t(1.0),
                        text_bth=rnd(1, 6, 16, seed=2), text_lens=torch.tensor([4])))


@_model("EasyAnimateTransformer3DModel")
def _easyanimate(cls):
    m = cls(attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=1,
            num_layers=1, out_channels=4, patch_size=2, sample_height=60, sample_width=90,
            text_embed_dim=16, time_embed_dim=8, time_position_encoding_type="3d_rope",
            timestep_activation_fn="silu")
    return Case(m, dict(hidden_states=rnd(1, 4, 2, 8, 8), timestep=t(10.0), timestep_cond=None,
                        encoder_hidden_states=rnd(1, 6, 16, seed=2), encoder_hidden_states_t5=None,
                        inpaint_latents=None, control_latents=None))


@_model("OmniGenTransformer2DModel")
def _omnigen(cls):
    m = cls(hidden_size=16, num_attention_heads=4, num_key_value_heads=4, intermediate_size=32,
            num_layers=2, pad_token_id=0, vocab_size=64, in_channels=4, time_step_dim=4,
            rope_scaling={"long_factor": list(range(1, 3)), "short_factor": list(range(1, 3))})
    text, hw = 6, 8
    n = text + 1 + hw * hw // 4
    return Case(m, dict(hidden_states=rnd(1, 4, hw, hw), timestep=t(0.5),
                        input_ids=ids(1, text, high=10), input_img_latents=[],
                        input_image_sizes={}, attention_mask=torch.ones(1, n, n).tril(),
                        position_ids=torch.arange(n)[None]))


@_model("AceStepTransformer1DModel")
def _ace_step(cls):
    m = cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, in_channels=24, audio_acoustic_hidden_dim=8,
            patch_size=2, rope_theta=10000.0, rms_norm_eps=1e-6, sliding_window=4)
    return Case(m, dict(hidden_states=rnd(1, 8, 8), timestep=t(0.5), timestep_r=t(0.25),
                        encoder_hidden_states=rnd(1, 6, 32, seed=2),
                        context_latents=rnd(1, 8, 16, seed=3)))


def _cosmos_kw(text_dim=16):
    return dict(hidden_states=rnd(1, 4, 1, 8, 8), timestep=t(10.0),
                encoder_hidden_states=rnd(1, 6, text_dim, seed=2), attention_mask=torch.ones(1, 6),
                fps=30, padding_mask=torch.zeros(1, 1, 8, 8))


@_model("CosmosTransformer3DModel")
def _cosmos(cls):
    # concat_padding_mask resizes the mask with torchvision, which the CPU suite does not install
    m = cls(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
            num_layers=1, mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 16, 16),
            patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False,
            extra_pos_embed_type="learnable")
    return Case(m, dict(hidden_states=rnd(1, 4, 1, 8, 8), timestep=t(10.0),
                        encoder_hidden_states=rnd(1, 6, 16, seed=2),
                        attention_mask=torch.ones(1, 6), fps=30))


@_model("CosmosControlNetModel")
def _cosmos_controlnet(cls):
    # diffusers resizes the padding mask with torchvision here, unconditionally (not a dependency
    # of attnpatch or of diffusers' core): without it the model cannot run at all
    pytest.importorskip("torchvision", reason="CosmosControlNetModel.forward needs torchvision")
    m = cls(n_controlnet_blocks=1, in_channels=4 + 1 + 1, latent_channels=4 + 1 + 1,
            model_channels=32, num_attention_heads=2, attention_head_dim=16, mlp_ratio=2,
            text_embed_dim=16, adaln_lora_dim=4, patch_size=(1, 2, 2), max_size=(4, 16, 16),
            rope_scale=(2.0, 1.0, 1.0), extra_pos_embed_type=None, img_context_dim_in=16,
            img_context_dim_out=32, use_crossattn_projection=False)
    kw = dict(controls_latents=rnd(1, 4, 1, 8, 8), latents=rnd(1, 4, 1, 8, 8, seed=2),
              timestep=t(0.5),
              encoder_hidden_states=(rnd(1, 6, 16, seed=3), rnd(1, 2, 16, seed=4)),
              condition_mask=torch.ones(1, 1, 1, 8, 8), conditioning_scale=1.0)
    return Case(m, kw)  # no padding_mask: its resize needs torchvision


@_model("Cosmos3OmniTransformer")
def _cosmos3(cls):
    m = cls(head_dim=6, hidden_act="relu2", hidden_size=12, intermediate_size=24, latent_channel=2,
            latent_patch_size=1, num_attention_heads=2, num_hidden_layers=1, num_key_value_heads=1,
            patch_latent_dim=2, qk_norm_for_text=False, rms_norm_eps=1e-5, rope_axes_dim=[1, 1, 1],
            rope_theta=1e8, vocab_size=32)
    h = w = 2
    n = 2 + h * w
    vision = torch.arange(2, n)
    kw = dict(input_ids=torch.tensor([1, 2]), text_indexes=torch.tensor([0, 1]),
              position_ids=torch.zeros(3, n, dtype=torch.long), und_len=2, sequence_length=n,
              vision_tokens=[rnd(1, 2, 1, h, w)], vision_token_shapes=[(1, h, w)],
              vision_sequence_indexes=vision, vision_mse_loss_indexes=vision,
              vision_timesteps=torch.ones(h * w), vision_noisy_frame_indexes=[torch.tensor([0])])
    return Case(m, kw)


@_model("HiDreamImageTransformer2DModel")
def _hidream(cls):
    m = cls(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
            attention_head_dim=8, num_attention_heads=2, caption_channels=[8, 4], text_emb_dim=8,
            num_routed_experts=2, num_activated_experts=2, axes_dims_rope=(4, 2, 2),
            max_resolution=(8, 8), llama_layers=(0, 1), force_inference_output=True)
    return Case(m, dict(hidden_states=rnd(1, 4, 8, 8), timesteps=t(10.0),
                        encoder_hidden_states_t5=rnd(1, 6, 8, seed=2),
                        encoder_hidden_states_llama3=rnd(2, 1, 6, 4, seed=3),
                        pooled_embeds=rnd(1, 8, seed=4)))


@_model("Ideogram4Transformer2DModel")
def _ideogram4(cls):
    from diffusers.models.transformers import transformer_ideogram4 as mod
    m = cls(in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=4,
            intermediate_size=32, adaln_dim=16, llm_features_dim=24, rope_theta=10_000,
            mrope_section=(2, 1, 1), norm_eps=1e-5)
    text, img = 4, 4
    n = text + img
    hs = torch.zeros(1, n, 16)
    hs[:, text:] = rnd(1, img, 16)
    ehs = torch.zeros(1, n, 24)
    ehs[:, :text] = rnd(1, text, 24, seed=2)
    pos = torch.zeros(1, n, 3, dtype=torch.long)
    pos[:, :text] = torch.arange(text)[:, None]
    off = mod.IMAGE_POSITION_OFFSET
    pos[:, text:, 0] = off
    pos[:, text:, 1] = torch.tensor([0, 0, 1, 1]) + off
    pos[:, text:, 2] = torch.tensor([0, 1, 0, 1]) + off
    indicator = torch.empty(1, n, dtype=torch.long)
    indicator[:, :text] = mod.LLM_TOKEN_INDICATOR
    indicator[:, text:] = mod.OUTPUT_IMAGE_INDICATOR
    return Case(m, dict(hidden_states=hs, encoder_hidden_states=ehs, timestep=t(0.5),
                        position_ids=pos, segment_ids=torch.ones(1, n, dtype=torch.long),
                        indicator=indicator))


@_model("JoyImageEditTransformer3DModel")
def _joyimage(cls):
    m = cls(patch_size=[1, 2, 2], in_channels=16, hidden_size=32, num_attention_heads=2,
            text_dim=16, num_layers=1, rope_dim_list=[4, 6, 6], theta=256)
    kw = dict(hidden_states=rnd(1, 16, 1, 4, 4), encoder_hidden_states=rnd(1, 6, 16, seed=2),
              timestep=t(1.0))
    return Case(m, kw)


@_model("JoyImageEditPlusTransformer3DModel")
def _joyimage_plus(cls):
    m = cls(patch_size=[1, 2, 2], in_channels=16, hidden_size=32, num_attention_heads=2,
            text_dim=16, num_layers=1, rope_dim_list=[4, 6, 6], theta=256)
    kw = dict(hidden_states=rnd(1, 2, 16, 1, 2, 2), encoder_hidden_states=rnd(1, 6, 16, seed=2),
              timestep=t(1.0), shape_list=[[(1, 1, 1), (1, 1, 1)]])
    return Case(m, kw)


@_model("Krea2Transformer2DModel")
def _krea2(cls):
    m = cls(in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16,
            num_text_layers=3, text_num_attention_heads=2, text_num_key_value_heads=1,
            text_intermediate_size=16, num_layerwise_text_blocks=1, num_refiner_text_blocks=1,
            axes_dims_rope=(4, 2, 2), rope_theta=1000.0, norm_eps=1e-5)
    text, h = 4, 2
    pos = torch.zeros(text + h * h, 3)
    pos[text:, 1] = torch.arange(h).repeat_interleave(h)
    pos[text:, 2] = torch.arange(h).repeat(h)
    mask = torch.ones(1, text, dtype=torch.bool)
    mask[:, -1] = False
    kw = dict(hidden_states=rnd(1, h * h, 16), encoder_hidden_states=rnd(1, text, 3, 16, seed=2),
              timestep=t(0.5), position_ids=pos, encoder_attention_mask=mask)
    return Case(m, kw)


@_model("LongCatAudioDiTTransformer")
def _longcat_audio_dit(cls):
    m = cls(dit_dim=32, dit_depth=1, dit_heads=2, dit_text_dim=16, latent_dim=8, text_conv=False)
    emask = torch.ones(1, 6, dtype=torch.bool)
    emask[:, 4:] = False
    return Case(m, dict(hidden_states=rnd(1, 8, 8), encoder_hidden_states=rnd(1, 6, 16, seed=2),
                        encoder_attention_mask=emask,
                        attention_mask=torch.ones(1, 8, dtype=torch.bool),
                        timestep=t(1.0)))


@_model("LTXVideoTransformer3DModel")
def _ltx(cls):
    m = cls(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
            cross_attention_dim=16, num_layers=1, qk_norm="rms_norm_across_heads",
            caption_channels=16)
    mask = torch.ones(1, 6)
    mask[:, 4:] = 0
    kw = dict(hidden_states=rnd(1, 2 * 4 * 4, 4), encoder_hidden_states=rnd(1, 6, 16, seed=2),
              timestep=t(10.0), encoder_attention_mask=mask, num_frames=2, height=4, width=4)
    return Case(m, kw)


@_model("LTX2VideoTransformer3DModel")
def _ltx2(cls):
    m = cls(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
            attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4,
            audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
            audio_cross_attention_dim=8, num_layers=1, qk_norm="rms_norm_across_heads",
            caption_channels=16, rope_double_precision=False)
    mask = torch.ones(1, 6)
    mask[:, 4:] = 0
    kw = dict(hidden_states=rnd(1, 2 * 4 * 4, 4), audio_hidden_states=rnd(1, 5, 4, seed=2),
              encoder_hidden_states=rnd(1, 6, 16, seed=3),
              audio_encoder_hidden_states=rnd(1, 6, 16, seed=4), timestep=t(100.0),
              encoder_attention_mask=mask, num_frames=2, height=4, width=4, audio_num_frames=5,
              fps=25.0)
    return Case(m, kw)


@_model("MiniMaxH3Transformer3DModel")
def _minimax_h3(cls):
    m = cls(num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=1,
            num_refiner_layers=1, ffn_dim=32, in_channels=4, audio_in_channels=6,
            patch_size=(1, 2, 2), text_dim=8, freq_dim=8, time_embed_hidden_dim=24,
            time_embed_dim=16, rope_freq_dim=2)
    n_text, n_audio, n_video = 4, 6, 8
    n = n_text + n_audio + n_video
    text_i = torch.arange(n_text)
    audio_i = torch.arange(n_text, n_text + n_audio)
    video_i = torch.arange(n_text + n_audio, n)
    tags = torch.empty(n, dtype=torch.long)
    tags[text_i], tags[audio_i], tags[video_i] = 1, 2, 0
    t_idx = torch.zeros(n, dtype=torch.long)
    t_idx[audio_i] = 1
    pos = torch.zeros(n, 3)
    pos[:, 0] = torch.arange(n).float()
    pos[video_i, 1] = (torch.arange(n_video) % 4).float()
    pos[video_i, 2] = (torch.arange(n_video) % 2).float()
    kw = dict(hidden_states=rnd(1, n_video, 16), audio_hidden_states=rnd(1, n_audio, 6, seed=2),
              encoder_hidden_states=rnd(1, n_text, 8, seed=3), timestep=t(0.7, 0.3),
              timestep_indices=t_idx, token_tags=tags, position_ids=pos, video_indices=video_i,
              audio_indices=audio_i, text_indices=text_i)
    return Case(m, kw)


@_model("MiniMaxMusic3Transformer1DModel")
def _minimax_music3(cls):
    m = cls(in_channels=8, condition_dim=16, num_layers=1, num_attention_heads=2,
            attention_head_dim=8, ff_inner_dim=32, rotary_dim=4, fourier_embedding_dim=8)
    return Case(m, dict(hidden_states=rnd(1, 8, 12), encoder_hidden_states=rnd(1, 12, 16, seed=2),
                        timestep=t(0.5)))


@_model("MotifVideoTransformer3DModel")
def _motif_video(cls):
    m = cls(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=12,
            num_layers=1, num_single_layers=1, num_decoder_layers=0, mlp_ratio=4.0, patch_size=1,
            patch_size_t=1, qk_norm="rms_norm", norm_type="layer_norm", text_embed_dim=16,
            image_embed_dim=4, rope_theta=256.0, rope_axes_dim=(4, 4, 4),
            enable_text_cross_attention_dual=False, enable_text_cross_attention_single=False)
    kw = dict(hidden_states=rnd(1, 9, 1, 4, 4), encoder_hidden_states=rnd(1, 6, 16, seed=2),
              timestep=t(10.0))
    return Case(m, kw)


@_model("PRXTransformer2DModel")
def _prx(cls):
    m = cls(in_channels=4, patch_size=2, context_in_dim=16, hidden_size=32, mlp_ratio=2.0,
            num_heads=2, depth=1, axes_dim=[8, 8], theta=10_000)
    return Case(m, dict(hidden_states=rnd(1, 4, 8, 8), timestep=t(1.0),
                        encoder_hidden_states=rnd(1, 6, 16, seed=2)))


@_model("StableAudioDiTModel")
def _stable_audio(cls):
    from diffusers.models.embeddings import get_1d_rotary_pos_embed
    m = cls(sample_size=8, in_channels=3, num_layers=1, attention_head_dim=4,
            num_attention_heads=2, num_key_value_attention_heads=1, out_channels=3,
            cross_attention_dim=4, time_proj_dim=8, global_states_input_dim=8,
            cross_attention_input_dim=4)
    rope = get_1d_rotary_pos_embed(2, 8 + 1, use_real=True, repeat_interleave_real=False)
    return Case(m, dict(hidden_states=rnd(1, 3, 8), timestep=t(10.0),
                        encoder_hidden_states=rnd(1, 5, 4, seed=2),
                        global_hidden_states=rnd(1, 1, 8, seed=3), rotary_embedding=rope))


@_model("StableAudio3DiTModel")
def _stable_audio3(cls):
    m = cls(io_channels=8, patch_size=1, embed_dim=32, depth=1, num_heads=4, cond_token_dim=16,
            global_cond_dim=12, local_add_cond_dim=5, timestep_features_dim=16, ff_mult=2,
            num_memory_tokens=3, use_differential_attention=True)
    return Case(m, dict(hidden_states=rnd(1, 8, 16), timestep=t(0.5),
                        encoder_hidden_states=rnd(1, 4, 16, seed=2),
                        global_hidden_states=rnd(1, 12, seed=3)))


@_model("WanAnimateTransformer3DModel")
def _wan_animate(cls):
    m = cls(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12,
            latent_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", image_dim=16,
            rope_max_seq_len=32, motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16},
            motion_encoder_size=16, motion_style_dim=8, motion_dim=4, motion_encoder_dim=16,
            face_encoder_hidden_dim=16, face_encoder_num_heads=2, inject_face_latents_blocks=1)
    frames = 1  # latent frames of the segment; the reference frame comes first
    kw = dict(hidden_states=rnd(1, 12, frames + 1, 8, 8), timestep=t(10.0),
              encoder_hidden_states=rnd(1, 6, 16, seed=2),
              encoder_hidden_states_image=rnd(1, 4, 16, seed=3),
              pose_hidden_states=rnd(1, 4, frames, 8, 8, seed=4),
              face_pixel_values=rnd(1, 3, 4 * frames, 16, 16, seed=5))
    return Case(m, kw)


@_model("WanAnimate2Transformer3DModel")
def _wan_animate2(cls):
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache
    m = cls(patch_size=(1, 2, 2), text_len=8, in_dim=16 + 20, dim=32, ffn_dim=32, freq_dim=32,
            text_dim=32, out_dim=16, num_heads=2, num_layers=1, cross_attn_norm=True,
            use_img_emb=True)
    f, h, w = 2, 4, 4
    kw = dict(hidden_states=[rnd(16, f, h, w)], timestep=t(1.0),
              encoder_hidden_states=[rnd(8, 32, seed=2)],
              condition_latents=[rnd(20, f, h, w, seed=3)],
              encoder_hidden_states_image=rnd(1, 4, 1280, seed=4), kv_cache_mode="extract",
              seq_len=f * (h // 2) * (w // 2),
              offset_grid_sizes=torch.tensor([[f, h // 2, w // 2]]))
    # the reference pass writes every layer's K/V into the cache: a fresh one per forward
    return Case(m, kw, call=lambda mod, k: mod(**k, kv_cache=WanAnimate2KVCache(1)))


@_model("ZImageControlNetModel")
def _z_image_controlnet(cls):
    # the controlnet borrows its embedders and refiners from a Z-Image transformer
    transformer = _z_image(_lookup("ZImageTransformer2DModel", "diffusers")).model
    m = cls(control_layers_places=[0], control_refiner_layers_places=[0], control_in_dim=16,
            add_control_noise_refiner=None, all_patch_size=(2,), all_f_patch_size=(1,), dim=16,
            n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True)
    m = cls.from_transformer(m, transformer)
    return Case(m, dict(x=[rnd(16, 1, 8, 8)], t=t(0.5), cap_feats=[rnd(6, 16, seed=2)],
                        control_context=[rnd(16, 1, 8, 8, seed=3)]))


@_model("Flux3Transformer2DModel")
def _flux3(cls):
    m = cls(in_channels=4, cond_in_channels=4, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
            timestep_channels=32, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4))
    img_ids, txt_ids = _flux2_ids()
    cond_ids = img_ids[0].clone()
    cond_ids[:, 0] = 1
    return Case(m, dict(hidden_states=rnd(1, 16, 4), encoder_hidden_states=rnd(1, 6, 16, seed=2),
                        timestep=t(0.5), img_ids=img_ids[0], txt_ids=txt_ids[0],
                        image_cond_hidden_states=rnd(1, 16, 4, seed=3), image_cond_ids=cond_ids))


@_model("BriaFibo2Transformer2DModel")
def _bria_fibo2(cls):
    m = cls(in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
            cap_feat_dim=16, injection_layer_ids=(1,), perceiver_num_layers=1,
            min_num_gist_tokens=2, max_num_gist_tokens=4, gist_step=2, gist_min_text_len=2,
            gist_max_text_len=8, axes_dims=(4, 6, 6), axes_lens=(64, 16, 16))
    mask = torch.ones(1, 6, dtype=torch.bool)
    mask[:, 4:] = False
    return Case(m, dict(hidden_states=rnd(1, 4, 8, 8), timestep=t(0.5),
                        encoder_hidden_states=rnd(1, 2, 6, 16, seed=2),
                        encoder_attention_mask=mask))


@_model("QwenImage21Transformer2DModel")
def _qwenimage21(cls):
    m = cls(patch_size=1, in_channels=8, out_channels=8, num_layers=1, attention_head_dim=16,
            num_attention_heads=2, context_in_dim=16, mlp_ratio=2, axes_dims_rope=(4, 6, 6))
    # 4 text tokens, then the target image's slot: one slot stands for 2x2 latent tokens
    img_mask = torch.tensor([[False, False, False, False, True]])
    text_mask = torch.ones(1, 4, dtype=torch.bool)
    text_mask[:, 3:] = False
    return Case(m, dict(hidden_states=rnd(1, 4, 8), encoder_hidden_states=rnd(1, 4, 16, seed=2),
                        timestep=t(0.5), img_shapes=[[(1, 2, 2)]], img_mask=img_mask,
                        encoder_hidden_states_mask=text_mask))


@_model("Kandinsky5Transformer3DModel")
def _kandinsky5(cls):
    m = cls(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4,
            patch_size=(1, 2, 2), model_dim=16, ff_dim=32, num_text_blocks=1, num_visual_blocks=1,
            axes_dims=(2, 2, 4), visual_cond=False, attention_type="regular")
    f, hw = 2, 8
    kw = dict(hidden_states=rnd(1, f, hw, hw, 4), encoder_hidden_states=rnd(1, 6, 16, seed=2),
              timestep=t(10.0), pooled_projections=rnd(1, 8, seed=3),
              visual_rope_pos=[torch.arange(f), torch.arange(hw // 2), torch.arange(hw // 2)],
              text_rope_pos=torch.arange(6), scale_factor=(1.0, 1.0, 1.0))
    return Case(m, kw)


@_model("Kandinsky6Transformer3DModel")
def _kandinsky6(cls):
    m = cls(in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16,
            patch_size=(1, 2, 2), model_dim=16, ff_dim=32, num_text_blocks=1, num_visual_blocks=1,
            axes_dims=(2, 2, 4), visual_cond=True, in_audio_dim=4, out_audio_dim=4)
    mask = torch.ones(1, 6, dtype=torch.bool)
    mask[:, 4:] = False
    kw = dict(hidden_states=rnd(1, 2, 8, 8, 9), encoder_hidden_states=rnd(1, 6, 16, seed=2),
              pooled_projections=rnd(1, 8, seed=3), timestep=t(10.0),
              audio_hidden_states=rnd(1, 4, 4, seed=4), encoder_attention_mask=mask)
    return Case(m, kw)


@_model("Kandinsky6SRTransformer3DModel")
def _kandinsky6_sr(cls):
    # NABLA block-sparse attention on the flex backend: the token grid must be a multiple of 8
    m = cls(in_visual_dim=4, out_visual_dim=4, time_dim=16, patch_size=(1, 1, 1), model_dim=16,
            ff_dim=32, num_visual_blocks=1, axes_dims=(2, 2, 4), nabla_window=(3, 3, 3))
    return Case(m, dict(hidden_states=rnd(1, 1, 8, 8, 9), timestep=t(10.0)))


@_model("Kandinsky6SRLatentUpscalerBank", no_softmax="convolutional latent upscalers, no attention")
def _kandinsky6_sr_upscaler(cls):
    m = cls(in_channels=4, stage_channels=(16, 8, 8), num_pre_blocks=1, num_mid_blocks=1,
            num_post_blocks=1, num_x2_adapter_blocks=1, scales=(2,))
    return Case(m, dict(latents=rnd(1, 4, 1, 4, 4), scale=2))


@_model("SanaWMTransformer3DModel")
def _sana_wm(cls):
    m = cls(in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2,
            softmax_every_n=2, linear_head_dim=16, caption_channels=16, image_size=64,
            chunk_plucker_post_attn_blocks=0, use_chunk_plucker_post_attn=False,
            mixed_precision="fp32")
    f, hw = 2, 4
    return Case(m, dict(hidden_states=rnd(1, 4, f, hw, hw), timestep=torch.full((1, 1, f), 10.0),
                        encoder_hidden_states=rnd(1, 1, 6, 16, seed=2),
                        encoder_attention_mask=torch.ones(1, 6)))


@_model("SanaWMLTX2RefinerTransformer3DModel")
def _sana_wm_refiner(cls):
    m = cls(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
            cross_attention_dim=16, audio_in_channels=4, audio_num_attention_heads=2,
            audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=1,
            caption_channels=16, rope_double_precision=False)
    f, hw = 2, 4
    rope = m.build_rotary_emb_for_absolute_positions(1, list(range(f)), hw, hw, torch.device("cpu"),
                                                      fps=24.0)
    kw = dict(hidden_states=rnd(1, f * hw * hw, 4), encoder_hidden_states=rnd(1, 6, 16, seed=2),
              timestep=torch.full((1, f * hw * hw), 100.0), video_rotary_emb=rope,
              encoder_attention_mask=torch.ones(1, 6))
    return Case(m, kw)


@_model("RFD4ProteinaTransformer")
def _rfd4_transformer(cls):
    m = cls(nlayers=1, token_dim=16, nheads=2, dim_cond=8, pair_repr_dim=8, latent_dim=4,
            token_type_emb_dim=4, cath_emb_dim=4, t_emb_dim=8, seq_sep_dim=4, xt_pair_dist_dim=4,
            update_pair_repr_every_n=1, tri_mult_c=8, num_sequence_classes=4, num_token_types=2,
            feats_seq=("xt_bb_ca", "xt_local_latents", "token_type"),
            feats_cond_seq=("time_emb_bb_ca", "time_emb_local_latents"),
            feats_pair_repr=("xt_bb_ca_pair_dists",), feats_pair_cond=("time_emb_bb_ca",))
    n = 6
    kw = dict(bb_ca=rnd(1, n, 3), local_latents=rnd(1, n, 4, seed=2), bb_ca_time=t(0.5),
              local_latents_time=t(0.5), padding_mask=torch.ones(1, n, dtype=torch.bool),
              token_type=torch.zeros(1, n, dtype=torch.long),
              conditioning=dict(is_in_context_conditioning=torch.zeros(1, n, dtype=torch.bool),
                                supports_local_latent=torch.ones(1, n, dtype=torch.bool)))
    return Case(m, kw)


@_model("DreamLiteTransformer2DModel")
def _dreamlite_transformer(cls):
    m = cls(num_attention_heads=2, attention_head_dim=8, in_channels=16, num_layers=1,
            norm_num_groups=4, cross_attention_dim=8, qk_norm="rms_norm")
    return Case(m, dict(hidden_states=rnd(1, 16, 4, 4), encoder_hidden_states=rnd(1, 4, 8, seed=2)))


@_model("T5FilmDecoder")
def _t5_film(cls):
    m = cls(input_dims=8, targets_length=8, d_model=16, num_layers=1, num_heads=2, d_kv=8,
            d_ff=32, dropout_rate=0.0)
    enc_mask = torch.ones(1, 6, dtype=torch.bool)
    enc_mask[:, 4:] = False
    return Case(m, dict(encodings_and_masks=[(rnd(1, 6, 16, seed=2), enc_mask)],
                        decoder_input_tokens=rnd(1, 8, 8), decoder_noise_time=t(0.5)))


@_model("AnimaTextConditioner")
def _anima(cls):
    m = cls(source_dim=16, target_dim=16, model_dim=16, num_layers=1, num_attention_heads=2,
            mlp_ratio=2.0, target_vocab_size=64, use_self_attention=True, min_sequence_length=8)
    mask = torch.ones(1, 6, dtype=torch.long)
    mask[:, 4:] = 0
    return Case(m, dict(source_hidden_states=rnd(1, 6, 16), target_input_ids=ids(1, 6),
                        target_attention_mask=mask,
                        source_attention_mask=torch.ones(1, 6, dtype=torch.long)))


@_model("MiniMaxMusic3ConditionEncoder",
        no_softmax="mixes layers with a softmax over learned weights; no attention")
def _minimax_music3_condition(cls):
    m = cls(condition_hidden_dim=8, num_condition_layers=2, out_dim=8)
    return Case(m, dict(hidden_states=rnd(1, 4, 16)))


@_model("MiniMaxMusic3RVQDepthDecoder")
def _minimax_music3_rvq(cls):
    m = cls(hidden_size=16, num_layers=1, num_attention_heads=2, intermediate_size=32,
            audio_vocab_size=16, num_codebooks=2, max_position_embeddings=4)
    return Case(m, dict(inputs_embeds=rnd(1, 3, 16)))


# === transformers: the text / image encoders diffusers pipelines load ==========================

def _text(ids_shape=(2, 7), vocab=64):
    """Right-padded batch: row 1 has two padding tokens (their output rows are not compared)."""
    input_ids = ids(*ids_shape, high=vocab)
    mask = torch.ones(*ids_shape, dtype=torch.long)
    mask[1, -2:] = 0
    return dict(input_ids=input_ids, attention_mask=mask), mask.bool()


def _tf(name: str):
    return _model(name, library="transformers")


def _decoder_cfg(**extra):
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    cfg.update(extra)
    return cfg


@_tf("CLIPTextModel")
def _clip_text(cls):
    from transformers import CLIPTextConfig
    m = cls(CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                           eos_token_id=2, pad_token_id=1))
    kw, valid = _text()
    return Case(m, kw, valid=valid)


@_tf("CLIPVisionModelWithProjection")
def _clip_vision(cls):
    from transformers import CLIPVisionConfig
    m = cls(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, image_size=8, patch_size=4, num_channels=3,
                             projection_dim=8))
    return Case(m, dict(pixel_values=rnd(1, 3, 8, 8)))


@_tf("SiglipVisionModel")
def _siglip_vision(cls):
    # vision_use_head: the pooling head attends with torch.nn.MultiheadAttention
    from transformers import SiglipVisionConfig
    m = cls(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=2, image_size=8, patch_size=4, num_channels=3,
                               vision_use_head=True))
    return Case(m, dict(pixel_values=rnd(1, 3, 8, 8)))


@_tf("T5EncoderModel")
def _t5_encoder(cls):
    from transformers import T5Config
    m = cls(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                     relative_attention_num_buckets=8, dropout_rate=0.0))
    kw, valid = _text()
    return Case(m, kw, valid=valid)


@_tf("UMT5EncoderModel")
def _umt5_encoder(cls):
    from transformers import UMT5Config
    m = cls(UMT5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                       relative_attention_num_buckets=8, dropout_rate=0.0))
    kw, valid = _text()
    return Case(m, kw, valid=valid)


@_tf("BertModel")
def _bert(cls):
    from transformers import BertConfig
    m = cls(BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=16))
    kw, valid = _text()
    return Case(m, kw, valid=valid)


@_tf("LlamaModel")
def _llama(cls):
    from transformers import LlamaConfig
    kw, valid = _text()
    return Case(cls(LlamaConfig(**_decoder_cfg())), kw, valid=valid)


@_tf("MistralModel")
def _mistral(cls):
    from transformers import MistralConfig
    kw, valid = _text()
    return Case(cls(MistralConfig(**_decoder_cfg(sliding_window=4))), kw, valid=valid)


@_tf("Qwen2Model")
def _qwen2(cls):
    from transformers import Qwen2Config
    kw, valid = _text()
    return Case(cls(Qwen2Config(**_decoder_cfg())), kw, valid=valid)


@_tf("Qwen3Model")
def _qwen3(cls):
    from transformers import Qwen3Config
    kw, valid = _text()
    return Case(cls(Qwen3Config(**_decoder_cfg(head_dim=8))), kw, valid=valid)


@_tf("Gemma2Model")
def _gemma2(cls):
    # attention logits soft-capped (attn_logit_softcapping), sliding-window layers interleaved
    from transformers import Gemma2Config
    m = cls(Gemma2Config(**_decoder_cfg(head_dim=8, sliding_window=4)))
    kw, valid = _text()
    return Case(m, kw, valid=valid)


@_tf("Qwen2_5_VLTextModel")
def _qwen2_5_vl_text(cls):
    from transformers import Qwen2_5_VLTextConfig
    cfg = Qwen2_5_VLTextConfig(**_decoder_cfg(rope_scaling={"type": "mrope",
                                                            "mrope_section": [1, 1, 2]},
                                              bos_token_id=0, eos_token_id=2))
    kw, valid = _text()
    return Case(cls(cfg), kw, valid=valid)
