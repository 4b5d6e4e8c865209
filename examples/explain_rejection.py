"""Why a backend was rejected: for one call, for a patched model, and as an exception.

    python examples/explain_rejection.py
"""

import torch

import attnpatch
from attnpatch.tiny_pipelines import build_tiny_pipeline

# 1. One call: which backend would run, and every other backend's reasons.
q = k = v = torch.randn(1, 4, 128, 64)
print(attnpatch.explain(q, k, v, dropout_p=0.1))

# 2. A named backend that can't run a call raises, with its reasons.
try:
    attnpatch.attention(q.requires_grad_(), k, v, backend="flex")   # flex: no backward on CPU
except attnpatch.BackendUnavailableError as err:
    print("\nrefused:", err.reasons)

# 3. A patched pipeline: `auto` records what it passed over, per module.
pipe = build_tiny_pipeline("sd")
with attnpatch.patch(pipe, backend="auto") as handle:
    pipe("a cat", num_inference_steps=1, height=64, width=64)
    for r in [r for r in handle.report() if r.calls][:2]:
        print(f"\n{r.name}: ran {r.backend}; passed over:")
        for name, why in r.fallbacks.items():
            print(f"  {name}: {'; '.join(why)}")
