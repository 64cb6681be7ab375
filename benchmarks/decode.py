"""Decode and prompt speed: Hugging Face ``generate`` vs lightning-dsinfer, side by side in one process.

Same model (a ~200M Llama config from_config, bf16), same prompts, same thread count. Prompt speed is
the time of a 1-token generate; decode speed is (time of N tokens - time of 1 token) / (N - 1) steps,
so it excludes the prompt. Bandwidth utilisation = weight bytes read per decode step x steps/s over a
streaming-read bandwidth measured in the same run. "dsinfer int8" is ``quantize="int8"`` (weight-only int8
block linears: its bytes per step are int8's), "dsinfer int4" ``quantize="int4"`` (group-wise, 128 inputs per
scale: a quarter of bf16's bytes plus the scales); their quality lines are the top-1 agreement of their prompt
logits with HF bf16's, and with HF's over the same fake-quantised weights.

    python benchmarks/decode.py                       # the issue's configuration
    python benchmarks/decode.py --record benchmarks/RESULTS.md
    python benchmarks/decode.py --experts 8 --top-k 2 --layers 6 --skip-int8   # a Mixtral of the same widths
    python benchmarks/decode.py --skip-int4                 # without the int4 rows

With ``--experts`` the model is a Mixtral (every MLP a sparse block of that many experts of ``--intermediate``);
its bytes per step count the router and the top-k experts of each layer (what one token reads), for HF too.
``--family gemma2`` builds a Gemma 2 of the same widths instead (GeGLU, norms around attention and MLP, soft-capped
scores and logits, every second layer sliding; tied embeddings, as Gemma's): its decode steps run through the one-call
C decode step too. ``--family gpt_neox`` / ``bloom``: the GPT families' blocks (LayerNorms with biases, a plain GeLU
MLP; GPT-NeoX's parallel residual and partial rotary, BLOOM's ALiBi: both through the one-call C step).
``--family deepseek_v2``: DeepSeek-V2-Lite's block at these widths (latent attention: kv_lora_rank 512, rotary 64,
nope 128, v 128, a plain q_proj; ``--experts`` routed experts (default 16) of a quarter of ``--intermediate``, top
``--top-k`` (default 4 here), two shared experts, a dense first layer); HF expands the cached latent into every head's
keys and values at each step, the engine's decode steps attend over the latent itself (its prompts take the expanded
form, as HF's). Bytes per step as for ``--experts``. ``--family qwen3_5``: Qwen3.5's hybrid blocks at these widths
(three of every four Gated DeltaNet linear attention with 128-wide key / value heads, H / 256 key and H / 128 value
heads, the fourth gated softmax attention; the delta rule runs in torch on both sides: transformers' reference
without flash-linear-attention, the engine's own). ``--family lfm2``: LFM2's blocks at these widths (gated short
convolutions, attention in every third block; the SwiGLU width transformers derives from 1.5 x ``--intermediate``).
``--family bamba``: Mamba-2 blocks (32 heads of 64, one group, state 128) with attention in every fourth block, the
SwiGLU of ``--intermediate`` (transformers' Mamba-2 runs its torch scan without mamba_ssm, the engine its own).
``--family nemotron_h``: Nemotron-H's layers ("M-M-M-M*-": Mamba-2 of 64-wide heads, 8 groups, state 128, each
followed by a ReLU² MLP of ``--intermediate``, every fourth also by a NoPE attention layer before its MLP), so the
engine runs a block without an MLP there. ``--family llama4``: Llama 4 Scout's text blocks at these widths (``--experts``
routed experts, default 16, of half ``--intermediate``, top-1 by sigmoid with the weight on the expert's input, and a
shared expert of the same width in every layer; chunked rotary attention with L2 q / k norms, every fourth layer NoPE
with temperature-tuned queries). transformers' Llama4TextMoe runs every expert on every token (a dense batched
product, zeros in for the experts not chosen), so its bytes per step are all the experts'; ours the router, the top
expert and the shared one. ``--family falcon_h1``: Falcon-H1's blocks at these widths (attention and Mamba-2 side by
side in every block: 64-wide Mamba-2 heads over 2 x ``--hidden`` channels, one group, state 128; the SwiGLU of
``--intermediate``; the 0.5B model's muP multipliers); the engine runs both input projections as one GEMM and both
output projections as another. ``--family mamba``: Mamba-1 blocks at these widths (2 x ``--hidden`` channels, state
16, dt rank ``--hidden`` / 16; no MLP, tied embeddings as Mamba's); transformers runs its torch recurrence without
mamba_ssm, the engine its own (torch ops, one token at a time in prompts too). ``--family gemma4``: Gemma 4 E2B's
layout at these widths (sliding layers of hidden / heads wide heads and every fifth layer full with twice as wide
ones, the last third reading earlier layers' K/V with double-wide MLPs, 256-wide per-layer inputs over the
vocabulary, tied embeddings); transformers' prompts skip the shared layers for all but the last token, as ours do.
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


FAMILY_NAMES = {"llama": "Llama", "gemma2": "Gemma 2", "gpt_neox": "GPT-NeoX (Pythia-style: parallel residual, "
                "rotary on a quarter of each head)", "bloom": "BLOOM (ALiBi)",
                "deepseek_v2": "DeepSeek-V2-Lite-style (latent attention, MoE)",
                "qwen3_5": "Qwen3.5-style (3 of 4 blocks Gated DeltaNet linear attention)",
                "lfm2": "LFM2-style (gated short convolutions, attention in every third block)",
                "bamba": "Bamba-style (Mamba-2 blocks, attention in every fourth block)",
                "nemotron_h": "Nemotron-H-style (Mamba-2 + ReLU² MLP layers, attention in every fourth pair)",
                "llama4": "Llama 4 Scout-style (chunked attention, NoPE every fourth layer, MoE)",
                "falcon_h1": "Falcon-H1-style (attention and Mamba-2 side by side in every block)",
                "mamba": "Mamba-1 (state-spaces Mamba blocks)",
                "gemma4": "Gemma 4 E2B-style (per-layer inputs, the last third reading earlier layers' K/V)"}


def build_model(args):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = llama_config(args)
    if getattr(args, "family", "llama") == "gemma2":
        from transformers import Gemma2Config

        cfg = Gemma2Config(**{k: getattr(cfg, k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size", "max_position_embeddings", "eos_token_id", "pad_token_id")},
            head_dim=args.hidden // args.heads, query_pre_attn_scalar=args.hidden // args.heads)
    if getattr(args, "family", "llama") in ("gpt_neox", "bloom"):   # LayerNorms, plain GeLU MLP of --intermediate
        from transformers import BloomConfig, GPTNeoXConfig

        common = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, vocab_size=args.vocab,
                      eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
        cfg = GPTNeoXConfig(**common, num_attention_heads=args.heads, intermediate_size=args.intermediate,
                            max_position_embeddings=4096, rotary_pct=0.25) if args.family == "gpt_neox" else \
            BloomConfig(**common, n_head=args.heads)       # (BLOOM's MLP is 4 x hidden)
    if getattr(args, "family", "llama") == "deepseek_v2":
        from transformers import DeepseekV2Config

        cfg = DeepseekV2Config(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                               num_key_value_heads=args.heads, intermediate_size=args.intermediate,
                               vocab_size=args.vocab, max_position_embeddings=4096, q_lora_rank=None,
                               kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                               n_routed_experts=args.experts or 16, num_experts_per_tok=args.top_k,
                               moe_intermediate_size=args.intermediate // 4, n_shared_experts=2,
                               first_k_dense_replace=1, tie_word_embeddings=False, eos_token_id=None, pad_token_id=0)
    elif getattr(args, "family", "llama") == "qwen3_5":
        from transformers import AutoConfig

        cfg = AutoConfig.for_model(
            "qwen3_5_text", hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads, intermediate_size=args.intermediate,
            vocab_size=args.vocab, max_position_embeddings=4096, linear_key_head_dim=128, linear_value_head_dim=128,
            linear_num_key_heads=max(1, args.hidden // 256), linear_num_value_heads=max(1, args.hidden // 128),
            tie_word_embeddings=False, eos_token_id=None, pad_token_id=0)
    elif getattr(args, "family", "llama") == "lfm2":
        from transformers import AutoConfig

        cfg = AutoConfig.for_model(
            "lfm2", hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate * 3 // 2, vocab_size=args.vocab,
            max_position_embeddings=4096, layer_types=["full_attention" if i % 3 == 2 else "conv"
                                                      for i in range(args.layers)],
            tie_word_embeddings=False, eos_token_id=None, pad_token_id=0)
    elif getattr(args, "family", "llama") == "bamba":
        from transformers import AutoConfig

        cfg = AutoConfig.for_model(
            "bamba", hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate, vocab_size=args.vocab,
            max_position_embeddings=4096, attn_layer_indices=list(range(3, args.layers, 4)), mamba_n_heads=32,
            mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128, mamba_expand=2, mamba_chunk_size=64,
            tie_word_embeddings=False, eos_token_id=None, pad_token_id=0)
    elif getattr(args, "family", "llama") == "nemotron_h":
        from transformers import AutoConfig

        layers = [t for i in range(args.layers) for t in (["linear_attention", "full_attention", "mlp"]
                                                          if i % 4 == 3 else ["linear_attention", "mlp"])]
        cfg = AutoConfig.for_model(
            "nemotron_h", hidden_size=args.hidden, layers_block_type=layers, num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads, intermediate_size=args.intermediate,
            vocab_size=args.vocab, max_position_embeddings=4096, mamba_num_heads=2 * args.hidden // 64,
            mamba_head_dim=64, n_groups=8, ssm_state_size=128, chunk_size=64, tie_word_embeddings=False,
            eos_token_id=None, pad_token_id=0)
    elif getattr(args, "family", "llama") == "llama4":
        from transformers import AutoConfig

        cfg = AutoConfig.for_model(
            "llama4_text", hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
            intermediate_size=args.intermediate // 2, intermediate_size_mlp=args.intermediate, vocab_size=args.vocab,
            max_position_embeddings=4096, num_local_experts=args.experts or 16, num_experts_per_tok=args.top_k,
            interleave_moe_layer_step=1, attention_chunk_size=8192, tie_word_embeddings=False, eos_token_id=None,
            pad_token_id=0)
    elif getattr(args, "family", "llama") == "falcon_h1":
        from transformers import AutoConfig

        cfg = AutoConfig.for_model(
            "falcon_h1", hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads, intermediate_size=args.intermediate,
            vocab_size=args.vocab, max_position_embeddings=4096, mamba_d_ssm=2 * args.hidden,
            mamba_n_heads=2 * args.hidden // 64, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128,
            mamba_chunk_size=128, embedding_multiplier=5.66, lm_head_multiplier=0.039, key_multiplier=0.39,
            attention_in_multiplier=1.0, attention_out_multiplier=0.94, ssm_in_multiplier=1.25,
            ssm_out_multiplier=0.24, ssm_multipliers=[0.35, 0.25, 0.18, 0.18, 0.6], mlp_multipliers=[0.88, 0.59],
            tie_word_embeddings=False, eos_token_id=None, pad_token_id=0)
    elif getattr(args, "family", "llama") == "mamba":
        from transformers import MambaConfig

        cfg = MambaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=2 * args.hidden,
                          vocab_size=args.vocab, state_size=16, time_step_rank=args.hidden // 16, eos_token_id=None,
                          pad_token_id=0)
    elif getattr(args, "family", "llama") == "gemma4":
        from transformers import AutoConfig

        d = args.hidden // args.heads
        cfg = AutoConfig.for_model(
            "gemma4_text", hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads, head_dim=d, global_head_dim=2 * d, intermediate_size=args.intermediate,
            vocab_size=args.vocab, max_position_embeddings=4096, sliding_window=512,
            layer_types=["full_attention" if i % 5 == 4 or i == args.layers - 1 else "sliding_attention"
                         for i in range(args.layers)],
            hidden_size_per_layer_input=256, vocab_size_per_layer_input=args.vocab,
            num_kv_shared_layers=args.layers // 3, use_double_wide_mlp=True, final_logit_softcapping=30.0,
            eos_token_id=None, pad_token_id=0)
    elif getattr(args, "experts", 0):      # (the other benchmarks build the dense Llama through here too)
        from transformers import MixtralConfig

        cfg = MixtralConfig(**{k: getattr(cfg, k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size", "max_position_embeddings", "tie_word_embeddings", "eos_token_id", "pad_token_id")},
            num_local_experts=args.experts, num_experts_per_tok=args.top_k)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
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
    """Weight bytes HF reads per decode step: every parameter except the embedding tables (one row of each: Gemma 4's
    per-layer table too)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    tables = [model.get_input_embeddings().weight]
    per_layer = getattr(getattr(model, "model", None), "embed_tokens_per_layer", None)
    if per_layer is not None:
        tables.append(per_layer.weight)
    return total - sum((t.numel() - t.shape[1]) * t.element_size() for t in tables)


def quantized_quality(hf, opt, args, mode: str = "int8") -> str:
    """Top-1 agreement over 4 prompts' positions: the quantised engine vs HF bf16, HF bf16 over the fake-quantised
    weights vs HF bf16 (what quantisation alone costs), and the engine vs that fake-quantised HF (what is left: float
    rounding)."""
    from lightning_dsinfer.kernels import reference

    def fake(w):
        if mode == "int8":
            return reference.dequantize_int8(*reference.quantize_int8_per_channel(w))
        return reference.dequantize_int4(*reference.quantize_int4_groupwise(w, 128), 128)

    fake_hf = copy.deepcopy(hf)
    with torch.no_grad():
        for layer in fake_hf.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.copy_(fake(lin.weight).bfloat16())
    ids = torch.randint(3, args.vocab, (4, args.prompt), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        top = [m(input_ids=ids).logits.argmax(-1) for m in (hf, opt, fake_hf)]
    agree = [(top[0] == t).float().mean().item() for t in top[1:]] + [(top[1] == top[2]).float().mean().item()]
    return (f"{mode} quality: top-1 of its prompt logits agrees with HF bf16 at {agree[0]:.1%} of {ids.numel()} "
            f"positions (HF bf16 over the same quantised weights: {agree[1]:.1%}, and with ours at {agree[2]:.1%}; a "
            f"random from_config model has near-flat logits, so this is a lower bound for a trained one)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    add_llama_args(p)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-int8", action="store_true", help="no quantize='int8' rows")
    p.add_argument("--skip-int4", action="store_true", help="no quantize='int4' rows")
    p.add_argument("--experts", type=int, default=0, help="a Mixtral with this many experts per layer (0: Llama)")
    p.add_argument("--top-k", type=int, default=None,
                   help="experts per token (--experts: default 2; deepseek_v2: 4; llama4: 1)")
    p.add_argument("--family", choices=list(FAMILY_NAMES), default="llama")
    p.add_argument("--record", metavar="RESULTS_MD", help="append the table to this file")
    args = p.parse_args()
    if args.top_k is None:
        args.top_k = {"deepseek_v2": 4, "llama4": 1}.get(args.family, 2)
    torch.set_num_threads(args.threads)

    import lightning_dsinfer as dsi

    hf = build_model(args)
    n_params = sum(p.numel() for p in hf.parameters())
    ours = dsi.init_inference(copy.deepcopy(hf), dtype=torch.bfloat16, max_seq_len=args.prompt + args.new,
                              max_batch_size=max(args.batch))
    our_bytes = ours._dsinfer_engine.decoder.weight_bytes_per_token
    moe = args.experts or args.family in ("deepseek_v2", "llama4")
    # MoE: the same router + top-k experts (Llama 4: transformers runs every expert)
    hf_bytes = our_bytes if moe and args.family != "llama4" else hf_decode_bytes(hf)
    impls = [("HF eager", hf, hf_bytes), ("dsinfer", ours, our_bytes)]
    quality = []
    modes = [m for m, skip in (("int8", args.skip_int8 or args.experts), ("int4", args.skip_int4 or moe)) if not skip]
    for mode in modes:                  # (MoE models take no int4 yet; the Mixtral rows have no int8 either)
        q = dsi.init_inference(copy.deepcopy(hf), dtype=torch.bfloat16, max_seq_len=args.prompt + args.new,
                               max_batch_size=max(args.batch), quantize=mode)
        impls.append((f"dsinfer {mode}", q, q._dsinfer_engine.decoder.weight_bytes_per_token))
        if args.family in ("llama", "gemma2"):      # (the quality line fake-quantises Llama's module names)
            quality.append(quantized_quality(hf, q, args, mode))
    bw = stream_read_bandwidth()
    print(f"model: {n_params / 1e6:.0f}M params bf16, {args.threads} threads, prompt {args.prompt}, {args.new} new "
          f"tokens; streaming read {bw / 1e9:.1f} GB/s")

    rows = []
    for b in args.batch:
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(3, args.vocab, (b, args.prompt), generator=g)
        res = {}
        for name, model, nbytes in impls:
            time_generate(model, ids, 2, 1)                                  # warm-up
            t1 = time_generate(model, ids, 1, args.repeats)
            tn = time_generate(model, ids, args.new, args.repeats)
            steps_per_s = (args.new - 1) / (tn - t1)
            res[name] = dict(prompt=b * args.prompt / t1, decode=b * steps_per_s, util=nbytes * steps_per_s / bw)
        for name, _, _ in impls:
            r = res[name]
            rows.append([b, name, r["prompt"], r["decode"], r["util"],
                         r["prompt"] / res["HF eager"]["prompt"], r["decode"] / res["HF eager"]["decode"]])
        print(f"batch {b}: decode {res['dsinfer']['decode'] / res['HF eager']['decode']:.2f}x, "
              f"prompt {res['dsinfer']['prompt'] / res['HF eager']['prompt']:.2f}x", flush=True)
    table = markdown_table(["batch", "impl", "prompt tok/s", "decode tok/s", "bw util", "prompt ratio",
                            "decode ratio"], rows)
    print(table)
    quality = "\n".join(quality)
    if quality:
        print(quality)
    if args.record:
        kind = f"Mixtral ({args.experts} experts, top {args.top_k})" if args.experts and args.family == "llama" else \
            FAMILY_NAMES[args.family] + (f" ({args.experts or 16} experts, top {args.top_k})" if moe else "")
        record(args.record, f"decode.py: {n_params / 1e6:.0f}M {kind} bf16, {args.threads} threads, "
                            f"streaming read {bw / 1e9:.1f} GB/s",
                            table + (f"\n\n{quality.replace(chr(10), chr(10) * 2)}" if quality else ""))


if __name__ == "__main__":
    main()
