#!/usr/bin/env python
"""Text-to-image (or text-to-video, e.g. Wan) from a local diffusers model, with any attnpatch
backend and its options passed through.

    python scripts/generate.py --model PATH --prompt "a fox" --out images/ \\
        --backend sdpa --backend-option key=value

Under ``accelerate launch --num_processes N`` the prompts are split data-parallel: every process
loads the pipeline on its device and generates its share, the images are gathered to the main
process, and only the main process writes files. With a context-parallel backend (``ring``,
``ulysses``, ``usp``) every process runs every prompt instead, each one a share of the
sequence, and the main process writes the images. Prompt ``i`` is always generated with seed
``--seed + i``, so the images do not depend on the number of processes.

Outputs in ``--out``: ``0000-<prompt>.png`` per prompt (``.gif`` for videos, or ``.mp4`` with
``--video-format mp4``) and ``generations.jsonl`` (file, prompt, seed, backend, seconds). They
are written into a temporary folder inside ``--out`` and moved into place at the end, so a
failed run leaves nothing half-written. Bad input exits with code 2 and a one-line error.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import pathlib
import re
import sys
import time

from attnpatch import scripting
from attnpatch.scripting import ScriptError
from attnpatch.tiny_pipelines import KINDS, build_tiny_pipeline, tiny_call_kwargs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PATH",
                     help="local diffusers model folder (with model_index.json)")
    src.add_argument("--tiny", choices=tuple(KINDS),
                     help="a built-in tiny random-weight pipeline instead of --model (tests)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", metavar="FILE",
                   help="a text file with one prompt per line (blank lines skipped)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--out", default="generated", metavar="DIR", help="output folder")
    scripting.add_backend_arguments(p, default="auto",
                                    help_extra=", or 'none' for the model's own attention")
    scripting.add_scope_argument(p)
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-frames", type=int, default=None, help="frames (video pipelines)")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--max-sequence-length", type=int, default=None)
    p.add_argument("--call-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other argument of the pipeline's __call__ (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--video-format", default="gif", choices=("gif", "mp4"),
                   help="video file format (mp4 needs imageio-ffmpeg or opencv)")
    p.add_argument("--fps", type=int, default=16, help="frames per second of saved videos")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    p.add_argument("--report", action="store_true",
                   help="print attnpatch's per-module report (main process) at the end")
    return p.parse_args(argv)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = pathlib.Path(args.prompts_file)
        if not path.is_file():
            raise ScriptError(f"--prompts-file {args.prompts_file!r} does not exist; pass a text "
                              "file with one prompt per line")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ScriptError("no prompt given; pass --prompt TEXT (repeatable) or --prompts-file "
                          "FILE")
    return prompts


def slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^a-zA-Z0-9]+", "-", text.lower()).strip("-")
    return s[:n].rstrip("-") or "prompt"


def call_kwargs(pipe, args, extra: dict, prompt: str, seed: int, defaults=None) -> dict:
    """The pipeline's arguments: ``defaults`` < the script's flags < ``--call-arg``."""
    import torch

    params = inspect.signature(pipe.__call__).parameters
    wanted = {"prompt": prompt, "num_inference_steps": args.steps, "height": args.height,
              "width": args.width, "num_frames": args.num_frames,
              "guidance_scale": args.guidance_scale, "negative_prompt": args.negative_prompt,
              "max_sequence_length": args.max_sequence_length}
    kwargs = {k: v for k, v in (defaults or {}).items() if k in params}
    kwargs.update({k: v for k, v in wanted.items() if v is not None and k in params})
    kwargs.update(extra)
    kwargs["generator"] = torch.Generator(device="cpu").manual_seed(seed)
    kwargs["output_type"] = "np"
    return kwargs


def to_uint8(output):
    """(kind, uint8 array): ("video", (F, H, W, C)) or ("image", (H, W, C))."""
    import numpy as np

    frames = getattr(output, "frames", None)
    if frames is not None:
        arr, kind = np.asarray(frames[0]), "video"
    else:
        arr, kind = np.asarray(output.images[0]), "image"
    arr = (np.clip(np.nan_to_num(arr.astype("float32")), 0, 1) * 255).round().astype("uint8")
    return kind, arr


def write_item(item: dict, folder: pathlib.Path, args) -> str:
    from PIL import Image

    stem = f"{item['index']:04d}-{slug(item['prompt'])}"
    arr = item["array"]
    if item["kind"] == "image":
        name = stem + ".png"
        Image.fromarray(arr).save(folder / name)
        return name
    if args.video_format == "mp4":
        from diffusers.utils import export_to_video

        name = stem + ".mp4"
        export_to_video([f for f in arr], str(folder / name), fps=args.fps)
        return name
    name = stem + ".gif"
    frames = [Image.fromarray(f) for f in arr]
    frames[0].save(folder / name, save_all=True, append_images=frames[1:],
                   duration=max(1, round(1000 / args.fps)), loop=0)
    return name


def check_inputs(args) -> tuple[list[str], str, dict, dict]:
    """Everything that can be checked before loading a model: exits 2 on bad input."""
    prompts = read_prompts(args)
    options = scripting.parse_options(args.backend_options)
    if args.backend.lower() not in ("none", "default", "off"):
        import torch

        scripting.start_processes(args.backend, cpu=args.cpu or not torch.cuda.is_available())
    backend = scripting.check_backend(args.backend, options, allow_none=True)
    extra = scripting.parse_options(args.call_arg, flag="--call-arg")
    if not args.model and not args.tiny:
        raise ScriptError("no model given; pass --model PATH (a local diffusers model folder) "
                          f"or --tiny {'|'.join(KINDS)}")
    if args.model:
        scripting.check_model_folder(args.model, "--model")
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        raise ScriptError(f"--out {args.out!r} exists and is not a folder; pass a folder")
    if args.steps is not None and args.steps < 1:
        raise ScriptError(f"--steps {args.steps}: use 1 or more")
    if args.video_format == "mp4":
        try:
            import imageio  # noqa: F401
        except ImportError:
            try:
                import cv2  # noqa: F401
            except ImportError:
                raise ScriptError("--video-format mp4 needs imageio-ffmpeg or opencv (pip "
                                  "install imageio imageio-ffmpeg), or use --video-format gif"
                                  ) from None
    return prompts, backend, options, extra


def load_pipeline(args, dtype, device):
    if args.tiny:
        return build_tiny_pipeline(args.tiny, size="test", seed=0, dtype=dtype).to(device), \
            tiny_call_kwargs(args.tiny)
    pipe = scripting.load_local_pipeline(args.model, "--model", dtype=dtype)
    return pipe.to(device), {}


def main(argv=None) -> int:
    args = parse_args(argv)
    return scripting.run_script(lambda: run(args))


def run(args) -> int:
    prompts, backend, options, extra = check_inputs(args)

    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    import attnpatch

    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    device = accelerator.device
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    main_proc = accelerator.is_main_process

    pipe, defaults = load_pipeline(args, dtype, device)
    params = inspect.signature(pipe.__call__).parameters
    unknown = sorted(k for k in extra if k not in params)
    if unknown:
        raise ScriptError(f"--call-arg {', '.join(unknown)}: {type(pipe).__name__}.__call__ "
                          f"takes no such argument; drop it (it takes "
                          f"{', '.join(p for p in params if p not in ('self', 'kwargs'))[:300]})")
    handle = None
    if backend != "none":
        handle = scripting.patch_pipeline(pipe, backend, options, args.backend_scope)
    pipe.set_progress_bar_config(disable=not main_proc, leave=False)

    items, error = [], None
    jobs = list(enumerate(prompts))
    # context parallelism: every process runs every prompt (same seed), the main one keeps it
    together = scripting.spans_processes(backend)
    share = contextlib.nullcontext(jobs) if together else accelerator.split_between_processes(jobs)
    with share as mine:
        try:
            for index, prompt in tqdm(mine, desc=f"prompts (process {accelerator.process_index})",
                                      disable=not main_proc):
                seed = args.seed + index
                start = time.perf_counter()
                with torch.inference_mode():
                    output = pipe(**call_kwargs(pipe, args, extra, prompt, seed, defaults))
                if together and not main_proc:
                    continue
                kind, arr = to_uint8(output)
                items.append({"index": index, "prompt": prompt, "seed": seed, "kind": kind,
                              "array": arr, "seconds": round(time.perf_counter() - start, 3),
                              "process": accelerator.process_index})
        except attnpatch.AttnPatchError as err:
            error = (f"backend {backend!r} failed: {scripting.one_line(err)}; pick another "
                     "--backend (`attnpatch backends`) or change its --backend-option")
        except (TypeError, ValueError) as err:
            if not options:
                raise
            error = (f"backend {backend!r} failed with options {options}: "
                     f"{scripting.one_line(err)[:300]}; check the --backend-option values")
    gathered = gather_object([{"error": error, "items": items}])
    errors = [g["error"] for g in gathered if g["error"]]
    if errors:
        raise ScriptError(errors[0])

    if main_proc:
        everything = sorted((it for g in gathered for it in g["items"]), key=lambda it: it["index"])
        with scripting.staged_output(args.out) as stage:
            records = []
            for it in everything:
                name = write_item(it, stage, args)
                records.append({"file": name, "prompt": it["prompt"], "seed": it["seed"],
                                "backend": backend, "seconds": it["seconds"],
                                "process": it["process"]})
            with open(stage / "generations.jsonl", "w") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
        print(f"wrote {len(records)} file(s) to {args.out}/ with backend {backend} "
              f"({accelerator.num_processes} process(es))")
        if handle is not None and args.report:
            print(handle.report())
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
