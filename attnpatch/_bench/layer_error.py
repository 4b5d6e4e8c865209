"""Per-layer errors of a sparse strategy inside a model forward (``attnpatch bench --suite
sparse``): a strategy, registered for the measurement only, that runs the sparse backend on each
attention call, runs dense attention on the same call too, records the relative error of the
call's output, and returns the sparse output (so the forward is the sparse one)."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Optional

import torch

import attnpatch
from attnpatch.registry import Strategy

from .timing import rel

NAME = "bench_layer_error"
_SINK: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar(
    "attnpatch_bench_layer_errors", default=None)


class LayerErrorStrategy(Strategy):
    """``sparse`` (a backend name) with ``sparse_options`` (a tuple of (name, value) pairs) on
    every call, and ``dense`` (default ``auto``) on the same call: the relative error of the
    sparse output goes to the list of :func:`layer_errors`."""

    name = NAME
    reads_token_layout = True
    supports_backward = False
    supports_dropout = False
    options = frozenset({"sparse", "sparse_options", "dense"})

    def run(self, call, **options: Any):
        opts = call.options
        out = attnpatch.run_backend(opts.sparse, call.replace(), **dict(opts.sparse_options or ()))
        sink = _SINK.get()
        if sink is not None:
            dense = attnpatch.run_backend(opts.dense or "auto", call.replace())
            sink.append(rel(out, dense))
        return out


@contextlib.contextmanager
def layer_errors(model: torch.nn.Module, strategy: str, options: dict,
                 dense: str = "auto") -> Iterator[list]:
    """Patch ``model`` with ``strategy`` (``options``) wrapped by :class:`LayerErrorStrategy`
    (registered for the block only); yields the list that each attention call of the forwards
    run inside appends its relative error (sparse against ``dense``) to, in call order."""
    attnpatch.register_backend(LayerErrorStrategy, replace=True)
    errors: list[float] = []
    token = _SINK.set(errors)
    try:
        pairs = tuple(sorted((k, v) for k, v in options.items()))
        with attnpatch.patch(model, backend=NAME, sparse=strategy, sparse_options=pairs,
                             dense=dense):
            yield errors
    finally:
        _SINK.reset(token)
        attnpatch.registry.unregister_backend(NAME)
