"""Attention-free Mamba models (mamba, falcon_mamba, mamba2; policies/mamba.py, gated_deltanet.Mamba1Mixer /
Mamba2Mixer) against the unmodified HF model: tiny random configs of three blocks (Mamba-1: 128 channels, state 8, dt
rank 6, kernel 4 with a bias; FalconMamba with its weightless RMSNorms of dt, B and C; Mamba-2: 8 heads of 16 in 2
groups, state 8), every block a mixer without an MLP.

fp32 prompt logits on a left-padded batch atol 2e-4 / rtol 1e-4; greedy tokens identical to HF's generate and every
decode step's logits against HF's generate's scores (transformers' one-token forward with a cache and a longer
attention mask broadcasts the mask over the token, so its generate, which trims the mask, is the reference here); beam
search through HF's loop; bf16; int8 / int4; both offload tiers and prompts in chunks (the state carried across
them); a checkpoint on meta; TP=2 (channels split, x_proj's partial sums reduced) and PP=2; CUDA graphs' fixed-shape
step (emulated; tests/test_cuda_graphs.py); refusals."""

import pytest
import torch

import lightning_dsinfer as dsi
from helpers import (assert_c_step_matches_torch, fake_quantised_int4, fake_quantised_int8, optimised_copy,
                     optimised_from_checkpoint, padded_batch, streamed_copy, tiny_model)
from multiproc import run_ranks

FAMILIES = ["mamba", "falcon_mamba", "mamba2"]


def _assert_same(hf, opt, lengths=(12, 5, 9, 3), new=8, atol=2e-4, rtol=1e-4):
    """Prompt logits; greedy tokens and each decode step's logits as HF's generate's (bf16: the steps up to the first
    token a near tie flips)."""
    ids, mask = padded_batch(list(lengths), seed=1)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits.float()
    got = opt(input_ids=ids, attention_mask=mask).logits.float()
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=atol, rtol=rtol)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_scores=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        ref = hf.generate(**kw)
    out = opt.generate(**kw)
    t = ids.shape[1]
    same = (out.sequences[:, t:] == ref.sequences[:, t:]).all(0).long().cumprod(0).sum().item()
    if hf.dtype == torch.float32:
        assert same == new
    steps = min(same + 1, new)        # (the step that chose a differing token still read the same inputs)
    torch.testing.assert_close(torch.stack(out.scores, 1)[:, :steps].float(),
                               torch.stack(ref.scores, 1)[:, :steps].float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("family", FAMILIES)
def test_mamba_matches_hf(family):
    hf = tiny_model(family)
    opt = optimised_copy(hf, max_seq_len=64)
    engine = opt._dsinfer_engine
    mixer = "Mamba2Mixer" if family == "mamba2" else "Mamba1Mixer"
    assert [(type(ly.attn).__name__, ly.mlp) for ly in engine.decoder.layers] == [(mixer, None)] * 3
    if family != "mamba2":
        assert (engine.decoder.layers[0].attn.bcdt_norms is not None) == (family == "falcon_mamba")
    _assert_same(hf, opt)
    ids, mask = padded_batch([9, 6], seed=2)        # beam search through HF's loop: states reordered with the beams
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False)
    with torch.no_grad():
        assert torch.equal(opt.generate(**kw), hf.generate(**kw))


@pytest.mark.parametrize("family", FAMILIES)
def test_mamba_bf16(family):
    hf = tiny_model(family).to(torch.bfloat16)
    _assert_same(hf, optimised_copy(hf, max_seq_len=64, dtype=torch.bfloat16), lengths=(12, 5, 9), new=6,
                 atol=6e-2, rtol=2e-2)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_mamba_quantised(quantize):
    """in_proj and out_proj int8 / int4 (groups of 16; x_proj and dt_proj as they are) against HF over the same
    quantise-dequantised weights."""
    hf = tiny_model("falcon_mamba")
    ref = fake_quantised_int8(hf) if quantize == "int8" else fake_quantised_int4(hf, 16)
    _assert_same(ref, optimised_copy(hf, max_seq_len=64, quantize=quantize, quantize_group_size=16))


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
def test_mamba_offload_matches_hf(tier, tmp_path):
    hf = tiny_model("mamba")
    _assert_same(hf, streamed_copy(hf, tier, tmp_path))


def test_offloaded_prompts_in_chunks(tmp_path):
    """Prompts through each streamed block in chunks of 2 tokens: the convolution history and the state carried from
    chunk to chunk."""
    hf = tiny_model("falcon_mamba")
    opt = streamed_copy(hf, "cpu", tmp_path)
    opt._dsinfer_engine.decoder.prefill_tokens = 6
    _assert_same(hf, opt, lengths=(13, 5, 9))


def test_mamba_from_checkpoint_on_meta(tmp_path):
    hf = tiny_model("falcon_mamba")
    _assert_same(hf, optimised_from_checkpoint(hf, tmp_path), new=5)


def test_mamba_tensor_and_pipeline_parallel():
    """TP=2 (FalconMamba: each rank 64 channels: in_proj rows, x_proj columns whose partial sums are reduced, out_proj
    columns; Mamba-2: 4 heads and one group a rank) and PP=2, through tests/tp_worker.py and tests/pp_worker.py: prompt
    logits, greedy, beam search."""
    codes, outs, _ = run_ranks("tp_worker.py", 2, ["--tp", "2", "--families", "falcon_mamba", "mamba2"], timeout=300)
    assert codes == [0, 0], "\n".join(outs)
    assert outs[0].count(" OK") == 2, outs[0]
    codes, outs, _ = run_ranks("pp_worker.py", 2, ["--pp", "2", "--families", "mamba"], timeout=300)
    assert codes == [0, 0], "\n".join(outs)
    assert all(out.count("all OK") == 1 for out in outs), outs


@pytest.mark.parametrize("setting,match", [({"use_bias": True}, "in_proj / out_proj biases"),
                                           ({"hidden_act": "gelu"}, "hidden_act='gelu'")])
def test_settings_the_engine_does_not_reproduce_are_refused(setting, match):
    with pytest.raises(dsi.UnsupportedModelError, match=match):
        dsi.init_inference(tiny_model("mamba", **setting), max_seq_len=64)


@pytest.mark.parametrize("family", ["mamba", "falcon_mamba", "jamba"])
@pytest.mark.parametrize("call", ["decode", "prompt"])
def test_c_calls_match_the_torch_ops(family, call, monkeypatch):
    """bf16 CPU calls of the Mamba-1 mixer through C against the mixer's torch ops on the same random in_proj rows,
    history and state: a decode step (the convolution and the selective-state update, ``cpu_gemv.mamba1_conv`` /
    ``mamba1_scan``; FalconMamba's weightless and Jamba's weighted dt / B / C norms between them), and a left-padded
    3-row, 11-token prompt continuing a held state at column 5 (the scan over every token in one ``mamba1_scan``
    call, the state in registers): the output within a bf16 rounding, the new state within 1e-5, the history
    identical."""
    from lightning_dsinfer.kernels import cpu_gemv
    from lightning_dsinfer.modules import gated_deltanet
    from lightning_dsinfer.modules.transformer import Step

    if not cpu_gemv.has_wide_ops():
        pytest.skip("no AVX512: the torch ops are the only path")       # (then nothing else runs this code)
    opt = optimised_copy(tiny_model(family).to(torch.bfloat16), max_seq_len=64, dtype=torch.bfloat16)
    cache, mixer = opt._dsinfer_engine.cache, opt._dsinfer_engine.decoder.layers[0].attn
    t = 1 if call == "decode" else 11
    proj = torch.randn(3, t, 2 * mixer.inner, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    if call == "decode":
        step = dict(start=7, q_start=7, decoding=True)
    else:
        valid = torch.ones(3, t, dtype=torch.bool)
        valid[1, :4] = False                    # (a left-padded row: its padding zeroed, as transformers does)
        step = dict(start=5, q_start=5, valid=valid)
    history, state = cache.conv[0][:3], cache.state[0][:3]
    results, scans = [], []
    real = cpu_gemv.mamba1_scan
    monkeypatch.setattr(cpu_gemv, "mamba1_scan", lambda *a: scans.append(a[0].shape[1]) or real(*a))
    for c_call in (True, False):
        history.copy_(torch.randn(history.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16))
        state.copy_(torch.randn(state.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
        monkeypatch.setattr(gated_deltanet.cpu_gemv, "has_wide_ops", lambda: c_call)
        out = mixer.from_qkv(proj, None, Step(cos=None, sin=None, mask=None, cache=cache, **step))
        results.append((out.float(), history.clone(), state.clone()))
    assert scans == [t]                            # (the C run scanned the tokens in one call, the torch run did not)
    (out, hist, st), (want, want_hist, want_st) = results
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
    assert torch.equal(hist, want_hist)
    torch.testing.assert_close(st, want_st, atol=1e-5, rtol=1e-5)


def test_mamba2_c_decode_step_matches_the_torch_ops():
    from lightning_dsinfer.kernels import cpu_gemv

    if not cpu_gemv.has_wide_ops():
        pytest.skip("no AVX512: the torch ops are the only path")       # (then nothing else runs this code)
    opt = optimised_copy(tiny_model("mamba2").to(torch.bfloat16), max_seq_len=64, dtype=torch.bfloat16)
    assert_c_step_matches_torch(opt, 1, "mamba2_step")


def test_a_refused_call_leaves_the_callers_cache_as_it_was():
    """A caller's DynamicCache(config=...) of an attention-free model gets a layer that counts its tokens; a call
    refused for its mask leaves the count as it was, so the next right call runs (found by review: it was counted
    before the checks) and gives HF's generate's logits."""
    from transformers import DynamicCache

    hf = tiny_model("mamba")
    opt = optimised_copy(hf, max_seq_len=64)
    ids, mask = padded_batch([6, 4], seed=3)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)
    cache = DynamicCache(config=opt.config)
    opt(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    step, longer = ref.sequences[:, 6:7], torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    with pytest.raises(ValueError, match="covers 6 tokens but past \\+ input is 7"):
        opt(input_ids=step, attention_mask=mask, cache=cache, use_cache=True)
    assert cache.get_seq_length() == 6
    got = opt(input_ids=step, attention_mask=longer, cache=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(got, ref.scores[1], atol=2e-4, rtol=1e-4)


def test_a_checkpoint_with_older_names(tmp_path):
    """Older Mamba checkpoints name the embedding ``backbone.embedding.weight`` (transformers' load hook renames it)."""
    from safetensors.torch import load_file, save_file

    hf = tiny_model("mamba")
    hf.save_pretrained(tmp_path / "new")
    tensors = load_file(str(tmp_path / "new" / "model.safetensors"))
    tensors["backbone.embedding.weight"] = tensors.pop("backbone.embeddings.weight")
    (tmp_path / "old").mkdir()
    save_file(tensors, str(tmp_path / "old" / "model.safetensors"), metadata={"format": "pt"})
    with torch.device("meta"):
        meta = type(hf)(hf.config)
    _assert_same(hf, dsi.init_inference(meta, checkpoint=str(tmp_path / "old"), max_seq_len=64, dtype=torch.float32),
                 new=4)


def test_tensor_parallel_size_must_split_the_channels():
    with pytest.raises(ValueError, match="does not divide the 128 Mamba channels of mamba"):
        dsi.init_inference(tiny_model("mamba"), max_seq_len=64, tensor_parallel_size=3)
