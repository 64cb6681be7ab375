"""One rank of a generic (policy-less) tensor-parallel run: models dsinfer has no fused policy for, split by
init_inference(tensor_parallel_size=N), against the unmodified HF model computed in the same process.

Per family: logits of a left-padded batch, greedy tokens, sampling that agrees across ranks; and the same
model built on ``meta`` and loaded from a safetensors folder (--checkpoints) gives the same logits."""
import argparse
import copy
import os
import sys

import torch
from transformers import AutoModelForCausalLM

import lightning_dsinfer as dsi
from helpers import padded_batch, sampling_agrees_across_ranks, tiny_config, tiny_model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--families", nargs="+", required=True)
    p.add_argument("--checkpoints", default=None, help="folder with one safetensors checkpoint per family")
    args = p.parse_args()
    torch.set_num_threads(1)
    for family in args.families:
        hf = tiny_model(family)
        opt = dsi.init_inference(copy.deepcopy(hf), tensor_parallel_size=args.tp, collective_timeout_s=60)
        engine = opt._dsinfer_engine
        ids, mask = padded_batch([12, 5, 9], seed=1)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask).logits
            ref_tokens = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
            got = opt(input_ids=ids, attention_mask=mask).logits
        valid = mask.bool()
        err = (got[valid] - ref[valid]).abs().max().item()
        tokens = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        agrees = sampling_agrees_across_ranks(opt, ids, mask, 8)
        meta_err = 0.0
        if args.checkpoints:
            with torch.device("meta"):
                meta = AutoModelForCausalLM.from_config(tiny_config(family))
            meta = dsi.init_inference(meta, tensor_parallel_size=args.tp, checkpoint=os.path.join(args.checkpoints, family),
                                      collective_timeout_s=60)
            with torch.no_grad():
                meta_logits = meta(input_ids=ids, attention_mask=mask).logits
            meta_err = (meta_logits[valid] - ref[valid]).abs().max().item()
        split = len(engine.plan.linears)
        modules = dict(opt.named_modules())
        sharded = all(modules[s.name].weight.shape[0 if s.kind == "col" else 1] == s.local < (
            hf.get_submodule(s.name).weight.shape[0 if s.kind == "col" else 1]) for s in engine.plan.linears)
        ok = (err < 2e-4 and meta_err < 2e-4 and torch.equal(tokens, ref_tokens) and agrees and sharded
              and engine.comm.all_reduce_calls > 0)
        print(f"{family}: tp={args.tp} {engine.plan.origin}, {split} linears split, {len(engine.plan.whole)} groups whole "
              f"max|dlogits|={err:.2e} meta+checkpoint={meta_err:.2e} greedy={torch.equal(tokens, ref_tokens)} "
              f"sampling_agrees={agrees} sharded={sharded} all_reduces={engine.comm.all_reduce_calls} "
              f"{'OK' if ok else 'FAIL'}", flush=True)
        if not ok:
            sys.exit(1)


if __name__ == "__main__":
    main()
