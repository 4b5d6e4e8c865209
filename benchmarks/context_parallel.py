"""Context parallelism (issue 15): a denoiser forward on 1 GPU against N GPUs with attnpatch's
``ring``, ``ulysses`` and ``usp`` and with diffusers' own ``ContextParallelConfig``.

A thin caller of :mod:`attnpatch._bench.parallel` (the worker ``attnpatch bench --suite
parallel`` launches; its docstring has the configs, variants and timing):

    accelerate launch --num_processes 1 benchmarks/context_parallel.py --out cp_1gpu.json
    accelerate launch --multi_gpu --num_processes 8 benchmarks/context_parallel.py --out cp_8.json
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's attnpatch

from attnpatch._bench.parallel import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
