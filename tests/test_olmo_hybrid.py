"""OLMo Hybrid (policies/olmo_hybrid.py): Gated DeltaNet blocks with separate projections and beta = 2 sigmoid(b)
(``linear_allow_neg_eigval``) around OLMo 2's attention blocks (norms on the outputs only, q / k RMS-normed over the
whole projection), against the unmodified HF model (tests/helpers.py: 4 blocks, linear / full alternating, 2 key / 4
value heads, random norm weights). NoPE as the released checkpoints, and with a rope. fp32 logits atol 2e-4 / rtol 1e-4
on a left-padded batch, greedy tokens, every decode step's logits (teacher-forced) and beam search as HF's; the bf16 C
decode step (beta scaled in C) against the torch ops; bf16 against fp32; int8 vs the fake-quantised HF; offload on
both tiers; a checkpoint on meta; TP=2. The Triton decode kernel's beta scale: tests/kernels/test_gated_delta.py."""

import pytest
import torch

from helpers import (assert_c_step_matches_torch, assert_forward_and_generate, assert_fp32_matches_quantised,
                     fake_quantised_int8, optimised_copy, optimised_from_checkpoint, padded_batch, streamed_copy,
                     tiny_model)
from multiproc import run_ranks
from test_qwen3_next import assert_bf16_follows_fp32, assert_hybrid_steps

FAMILY = "olmo_hybrid"
ROPE = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


@pytest.mark.parametrize("rope", [False, True], ids=["nope", "rope"])
def test_olmo_hybrid_matches_hf(rope):
    hf = tiny_model(FAMILY, **(ROPE if rope else {}))
    assert (hf.model.rotary_emb is not None) == rope and hf.config.linear_allow_neg_eigval
    opt = optimised_copy(hf, max_seq_len=64)
    layers = opt._dsinfer_engine.decoder.layers
    assert [(type(ly).__name__, type(ly.attn).__name__) for ly in layers] == [
        ("DecoderLayer", "GatedDeltaNet"), ("PostNormDecoderLayer", "ProjectionNormAttention")] * 2
    assert layers[0].attn.beta_scale == 2.0 and layers[0].attn.eps == 1e-5 and layers[1].attn.rotary == rope
    assert_hybrid_steps(hf, opt, beam=True)


def test_olmo_hybrid_c_decode_step_matches_the_torch_ops():
    """The bf16 CPU decode step of its linear attention in one C call (beta x 2 in C, the gated norm's own epsilon)
    against the module's torch ops."""
    from lightning_dsinfer.kernels import cpu_gemv

    if not cpu_gemv.has_wide_ops():
        pytest.skip("no AVX512: the torch ops are the only path")       # (then nothing else runs this code)
    opt = optimised_copy(tiny_model(FAMILY).to(torch.bfloat16), max_seq_len=64, dtype=torch.bfloat16)
    assert_c_step_matches_torch(opt, 2, "gated_delta_step")


def test_olmo_hybrid_bf16():
    """bf16 against the fp32 model, HF bf16's own error the bound (tests/test_qwen3_next.py's hybrids' bound: the fused
    in_proj GEMM rounds differently from HF's six): the prompt's logits and the decode steps' on the engine's own
    states."""
    hf = tiny_model(FAMILY).to(torch.bfloat16)
    assert_bf16_follows_fp32(tiny_model(FAMILY), hf, optimised_copy(hf, max_seq_len=64, dtype=torch.bfloat16))


def test_olmo_hybrid_int8_checkpoint_and_offload(tmp_path):
    """int8 vs the fake-quantised HF; from what save_pretrained writes into a model on meta; streamed on both tiers
    under a budget that streams most units: logits and greedy tokens as HF's."""
    hf = tiny_model(FAMILY)
    assert_fp32_matches_quantised(fake_quantised_int8(hf), optimised_copy(hf, max_seq_len=64, quantize="int8"))
    ids, mask = padded_batch([12, 5, 9], seed=1)
    assert_forward_and_generate(hf, optimised_from_checkpoint(hf, tmp_path / "ckpt"), ids, mask, 6)
    for tier in ("cpu", "nvme"):
        assert_forward_and_generate(hf, streamed_copy(hf, tier, tmp_path / tier), ids, mask, 6)


def test_olmo_hybrid_tensor_parallel():
    """TP=2 (tests/tp_worker.py): each rank its key heads and the value heads they serve, its attention heads (the
    whole-projection q / k norms' sums of squares all-reduced) and MLP slices; logits, greedy, beam search as HF's,
    sampling agrees across ranks."""
    codes, outs, _ = run_ranks("tp_worker.py", 2, ["--tp", "2", "--families", FAMILY], timeout=300)
    assert codes == [0, 0], "\n".join(outs)
    assert outs[0].count(" OK") == 1, outs[0]
