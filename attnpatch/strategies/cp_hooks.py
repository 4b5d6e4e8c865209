"""Context parallelism at the pipeline level: the denoiser hooks of ``ring``/``ulysses``/``usp``.

A model family's plan (:func:`attnpatch.pipelines.sharding_plan`: diffusers' ``_cp_plan`` or
attnpatch's own for SD3 and UNets) names submodules and what happens there, with diffusers'
semantics:

- ``{name_or_index: ContextParallelInput(split_dim, expected_dims, split_output)}``: split the
  named forward inputs (``split_output=False``) or the outputs at those indices
  (``split_output=True``) along ``split_dim``; a tensor with another number of dimensions than
  ``expected_dims`` is left whole (Wan's 1-D ``timestep``); a tuple input takes a list of them;
- ``ContextParallelOutput(gather_dim, expected_dims)`` (or a list, one per output): gather the
  output from every rank along ``gather_dim``.

A split is ``torch.tensor_split`` over the group's size, this rank's piece (uneven lengths are
fine: the attention backends take uneven shards), so tensors split along the same length
(the hidden states and their RoPE) split alike. A gather exchanges the pieces' lengths and
concatenates them in rank order.

Gradients: the gather is an autograd function whose backward is its exact adjoint, a sum of
every rank's gradient followed by this rank's slice (a reduce-scatter). With every rank
computing the same loss, each rank's parameter gradients are then its share of the gradient of
the sum of the ranks' losses, and their mean over the ranks (what DDP's all-reduce computes
under ``accelerate launch`` + ``accelerator.prepare``) is the single-process gradient, for every
parameter, wherever the plan shards and gathers. The hooks never touch parameter gradients.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from .._errors import AttnPatchError

__all__ = ["plan_hooks", "plan_entries", "split_piece", "GatherOp"]

logger = logging.getLogger(__name__)


def _is_input(entry: Any) -> bool:
    return type(entry).__name__ == "ContextParallelInput"


def _is_output(entry: Any) -> bool:
    return type(entry).__name__ == "ContextParallelOutput"


def plan_entries(model: torch.nn.Module, plan: Any) -> list[tuple[str, Any]]:
    """(submodule path, entry) pairs of ``plan`` (a mapping path -> entry, as diffusers'
    ``_cp_plan``, or a sequence of such pairs where a path needs two entries), with each ``*``
    (a ModuleList's items) expanded to the concrete paths."""
    items = plan.items() if isinstance(plan, dict) else plan
    out = []
    for path, entry in items:
        if not (isinstance(entry, dict) or _is_output(entry) or (
                isinstance(entry, (list, tuple))
                and all(e is None or _is_output(e) for e in entry))):
            raise AttnPatchError(f"context-parallel plan of {type(model).__name__}: entry "
                                 f"{path!r} is {entry!r}; expected a dict of "
                                 "ContextParallelInput or ContextParallelOutput(s)")
        out.extend((p, entry) for p in _expand(model, path))
    return out


def _expand(model: torch.nn.Module, path: str) -> list[str]:
    if "*" not in path:
        try:
            model.get_submodule(path)
        except AttributeError:
            raise AttnPatchError(f"context-parallel plan of {type(model).__name__}: "
                                 f"{path!r} is not a submodule of it") from None
        return [path]
    head, _, tail = path.partition("*")
    container = model.get_submodule(head.rstrip("."))
    if not isinstance(container, torch.nn.ModuleList):
        raise AttnPatchError(f"context-parallel plan of {type(model).__name__}: {path!r}: '*' "
                             "stands for the items of a ModuleList")
    paths = []
    for i in range(len(container)):
        paths.extend(_expand(model, f"{head}{i}{tail}"))
    return paths


def split_piece(x: torch.Tensor, dim: int, rank: int, size: int, what: str = "a tensor"
                ) -> torch.Tensor:
    """This rank's piece of ``x`` split in ``size`` along ``dim`` (``torch.tensor_split``).
    Raises when ``x`` has fewer than ``size`` entries there: some rank would get an empty
    piece (an attention with no tokens). ``x`` is the same on every rank before the split, so
    every rank raises alike (none is left waiting in a collective)."""
    if x.shape[dim] < size:
        raise AttnPatchError(
            f"context parallel over {size} ranks: {what} has {x.shape[dim]} entries along dim "
            f"{dim} (shape {tuple(x.shape)}), fewer than the ranks, so some rank would get "
            "none: give it at least one per rank (e.g. pad the prompt to the tokenizer's "
            "max_length) or use fewer ranks")
    return x.tensor_split(size, dim=dim)[rank]


def _piece(x: Any, spec: Any, rank: int, size: int, what: str) -> Any:
    if isinstance(x, (list, tuple)):
        if not isinstance(spec, (list, tuple)) or len(spec) != len(x):
            raise AttnPatchError(f"context-parallel plan: a sequence of {len(x)} inputs needs "
                                 f"a list of as many ContextParallelInput, got {spec!r}")
        return type(x)(_piece(t, s, rank, size, f"{what}[{i}]")
                       for i, (t, s) in enumerate(zip(x, spec)))
    if not isinstance(x, torch.Tensor) or spec is None:
        return x
    if spec.expected_dims is not None and x.dim() != spec.expected_dims:
        return x  # diffusers' semantics: another rank of tensor is not split
    return split_piece(x, spec.split_dim, rank, size, what)


class GatherOp(torch.autograd.Function):
    """All-gather of uneven pieces along ``dim``, in rank order; backward: the sum of every
    rank's gradient, this rank's slice of it (the adjoint, a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, comm) -> torch.Tensor:
        dim = dim % x.dim()
        other = [s for i, s in enumerate(x.shape) if i != dim]
        rows = comm.all_gather_rows([x.shape[dim], x.dim(), *other], x.device,
                                    "the exchange of the gathered pieces' shapes")
        bad = [comm.who(r) for r, row in enumerate(rows) if row[1:] != rows[comm.rank][1:]]
        if bad:
            raise AttnPatchError(f"context-parallel gather on {comm.who(comm.rank)}: the pieces "
                                 f"of {', '.join(bad)} differ in shape from this rank's "
                                 f"{tuple(x.shape)} outside dim {dim}: every rank must run the "
                                 "denoiser on the same inputs (same seed, same batch)")
        sizes = [row[0] for row in rows]
        longest = max(sizes)
        shape = list(x.shape)
        shape[dim] = longest
        padded = x.new_zeros(shape)
        padded.narrow(dim, 0, x.shape[dim]).copy_(x)
        outs = [torch.empty_like(padded) for _ in sizes]
        comm.wait([dist.all_gather(outs, padded, group=comm.pg, async_op=True)],
                  "the gather of the denoiser's output")
        ctx.dim, ctx.comm = dim, comm
        ctx.start, ctx.length = sum(sizes[:comm.rank]), x.shape[dim]
        return torch.cat([o.narrow(dim, 0, n) for o, n in zip(outs, sizes)], dim=dim)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        comm = ctx.comm
        comm.wait([dist.all_reduce(grad, group=comm.pg, async_op=True)],
                  "the reduction of the gathered output's gradient")
        return grad.narrow(ctx.dim, ctx.start, ctx.length).clone(), None, None


class _SplitInputs:
    """Pre-hook on ``path``: split the named forward inputs."""

    def __init__(self, path: str, specs: dict, comm):
        self.path, self.specs, self.comm = path, specs, comm
        self._index: Optional[dict[str, int]] = None

    def _positions(self, module: torch.nn.Module) -> dict[str, int]:
        if self._index is None:
            params = list(inspect.signature(type(module).forward).parameters)[1:]
            self._index = {name: i for i, name in enumerate(params)}
        return self._index

    def _what(self, module: torch.nn.Module, name: str) -> str:
        return f"{type(module).__name__}.forward's {name}" + (
            f" (at {self.path})" if self.path else "")

    def pre(self, module, args, kwargs):
        args = list(args)
        for name, spec in self.specs.items():
            if name in kwargs:
                kwargs[name] = _piece(kwargs[name], spec, self.comm.rank, self.comm.size,
                                      self._what(module, name))
                continue
            index = self._positions(module).get(name)
            if index is None:
                raise AttnPatchError(f"context-parallel plan: {type(module).__name__}.forward "
                                     f"({self.path or 'the model'}) has no input {name!r}")
            if index < len(args):
                args[index] = _piece(args[index], spec, self.comm.rank, self.comm.size,
                                     self._what(module, name))
        return tuple(args), kwargs

    def __repr__(self) -> str:
        return f"<split inputs {sorted(self.specs)} at {self.path!r}>"


class _SplitOutputs:
    """Post-hook on ``path``: split the outputs at the given indices."""

    def __init__(self, path: str, specs: dict, comm):
        self.path, self.specs, self.comm = path, specs, comm

    def post(self, module, args, kwargs, output):
        if output is None:  # the forward raised
            return None
        single = isinstance(output, torch.Tensor)
        items = [output] if single else list(output)
        for index, spec in self.specs.items():
            items[index] = _piece(items[index], spec, self.comm.rank, self.comm.size,
                                  f"{type(module).__name__}'s output {index}")
        return items[0] if single else type(output)(items)

    def __repr__(self) -> str:
        return f"<split outputs {sorted(self.specs)} at {self.path!r}>"


class _GatherOutputs:
    """Post-hook on ``path``: gather the outputs from every rank."""

    def __init__(self, path: str, specs: Sequence[Any], comm):
        self.path, self.specs, self.comm = path, list(specs), comm

    def post(self, module, args, kwargs, output):
        if output is None:
            return None
        single = isinstance(output, torch.Tensor)
        items = [output] if single else list(output)
        if len(items) != len(self.specs):
            raise AttnPatchError(f"context-parallel plan: {self.path!r} returned {len(items)} "
                                 f"outputs, the plan gathers {len(self.specs)}")
        for i, spec in enumerate(self.specs):
            if spec is not None:
                items[i] = GatherOp.apply(items[i], spec.gather_dim, self.comm)
        return items[0] if single else type(output)(items)

    def __repr__(self) -> str:
        return f"<gather at {self.path!r}>"


def plan_hooks(model: torch.nn.Module, plan: Any, comm) -> list:
    """The hook objects (each with its ``path``) that carry out ``plan`` on ``model`` over
    ``comm``'s group: input splits, output splits and gathers, in the plan's order."""
    hooks: list = []
    for path, entry in plan_entries(model, plan):
        if isinstance(entry, dict):
            for key, spec in entry.items():
                specs = spec if isinstance(spec, (list, tuple)) else [spec]
                if not all(_is_input(s) for s in specs):
                    raise AttnPatchError(f"context-parallel plan of {type(model).__name__}: "
                                         f"{path!r}[{key!r}] is {spec!r}, not a "
                                         "ContextParallelInput")
            inputs = {k: s for k, s in entry.items()
                      if not _first(s).split_output}
            outputs = {k: s for k, s in entry.items() if _first(s).split_output}
            if any(not isinstance(k, int) for k in outputs):
                raise AttnPatchError(f"context-parallel plan of {type(model).__name__}: "
                                     f"{path!r}: split_output entries are keyed by output index")
            if inputs:
                hooks.append(_SplitInputs(path, inputs, comm))
            if outputs:
                hooks.append(_SplitOutputs(path, outputs, comm))
        else:
            specs = [entry] if _is_output(entry) else list(entry)
            hooks.append(_GatherOutputs(path, specs, comm))
    if not any(isinstance(h, _GatherOutputs) for h in hooks):
        raise AttnPatchError(f"context-parallel plan of {type(model).__name__} gathers nothing "
                             "(no ContextParallelOutput): its output would stay sharded")
    return hooks


def _first(spec: Any) -> Any:
    return spec[0] if isinstance(spec, (list, tuple)) else spec
