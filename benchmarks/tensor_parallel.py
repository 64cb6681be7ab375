"""Tensor-parallel decode on CPU: TP=2 (one thread per rank) against TP=1 (one thread), in one run.

Decode is memory-bound, so two ranks that each read half of the weights should approach 2x. Prints
decode tokens/s of each, the ratio, and the all-reduce count and bytes per generated token.

    python benchmarks/tensor_parallel.py [--record benchmarks/RESULTS.md]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from common import add_llama_args  # noqa: E402


def worker(args):
    import torch

    import lightning_dsinfer as dsi
    from decode import build_model

    torch.set_num_threads(1)
    model = build_model(args)
    model = dsi.init_inference(model, dtype=torch.bfloat16, tensor_parallel_size=args.tp,
                               max_seq_len=args.prompt + args.new, max_batch_size=1)
    comm = model._dsinfer_engine.comm
    ids = torch.randint(3, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    def run(n):
        t = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=n, do_sample=False)
        return time.perf_counter() - t

    def waited():   # seconds inside all-reduces, waiting for the peer included
        return 0.0 if comm.shm is None else comm.shm.seconds

    def counted(n):
        calls, nbytes, before = comm.all_reduce_calls, comm.all_reduce_bytes, waited()
        t = run(n)
        return t, comm.all_reduce_calls - calls, comm.all_reduce_bytes - nbytes, waited() - before

    run(2)
    t1, calls1, bytes1, red1 = min(counted(1) for _ in range(args.repeats))
    tn, calls_n, bytes_n, red_n = min(counted(args.new) for _ in range(args.repeats))
    steps = args.new - 1                              # decode steps, the prompt's all-reduces subtracted
    result = dict(tp=args.tp, rank=dsi.parallel_rank(), decode_tok_s=steps / (tn - t1),
                  all_reduce_per_token=(calls_n - calls1) / steps, all_reduce_bytes_per_token=(bytes_n - bytes1) / steps,
                  all_reduce_ms_per_token=1e3 * (red_n - red1) / steps, step_ms=1e3 * (tn - t1) / steps)
    print("RESULT " + json.dumps(result), flush=True)


def launch(args, tp):
    from multiproc_env import rank_env

    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--tp", str(tp), *args.passthrough],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for env in rank_env(tp)]
    outs = [p.communicate(timeout=1200)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("worker failed:\n" + "\n".join(o[-3000:] for o in outs))
    return [json.loads(line[7:]) for o in outs for line in o.splitlines() if line.startswith("RESULT ")]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    add_llama_args(p)
    p.add_argument("--record", metavar="RESULTS_MD")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from common import markdown_table, passthrough, record

    args.passthrough = passthrough(args, "prompt", "new", "repeats")

    base = launch(args, 1)[0]
    tp = [r for r in launch(args, args.tp) if r["rank"] == 0][0]
    rows = [[1, 1, base["decode_tok_s"], 1.0, base["step_ms"], 0.0, 0, 0.0],
            [args.tp, 1, tp["decode_tok_s"], tp["decode_tok_s"] / base["decode_tok_s"], tp["step_ms"],
             tp["all_reduce_per_token"], int(tp["all_reduce_bytes_per_token"]), tp["all_reduce_ms_per_token"]]]
    table = markdown_table(["TP", "threads/rank", "decode tok/s (batch 1)", "ratio vs TP=1", "ms/token",
                            "all-reduces/token", "all-reduce bytes/token", "ms/token in all-reduce (rank 0, incl. "
                            "waiting for the peer)"], rows)
    print(table)
    if args.record:
        record(args.record, f"tensor_parallel.py: ~200M Llama bf16, batch 1, TP={args.tp} vs TP=1 (shared-memory all-reduce)", table)


if __name__ == "__main__":
    main()
