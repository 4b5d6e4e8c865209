"""Write a strategy: attention over the keys in two halves, merged exactly (forward and backward).

Run: python examples/key_split_strategy.py   (CPU; a GPU is used when there is one)
"""

from __future__ import annotations

import torch

import attnpatch
from attnpatch import Partial, Strategy, merge_partials, register_backend


@register_backend
class KeySplit(Strategy):
    """Each query attends to the first and the second half of the keys separately; the two
    partial results merge into exactly the attention over all keys."""

    name = "key_split"
    description = "keys in two halves on an inner kernel, merged by log-sum-exp"
    options = frozenset({"inner"})
    supports_lse = True  # the merged lse is returned, without a gradient (lse_has_grad False)
    supports_causal = False  # a causal pattern would need per-half alignment: refused, with reason
    supports_dropout = False  # an exact merge runs its partials without dropout

    def run(self, call, inner="auto"):
        half = call.seq_len_kv // 2
        parts = []
        for keys in (slice(0, half), slice(half, None)):
            mask = None if call.attn_mask is None else call.attn_mask[..., keys]
            sub = call.replace(key=call.key[:, :, keys], value=call.value[:, :, keys],
                               attn_mask=mask)
            parts.append(Partial(sub, backend=inner))
        return merge_partials(call, parts)


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(2, 8, 77, 64, device=device, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 120, 64, device=device, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 120, 64, device=device, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 77, 120, device=device) > 0.2

    # exact against dense attention (the reference backend), forward and backward
    out = attnpatch.attention(q, k, v, attn_mask=mask, backend="key_split", inner="math")
    dense = attnpatch.attention(q, k, v, attn_mask=mask, backend="math")
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.autograd.grad(dense, (q, k, v), grad)
    print(f"max |out - dense| = {(out - dense).abs().max().item():.1e}")
    for name, a, b in zip("qkv", ours, ref):
        print(f"max |d{name} - dense d{name}| = {(a - b).abs().max().item():.1e}")

    # first-class: explain() reasons, refusals, patch()
    print(attnpatch.explain(q, k, v, backend="key_split", is_causal=True))
    layer = torch.nn.MultiheadAttention(64, 4, batch_first=True, dtype=torch.float64).to(device)
    x = torch.randn(2, 50, 64, device=device, dtype=torch.float64)
    before = layer(x, x, x, need_weights=False)[0]
    handle = attnpatch.patch(layer, backend="key_split", inner="math")
    after = layer(x, x, x, need_weights=False)[0]
    ran = sorted({name for m in handle.report() for name in m.backends})
    print(f"patched module ran {ran}, max |patched - unpatched| = "
          f"{(after - before).abs().max().item():.1e}")
    attnpatch.unpatch(layer)


if __name__ == "__main__":
    main()
