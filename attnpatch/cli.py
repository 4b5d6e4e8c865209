"""The ``attnpatch`` command."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _cmd_backends(args: argparse.Namespace) -> int:
    import torch

    from . import list_backends

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "no CUDA device"
    print(f"attnpatch backends on this machine (torch {torch.__version__}, {device}: {name})")
    print(list_backends())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="attnpatch", description="Swap the attention inside "
                                     "diffusers and transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backends", help="list every backend, whether it runs here, and why not")
    p.set_defaults(func=_cmd_backends)
    from . import _demo, bench

    _demo.add_parser(sub)
    bench.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
