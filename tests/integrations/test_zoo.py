"""Model zoo (issue 10, item 5): every softmax-attention model class of the installed diffusers
(and the text/image encoders its pipelines load), built tiny from a config, patched with
``backend="auto"``.

Per model: the unpatched forward runs under an attention counter written here, independently
of attnpatch; the patched forward matches it (relative error <= 1e-5, fp32); every module the
counter saw attention in is either routed with exactly the counted calls or reported as not
routed with a reason; unpatch restores the forward bitwise. A table of the results prints at
the end of the session (``tests/integrations/conftest.py``).
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

import attnpatch
from tests.tiny_models import rel_error
from tests.zoo_models import (FACTORIES, NO_SOFTMAX_ATTENTION, NOT_STANDALONE, Case, build,
                              installed_model_classes)

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

TOL = 1e-5
ZOO = sorted(n for n in FACTORIES if n not in NO_SOFTMAX_ATTENTION)  # softmax attention


# --- an attention counter that knows nothing of attnpatch -------------------------------------

_SDPA = {"scaled_dot_product_attention", "multi_head_attention_forward",
         "_native_multi_head_attention", "flex_attention"}
_MATMUL = {"matmul", "__matmul__", "__rmatmul__", "bmm", "baddbmm", "einsum", "mm"}
_SOFTMAX = {"softmax", "_softmax"}
# learned projections and norms: a score that went through one of these is no longer QK^T (a
# MoE router's softmax over F.linear(hidden) is not attention, even if hidden came from one)
_MIXING = {"linear", "bilinear", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
           "conv_transpose2d", "conv_transpose3d", "layer_norm", "group_norm", "rms_norm",
           "batch_norm", "instance_norm", "embedding"}


class AttentionCounter(TorchFunctionMode):
    """Counts attention computations per innermost running module (``named_modules`` names).

    Counted: ``F.scaled_dot_product_attention``, ``F.multi_head_attention_forward``,
    ``torch._native_multi_head_attention``, FlexAttention, and hand-written attention: a
    ``softmax`` whose input derives from a ``matmul``/``bmm``/``baddbmm``/``einsum``/``@`` result
    (every op taking a tainted tensor taints its outputs; learned projections and norms end the
    chain), counted once its probabilities (or anything derived from them) reach a matmul, i.e.
    ``softmax(QK^T) @ V``: a softmax over scores that only picks blocks (NABLA) or experts is
    not attention. The call is booked on the module running when the softmax ran.

    Inside ``__torch_function__`` the mode is off, so what a counted call does inside (SDPA
    within ``multi_head_attention_forward``) is not seen, hence not counted twice.
    ``flex_attention`` compiles itself unless torch's flex debug switch is on; the counter turns
    the switch on while it runs so that the flex higher-order op reaches the mode eagerly.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        self.counts: Counter = Counter()
        self.kinds: Counter = Counter()
        self._stack: list[str] = []
        self._scores = WeakIdKeyDictionary()   # tensor derived from a matmul -> True
        self._probs = WeakIdKeyDictionary()    # tensor derived from such a softmax -> its record
        self._hooks = []

    # innermost module, from global forward hooks
    def _pre(self, module, args):
        self._stack.append(self.names.get(id(module), self._stack[-1] if self._stack else ""))

    def _post(self, module, args, output):
        if self._stack:
            self._stack.pop()

    def __enter__(self):
        from torch.nn.attention import flex_attention
        from torch.nn.modules import module as nn_module
        self._flex_debug = flex_attention._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG
        flex_attention._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True
        self._hooks = [nn_module.register_module_forward_pre_hook(self._pre),
                       nn_module.register_module_forward_hook(self._post, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc):
        from torch.nn.attention import flex_attention
        flex_attention._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = self._flex_debug
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return super().__exit__(*exc)

    def _where(self) -> str:
        return self._stack[-1] if self._stack else ""

    def _count(self, kind: str, where: str) -> None:
        self.counts[where] += 1
        self.kinds[kind] += 1

    @staticmethod
    def _tensors_in(obj) -> list[torch.Tensor]:
        return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        out = func(*args, **kwargs)
        if name in _SDPA:
            self._count(name, self._where())
            return out
        if name in _MIXING:
            return out
        inputs = self._tensors_in((args, kwargs))
        if name in _SOFTMAX:
            if inputs and inputs[0] in self._scores:
                record = {"where": self._where(), "counted": False}
                for t in self._tensors_in(out):
                    self._probs[t] = record
            return out
        outputs = self._tensors_in(out)
        probs = [self._probs[t] for t in inputs if t in self._probs]
        if name in _MATMUL:
            for record in probs:
                if not record["counted"]:
                    record["counted"] = True
                    self._count("softmax", record["where"])
        elif probs:
            for t in outputs:
                self._probs[t] = probs[0]
        if name in _MATMUL or any(t in self._scores for t in inputs):
            for t in outputs:
                self._scores[t] = True
        return out


# --- helpers ----------------------------------------------------------------------------------

def _tensors(out) -> list[torch.Tensor]:
    """Every floating tensor of a model output (dataclass / ModelOutput / tuple / dict)."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    elif hasattr(out, "__dataclass_fields__"):
        out = [getattr(out, f) for f in out.__dataclass_fields__]
    return [t for t in tree_flatten(out)[0]
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _forward(case: Case) -> list[torch.Tensor]:
    with torch.no_grad():
        out = case.call(case.model, case.kwargs) if case.call else case.model(**case.kwargs)
    return [t.detach().clone() for t in _tensors(out)]


def _valid(case: Case, t: torch.Tensor) -> torch.Tensor:
    """Padded query rows are not compared (their values depend on the kernel)."""
    m = case.valid
    if m is not None and t.dim() >= 2 and tuple(t.shape[:2]) == tuple(m.shape):
        return t[m]
    return t


def _max_rel_error(case: Case, outs, refs) -> float:
    return max(rel_error(_valid(case, o), _valid(case, r)) for o, r in zip(outs, refs))


def routing_problems(counts: Counter, report) -> list[str]:
    """Why the report does not match what the counter saw (empty: it does)."""
    rows = {r.name: r for r in report}
    problems = []
    for name, n in sorted(counts.items()):
        r = rows.get(name)
        if r is None:
            problems.append(f"{name or '<model>'}: {n} attention call(s), no report row")
        elif r.routed and r.calls != n:
            problems.append(f"{name}: routed, report says {r.calls} call(s), counted {n}")
        elif not r.routed and not (r.note or "").strip():
            problems.append(f"{name}: not routed and no note why")
    for r in report:
        if r.routed and r.name not in counts and r.calls != 0:
            problems.append(f"{r.name}: routed, report says {r.calls} call(s), counted 0")
    if report and all(r.routed for r in report):
        routed = sum(r.calls for r in report)
        total = sum(counts.values())
        if routed != total:
            problems.append(f"every module reported routed, but the routed calls sum to {routed} "
                            f"and {total} attention call(s) were counted")
    return problems


def _short(text: Optional[str], n: int = 90) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _error(err: BaseException) -> str:
    return "raised: " + _short(str(err).split(" (diffusers attention modules")[0], 120)


# --- the zoo ----------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _row(zoo_table: list, name: str) -> dict:
    row = {"model": name, "routed": "-", "counted": "-", "not_routed": "-", "max_rel_err": "-",
           "status": "FAIL", "reasons": ""}
    zoo_table.append(row)
    return row


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model(name, zoo_table):
    case = build(name)  # skips when the installed library lacks the class
    model = case.model
    row = _row(zoo_table, name)

    # the unpatched model runs, and the counter sees its attention
    ref = _forward(case)
    assert ref, f"{name}: the forward returned no floating tensor"
    assert all(torch.isfinite(t).all() for t in ref), f"{name}: unpatched output not finite"
    with AttentionCounter(model) as counter:
        counted_out = _forward(case)
    counts = counter.counts
    row["counted"] = sum(counts.values())
    assert counts, f"{name}: the counter saw no attention call in the unpatched forward"
    assert _max_rel_error(case, counted_out, ref) <= TOL  # counting changes nothing
    keys = list(model.state_dict())

    # patched: same output, and a report that matches the count
    try:
        handle = attnpatch.patch(model)
    except attnpatch.AttnPatchError as err:
        # a model none of whose attention can be routed (all hand-written): patch() refuses
        # it whole, naming every module's reason, and leaves it untouched
        if f"none of the {len(counts)} attention modules" not in str(err):
            row["status"] = f"patch() raised {type(err).__name__}"
            row["reasons"] = _error(err)
            raise
        after = _forward(case)
        assert all(torch.equal(a, r) for a, r in zip(after, ref)) and len(after) == len(ref)
        row.update(routed=0, not_routed=len(counts), status="ok (refused: none routable)",
                   reasons=_error(err))
        return
    except Exception as err:
        row["status"] = f"patch() raised {type(err).__name__}"
        row["reasons"] = _error(err)
        raise
    try:
        out = _forward(case)
        report = handle.report()
        keys_patched = list(model.state_dict())
    except Exception as err:
        row["status"] = f"patched forward raised {type(err).__name__}"
        row["reasons"] = _error(err)
        raise
    finally:
        handle.unpatch()
    err = _max_rel_error(case, out, ref)
    skipped = [r for r in report if not r.routed]
    row.update(routed=sum(r.calls for r in report if r.routed), max_rel_err=f"{err:.1e}",
               not_routed=len(skipped),
               reasons="; ".join(sorted({f"{r.module_type}: {_short(r.note)}" for r in skipped})))
    problems = routing_problems(counts, report)
    if problems:
        row["reasons"] = "; ".join(filter(None, [row["reasons"]] + [
            p for p in problems if not p.startswith("every module")]))

    # unpatched again: bitwise the first forward
    after = _forward(case)
    restored = len(after) == len(ref) and all(torch.equal(a, r) for a, r in zip(after, ref))

    failures = [what for what, bad in (("output", err > TOL), ("report", bool(problems)),
                                       ("state_dict", keys_patched != keys
                                        or list(model.state_dict()) != keys),
                                       ("restore", not restored)) if bad]
    row["status"] = "ok" if not failures else "FAIL: " + ", ".join(failures)
    assert err <= TOL, f"{name}: patched output differs from unpatched: rel error {err:.2e}"
    assert not problems, (f"{name}: the report does not match the counted attention calls: "
                          + "; ".join(problems))
    assert keys_patched == keys and list(model.state_dict()) == keys, \
        f"{name}: state_dict keys changed"
    assert restored, f"{name}: the forward after unpatch() is not bitwise the unpatched one"


@pytest.mark.parametrize("name", sorted(NO_SOFTMAX_ATTENTION))
def test_model_without_softmax_attention_is_refused(name, zoo_table):
    """Models with no (softmax) attention: the counter finds none, and patch() says so."""
    case = build(name)
    row = _row(zoo_table, name)
    row["routed"] = 0
    ref = _forward(case)
    assert all(torch.isfinite(t).all() for t in ref), f"{name}: unpatched output not finite"
    with AttentionCounter(case.model) as counter:
        _forward(case)
    row["counted"] = sum(counter.counts.values())
    assert not counter.counts, (f"{name} is listed as having no softmax attention, but the "
                                f"counter saw {dict(counter.counts)}")
    with pytest.raises(attnpatch.AttnPatchError) as raised:
        attnpatch.patch(case.model)
    assert "no attention modules found" in str(raised.value), str(raised.value)
    row["status"] = "ok (refused)"


# --- the counter itself -----------------------------------------------------------------------

def test_counter_counts_each_attention_once():
    """Nested calls are not seen twice; a softmax over scores that never weighs V is not
    attention; the call is booked on the innermost module."""
    torch.manual_seed(0)

    class HandWritten(torch.nn.Module):
        def forward(self, q, k, v):
            scores = torch.baddbmm(torch.empty(q.shape[0], q.shape[1], k.shape[1]), q,
                                   k.transpose(1, 2), beta=0, alpha=0.5)
            probs = (scores + 1.0).float().softmax(-1)
            return torch.nn.functional.dropout(probs, 0.0) @ v

    class BlockPicker(torch.nn.Module):  # NABLA-like: softmax over pooled QK^T picks blocks
        def forward(self, q, k):
            return torch.softmax(q @ k.transpose(1, 2), -1).cumsum(-1) > 0.5

    class Router(torch.nn.Module):  # MoE gate: softmax over a learned projection
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(8, 4)

        def forward(self, x):
            return torch.softmax(self.gate(x), -1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.hand = HandWritten()
            self.picker = BlockPicker()
            self.router = Router()

        def forward(self, x):
            y = self.mha(x, x, x, need_weights=False)[0]  # SDPA inside, not counted again
            y = y + self.hand(y, y, y)
            y = y + torch.nn.functional.scaled_dot_product_attention(y, y, y)
            self.picker(y, y)
            return self.router(y @ torch.ones(8, 8))

    net = Net().eval()
    with torch.no_grad(), AttentionCounter(net) as counter:
        net(torch.randn(2, 5, 8))
    assert counter.counts == Counter({"mha": 1, "hand": 1, "": 1})
    assert counter.kinds == Counter({"multi_head_attention_forward": 1, "softmax": 1,
                                     "scaled_dot_product_attention": 1})


# --- nothing in the installed diffusers slips by ----------------------------------------------

def test_every_installed_model_class_is_covered():
    classes = installed_model_classes()
    covered = set(ZOO) | set(NO_SOFTMAX_ATTENTION) | set(NOT_STANDALONE)
    missing = sorted(set(classes) - covered)
    assert not missing, (f"diffusers {diffusers.__version__} has model classes the zoo does not "
                         f"know: {missing}; add a factory to tests/zoo_models.py, or list them in "
                         f"NO_SOFTMAX_ATTENTION / NOT_STANDALONE with a reason")
    for table in (NO_SOFTMAX_ATTENTION, NOT_STANDALONE):
        assert all(isinstance(r, str) and r.strip() for r in table.values())
    assert not (set(ZOO) & set(NO_SOFTMAX_ATTENTION)) and not (set(ZOO) & set(NOT_STANDALONE))
