"""NemotronH (nemotron_h; policies/nemotron_h.py): one sub-layer per config layer, paired into the engine's blocks (a
mixer and the MLP layer after it; a mixer followed by a mixer is a block without an MLP), against the unmodified HF
model (tiny random config "M-M*-MM-": Mamba-2 + ReLU² MLP, a Mamba-2 block without MLP, NoPE attention + MLP, two
Mamba-2 in a row; the first group's heads with dt under time_step_min and D = 0, so the time-step rule shows), and
Nemotron 3's sparse layers ("ME*EM-": 6 ReLU² experts without gates, top-2 by DeepSeek-V3's sigmoid router with its
correction bias, scaled 2.5, and a shared ReLU² expert with biases), and those experts in a latent space of 40
(``moe_latent_size``: fc1_latent_proj / fc2_latent_proj with biases).

HF's own prompt forward clamps dt to time_step_min and its one-token decode step does not (as mamba_ssm's step), so a
prompt forward over a generated sequence is not what HF's generate computed: each decode step's logits are checked
against HF's one-token steps through its cache over the same tokens, fp32 atol 2e-4 / rtol 1e-4, as are the prompt
logits on a left-padded batch, and the greedy tokens are HF's generate's; beam search through HF's loop (the cache's layers put in block order); a
cache the caller builds; bf16; int8 / int4; offload on both tiers (the disk tier reading routed experts on demand); a
checkpoint on meta (what save_pretrained writes: ``backbone.*``, experts one by one); TP=2 (expert slicing, the latent
out bias added once, and expert parallelism); PP=2; offloaded prompts in one-token chunks; an attention-only pattern;
int4 without a dense MLP; refusals."""

import pytest
import torch

import lightning_dsinfer as dsi
from helpers import (assert_cache_the_caller_builds, assert_steps_match_hf, fake_quantised_int4, fake_quantised_int8,
                     optimised_copy, optimised_from_checkpoint, padded_batch, streamed_copy, tiny_model)
from multiproc import run_ranks

ATOL, RTOL = 2e-4, 1e-4


def _assert_same(hf, opt, lengths=(12, 5, 9, 3), new=8, atol=ATOL, rtol=RTOL):
    assert_steps_match_hf(hf, opt, lengths, new, atol, rtol)


BLOCKS = {"nemotron_h": ([("Mamba2Mixer", "MLP"), ("Mamba2Mixer", "NoneType"), ("Attention", "MLP"),
                          ("Mamba2Mixer", "NoneType"), ("Mamba2Mixer", "MLP")], [0, 2, 3, 5, 6]),
          "nemotron_h_moe": ([("Mamba2Mixer", "MoEMLP"), ("Attention", "MoEMLP"), ("Mamba2Mixer", "MLP")], [0, 2, 4])}
BLOCKS["nemotron_h_latent"] = BLOCKS["nemotron_h_moe"]
FAMILIES = ["nemotron_h", "nemotron_h_moe"]
ALL = list(BLOCKS)         # (the latent experts where their path differs: resident, int8, disk tier, checkpoint, TP)


@pytest.mark.parametrize("family", ALL)
def test_nemotron_h_matches_hf(family):
    hf = tiny_model(family)
    opt = optimised_copy(hf, max_seq_len=64)
    engine = opt._dsinfer_engine
    blocks, cache_layers = BLOCKS[family]
    assert [(type(ly.attn).__name__, type(ly.mlp).__name__) for ly in engine.decoder.layers] == blocks
    assert engine.hf_cache_layers == cache_layers
    if family != "nemotron_h":     # ReLU² experts and shared expert: up rows only; latent: experts on 40 inputs
        moe = engine.decoder.layers[0].mlp
        assert type(moe.shared).__name__ == "MLP" and moe.shared.gate_up.out_features == 48
        assert (moe.latent_in is not None) == family.endswith("latent")
    _assert_same(hf, opt)
    ids, mask = padded_batch([6, 9], seed=2)       # beam search through HF's loop: states and K/V reordered
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    with torch.no_grad():
        assert torch.equal(opt.generate(**kw), hf.generate(**kw))


def test_time_step_limit_bounds_prompts_only():
    """Decode steps clamped like prompts would be off HF's generate by ~3e-3 here (the low-dt heads): the rule is
    HF's (and mamba_ssm's), not a tolerance."""
    hf = tiny_model("nemotron_h")
    assert hf.model.layers[0].mixer.time_step_limit[0] == pytest.approx(1e-3)
    opt = optimised_copy(hf, max_seq_len=64)
    ids, mask = padded_batch([12, 5], seed=1)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_scores=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        ref = hf.generate(**kw)
        forward = hf(input_ids=ref.sequences, attention_mask=torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1))
    out = opt.generate(**kw)
    steps, hf_steps = torch.stack(out.scores, 1), torch.stack(ref.scores, 1)
    assert (hf_steps - forward.logits[:, -7:-1]).abs().max() > 1e-3      # (the two HF paths do differ)
    torch.testing.assert_close(steps, hf_steps, atol=ATOL, rtol=RTOL)


def test_a_cache_the_caller_builds():
    """DynamicCache(config=model.config) (a layer per config layer) passed to the model's forward: its layers are put
    in block order once; a prompt and two steps give HF's logits."""
    from transformers import DynamicCache

    hf = tiny_model("nemotron_h")
    opt = optimised_copy(hf, max_seq_len=64)
    assert len(DynamicCache(config=opt.config).layers) == 8
    ours, _ = assert_cache_the_caller_builds(hf, opt)
    assert len(ours.layers) == 5


def test_attention_free_pattern_with_a_cache_the_caller_builds():
    """No attention layer ("M-M-"): the caller's DynamicCache(config=...) is put in block order and then gets a layer
    counting its tokens (found by review: the counter was added first and the cache refused). HF's own model cannot
    step (or generate) this pattern through a cache (its cache has no attention layer): with dt bounded below by
    nothing it reaches (time_step_min 1e-30: prompts and steps then agree), the reference is HF's plain forward over
    the whole sequence."""
    from transformers import DynamicCache

    hf = tiny_model("nemotron_h", layers_block_type=["linear_attention", "mlp", "linear_attention", "mlp"],
                    time_step_min=1e-30)
    opt = optimised_copy(hf, max_seq_len=64)
    ids, mask = padded_batch([7, 4], seed=3)
    seq = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        want = hf(input_ids=seq, attention_mask=torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], 1),
                  use_cache=False).logits
    cache, step = DynamicCache(config=opt.config), ids
    for i in range(3):
        got = opt(input_ids=step, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1]
        torch.testing.assert_close(got, want[:, 6 + i], atol=ATOL, rtol=RTOL)
        step, mask = seq[:, 7 + i, None], torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    assert len(cache.layers) == 3 and cache.get_seq_length() == 9


@pytest.mark.parametrize("family", FAMILIES)
def test_nemotron_h_bf16(family):
    """(MoE: every expert routed, so no near tie in HF's choice flips under bf16 rounding.)"""
    hf = tiny_model(family, **({"num_experts_per_tok": 6} if family == "nemotron_h_moe" else {})).to(torch.bfloat16)
    _assert_same(hf, optimised_copy(hf, max_seq_len=64, dtype=torch.bfloat16), lengths=(12, 5, 9), new=6,
                 atol=6e-2, rtol=2e-2)


@pytest.mark.parametrize("family,quantize", [(f, q) for f in FAMILIES for q in ("int8", "int4")]
                         + [("nemotron_h_latent", "int8")])
def test_nemotron_h_quantised(family, quantize):
    """int8 / int4 (groups of 8) in_proj / out_proj, q / k / v / o, up / down, each expert's and the shared expert's
    against HF over the same quantise-dequantised weights (the latent projections as they are)."""
    hf = tiny_model(family)
    ref = fake_quantised_int8(hf) if quantize == "int8" else fake_quantised_int4(hf, 8)
    _assert_same(ref, optimised_copy(hf, max_seq_len=64, quantize=quantize, quantize_group_size=8))


@pytest.mark.parametrize("family,tier", [(f, t) for f in FAMILIES for t in ("cpu", "nvme")]
                         + [("nemotron_h_latent", "nvme")])
def test_nemotron_h_offload_matches_hf(family, tier, tmp_path):
    """(The blocks without an MLP stream an empty MLP half; the disk tier reads the routed experts on demand.)"""
    hf = tiny_model(family)
    opt = streamed_copy(hf, tier, tmp_path)
    assert (opt._dsinfer_engine.decoder.experts is not None) == (tier == "nvme" and family != "nemotron_h")
    _assert_same(hf, opt)


@pytest.mark.parametrize("prefill_tokens", [3, 6])
def test_offloaded_prompts_in_chunks(prefill_tokens, tmp_path):
    """Prompts through each streamed block in chunks (1 token a chunk, or 2 with a last one of 1): the blocks without
    an MLP hand on no MLP input, and a one-token chunk of a prompt clamps dt as the prompt does (found by review:
    a TypeError, and logits ~3e-3 off HF's)."""
    hf = tiny_model("nemotron_h")
    opt = streamed_copy(hf, "cpu", tmp_path)
    opt._dsinfer_engine.decoder.prefill_tokens = prefill_tokens
    _assert_same(hf, opt, lengths=(13, 5, 9))


def test_int4_sparse_model_without_dense_mlp():
    """Sparse and MLP-less blocks only ("ME M*E"): no dense down projection, so its K (100 here, not a multiple of
    the group of 8) is not checked (found by review: refused)."""
    types = ["linear_attention", "moe", "linear_attention", "full_attention", "moe"]
    hf = tiny_model("nemotron_h_moe", layers_block_type=types, intermediate_size=100)
    _assert_same(fake_quantised_int4(hf, 8), optimised_copy(hf, max_seq_len=64, quantize="int4", quantize_group_size=8))


def test_attention_only_pattern():
    """No Mamba-2 layer ("*-**-"): the engine's own HF cache is a plain dynamic one, already in block order (found
    by review: refused as a cache of 0 layers); beam search through HF's loop."""
    hf = tiny_model("nemotron_h", layers_block_type=["full_attention", "mlp", "full_attention", "full_attention",
                                                     "mlp"])
    opt = optimised_copy(hf, max_seq_len=64)
    _assert_same(hf, opt)
    ids, mask = padded_batch([6, 9], seed=2)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    with torch.no_grad():
        assert torch.equal(opt.generate(**kw), hf.generate(**kw))


@pytest.mark.parametrize("family", ALL)
def test_nemotron_h_from_checkpoint_on_meta(family, tmp_path):
    hf = tiny_model(family)
    _assert_same(hf, optimised_from_checkpoint(hf, tmp_path), new=6)


def test_nemotron_h_tensor_and_pipeline_parallel():
    """TP=2 (Mamba-2 heads and their groups, attention heads, MLP rows; experts sliced, the shared expert's down bias
    added once), TP=2 with expert parallelism (3 whole experts a rank), and PP=2 (stages of blocks, HF's cache layers
    numbered per stage) through tests/tp_worker.py and tests/pp_worker.py: prompt logits, greedy, beam search."""
    for extra in ([], ["--expert-parallel"]):     # (the latent model slices its experts as the plain sparse one)
        families = ["nemotron_h", "nemotron_h_latent"] if not extra else ["nemotron_h_moe"]
        codes, outs, _ = run_ranks("tp_worker.py", 2, ["--tp", "2", "--families", *families, *extra], timeout=300)
        assert codes == [0, 0], "\n".join(outs)
        assert outs[0].count(" OK") == len(families), outs[0]
    codes, outs, _ = run_ranks("pp_worker.py", 2, ["--pp", "2", "--families", "nemotron_h"], timeout=300)
    assert codes == [0, 0], "\n".join(outs)
    assert all(out.count("all OK") == 1 for out in outs), outs


@pytest.mark.parametrize("types,match", [
    (["linear_attention", "mlp", "mlp"], "layer 2 \\(mlp\\) follows no mixer layer"),
    (["mlp", "linear_attention"], "layer 0 \\(mlp\\) follows no mixer layer"),
])
def test_layer_patterns_the_engine_does_not_run_are_refused(types, match):
    hf = tiny_model("nemotron_h", layers_block_type=types)
    with pytest.raises(dsi.UnsupportedModelError, match=match):
        dsi.init_inference(hf, max_seq_len=64)


def test_tensor_parallel_size_must_split_the_mamba_heads():
    """(Found by review: NemotronH's Mamba-2 heads were not checked, and a split that does not divide them would be
    wrong.)"""
    with pytest.raises(ValueError, match="does not split nemotron_h's 8 Mamba-2 heads in 2 groups"):
        dsi.init_inference(tiny_model("nemotron_h"), max_seq_len=64, tensor_parallel_size=3)


@pytest.mark.parametrize("setting,match", [({"use_bias": True}, "use_bias=True"),
                                           ({"mamba_hidden_act": "gelu"}, "mamba_hidden_act='gelu'")])
def test_settings_the_engine_does_not_reproduce_are_refused(setting, match):
    with pytest.raises(dsi.UnsupportedModelError, match=match):
        dsi.init_inference(tiny_model("nemotron_h", **setting), max_seq_len=64)
