"""Replaying a strategy's many small launches as one CUDA graph.

A strategy such as ``dilated`` runs a dozen kernels and a few hundred small tensor ops per call.
At Flux sizes their GPU time (~2 ms) is below the host's time to issue them, so the call is
host-bound. :class:`CapturedCall` captures such a function once per signature and replays it:
its inputs are copied into the graph's own buffers, and its outputs are cloned out of them
(the next replay overwrites those).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Sequence

import torch

from ._caches import BoundedCache

__all__ = ["CapturedCall", "NotCapturable", "captured", "captured_graphs", "signature"]

logger = logging.getLogger(__name__)

#: key -> CapturedCall. Each entry holds its graph's memory (inputs, outputs, intermediates)
#: until the cache is cleared.
_CAPTURED = BoundedCache(16)
#: keys whose function refused capture in its warm-up (:class:`NotCapturable`): they run eagerly
_EAGER = BoundedCache(1024)
#: keys seen once: the first call of a key runs eagerly (it builds plans, compiles the merge and
#: warms the kernels' own caches, none of which a graph may capture)
_SEEN = BoundedCache(256)
#: devices where a capture failed, -> why: torch leaves its allocator routing that device's
#: frees to the failed graph (``capture_end`` raises before it ends that), so no further
#: capture is tried there in this process
_FAILED: dict = {}
_LOCK = threading.Lock()


class NotCapturable(Exception):
    """Raised by a captured function during its warm-up (before any capture begins) when this
    call must not be captured (e.g. a kernel that reads tensors from a cache a graph cannot
    hold); that key then runs eagerly."""


class _WarmUpFailed(Exception):
    """The function failed in the warm-up, before capture began (no graph state touched)."""


class CapturedCall:
    """``fn(*inputs) -> (tensors, extra)`` captured into a CUDA graph on tensors laid out like
    ``inputs`` (same shapes, strides, dtypes, device). Calling it copies new inputs in, replays
    the graph and returns (clones of the output tensors, ``extra`` from the capture).

    Raises what ``fn`` or the capture raises (an op that syncs with the host cannot be
    captured)."""

    def __init__(self, fn: Callable, inputs: Sequence[torch.Tensor]):
        self.device = inputs[0].device
        with torch.cuda.device(self.device):  # a layer on another GPU than the current one
            self._capture(fn, inputs)
        # copy-in, replay and clone-out of one caller must not interleave with another's on the
        # same buffers (the GPU runs them in stream order, the host decides that order)
        self._lock = threading.Lock()

    def _capture(self, fn: Callable, inputs: Sequence[torch.Tensor]):
        self.inputs = [torch.empty_strided(t.shape, _buffer_strides(t), dtype=t.dtype,
                                           device=t.device) for t in inputs]
        for buf, t in zip(self.inputs, inputs):
            buf.copy_(t)
        # torch's recipe: run once on a side stream before capturing, so that lazy
        # initialisation (cuBLAS/cuDNN handles, workspaces) happens outside the graph
        caller = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(caller)
        try:
            with torch.cuda.stream(side):
                fn(*self.inputs)
        except Exception as exc:
            raise _WarmUpFailed(exc) from exc
        caller.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # a capture stream of this device (torch's default one belongs to the device current
        # at the process's first capture); the outer context puts the caller's stream back even
        # where a failed capture leaves torch.cuda.graph's own context unrestored
        capture = torch.cuda.Stream(device=self.device)
        with torch.cuda.stream(caller), torch.cuda.graph(
                self.graph, stream=capture, capture_error_mode="thread_local"):
            self.outputs, self.extra = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor):
        with self._lock, torch.cuda.device(self.device):
            for buf, t in zip(self.inputs, inputs):
                buf.copy_(t)
            self.graph.replay()
            return tuple(o.clone() for o in self.outputs), self.extra


def _buffer_strides(t: torch.Tensor) -> tuple:
    """The strides of ``t``'s graph buffer: its own where its elements fill their memory one to
    one, else dense ones in the same order of dims (a fused projection's slice has gaps, an
    expanded gradient overlaps), so that outputs keep the memory order eager calls give."""
    if _dense(t):
        return t.stride()
    strides = [0] * t.dim()
    size = 1
    # dims of stride 0 (expanded) outermost, so that the last dim keeps stride 1
    for dim in sorted(range(t.dim()), key=lambda d: (t.stride(d) == 0, t.stride(d), -d)):
        strides[dim] = size
        size *= t.shape[dim]
    return tuple(strides)


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s dims, by increasing stride, tile its memory with no gap or overlap."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def signature(*tensors: torch.Tensor) -> tuple:
    """What a captured graph is specific to, for ``tensors``: shape, buffer strides, dtype,
    device; the current stream (a graph's buffers serve one stream's calls in order),
    inference mode and autocast."""
    stream = torch.cuda.current_stream(tensors[0].device)
    # inference mode: buffers made in it cannot be written outside it; autocast: the captured
    # kernels' dtypes
    return (stream.cuda_stream, torch.is_inference_mode_enabled(),
            torch.is_autocast_enabled("cuda"),
            *((t.shape, _buffer_strides(t), t.dtype, t.device) for t in tensors))


def captured(key, fn: Callable, inputs: Sequence[torch.Tensor]):
    """``fn(*inputs)`` through the CUDA graph cached under ``key`` (which must include
    :func:`signature` of ``inputs`` and whatever else ``fn`` bakes in). Returns None where the
    call should run eagerly instead: the first time ``key`` is seen, inside the caller's own
    capture, where ``fn`` raised :class:`NotCapturable` (or failed) in its warm-up, and on a
    device where a capture failed (logged once; no capture is tried there again)."""
    if torch.cuda.is_current_stream_capturing():  # inside the caller's own capture: eager
        return None
    entry = _CAPTURED.get(key)
    if entry is not None:
        return entry(*inputs)
    device = inputs[0].device
    if key in _EAGER or device in _FAILED:
        return None
    with _LOCK:
        entry = _CAPTURED.get(key)
        if entry is not None:  # another thread captured it meanwhile
            return entry(*inputs)
        if key in _EAGER or device in _FAILED:
            return None
        if _SEEN.get(key) is None:
            _SEEN.put(key, True)
            return None
        try:
            entry = CapturedCall(fn, inputs)
        except _WarmUpFailed as exc:
            if not isinstance(exc.__cause__, NotCapturable):
                logger.warning("attnpatch: a call to be captured in a CUDA graph failed in its "
                               "warm-up (%s: %s); it runs without one",
                               type(exc.__cause__).__name__, str(exc.__cause__)[:200])
            _EAGER.put(key, True)
            return None
        except Exception as exc:  # noqa: BLE001  (the capture itself failed: stop capturing)
            _FAILED[device] = f"{type(exc).__name__}: {str(exc)[:200]}"
            logger.warning("attnpatch: could not capture a CUDA graph on %s (%s); no graph is "
                           "captured there again in this process, these calls run without one",
                           device, _FAILED[device])
            return None
        _CAPTURED.put(key, entry)
    return entry(*inputs)


def captured_graphs() -> int:
    """How many CUDA graphs are held now (for tests and reports)."""
    return len(_CAPTURED)
