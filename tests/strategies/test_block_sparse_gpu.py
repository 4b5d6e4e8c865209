"""block_sparse on CUDA: the flash4 and compiled Flex kernels against fp32 attention under the
layout's element mask (bf16, forward and gradients), the report's kernel choice, and the block
lists built from block indices at the Wan shape in under 50 ms.

Run on the GPU machine: ``python -m pytest -m gpu tests/strategies/test_block_sparse_gpu.py``.
"""

from __future__ import annotations

import time

import pytest
import torch

import attnpatch
from attnpatch import TokenLayout, registry

from .test_block_sparse import masked_reference, tile_mask, with_text

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device")]

#: Flux-like joint attention at a small size whose tiles fill 128-token blocks: 128 text tokens
#: first, a 32x64 grid in tiles of 8x16
FLUX = dict(layout=TokenLayout(128, "first", 1, 32, 64), tile=(8, 16), window=(3, 3))
#: ragged tiles: partial 128x128 blocks (flash4 masks them with its mask_mod)
RAGGED = dict(layout=TokenLayout(77, "last", 2, 20, 36), tile=(1, 8, 16), window=(1, 3, 3))


def _kernels() -> list[str]:
    kernels = ["flex"]
    if not registry.get_backend("flash4").availability_reasons():
        kernels.append("flash4")
    return kernels


def _inputs(layout: TokenLayout, heads=4, kv=2, dtype=torch.bfloat16, seed=0):
    seq = layout.frames * layout.height * layout.width + layout.text_tokens
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(1, h, seq, 128, device="cuda", dtype=dtype, generator=gen)
            for h in (heads, kv, kv)]


def _assert_close_to_fp64(out, leaves: list, element: torch.Tensor):
    """``out`` (from ``leaves`` q, k, v) and its gradients are as close to fp64 attention under
    the element mask as bf16 attention under the same mask (the math backend) is."""
    q, k, v = leaves
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = masked_reference(*ref_leaves, element)[0]
    bf16 = [t.detach().requires_grad_() for t in (q, k, v)]
    math_out = attnpatch.attention(*bf16, attn_mask=element, backend="math")

    def err(a, b):
        return float((a.detach().double() - b.detach()).norm() / b.detach().norm())
    assert err(out, ref) <= 2 * err(math_out, ref) + 1e-3
    grad = torch.randn_like(ref)
    ours = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    theirs = torch.autograd.grad(math_out, bf16, grad.to(out.dtype))
    want = torch.autograd.grad(ref, ref_leaves, grad)
    for a, m, w in zip(ours, theirs, want):
        assert err(a, w) <= 2 * err(m, w) + 1e-3


def _check(case: dict, kernel: str, pattern: str, heads: int = 4, kv: int = 2):
    layout = case["layout"]
    q, k, v = _inputs(layout, heads, kv)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attnpatch.attention(*leaves, backend="block_sparse", pattern=pattern,
                              tile=case["tile"], window=case["window"], token_layout=layout,
                              kernel=kernel)
    tile = case["tile"] if len(case["tile"]) == 3 else (1, *case["tile"])
    window = case["window"] if len(case["window"]) == 3 else (1, *case["window"])
    element = with_text(tile_mask(layout.grid, tile, window), layout, q.shape[2]).cuda()
    _assert_close_to_fp64(out, leaves, element)


@pytest.mark.parametrize("kernel", _kernels())
def test_block_aligned_tiles_match_fp32_under_the_mask(kernel):
    _check(FLUX, kernel, "tile2d")


@pytest.mark.parametrize("kernel", _kernels())
def test_ragged_tiles_match_fp32_under_the_mask(kernel):
    """Ragged tiles make partial 128x128 blocks: flash4 masks them with its mask_mod."""
    _check(RAGGED, kernel, "tile3d")


def test_auto_runs_partial_blocks_on_flash4_with_its_mask_mod():
    q, k, v = _inputs(RAGGED["layout"])
    ex = attnpatch.explain(q, k, v, backend="block_sparse", pattern="tile3d",
                           tile=RAGGED["tile"], window=RAGGED["window"],
                           token_layout=RAGGED["layout"])
    note = registry.get_backend("block_sparse").report_note(ex.call)
    if "flash4" in _kernels():
        assert "kernel flash4" in note and "partial" in note and "mask_mod" in note, note
    else:
        assert "kernel flex" in note, note


@pytest.mark.parametrize("kernel", _kernels())
def test_per_head_layout_of_64_blocks_matches_under_the_mask(kernel):
    """A per-head user layout of 64-token blocks (every 128x128 kernel block can be partial,
    the allow table has a head axis), GQA, forward and gradients."""
    from .test_block_sparse import expand
    seq, heads = 1000, 4
    gen = torch.Generator().manual_seed(3)
    nb = -(-seq // 64)
    layout = torch.rand(heads, nb, nb, generator=gen) < 0.3
    layout |= torch.eye(nb, dtype=torch.bool)  # no empty rows
    q, k, v = (torch.randn(1, h, seq, 128, device="cuda", dtype=torch.bfloat16)
               for h in (heads, 2, 2))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attnpatch.attention(*leaves, backend="block_sparse", block_layout=layout,
                              block_size=64, kernel=kernel)
    element = expand(layout, 64, 64, seq, seq)[None].cuda()
    _assert_close_to_fp64(out, leaves, element)


def test_topk_on_flash4_equals_the_mask_path_on_the_same_layout():
    """top-k chooses its blocks per call (a per-batch, per-head allow table); flash4 runs the
    chosen layout, partial blocks included, as the exact mask path does."""
    if "flash4" not in _kernels():
        pytest.skip("flash-attn-4 not installed")
    layout = RAGGED["layout"]
    q, k, v = _inputs(layout, heads=4, kv=4)
    q, k, v = (torch.cat([t, t.flip(2)]) for t in (q, k, v))  # batch 2, different layouts
    kw = dict(backend="block_sparse", pattern="topk", keep=0.3, token_layout=layout)
    fast = attnpatch.attention(q, k, v, kernel="flash4", **kw)
    exact = attnpatch.attention(q, k, v, kernel="mask", **kw)
    assert float((fast.float() - exact.float()).norm() / exact.float().norm()) < 1e-2


def test_topk_gradients_on_flash4_equal_the_mask_path_on_the_same_layout():
    """top-k's per-batch, per-head layout (a rank-4 allow table in flash4's ``mask_mod``)
    through flash4's backward: the input gradients of the chosen layout equal the exact mask
    path's (which expands the same choice to an element mask)."""
    if "flash4" not in _kernels():
        pytest.skip("flash-attn-4 not installed")
    layout = RAGGED["layout"]
    q, k, v = _inputs(layout, heads=4, kv=4, seed=1)
    q, k, v = (torch.cat([t, t.flip(2)]) for t in (q, k, v))
    kw = dict(backend="block_sparse", pattern="topk", keep=0.3, token_layout=layout)
    grad = torch.randn_like(q)
    results = []
    for kernel in ("flash4", "mask"):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = attnpatch.attention(*leaves, kernel=kernel, **kw)
        results.append((out, *torch.autograd.grad(out, leaves, grad)))
    for fast, exact in zip(*results):
        fast, exact = fast.detach().float(), exact.detach().float()
        assert float((fast - exact).norm() / exact.norm()) < 2e-2


def test_auto_picks_flash4_for_full_blocks():
    if "flash4" not in _kernels():
        pytest.skip("flash-attn-4 not installed")
    q, k, v = _inputs(FLUX["layout"])
    ex = attnpatch.explain(q, k, v, backend="block_sparse", pattern="tile2d",
                           tile=FLUX["tile"], window=FLUX["window"], token_layout=FLUX["layout"])
    note = registry.get_backend("block_sparse").report_note(ex.call)
    assert "kernel flash4" in note, note


@pytest.mark.parametrize("case", [FLUX, RAGGED], ids=["full_blocks", "partial_blocks"])
@pytest.mark.parametrize("layout_arg", ["bhsd", "bshd"])
def test_warm_calls_run_the_specialized_flash4_kernel_as_the_first_call_does(case, layout_arg):
    """After the first call of a signature, the dispatcher runs block_sparse's specialized
    flash-attn-4 kernel: same output (bit for bit), same gradients, the pre-ordered plan under
    a tile-order hook's order, and dense attention on a dense step."""
    from attnpatch.strategies import block_sparse as BSP
    if "flash4" not in _kernels():
        pytest.skip("flash-attn-4 not installed")
    layout = case["layout"]
    pattern = "tile2d" if len(case["tile"]) == 2 else "tile3d"
    q, k, v = _inputs(layout, heads=4, kv=2)
    if layout_arg == "bshd":  # (B, S, H, D) memory, as diffusers passes it
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    seq_dim = 2 if layout_arg == "bhsd" else 1
    kw = dict(backend="block_sparse", pattern=pattern, tile=case["tile"], window=case["window"],
              token_layout=layout, layout=layout_arg, scale=0.1, dense_steps=1)

    def kernels():
        return [e[3] for e in attnpatch.dispatch._CACHE.values()
                if e[0].backend.name == "block_sparse" and e[3] is not None]
    attnpatch.dispatch._CACHE.clear()
    first = attnpatch.attention(q, k, v, **kw)
    warm = attnpatch.attention(q, k, v, **kw)
    (kernel,) = kernels()
    assert isinstance(kernel, BSP._Flash4Kernel)
    assert torch.equal(first, warm)

    grads = []
    for _ in range(2):  # cold (a new signature: requires grad), then warm
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = attnpatch.attention(*leaves, **kw)
        grads.append((out, *torch.autograd.grad(out, leaves, torch.ones_like(out))))
    assert len(kernels()) == 2
    for cold, hot in zip(*grads):
        cold, hot = cold.detach().float(), hot.detach().float()
        assert float((cold - hot).norm() / cold.norm()) < 1e-3

    call = attnpatch.explain(q, k, v, **kw).call
    plan = BSP._plan(call, call.options)
    perm = plan.groups.perm
    tiled = [t.index_select(seq_dim, perm) for t in (q, k, v)]
    token = BSP._PREORDERED.set(plan.order)
    try:
        pre = attnpatch.attention(*tiled, **kw)
    finally:
        BSP._PREORDERED.reset(token)
    assert torch.equal(pre, first.index_select(seq_dim, perm))

    token = BSP._DENSE_NOW.set(True)
    try:
        dense_step = attnpatch.attention(q, k, v, **kw)
    finally:
        BSP._DENSE_NOW.reset(token)
    dense = attnpatch.attention(q, k, v, layout=layout_arg, scale=0.1)
    assert torch.equal(dense_step, dense)


def test_block_lists_for_75600_tokens_build_in_under_50_ms():
    from attnpatch.strategies import _block_patterns as P
    from attnpatch.strategies import block_sparse as BSP
    geo = P.Geometry(75600, 0, "none", (21, 45, 80))
    for _ in range(2):  # the second build is timed (the first pays CUDA's warm-up)
        torch.cuda.synchronize()
        start = time.perf_counter()
        groups = P.tile_layout(geo, (3, 9, 16), (3, 3, 3), True, "cuda")
        full, partial = groups.kernel_blocks(128, 128)
        BSP._index_lists(full)
        BSP._index_lists(partial)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    assert elapsed < 0.05, elapsed
