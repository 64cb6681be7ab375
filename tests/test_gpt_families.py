"""The GPT families on the fused engine (policies/gpt.py), against the unmodified HF model (tiny random configs with
random LayerNorm weights and biases, tests/helpers.py): GPT-NeoX (parallel residual, per-head packed QKV, partial
rotary), OPT (learned positions at offset 2, numbered by the mask, ReLU), StableLM (SwiGLU under LayerNorms, q/k/v
biases, partial rotary, GQA), BLOOM (ALiBi, the embeddings' LayerNorm, per-head packed QKV), Phi (one shared norm,
parallel residual, lm_head bias), StarCoder2 (GQA, sliding window, biases), GPT-J (interleaved rotary reordered to
rotate-half, lm_head bias), GPT-2 (Conv1D weights, q|k|v columns, learned positions), Falcon (KV groups), Cohere
(LayerNorms without a bias, interleaved rotary, SwiGLU, parallel residual, scaled logits), Cohere 2 (the same with a
rotating sliding-window layer and a NoPE full one), GPT-BigCode (StarCoder: multi-query q | k | v rows, learned
positions), OLMo (Llama's blocks under LayerNorms without a weight or a bias), Nemotron (LayerNorm1P, ReLU squared,
partial rotary, head_dim != hidden / heads), Cohere 2 MoE (Cohere 2's blocks: a dense layer that rotates, a sparse NoPE
full layer, a sparse sliding one; top-2 of 4 experts + a shared expert, averaged), MPT (ALiBi with the slopes of HF's
table, q | k | v rows of Wqkv, bias-free LayerNorms), CodeGen (GPT-J's block, q, v, k packed in 4 groups of heads),
Jais 2 (ReLU squared, GQA, biases; OLMo's, Nemotron's and its linear biases random), DBRX (clip_qkv, GQA in Wqkv,
a top-2 MoE of 4 w1 / v1 / w2 experts), Phi-3.5-MoE (the sparsemixer router at a threshold of 0.3, GQA with biases, a
window, lm_head bias), Persimmon (q / k LayerNorms per head, GPT-NeoX's packed QKV, ReLU squared); OLMo and MPT with
clip_qkv.
fp32 logits atol 2e-4 / rtol
1e-4 on a left-padded batch, greedy tokens identical; Falcon in its three block forms (KV groups with two norms,
one KV head with one shared norm, sequential); bf16, int8, offload, tensor and pipeline parallelism, a
checkpoint on meta. Through the Triton kernels: tests/kernels/test_engine_triton_path.py."""

import pytest
import torch
from transformers.models.dbrx.configuration_dbrx import DbrxFFNConfig
from transformers.models.mpt.configuration_mpt import MptAttentionConfig

import lightning_dsinfer as dsi
from helpers import GPT_FAMILIES, fake_quantised_int8, optimised_copy, padded_batch, streamed_copy, tiny_model

FAMILIES = list(GPT_FAMILIES)
ATOL, RTOL = 2e-4, 1e-4
# bf16 for the MoE ones: every expert routed, so that no near tie in HF's choice flips under bf16 rounding. Phi-3.5-MoE
# always routes two, and its sparsemixer's threshold is a second cliff: its bf16 run takes the model's own threshold
# (0.01: nearly every other logit far outside it; fp32 tests 0.3, where the softmaxes span several logits), on inputs
# where no choice flips (at 0.3, or with the threshold out of reach, a token of HF's continuation flips an expert
# between HF bf16 and ours, and between HF bf16 and HF fp32)
ALL_ROUTED = {"cohere2_moe": dict(num_experts_per_tok=4), "phimoe": dict(router_jitter_noise=0.01),
              "dbrx": dict(ffn_config=DbrxFFNConfig(hidden_size=64, ffn_hidden_size=32, moe_num_experts=4,
                                                    moe_top_k=4))}


def _compare(ref, opt, seed=1, new=10, lengths=(12, 5, 9, 3)):
    """(valid, HF logits, ours, HF greedy tokens, ours) on a left-padded batch."""
    ids, mask = padded_batch(list(lengths), seed=seed)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        tokens = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    got = opt(input_ids=ids, attention_mask=mask).logits
    ours = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    return mask.bool(), want, got, tokens, ours


def _assert_same(ref, opt, **kw):
    valid, want, got, tokens, ours = _compare(ref, opt, **kw)
    torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=RTOL)
    assert torch.equal(ours, tokens)


# each family's other block forms: GPT-NeoX / StableLM with and without the parallel residual; Falcon-7B (one KV head,
# q | k | v rows, one shared norm), the sequential Falcon (per-head q, k, v rows), Falcon-40B with one shared norm
# (the default test config is Falcon-40B / 180B's: KV heads in groups, ln_attn and ln_mlp)
VARIANTS = {**{f: (f, {}) for f in FAMILIES},
            "gpt_neox-sequential": ("gpt_neox", {"use_parallel_residual": False}),
            "stablelm-parallel": ("stablelm", {"use_parallel_residual": True}),
            "falcon-7b": ("falcon", {"new_decoder_architecture": False, "multi_query": True, "parallel_attn": True}),
            "falcon-sequential": ("falcon", {"new_decoder_architecture": False, "multi_query": False,
                                             "parallel_attn": False, "num_kv_heads": 4}),
            "falcon-one-norm": ("falcon", {"num_ln_in_parallel_attn": 1, "bias": False}),
            "gpt_bigcode-multi-head": ("gpt_bigcode", {"multi_query": False}),
            # q, k and v clamped after the projection (most of the tiny models' q / k / v lie outside +-0.5)
            "olmo-clip_qkv": ("olmo", {"clip_qkv": 0.5}),
            "mpt-clip_qkv": ("mpt", {"attn_config": MptAttentionConfig(clip_qkv=0.5, softmax_scale=0.2)})}


@pytest.mark.parametrize("family,overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_gpt_family_matches_hf(family, overrides):
    hf = tiny_model(family, **overrides)
    opt = optimised_copy(hf, max_seq_len=64)
    layer = opt._dsinfer_engine.decoder.layers[0]
    assert type(layer).__name__ == "GPTDecoderLayer" and layer.input_bias is not None
    _assert_same(hf, opt)
    ids, mask = padded_batch([6, 9], seed=2)       # beam search through HF's loop, over the engine's forward
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    with torch.no_grad():
        assert torch.equal(opt.generate(**kw), hf.generate(**kw))


def test_positions_and_alibi_reach_the_blocks():
    """What makes each family's positions: learned tables (OPT at offset 2, GPT-2 at 0), ALiBi slopes (BLOOM, as
    transformers computes them), rotary (the rest; Cohere 2's full-attention layers none); a plain forward without a mask numbers OPT's tokens as HF does."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    for family, table, offset in (("opt", "model.decoder.embed_positions.weight", 2), ("gpt2", "transformer.wpe.weight", 0)):
        hf = tiny_model(family)
        decoder = optimised_copy(hf, max_seq_len=64)._dsinfer_engine.decoder
        assert decoder.pos_offset == offset and torch.equal(decoder.pos_embed, dict(hf.named_parameters())[table])
        assert not decoder.layers[0].attn.rotary
    cohere2 = optimised_copy(tiny_model("cohere2"), max_seq_len=64)._dsinfer_engine.decoder   # Command R7B: the sliding
    assert [(ly.attn.rotary, ly.attn.sliding) for ly in cohere2.layers] == [(True, True), (False, False)]  # layer rotates
    persimmon = optimised_copy(tiny_model("persimmon"), max_seq_len=64)._dsinfer_engine.decoder   # (q / k LayerNorms
    assert {type(ly.attn).__name__ for ly in persimmon.layers} == {"HeadLayerNormAttention"}        # per head)
    moe = optimised_copy(tiny_model("cohere2_moe"), max_seq_len=64)._dsinfer_engine.decoder   # Cohere 2 MoE: the dense
    assert [(ly.attn.rotary, ly.attn.sliding, type(ly.mlp).__name__) for ly in moe.layers] == [   # full layer rotates
        (True, False, "GatedMLP"), (False, False, "MoEMLP"), (True, True, "MoEMLP")]
    bloom = optimised_copy(tiny_model("bloom"), max_seq_len=64)._dsinfer_engine.decoder
    slopes = build_alibi_tensor(torch.ones(1, 3), 4, torch.float32).view(4, 3)[:, 2] / 2
    torch.testing.assert_close(bloom.layers[0].attn.alibi, slopes)
    hf = tiny_model("mpt", attn_config=MptAttentionConfig(alibi_bias_max=16))   # MPT: the slopes of HF's own table
    table = hf.transformer.build_mpt_alibi_tensor(6, 3)          # (which ignores alibi_bias_max: so does the engine)
    mpt = optimised_copy(hf, max_seq_len=64)._dsinfer_engine.decoder
    torch.testing.assert_close(mpt.layers[0].attn.alibi, (table[:, 0, 2] - table[:, 0, 1]).float())
    ids = torch.randint(3, 97, (2, 7))
    for family in FAMILIES:                  # no mask: every token visible, positions 0..T-1
        hf = tiny_model(family)
        opt = optimised_copy(hf, max_seq_len=64)
        with torch.no_grad():
            torch.testing.assert_close(opt(input_ids=ids).logits, hf(input_ids=ids).logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_gpt_family_bf16(family):
    """bf16: the prompt's logits and the logits of HF's own greedy continuation (teacher-forced, so every decode-shaped
    position is compared whatever near ties do to the tokens) within the bf16 tolerance of HF's."""
    hf = tiny_model(family, **ALL_ROUTED.get(family, {})).to(torch.bfloat16)
    opt = optimised_copy(hf, max_seq_len=64, dtype=torch.bfloat16)
    ids, mask = padded_batch([12, 5, 9], seed=1)
    full = torch.cat([mask, torch.ones(3, 6, dtype=mask.dtype)], dim=1)
    pos = (full.cumsum(-1) - 1).masked_fill(full == 0, 1)    # generate's positions (learned tables see them)
    with torch.no_grad():
        seq = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        want = hf(input_ids=seq, attention_mask=full, position_ids=pos).logits.float()
    got = opt(input_ids=seq, attention_mask=full, position_ids=pos).logits.float()
    torch.testing.assert_close(got[full.bool()], want[full.bool()], atol=6e-2, rtol=2e-2)
    # decode steps on the engine's own cache: its tokens' logits against HF's full forward of those tokens
    out = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_scores=True,
                       return_dict_in_generate=True)
    with torch.no_grad():
        again = hf(input_ids=out.sequences, attention_mask=full, position_ids=pos).logits.float()
    steps = torch.stack(out.scores, dim=1).float()                     # [B, 6, V]: positions 11..16 predict 12..17
    torch.testing.assert_close(steps, again[:, -7:-1], atol=6e-2, rtol=2e-2)


def test_cohere2_moe_sigmoid_routing_and_summed_shared_expert():
    """Cohere 2 MoE's other router and combination: the top-k logits' sigmoids (not renormalised) and the shared
    expert summed in rather than averaged; also without a shared expert. Logits and greedy tokens as HF's."""
    sigmoid = dict(expert_selection_fn="sigmoid", norm_topk_prob=False, shared_expert_combination_strategy="sum")
    for overrides in (sigmoid, dict(num_shared_experts=0)):
        hf = tiny_model("cohere2_moe", **overrides)
        _assert_same(hf, optimised_copy(hf, max_seq_len=64), new=4, lengths=(9, 4))


@pytest.mark.parametrize("family", ["gpt_neox", "bloom", "gpt2", "gptj", "cohere"])
def test_gpt_family_int8_matches_fake_quantised_hf(family):
    hf = tiny_model(family)
    opt = optimised_copy(hf, max_seq_len=64, quantize="int8")
    _assert_same(fake_quantised_int8(hf), opt)


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
@pytest.mark.parametrize("family", ["gpt_neox", "opt", "bloom"])
def test_gpt_family_offload_matches_hf(family, tier, tmp_path):
    """Streamed in block halves under a budget that streams most units: the attention half holds both LayerNorms
    (the parallel residual's MLP input is normed there), the first stage's position table and embedding norm stay
    resident."""
    hf = tiny_model(family)
    _assert_same(hf, streamed_copy(hf, tier, tmp_path))


def test_gpt_families_from_checkpoint_on_meta(tmp_path):
    """From what save_pretrained writes (GPT-NeoX's lm_head saved as embed_out, GPT-2's Conv1D [in, out], tied
    embeddings), each slice read straight from the files; and, as the hub's GPT-2, BLOOM and OPT files are, saved from
    the base model without its prefix (``h.0...`` for ``transformer.h.0...``), which transformers adds on load."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    for family in FAMILIES + ["gpt2-prefixless", "bloom-prefixless", "opt-prefixless"]:
        hf = tiny_model(family.split("-")[0])
        hf.save_pretrained(tmp_path / family)
        if family.endswith("prefixless"):
            path, prefix = tmp_path / family / "model.safetensors", hf.base_model_prefix + "."
            tensors = load_file(path)
            save_file({k.removeprefix(prefix): v for k, v in tensors.items()}, path, metadata={"format": "pt"})
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(hf.config)
        opt = dsi.init_inference(meta, checkpoint=str(tmp_path / family), max_seq_len=64, dtype=torch.float32)
        _assert_same(hf, opt, new=6)


TP = ["gpt_neox", "bloom", "gpt2", "starcoder2", "opt", "gptj", "falcon", "cohere", "gpt_bigcode", "olmo", "codegen"]
PP = ["gpt_neox", "bloom", "opt", "phi"]


def worker_runs(tmp, selected):
    """The TP=2 and PP=2 runs, in the session's shared launch of two ranks (tests/conftest.py ``shared_runs``)."""
    return {2: {"test_gpt_families_tensor_and_pipeline_parallel/tp": ["tp_worker.py", "--tp", "2", "--families", *TP],
                "test_gpt_families_tensor_and_pipeline_parallel/pp": ["pp_worker.py", "--pp", "2", "--families", *PP]}}


def test_gpt_families_tensor_and_pipeline_parallel(shared_runs):
    """TP=2: per-head packed QKV sliced by heads (GPT-NeoX, BLOOM with its slopes), q|k|v columns (GPT-2), GQA
    (StarCoder2), KV groups (Falcon), learned positions (OPT), the reordered rotary rows (GPT-J; CodeGen's within its
    4 groups of q, v, k), weightless LayerNorms (OLMo); PP=2 across some. Logits, greedy,
    beam search as HF's, sampling agrees across ranks."""
    outs = shared_runs.outputs(2, "test_gpt_families_tensor_and_pipeline_parallel/tp")
    assert outs[0].count(" OK") == len(TP), outs[0]
    outs = shared_runs.outputs(2, "test_gpt_families_tensor_and_pipeline_parallel/pp")
    assert all(out.count(" OK") == len(PP) for out in outs), outs


@pytest.mark.parametrize("family,flag,match", [
    ("phi", {"qk_layernorm": True}, "qk_layernorm=True"),
    ("stablelm", {"qk_layernorm": True}, "qk_layernorm=True"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
    ("bloom", {"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm=True"),
    ("opt", {"do_layer_norm_before": False}, "do_layer_norm_before=False"),
    ("gpt_neox", {"hidden_act": "mish"}, "hidden_act='mish' is not supported"),
    ("falcon", {"alibi": True}, "alibi=True"),
    ("cohere", {"use_qk_norm": True}, "use_qk_norm=True"),
    ("cohere2_moe", {"rms_norm_eps": 1e-5}, "rms_norm_eps=1e-05"),
    ("dbrx", {"ffn_config": DbrxFFNConfig(hidden_size=64, ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2,
                                          moe_normalize_expert_weights=2.0)}, "moe_normalize_expert_weights=2.0"),
    ("codegen", {"rotary_dim": 0}, "codegen without rotary_dim"),
    ("cohere2_moe", {"expert_selection_fn": "sigmoid"}, "expert_selection_fn='sigmoid' and norm_topk_prob=True"),
])
def test_unsupported_settings_are_refused(family, flag, match):
    with pytest.raises(dsi.UnsupportedModelError, match=match):
        dsi.init_inference(tiny_model(family, **flag))


def test_bad_input_is_refused_before_work():
    """A cache longer than a learned position table; a mask BLOOM's ALiBi cannot take (zeros between ones; right
    padding for generate), while left padding and a mask-less forward run."""
    with pytest.raises(ValueError, match=r"max_seq_len=300 exceeds the 256 positions of gpt2's learned position table"):
        dsi.init_inference(tiny_model("gpt2"), max_seq_len=300)
    with pytest.raises(ValueError, match=r"max_seq_len=300 exceeds the 256 positions of opt's"):
        dsi.init_inference(tiny_model("opt"), max_seq_len=300)
    with pytest.raises(ValueError, match=r"max_seq_len=300 exceeds mpt's max_seq_len=256"):
        dsi.init_inference(tiny_model("mpt"), max_seq_len=300)
    with pytest.raises(dsi.UnsupportedModelError, match="_remove_final_layer_norm=True"):
        dsi.init_inference(tiny_model("opt", _remove_final_layer_norm=True))
    bloom = optimised_copy(tiny_model("bloom"), max_seq_len=64)
    ids = torch.randint(3, 97, (2, 10))
    hole = torch.ones(2, 10, dtype=torch.long)
    hole[0, 4] = 0
    with pytest.raises(ValueError, match="ALiBi positions follow the attention mask.*zeros between ones"):
        bloom(input_ids=ids, attention_mask=hole)
    right = torch.ones(2, 10, dtype=torch.long)
    right[1, 7:] = 0
    with pytest.raises(ValueError, match="left padding"):
        bloom.generate(input_ids=ids, attention_mask=right, max_new_tokens=3)
    bloom(input_ids=ids, attention_mask=right)              # a forward with right padding: one run per row, fine
