"""Small reusable checks. Each returns a reason string when the call is out of range, else None."""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os
from typing import Optional

import torch

from .call import AttentionCall

_DTYPE_NAMES = {
    torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
    torch.float64: "float64",
}


def dtype_names(dtypes) -> str:
    return ", ".join(_DTYPE_NAMES.get(d, str(d)) for d in dtypes)


@functools.lru_cache(maxsize=None)
def module_present(dotted: str) -> bool:
    """Whether module ``dotted`` is installed, found without importing it or its parents
    (``find_spec("a.b")`` would import ``a``, and flash-attn's ``__init__`` loads CUDA code)."""
    top, *rest = dotted.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    locations = list(spec.submodule_search_locations or ())
    for i, part in enumerate(rest):
        last = i == len(rest) - 1
        found = []
        for loc in locations:
            path = os.path.join(loc, part)
            if os.path.isdir(path):
                found.append(path)
            elif last and any(os.path.isfile(path + suffix)
                              for suffix in importlib.machinery.all_suffixes()):
                return True
        if not found:
            return False
        locations = found
    return True


def package_missing(module: Optional[str], pip_name: Optional[str] = None) -> Optional[str]:
    if module and not module_present(module):
        return f"package {module} not installed (pip install {pip_name or module})"
    return None


@functools.lru_cache(maxsize=None)
def compute_capability(device: torch.device) -> Optional[tuple[int, int]]:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def device_type(call: AttentionCall, devices) -> Optional[str]:
    if call.device.type not in devices:
        return f"device {call.device.type} not supported (needs {' or '.join(devices)})"
    return None


def dtype(call: AttentionCall, dtypes) -> Optional[str]:
    if call.dtype not in dtypes:
        return f"dtype {call.dtype} not in ({dtype_names(dtypes)})"
    return None


def max_head_dim(call: AttentionCall, limit: Optional[int]) -> Optional[str]:
    if limit is not None and max(call.head_dim, call.head_dim_v) > limit:
        return f"head_dim {max(call.head_dim, call.head_dim_v)} > {limit}"
    return None


def min_capability(call: AttentionCall, minimum: Optional[tuple[int, int]]) -> Optional[str]:
    if minimum is None or call.device.type != "cuda":
        return None
    cap = compute_capability(call.device)
    if cap < tuple(minimum):
        return (f"compute capability {cap[0]}.{cap[1]} < required "
                f"{minimum[0]}.{minimum[1]}")
    return None


def max_capability(call: AttentionCall, maximum: Optional[tuple[int, int]]) -> Optional[str]:
    if maximum is None or call.device.type != "cuda":
        return None
    cap = compute_capability(call.device)
    if cap > tuple(maximum):
        return f"compute capability {cap[0]}.{cap[1]} > supported {maximum[0]}.{maximum[1]}"
    return None


def mask_kind(call: AttentionCall, kinds) -> Optional[str]:
    kind = call.mask_kind
    if kind in kinds or (kind == "key_padding" and "bool" in kinds):
        return None
    return f"{kind} attn_mask not supported (supports: {', '.join(sorted(kinds))})"
