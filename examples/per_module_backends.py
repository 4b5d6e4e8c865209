"""A different backend per module: glob patterns over module names, first match wins.

    python examples/per_module_backends.py
"""

import torch

import attnpatch
from attnpatch.tiny_pipelines import build_tiny_pipeline

pipe = build_tiny_pipeline("sd")
handle = attnpatch.patch(pipe, backend={
    "unet.*.attn1": "sdpa",                  # UNet self-attention: the fast kernel
    "unet.*.attn2": ("math", {}),            # cross-attention: the fp32-accumulating reference
    "text_encoder.*": "sdpa_math",           # CLIP: SDPA's math kernel
})                                           # everything else (the VAE): auto
pipe("a red bicycle", num_inference_steps=2, height=64, width=64,
     generator=torch.Generator().manual_seed(0))
for r in handle.report():
    print(f"{r.name:60s} requested {r.requested:10s} ran {r.backend}")
handle.unpatch()
