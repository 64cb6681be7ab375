"""Pipeline-parallel generate on CPU: PP=2 (one thread per stage) against one process, in one run.

Each configuration generates from the same prompts (~200M Llama, bf16) at batch 1 and batch ``--batch``:

- HF eager, one thread (the baseline, in the PP=1 process, same prompts);
- ours without a pipeline, one thread and two threads (what the same two cores give without a pipeline);
- ours PP=2 with the naive schedule (the whole batch as one micro-batch, the prompt in one piece: each stage waits
  for the other) and with the hybrid schedule of ``generation/pipeline.py`` (row groups in turn for the tokens, prompt
  chunks).

Decode throughput is batch x (new - 1) / (time(new tokens) - time(1 token)); prompt time is the 1-token run. At
batch 1 a pipeline cannot overlap anything (one sequence crosses the stages in turn); at larger batches the hybrid
schedule keeps both stages busy.

    python benchmarks/pipeline.py [--batch 8] [--record benchmarks/RESULTS.md]
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


def _timings(model, prompts, new, repeats):
    """(prompt seconds, decode tokens/s) of ``model.generate`` on ``prompts``: best of ``repeats``."""
    def run(n):
        t = time.perf_counter()
        model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, do_sample=False)
        return time.perf_counter() - t

    import torch

    run(2)
    one = min(run(1) for _ in range(repeats))
    full = min(run(new) for _ in range(repeats))
    return one, prompts.shape[0] * (new - 1) / (full - one)


def worker(args):
    import copy

    import torch

    import lightning_dsinfer as dsi
    import lightning_dsinfer.generation.pipeline as schedule
    from decode import build_model

    torch.set_num_threads(args.threads)
    hf = build_model(args)
    if args.schedule == "naive":       # one micro-batch for everything: the stages take turns
        schedule.row_groups = lambda batch, stages: [(0, batch)]
        schedule.prompt_chunks = lambda t0, groups, stages: [(0, t0)]
    model = dsi.init_inference(copy.deepcopy(hf) if args.hf else hf, dtype=torch.bfloat16,
                               pipeline_parallel_size=args.pp, max_seq_len=args.prompt + args.new,
                               max_batch_size=args.batch)
    g = torch.Generator().manual_seed(0)
    results = []
    for batch in sorted({1, args.batch}):
        prompts = torch.randint(3, args.vocab, (batch, args.prompt), generator=g)
        if args.hf:
            hf_prompt, hf_decode = _timings(hf, prompts, args.new, args.repeats)
            results.append(dict(config="HF eager", batch=batch, prompt_s=hf_prompt, decode_tok_s=hf_decode))
        prompt_s, decode = _timings(model, prompts, args.new, args.repeats)
        results.append(dict(config=args.label, batch=batch, prompt_s=prompt_s, decode_tok_s=decode))
    if dsi.parallel_rank() == 0:
        print("RESULT " + json.dumps(results), flush=True)


def launch(args, pp, threads, schedule="hybrid", hf=False, label=""):
    from multiproc_env import rank_env

    cmd = [sys.executable, __file__, "--worker", "--pp", str(pp), "--threads", str(threads), "--schedule", schedule,
           "--label", label, *(["--hf"] if hf else []), *args.passthrough]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for env in rank_env(pp)]
    outs = [p.communicate(timeout=3600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("worker failed:\n" + "\n".join(o[-3000:] for o in outs))
    return [r for o in outs for line in o.splitlines() if line.startswith("RESULT ") for r in json.loads(line[7:])]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--schedule", default="hybrid", help=argparse.SUPPRESS)
    p.add_argument("--label", default="", help=argparse.SUPPRESS)
    p.add_argument("--hf", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    add_llama_args(p)
    p.add_argument("--record", metavar="RESULTS_MD")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from common import markdown_table, passthrough, record

    args.passthrough = passthrough(args, "batch", "prompt", "new", "repeats")

    pp = args.pp
    results = (launch(args, 1, 1, hf=True, label="ours, no pipeline, 1 thread")
               + launch(args, 1, pp, label=f"ours, no pipeline, {pp} threads")
               + launch(args, pp, 1, schedule="naive", label=f"ours PP={pp}, naive schedule (1 thread/stage)")
               + launch(args, pp, 1, label=f"ours PP={pp}, hybrid schedule (1 thread/stage)"))
    base = {r["batch"]: r for r in results if r["config"] == "HF eager"}
    one = {r["batch"]: r for r in results if r["config"] == "ours, no pipeline, 1 thread"}
    rows = [[r["config"], r["batch"], 1e3 * r["prompt_s"], r["decode_tok_s"],
             r["decode_tok_s"] / base[r["batch"]]["decode_tok_s"], r["decode_tok_s"] / one[r["batch"]]["decode_tok_s"]]
            for r in sorted(results, key=lambda r: r["batch"])]
    table = markdown_table(["configuration", "batch", "prompt ms", "decode tok/s", "vs HF eager (1 thread)",
                            "vs ours 1 thread"], rows)
    print(table)
    if args.record:
        record(args.record, f"pipeline.py: ~200M Llama bf16, PP={pp} vs one process, batch 1 and {args.batch}, "
                            f"prompt {args.prompt}, {args.new} new tokens", table)


if __name__ == "__main__":
    main()
