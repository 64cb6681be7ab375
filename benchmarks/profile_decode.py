"""Where one decode step of the ~1B Llama spends its GPU time: kernels by GPU microseconds per step.

    PYTHONPATH=. python benchmarks/profile_decode.py [--batch 1]

The engine runs eagerly (``DSINFER_CUDA_GRAPHS=0``) so the profiler sees each kernel; per step = (profile of a
17-token generate - profile of a 1-token generate) / 16. Under CUDA graphs the step is this GPU time plus the
gaps between kernels.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

os.environ["DSINFER_CUDA_GRAPHS"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--top", type=int, default=22)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_decode: no GPU")
        return 0
    from torch.profiler import ProfilerActivity, profile

    import lightning_dsinfer as dsi
    from gpu_check import llama_1b

    model = dsi.init_inference(llama_1b(), dtype=torch.bfloat16, max_seq_len=256, max_batch_size=16)
    ids = torch.randint(3, 32000, (args.batch, 128), device="cuda")

    def gen(n):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False)
        torch.cuda.synchronize()

    gen(17)
    gen(1)
    totals = []
    for n in (1, 17):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            gen(n)
        totals.append({e.key: (e.device_time_total, e.count) for e in prof.key_averages()})
    one, many = totals
    rows = sorted((((many[k][0] - one.get(k, (0, 0))[0]) / 16, (many[k][1] - one.get(k, (0, 0))[1]) / 16, k)
                   for k in many), reverse=True)
    print(f"batch {args.batch}, per decode step: {sum(r[0] for r in rows):.0f} us of GPU time in "
          f"{sum(r[1] for r in rows):.0f} kernels")
    for us, count, key in rows[:args.top]:
        print(f"{us:8.1f} us {count:6.1f}x  {key[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
