"""Decode and prompt speed: Hugging Face ``generate`` vs lightning-dsinfer, side by side in one process.

Same model (a ~200M Llama config from_config, bf16), same prompts, same thread count. Prompt speed is
the time of a 1-token generate; decode speed is (time of N tokens - time of 1 token) / (N - 1) steps,
so it excludes the prompt. Bandwidth utilisation = weight bytes read per decode step x steps/s over a
streaming-read bandwidth measured in the same run.

    python benchmarks/decode.py                       # the issue's configuration
    python benchmarks/decode.py --record benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from common import add_llama_args, llama_config, markdown_table, record, stream_read_bandwidth  # noqa: E402


def build_model(args):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(args), dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None     # always generate exactly N tokens
    model.generation_config.pad_token_id = 0
    return model


def time_generate(model, ids, new_tokens, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False)
        best = min(best, time.perf_counter() - t)
        assert out.shape[1] == ids.shape[1] + new_tokens
    return best


def hf_decode_bytes(model) -> int:
    """Weight bytes HF reads per decode step: every parameter except the embedding table (one row)."""
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    add_llama_args(p)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--record", metavar="RESULTS_MD", help="append the table to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import lightning_dsinfer as dsi

    hf = build_model(args)
    n_params = sum(p.numel() for p in hf.parameters())
    hf_bytes = hf_decode_bytes(hf)
    ours = dsi.init_inference(copy.deepcopy(hf), dtype=torch.bfloat16, max_seq_len=args.prompt + args.new,
                              max_batch_size=max(args.batch))
    our_bytes = ours._dsinfer_engine.decoder.weight_bytes_per_token
    bw = stream_read_bandwidth()
    print(f"model: {n_params / 1e6:.0f}M params bf16, {args.threads} threads, prompt {args.prompt}, {args.new} new "
          f"tokens; streaming read {bw / 1e9:.1f} GB/s")

    rows = []
    for b in args.batch:
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(3, args.vocab, (b, args.prompt), generator=g)
        res = {}
        for name, model, nbytes in (("HF eager", hf, hf_bytes), ("dsinfer", ours, our_bytes)):
            time_generate(model, ids, 2, 1)                                  # warm-up
            t1 = time_generate(model, ids, 1, args.repeats)
            tn = time_generate(model, ids, args.new, args.repeats)
            steps_per_s = (args.new - 1) / (tn - t1)
            res[name] = dict(prompt=b * args.prompt / t1, decode=b * steps_per_s, util=nbytes * steps_per_s / bw)
        for name in ("HF eager", "dsinfer"):
            r = res[name]
            rows.append([b, name, r["prompt"], r["decode"], r["util"],
                         r["prompt"] / res["HF eager"]["prompt"], r["decode"] / res["HF eager"]["decode"]])
        print(f"batch {b}: decode {res['dsinfer']['decode'] / res['HF eager']['decode']:.2f}x, "
              f"prompt {res['dsinfer']['prompt'] / res['HF eager']['prompt']:.2f}x", flush=True)
    table = markdown_table(["batch", "impl", "prompt tok/s", "decode tok/s", "bw util", "prompt ratio",
                            "decode ratio"], rows)
    print(table)
    if args.record:
        record(args.record, f"decode.py: {n_params / 1e6:.0f}M Llama bf16, {args.threads} threads, "
                            f"streaming read {bw / 1e9:.1f} GB/s", table)


if __name__ == "__main__":
    main()
