"""Measure the small-batch GEMM configs on this GPU and write the table ``kernels/small_gemm.py`` reads.

    python benchmarks/tune_gemm.py [--out DIR] [--preset 1b,8b] [--rows 1,16] [--budget-s 120]

For each weight shape of the preset models (the engine's fused linears: QKV, O, gate+up, down, and the LM head
of the ~1B Llama; the Llama-3-8B ones; QKV and gate+up with the norm prologue / gated epilogue the engine's decode
step uses, and plain), each M bucket and each weight kind (bf16, int8), every candidate
(the GEMV kernel's N / K tiles and warps for M <= 8, the tensor-core kernel's tiles for any M; split-K as the
launcher picks it) is timed with ``triton.testing.do_bench_cudagraph`` (the call replayed from a CUDA graph, as the
engine's decode step runs, so launch overhead is not counted), next to ``F.linear`` on the bf16 weight. The
fastest candidate per (kind, M bucket, N, K) goes into ``DIR/<device>.json``; copy it to
``lightning_dsinfer/kernels/configs/`` to ship it. Candidates that would start after ``--budget-s`` are skipped
(the shapes are in priority order: the 1B model's first).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (name, N, K, variant) of the engine's linears at decode: the input norm + QKV ("norm": the norm prologue), O,
# the post-attention norm + gate/up + SwiGLU ("gated"), down, LM head; then QKV and gate/up as plain calls (what
# the offload tiers run).
PRESETS = {
    "1b": [("qkv", 2560, 2048, "norm"), ("o", 2048, 2048, ""), ("gate_up", 11264, 2048, "gated"),
           ("down", 2048, 5632, ""), ("lm_head", 32000, 2048, ""), ("qkv", 2560, 2048, ""),
           ("gate_up", 11264, 2048, "")],
    "8b": [("qkv", 6144, 4096, "norm"), ("o", 4096, 4096, ""), ("gate_up", 28672, 4096, "gated"),
           ("down", 4096, 14336, ""), ("qkv", 6144, 4096, ""), ("gate_up", 28672, 4096, "")],
}


def candidates(m: int, variant: str = "") -> list[dict]:
    """The configs tried for M rows: GEMV tiles (M <= 8) whose fp32 accumulators stay within 128 registers per
    thread (two accumulators for a gated call, whose block_n counts outputs), and tensor-core tiles."""
    from lightning_dsinfer.kernels.small_gemm import GEMV_MAX_M

    out = []
    accs = 2 if variant == "gated" else 1
    if m <= GEMV_MAX_M:
        rows = 1 << (m - 1).bit_length()
        for block_k, warps in ((256, 4), (512, 4), (1024, 8)):
            for block_n in (1, 2, 4, 8, 16):
                if accs * rows * block_n * block_k // (32 * warps) <= 128:
                    out.append({"kernel": "gemv", "block_n": block_n, "block_k": block_k, "split_k": None,
                                "warps": warps})
    for block_n in ((16, 32, 64) if accs == 2 else (32, 64, 128)):
        for block_k in (64, 128, 256):
            out.append({"kernel": "dot", "block_n": block_n, "block_k": block_k, "split_k": None, "warps": 4})
    return out


def bench_us(fn) -> float:
    """Microseconds per call, replayed from a CUDA graph (falls back to plain launches if capture fails)."""
    from triton.testing import do_bench, do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=20) * 1e3
    except Exception:
        return do_bench(fn, warmup=5, rep=20) * 1e3


def tune(presets=("1b", "8b"), rows=(1, 16), kinds=("bf16", "int8"), deadline=float("inf"), dev="cuda",
         log=print, copy_gbs=float("nan")):
    """Returns (table {config_key: config}, markdown rows). ``dev="cpu"``: CPU smoke in the interpreter (one tiny
    shape, no timing meaning)."""
    from lightning_dsinfer.kernels import reference as ref
    from lightning_dsinfer.kernels.small_gemm import (VARIANTS, config_key, heuristic_config, small_gemm,
                                                      small_gemm_int8)

    cuda = dev == "cuda"
    sms = torch.cuda.get_device_properties(0).multi_processor_count if cuda else 4
    shapes = [(p, *s) for p in presets for s in PRESETS[p]] if cuda else [("tiny", "w", 40, 96, v) for v in VARIANTS]
    table, rows_out = {}, []
    for preset, name, n, k, variant in shapes:
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        q8, s8 = ref.quantize_int8_per_channel(w)
        label = f"{preset} {name}" + (f" ({variant})" if variant else "")
        gated = variant == "gated"
        for kind in kinds:
            for m in rows:
                if time.time() > deadline:
                    rows_out.append([label, kind, m, f"{n}x{k}", "skipped (time)", "", "", "", ""])
                    continue
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                fused = {} if not variant else dict(add=torch.randn_like(x), norm=(torch.ones(k, device=dev), 1e-6),
                                                    gated=gated)
                want = ref.norm_small_gemm(x, (w if kind == "bf16" else ref.dequantize_int8(q8, s8)).float(),
                                           fused.get("add"), fused.get("norm"), gated=gated)[0].float()

                def call(cfg, x=x, kind=kind, fused=fused):
                    out = small_gemm(x, w, **fused, **cfg) if kind == "bf16" else small_gemm_int8(x, q8, s8, **fused,
                                                                                                   **cfg)
                    return out[0] if isinstance(out, tuple) else out
                results = []
                cands = candidates(m, variant)
                for cand in cands if cuda else cands[:2] + cands[-1:]:
                    cfg = {"kernel": cand["kernel"], "block_n": cand["block_n"], "block_k": cand["block_k"],
                           "split_k": cand["split_k"], "warps": cand["warps"]}
                    try:
                        got = call(cfg).float()
                        err = (got - want).abs().max().item() / (want.abs().max().item() + 1e-6)
                        if not err < 2e-2:      # a config that computes something else is not a candidate
                            log(f"   wrong result ({err:.2e}) {kind} m{m} {n}x{k} {cfg}")
                            continue
                        results.append((bench_us(lambda: call(cfg)) if cuda else 0.0, cand))
                    except Exception as exc:
                        log(f"   failed {kind} m{m} {n}x{k} {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
                if not results:
                    continue
                best_us, best = min(results, key=lambda r: r[0])
                table[config_key(n, k, m, "float" if kind == "bf16" else "int8", variant)] = best
                h = heuristic_config(n, k, m, 0 if kind == "bf16" else 1, sms)
                if gated:
                    h = {**h, "block_n": max(1 if h["kernel"] == "gemv" else 16, h["block_n"] // 2)}
                h_us = next((us for us, c in results if c == h), float("nan"))
                torch_us = bench_us(lambda: torch.nn.functional.linear(x, w)) if cuda else float("nan")
                nbytes = (w.numel() * (2 if kind == "bf16" else 1) + (m * k + m * n) * 2)
                gbs = nbytes / (best_us * 1e-6) / 1e9 if best_us else float("nan")
                rows_out.append([label, kind, m, f"{n}x{k}",
                                 f"{best['kernel']} n{best['block_n']} k{best['block_k']} w{best['warps']}",
                                 f"{best_us:.1f}", f"{h_us:.1f}", f"{torch_us:.1f}",
                                 f"{gbs:.0f} ({gbs / copy_gbs:.2f})"])
                log(" | ".join(str(c) for c in rows_out[-1]))
    return table, rows_out


HEADER = ["shape", "weights", "M", "N x K", "best config", "best (us)", "heuristic (us)", "F.linear bf16 (us)",
          "GB/s (of copy BW)"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--preset", default="1b,8b")
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--budget-s", type=float, default=0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("tune_gemm: no GPU; nothing to tune")
        return 0
    from lightning_dsinfer.kernels.small_gemm import table_path
    deadline = time.time() + args.budget_s if args.budget_s else float("inf")
    table, _ = tune(args.preset.split(","), [int(r) for r in args.rows.split(",")], deadline=deadline)
    path = args.out / table_path(torch.cuda.get_device_name()).name
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(table)} configs to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
