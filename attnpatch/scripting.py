"""Shared plumbing for the ``attnpatch`` command, ``scripts/`` and ``examples/``.

- ``--backend NAME --backend-option key=value`` on every script: values are parsed as
  int / float / bool / null / JSON, else kept as a string, and handed to the backend untouched,
  so a new backend and its options need no script change;
- :class:`ScriptError`: bad input becomes one line on stderr naming the fix, exit code 2;
- :func:`check_backend`: unknown names, backends that cannot run on this machine and options the
  backend does not take are refused before anything is loaded or written;
- :func:`staged_output`: outputs are written into a temporary folder inside the target and moved
  into place only at the end, so a failed run leaves nothing half-written;
- :func:`load_local_pipeline`: a local diffusers model folder, offline, with one-line errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Any, Callable, Iterator, Optional, Sequence

from ._errors import AttnPatchError

__all__ = ["ScriptError", "parse_value", "parse_options", "add_backend_arguments",
           "add_scope_argument", "check_backend", "available_backends", "one_line", "run_script",
           "staged_output", "load_local_pipeline", "check_model_folder", "patch_pipeline",
           "denoiser_names", "ran_in", "spans_processes", "start_processes", "EXIT_BAD_INPUT"]

EXIT_BAD_INPUT = 2


class ScriptError(Exception):
    """Bad input to a script or command: printed as one line (``error: ...``), exit code 2."""


def one_line(err: BaseException) -> str:
    """An exception's message on one line (attnpatch's reasons are multi-line)."""
    text = str(err).strip() or type(err).__name__
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    return " ".join(parts)


def run_script(main: Callable[[], Optional[int]]) -> int:
    """Run ``main``; :class:`ScriptError` and attnpatch errors become one line and exit code 2."""
    try:
        return main() or 0
    except ScriptError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except AttnPatchError as err:
        print(f"error: {one_line(err)} (see `attnpatch backends`)", file=sys.stderr)
        return EXIT_BAD_INPUT


# --- backend options ----------------------------------------------------------------------------

def parse_value(text: str) -> Any:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"true"`` -> True, ``"none"`` -> None, JSON lists and
    objects -> Python; anything else stays a string."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.strip()[:1] in ("[", "{", '"'):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return text


def parse_options(items: Optional[Sequence[str]], flag: str = "--backend-option") -> dict:
    """``["window=64", "pattern=tile2d"]`` -> ``{"window": 64, "pattern": "tile2d"}``."""
    options: dict = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ScriptError(f"{flag} {item!r} is not key=value; write it as "
                              f"{flag} name=value (e.g. {flag} compile=false)")
        options[key.replace("-", "_")] = parse_value(value)
    return options


def add_backend_arguments(parser: argparse.ArgumentParser,
                          names: Sequence[str] = ("--backend",),
                          option_names: Sequence[str] = ("--backend-option",),
                          default: Optional[str] = "auto", help_extra: str = "") -> None:
    """``--backend NAME`` and a repeatable ``--backend-option key=value``."""
    parser.add_argument(*names, dest="backend", default=default, metavar="NAME",
                        help="attention backend: any name `attnpatch backends` lists (or "
                             f"'auto'){help_extra}; default: {default}")
    parser.add_argument(*option_names, dest="backend_options", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="an option for the backend (repeatable); values are parsed as "
                             "int/float/bool/JSON, else string")


def available_backends() -> list[str]:
    from . import list_backends

    return [b.name for b in list_backends() if b.available]


def check_backend(name: str, options: Optional[dict] = None, allow_none: bool = False) -> str:
    """The canonical name of ``name``; :class:`ScriptError` when it is unknown, cannot run on this
    machine, or does not take one of ``options``. ``"auto"`` is accepted; ``"none"`` too when
    ``allow_none`` (meaning: leave the model's own attention alone)."""
    from . import registry

    options = options or {}
    if allow_none and name.lower() in ("none", "default", "off"):
        if options:
            raise ScriptError(f"backend options {sorted(options)} given with backend {name!r}: "
                              "pick a backend for them, or drop the options")
        return "none"
    try:
        canonical = registry.canonical_name(name.lower())
    except AttnPatchError as err:
        raise ScriptError(f"{one_line(err)}; pass one of the names `attnpatch backends` lists"
                          ) from None
    if canonical == "auto":
        return canonical
    backend = registry.get_backend(canonical)
    reasons = backend.availability_reasons()
    if reasons:
        raise ScriptError(f"backend {canonical!r} can't run on this machine: "
                          f"{'; '.join(reasons)}; install what it needs or use one of "
                          f"{', '.join(available_backends())}")
    try:
        registry.check_options(canonical, options)
    except AttnPatchError as err:
        raise ScriptError(f"{one_line(err)}; drop or fix the --backend-option") from None
    return canonical


def spans_processes(name: str) -> bool:
    """Whether backend ``name`` (canonical, or ``auto``/``none``) splits one sample across the
    processes (context parallelism): then every process runs the same inputs with the same
    seed, instead of its share of the data."""
    from . import registry

    if name in ("auto", "none"):
        return False
    return bool(registry.get_backend(name).spans_processes)


def start_processes(name: str, cpu: bool) -> None:
    """For a backend that spans processes, set up accelerate's process group (gloo on CPU,
    NCCL on GPUs) before the backend is checked, so that under ``accelerate launch`` it finds
    its default group; the script's ``Accelerator`` then shares this state."""
    from . import registry

    try:
        canonical = registry.canonical_name(name.lower())
    except AttnPatchError:
        return  # check_backend says what is wrong with the name
    if canonical != "auto" and registry.get_backend(canonical).spans_processes:
        from accelerate import PartialState

        PartialState(cpu=cpu)


# --- patching a pipeline --------------------------------------------------------------------------

def add_scope_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend-scope", choices=("denoiser", "all"), default="denoiser",
                        help="denoiser (default): --backend runs the denoiser's attention and "
                             "'auto' the rest (text encoders, VAE), so a kernel that can't take "
                             "e.g. T5's position bias still works; all: --backend everywhere")


def denoiser_names(pipe) -> list[str]:
    """The pipeline's denoiser components (where the time goes, and what --backend is about)."""
    from .pipelines import denoiser_components

    return [name for name, _ in denoiser_components(pipe)]


def patch_pipeline(pipe, backend: str, options: dict, scope: str = "denoiser"):
    """``attnpatch.patch`` the whole pipeline: with ``scope="denoiser"`` the denoiser(s) get
    ``backend`` with ``options`` and every other attention module ``auto``; with ``"all"`` (or
    when there is no known denoiser component) every module gets ``backend``."""
    from . import patch

    names = denoiser_names(pipe) if scope == "denoiser" and backend != "auto" else []
    if not names:
        return patch(pipe, backend=backend, **options)
    return patch(pipe, backend={n: (backend, dict(options)) for n in names})


def ran_in(report, prefixes=None) -> list[str]:
    """The backends that ran in the modules under ``prefixes`` (all modules when None)."""
    out = set()
    for r in report:
        if prefixes is None or any(r.name == p or r.name.startswith(p + ".") for p in prefixes):
            out.update(r.backends)
    return sorted(out)


# --- files --------------------------------------------------------------------------------------

@contextlib.contextmanager
def staged_output(out_dir, enabled: bool = True) -> Iterator[Optional[pathlib.Path]]:
    """Yield a temporary folder inside ``out_dir``; on success move its entries into ``out_dir``
    (replacing same-named ones), on failure remove it, and ``out_dir`` too if this created it.

    ``enabled=False`` (non-main processes) yields None and touches nothing.
    """
    if not enabled:
        yield None
        return
    out = pathlib.Path(out_dir)
    created = not out.exists()
    if out.exists() and not out.is_dir():
        raise ScriptError(f"output path {str(out)!r} exists and is not a folder; pass a folder")
    out.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".attnpatch-partial-", dir=out))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    for entry in sorted(tmp.iterdir()):
        dest = out / entry.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists() or dest.is_symlink():
            dest.unlink()
        os.replace(entry, dest)
    tmp.rmdir()


def check_model_folder(path, flag: str = "--model") -> pathlib.Path:
    """A local diffusers pipeline folder (with ``model_index.json``), or :class:`ScriptError`."""
    folder = pathlib.Path(path).expanduser()
    if not folder.exists():
        raise ScriptError(f"{flag} {str(path)!r} does not exist; pass a local diffusers model "
                          f"folder (one with model_index.json, e.g. from "
                          f"`huggingface-cli download <repo> --local-dir DIR`)")
    if not folder.is_dir():
        raise ScriptError(f"{flag} {str(path)!r} is a file, not a folder; pass the diffusers "
                          "model folder that holds model_index.json")
    if not (folder / "model_index.json").is_file():
        inside = sorted(p.name for p in folder.iterdir())[:6]
        hint = ""
        if (folder / "config.json").is_file():
            hint = " (it has config.json: a single model, not a pipeline; pass its parent folder)"
        raise ScriptError(f"{flag} {str(path)!r} is not a diffusers model folder: no "
                          f"model_index.json{hint}; found {inside or 'nothing'}; pass the folder "
                          "that holds model_index.json")
    return folder


def _dtype_keyword() -> str:
    """diffusers >= 0.42 takes ``dtype=`` (``torch_dtype=`` is deprecated); older ones only
    ``torch_dtype=``."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:
        return "torch_dtype"
    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def load_local_pipeline(path, flag: str = "--model", dtype=None, **kwargs):
    """``DiffusionPipeline.from_pretrained(path, local_files_only=True, **kwargs)`` with the
    folder checked first and loading failures turned into :class:`ScriptError`; ``dtype`` is
    passed under the name this diffusers version expects."""
    folder = check_model_folder(path, flag)
    from diffusers import DiffusionPipeline

    if dtype is not None:
        kwargs[_dtype_keyword()] = dtype

    try:
        return DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as err:
        raise ScriptError(f"{flag} {str(path)!r} could not be loaded as a diffusers pipeline: "
                          f"{one_line(err)[:300]}; check that the folder is complete (every "
                          "component listed in model_index.json, with its weights)") from None
