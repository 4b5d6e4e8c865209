"""Run by ``accelerate launch --multi_gpu --num_processes 2`` from the tests: the tiny Flux
transformer under ``ring`` on accelerate's process group (gloo on a CPU machine) equals the
single-process forward; the main process writes ``{"errors": [...], "world": N}`` to argv[1]."""

import json
import sys

import torch
import torch.distributed as dist
from accelerate import PartialState

import attnpatch
from tests.tiny_models import flux, rel_error, run, seeded


def main() -> None:
    state = PartialState(cpu=True)  # gloo on a CPU machine
    model, kw = flux()
    seeded(model)
    ref = run(model, kw)
    with attnpatch.patch(model, backend="ring", inner="math"):
        out = run(model, kw)
    errors = [None] * state.num_processes
    dist.all_gather_object(errors, rel_error(out, ref))
    if state.is_main_process:
        with open(sys.argv[1], "w") as f:
            json.dump({"errors": errors, "world": state.num_processes,
                       "backend": dist.get_backend()}, f)
    state.wait_for_everyone()
    state.destroy_process_group()  # before interpreter teardown, as a script should


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
