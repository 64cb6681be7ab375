"""Llama 4's text model (llama4_text; policies/llama4.py) against the unmodified HF model: tiny random configs of four
layers (chunked rotary attention in chunks of 8 with L2 q / k norms after the rotation, a NoPE layer whose queries are
temperature-tuned by cache column with scales that change within the tests' lengths, dense SwiGLU layers 48 wide and
sparse layers of 4 experts chosen top-1 by sigmoid whose inputs are scaled by the router's weight, plus a shared
expert; "_top2": two experts per token and q / k / v / o biases).

fp32 prompt logits on a left-padded batch (rows padded by different amounts, so each row's chunks start elsewhere) atol
2e-4 / rtol 1e-4, greedy tokens identical to HF's generate over 12 + 10 tokens (past the chunk boundaries), every
decode step's logits against HF's own one-token steps through its cache (chunked layers there keep their last window),
beam search through HF's loop, a cache the caller builds, bf16, int8 / int4, both offload tiers, a checkpoint on
meta, TP=2 (experts sliced), PP=2, CUDA graphs' fixed-shape step (emulated), refusals. That
the tiny config exercises each feature is checked on HF itself (its logits move when the feature is off)."""

import pytest
import torch

import lightning_dsinfer as dsi
from helpers import (assert_cache_the_caller_builds, assert_steps_match_hf, fake_quantised_int4, fake_quantised_int8,
                     optimised_copy, optimised_from_checkpoint, padded_batch, streamed_copy, tiny_model)
from multiproc import run_ranks

ATOL, RTOL = 2e-4, 1e-4
FAMILIES = ["llama4", "llama4_top2"]


def _assert_same(hf, opt, lengths=(12, 5, 9, 3), new=10, atol=ATOL, rtol=RTOL):
    assert_steps_match_hf(hf, opt, lengths, new, atol, rtol)


@pytest.mark.parametrize("family", FAMILIES)
def test_llama4_matches_hf(family):
    hf = tiny_model(family)
    opt = optimised_copy(hf, max_seq_len=64)
    engine = opt._dsinfer_engine
    assert [(type(ly.attn).__name__, type(ly.mlp).__name__) for ly in engine.decoder.layers] == [
        ("RotaryFirstAttention", "GatedMLP"), ("RotaryFirstAttention", "MoEMLP"),
        ("TemperatureTunedAttention", "GatedMLP"), ("RotaryFirstAttention", "MoEMLP")]
    assert engine.attention_chunk == 8 and [ly.attn.sliding for ly in engine.decoder.layers] == [True, True, False, True]
    assert engine.decoder.layers[0].mlp.down.in_features == 48 and engine.decoder.layers[1].mlp.top_k == (
        2 if family.endswith("top2") else 1)
    _assert_same(hf, opt)
    ids, mask = padded_batch([10, 6], seed=2)       # beam search through HF's loop (K/V reordered with the beams)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    with torch.no_grad():
        assert torch.equal(opt.generate(**kw), hf.generate(**kw))


@pytest.mark.parametrize("setting", [dict(layer_types=["full_attention"] * 4), dict(attn_temperature_tuning=False),
                                     dict(use_qk_norm=False), dict(no_rope_layers=[1, 1, 1, 1])])
def test_the_tiny_config_exercises_each_feature(setting):
    """HF's own logits over 22 tokens move by far more than the tolerance when the feature is off, so an engine
    without it fails test_llama4_matches_hf (the router's input scaling: test_moe_weights_scale_the_inputs)."""
    ids, mask = padded_batch([22, 15], seed=1)
    with torch.no_grad():
        want = tiny_model("llama4")(input_ids=ids, attention_mask=mask).logits
        other = tiny_model("llama4", **setting)(input_ids=ids, attention_mask=mask).logits
    assert (want - other)[mask.bool()].abs().max() > 1e-2


def test_moe_weights_scale_the_inputs():
    """The reference's input-scaled experts equal HF's Llama4TextMoe (without its shared expert) and differ from
    output scaling by far more than the tolerance."""
    from lightning_dsinfer.kernels import reference

    hf = tiny_model("llama4_top2")
    moe = hf.model.layers[1].feed_forward
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = moe(x)[0] - moe.shared_expert(x)
    gate_up, down = moe.experts.gate_up_proj.transpose(1, 2), moe.experts.down_proj.transpose(1, 2)
    routing = reference.Routing(scoring="topk_sigmoid", input_scaled=True)
    got = reference.moe_mlp(x, moe.router.weight, gate_up, down, 2, routing=routing)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    out_scaled = reference.moe_mlp(x, moe.router.weight, gate_up, down, 2,
                                   routing=reference.Routing(scoring="topk_sigmoid"))
    assert (out_scaled - want).abs().max() > 1e-2


def test_a_cache_the_caller_builds():
    """DynamicCache(config=model.config): its chunked layers (transformers' keep the last window only) are made whole
    layers while empty; a prompt and steps past the chunk give HF's logits. A cache whose window already dropped K/V
    is refused."""
    hf = tiny_model("llama4")
    opt = optimised_copy(hf, max_seq_len=64)
    _, theirs = assert_cache_the_caller_builds(hf, opt, lengths=(9, 4), calls=5)
    with pytest.raises(ValueError, match="sliding-window layer"):     # (HF's own cache, past its window)
        opt(input_ids=torch.ones(2, 1, dtype=torch.long), cache=theirs, use_cache=True)


def test_llama4_bf16():
    """(Every expert routed, top-k = 4: no near tie in HF's choice flips under bf16 rounding.)"""
    hf = tiny_model("llama4_top2", num_experts_per_tok=4).to(torch.bfloat16)
    _assert_same(hf, optimised_copy(hf, max_seq_len=64, dtype=torch.bfloat16), lengths=(12, 5, 9), new=6,
                 atol=6e-2, rtol=2e-2)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_llama4_quantised(quantize):
    """q / k / v / o, the dense MLPs, each expert's gate|up and down and the shared expert's, int8 / int4 (groups of
    16), against HF over the same quantise-dequantised weights (the router as it is)."""
    hf = tiny_model("llama4")
    ref = fake_quantised_int8(hf) if quantize == "int8" else fake_quantised_int4(hf, 16)
    _assert_same(ref, optimised_copy(hf, max_seq_len=64, quantize=quantize, quantize_group_size=16))


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
def test_llama4_offload_matches_hf(tier, tmp_path):
    """(The disk tier reads the routed experts on demand, their inputs scaled.)"""
    hf = tiny_model("llama4_top2")
    opt = streamed_copy(hf, tier, tmp_path)
    assert (opt._dsinfer_engine.decoder.experts is not None) == (tier == "nvme")
    _assert_same(hf, opt)


def test_llama4_from_checkpoint_on_meta(tmp_path):
    """What save_pretrained writes: the experts stored [E, H, 2I] / [E, I, H], read transposed."""
    hf = tiny_model("llama4")
    _assert_same(hf, optimised_from_checkpoint(hf, tmp_path), new=6)


def test_llama4_from_a_multimodal_checkpoint(tmp_path):
    """The released Llama 4 checkpoints are Llama4ForConditionalGeneration's: the text model's tensors under
    ``language_model.`` (and a vision tower's, unread). Its text config built on meta loads from such files."""
    from safetensors.torch import load_file, save_file
    from transformers import Llama4ForCausalLM

    hf = tiny_model("llama4")
    hf.save_pretrained(tmp_path / "text")
    tensors = load_file(str(tmp_path / "text" / "model.safetensors"))
    (tmp_path / "mm").mkdir()
    save_file({**{f"language_model.{k}": v for k, v in tensors.items()},
               "vision_model.patch_embedding.linear.weight": torch.zeros(4, 4)},
              str(tmp_path / "mm" / "model.safetensors"), metadata={"format": "pt"})
    with torch.device("meta"):
        meta = Llama4ForCausalLM(hf.config)
    opt = dsi.init_inference(meta, checkpoint=str(tmp_path / "mm"), max_seq_len=64, dtype=torch.float32)
    _assert_same(hf, opt, new=4)


def test_llama4_tensor_and_pipeline_parallel():
    """TP=2 (heads, MLP rows, each expert's and the shared expert's intermediate sliced: the transposed experts read
    by columns) and PP=2 (the chunked masks per stage), through tests/tp_worker.py and tests/pp_worker.py: prompt
    logits, greedy, beam search. (Expert parallelism runs every family's experts through the same moe_experts.)"""
    codes, outs, _ = run_ranks("tp_worker.py", 2, ["--tp", "2", "--families", "llama4_top2"], timeout=300)
    assert codes == [0, 0], "\n".join(outs)
    assert outs[0].count(" OK") == 1, outs[0]
    codes, outs, _ = run_ranks("pp_worker.py", 2, ["--pp", "2", "--families", "llama4"], timeout=300)
    assert codes == [0, 0], "\n".join(outs)
    assert all(out.count("all OK") == 1 for out in outs), outs


@pytest.mark.parametrize("setting,match", [({"hidden_act": "gelu"}, "hidden_act='gelu'"),
                                           ({"layer_types": ["full_attention", "sliding_attention",
                                                             "full_attention", "full_attention"]},
                                            "layer types \\['sliding_attention'\\]")])
def test_settings_the_engine_does_not_reproduce_are_refused(setting, match):
    hf = tiny_model("llama4")
    for k, v in setting.items():
        setattr(hf.config, k, v)
    with pytest.raises(dsi.UnsupportedModelError, match=match):
        dsi.init_inference(hf, max_seq_len=64)
