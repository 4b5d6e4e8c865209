"""attnpatch under threads: ``attention_backend`` blocks stay per thread, forced SDPA kernels
do not leak torch's process-global SDPA flags into other threads' plain SDPA calls, and a
``torch.compile`` running in another thread does not switch this thread's eager calls to the
traced path."""

from __future__ import annotations

import contextlib
import threading
import time
import types

import pytest
import torch
import torch.nn.functional as F

import attnpatch
from attnpatch.backends.math import reference_attention
from attnpatch.dispatch import dispatch_call

from .conftest import cpu_backends, make_inputs, reference, rel_error

JOIN_TIMEOUT = 120.0


def _sdpa_flags() -> dict[str, bool]:
    """torch's process-global SDPA kernel switches (``sdpa_kernel`` flips them, also on CPU)."""
    cuda = torch.backends.cuda
    return {"flash": cuda.flash_sdp_enabled(), "mem_efficient": cuda.mem_efficient_sdp_enabled(),
            "math": cuda.math_sdp_enabled(), "cudnn": cuda.cudnn_sdp_enabled()}


def _set_sdpa_flags(flags: dict[str, bool]) -> None:
    cuda = torch.backends.cuda
    cuda.enable_flash_sdp(flags["flash"])
    cuda.enable_mem_efficient_sdp(flags["mem_efficient"])
    cuda.enable_math_sdp(flags["math"])
    cuda.enable_cudnn_sdp(flags["cudnn"])


class Threads:
    """Start threads; join them with a timeout; raise in the calling thread an AssertionError
    listing every thread that raised (chained to the first exception)."""

    def __init__(self):
        self.threads: list[threading.Thread] = []
        self.errors: list[tuple[str, BaseException]] = []

    def add(self, name: str, target, *args) -> None:
        def run():
            try:
                target(*args)
            except BaseException as err:  # noqa: BLE001 - handed to the main thread
                self.errors.append((name, err))
        self.threads.append(threading.Thread(target=run, name=name, daemon=True))

    def run(self) -> None:
        for thread in self.threads:
            thread.start()
        deadline = time.monotonic() + JOIN_TIMEOUT
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self.threads if t.is_alive()]
        assert not stuck, f"threads still running after {JOIN_TIMEOUT} s: {stuck}"
        if self.errors:
            failures = "\n".join(f"  {name}: {type(err).__name__}: {err}"
                                 for name, err in self.errors)
            raise AssertionError(f"{len(self.errors)} thread(s) failed:\n{failures}"
                                 ) from self.errors[0][1]


def test_backend_blocks_stay_per_thread_and_leave_torch_sdpa_alone():
    """8 threads, each inside its own ``attention_backend(name)`` block (the CPU backends from
    the registry, repeated), call attention 50 times on their own inputs: each gets the
    reference result, and the backend that ran is its own. Meanwhile a 9th thread calls plain
    ``F.scaled_dot_product_attention`` on non-contiguous inputs (last-dim stride 2, which the
    CPU flash kernel refuses, so a leaked "flash only" setting breaks it): it always runs and
    matches the reference. Afterwards torch's SDPA flags are what they were."""
    flags = _sdpa_flags()
    names = (cpu_backends() * 8)[:8]
    calls = []
    for index, name in enumerate(names):
        q, k, v, mask = make_inputs(batch=1, heads=2, seq_q=9 + index, seq_k=12, head_dim=16,
                                    mask="bool" if index % 2 else None, seed=index)
        calls.append((name, (q, k, v, mask), reference(q, k, v, mask)[0]))
        if name == "flex":
            # flex compiles each new shape, even eagerly; two dynamo compiles at once can crash
            # torch itself, so compile here, before the threads start
            attnpatch.attention(q, k, v, attn_mask=mask, backend=name)
    attnpatch.dispatch._CACHE.clear()  # attnpatch's own cache still starts cold
    start = threading.Barrier(len(names) + 1)
    done = threading.Event()
    remaining = [len(names)]
    lock = threading.Lock()

    def worker(name, inputs, ref):
        q, k, v, mask = inputs
        try:
            with attnpatch.attention_backend(name):
                start.wait(JOIN_TIMEOUT)
                for _ in range(50):
                    out, selection = dispatch_call(q, k, v, attn_mask=mask)
                    assert selection is not None and selection.backend.name == name, (
                        selection, name)
                    assert rel_error(out, ref) <= 1e-5
        finally:
            with lock:
                remaining[0] -= 1
                if not remaining[0]:
                    done.set()

    def plain_sdpa():
        gen = torch.Generator().manual_seed(99)
        q, k, v = (torch.randn(1, 10, 2, 32, generator=gen)[..., ::2].transpose(1, 2)
                   for _ in range(3))
        ref, _ = reference(q, k, v)
        start.wait(JOIN_TIMEOUT)
        count = 0
        while not done.is_set() or count < 200:
            out = F.scaled_dot_product_attention(q, k, v)
            assert rel_error(out, ref) <= 1e-5
            count += 1

    threads = Threads()
    for index, (name, inputs, ref) in enumerate(calls):
        threads.add(f"{name}-{index}", worker, name, inputs, ref)
    threads.add("plain-sdpa", plain_sdpa)
    try:
        threads.run()
    finally:
        after = _sdpa_flags()
        _set_sdpa_flags(flags)  # a leak must not reach later tests
    assert after == flags, "torch's SDPA flags changed"


def _compile_in_a_loop(stop: threading.Event):
    """Keep torch.compile busy (dynamo sets torch.compiler.is_compiling() for the whole
    process while it compiles): compile a function with a long body, again and again, each
    time as a new code object (so nothing is cached and nothing needs a reset meanwhile)."""
    def body(x):
        for _ in range(30):
            x = torch.sin(x) + x * 2
        return x

    count = 0
    while not stop.is_set():
        code = body.__code__.replace(co_name=f"_busy_{count}")
        torch.compile(types.FunctionType(code, body.__globals__, code.co_name),
                      backend="eager")(torch.randn(4))
        count += 1


class _WithOption(attnpatch.Backend):
    """The math backend, taking one (ignored) option: a block that sets it has options."""

    name = "option_test"
    priority = None
    options = frozenset({"tag"})

    def forward(self, call, tag=None):
        return reference_attention(call)[0]


@pytest.fixture
def option_backend():
    attnpatch.register_backend(_WithOption)
    yield _WithOption.name
    attnpatch.unregister_backend(_WithOption.name)


@pytest.mark.parametrize("block", ["none", "block", "block-with-options"])
def test_eager_calls_validate_while_another_thread_compiles(block, option_backend):
    """While another thread is inside torch.compile, this thread's eager calls still take the
    eager path: a bad ``scale`` raises the usual AttnPatchError (not a ValueError from the
    traced path, nor "is active while torch.compile traces" for a block with options), and a
    good call returns the reference result. The overlap is checked: the loop runs until the
    compile flag was seen set around a call at least 20 times. (Nothing here compiles in
    this thread: two concurrent dynamo compiles can crash torch itself.)"""
    q, k, v, _ = make_inputs(batch=1, heads=2, seq_q=6, head_dim=8)
    ref, _ = reference(q, k, v)
    context = {"none": contextlib.nullcontext(),
               "block": attnpatch.attention_backend("math"),
               "block-with-options": attnpatch.attention_backend(option_backend, tag=1)}[block]
    backend = "math" if block == "none" else None
    stop = threading.Event()
    threads = Threads()
    threads.add("compiler", _compile_in_a_loop, stop)
    compiler = threads.threads[0]
    compiler.start()
    overlapped = 0
    flag_seen = False
    start = time.monotonic()
    deadline = start + 60
    try:
        with context:
            while overlapped < 20 and time.monotonic() < deadline and compiler.is_alive():
                was_compiling = torch.compiler.is_compiling()
                out = attnpatch.attention(q, k, v, backend=backend)
                with pytest.raises(attnpatch.AttnPatchError,
                                   match="scale must be None or a finite number, got 'x'"):
                    attnpatch.attention(q, k, v, scale="x", backend=backend)
                assert rel_error(out, ref) <= 1e-5
                overlapped += was_compiling and torch.compiler.is_compiling()
                flag_seen = flag_seen or was_compiling
                if not flag_seen and time.monotonic() - start > 10:
                    break  # this torch never sets the process-wide flag: see below
    finally:
        stop.set()
        compiler.join(JOIN_TIMEOUT)
        torch._dynamo.reset()
    assert not compiler.is_alive(), "the compiling thread did not stop"
    if threads.errors:
        name, err = threads.errors[0]
        raise AssertionError(f"thread {name!r} failed: {err}") from err
    if not flag_seen:
        # torch 2.10 sets torch.compiler.is_compiling() only for export, not process-wide
        # while dynamo compiles: the defect this test guards against cannot occur there
        pytest.skip(f"torch {torch.__version__} never set torch.compiler.is_compiling() while "
                    "another thread compiled (10 s): no process-wide flag to leak")
    assert overlapped >= 20, f"torch.compile in the other thread overlapped only {overlapped} calls"
