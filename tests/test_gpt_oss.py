"""gpt-oss (``policies/gpt_oss.py``) against the unmodified HF model: attention sinks, sliding / full layers, q/k/v/o
biases, YaRN, GQA and a MoE in every layer (router bias, softmax over the top-k logits, interleaved gate|up read as
gate rows then up rows, expert biases, the clamped SwiGLU). The tiny model's norms, sinks and biases are random
(``helpers.tiny_model``) and its SwiGLU limit low enough that the clamps bind, so a misplaced one cannot pass."""
import copy

import pytest
import torch
from helpers import (assert_bf16_follows_hf, assert_fp32_matches_quantised, assert_matches_hf, fake_quantised_int8,
                     optimised_copy, padded_batch, streamed_copy, tiny_model)

from lightning_dsinfer.kernels import ops
from lightning_dsinfer.policies import UnsupportedModelError
from lightning_dsinfer.policies.gpt_oss import InterleavedExperts
from lightning_dsinfer.policies.weights import ModuleSource


@pytest.fixture(scope="module")
def hf():
    return tiny_model("gpt_oss")


def test_gpt_oss_logits_greedy_and_beam_match_hf(hf):
    """fp32 logits on a left-padded batch (atol 2e-4 / rtol 1e-4) and greedy tokens past the window of 7 as HF's;
    beam search through HF's loop; the sinks on every layer, a sliding and a full layer; attention and experts take
    the reference (counted)."""
    ops.dispatch_counts.clear()
    opt = optimised_copy(hf, max_seq_len=64)
    layers = opt._dsinfer_engine.decoder.layers
    assert [layer.attn.sliding for layer in layers] == [True, False]
    assert all(type(layer.mlp).__name__ == "MoEMLP" and layer.attn.sinks is not None for layer in layers)
    assert_matches_hf(hf, opt, *padded_batch([12, 5, 9]))
    assert ops.dispatch_counts[("attention", "reference:sinks")] > 0
    ids, mask = padded_batch([7, 4], seed=2)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    with torch.no_grad():
        want = hf.generate(**kw)
    assert torch.equal(opt.generate(**kw), want)


def test_gpt_oss_bf16_follows_hf_bf16():
    """bf16 with every expert routed (top-k = all 4: no near tie of the router flips an expert between two bf16 runs,
    so what is compared is the arithmetic): prompt and decode-step logits (teacher-forced on HF's greedy continuation)
    within 6e-2 / 2e-2 of HF's bf16 model, and no further from the fp32 model than HF's bf16 is (x1.3). The decode
    steps' attention is the C decode attention with the sinks (AVX512 CPUs); only the two prompts take the reference."""
    from lightning_dsinfer.kernels import cpu_gemv

    everything = dict(num_experts_per_tok=4)
    truth = tiny_model("gpt_oss", **everything)
    hf = tiny_model("gpt_oss", **everything).to(torch.bfloat16)
    opt = optimised_copy(hf, max_seq_len=64, dtype=torch.bfloat16)
    ops.dispatch_counts.clear()
    assert_bf16_follows_hf(truth, hf, opt)
    forwards = 2 if cpu_gemv.has_wide_ops() else 2 + 5        # 1 forward + 1 prefill (+ 5 decode steps)
    layers = len(opt._dsinfer_engine.decoder.layers)
    assert ops.dispatch_counts[("attention", "reference:sinks")] == forwards * layers, dict(ops.dispatch_counts)


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
def test_gpt_oss_offload_matches_hf(hf, tier, tmp_path):
    """Offload under a streaming budget: the host tier (experts' biases in the streamed MLP unit) and the disk tier
    (each routed expert a unit of its own with its bias rows, read when routed to): fp32 logits, greedy tokens."""
    opt = streamed_copy(hf, tier, tmp_path)
    assert (opt._dsinfer_engine.decoder.experts is not None) == (tier == "nvme")
    assert_matches_hf(hf, opt, *padded_batch([12, 5, 9]))


def test_gpt_oss_int8_matches_fake_quantised_hf(hf):
    """int8 resident (q/k/v, o and each expert's gate|up and down, biases as they are; router and sinks as they are)
    against HF over the same quantise-dequantised weights: fp32 logits, greedy tokens."""
    assert_fp32_matches_quantised(fake_quantised_int8(hf), optimised_copy(hf, max_seq_len=64, quantize="int8"))


def test_gpt_oss_tensor_parallel_matches_hf():
    """TP=2 (heads and their sinks split, each expert's gate / up rows and biases sliced, down's bias added once):
    fp32 logits, greedy and beam search as HF's, sampling agrees across ranks (``tests/tp_worker.py``)."""
    from multiproc import run_ranks

    codes, outs, _ = run_ranks("tp_worker.py", 2, ["--tp", "2", "--families", "gpt_oss"], timeout=300)
    assert codes == [0, 0], "\n".join(outs)
    assert outs[0].count(" OK") == 1, outs[0]


def test_gpt_oss_meta_model_from_checkpoint(hf, tmp_path):
    """A meta model loaded from what ``save_pretrained`` writes (the 3D experts, de-interleaved as they are read from
    the files): fp32 logits, greedy tokens."""
    import lightning_dsinfer as dsi
    from transformers import AutoModelForCausalLM

    hf.save_pretrained(tmp_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf.config)
    opt = dsi.init_inference(model, checkpoint=str(tmp_path), dtype=torch.float32, max_seq_len=64)
    assert_matches_hf(hf, opt, *padded_batch([12, 5, 9]))


def test_interleaved_experts_read_as_gate_then_up_rows(hf):
    """The stored [E, H, 2I] gate|up (gate columns ::2, up 1::2), its bias and the [E, I, H] down, read as the
    engine's [E, 2I, H] (gate rows, then up), [E, 2I] and [E, H, I]: whole, by experts, by a rank's rows (within and
    across the gate / up halves) and by hidden columns."""
    m = "model.layers.1.mlp.experts"
    src = InterleavedExperts(ModuleSource(hf), gate_up=[f"{m}.gate_up_proj"], gate_up_bias=[f"{m}.gate_up_proj_bias"],
                             down=[f"{m}.down_proj"])
    experts = hf.model.layers[1].mlp.experts
    gu, gb = experts.gate_up_proj.detach(), experts.gate_up_proj_bias.detach()
    wants = {f"{m}.gate_up_proj": torch.cat([gu[..., ::2], gu[..., 1::2]], -1).transpose(1, 2),
             f"{m}.gate_up_proj_bias": torch.cat([gb[..., ::2], gb[..., 1::2]], -1),
             f"{m}.down_proj": experts.down_proj.detach().transpose(1, 2)}
    for name, want in wants.items():
        ref = src.ref(name)
        assert ref.shape == tuple(want.shape)
        assert torch.equal(ref.load(), want) and torch.equal(ref.load(0, 1, 2), want[1:3])
        for start, n in ((0, 24), (24, 24), (13, 30), (47, 2)):
            assert torch.equal(ref.load(1, start, n), want[:, start:start + n]), (name, start, n)
        if want.dim() == 3:
            assert torch.equal(ref.load(2, 3, 10), want[:, :, 3:13])


def test_gpt_oss_refusals(hf):
    """What the engine does not reproduce is refused by name before any work: router logits in the outputs, a layer
    type other than sliding / full attention, sliding layers without a window, a transformers-quantised model (the
    released MXFP4 files: dequantise to bf16 first)."""
    cases = [(dict(output_router_logits=True), {}, UnsupportedModelError, "output_router_logits"),
             (dict(layer_types=["sliding_attention", "chunked_attention"]), {}, UnsupportedModelError, "layer_types"),
             (dict(sliding_window=None), {}, UnsupportedModelError, "sliding_attention layers and sliding_window=None"),
             (dict(quantization_config={"quant_method": "mxfp4"}), {}, UnsupportedModelError, "mxfp4")]
    for config, options, error, match in cases:
        model = copy.deepcopy(hf)
        for key, value in config.items():
            setattr(model.config, key, value)
        with pytest.raises(error, match=match):
            optimised_copy(model, max_seq_len=64, **options)
