"""LFM2 and LFM2-MoE (policies/lfm2.py): gated short-convolution blocks (modules/gated_deltanet.ShortConv: B * x through
a causal depthwise convolution, times C) around GQA attention with per-head q / k norms, against the unmodified HF
model (tiny random configs: conv, attention, conv; the MoE one with a dense first block, then sigmoid-routed experts
with an expert bias). fp32 logits atol 2e-4 / rtol 1e-4 on a left-padded batch, greedy tokens,
every decode step's logits (teacher-forced) and beam search (HF's loop: the convolution histories in HF's cache) as
HF's; bf16 within 6e-2 / 2e-2 of HF bf16; int8; TP=2, offload on both tiers, a checkpoint on meta, the CUDA-graph
step (emulated); padding zeroed in one-token prompt chunks (also Qwen3.5's linear attention)."""

import pytest
import torch

from helpers import (assert_c_step_matches_torch, assert_forward_and_generate, optimised_copy,
                     optimised_from_checkpoint, padded_batch, streamed_copy, tiny_model)
from multiproc import run_ranks

ATOL, RTOL = 2e-4, 1e-4


def _assert_same(hf, opt, lengths=(12, 5, 9, 3), new=10, atol=ATOL, rtol=RTOL):
    ids, mask = padded_batch(list(lengths), seed=1)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits.float()
        tokens = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    got = opt(input_ids=ids, attention_mask=mask).logits.float()
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=atol, rtol=rtol)
    out = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_scores=True,
                       return_dict_in_generate=True)
    full = torch.cat([mask, torch.ones(len(lengths), new, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        again = hf(input_ids=out.sequences, attention_mask=full).logits.float()
    torch.testing.assert_close(torch.stack(out.scores, dim=1).float(), again[:, -new - 1:-1], atol=atol, rtol=rtol)
    return out.sequences, tokens


FAMILIES = ["lfm2", "lfm2_moe"]


@pytest.mark.parametrize("family", FAMILIES)
def test_lfm2_matches_hf(family):
    hf = tiny_model(family)
    opt = optimised_copy(hf, max_seq_len=64)
    engine = opt._dsinfer_engine
    assert [type(ly.attn).__name__ for ly in engine.decoder.layers] == ["ShortConv", "Attention", "ShortConv"]
    assert sorted(engine.cache.conv) == [0, 2] and engine.cache.conv[0].shape[1:] == (64, 2)
    ours, tokens = _assert_same(hf, opt)
    assert torch.equal(ours, tokens)
    ids, mask = padded_batch([6, 9], seed=2)       # beam search through HF's loop: the histories reordered
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    with torch.no_grad():
        assert torch.equal(opt.generate(**kw), hf.generate(**kw))


def test_lfm3_matches_hf():
    """LFM3: short convolutions around a sliding-window and a full attention block, each with its rope table (the full
    one "proportional": half its frequencies zero), a sigmoid gate per head on the attention's output, sandwich norms
    on every block. fp32 logits, greedy tokens and every decode step as HF's, beam search; bf16 within its tolerance;
    int8 vs the fake-quantised HF."""
    from helpers import assert_fp32_matches_quantised, fake_quantised_int8

    hf = tiny_model("lfm3")
    opt = optimised_copy(hf, max_seq_len=64)
    engine = opt._dsinfer_engine
    assert [(type(ly).__name__, type(ly.attn).__name__) for ly in engine.decoder.layers] == [
        ("SandwichDecoderLayer", "ShortConv"), ("SandwichDecoderLayer", "OutputGatedAttention"),
        ("SandwichDecoderLayer", "OutputGatedAttention"), ("SandwichDecoderLayer", "ShortConv")]
    assert [ly.attn.sliding for ly in engine.decoder.layers[1:3]] == [True, False] and engine.rotary.sliding
    assert engine.decoder.layers[1].attn.qkv.out_features == (4 + 2 * 2) * 16 + 4       # (q | k | v | one gate a head)
    ours, tokens = _assert_same(hf, opt)
    assert torch.equal(ours, tokens)
    ids, mask = padded_batch([6, 9], seed=2)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    with torch.no_grad():
        assert torch.equal(opt.generate(**kw), hf.generate(**kw))
    assert_fp32_matches_quantised(fake_quantised_int8(hf), optimised_copy(hf, max_seq_len=64, quantize="int8"))
    bf16 = tiny_model("lfm3").to(torch.bfloat16)
    _assert_same(bf16, optimised_copy(bf16, max_seq_len=64, dtype=torch.bfloat16), lengths=(12, 5, 9), new=6,
                 atol=6e-2, rtol=2e-2)


def test_c_decode_step_matches_the_torch_ops():
    """A bf16 CPU decode step of the short convolution in one C call (``cpu_gemv.short_conv_step``: B * x, the
    convolution with the history shifted in place, C *) against the module's torch ops
    (``helpers.assert_c_step_matches_torch``)."""
    from lightning_dsinfer.kernels import cpu_gemv

    if not cpu_gemv.has_wide_ops():
        pytest.skip("no AVX512: the torch ops are the only path")       # (then nothing else runs this code)
    opt = optimised_copy(tiny_model("lfm2").to(torch.bfloat16), max_seq_len=64, dtype=torch.bfloat16)
    assert_c_step_matches_torch(opt, 0, "short_conv_step")


@pytest.mark.parametrize("family", FAMILIES)
def test_lfm2_bf16(family):
    """(MoE: every expert routed, so no near tie in HF's choice flips under bf16 rounding.)"""
    hf = tiny_model(family, **({"num_experts_per_tok": 4} if family == "lfm2_moe" else {})).to(torch.bfloat16)
    _assert_same(hf, optimised_copy(hf, max_seq_len=64, dtype=torch.bfloat16), lengths=(12, 5, 9), new=6,
                 atol=6e-2, rtol=2e-2)


def test_lfm2_int8_matches_fake_quantised_hf():
    from helpers import assert_fp32_matches_quantised, fake_quantised_int8

    hf = tiny_model("lfm2")
    assert_fp32_matches_quantised(fake_quantised_int8(hf), optimised_copy(hf, max_seq_len=64, quantize="int8"))


@pytest.mark.parametrize("family", ["lfm2", "qwen3_5_text"])
def test_one_token_prompt_chunks_zero_the_padding(family, tmp_path):
    """Offload runs a prompt in chunks of prefill_tokens // rows tokens: one token each at 16 / 9 here. Padded tokens
    (a nonzero pad embedding: pad = 5) must be zeroed in those chunks too, or they reach the convolution history and
    the state (a review finding: only chunks of 2+ tokens were masked). Logits and greedy tokens as HF's."""
    hf = tiny_model(family)
    opt = streamed_copy(hf, "cpu", tmp_path)
    opt._dsinfer_engine.decoder.prefill_tokens = 16
    ids, mask = padded_batch([12, 5, 9, 3, 7, 10, 4, 8, 6], seed=1)
    ids = ids.masked_fill(mask == 0, 5)
    assert opt._dsinfer_engine.decoder._chunks(9, 12)[0] == (0, 1)
    assert_forward_and_generate(hf, opt, ids, mask, 5)


def test_lfm2_tensor_parallel():
    """TP=2: each rank its channels of B, C, x and of the convolution, out_proj's columns (one all-reduce); LFM3's
    per-head gates with their heads."""
    codes, outs, _ = run_ranks("tp_worker.py", 2, ["--tp", "2", "--families", *FAMILIES, "lfm3"], timeout=300)
    assert codes == [0, 0], "\n".join(outs)
    assert outs[0].count(" OK") == len(FAMILIES) + 1, outs[0]


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
@pytest.mark.parametrize("family", [*FAMILIES, "lfm3"])
def test_lfm2_offload_matches_hf(family, tier, tmp_path):
    hf = tiny_model(family)
    _assert_same(hf, streamed_copy(hf, tier, tmp_path))


@pytest.mark.parametrize("family", [*FAMILIES, "lfm3"])
def test_lfm2_from_checkpoint_on_meta(family, tmp_path):
    """(LFM2-MoE: its experts as save_pretrained writes them, one by one, and its fp32 expert bias.)"""
    hf = tiny_model(family)
    _assert_same(hf, optimised_from_checkpoint(hf, tmp_path), new=6)


def test_lfm2_graph_step_equals_eager_step():
    """The CUDA-graph decode step (emulated on the CPU): the histories in the cache's rows, a dummy row too."""
    from lightning_dsinfer.generation import cuda_graphs

    hf = tiny_model("lfm2")
    opt = optimised_copy(hf, max_seq_len=40, max_batch_size=4)
    ids, mask = padded_batch([12, 5, 9], seed=3)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    eager = opt.generate(**kw)
    with cuda_graphs.emulate():
        graph = opt.generate(**kw)
    assert torch.equal(graph, eager)
    with torch.no_grad():
        assert torch.equal(graph, hf.generate(**kw))
    assert sorted(opt._dsinfer_engine._decode_graphs.buckets) == [4]
