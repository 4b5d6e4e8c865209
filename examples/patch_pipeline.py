"""Patch a whole pipeline in one call, generate, see what ran, undo.

    python examples/patch_pipeline.py                  # a tiny random-weight Flux-like pipeline
    python examples/patch_pipeline.py --model PATH     # a local diffusers model folder
"""

import argparse

import torch

import attnpatch
from attnpatch.tiny_pipelines import build_tiny_pipeline, tiny_call_kwargs

parser = argparse.ArgumentParser()
parser.add_argument("--model", help="local diffusers model folder (default: tiny Flux-like)")
parser.add_argument("--backend", default="sdpa")
args = parser.parse_args()

if args.model:
    from diffusers import DiffusionPipeline

    pipe, extra = DiffusionPipeline.from_pretrained(args.model, local_files_only=True), {}
else:
    pipe, extra = build_tiny_pipeline("flux"), tiny_call_kwargs("flux")

with attnpatch.patch(pipe, backend=args.backend) as handle:   # every attention, one call
    image = pipe("a lighthouse at dusk", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), **extra).images[0]
    print(handle.report())        # per module: backend that ran, calls, fallbacks
    pipe.set_attention_backend("math")                         # switch, still patched
    pipe("a lighthouse at dusk", num_inference_steps=1, height=64, width=64, **extra)
    print("after the switch:", sorted({r.backend for r in handle.report() if r.calls}))
# leaving the block restored the original processors exactly
print("unpatched:", type(pipe.transformer.transformer_blocks[0].attn.processor).__name__)
