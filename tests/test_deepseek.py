"""DeepSeek-V2 / V3 on the fused engine (policies/deepseek.py, modules/mla.py), against the unmodified HF model:
latent attention in its absorbed form (the cache holds the latent and the rotary key only), the q low rank or a
plain q_proj, interleaved or rotate-half rotary, yarn; the routers (V3: sigmoid scores, correction bias, groups
scored by their two best, renormalised and scaled; V2: softmax, greedy or group-limited by the best expert), the
shared experts, the dense first layers. fp32 logits atol 2e-4 / rtol 1e-4 on a left-padded batch and greedy / beam
tokens identical; bf16 within its tolerance; int8, offload on both tiers, a checkpoint on meta (experts stored one by
one), tensor, expert and pipeline parallelism; MiniCPM3 (the same attention, dense MLPs, its scales). The Triton path:
tests/kernels/test_engine_triton_path.py."""

import pytest
import torch

import lightning_dsinfer as dsi
from helpers import (assert_bf16_follows_hf, assert_bf16_within_hf_error, assert_fp32_matches_quantised,
                     assert_matches_hf, fake_quantised_int8, optimised_copy, padded_batch, streamed_copy, tiny_model)
from multiproc import run_ranks

ATOL, RTOL = 2e-4, 1e-4

VARIANTS = {
    "v3": ("deepseek_v3", {}),
    "v3-rotate-half-greedy": ("deepseek_v3", {"rope_interleave": False, "n_group": 1, "topk_group": 1,
                                              "norm_topk_prob": False, "q_lora_rank": None}),
    "v2-lite": ("deepseek_v2", {}),
    "v2-greedy-low-rank": ("deepseek_v2", {"topk_method": "greedy", "q_lora_rank": 32}),
    "glm4-moe-lite": ("glm4_moe_lite", {}),
    "v3.2": ("deepseek_v32", {}),                  # (sparse attention, dense up to index_topk = max_seq_len = 64 keys)
    "glm-moe-dsa": ("glm_moe_dsa", {}),
    "axk1": ("axk1", {}),                          # (V3 with its MoE blocks' outputs normed)
    "sarvam-mla": ("sarvam_mla", {}),              # (V3's model, plain q_proj, one group)
}


def _assert_same(ref, opt, new=10):
    assert_matches_hf(ref, opt, *padded_batch([12, 5, 9, 3], seed=1), new_tokens=new)


@pytest.mark.parametrize("family,overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_deepseek_matches_hf(family, overrides):
    hf = tiny_model(family, **overrides)
    opt = optimised_copy(hf, max_seq_len=64)
    engine = opt._dsinfer_engine
    config = hf.config
    # the cache holds one latent row (kv_lora_rank + rotary key) per token and layer, no values of its own
    width = config.kv_lora_rank + config.qk_rope_head_dim
    assert engine.cache.keys_only and engine.cache.k[0].shape[1:] == (1, 64, width)
    assert type(engine.decoder.layers[0].attn).__name__ == "LatentAttention"
    assert [type(layer.mlp).__name__ for layer in engine.decoder.layers] == [
        "GatedMLP", *["MoEMLP"] * (config.num_hidden_layers - 1)]
    if family == "axk1":        # (the MoE blocks: the MLP's output normed, the attention's added as it is)
        assert [(type(ly).__name__, ly.attn_out_norm is None, getattr(ly, "mlp_out_norm", None) is None)
                for ly in engine.decoder.layers[1:]] == [("SandwichDecoderLayer", True, False)] * 2
    _assert_same(hf, opt)
    ids, mask = padded_batch([6, 9], seed=2)      # beam search through HF's loop and its cache, over the engine
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    with torch.no_grad():
        assert torch.equal(opt.generate(**kw), hf.generate(**kw))


@pytest.mark.parametrize("form", ["absorbed", "expanded"])
def test_both_prompt_forms_match_hf(form):
    """Prompts take latent attention's expanded form or its absorbed one by their FLOPs (decode steps: absorbed).
    Each form forced on every prompt gives HF's logits and tokens: a whole left-padded prompt, and a prompt in two
    chunks through HF's cache (the second chunk's queries over the first's cached latents too)."""
    from lightning_dsinfer.modules.mla import LatentAttention

    hf = tiny_model("deepseek_v3")
    opt = optimised_copy(hf, max_seq_len=64)
    layers = [m for m in opt._dsinfer_engine.decoder.modules() if isinstance(m, LatentAttention)]
    assert layers and all(m.expands(12, 12) and not m.expands(1, 12) for m in layers)    # (the automatic choice)
    for m in layers:
        m.form = form
    _assert_same(hf, opt, new=6)
    ids, mask = padded_batch([12, 5, 9, 7], seed=3)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        first = opt(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        second = opt(input_ids=ids[:, 6:], attention_mask=mask, past_key_values=first.past_key_values, use_cache=True)
    got, valid = torch.cat((first.logits, second.logits), dim=1), mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=RTOL)


def test_prompt_form_follows_the_flops():
    """The choice for DeepSeek-V3's shapes (kv_lora_rank 512, nope 128, v 128): per head, absorbed costs
    T L 1024 + T 512 256, expanded L 512 256 + T L 256 multiply-adds (T queries over L keys)."""
    from types import SimpleNamespace

    from lightning_dsinfer.modules.mla import LatentAttention

    v3 = SimpleNamespace(rank=512, nope=128, vdim=128, form="auto")
    assert LatentAttention.expands(v3, 8, 8) and LatentAttention.expands(v3, 2048, 2048)   # whole prompts
    assert not LatentAttention.expands(v3, 1, 4096)                                        # decode
    assert not LatentAttention.expands(v3, 100, 4096) and LatentAttention.expands(v3, 200, 4096)  # after a prefix


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2"])
def test_latent_norms_keep_their_own_eps(family):
    """HF builds q_a_layernorm and kv_a_layernorm with RMSNorm's default eps (1e-6), not with config.rms_norm_eps
    (which only the block and final norms take): a config whose rms_norm_eps differs (0.5 here, large enough to show
    in fp32) must still give HF's logits and tokens (V3: both latent norms; V2-Lite: kv_a_layernorm only)."""
    hf = tiny_model(family, rms_norm_eps=0.5)
    assert hf.model.layers[0].self_attn.kv_a_layernorm.variance_epsilon == 1e-6      # premise: not rms_norm_eps
    _assert_same(hf, optimised_copy(hf, max_seq_len=64), new=4)


def test_routers_match_hf():
    """The routing alone, on many tokens: V3's (groups, bias, renormalised, scaled) and V2's (group-limited by the
    best expert, scaled) choose HF's experts with HF's weights."""
    from lightning_dsinfer.kernels import reference
    from lightning_dsinfer.policies.deepseek import routing_of

    for family, overrides in (("deepseek_v3", {}), ("deepseek_v2", {}), ("deepseek_v2", {"topk_method": "greedy"})):
        hf = tiny_model(family, **overrides)
        gate = hf.model.layers[1].mlp.gate
        x = torch.randn(200, hf.config.hidden_size)
        with torch.no_grad():
            _, want_w, want_ids = gate(x)
        bias = getattr(gate, "e_score_correction_bias", None)
        w, ids = reference.moe_topk(x, gate.weight, hf.config.num_experts_per_tok, routing=routing_of(hf.config),
                                    bias=bias)
        order, want_order = ids.argsort(-1), want_ids.argsort(-1)
        assert torch.equal(ids.gather(1, order), want_ids.gather(1, want_order))
        torch.testing.assert_close(w.gather(1, order), want_w.gather(1, want_order))


def test_deepseek_bf16():
    """bf16, every expert routed (top-k = all, so no near tie of the router flips an expert between two bf16 runs and
    what is compared is the arithmetic): the prompt's logits and the decode steps' (teacher-forced on HF's greedy
    continuation) within the bf16 tolerance of HF's bf16 model, and no further from the fp32 model than HF's bf16
    model is (the absorbed attention rounds its latent queries where HF rounds its expanded keys)."""
    for family in ("deepseek_v3", "deepseek_v2", "axk1"):
        everything = dict(num_experts_per_tok=8, topk_group=4 if family != "axk1" else 2)
        truth = tiny_model(family, **everything)
        hf = tiny_model(family, **everything).to(torch.bfloat16)
        opt = optimised_copy(hf, max_seq_len=64, dtype=torch.bfloat16)
        if family == "axk1":    # (its normed MoE outputs carry HF's own bf16 error to ~0.075, past the fixed bound)
            assert_bf16_within_hf_error(truth, hf, opt)
        else:
            assert_bf16_follows_hf(truth, hf, opt)


def test_deepseek_int8_matches_fake_quantised_hf():
    """int8 block linears (q_a | kv_a, q_b, o, the dense MLP, the experts, the shared experts; kv_b and the fp32
    router as they are) against HF over the same quantise-dequantised weights (A.X-K1, Sarvam-MLA: V3's code under
    their blocks)."""
    for family in ("deepseek_v3", "deepseek_v2", "axk1", "sarvam_mla"):
        hf = tiny_model(family)
        assert_fp32_matches_quantised(fake_quantised_int8(hf), optimised_copy(hf, max_seq_len=64, quantize="int8"))


def test_latent_attention_linears_count_as_int8_in_the_fit_check():
    """The size the fit check and offload="auto" use (``engine._weight_bytes``): with quantize="int8" / "int4" the
    latent attention's q_a_proj (V2-Lite: q_proj), q_b_proj and kv_a_proj_with_mqa are block linears the engine holds
    quantised (int8: a byte a weight, an fp32 scale a row; int4: half a byte, an fp32 scale a group), as o_proj, the
    dense / shared MLPs and the routed experts' 3D tensors are; kv_b_proj and the router are not."""
    from lightning_dsinfer.engine import _weight_bytes

    quantised = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj", "gate_proj", "up_proj", "down_proj")
    for family in ("deepseek_v3", "deepseek_v2"):
        hf = tiny_model(family)
        full = _weight_bytes(hf, torch.bfloat16, None)
        linears = [p for n, p in hf.named_parameters() if p.dim() == 2 and n.split(".")[-2] in quantised]
        experts = [p for n, p in hf.named_parameters() if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
        assert linears and experts and all(p.dim() == 3 for p in experts)
        saved = (sum(p.numel() - 4 * p.shape[0] for p in linears)                  # 2 bytes -> 1 byte + 4 per row
                 + sum(p.numel() - 4 * p.shape[0] * p.shape[1] for p in experts))  # [E, N, K]: a scale per row
        assert full - _weight_bytes(hf, torch.bfloat16, "int8") == saved, family
        saved = sum(2 * p.numel() - p.numel() // 2 - 4 * p.numel() // 16 for p in linears + experts)
        assert full - _weight_bytes(hf, torch.bfloat16, "int4", 16) == saved, family


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
@pytest.mark.parametrize("family", ["deepseek_v3", "axk1"])
def test_deepseek_offload_matches_hf(family, tier, tmp_path):
    """Streamed under a budget that streams most units (A.X-K1: its MoE blocks' halves, the MLP's holding the output
    norm)."""
    hf = tiny_model(family)
    _assert_same(hf, streamed_copy(hf, tier, tmp_path))


@pytest.mark.parametrize("family", ["minicpm3", "youtu"])
def test_dense_latent_attention_families_match_hf(family, tmp_path):
    """Latent attention with dense SwiGLU MLPs in every block. MiniCPM3: V2's attention with rotate-half rope; the
    embeddings x scale_emb, each residual branch x scale_depth / sqrt(layers) (folded into o_proj and down_proj), the
    final states / (hidden / dim_model_base). Youtu-LLM: V3's attention (interleaved rope), tied embeddings. fp32:
    prompt, greedy, each decode step against HF's own steps, beam search; int8 vs the fake-quantised HF; a checkpoint
    on meta; the disk tier; bf16 within its tolerance (Youtu: within HF's own bf16 error)."""
    from helpers import assert_steps_match_hf, optimised_from_checkpoint

    hf = tiny_model(family)
    if family == "minicpm3":
        assert hf.config.logits_scaling == 4.0
    opt = optimised_copy(hf, max_seq_len=64)
    engine = opt._dsinfer_engine
    assert {(type(ly.attn).__name__, type(ly.mlp).__name__) for ly in engine.decoder.layers} == {
        ("LatentAttention", "GatedMLP")}
    from lightning_dsinfer.policies import find_policy    # (Youtu's pairs read in rotate-half order, MiniCPM3's as is)
    assert find_policy(hf)(hf, 64).mla.rope_interleave == (family == "youtu")
    assert_steps_match_hf(hf, opt)
    ids, mask = padded_batch([6, 9], seed=2)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    with torch.no_grad():
        assert torch.equal(opt.generate(**kw), hf.generate(**kw))
    assert_fp32_matches_quantised(fake_quantised_int8(hf), optimised_copy(hf, max_seq_len=64, quantize="int8"))
    _assert_same(hf, optimised_from_checkpoint(hf, tmp_path / "ckpt"), new=6)
    _assert_same(hf, streamed_copy(hf, "nvme", tmp_path / "nvme"), new=6)
    bf16 = tiny_model(family).to(torch.bfloat16)
    opt = optimised_copy(bf16, max_seq_len=64, dtype=torch.bfloat16)
    if family == "minicpm3":
        assert_bf16_follows_hf(hf, bf16, opt)
    else:       # (Youtu's tiny model carries HF's own bf16 logits up to ~0.15 from fp32 ones, past a fixed tolerance)
        assert_bf16_within_hf_error(hf, bf16, opt)


def test_deepseek_from_checkpoint_on_meta(tmp_path):
    """From a checkpoint whose experts are stored one by one (``experts.{e}.gate_proj`` ..., as the hub's DeepSeek
    files are), with V3's fp32 correction bias, on a model on meta."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    hf = tiny_model("deepseek_v3")
    hf.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    for name in [n for n in tensors if n.endswith("experts.gate_up_proj")]:
        gate_up, down = tensors.pop(name), tensors.pop(name.replace("gate_up_proj", "down_proj"))
        inter = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            prefix = name.replace("gate_up_proj", f"{e}.")
            tensors.update({prefix + "gate_proj.weight": gate_up[e, :inter].clone(),
                            prefix + "up_proj.weight": gate_up[e, inter:].clone(),
                            prefix + "down_proj.weight": down[e].clone()})
    save_file(tensors, path, metadata={"format": "pt"})
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(hf.config)
    _assert_same(hf, dsi.init_inference(meta, checkpoint=str(tmp_path), max_seq_len=64, dtype=torch.float32), new=6)


@pytest.mark.parametrize("family", ["axk1", "sarvam_mla"])
def test_v3_variants_from_checkpoint_on_meta(family, tmp_path):
    """From what save_pretrained writes: A.X-K1's MoE output norm stored at the block's level (``post_mlp_layernorm``,
    renamed into the MLP on load) and read under that name; Sarvam-MLA's plain q_proj and experts one by one."""
    from helpers import optimised_from_checkpoint

    hf = tiny_model(family)
    _assert_same(hf, optimised_from_checkpoint(hf, tmp_path), new=6)


def test_deepseek_tensor_and_pipeline_parallel():
    """TP=2: heads split (q_b rows, or V2-Lite's q_proj rows inside the fused q | kv_a GEMM; kv_b rows, o columns), the
    latent on every rank, experts sliced (MiniCPM3: its scaled o columns too); PP=2. Logits, greedy, beam search as
    HF's; sampling agrees across ranks. (Expert parallelism runs the same routing code as expert slicing:
    tests/test_moe.py covers it.)"""
    families = ["deepseek_v3", "deepseek_v2", "minicpm3", "youtu", "axk1", "sarvam_mla"]
    codes, outs, _ = run_ranks("tp_worker.py", 2, ["--tp", "2", "--families", *families], timeout=300)
    assert codes == [0, 0], "\n".join(outs)
    assert outs[0].count(" OK") == len(families), outs[0]
    codes, outs, _ = run_ranks("pp_worker.py", 2, ["--pp", "2", "--families", "deepseek_v3"], timeout=300)
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert all(out.count(" OK") == 1 for out in outs), outs


@pytest.mark.parametrize("family,flag,match", [
    ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method='noaux_tc'"),
    ("deepseek_v2", {"mlp_bias": True}, "mlp_bias=True"),
    ("deepseek_v3", {"n_group": 3}, "n_group=3 must divide the 8 routed experts"),
    ("deepseek_v3", {"topk_group": 1}, "do not fit in topk_group=1 groups of 2"),
])
def test_unsupported_settings_are_refused(family, flag, match):
    with pytest.raises(dsi.UnsupportedModelError, match=match):
        dsi.init_inference(tiny_model(family, **flag))


@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa"])
def test_sparse_attention_beyond_index_topk_is_refused(family):
    """DeepSeek Sparse Attention keeps each query's top index_topk keys: up to that many keys, all of them (the dense
    attention the engine runs, tested above); a longer sequence is refused before any work, with the limit."""
    with pytest.raises(dsi.UnsupportedModelError, match="Pass max_seq_len <= 64"):
        dsi.init_inference(tiny_model(family), max_seq_len=65)


def test_prequantised_models_and_fp8_checkpoints_are_refused(tmp_path):
    """A model transformers quantised (its config's quantization_config) and a checkpoint of float8 tensors
    (DeepSeek-V3's released files: fp8 weights with block scales) hold what the policies do not read as weights:
    refused before any work, with the fix."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    hf = tiny_model("deepseek_v3")
    hf.config.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    with pytest.raises(dsi.UnsupportedModelError, match="quant_method='fp8'.*Load the unquantised model"):
        dsi.init_inference(hf)
    del hf.config.quantization_config
    hf.save_pretrained(tmp_path)
    tensors = {n: p.detach().clone() for n, p in hf.state_dict().items()}
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    tensors[name.replace("weight", "weight_scale_inv")] = torch.ones(1, 1)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(hf.config)
    with pytest.raises(ValueError, match="stores 1 float8 tensor .*kv_b_proj.*convert it to bf16 first"):
        dsi.init_inference(meta, checkpoint=str(tmp_path), dtype=torch.float32)
