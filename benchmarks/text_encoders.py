"""Real-size text encoders (random weights, bf16) patched with attnpatch backends vs unpatched.

- T5-XXL encoder (Flux, SD3, Wan, PixArt): transformers' own ``sdpa`` implementation unpatched,
  vs ``attnpatch.patch(model, backend=...)`` for sdpa, flash4, flex and auto. T5 adds a relative
  position bias (a float mask) to every score, so kernels without float masks are refused with
  their reason (printed), never silently run without it.
- Gemma2-2B (Sana's text encoder; attention logit softcapping 50): transformers' ``eager``
  unpatched (the only transformers implementation that applies softcap on every kernel) vs
  patched with backends that compute softcap.

Each row: max relative error against unpatched (bf16, and against an fp32 unpatched forward
for scale), median forward time (CUDA events, after warm-up), and what ran. Usage on a GPU:
``python benchmarks/text_encoders.py --out DIR`` (writes text_encoders.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import statistics
import time
import traceback

import torch

import attnpatch

T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128,
              feed_forward_proj="gated-gelu", dropout_rate=0.0, is_gated_act=True)
GEMMA2_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                 num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                 head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                 final_logit_softcapping=30.0, sliding_window=4096,
                 max_position_embeddings=8192)


def median_ms(fn, device: torch.device, warmup=3, reps=15) -> float:
    """Median milliseconds of ``fn()``: CUDA events on a GPU, wall clock on a CPU (smoke runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def rel_error(out, ref) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def inputs(batch, seq, vocab, device, padded=True):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        mask[-1, seq * 3 // 4:] = 0  # right padding on the last row, as for a short prompt
    return ids.to(device), mask.to(device)


def compare(name, model, forward, backends, valid, device):
    rows = []
    with torch.no_grad():
        ref = forward()
        ref_ms = median_ms(forward, device)
        model.float()
        ref32 = forward()
        model.to(torch.bfloat16)
    base = rel_error(valid(ref), valid(ref32))
    rows.append(dict(model=name, variant="unpatched", ran=model.config._attn_implementation,
                     ms=ref_ms, rel_err_vs_unpatched=0.0, rel_err_vs_fp32=base))
    for backend in backends:
        row = dict(model=name, variant=f"patch({backend})")
        try:
            with attnpatch.patch(model, backend=backend) as handle, torch.no_grad():
                out = forward()
                row["ms"] = median_ms(forward, device)
                report = handle.report()
                row["ran"] = ",".join(sorted({r.backend or "-" for r in report}))
                row["routed"] = f"{len(report.routed)}/{len(report)}"
                row["rel_err_vs_unpatched"] = rel_error(valid(out), valid(ref))
                row["rel_err_vs_fp32"] = rel_error(valid(out), valid(ref32))
        except attnpatch.AttnPatchError as err:
            row["refused"] = " ".join(str(err).split())[:400]
        except Exception as err:  # a kernel failure is a finding: report it
            row["error"] = f"{type(err).__name__}: {' '.join(str(err).split())[:400]}"
            traceback.print_exc()
        rows.append(row)
    with torch.no_grad():
        assert torch.equal(forward(), ref), f"{name}: unpatch is not exact"
    return rows


def t5_rows(batch, seq, device, config):
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(0)
    with device:
        model = T5EncoderModel(T5Config(**config)).to(torch.bfloat16).eval()
    ids, mask = inputs(batch, seq, config["vocab_size"], device)

    def forward():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state

    rows = compare("t5-xxl-encoder", model, forward, ("sdpa", "flash4", "flex", "auto"),
                   lambda out: out[mask.bool()], device)
    return rows


def gemma2_rows(batch, seq, device, config):
    """Padded prompts (Sana pads to 300 tokens): the causal+padding mask is a full bool mask,
    which flash kernels cannot take; unpadded prompts: causal only, which they can."""
    from transformers import Gemma2Config, Gemma2Model
    torch.manual_seed(0)
    with device:
        model = Gemma2Model(Gemma2Config(**config)).to(torch.bfloat16).eval()
    model.set_attn_implementation("eager")
    rows = []
    for padded in (True, False):
        ids, mask = inputs(batch, seq, config["vocab_size"], device, padded)

        def forward():
            kw = dict(attention_mask=mask) if padded else {}
            return model(input_ids=ids, **kw).last_hidden_state

        name = "gemma2-2b" + ("" if padded else " unpadded")
        rows += compare(name, model, forward, ("flex", "flash4", "math", "auto"),
                        lambda out: out[mask.bool()], device)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--t5-seq", type=int, default=512)
    parser.add_argument("--gemma-seq", type=int, default=300)
    parser.add_argument("--only", choices=("t5", "gemma2"), default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help="small configs of the same models (a CPU smoke run)")
    args = parser.parse_args()
    device = torch.device(args.device)
    t5, gemma2 = dict(T5_XXL), dict(GEMMA2_2B)
    if args.tiny:
        t5.update(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
        gemma2.update(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      query_pre_attn_scalar=8, attn_logit_softcapping=1.0)
    rows = []
    if args.only in (None, "t5"):
        rows += t5_rows(args.batch, args.t5_seq, device, t5)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.only in (None, "gemma2"):
        rows += gemma2_rows(args.batch, args.gemma_seq, device, gemma2)
    head = ("model", "variant", "ran", "routed", "ms", "err vs unpatched", "err vs fp32")
    print(" | ".join(head))
    for r in rows:
        if "refused" in r or "error" in r:
            print(f"{r['model']} | {r['variant']} | {'refused' if 'refused' in r else 'ERROR'}: "
                  f"{r.get('refused') or r.get('error')}")
            continue
        print(f"{r['model']} | {r['variant']} | {r['ran']} | {r.get('routed', '-')} | "
              f"{r['ms']:.2f} | {r['rel_err_vs_unpatched']:.2e} | {r['rel_err_vs_fp32']:.2e}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        meta = dict(device=name, torch=torch.__version__, tiny=args.tiny,
                    batch=args.batch, t5_seq=args.t5_seq, gemma_seq=args.gemma_seq)
        (args.out / "text_encoders.json").write_text(json.dumps(dict(meta=meta, rows=rows),
                                                                indent=1))


if __name__ == "__main__":
    main()
