"""Vision-language generation: HF's Gemma 3 wrapper vs the same wrapper optimised (its language model on the engine,
the vision tower in HF's modules), side by side in one process on the same model and prompts.

The model: ``Gemma3ForConditionalGeneration`` from config (no download): the language model is a Gemma 3 text model of
the ``--hidden`` / ``--layers`` / ... widths (the ~200M Llama's of benchmarks/decode.py), the vision tower a SigLIP of
``--vision-layers`` x 768 (the base model's width: 86M at 12 layers) on 224-pixel images in 14-pixel patches, whose 256
patches become ``--image-tokens`` tokens (Gemma 3's 256: no pooling). Each prompt: ``--text`` text tokens, one image,
the same again; batch 1 and 4 by default, greedy, ``--new`` new tokens. Gemma 3's image tokens see each other
(``token_type_ids``), as the processor sets them.

Printed per batch: time to the first token (the vision tower, the prompt, one step: the vision tower is HF's in both),
decode tokens/s (the steps after the first), their ratios, and the decode's memory-bandwidth use (language-model
weight bytes per step x steps/s over the streaming read bandwidth measured in the same run).

    python benchmarks/vision.py [--threads 2] [--batch 1 4] [--new 64] [--record benchmarks/RESULTS.md]
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

from common import add_llama_args, markdown_table, record, stream_read_bandwidth  # noqa: E402

IMAGE, BOI, EOI = 5, 3, 4


def build_model(args):
    from transformers import AutoConfig, Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(0)
    head = args.hidden // args.heads
    text = AutoConfig.for_model(
        "gemma3_text", hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=head, query_pre_attn_scalar=head, intermediate_size=args.intermediate,
        vocab_size=args.vocab, max_position_embeddings=4096, sliding_window=512, eos_token_id=None, pad_token_id=0)
    vision = SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=args.vision_layers,
                                num_attention_heads=12, image_size=224, patch_size=14)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                          mm_tokens_per_image=args.image_tokens, image_token_id=IMAGE, boi_token_id=BOI,
                          eoi_token_id=EOI)
    return Gemma3ForConditionalGeneration(config).to(torch.bfloat16).eval()


def prompts(args, batch: int):
    g = torch.Generator().manual_seed(batch)
    rows = []
    for _ in range(batch):
        words = torch.randint(8, args.vocab, (2 * args.text,), generator=g)
        rows.append(torch.cat([words[:args.text], torch.tensor([BOI] + [IMAGE] * args.image_tokens + [EOI]),
                               words[args.text:]]))
    ids = torch.stack(rows)
    pixels = torch.randn(batch, 3, 224, 224, generator=g).to(torch.bfloat16)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                token_type_ids=ids.eq(IMAGE).long())


def time_generate(model, inputs, new_tokens, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        best = min(best, time.perf_counter() - t)
        assert out.shape[1] == inputs["input_ids"].shape[1] + new_tokens
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--text", type=int, default=32, help="text tokens before and after the image")
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--vision-layers", type=int, default=12)
    p.add_argument("--image-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    add_llama_args(p)
    p.add_argument("--record", metavar="RESULTS_MD", help="append the table to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import lightning_dsinfer as dsi

    hf = build_model(args)
    length = 2 * args.text + args.image_tokens + 2
    ours = dsi.init_inference(copy.deepcopy(hf), dtype=torch.bfloat16, max_seq_len=length + args.new,
                              max_batch_size=max(args.batch))
    text = dsi.policies.text_model_of(hf)
    vision = sum(t.numel() for t in hf.parameters()) - sum(t.numel() for t in text.parameters())
    emb = text.get_input_embeddings().weight
    hf_bytes = sum(t.numel() * t.element_size() for t in text.parameters()) - emb.numel() * emb.element_size() \
        + (emb.shape[1] * emb.element_size() if text.get_output_embeddings().weight is not emb else 0)
    our_bytes = ours._dsinfer_engine.decoder.weight_bytes_per_token
    bw = stream_read_bandwidth()
    print(f"model: language model {sum(t.numel() for t in text.parameters()) / 1e6:.0f}M + vision {vision / 1e6:.0f}M "
          f"params bf16, {args.threads} threads, prompt {length} tokens ({args.image_tokens} of them an image), "
          f"{args.new} new; streaming read {bw / 1e9:.1f} GB/s")
    rows = []
    for b in args.batch:
        inputs = prompts(args, b)
        res = {}
        for name, model, nbytes in (("HF eager", hf, hf_bytes), ("dsinfer", ours, our_bytes)):
            time_generate(model, inputs, 2, 1)                               # warm-up
            t1 = time_generate(model, inputs, 1, args.repeats)
            tn = time_generate(model, inputs, args.new, args.repeats)
            steps_per_s = (args.new - 1) / (tn - t1)
            res[name] = dict(first=t1, decode=b * steps_per_s, util=nbytes * steps_per_s / bw)
        for name in res:
            r = res[name]
            rows.append([b, name, r["first"] * 1e3, r["decode"], r["util"], res["HF eager"]["first"] / r["first"],
                         r["decode"] / res["HF eager"]["decode"]])
        print(f"batch {b}: first token {res['HF eager']['first'] / res['dsinfer']['first']:.2f}x, decode "
              f"{res['dsinfer']['decode'] / res['HF eager']['decode']:.2f}x", flush=True)
    table = markdown_table(["batch", "impl", "first token ms", "decode tok/s", "bw util", "first-token speed-up",
                            "decode ratio"], rows)
    print(table)
    if args.record:
        record(args.record, f"vision.py: Gemma 3-style vision-language model ({sum(t.numel() for t in text.parameters()) / 1e6:.0f}M "
                            f"language model + {vision / 1e6:.0f}M SigLIP), bf16, {args.threads} threads, prompt "
                            f"{length} tokens with a {args.image_tokens}-token image, streaming read {bw / 1e9:.1f} GB/s",
                            table)


if __name__ == "__main__":
    main()
