"""The Llama-like families added to policies/llama.py's table, against the unmodified HF model (tiny random configs
with random norm weights, tests/helpers.py LLAMA_LIKE_FAMILIES): OLMo 2 (no input norms, output norms scaled in fp32,
q / k norms over the whole projection), OLMo 3 (+ sliding / full layers, a rope table each), GLM-4 (sandwich norms,
packed gate|up, interleaved rotary on half of each head, q/k/v biases), GLM (the same without the sandwich), SmolLM3
(a NoPE layer), Seed-OSS (biases everywhere, head_dim != hidden / heads), ERNIE 4.5 (interleaved rotary on the whole
head, biases, tied), HunYuan (per-head q / k norms after the rotation, NTK-alpha rope), Exaone 4 (output norms,
per-head q / k norms, a NoPE full layer), Arcee (a plain ReLU-squared MLP), OLMoE (whole-projection q / k norms,
top-2 MoE), Ministral (Qwen 2's blocks, sliding / full layers), the DeepSeek-V3 MoE under GQA attention: GLM-4.5
(partial rotary, q/k/v biases, q / k norms), Sarvam, dots.llm1 (Qwen 3's attention, a sliding layer), EXAONE MoE
(Exaone 4's attention, dense / sparse by mlp_layer_types); FlexOlmo (OLMo 2's blocks, OLMoE's MoE) and MiniMax-M2
(whole-projection q / k norms, partial rotary, a sigmoid router with a correction bias), GraniteMoE and
GraniteMoE-Shared (Granite's multipliers, the residual one folded into every down, softmax over the top-k logits);
EXAONE 3, InternLM 3 (random biases), IQuest-Coder, CWM (a sliding layer, llama3 rope), Helium (interleaved rotary,
random biases), Solar Open (DeepSeek-V3's MoE in every layer), Mellum (per-head q / k norms, a rope table per layer
type, a dense layer then softmax top-2 MoE layers), HunYuan MoE (q / k norms after the rotation, top-2 MoE + shared
MLP), VaultGemma (Gemma 2's blocks without the output norms), Granite SWA (Granite's multipliers, attention sinks, a
rope base per layer: sliding, full, NoPE) and Granite MoE SWA (the same with a top-2 MoE + shared MLP), HyperCLOVA X
(Granite's multipliers with the logits multiplied, Peri-LN output norms; and without them), NanoChat (weightless
RMSNorms, the embeddings' too, q / k norms after a sign-flipped rotation, ReLU squared, soft-capped logits), Apertus
(per-head q / k norms, a plain MLP with xIELU, its parameters random per layer; llama3 rope).
fp32 logits atol 2e-4 / rtol 1e-4 on a left-padded batch and greedy tokens identical; bf16 prompt and decode-step
logits within the bf16 tolerance; for some, int8, offload on both tiers, a checkpoint on meta and TP=2;
the refused settings. Through the Triton kernels:
tests/kernels/test_engine_triton_path.py::test_llama_like_family_through_triton_matches_hf."""

import copy

import pytest
import torch

import lightning_dsinfer as dsi
from helpers import (LLAMA_LIKE_FAMILIES, assert_fp32_matches_quantised, fake_quantised_int8, optimised_copy,
                     padded_batch, routing_margins, streamed_copy, tiny_model)
from lightning_dsinfer.kernels import reference
from multiproc import run_ranks

FAMILIES = list(LLAMA_LIKE_FAMILIES)
ATOL, RTOL = 2e-4, 1e-4

# what each family's blocks must be built as (the block type, and the attention's where it is not Attention)
BLOCKS = {"olmo2": ("PostNormDecoderLayer", "ProjectionNormAttention"),
          "olmo3": ("PostNormDecoderLayer", "ProjectionNormAttention"),
          "exaone4": ("PostNormDecoderLayer", "Attention"), "glm4": ("SandwichDecoderLayer", "Attention"),
          "olmoe": ("DecoderLayer", "ProjectionNormAttention"),
          "flex_olmo": ("PostNormDecoderLayer", "ProjectionNormAttention"),
          "minimax_m2": ("DecoderLayer", "ProjectionNormAttention"),
          "hunyuan_v1_dense": ("DecoderLayer", "RotaryFirstAttention"),
          "hunyuan_v1_moe": ("DecoderLayer", "RotaryFirstAttention"),
          "ministral3": ("DecoderLayer", "TemperatureTunedAttention"),
          "hyperclovax": ("SandwichDecoderLayer", "Attention"), "nanochat": ("DecoderLayer", "RotaryFirstAttention"),
          "afmoe": ("SandwichDecoderLayer", "OutputGatedAttention"), "kolibri1": ("SandwichDecoderLayer", "Attention")}
# the ones whose decode steps must stay on the per-op path: output-only norms, whole-projection q / k norms or norms
# after the rotation, MoE, NoPE layers among rotary ones (Arcee's ReLU squared: taken, since cpu_gemv.act has it)
MOE = ("olmoe", "glm4_moe", "sarvam_moe", "dots1", "exaone_moe", "flex_olmo", "minimax_m2", "granitemoe",
       "granitemoeshared", "ernie4_5_moe", "solar_open", "mellum", "hunyuan_v1_moe", "granitemoe_swa", "hy_v3",
       "afmoe", "mimo_v2_flash", "flint", "kolibri1")
PER_OP = ("olmo2", "olmo3", "exaone4", "hunyuan_v1_dense", "smollm3", "nanochat", *MOE)
# bf16: OLMoE's seed 0 has a routing decision within 7e-4 (a bf16 rounding of the router's input flips it)
BF16_SEEDS = {"olmoe": 2}
# bf16 for the sigmoid-routed families: every expert routed (top-k = all, every group kept), so no near tie in HF's
# choice can flip under bf16 rounding and make the comparison meaningless; the weights are still the router's
ALL_ROUTED = {"glm4_moe": dict(num_experts_per_tok=8, topk_group=4), "sarvam_moe": dict(num_experts_per_tok=6),
              "dots1": dict(num_experts_per_tok=8, topk_group=2), "exaone_moe": dict(num_experts_per_tok=8),
              "minimax_m2": dict(num_experts_per_tok=4), "flex_olmo": dict(num_experts_per_tok=4),
              "granitemoe": dict(num_experts_per_tok=4), "granitemoeshared": dict(num_experts_per_tok=4),
              "ernie4_5_moe": dict(num_experts_per_tok=4), "solar_open": dict(num_experts_per_tok=8, topk_group=2),
              "mellum": dict(num_experts_per_tok=4), "hunyuan_v1_moe": dict(moe_topk=4),
              "granitemoe_swa": dict(num_experts_per_tok=4), "hy_v3": dict(num_experts_per_tok=4),
              "afmoe": dict(num_experts_per_tok=4), "mimo_v2_flash": dict(num_experts_per_tok=8, topk_group=2),
              "flint": dict(num_experts_per_tok=4), "kolibri1": dict(num_experts_per_tok=4)}


def _generate_positions(mask: torch.Tensor) -> torch.Tensor:
    """The position ids generate gives a left-padded batch (numbered from each row's first token). A forward without
    them numbers every row from its first column: a rotary model sees the same scores either way, except HunYuan,
    whose q / k norms come after the rotation."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _bf16_continuation(hf):
    """(ids, mask, the mask over prompt + 6 new tokens, generate's positions over it, HF's greedy continuation, HF's
    fp32 logits over it) of the bf16 tests' left-padded batch."""
    ids, mask = padded_batch([12, 5, 9], seed=1)
    full = torch.cat([mask, torch.ones(3, 6, dtype=mask.dtype)], dim=1)
    pos = _generate_positions(full)
    with torch.no_grad():
        seq = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        want = hf(input_ids=seq, attention_mask=full, position_ids=pos).logits.float()
    return ids, mask, full, pos, seq, want


def _decode_steps(ref, opt, ids, mask, new):
    """(ours' greedy tokens, the logits of each of ours' decode steps on the engine's own cache, HF's logits of a
    full forward of those tokens at the same positions, teacher-forced: every decode step compared whatever near ties
    do to the tokens)."""
    out = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_scores=True,
                       return_dict_in_generate=True)
    full = torch.cat([mask, torch.ones(len(ids), new, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        again = ref(input_ids=out.sequences, attention_mask=full, position_ids=_generate_positions(full)).logits
    return out.sequences, torch.stack(out.scores, dim=1).float(), again[:, -new - 1:-1].float()


def _assert_same(ref, opt, seed=1, new=10, lengths=(12, 5, 9, 3)):
    """fp32: logits of a left-padded prompt, greedy tokens and the decode steps' logits as HF's."""
    ids, mask = padded_batch(list(lengths), seed=seed)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        tokens = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    got = opt(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=RTOL)
    ours, steps, want_steps = _decode_steps(ref, opt, ids, mask, new)
    assert torch.equal(ours, tokens)
    torch.testing.assert_close(steps, want_steps, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_like_family_matches_hf(family):
    hf = tiny_model(family)
    opt = optimised_copy(hf, max_seq_len=64)
    layers = opt._dsinfer_engine.decoder.layers
    block, attention = BLOCKS.get(family, ("DecoderLayer", "Attention"))
    assert {(type(ly).__name__, type(ly.attn).__name__) for ly in layers} == {(block, attention)}
    # the per-layer settings reached the blocks: NoPE layers (SmolLM3's no_rope_layers, Exaone 4's full layers),
    # windows, OLMo 3's rope table of the sliding layers
    if family in ("smollm3", "exaone4"):
        assert [ly.attn.rotary for ly in layers] == [True, False]
    if family == "afmoe":     # (the sliding layers rotate, the full one is NoPE; a dense layer, then the MoE ones)
        assert [(ly.attn.sliding, ly.attn.rotary) for ly in layers] == [(True, True), (False, False), (True, True)]
        assert [type(ly.mlp).__name__ for ly in layers] == ["GatedMLP", "MoEMLP", "MoEMLP"]
    if family == "flint":       # (sinks everywhere; the sliding layer rotates, the full ones are NoPE)
        assert [(ly.attn.sliding, ly.attn.rotary, ly.attn.sinks is not None) for ly in layers] == [
            (False, False, True), (True, True, True), (False, False, True)]
    if family == "mimo_v2_flash":     # (the sliding layers: twice the KV heads, sinks, a rope table of their own)
        assert [(ly.attn.sliding, ly.attn.hkv, ly.attn.sinks is not None) for ly in layers] == [
            (False, 2, False), (True, 4, True), (True, 4, True)] and opt._dsinfer_engine.rotary.sliding
    if family == "cwm":
        assert [ly.attn.sliding for ly in layers] == [True, False]
    if family == "mellum":
        assert [ly.attn.sliding for ly in layers] == [True, False, True] and opt._dsinfer_engine.rotary.sliding
        assert [type(ly.mlp).__name__ for ly in layers] == ["GatedMLP", "MoEMLP", "MoEMLP"]
    if family == "olmo3":
        assert [ly.attn.sliding for ly in layers] == [True, False, True] and opt._dsinfer_engine.rotary.sliding
    if family in ("granite_swa", "granitemoe_swa"):   # (a rope base per layer: the sliding one's table, the full
        #                                                   one's, a NoPE full layer)
        assert [(ly.attn.sliding, ly.attn.rotary) for ly in layers] == [(True, True), (False, True), (False, False)]
        assert opt._dsinfer_engine.rotary.sliding and all(ly.attn.sinks is not None for ly in layers)
    _assert_same(hf, opt)


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_like_family_bf16(family):
    """bf16: the prompt's logits and the logits of HF's own greedy continuation (teacher-forced), and the decode steps
    on the engine's own cache, within 6e-2 / 2e-2 of HF's bf16 logits (OLMo 2 / 3 and ERNIE 4.5 rotate in fp32 in HF,
    the engine in bf16: the same tolerance holds). The one-call C decode step declines the blocks it does not
    implement (``PER_OP``); where it takes a family's blocks, its steps equal the per-op path's bit for bit."""
    hf = tiny_model(family, seed=BF16_SEEDS.get(family, 0), **ALL_ROUTED.get(family, {})).to(torch.bfloat16)
    opt = optimised_copy(hf, max_seq_len=64, dtype=torch.bfloat16)
    ids, mask, full, pos, seq, want = _bf16_continuation(hf)
    if family == "olmoe":         # premise, checked (as tests/test_moe.py): no near-tie routing decision in HF's run
        margins = routing_margins(hf, input_ids=seq, attention_mask=full, position_ids=pos)
        assert margins[:, full.flatten().bool()].min() >= 2e-3
    got = opt(input_ids=seq, attention_mask=full, position_ids=pos).logits.float()
    torch.testing.assert_close(got[full.bool()], want[full.bool()], atol=6e-2, rtol=2e-2)
    _, steps, want_steps = _decode_steps(hf, opt, ids, mask, 6)       # [B, 6, V]: positions 11..16 predict 12..17
    torch.testing.assert_close(steps, want_steps, atol=6e-2, rtol=2e-2)
    if family in PER_OP:          # blocks the one-call C decode step does not implement: it must decline them
        assert not opt._dsinfer_engine.decoder._stack
    elif opt._dsinfer_engine.decoder._stack:       # where it took them: the same steps as the per-op path, bit for bit
        per_op = optimised_copy(hf, max_seq_len=64, dtype=torch.bfloat16)
        per_op._dsinfer_engine.decoder._stack = None
        again = per_op.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                output_scores=True, return_dict_in_generate=True)
        assert torch.equal(torch.stack(again.scores, dim=1).float(), steps)


@pytest.mark.parametrize("family", ["olmo2", "glm4", "smollm3", "exaone4", "olmoe", "glm4_moe", "minimax_m2",
                                    "hy_v3", "afmoe", "mimo_v2_flash", "flint", "kolibri1"])
def test_llama_like_family_int8_matches_fake_quantised_hf(family):
    hf = tiny_model(family)
    assert_fp32_matches_quantised(fake_quantised_int8(hf), optimised_copy(hf, max_seq_len=64, quantize="int8"))


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
@pytest.mark.parametrize("family", ["olmo2", "glm4", "glm4_moe", "mimo_v2_flash"])
def test_llama_like_family_offload_matches_hf(family, tier, tmp_path):
    """Streamed in block halves under a budget that streams most units: OLMo 2's attention half has no input norm and
    hands the MLP half the stream itself; GLM-4's halves hold one output norm each; MiMo-V2-Flash's units hold its
    padded values and its layers' own KV head counts."""
    hf = tiny_model(family)
    _assert_same(hf, streamed_copy(hf, tier, tmp_path))


def test_llama_like_families_from_checkpoint_on_meta(tmp_path):
    """From what save_pretrained writes: GLM-4's packed gate|up and reordered q / k rows and biases read as row pieces
    of the files, OLMo 2's whole-projection norms, OLMoE's experts, ERNIE 4.5's tied embeddings; the experts one by
    one (stacked on read) and the correction biases where transformers stores them: GLM-4.5's (and EXAONE MoE's, which
    transformers renames on load) in the router, MiniMax-M2's (renamed too) in the block; GraniteMoE-Shared's 3D
    input_linear / output_linear experts and its shared MLP's packed gate | up; EXAONE 3's checkpoint names
    (transformer.h.*, attn.attention.*, c_fc_0 / c_fc_1 / c_proj, ln_1 / ln_2: renamed on load), Helium's reordered q / k
    rows and biases, Solar Open's, Mellum's and HunYuan MoE's experts one by one (HunYuan's router is mlp.gate.wg),
    Granite MoE SWA's packed shared MLP and sinks, NanoChat's negated rotary rows, Apertus' xIELU parameters read from
    the files, Hy3's router, correction bias and shared experts under its checkpoints' names (mlp.router.gate,
    mlp.expert_bias, mlp.shared_mlp: renamed on load), AFMoE's experts one by one and its attention's gate rows,
    MiMo-V2-Flash's padded and scaled values from the files, Flint's sinks under their checkpoint name
    (softmax_offset), Kolibri-1's experts one by one and its router's correction bias."""
    from transformers import AutoModelForCausalLM

    for family in ("glm4", "olmo2", "olmoe", "ernie4_5", "glm4_moe", "exaone_moe", "minimax_m2", "granitemoeshared",
                   "ministral3", "ernie4_5_moe", "exaone", "helium", "solar_open", "mellum", "hunyuan_v1_moe",
                   "granitemoe_swa", "nanochat", "apertus", "hy_v3",
                   "afmoe", "mimo_v2_flash", "flint", "kolibri1"):
        hf = tiny_model(family)
        hf.save_pretrained(tmp_path / family)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(hf.config)
        opt = dsi.init_inference(meta, checkpoint=str(tmp_path / family), max_seq_len=64, dtype=torch.float32)
        _assert_same(hf, opt, new=6)


def test_llama_like_families_tensor_parallel():
    """TP=2: OLMo 2 / 3's and OLMoE's q / k norms over the whole projection with each rank's sums of squares
    all-reduced (OLMoE's experts sliced too), GLM-4's reordered q / k rows and biases and packed gate|up sliced by
    heads and rows; GLM-4.5's and MiniMax-M2's sigmoid-routed experts sliced; Ministral 3's scaled queries by heads.
    Logits, greedy, beam search as HF's,
    sampling agrees across ranks."""
    tp = ["olmo2", "olmo3", "glm4", "olmoe", "glm4_moe", "minimax_m2", "ministral3", "ernie4_5_moe", "helium",
          "hunyuan_v1_moe", "hy_v3", "afmoe", "mimo_v2_flash", "flint", "kolibri1"]
    codes, outs, _ = run_ranks("tp_worker.py", 2, ["--tp", "2", "--families", *tp], timeout=300)
    assert codes == [0, 0], "\n".join(outs)
    assert outs[0].count(" OK") == len(tp), outs[0]


def test_projection_norm_split_over_ranks_equals_the_whole():
    """``reference.projection_rms_norm`` on 2 ranks (q heads split, the one KV head replicated on both, the sums of
    squares summed by a stand-in all-reduce) equals the norm over the whole projection, in fp32 and with fp32 weights
    on bf16 rows (OLMo 2) or weights in the rows' dtype (OLMoE)."""
    g = torch.Generator().manual_seed(0)
    d, eps = 8, 1e-6
    for dtype, weight_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                (torch.bfloat16, torch.bfloat16)):
        q = torch.randn(3, 5, 4 * d, generator=g).to(dtype)
        k = torch.randn(3, 5, d, generator=g).to(dtype)
        wq = torch.randn(4 * d, generator=g).to(weight_dtype)
        wk = torch.randn(d, generator=g).to(weight_dtype)
        whole_q, whole_k = reference.projection_rms_norm(q, k, wq, wk, eps)
        shards = [(q[..., :2 * d], k, wq[:2 * d], wk), (q[..., 2 * d:], k, wq[2 * d:], wk)]
        total = sum(torch.stack((a.float().square().sum(-1), b.float().square().sum(-1)), -1) for a, b, _, _ in shards)
        outs = [reference.projection_rms_norm(*shard, eps, reduce=lambda s: s.copy_(total), ranks=2)
                for shard in shards]
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)  # (a bf16 ulp)
        torch.testing.assert_close(torch.cat([o[0] for o in outs], -1), whole_q, **tol)
        for _, k_out in outs:
            torch.testing.assert_close(k_out, whole_k, **tol)


@pytest.mark.parametrize("family,flag,match", [
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv=8.0"),
    ("smollm3", {"use_sliding_window": False}, "use_sliding_window=False"),
    ("arcee", {"hidden_act": "gelu_new"}, "hidden_act='gelu_new' is not supported"),
    ("glm4", {"hidden_act": "relu"}, "hidden_act='relu' is not supported"),
    # (HunYuan's "dynamic" rope with an alpha is static and runs; without one its frequencies follow the length)
    ("hunyuan_v1_dense", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
     "rope_type='dynamic' changes its frequencies"),
    ("granite_swa", {"layer_rope_theta": [1000.0, 100000.0, 50000.0]}, "several rope bases among the full_attention"),
    ("mimo_v2_flash", {"v_head_dim": 24}, "v_head_dim=24 wider than head_dim=16"),
])
def test_unsupported_settings_are_refused(family, flag, match):
    with pytest.raises(dsi.UnsupportedModelError, match=match):
        dsi.init_inference(tiny_model(family, **flag))


def test_hyperclovax_without_post_norms():
    """HyperCLOVA X with use_post_norm=False (no Peri-LN output norms: Granite's blocks, the residual multiplier folded
    into o / down, the logits multiplied): logits, greedy and decode steps as HF's."""
    hf = tiny_model("hyperclovax", use_post_norm=False)
    opt = optimised_copy(hf, max_seq_len=64)
    assert {type(ly).__name__ for ly in opt._dsinfer_engine.decoder.layers} == {"DecoderLayer"}
    _assert_same(hf, opt, new=4, lengths=(9, 4))


def test_ministral3_query_scale_by_position():
    """Ministral 3 scales each query by 1 + beta log(1 + floor(position / original context)): it matters on the tiny
    model (HF's own logits move without it); in bf16 the one-call C decode step (which does not scale) runs exactly the
    steps whose positions are all below the original context, where the scale is 1, and those equal the per-op
    path's bit for bit."""
    from lightning_dsinfer.modules import cpu_stack

    hf = tiny_model("ministral3")
    ids, mask = padded_batch([12, 5, 9], seed=1)
    unscaled = copy.deepcopy(hf)
    unscaled.config.rope_parameters["llama_4_scaling_beta"] = 0.0
    with torch.no_grad():
        assert (hf(input_ids=ids, attention_mask=mask).logits
                - unscaled(input_ids=ids, attention_mask=mask).logits)[mask.bool()].abs().max() > 1e-2
    for original, c_steps in ((4, 0), (1000, 5)):     # (5 of the 6 steps run in C when the scale is 1 throughout)
        model = copy.deepcopy(hf).to(torch.bfloat16)
        model.config.rope_parameters["original_max_position_embeddings"] = original
        calls = []
        real = cpu_stack.CpuDecodeStack.__call__
        cpu_stack.CpuDecodeStack.__call__ = lambda self, h, step: calls.append(1) or real(self, h, step)
        try:
            opt = optimised_copy(model, max_seq_len=64, dtype=torch.bfloat16)
            out = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                               output_scores=True, return_dict_in_generate=True)
        finally:
            cpu_stack.CpuDecodeStack.__call__ = real
        if opt._dsinfer_engine.decoder._stack is None:
            pytest.skip("no one-call C decode step on this CPU")
        assert len(calls) == c_steps, (original, len(calls))
        per_op = optimised_copy(model, max_seq_len=64, dtype=torch.bfloat16)
        per_op._dsinfer_engine.decoder._stack = None
        again = per_op.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                output_scores=True, return_dict_in_generate=True)
        assert torch.equal(torch.stack(again.scores, 1), torch.stack(out.scores, 1))


@pytest.mark.parametrize("family,kept", [("hunyuan_v1_moe", ["mlp.gate.wg.weight"]),
                                         ("hy_v3", ["mlp.gate.weight", "mlp.e_score_correction_bias"]),
                                         ("afmoe", ["mlp.expert_bias"])])
def test_moe_router_kept_in_fp32(family, kept, tmp_path):
    """HunYuan MoE builds its router (mlp.gate.wg) in fp32, Hy3 its router and correction bias, AFMoE its correction
    bias, and from_pretrained in bf16 keeps them there: HF then routes on fp32 logits of the input cast to fp32 with
    fp32 weights (and chooses on fp32 scores + the fp32 bias), and so does the engine: its router and bias equal HF's
    fp32 tensors; bf16 logits of the prompt and HF's greedy continuation within the bf16 tolerance (every expert
    routed: no near tie)."""
    from transformers import AutoModelForCausalLM

    tiny_model(family, **ALL_ROUTED[family]).save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    opt = optimised_copy(hf, max_seq_len=64, dtype=torch.bfloat16)
    sparse = [(i, ly.mlp) for i, ly in enumerate(opt._dsinfer_engine.decoder.layers) if hasattr(ly.mlp, "router")]
    assert sparse
    for i, mlp in sparse:
        theirs = dict((*hf.model.layers[i].named_parameters(), *hf.model.layers[i].named_buffers()))
        for name in kept:
            ours = mlp.router if name.endswith("weight") else mlp.router_bias
            assert theirs[name].dtype == ours.dtype == torch.float32 and torch.equal(ours, theirs[name]), name
    ids, mask, full, pos, seq, want = _bf16_continuation(hf)
    got = opt(input_ids=seq, attention_mask=full, position_ids=pos).logits.float()
    torch.testing.assert_close(got[full.bool()], want[full.bool()], atol=6e-2, rtol=2e-2)
