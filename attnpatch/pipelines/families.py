"""What attnpatch knows about each diffusers model family, in one table.

One :class:`Family` record per family says:

- ``models``: the denoiser classes (by name, so nothing here imports diffusers), and
  ``config``: config values that tell apart families sharing a class (SD and SDXL UNets);
- ``components``: the pipeline attributes that hold its denoiser(s) (``unet``, ``transformer``,
  Wan 2.2's ``transformer_2`` ...);
- ``processors`` and ``text``: the processor classes of its joint text/image attention (name
  prefixes) and where that attention puts the text tokens, ``"first"`` (``[text | image]``, Flux)
  or ``"last"`` (``[image | text]``, SD3); None where the family has no joint attention;
- ``grid``: where one forward's latent grid comes from (a key of
  :data:`attnpatch.pipelines.grid.GRID_SOURCES`);
- ``sharding``: a function returning the model's context-parallel plan (module path ->
  diffusers' ``ContextParallelInput``/``ContextParallelOutput``, a dict or a list of pairs);
  by default diffusers' own ``_cp_plan`` where the model class has one (Flux, Flux2,
  QwenImage, Wan ...), else None; attnpatch's own for SD3 and ``UNet2DConditionModel``;
- ``token_order``: a function returning the model's :class:`~attnpatch.pipelines.token_order.
  TokenOrder` (where its image tokens can be put in another order for one forward: the
  block_sparse tile patterns' per-forward reorder), or None; by default Flux-like models
  (a forward taking ``hidden_states`` and ``img_ids``) get one, Wan's and SD3's are their own.

Text positions come from the order of the processors' ``torch.cat`` of text and image q/k/v in
diffusers 0.42 (CogVideoX concatenates in its block). A model outside the table still gets the
generic rules: every component named in some record counts as a denoiser, text position unknown,
grid sources tried in turn, diffusers' ``_cp_plan`` if it has one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .token_order import TokenOrder, img_ids_token_order, sd3_token_order, wan_token_order

__all__ = ["Family", "FAMILIES", "DENOISER_COMPONENTS", "family_of", "model_family",
           "denoiser_components", "text_position", "processor_family", "sharding_plan",
           "diffusers_cp_plan", "sd3_cp_plan", "unet_cp_plan", "token_order_plan"]


def diffusers_cp_plan(model: Any) -> Optional[dict]:
    """diffusers' context-parallel plan of ``model``'s class (``ModelMixin._cp_plan``: module
    path -> ``ContextParallelInput``/``ContextParallelOutput``), or None where it has none.

    The plan is diffusers' own class attribute: read it, don't change it.
    """
    plan = getattr(type(model), "_cp_plan", None)
    return plan if isinstance(plan, dict) else None


def _cp_classes():
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    return ContextParallelInput, ContextParallelOutput


def sd3_cp_plan(model: Any) -> dict:
    """SD3's plan (diffusers has none): split the image tokens where the patch embedding ends
    and the text tokens where ``context_embedder`` ends (the joint attention concatenates each
    rank's ``[image | text]`` shard: attention without a mask does not depend on the order of
    the keys), gather where ``proj_out`` ends (``norm_out`` and ``proj_out`` act per token)."""
    Input, Output = _cp_classes()
    return {"pos_embed": {0: Input(split_dim=1, expected_dims=3, split_output=True)},
            "context_embedder": {0: Input(split_dim=1, expected_dims=3, split_output=True)},
            "proj_out": Output(gather_dim=1, expected_dims=3)}


def unet_cp_plan(model: Any) -> Optional[list]:
    """A ``UNet2DConditionModel``'s plan, as (path, entry) pairs: in each of its
    ``Transformer2DModel`` (all of its attention), split the tokens ``(B, H*W, C)`` where the
    first of its ``transformer_blocks`` starts (after ``proj_in``), split the text of the
    cross-attention at every block's entry (the context-parallel backends take keys as shards
    too), and gather where the last block ends (before ``proj_out`` reshapes to a grid).
    None for other UNets."""
    if type(model).__name__ != "UNet2DConditionModel":
        return None
    Input, Output = _cp_classes()
    text = Input(split_dim=1, expected_dims=3, split_output=False)
    pairs: list = []
    for name, module in model.named_modules():
        blocks = getattr(module, "transformer_blocks", None)
        if type(module).__name__ != "Transformer2DModel" or not blocks:
            continue
        path = f"{name}.transformer_blocks"
        pairs.append((f"{path}.0", {"hidden_states": Input(split_dim=1, expected_dims=3,
                                                           split_output=False)}))
        pairs.append((f"{path}.*", {"encoder_hidden_states": text}))
        pairs.append((f"{path}.{len(blocks) - 1}", Output(gather_dim=1, expected_dims=3)))
    return pairs or None


@dataclass(frozen=True)
class Family:
    """One model family: see the module docstring for the fields."""

    name: str
    models: tuple[str, ...]
    components: tuple[str, ...] = ("transformer",)
    processors: tuple[str, ...] = ()
    text: Optional[str] = None
    grid: str = "latents"
    config: tuple[tuple[str, Any], ...] = ()
    sharding: Callable[[Any], Optional[dict]] = diffusers_cp_plan
    token_order: Callable[[Any], Optional[TokenOrder]] = img_ids_token_order

    def matches(self, model: torch.nn.Module) -> bool:
        """Whether ``model`` (a denoiser) belongs to this family."""
        names = {cls.__name__ for cls in type(model).__mro__}
        if not names.intersection(self.models):
            return False
        config = getattr(model, "config", None)
        return all(_config_value(config, key) == value for key, value in self.config)


def _config_value(config: Any, key: str) -> Any:
    if hasattr(config, "get"):
        return config.get(key)
    return getattr(config, key, None)


_UNET_SD = ("UNet2DConditionModel",)

#: every family attnpatch knows, by name; the first record that matches a model wins
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("flux", ("FluxTransformer2DModel",), processors=("Flux",), text="first",
           grid="img_ids"),
    Family("flux2", ("Flux2Transformer2DModel",), processors=("Flux2",), text="first",
           grid="img_ids_thwl"),
    Family("flux3", ("Flux3Transformer2DModel",), processors=("Flux3",), text="first",
           grid="img_ids_thwl"),
    Family("chroma", ("ChromaTransformer2DModel",), processors=("Chroma",), text="first",
           grid="img_ids"),
    Family("bria", ("BriaTransformer2DModel", "BriaFiboTransformer2DModel"),
           processors=("Bria",), text="first", grid="img_ids"),
    # self- and cross-attention only (its extra "gist" tokens are not text)
    Family("bria_fibo2", ("BriaFibo2Transformer2DModel",), processors=("BriaFibo2",)),
    Family("longcat_image", ("LongCatImageTransformer2DModel",), processors=("LongCatImage",),
           text="first", grid="img_ids"),
    Family("ovis_image", ("OvisImageTransformer2DModel",), processors=("OvisImage",),
           text="first", grid="img_ids"),
    Family("qwenimage", ("QwenImageTransformer2DModel", "QwenImage21Transformer2DModel"),
           processors=("Qwen",), text="first", grid="img_shapes"),
    Family("auraflow", ("AuraFlowTransformer2DModel",), processors=("AuraFlow",), text="first"),
    Family("easyanimate", ("EasyAnimateTransformer3DModel",), processors=("EasyAnimate",),
           text="first"),
    Family("cogvideox", ("CogVideoXTransformer3DModel", "ConsisIDTransformer3DModel"),
           processors=("CogVideoX",), text="first"),
    Family("sd3", ("SD3Transformer2DModel",), processors=("Joint", "SD3"), text="last",
           sharding=sd3_cp_plan, token_order=sd3_token_order),
    Family("hunyuan_image", ("HunyuanImageTransformer2DModel",), processors=("HunyuanImage",),
           text="last"),
    Family("hunyuan_video", ("HunyuanVideoTransformer3DModel",
                             "HunyuanVideo15Transformer3DModel",
                             "HunyuanVideoFramepackTransformer3DModel"),
           processors=("HunyuanVideo",), text="last"),
    # JoyImageEditPlus takes several images per sample (6-D latents and a shape_list): no grid
    Family("joyimage", ("JoyImageEditTransformer3DModel", "JoyImageEditPlusTransformer3DModel"),
           processors=("JoyImage",), text="last"),
    Family("motif_video", ("MotifVideoTransformer3DModel",), processors=("MotifVideo",),
           text="last"),
    Family("wan", ("WanTransformer3DModel", "WanVACETransformer3DModel",
                   "WanAnimateTransformer3DModel"), components=("transformer", "transformer_2"),
           token_order=wan_token_order),
    Family("pixart", ("PixArtTransformer2DModel",)),
    Family("sana", ("SanaTransformer2DModel", "SanaVideoTransformer3DModel")),
    Family("sd", _UNET_SD, components=("unet",), config=(("addition_embed_type", None),),
           sharding=unet_cp_plan),
    Family("sdxl", _UNET_SD, components=("unet",),
           config=(("addition_embed_type", "text_time"),), sharding=unet_cp_plan),
    Family("unet", ("UNet2DConditionModel", "UNet2DModel", "UNet3DConditionModel",
                    "UNetMotionModel", "UNetSpatioTemporalConditionModel"), components=("unet",),
           sharding=unet_cp_plan),
    Family("cascade", ("StableCascadeUNet", "WuerstchenPrior", "WuerstchenDiffNeXt"),
           components=("prior", "decoder")),
)}

#: pipeline attributes that hold a denoiser in some family
DENOISER_COMPONENTS: tuple[str, ...] = tuple(dict.fromkeys(
    c for f in FAMILIES.values() for c in f.components))

# processor class names carry these variant prefixes before the family's name
_VARIANTS = ("PAGCFG", "PAG", "Fused", "XFormers", "XLA")


def model_family(model: Any) -> Optional[Family]:
    """The family of a denoiser model, or None when it is not in :data:`FAMILIES`."""
    if not isinstance(model, torch.nn.Module):
        return None
    for family in FAMILIES.values():
        if family.matches(model):
            return family
    return None


def denoiser_components(pipe: Any) -> list[tuple[str, torch.nn.Module]]:
    """(name, model) of every denoiser component of a pipeline (``transformer``, ``unet``,
    ``transformer_2`` ...), in :data:`DENOISER_COMPONENTS` order."""
    found = []
    for name in DENOISER_COMPONENTS:
        component = getattr(pipe, name, None)
        if isinstance(component, torch.nn.Module):
            found.append((name, component))
    return found


def family_of(obj: Any) -> Optional[Family]:
    """The family of a denoiser model, or of a pipeline (its first denoiser component's)."""
    if isinstance(obj, torch.nn.Module):
        return model_family(obj)
    for _, model in denoiser_components(obj):
        family = model_family(model)
        if family is not None:
            return family
    return None


def processor_family(processor_name: str) -> Optional[Family]:
    """The family whose joint-attention processors are named like ``processor_name`` (a class
    name such as ``"FluxAttnProcessor"`` or ``"PAGJointAttnProcessor2_0"``); the longest
    matching prefix wins (``Flux2...`` is Flux2, not Flux)."""
    name = processor_name
    for variant in _VARIANTS:
        if name.startswith(variant):
            name = name[len(variant):]
            break
    best, length = None, 0
    for family in FAMILIES.values():
        for prefix in family.processors:
            if name.startswith(prefix) and len(prefix) > length:
                best, length = family, len(prefix)
    return best


def text_position(processor_name: str) -> Optional[str]:
    """Where the joint attention of processor class ``processor_name`` puts the text tokens:
    ``"first"``, ``"last"``, or None (not joint attention, or a family not in the table)."""
    family = processor_family(processor_name)
    return None if family is None else family.text


def sharding_plan(model: Any) -> Any:
    """The context-parallel plan of a denoiser (None: it has none): its family's, else
    diffusers' ``_cp_plan``."""
    family = model_family(model)
    plan = diffusers_cp_plan if family is None else family.sharding
    return plan(model)


def token_order_plan(model: Any) -> Optional[TokenOrder]:
    """Where a denoiser's image tokens can be reordered for one forward (None: nowhere): its
    family's plan, else the Flux-like one for a forward taking ``hidden_states`` and
    ``img_ids``."""
    family = model_family(model)
    plan = img_ids_token_order if family is None else family.token_order
    return plan(model)
