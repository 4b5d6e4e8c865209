"""A full-size Flux transformer patched with flash4 against the same model patched with sdpa.

GPU only (``python -m pytest -m gpu``); needs diffusers and flash-attn-4 (see
../shared/gpu/README.md). Random weights, bf16, 1024x1024 (4096 image + 512 text tokens).
"""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

import attnpatch
from attnpatch.constraints import module_present

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not module_present("flash_attn.cute"), reason="flash-attn-4 not installed"),
]

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))


def test_full_flux_flash4_matches_sdpa():
    from overhead import flux_model

    model, kwargs = flux_model(tiny=False, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        unpatched = model(**kwargs)[0].float()
        with attnpatch.patch(model, backend="sdpa") as handle:
            sdpa = model(**kwargs)[0].float()
            model.set_attention_backend("flash4")
            flash4 = model(**kwargs)[0].float()
            report = handle.report()
    assert torch.isfinite(flash4).all()
    assert {r.backend for r in report} == {"flash4"} and all(r.calls >= 1 for r in report)
    assert len(report) == 57  # 19 double-stream + 38 single-stream blocks
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    # sdpa and unpatched run the same kernel; flash4 differs only by bf16 rounding
    assert rel(sdpa, unpatched) < 1e-3
    assert rel(flash4, sdpa) < 2e-2, rel(flash4, sdpa)
