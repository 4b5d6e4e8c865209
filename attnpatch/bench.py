"""``attnpatch bench``: measure the attention backends on this machine and write the evidence.

Suites: ``kernels`` (TFLOP/s per backend on the anchor shapes, forward and forward + backward,
``auto``'s choice and its share of the best), ``models`` (one Flux / SDXL denoiser forward,
unpatched diffusers against ``attnpatch.patch``, with the patch overhead), ``sparse``
(``dilated`` and ``block_sparse`` speed against density, with the error against dense) and
``parallel`` (context parallelism: needs 2+ CUDA GPUs and ``accelerate launch``; skipped here
with the reason). Writes ``results.json``, ``report.md`` and PNG charts to ``--out``.

    attnpatch bench --suite all --out docs/bench          # on the GPU machine
    python -m attnpatch.bench --quick --suite kernels --out /tmp/bench   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)

SUITE_CHOICES = ("kernels", "models", "sparse", "parallel", "all")
_DESCRIPTION = (__doc__ or "\n\n").split("\n\n")[1].replace("\n", " ").replace("``", "`")


class _NoBar:
    """Stands in for a tqdm bar when tqdm is not installed."""

    def __init__(self, **_: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
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


def run(suites: Sequence[str], out: Path, quick: bool = False, device: str = "cpu",
        model: Optional[str] = None, progress: bool = True) -> dict:
    """Run ``suites`` on ``device`` and write ``results.json``, ``report.md`` and the charts
    into ``out``; returns the results (valid against :data:`attnpatch._bench.schema.SCHEMA`).

    Raises :class:`attnpatch._bench.models.ModelPathError` when ``model`` cannot be loaded.
    """
    from ._bench import report, schema, sparse, suites as S

    if "all" in suites:
        suites = list(schema.SUITES)
    suites = [s for s in schema.SUITES if s in suites]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if device == "cuda":
        timing = dict(budget_s=0.5 if quick else 1.0, warmup=3, min_reps=5, max_reps=100)
    else:
        timing = dict(budget_s=0.0, warmup=1, min_reps=3 if quick else 5)
    bar = _progress(progress)
    runners = {"kernels": S.kernels_suite, "sparse": sparse.sparse_suite,
               "parallel": S.parallel_suite,
               "models": lambda *a: S.models_suite(*a, model_path=model)}
    results: dict = {"schema_version": schema.SCHEMA_VERSION, "machine": S.machine_info(device),
                     "config": {"suites": suites, "quick": quick, "device": device,
                                "model": model},
                     "rows": [], "charts": []}
    for suite in suites:
        log.info("attnpatch bench: suite %s", suite)
        results["rows"] += runners[suite](device, quick, timing, bar)
    results = _finite(results)
    results["charts"] = report.charts(results, out)
    problems = schema.validate(results)
    if problems:  # a bug of this module, not of the machine
        raise AssertionError("results.json does not match its schema:\n" + "\n".join(problems))
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    (out / "report.md").write_text(report.markdown(results))
    return results


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to the ``attnpatch`` command's subparsers."""
    p = sub.add_parser("bench", help="benchmark the backends here: results.json, report.md, "
                       "charts", description=_DESCRIPTION)
    _arguments(p)
    p.set_defaults(func=_cmd_bench, parser=p)
    return p


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", default="all", choices=SUITE_CHOICES,
                   help="which suite to run (default: all)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for results.json, report.md and the PNG charts")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and models, few repeats (a CPU smoke run)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--model", metavar="PATH", default=None,
                   help="a local diffusers pipeline folder: the models suite benchmarks its "
                        "transformer / unet (nothing is downloaded)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from ._bench.models import ModelPathError

    parser = args.parser
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device on this machine")
    if args.model is not None and not Path(args.model).is_dir():
        parser.error(f"--model {args.model!r}: no such folder (a local diffusers pipeline "
                     "folder; nothing is downloaded)")
    try:
        results = run([args.suite], Path(args.out), quick=args.quick, device=device,
                      model=args.model, progress=not args.no_progress)
    except ModelPathError as exc:
        parser.error(str(exc))
    rows = results["rows"]
    skipped = sum(r["skipped"] is not None for r in rows)
    print(f"attnpatch bench: {len(rows) - skipped} rows measured, {skipped} skipped "
          f"({', '.join(results['config']['suites'])} on {device})")
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
