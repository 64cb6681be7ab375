"""Prompt-lookup speculative decoding: Hugging Face ``generate`` vs lightning-dsinfer, side by side in one process.

Same model (the ~200M Llama config of decode.py, from_config, bf16), same prompts, same thread count; greedy, exactly
``--new`` tokens (no EOS). Rows: HF greedy, HF's prompt lookup (``prompt_lookup_num_tokens``: its assisted-decoding
loop, one row only), the engine's plain greedy loop, and the engine's prompt lookup (generation/lookup.py). Decode
tokens/s = (time of N tokens - time of 1 token) / (N - 1) steps x rows, so the prompt is excluded; "tok/forward" is
what each of the engine's verifying forwards yielded.

How many drafts are kept depends on the text: a lookup pays where the continuation repeats what came before (quoting
or editing the prompt, code, structured output). The prompt here is ``--repeat`` copies of a random segment, and a
random-weights model's greedy continuation falls into loops of its own, which the lookups find; ``--repeat 1`` gives a
prompt without repeats. Each row's tokens agreeing with HF greedy's are printed (the fp32 equality is a test:
tests/test_lookup.py).

    python benchmarks/lookup.py
    python benchmarks/lookup.py --record benchmarks/RESULTS.md
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

from common import add_llama_args, llama_config, markdown_table, record  # noqa: E402


def timed(model, ids, new_tokens, repeats, **kw):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, **kw)
        best = min(best, time.perf_counter() - t)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return best, out


def agreement(a: torch.Tensor, b: torch.Tensor, t0: int) -> str:
    """Each row's count of new tokens equal before the first difference, as "n1/n2/..." of the new tokens."""
    same = (a[:, t0:] == b[:, t0:]).long().cumprod(-1).sum(-1)
    return "/".join(str(int(v)) for v in same) + f" of {a.shape[1] - t0}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--segment", type=int, default=64, help="tokens of the random segment the prompt repeats")
    p.add_argument("--repeat", type=int, default=3, help="copies of the segment in the prompt")
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--draft", type=int, default=8, help="prompt_lookup_num_tokens")
    p.add_argument("--repeats", type=int, default=2)
    add_llama_args(p)
    p.add_argument("--record", metavar="RESULTS_MD", help="append the table to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import lightning_dsinfer as dsi
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(llama_config(args), dtype=torch.bfloat16).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    prompt = args.segment * args.repeat
    ours = dsi.init_inference(copy.deepcopy(hf), dtype=torch.bfloat16, max_seq_len=prompt + args.new,
                              max_batch_size=max(args.batch))
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"model: {n_params / 1e6:.0f}M params bf16, {args.threads} threads, prompt {prompt} ({args.repeat} x "
          f"{args.segment}), {args.new} new tokens, drafts of up to {args.draft}")
    lookup = dict(prompt_lookup_num_tokens=args.draft)
    rows, notes = [], []
    for b in args.batch:
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(3, args.vocab, (b, args.segment), generator=g).repeat(1, args.repeat)
        impls = [("HF greedy", hf, {}), ("HF prompt lookup", hf, lookup), ("dsinfer", ours, {}),
                 ("dsinfer prompt lookup", ours, lookup)]
        if b > 1:        # (HF's assisted decoding: "only supported for batch_size = 1")
            impls = [i for i in impls if i[0] != "HF prompt lookup"]
        res, outs = {}, {}
        for name, model, kw in impls:
            timed(model, ids, 2, 1, **kw)                                        # warm-up
            t1, _ = timed(model, ids, 1, args.repeats, **kw)
            tn, outs[name] = timed(model, ids, args.new, args.repeats, **kw)
            res[name] = b * (args.new - 1) / (tn - t1)
            per_forward = ""
            if name == "dsinfer prompt lookup":
                forwards, tokens, kept = ours._dsinfer_engine.lookup_stats
                per_forward = f"{(tokens - 1) / forwards:.2f}"
            rows.append([b, name, res[name], res[name] / res["HF greedy"], per_forward])
        notes.append(f"batch {b}: new tokens equal to HF greedy's before the first difference (per row, bf16: a "
                     f"verifying forward rounds differently from a one-token step): the engine's plain loop "
                     f"{agreement(outs['dsinfer'], outs['HF greedy'], ids.shape[1])}, its lookup "
                     f"{agreement(outs['dsinfer prompt lookup'], outs['HF greedy'], ids.shape[1])}")
        print(f"batch {b}: lookup {res['dsinfer prompt lookup'] / res['dsinfer']:.2f}x the engine's plain loop, "
              f"{res['dsinfer prompt lookup'] / res['HF greedy']:.2f}x HF greedy", flush=True)
    table = markdown_table(["batch", "impl", "decode tok/s", "vs HF greedy", "tok/forward"], rows)
    print(table)
    print("\n".join(notes))
    if args.record:
        record(args.record, f"lookup.py: {n_params / 1e6:.0f}M Llama bf16, {args.threads} threads, prompt lookup "
                            f"(drafts of up to {args.draft}), prompt {args.repeat} x {args.segment} tokens",
               table + "\n\n" + "\n\n".join(notes))


if __name__ == "__main__":
    main()
