"""Property tests: every backend that runs on this machine's CPU (from the registry), on random
small calls, either matches a float64 reference of its definition (the independent dense one;
a pattern strategy's own dense-under-its-mask reference) or refuses the call with the reasons
``explain`` gives. Never a wrong answer.

A call draws: odd sizes with Sq != Sk, grouped-query heads, memory layouts (transposed,
head-dim slices, permuted, stride-0 batch/head dims, ``layout="bshd"``), masks (none, bool,
additive float with -inf, key padding; broadcast, transposed or expanded; with query rows that
see no key), causal, and ``return_lse``. Checked: ``out``; ``lse`` (shape (B, H, Sq), float32,
-inf for rows without keys, where ``out`` is 0); the q/k/v gradients of a loss that uses both
``out`` and ``lse``; the gradient of a float mask that requires grad. Plus: an fp32 additive
mask keeps its precision with fp16/bf16 queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnpatch
from attnpatch import registry

from ..conftest import cpu_backends, expected, out_lse_loss, rel_error, run_or_refuse

BACKENDS = cpu_backends()
EXAMPLES = settings(max_examples=25, deadline=None)
#: the mask-gradient test draws float masks only: fewer examples cover it
MASK_EXAMPLES = settings(max_examples=15, deadline=None)

#: how a (B, H, S, D) operand lies in memory: name -> (storage shape, storage -> view)
STRIDES: dict[str, tuple[Callable, Callable]] = {
    "contiguous": (lambda b, h, s, d: (b, h, s, d), lambda t, shape: t),
    # (B, S, H, D) storage, as projections produce it
    "transposed": (lambda b, h, s, d: (b, s, h, d), lambda t, shape: t.transpose(1, 2)),
    # every other element of a head dim twice as wide: last-dim stride 2
    "head_slice": (lambda b, h, s, d: (b, h, s, 2 * d), lambda t, shape: t[..., ::2]),
    # (S, B, D, H) storage: no dim has stride 1 where a kernel expects it
    "permuted": (lambda b, h, s, d: (s, b, d, h), lambda t, shape: t.permute(1, 3, 0, 2)),
    # one batch element and one head broadcast: stride 0
    "expanded": (lambda b, h, s, d: (1, 1, s, d), lambda t, shape: t.expand(shape)),
}
MASK_SHAPES = ("2d", "batch", "full")  # (Sq, Sk), (B, 1, Sq, Sk), (B, H, Sq, Sk)
MASK_STRIDES = ("contiguous", "transposed", "expanded")


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    kv_heads: int
    seq_q: int
    seq_k: int
    head_dim: int
    head_dim_v: int
    strides: tuple[str, str, str]
    layout: str
    mask: Optional[str]
    mask_shape: str
    mask_stride: str
    empty_rows: bool
    is_causal: bool
    return_lse: bool
    seed: int


@st.composite
def cases(draw, masks=(None, "bool", "float", "key_padding")) -> Case:
    kv_heads = draw(st.integers(1, 2))
    head_dim = draw(st.sampled_from([1, 3, 8, 13, 16, 24, 33, 40]))
    return Case(
        batch=draw(st.integers(1, 2)),
        heads=kv_heads * draw(st.integers(1, 2)),
        kv_heads=kv_heads,
        seq_q=draw(st.integers(1, 24)),
        seq_k=draw(st.integers(1, 24)),
        head_dim=head_dim,
        head_dim_v=draw(st.sampled_from([head_dim, head_dim, 8])),
        strides=tuple(draw(st.sampled_from(list(STRIDES))) for _ in range(3)),
        layout=draw(st.sampled_from(["bhsd", "bshd"])),
        mask=draw(st.sampled_from(masks)),
        mask_shape=draw(st.sampled_from(MASK_SHAPES)),
        mask_stride=draw(st.sampled_from(MASK_STRIDES)),
        empty_rows=draw(st.booleans()),
        is_causal=draw(st.booleans()),
        return_lse=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _case(**changes) -> Case:
    """A fixed case (cross-attention, GQA, odd head dim) with ``changes``: the explicit examples
    that every run checks before the random ones."""
    base = dict(batch=2, heads=4, kv_heads=2, seq_q=7, seq_k=11, head_dim=13, head_dim_v=13,
                strides=("contiguous",) * 3, layout="bhsd", mask=None, mask_shape="batch",
                mask_stride="contiguous", empty_rows=False, is_causal=False, return_lse=True,
                seed=0)
    return Case(**{**base, **changes})


#: head-dim slices, every strided layout, and rows that see no key (bool and float masks)
HEAD_SLICES = _case(strides=("head_slice",) * 3)
MIXED_STRIDES = _case(strides=("transposed", "permuted", "expanded"), layout="bshd",
                      is_causal=True)
EMPTY_BOOL_ROWS = _case(mask="bool", empty_rows=True)
EMPTY_FLOAT_ROWS = _case(mask="float", mask_shape="2d", empty_rows=True)


@dataclass
class Operands:
    """The stored tensors of one call (autograd leaves) and how the call's views come from
    them, so that the same views can be taken of float64 copies for the reference."""

    leaves: list[torch.Tensor]
    views: Callable[[list[torch.Tensor]], tuple]  # leaves -> (q, k, v, mask) in (B, H, S, D)

    def detached(self, dtype=None, requires_grad=(False, False, False, False)):
        """Copies of the leaves (floating ones in ``dtype``), each requiring grad as asked."""
        copies = []
        for t, grad in zip(self.leaves, requires_grad):
            if t is not None and t.is_floating_point():
                t = t.detach().to(dtype or t.dtype).requires_grad_(grad)
            copies.append(t)
        return copies


def operands(case: Case, dtype=torch.float32) -> Operands:
    gen = torch.Generator().manual_seed(case.seed)
    b, sq, sk = case.batch, case.seq_q, case.seq_k
    shapes = [(b, case.heads, sq, case.head_dim), (b, case.kv_heads, sk, case.head_dim),
              (b, case.kv_heads, sk, case.head_dim_v)]
    leaves = []
    for (storage, _), shape in zip((STRIDES[s] for s in case.strides), shapes):
        leaves.append(torch.randn(storage(*shape), generator=gen, dtype=torch.float64).to(dtype))
    mask_leaf, mask_view = _mask(case, gen, dtype)
    leaves.append(mask_leaf)

    def views(ts):
        q, k, v = (STRIDES[s][1](t, shape) for s, t, shape in zip(case.strides, ts, shapes))
        return q, k, v, (None if ts[3] is None else mask_view(ts[3]))
    return Operands(leaves, views)


def _mask(case: Case, gen: torch.Generator, dtype):
    """(stored mask tensor or None, stored -> the view passed as attn_mask)."""
    b, h, sq, sk = case.batch, case.heads, case.seq_q, case.seq_k
    if case.mask is None:
        return None, None
    if case.mask == "key_padding":  # (B, 1, 1, Sk), True = keep; length 0 empties a batch
        lengths = torch.randint(1, sk + 1, (b,), generator=gen)
        if case.empty_rows:
            lengths[0] = 0
        return (torch.arange(sk)[None, :] < lengths[:, None])[:, None, None, :], lambda t: t
    lead = {"2d": (), "batch": (b, 1), "full": (b, h)}[case.mask_shape]
    if case.mask_stride == "expanded":
        lead = (1,) * len(lead)
    full = torch.rand(*lead, sq, sk, generator=gen) > 0.3  # True = keep
    full[..., 0] = True  # every row sees key 0 ...
    if case.empty_rows:
        full[..., 1::3, :] = False  # ... except these, which see no key at all
    if case.mask == "float":
        bias = torch.randn(*lead, sq, sk, generator=gen, dtype=torch.float64)
        stored = bias.masked_fill(~full, float("-inf")).to(dtype)
    else:
        stored = full
    shape = {"2d": (sq, sk), "batch": (b, 1, sq, sk), "full": (b, h, sq, sk)}[case.mask_shape]
    if case.mask_stride == "transposed":
        return stored.transpose(-1, -2).contiguous(), lambda t: t.transpose(-1, -2)
    if case.mask_stride == "expanded":
        return stored, lambda t: t.expand(shape)
    return stored, lambda t: t


def _attend(backend: str, case: Case, q, k, v, mask):
    """``run_or_refuse`` on the (B, H, S, D) views, passed in ``case.layout``; returns
    ``(out (B, H, Sq, Dv), lse or None)``, or None when the backend refused."""
    args = (q, k, v) if case.layout == "bhsd" else (q.transpose(1, 2), k.transpose(1, 2),
                                                       v.transpose(1, 2))
    result = run_or_refuse(backend, *args, attn_mask=mask, is_causal=case.is_causal,
                           layout=case.layout, return_lse=case.return_lse)
    if result is None:
        return None
    out, lse = result if case.return_lse else (result, None)
    return (out if case.layout == "bhsd" else out.transpose(1, 2)), lse


def _check_outputs(result, ref_out, ref_lse):
    """``out`` and ``lse`` against the float64 reference; rows without keys: out 0, lse -inf."""
    out, lse = result
    empty = torch.isneginf(ref_lse)
    assert out.shape == ref_out.shape and out.dtype == torch.float32
    assert not out.isnan().any(), "NaN in out"
    assert (out[empty] == 0).all(), "a row without visible keys is not 0"
    torch.testing.assert_close(out.detach().double(), ref_out.detach(), rtol=1e-4, atol=1e-5)
    if lse is not None:
        assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
        assert torch.isneginf(lse[empty]).all(), "lse of a row without visible keys is not -inf"
        torch.testing.assert_close(lse.detach().double(), ref_lse.detach(), rtol=1e-4,
                                   atol=1e-5)


def _check_gradients(ours, refs, names):
    for name, grad, ref in zip(names, ours, refs):
        if ref is None:
            continue
        assert grad is not None, f"no gradient for {name}"
        assert torch.isfinite(grad).all(), f"non-finite gradient for {name}"
        torch.testing.assert_close(grad.double(), ref, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")


def test_the_backends_come_from_the_registry():
    """The matrix is every registered backend that runs on CPU here, lse-capable ones among
    them (so lse is checked on more than the reference backend)."""
    assert {"math", "sdpa", "sdpa_flash"} <= set(BACKENDS)
    assert sum(registry.get_backend(b).supports_lse for b in BACKENDS) >= 2


@EXAMPLES
@given(case=cases())
@example(case=HEAD_SLICES)
@example(case=MIXED_STRIDES)
@example(case=EMPTY_BOOL_ROWS)
@example(case=EMPTY_FLOAT_ROWS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_reference_or_refuses(backend, case):
    """out (and lse with return_lse) of a cold and a warm call match the float64 reference
    (rows without keys: out 0, lse -inf), or the backend refuses with explain()'s reasons."""
    attnpatch.dispatch._CACHE.clear()  # each example starts cold: reproducible
    ops = operands(case)
    q, k, v, mask = ops.views(ops.leaves)
    ref_out, ref_lse = expected(backend, q, k, v, mask, case.is_causal)
    for _ in ("cold", "warm"):
        result = _attend(backend, case, q, k, v, mask)
        if result is None:
            return
        _check_outputs(result, ref_out, ref_lse)


@EXAMPLES
@given(case=cases())
@example(case=_case())
@example(case=HEAD_SLICES)
@example(case=MIXED_STRIDES)
@example(case=EMPTY_BOOL_ROWS)
@example(case=EMPTY_FLOAT_ROWS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_through_out_and_lse_match_reference_or_refuse(backend, case):
    """With q, k, v requiring grad: out, lse and the q/k/v gradients of a loss using both out
    and lse (out only without return_lse) match float64 autograd of the reference, with no NaN
    (also for rows that see no key), or the backend refuses with explain()'s reasons (flex has
    no CPU backward; a backend without an lse gradient must refuse return_lse=True)."""
    _check_loss_gradients(backend, case, (True, True, True, False))


def _check_loss_gradients(backend, case, needs) -> None:
    """Out, lse and the gradients of the leaves that ``needs`` marks (q, k, v, mask), through a
    loss on out and lse, against float64 autograd of the reference; or explain()'s refusal."""
    attnpatch.dispatch._CACHE.clear()
    ops = operands(case)
    ref_leaves = ops.detached(torch.float64, needs)
    ref_out, ref_lse = expected(backend, *ops.views(ref_leaves), case.is_causal)
    out_lse_loss(ref_out, ref_lse if case.return_lse else None).backward()
    leaves = ops.detached(requires_grad=needs)
    result = _attend(backend, case, *ops.views(leaves))
    if result is None:
        return
    _check_outputs(result, ref_out, ref_lse)
    out_lse_loss(*result).backward()
    _check_gradients([None if t is None else t.grad for t in leaves],
                     [None if t is None else t.grad for t in ref_leaves],
                     ("q", "k", "v", "attn_mask"))


@MASK_EXAMPLES
@given(case=cases(masks=("float",)), qkv_grad=st.booleans())
@example(case=_case(mask="float"), qkv_grad=False)
@example(case=_case(mask="float", mask_shape="2d", mask_stride="transposed"), qkv_grad=True)
@example(case=EMPTY_FLOAT_ROWS, qkv_grad=True)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_gradient_matches_reference_or_refuses(backend, case, qkv_grad):
    """A float mask that requires grad (q/k/v requiring grad or not): the backend either
    refuses with explain()'s reasons (never raises anything else), or gives out, lse and the
    gradients of the mask (and of q/k/v) equal to float64 autograd of the reference."""
    _check_loss_gradients(backend, case, (qkv_grad, qkv_grad, qkv_grad, True))


# --- an fp32 additive mask with fp16/bf16 queries keeps its precision ------------------------

def _precise_bias(kind: str, seq_q: int, seq_k: int) -> torch.Tensor:
    """An fp32 (Sq, Sk) bias that the query dtype cannot hold: ``far`` puts row 1 entirely near
    -1e5 (-inf in fp16; 512 apart in bf16), ``large`` is 1000 + N(0, 0.5) everywhere (steps of
    0.5 in fp16, 8 in bf16). In fp32 both are ordinary biases: no row is empty."""
    gen = torch.Generator().manual_seed(3)
    bias = torch.randn(seq_q, seq_k, generator=gen)
    if kind == "far":
        bias[1] = -1e5 + torch.randn(seq_k, generator=gen)
    else:
        bias = 1000 + 0.5 * bias
    return bias


@pytest.mark.parametrize("kind", ["far", "large"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_mask_keeps_its_precision_with_low_precision_queries(backend, dtype, kind):
    """An fp32 additive mask with fp16/bf16 q/k/v is applied in fp32, not cast to the query
    dtype first: the error against the float64 reference (same fp32 mask) is at most twice that
    of torch's own SDPA math kernel on the same inputs, plus 1e-3; lse (where the backend gives
    one) matches the reference to fp32 accuracy. Or the backend refuses with reasons."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=gen).to(dtype) for _ in range(3))
    bias = _precise_bias(kind, 9, 9)
    ref_out, ref_lse = expected(backend, q, k, v, bias)
    assert torch.isfinite(ref_lse).all()
    with sdpa_kernel(SDPBackend.MATH):
        torch_err = rel_error(F.scaled_dot_product_attention(q, k, v, attn_mask=bias), ref_out)
    return_lse = registry.get_backend(backend).supports_lse
    result = run_or_refuse(backend, q, k, v, attn_mask=bias, return_lse=return_lse)
    if result is None:
        return
    out, lse = result if return_lse else (result, None)
    assert out.dtype == dtype and not out.isnan().any()
    assert rel_error(out, ref_out) <= 2 * torch_err + 1e-3
    if lse is not None:
        assert lse.dtype == torch.float32
        torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=2e-2)
