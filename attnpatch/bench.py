"""``attnpatch bench``: measure the attention backends on this machine and write the evidence.

Suites: ``kernels`` (TFLOP/s per backend on the anchor shapes, forward and forward + backward,
``auto``'s choice and its share of the best), ``models`` (one Flux / SDXL / SD3 / Wan denoiser
forward, unpatched diffusers and its own attention backends against ``attnpatch.patch``, with
the patch overhead), ``sparse`` (``dilated`` and ``block_sparse`` speed against density, the
error against dense per attention call, per layer and of a Flux forward's output; with
``--model`` PSNR and SSIM of generated images) and ``parallel`` (``ring`` / ``ulysses`` /
``usp`` and diffusers' context parallelism on 1, 2 and 4 GPUs, each count launched with
``accelerate launch``). Writes ``results.json``, ``report.md`` and PNG charts to ``--out``;
an existing ``results.json`` there keeps the suites not run now.

    attnpatch bench --suite all --out docs/bench          # on the GPU machine
    attnpatch bench --suite models --models flux,sdxl --out docs/bench   # one part per call
    python -m attnpatch.bench --quick --suite kernels --out /tmp/bench   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ._errors import AttnPatchError

log = logging.getLogger(__name__)

SUITE_CHOICES = ("kernels", "models", "sparse", "parallel", "all")
DEFAULT_PROCESSES = (1, 2, 4)
_DESCRIPTION = (__doc__ or "\n\n").split("\n\n")[1].replace("\n", " ").replace("``", "`")


class _NoBar:
    """Stands in for a tqdm bar when tqdm is not installed."""

    def __init__(self, **_: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass


def _progress(enabled: bool):
    """A ``progress(total=..., desc=...)`` factory: tqdm on stderr, or no bar."""
    if not enabled:
        return _NoBar
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar
    return lambda **kw: tqdm(file=sys.stderr, leave=False, **kw)


def _finite(value: Any) -> Any:
    """``value`` with non-finite floats as ``None`` (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@dataclass
class Settings:
    """What a run measures beyond suite, device and ``--quick`` (the CLI's options)."""
    #: a local diffusers pipeline folder (``--model``)
    model: Optional[str] = None
    #: seconds of timed repetitions per variant (``--budget``; None: 1 on CUDA, 0.5 quick)
    budget: Optional[float] = None
    #: the models suite's model keys (``--models``; None: all of them)
    models: Optional[Sequence[str]] = None
    #: resolutions per model, the first ones (``--resolutions``: 1 or 2; None: all)
    resolutions: Optional[int] = None
    #: the parallel suite's process counts (``--processes``)
    processes: Sequence[int] = DEFAULT_PROCESSES
    #: image generation with ``--model`` in the sparse suite
    steps: int = 4
    height: Optional[int] = None
    width: Optional[int] = None
    prompt: str = "a lighthouse on a rocky coast at dusk, photograph"
    seed: int = 0
    #: wall-clock seconds for the whole call (``--time-limit``): what is left after it is
    #: skipped with the reason, and the results are written
    time_limit: Optional[float] = None
    #: set by :func:`run` from ``time_limit``
    deadline: Any = None
    #: set by :func:`run`: (measured, skipped) rows of that call (not of the whole file)
    counts: tuple = (0, 0)


def timing_options(device: str, quick: bool, budget: Optional[float]) -> dict:
    """Keyword arguments of :func:`attnpatch._bench.timing.timer_stats` for a run."""
    if device == "cuda":
        return dict(budget_s=budget if budget is not None else (0.5 if quick else 1.0),
                    warmup=3, min_reps=5 if budget is None or budget >= 0.5 else 3,
                    max_reps=100)
    return dict(budget_s=0.0, warmup=1, min_reps=3 if quick else 5)


def _load_previous(path: Path) -> Optional[dict]:
    """The results in ``path`` (a former run into the same ``--out``), as schema version 2;
    None when there is none. Raises :class:`AttnPatchError` for a file that is not one."""
    from ._bench import schema

    if not path.exists():
        return None
    fix = (f"choose another --out folder, or delete {path} to start the results afresh")
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AttnPatchError(f"--out {path.parent}: {path.name} is not readable JSON "
                             f"({exc}); {fix}") from exc
    if not isinstance(old, dict) or old.get("schema_version") not in (1, schema.SCHEMA_VERSION):
        raise AttnPatchError(f"--out {path.parent}: {path.name} is not a results file of "
                             f"attnpatch bench (schema_version "
                             f"{old.get('schema_version') if isinstance(old, dict) else None!r}, "
                             f"this bench writes {schema.SCHEMA_VERSION}); {fix}")
    if old["schema_version"] == 1:  # one machine and config for all its suites
        if not (isinstance(old.get("config"), dict) and isinstance(
                old["config"].get("suites"), list) and "machine" in old):
            raise AttnPatchError(f"--out {path.parent}: {path.name} is a schema-1 results "
                                 f"file without its machine or config.suites; {fix}")
        old = dict(old, schema_version=schema.SCHEMA_VERSION,
                   runs=[{"suite": s, "groups": None, "machine": old["machine"],
                          "config": dict(old["config"], suites=[s])}
                         for s in old["config"]["suites"]])
    problems = schema.validate(old)
    if problems:
        raise AttnPatchError(f"--out {path.parent}: {path.name} does not match the results "
                             f"schema ({problems[0]}); {fix}")
    return old


def run(suites: Sequence[str], out: Path, quick: bool = False, device: str = "cpu",
        model: Optional[str] = None, progress: bool = True,
        settings: Optional[Settings] = None) -> dict:
    """Run ``suites`` on ``device`` and write ``results.json``, ``report.md`` and the charts
    into ``out``; returns the results (valid against :data:`attnpatch._bench.schema.SCHEMA`).

    When ``out/results.json`` exists (a former run), the suites run now replace that file's
    rows of the same suites (and their machine block); its other suites are kept, and the
    report and charts are made from the whole file. So one suite per call accumulates.

    Raises :class:`attnpatch._bench.models.ModelPathError` when ``model`` cannot be loaded,
    :class:`AttnPatchError` when ``out/results.json`` is not a results file.
    """
    from ._bench import schema, sparse, suites as S

    from ._bench.timing import Deadline

    settings = settings or Settings()
    if model is not None:
        settings.model = model
    settings.deadline = Deadline(settings.time_limit)
    if "all" in suites:
        suites = list(schema.SUITES)
    suites = [s for s in schema.SUITES if s in suites]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AttnPatchError(f"--out {out}: a file, not a folder; give a folder for "
                             "results.json, report.md and the charts")
    previous = _load_previous(out / "results.json")
    out.mkdir(parents=True, exist_ok=True)
    timing = timing_options(device, quick, settings.budget)
    bar = _progress(progress)
    runners = {"kernels": S.kernels_suite, "sparse": sparse.sparse_suite,
               "parallel": S.parallel_suite, "models": S.models_suite}
    machine = S.machine_info(device)
    config = {"suites": suites, "quick": quick, "device": device, "model": settings.model,
              "budget_s": timing["budget_s"]}
    if settings.models is not None:
        config["models"] = list(settings.models)
    if settings.resolutions is not None:
        config["resolutions"] = settings.resolutions
    if settings.time_limit is not None:
        config["time_limit_s"] = settings.time_limit
    new_rows: list[dict] = []
    elapsed: dict[str, float] = {}
    for suite in suites:
        log.info("attnpatch bench: suite %s", suite)
        start = time.monotonic()
        new_rows += runners[suite](device, quick, timing, bar, settings)
        elapsed[suite] = round(time.monotonic() - start, 1)
        log.info("attnpatch bench: suite %s took %.1f s", suite, elapsed[suite])
    # a filtered run (--models, --processes) replaces only the rows of the groups it ran
    filtered = {"models": settings.models is not None and settings.model is None,
                "parallel": tuple(settings.processes) != DEFAULT_PROCESSES}
    groups = {s: (sorted({str(r.get("group")) for r in new_rows if r["suite"] == s})
                  if filtered.get(s) else None) for s in suites}
    runs = [entry for entry in (previous["runs"] if previous else [])
            if entry["suite"] not in suites or not (
                groups[entry["suite"]] is None or (entry["groups"] is not None and set(
                    entry["groups"]) <= set(groups[entry["suite"]])))]
    runs += [{"suite": s, "groups": groups[s], "machine": machine,
              "config": dict(config, suites=[s]), "elapsed_s": elapsed[s]} for s in suites]
    runs.sort(key=lambda e: schema.SUITES.index(e["suite"]))
    kept = [r for r in (previous["rows"] if previous else [])
            if r["suite"] not in suites or (groups[r["suite"]] is not None
                                            and str(r.get("group")) not in groups[r["suite"]])]
    # a row this call skipped for its --time-limit keeps what an earlier call measured there
    measured = {_identity(r): r for r in (previous["rows"] if previous else [])
                if r["skipped"] is None}
    settings.counts = (sum(r["skipped"] is None for r in new_rows),
                       sum(r["skipped"] is not None for r in new_rows))
    new_rows = [measured.get(_identity(r), r) if _out_of_time(r) else r for r in new_rows]
    rows = sorted(kept + new_rows, key=lambda r: schema.SUITES.index(r["suite"]))  # stable
    all_suites = [s for s in schema.SUITES if any(e["suite"] == s for e in runs)]
    results: dict = {"schema_version": schema.SCHEMA_VERSION, "machine": machine,
                     "config": dict(config, suites=all_suites), "runs": runs,
                     "rows": rows, "charts": []}
    return _write(_finite(results), out, previous)


def _identity(row: dict) -> tuple:
    return row["suite"], row["name"], row["variant"], str(row.get("group"))


def _out_of_time(row: dict) -> bool:
    from ._bench.timing import OUT_OF_TIME
    return (row["skipped"] or "").startswith(OUT_OF_TIME)


def _write(results: dict, out: Path, previous: Optional[dict]) -> dict:
    """Charts (the former ones removed first), results.json, report.md and the docs section.
    A chart that fails is logged and left out: the measurements are written regardless."""
    from ._bench import report, schema

    for stale in (previous or {}).get("charts", []):
        (out / stale).unlink(missing_ok=True)  # re-drawn below from the whole file
    try:
        results["charts"] = report.charts(results, out)
    except Exception as exc:  # noqa: BLE001 - charts are a view; never lose the numbers
        log.error("attnpatch bench: drawing the charts failed (%s: %s); results.json and "
                  "report.md are written without them", type(exc).__name__, exc)
        results["charts"] = []
    problems = schema.validate(results)
    if problems:  # a bug of this module, not of the machine
        raise AssertionError("results.json does not match its schema:\n" + "\n".join(problems))
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    (out / "report.md").write_text(report.markdown(results))
    report.update_docs(results, out)
    return results


def render(out: Path) -> dict:
    """Write ``out``'s report.md, charts and docs section again from ``out/results.json``
    (measuring nothing; a schema-1 file is rewritten as schema 2). Raises
    :class:`AttnPatchError` when there is no results file there."""
    out = Path(out)
    previous = _load_previous(out / "results.json")
    if previous is None:
        raise AttnPatchError(f"--render-only: {out / 'results.json'} does not exist; run a "
                             f"suite into --out {out} first")
    return _write(dict(previous), out, previous)


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to the ``attnpatch`` command's subparsers."""
    p = sub.add_parser("bench", help="benchmark the backends here: results.json, report.md, "
                       "charts", description=_DESCRIPTION)
    _arguments(p)
    p.set_defaults(func=_cmd_bench, parser=p)
    return p


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds "
                                         "(e.g. --budget 0.5)")
    return value


def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers separated by "
                                         "commas (e.g. --processes 1,2,4)")
    return sorted(set(values))  # each count once


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", default=None, choices=SUITE_CHOICES,
                   help="which suite to run (default: all)")
    p.add_argument("--render-only", action="store_true",
                   help="measure nothing: write report.md, the charts and the docs section "
                        "again from DIR/results.json (e.g. after copying a GPU run's file in)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for results.json, report.md and the PNG charts; when "
                        "DIR/results.json exists, the suites run now replace its rows of "
                        "those suites and keep the others (one suite per call accumulates)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and models, few repeats (a CPU smoke run)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--budget", type=_positive_float, default=None, metavar="SECONDS",
                   help="seconds of timed repetitions per variant on CUDA (default 1; "
                        "--quick 0.5); below 0.5 at least 3 repetitions instead of 5")
    p.add_argument("--models", default=None, metavar="NAMES",
                   help="models suite: comma-separated subset of flux,sdxl,sd3,wan "
                        "(default: all)")
    p.add_argument("--resolutions", type=int, choices=(1, 2), default=None,
                   help="models suite: time the first resolution of each model only (1) or "
                        "both (2, the default)")
    p.add_argument("--processes", type=_csv_ints, default=[1, 2, 4], metavar="N,N",
                   help="parallel suite: process counts to launch (default 1,2,4; counts "
                        "beyond this machine's GPUs are rows that say so)")
    p.add_argument("--model", metavar="PATH", default=None,
                   help="a local diffusers pipeline folder (real weights; nothing is "
                        "downloaded): the models suite times its transformer / unet, the "
                        "sparse suite generates one image dense and with each sparse "
                        "config and reports PSNR and SSIM against the dense one")
    p.add_argument("--steps", type=int, default=4,
                   help="--model, sparse suite: denoising steps per image (default 4)")
    p.add_argument("--height", type=int, default=None,
                   help="--model, sparse suite: image height in pixels (default: the "
                        "pipeline's)")
    p.add_argument("--width", type=int, default=None,
                   help="--model, sparse suite: image width in pixels (default: the "
                        "pipeline's)")
    p.add_argument("--seed", type=int, default=0,
                   help="--model, sparse suite: the generator seed of every image (default 0)")
    p.add_argument("--time-limit", type=_positive_float, default=None, metavar="SECONDS",
                   help="wall-clock seconds for this call: what is not measured by then is "
                        "skipped with the reason and the results are still written (keep it "
                        "under a machine's per-command limit, e.g. 480 in 600-second calls)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from ._bench.models import MODELS

    parser = args.parser
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device on this machine")
    if args.model is not None and not (Path(args.model) / "model_index.json").is_file():
        parser.error(f"--model {args.model!r}: no diffusers pipeline folder there (a local "
                     "folder with model_index.json, as save_pretrained writes; nothing is "
                     "downloaded)")
    models = None
    if args.models is not None:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in models if m not in MODELS]
        if unknown or not models:
            parser.error(f"--models {args.models!r}: unknown {unknown or 'empty'}; choose "
                         f"from {','.join(MODELS)}")
        if args.model is not None:
            parser.error("--models filters the built-in models; with --model PATH the "
                         "models suite times that pipeline's denoiser: give one of the two")
    for name in ("steps", "height", "width"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} {value}: give a positive integer")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value % 16:
            parser.error(f"--{name} {value}: give a multiple of 16 (the VAE and the "
                         "latent packing divide it)")
    settings = Settings(model=args.model, budget=args.budget, models=models,
                        resolutions=args.resolutions, processes=tuple(args.processes),
                        steps=args.steps, height=args.height, width=args.width,
                        seed=args.seed, time_limit=args.time_limit)
    if args.render_only:
        if args.suite is not None:
            parser.error(f"--render-only measures nothing: drop --suite {args.suite}")
        try:
            results = render(Path(args.out))
        except AttnPatchError as exc:
            parser.error(str(exc))
        print(f"attnpatch bench: rendered {len(results['rows'])} rows of "
              f"{', '.join(results['config']['suites'])} from {Path(args.out) / 'results.json'}")
        for name in ("report.md", *results["charts"]):
            print(f"wrote {Path(args.out) / name}")
        return 0
    args.suite = args.suite or "all"
    try:
        results = run([args.suite], Path(args.out), quick=args.quick, device=device,
                      progress=not args.no_progress, settings=settings)
    except AttnPatchError as exc:
        parser.error(str(exc))
    measured, skipped = settings.counts
    print(f"attnpatch bench: {measured} rows measured, {skipped} skipped "
          f"({args.suite} on {device}); {Path(args.out) / 'results.json'} holds "
          f"{', '.join(results['config']['suites'])}")
    for name in ("results.json", "report.md", *results["charts"]):
        print(f"wrote {Path(args.out) / name}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m attnpatch.bench``: the same as ``attnpatch bench``."""
    parser = argparse.ArgumentParser(prog="python -m attnpatch.bench",
                                     description=_DESCRIPTION)
    _arguments(parser)
    parser.set_defaults(parser=parser)
    return _cmd_bench(parser.parse_args(argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
