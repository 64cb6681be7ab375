"""CPU bf16 linears: the C++ kernel (``kernels/cpu_gemv``) vs the oneDNN path it replaces, interleaved A/B.

Both are ``modules.linear.Linear`` objects over the same weights, one built normally and one inside
``cpu_gemv.disabled()`` (oneDNN pre-packed weights, ``_linear_pointwise``), so the numbers include each
module's Python call. Per M it measures, for a Llama decoder layer's four weight shapes (default: the ~200M
model of ``decode.py``, 12 layers of distinct weights, so nothing is served from cache):

- each shape alone (all layers' weights of that shape in turn), and
- the realistic pattern: qkv, o, gate_up, down of layer 0, then of layer 1, ...

Rounds alternate the two implementations (and change which goes first); a round is dropped when the
streaming-read bandwidth measured around it fell below 0.8 of the best (another process was loading the
machine). Medians of the kept rounds; GB/s = weight bytes / time; "util" = that over the streaming read.

``--decode`` also times ``generate`` of the decode.py model with the two engines built side by side
(dsinfer with and without the kernel), alternating, and reports median decode tokens/s of each.

    python benchmarks/bench_cpu_gemv.py                  # M = 1, 4, 16
    python benchmarks/bench_cpu_gemv.py --m 1 --decode --batch 1 16
    python benchmarks/bench_cpu_gemv.py --path avx512_bf16     # the row-major kernel (CPUs without AMX)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from common import add_llama_args, markdown_table  # noqa: E402


class _Stream:
    """Streaming-read bandwidth probe (sum over a 256 MiB fp32 tensor), cheap enough to run every round."""

    def __init__(self, nbytes: int = 1 << 28):
        self.x = torch.ones(nbytes // 4)
        self.nbytes = nbytes

    def __call__(self) -> float:
        t = time.perf_counter()
        self.x.sum()
        return self.nbytes / (time.perf_counter() - t)


def _rounds(stream, funcs: dict, rounds: int):
    """Interleaved medians: {name: [seconds, ...] of kept rounds}, and the median kept bandwidth."""
    kept = {n: [] for n in funcs}
    bws, names = [], list(funcs)
    for f in funcs.values():
        f()                                                        # warm-up
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        b0 = stream()
        times = {}
        for n in order:
            t = time.perf_counter()
            funcs[n]()
            times[n] = time.perf_counter() - t
        bw = min(b0, stream())
        bws.append(bw)
        if bw >= 0.8 * max(bws):
            for n in names:
                kept[n].append(times[n])
    good = [b for b in bws if b >= 0.8 * max(bws)]
    return kept, statistics.median(good)


def _path(args):
    """The kernel path to measure: ``--path`` (a smaller CPU's path on this one), else the best one."""
    from lightning_dsinfer.kernels import cpu_gemv

    return cpu_gemv.use_path(args.path) if args.path else contextlib.nullcontext()


def linear_table(args, stream) -> str:
    from lightning_dsinfer.kernels import cpu_gemv
    from lightning_dsinfer.modules.linear import Linear

    h, i_sz = args.hidden, args.intermediate
    d = h // args.heads
    shapes = {"qkv": ((args.heads + 2 * args.kv_heads) * d, h), "o": (h, args.heads * d), "gate_up": (2 * i_sz, h),
              "down": (h, i_sz)}
    torch.manual_seed(0)
    weights = {k: [torch.randn(n, kk, dtype=torch.bfloat16) * 0.02 for _ in range(args.layers)]
               for k, (n, kk) in shapes.items()}
    with _path(args):
        mods = {"kernel": {k: [Linear(w) for w in ws] for k, ws in weights.items()}}
    with cpu_gemv.disabled():
        mods["oneDNN"] = {k: [Linear(w) for w in ws] for k, ws in weights.items()}
    del weights
    layout = mods["kernel"]["qkv"][0].layout
    rows = []
    for m in args.m:
        xs = {k: torch.randn(m, kk, dtype=torch.bfloat16) for k, (n, kk) in shapes.items()}

        def one_shape(impl, k):
            def run():
                for lin in mods[impl][k]:
                    lin(xs[k])
            return run

        def layers(impl):
            def run():
                for i in range(args.layers):
                    for k in shapes:
                        mods[impl][k][i](xs[k])
            return run

        with torch.inference_mode(), _path(args):
            cases = [(k, {impl: one_shape(impl, k) for impl in mods}, shapes[k][0] * shapes[k][1] * 2 * args.layers)
                     for k in shapes]
            cases.append(("layers (alternating)", {impl: layers(impl) for impl in mods},
                          sum(n * kk * 2 for n, kk in shapes.values()) * args.layers))
            for name, funcs, nbytes in cases:
                kept, bw = _rounds(stream, funcs, args.rounds)
                t = {impl: statistics.median(v) for impl, v in kept.items()}
                for impl in ("oneDNN", "kernel"):
                    rows.append([m, name, impl, t[impl] * 1e3, nbytes / t[impl] / 1e9, nbytes / t[impl] / bw,
                                 t["oneDNN"] / t[impl], f"{len(kept[impl])}/{args.rounds}"])
        print(f"M={m} done (stream {bw / 1e9:.1f} GB/s)", flush=True)
    head = (f"kernel layout {layout}, path {args.path or cpu_gemv.isa()}; {args.layers} layers, "
            f"{args.threads} threads\n\n")
    return head + markdown_table(["M", "weights", "impl", "ms", "GB/s", "util", "speed-up", "rounds kept"], rows)


def decode_table(args, stream) -> str:
    import lightning_dsinfer as dsi
    from lightning_dsinfer.kernels import cpu_gemv
    from decode import build_model

    hf = build_model(args)
    with _path(args):
        engines = {"kernel": dsi.init_inference(copy.deepcopy(hf), dtype=torch.bfloat16,
                                                max_seq_len=args.prompt + args.new, max_batch_size=max(args.batch))}
    with cpu_gemv.disabled():
        engines["oneDNN"] = dsi.init_inference(copy.deepcopy(hf), dtype=torch.bfloat16,
                                               max_seq_len=args.prompt + args.new, max_batch_size=max(args.batch))
    del hf
    nbytes = engines["kernel"]._dsinfer_engine.decoder.weight_bytes_per_token
    rows = []
    for b in args.batch:
        ids = torch.randint(3, args.vocab, (b, args.prompt), generator=torch.Generator().manual_seed(b))

        def gen(model, n):
            def run():
                with torch.inference_mode():
                    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                   do_sample=False)
            return run

        funcs = {}
        for name, model in engines.items():
            funcs[name + "/1"] = gen(model, 1)
            funcs[name + "/N"] = gen(model, args.new)
        with _path(args):
            kept, bw = _rounds(stream, funcs, args.decode_rounds)
        res = {}
        for name in engines:
            t1, tn = statistics.median(kept[name + "/1"]), statistics.median(kept[name + "/N"])
            res[name] = (args.new - 1) / (tn - t1), b * args.prompt / t1
        for name in ("oneDNN", "kernel"):
            steps, prompt = res[name]
            rows.append([b, name, b * steps, nbytes * steps / bw, prompt, steps / res["oneDNN"][0],
                         f"{len(kept[name + '/N'])}/{args.decode_rounds}"])
        print(f"batch {b} done (stream {bw / 1e9:.1f} GB/s)", flush=True)
    return markdown_table(["batch", "dsinfer linears", "decode tok/s", "bw util", "prompt tok/s", "decode speed-up",
                           "rounds kept"], rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--m", type=int, nargs="+", default=[1, 4, 16], help="rows of x (batch x tokens)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--path", help="kernel path to use (amx_bf16, avx512_bf16, avx512, avx2); default: the best here")
    p.add_argument("--decode", action="store_true", help="also time generate with both engines")
    p.add_argument("--decode-rounds", type=int, default=5)
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="--decode batch sizes")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    add_llama_args(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    stream = _Stream()
    print(linear_table(args, stream))
    if args.decode:
        print(decode_table(args, stream))


if __name__ == "__main__":
    main()
