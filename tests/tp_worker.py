"""One rank of a tensor-parallel run: optimise tiny models with init_inference(tensor_parallel_size=N)
and compare logits and greedy tokens with the unmodified HF model computed in the same process."""
import argparse
import copy
import os
import sys
import tempfile

import torch

import lightning_dsinfer as dsi
from helpers import (fake_quantised_int4, fake_quantised_int8, padded_batch, sampling_agrees_across_ranks,
                     streaming_budget, tiny_model)
from lightning_dsinfer.generation import lookup


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--families", nargs="+", required=True)
    p.add_argument("--offload", choices=["cpu", "nvme"], default=None)
    p.add_argument("--offload-path", default=None)
    p.add_argument("--max-memory", default="512KiB",
                   help="offload budget, or 'streaming': helpers.streaming_budget (most units stream)")
    p.add_argument("--checkpoint", default=None,
                   help="a folder holding <family>/ (tiny_model saved): the model goes in on meta and loads from it")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="int8 / int4 weights; the reference is HF over the same quantise-dequantised weights")
    p.add_argument("--quantize-group-size", type=int, default=128,
                   help="int4: inputs per scale (the tiny models' per-rank K are 48 / 64: 16 divides both)")
    p.add_argument("--expert-parallel", action="store_true",
                   help="MoE: whole experts placed over the ranks (expert_parallel_size = tp) instead of sliced")
    args = p.parse_args()
    torch.set_num_threads(1)
    offload = {} if args.offload is None else dict(offload=args.offload, max_memory=args.max_memory, max_batch_size=3,
                                                   offload_path=args.offload_path)
    for family in args.families:
        inputs = {}             # a vision-language model ("vlm-<kind>", tests/test_multimodal.py): its image batch
        if family.startswith("vlm-"):
            from test_multimodal import image_batch, tiny_vlm

            hf, images = tiny_vlm(family[4:])
        else:
            hf = tiny_model(family)
        source = {} if args.checkpoint is None else dict(checkpoint=os.path.join(args.checkpoint, family),
                                                         dtype=torch.float32)

        def build(**options):
            model = copy.deepcopy(hf)
            if args.checkpoint is not None:                 # on meta, loaded from the checkpoint
                from transformers import AutoModelForCausalLM

                with torch.device("meta"):
                    model = AutoModelForCausalLM.from_config(hf.config)
            return dsi.init_inference(model, tensor_parallel_size=args.tp, max_seq_len=64, collective_timeout_s=60,
                                      quantize=args.quantize, quantize_group_size=args.quantize_group_size,
                                      expert_parallel_size=args.tp if args.expert_parallel else 1,
                                      **{**offload, **options}, **source)

        if args.offload_path:           # one folder per family (else the next family's units replace these)
            offload["offload_path"] = os.path.join(args.offload_path, family)
        if args.max_memory == "streaming":                  # sized in a folder of its own (the test's stays as it was)
            with tempfile.TemporaryDirectory() as scratch:
                offload["max_memory"] = streaming_budget(lambda mm: build(max_memory=mm, offload_path=scratch))
        opt = build()
        if args.expert_parallel:    # each rank holds its share of the experts whole
            decoder = opt._dsinfer_engine.decoder
            if args.offload:        # the streamed units hold this rank's experts: [E / tp, 2I, H], not [E, 2I / tp, H]
                shapes = [dict((e.name, e.shape) for e in layout.entries).get("moe.gate_up")
                          for layout in decoder.streamer.layouts]
                experts = next(layer.mlp.experts.gate_up_proj.shape for layer in hf.model.layers
                               if hasattr(layer.mlp, "experts"))
                placed = [s for s in shapes if s is not None]
                if decoder.experts is not None:     # disk tier: one unit per expert, read when routed to
                    placed = [(len(us), *decoder.streamer.layouts[us[0]].entries[0].shape)
                              for us in decoder.experts.units.values()]
                # gate|up rows whole (2I: HF's dim other than hidden; gpt-oss stores [E, H, 2I]; int4 packs K in two)
                rows = ({experts[1], experts[2]} - {hf.config.hidden_size}) or {hf.config.hidden_size}
                assert placed and all(s[0] == experts[0] // args.tp and s[1] in rows for s in placed), shapes
            else:
                moe = [m for layer in decoder.layers       # (Gemma 4: the experts beside the MLP)
                       for m in (layer.mlp, getattr(getattr(layer, "beside", None), "experts", None))
                       if type(m).__name__ == "MoEMLP"]
                assert moe and all(m.first_expert == m.local_experts * int(os.environ["RANK"]) for m in moe)
        if args.quantize == "int8":
            hf = fake_quantised_int8(hf)
        elif args.quantize == "int4":
            hf = fake_quantised_int4(hf, args.quantize_group_size)
        if args.offload is not None:
            streamer = opt._dsinfer_engine.decoder.streamer
            assert args.offload == "cpu" or len(streamer.order) >= 2, "nothing is streamed"
            reused = getattr(streamer.store, "reused", False)
        ids, mask = padded_batch([12, 5, 9], seed=1)
        if family.startswith("vlm-"):
            ids, mask, inputs = image_batch(family[4:], images)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask, **inputs).logits
            ref_tokens = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **inputs)
            # (HF's beam search does not repeat given image features for its beams: Gemma 4's mm_encoder_outputs)
            beams = "mm_encoder_outputs" not in inputs
            ref_beam = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=2, do_sample=False,
                                   **inputs) if beams else None
        got = opt(input_ids=ids, attention_mask=mask, **inputs).logits
        valid = mask.bool()
        err = (got[valid] - ref[valid]).abs().max().item()
        tokens = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **inputs)
        beam = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=2, do_sample=False,
                            **inputs) if beams else None
        agrees = sampling_agrees_across_ranks(opt, ids, mask, 10)
        beam_ok = not beams or torch.equal(beam, ref_beam)
        lookup_ok = True        # prompt-lookup drafts verified across the ranks (generation/lookup.py): HF's tokens
        if lookup.applies(opt._dsinfer_engine) and not inputs:
            lookup_ok = torch.equal(opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10,
                                                 do_sample=False, prompt_lookup_num_tokens=3), ref_tokens)
        ok = err < 2e-4 and torch.equal(tokens, ref_tokens) and beam_ok and agrees and lookup_ok
        print(f"{family}: tp={args.tp}{' reused' if args.offload and reused else ''} max|dlogits|={err:.2e} greedy={torch.equal(tokens, ref_tokens)} "
              f"beam={beam_ok if beams else 'n/a'} sampling_agrees={agrees} lookup={lookup_ok} {'OK' if ok else 'FAIL'}",
              flush=True)
        if not ok:
            sys.exit(1)


if __name__ == "__main__":
    main()
