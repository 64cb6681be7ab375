"""Falcon-H1 (falcon_h1; policies/falcon_h1.py, gated_deltanet.ParallelMixer) against the unmodified HF model: tiny
random configs of three blocks, each attention (4 heads, 2 KV heads) and Mamba-2 (8 heads of 16 in 2 groups, state 8)
side by side, every muP multiplier away from 1; the mixer's read-out y silu(z) ("falcon_h1"), or the gated group
RMSNorm normed before the gate with biases on q/k/v/o, out_proj and the MLP ("falcon_h1_norm"), or normed after it.

fp32 prompt logits on a left-padded batch atol 2e-4 / rtol 1e-4, greedy tokens identical to HF's generate, every decode
step's logits against HF's own one-token steps through its cache, beam search through HF's loop, a cache the caller
builds, bf16 (the normed-after-gate read-out's decode steps through the one C call), int8 / int4, both offload tiers, a
checkpoint on meta, TP=4 (groups shared by ranks) and PP=2, CUDA graphs' fixed-shape step (emulated;
tests/test_cuda_graphs.py), refusals. That the tiny config exercises each multiplier and read-out is checked on HF
itself."""

import copy

import pytest
import torch

import lightning_dsinfer as dsi
from helpers import (assert_c_step_matches_torch, assert_cache_the_caller_builds, assert_steps_match_hf,
                     fake_quantised_int4, fake_quantised_int8, optimised_copy, optimised_from_checkpoint, padded_batch,
                     streamed_copy, tiny_model)
from multiproc import run_ranks

VARIANTS = [("falcon_h1", {}), ("falcon_h1_norm", {}), ("falcon_h1_norm", {"mamba_norm_before_gate": False})]
IDS = ["gate", "norm-before-gate", "norm-after-gate"]


@pytest.mark.parametrize("family,overrides", VARIANTS, ids=IDS)
def test_falcon_h1_matches_hf(family, overrides):
    hf = tiny_model(family, **overrides)
    opt = optimised_copy(hf, max_seq_len=64)
    engine = opt._dsinfer_engine
    mixer = engine.decoder.layers[0].attn
    assert type(mixer).__name__ == "ParallelMixer" and mixer.split == (4 + 2 * 2) * 16
    assert mixer.o.in_features == 4 * 16 + 128 and engine.cache.k[0].shape[2] == 64   # (K/V and states both kept)
    assert mixer.mamba.gating == {"falcon_h1": "gate"}.get(family, "norm_before_gate" if not overrides
                                                           else "norm_after_gate")
    assert_steps_match_hf(hf, opt)
    ids, mask = padded_batch([9, 6], seed=2)        # beam search through HF's loop: K/V and states reordered
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False)
    with torch.no_grad():
        assert torch.equal(opt.generate(**kw), hf.generate(**kw))


@pytest.mark.parametrize("setting", [
    dict(embedding_multiplier=1.0), dict(lm_head_multiplier=1.0), dict(key_multiplier=1.0),
    dict(attention_in_multiplier=1.0), dict(attention_out_multiplier=1.0), dict(ssm_in_multiplier=1.0),
    dict(ssm_out_multiplier=1.0), dict(ssm_multipliers=[1.0] * 5), dict(mlp_multipliers=[1.0, 1.0]),
    dict(mamba_rms_norm=True)])
def test_the_tiny_config_exercises_each_multiplier(setting):
    """HF's own logits move by far more than the tolerance when a multiplier is 1 (or the read-out normed), so an
    engine that drops it fails test_falcon_h1_matches_hf."""
    ids, mask = padded_batch([12, 7], seed=1)
    with torch.no_grad():
        want = tiny_model("falcon_h1")(input_ids=ids, attention_mask=mask).logits
        other = tiny_model("falcon_h1", **setting)(input_ids=ids, attention_mask=mask).logits
    assert (want - other)[mask.bool()].abs().max() > 1e-2


def test_a_cache_the_caller_builds():
    """DynamicCache(config=model.config): its hybrid layers (K/V and the Mamba-2 states) filled by the engine; a prompt
    and steps give HF's logits."""
    hf = tiny_model("falcon_h1")
    assert_cache_the_caller_builds(hf, optimised_copy(hf, max_seq_len=64))


@pytest.mark.parametrize("family,overrides", [VARIANTS[0], VARIANTS[2]], ids=[IDS[0], IDS[2]])
def test_falcon_h1_bf16(family, overrides):
    """(The normed-after-gate read-out takes the one-call C decode step of Mamba-2, the others the torch ops.)"""
    hf = tiny_model(family, **overrides).to(torch.bfloat16)
    opt = optimised_copy(hf, max_seq_len=64, dtype=torch.bfloat16)
    assert_steps_match_hf(hf, opt, lengths=(12, 5, 9), new=6, atol=6e-2, rtol=2e-2)


@pytest.mark.parametrize("family,overrides", VARIANTS, ids=IDS)
def test_c_decode_step_matches_the_torch_ops(family, overrides):
    """The bf16 CPU decode step of the Mamba-2 beside the attention in one C call (``cpu_gemv.mamba2_step`` with each
    read-out: y silu(z); normed before the gate; normed after it) against the mixer's torch ops."""
    from lightning_dsinfer.kernels import cpu_gemv

    if not cpu_gemv.has_wide_ops():
        pytest.skip("no AVX512: the torch ops are the only path")       # (then nothing else runs this code)
    opt = optimised_copy(tiny_model(family, **overrides).to(torch.bfloat16), max_seq_len=64, dtype=torch.bfloat16)
    assert_c_step_matches_torch(opt, 1, "mamba2_step")


def test_bf16_embedding_scale_is_the_float():
    """HF multiplies the bf16 embeddings by the Python float (Gemma rounds its scale to bf16 first): a multiplier not
    exact in bf16 gives HF's embeddings bit for bit (found by review: 1-ulp differences in ~2.5% of them)."""
    hf = tiny_model("falcon_h1", embedding_multiplier=32 ** 0.5).to(torch.bfloat16)
    opt = optimised_copy(hf, max_seq_len=64, dtype=torch.bfloat16)
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf.model.embed_tokens(ids) * hf.config.embedding_multiplier
    assert torch.equal(opt._dsinfer_engine.decoder.embed_tokens(ids), want)


def _fake_int8(hf):
    """HF over the weights ``quantize="int8"`` holds: every block linear fake-quantised row by row, except that o_proj
    and out_proj are one GEMM with one scale per row over both (each times its multiplier, as read)."""
    ref = fake_quantised_int8(hf)
    from lightning_dsinfer.kernels import reference

    c = hf.config
    ao, so = c.attention_out_multiplier, c.ssm_out_multiplier
    with torch.no_grad():
        for layer, mine in zip(hf.model.layers, ref.model.layers):
            fused = torch.cat([layer.self_attn.o_proj.weight * ao, layer.mamba.out_proj.weight * so], dim=1)
            fake = reference.dequantize_int8(*reference.quantize_int8_per_channel(fused))
            n = layer.self_attn.o_proj.weight.shape[1]
            mine.self_attn.o_proj.weight.copy_(fake[:, :n] / ao)
            mine.mamba.out_proj.weight.copy_(fake[:, n:] / so)
    return ref


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_falcon_h1_quantised(quantize):
    """int8 / int4 (groups of 16: they never straddle o_proj's and out_proj's columns) against HF over the same
    quantise-dequantised weights."""
    hf = tiny_model("falcon_h1_norm")
    ref = _fake_int8(hf) if quantize == "int8" else fake_quantised_int4(hf, 16)
    assert_steps_match_hf(ref, optimised_copy(hf, max_seq_len=64, quantize=quantize, quantize_group_size=16))


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
def test_falcon_h1_offload_matches_hf(tier, tmp_path):
    hf = tiny_model("falcon_h1_norm")
    assert_steps_match_hf(hf, streamed_copy(hf, tier, tmp_path))


def test_offloaded_prompts_in_chunks(tmp_path):
    """Prompts through each streamed block in chunks of 2 tokens (K/V and the Mamba-2 states carried across them), and
    a plain forward in chunks (its K/V and states in the one-block scratch)."""
    hf = tiny_model("falcon_h1")
    opt = streamed_copy(hf, "cpu", tmp_path)
    opt._dsinfer_engine.decoder.prefill_tokens = 6
    assert_steps_match_hf(hf, opt, lengths=(13, 5, 9))


def test_falcon_h1_from_checkpoint_on_meta(tmp_path):
    hf = tiny_model("falcon_h1_norm")
    assert_steps_match_hf(hf, optimised_from_checkpoint(hf, tmp_path), new=5)


def test_falcon_h1_tensor_and_pipeline_parallel():
    """TP=4 (attention heads, the 2 KV heads each on two ranks; Mamba-2 heads, each of the 2 groups shared by two
    ranks, whose norm sums their squares within the group: found by review, every rank's were summed, for Granite 4,
    Bamba and NemotronH too; in_proj rows and o | out_proj columns; the two output biases added once) and PP=2,
    through tests/tp_worker.py and tests/pp_worker.py: prompt logits, greedy, beam search."""
    codes, outs, _ = run_ranks("tp_worker.py", 4, ["--tp", "4", "--families", "falcon_h1_norm"], timeout=300)
    assert codes == [0] * 4, "\n".join(outs)
    assert outs[0].count(" OK") == 1, outs[0]
    codes, outs, _ = run_ranks("pp_worker.py", 2, ["--pp", "2", "--families", "falcon_h1"], timeout=300)
    assert codes == [0, 0], "\n".join(outs)
    assert all(out.count("all OK") == 1 for out in outs), outs


@pytest.mark.parametrize("setting,match", [({"mamba_proj_bias": True}, "mamba_proj_bias=True"),
                                           ({"hidden_act": "gelu"}, "hidden_act='gelu'")])
def test_settings_the_engine_does_not_reproduce_are_refused(setting, match):
    hf = copy.deepcopy(tiny_model("falcon_h1"))
    for k, v in setting.items():
        setattr(hf.config, k, v)
    with pytest.raises(dsi.UnsupportedModelError, match=match):
        dsi.init_inference(hf, max_seq_len=64)


def test_tensor_parallel_size_must_split_the_mamba_heads():
    with pytest.raises(ValueError, match="does not split falcon_h1's 8 Mamba-2 heads in 2 groups"):
        dsi.init_inference(tiny_model("falcon_h1"), max_seq_len=64, tensor_parallel_size=3)
