"""Tiny random diffusers/transformers models and pipelines built from configs (nothing is
downloaded), and a counting attnpatch backend that proves every module was routed."""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
import torch.nn.functional as F

import attnpatch

warnings.filterwarnings("ignore", message=".*deprecated.*")
logging.getLogger("diffusers").setLevel(logging.ERROR)
logging.getLogger("transformers").setLevel(logging.ERROR)

B = 2


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    """A reproducible random tensor (its own generator: no global seed involved)."""
    return torch.randn(*shape, generator=_gen(seed))


def seeded(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``module`` in eval mode with random weights everywhere (zero-initialized layers would make
    "equal" prove nothing)."""
    g = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


# --- diffusers models: (model, forward kwargs) ------------------------------------------------

def sd15():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    m = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2)
    kw = dict(sample=randn(B, 4, 16, 16, seed=1), timestep=torch.tensor([10] * B),
              encoder_hidden_states=randn(B, 7, 16, seed=2))
    return m.eval(), kw


def sdxl():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    m = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 16)
    kw = dict(sample=randn(B, 4, 16, 16, seed=1), timestep=torch.tensor([10] * B),
              encoder_hidden_states=randn(B, 7, 16, seed=2),
              added_cond_kwargs={"text_embeds": randn(B, 16, seed=3),
                                 "time_ids": randn(B, 6, seed=4)})
    return m.eval(), kw


def sd3():
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    m = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16)
    kw = dict(hidden_states=randn(B, 4, 16, 16, seed=1),
              encoder_hidden_states=randn(B, 7, 16, seed=2),
              pooled_projections=randn(B, 16, seed=3), timestep=torch.tensor([10] * B))
    return m.eval(), kw


def flux_ids(h=4, w=4):
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(-1, 3)


def flux():
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    m = FluxTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
        pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(4, 4, 8))
    kw = dict(hidden_states=randn(B, 16, 4, seed=1), encoder_hidden_states=randn(B, 7, 16, seed=2),
              pooled_projections=randn(B, 16, seed=3), timestep=torch.tensor([0.5] * B),
              img_ids=flux_ids(), txt_ids=torch.zeros(7, 3))
    return m.eval(), kw


def pixart():
    from diffusers import PixArtTransformer2DModel
    torch.manual_seed(0)
    m = PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=16, in_channels=4, cross_attention_dim=16, out_channels=8,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    mask = torch.ones(B, 7)
    mask[1, 5:] = 0  # padded caption: exercises the additive float mask
    kw = dict(hidden_states=randn(B, 4, 8, 8, seed=1),
              encoder_hidden_states=randn(B, 7, 16, seed=2),
              timestep=torch.tensor([10] * B), added_cond_kwargs={"resolution": None,
                                                                 "aspect_ratio": None},
              encoder_attention_mask=mask)
    return m.eval(), kw


def wan():
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    m = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    kw = dict(hidden_states=randn(B, 4, 2, 8, 8, seed=1), timestep=torch.tensor([10] * B),
              encoder_hidden_states=randn(B, 7, 16, seed=2))
    return m.eval(), kw


def vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    m = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=8, sample_size=16)
    kw = dict(sample=randn(B, 3, 16, 16, seed=1))
    return m.eval(), kw


DIFFUSERS = dict(sd15=sd15, sdxl=sdxl, sd3=sd3, flux=flux, pixart=pixart, wan=wan, vae=vae)
#: attention modules per model and core attention calls per forward
EXPECTED_MODULES = dict(sd15=8, sdxl=16, sd3=2, flux=2, pixart=2, wan=2, vae=2)


# --- transformers models ----------------------------------------------------------------------

def _ids_and_mask():
    ids = torch.randint(3, 60, (B, 7), generator=_gen(5))
    mask = torch.ones(B, 7, dtype=torch.long)
    mask[1, 5:] = 0  # right padding on row 1
    return ids, mask


def clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    m = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     max_position_embeddings=16, bos_token_id=0, eos_token_id=2,
                                     pad_token_id=1))
    ids, mask = _ids_and_mask()
    return m.eval(), dict(input_ids=ids, attention_mask=mask)


def clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    m = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         image_size=8, patch_size=4, num_channels=3))
    return m.eval(), dict(pixel_values=randn(B, 3, 8, 8, seed=6))


def t5():
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(0)
    m = T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0))
    ids, mask = _ids_and_mask()
    return m.eval(), dict(input_ids=ids, attention_mask=mask)


def llama():
    from transformers import LlamaConfig, LlamaModel
    torch.manual_seed(0)
    m = LlamaModel(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=32))
    ids, mask = _ids_and_mask()
    return m.eval(), dict(input_ids=ids, attention_mask=mask)


TRANSFORMERS = dict(clip_text=clip_text, clip_vision=clip_vision, t5=t5, llama=llama)
TRANSFORMERS_MODULES = dict(clip_text=2, clip_vision=2, t5=2, llama=2)


# --- helpers ----------------------------------------------------------------------------------

def output_of(out) -> torch.Tensor:
    if isinstance(out, tuple):
        out = out[0]
    for attr in ("sample", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    return out


def run(model, kw) -> torch.Tensor:
    with torch.no_grad():
        return output_of(model(**kw)).clone()


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


class CountingBackend(attnpatch.Backend):
    """SDPA that counts its calls: a module whose calls show up here went through attnpatch."""

    name = "counting"
    priority = None  # never chosen by auto
    calls = 0
    shapes: list = []
    layouts: list = []
    record_layouts = False

    def forward(self, call, **options):
        type(self).calls += 1
        if type(self).record_layouts:
            type(self).layouts.append((tuple(call.query.shape), tuple(call.key.shape),
                                       attnpatch.current_token_layout()))
        return F.scaled_dot_product_attention(
            call.query, call.key, call.value, attn_mask=call.combined_mask(), scale=call.scale,
            enable_gqa=call.is_gqa)


@contextlib.contextmanager
def counting_backend(record_layouts=False):
    CountingBackend.calls = 0
    CountingBackend.layouts = []
    CountingBackend.record_layouts = record_layouts
    attnpatch.register_backend(CountingBackend, replace=True)
    try:
        yield CountingBackend
    finally:
        attnpatch.unregister_backend("counting")


def no_attnpatch_state(*objs) -> list[str]:
    """Names of attnpatch attributes left anywhere on these objects (should be empty)."""
    left = []
    for obj in objs:
        items = [("", obj)]
        if isinstance(obj, torch.nn.Module):
            items = list(obj.named_modules())
        elif hasattr(obj, "components"):
            items = [("", obj)] + [(f"{n}.{s}", m) for n, c in obj.components.items()
                                   if isinstance(c, torch.nn.Module)
                                   for s, m in c.named_modules()]
        for name, m in items:
            for attr in list(vars(m)):
                if "attnpatch" in attr or attr in ("set_attention_backend",
                                                   "reset_attention_backend"):
                    left.append(f"{name}.{attr}")
            for h in list(getattr(m, "_forward_pre_hooks", {}).values()) + list(
                    getattr(m, "_forward_hooks", {}).values()):
                if "attnpatch" in getattr(h, "__module__", "") or "LayoutHooks" in repr(h):
                    left.append(f"{name}.<hook {h!r}>")
    return left


def processors_of(model) -> dict:
    return {n: m.processor for n, m in model.named_modules()
            if hasattr(m, "processor") and hasattr(m, "set_processor")}


# --- pipelines (no tokenizer: they run from prompt embeddings) ---------------------------------

def flux_pipeline():
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
        guidance_embeds=False, axes_dims_rope=(4, 4, 8))
    vae_ = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=8, sample_size=16, shift_factor=0.0,
        scaling_factor=1.0)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae_, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt_embeds=randn(1, 7, 16, seed=7), pooled_prompt_embeds=randn(1, 16, seed=8),
              height=16, width=16, num_inference_steps=2, output_type="pt")
    return pipe, kw


def sd_pipeline():
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    unet, _ = sd15()
    text_encoder, _ = clip_text()
    vae_, _ = vae()
    pipe = StableDiffusionPipeline(
        vae=vae_, text_encoder=text_encoder, tokenizer=None, unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt_embeds=randn(1, 7, 16, seed=7), negative_prompt_embeds=randn(1, 7, 16, seed=8),
              height=32, width=32, num_inference_steps=2, output_type="pt")
    return pipe, kw


def run_pipe(pipe, kw) -> torch.Tensor:
    with torch.no_grad():
        return pipe(**kw, generator=_gen(0)).images.clone()
