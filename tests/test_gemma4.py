"""Gemma 4's text model (``gemma4_text``, policies/gemma4.py) on the fused engine, against the unmodified HF model (a
tiny random config, tests/helpers.py: w-scaled norms at random weights, the v norm, sliding layers of 16-wide heads
and full layers of 32-wide heads with one KV head whose values are the keys' projection and a proportional rope, the
last two layers reading earlier layers' K/V with double-wide MLPs, per-layer inputs, random layer scalars, a logit
cap). fp32 logits atol 2e-4 / rtol 1e-4 on a left-padded batch (plain forward, with HF's cache, the caller's
``DynamicCache(config=...)``), greedy tokens identical, every decode step's logits against HF's own steps, beam search
through HF's loop; the 31B-like variant (no per-layer inputs, no shared K/V); bf16 within the bf16 tolerance; int8;
offload on both tiers; a checkpoint on meta; TP=2 (from memory and on the disk tier); the refused settings."""

import copy

import pytest
import torch

from helpers import (assert_bf16_within_hf_error, assert_cache_the_caller_builds, assert_forward_and_generate,
                     assert_fp32_matches_quantised, assert_matches_hf, assert_steps_match_hf, fake_quantised_int4,
                     fake_quantised_int8, optimised_copy, optimised_from_checkpoint, padded_batch, streamed_copy,
                     tiny_model)

FAMILY = "gemma4_text"


def test_gemma4_matches_hf():
    hf = tiny_model(FAMILY)
    opt = optimised_copy(hf, max_seq_len=64)
    engine = opt._dsinfer_engine
    layers = engine.decoder.layers
    assert {(type(ly).__name__, type(ly.attn).__name__) for ly in layers} == {("PerLayerInputLayer",
                                                                               "SharedKVAttention")}
    # each layer's own shape reached its block and its cache: sliding 2 x 16, full 1 x 32, the last two none
    assert [ly.attn.kv_source for ly in layers] == [None, None, None, None, 3, 2]
    assert [(ly.attn.hkv, ly.attn.d) for ly in layers] == [(2, 16), (2, 16), (1, 32), (2, 16), (2, 16), (1, 32)]
    assert [tuple(k.shape[1:]) for k in engine.cache.k] == [(2, 64, 16), (2, 64, 16), (1, 64, 32), (2, 64, 16),
                                                             (2, 0, 16), (1, 0, 32)]
    assert [ly.mlp.down.in_features for ly in layers] == [96, 96, 96, 96, 192, 192]
    assert engine.rotary.sliding is not None
    shared, widths = layers[4].attn, []     # a prompt before decoding: the shared layers run on its last token only
    shared.attend = lambda qkv, step, run=shared.attend: widths.append(qkv.shape[1]) or run(qkv, step)
    assert_steps_match_hf(hf, opt)                          # prompt, greedy, each decode step vs HF's own steps
    assert widths[0] == 12 and set(widths[1:]) == {1}       # (the plain forward first: every token)
    ids, mask = padded_batch([12, 5, 9, 3], seed=2)
    assert_forward_and_generate(hf, opt, ids, mask, new=10)   # plain forward, HF's cache (the shared layers read it)
    assert_cache_the_caller_builds(hf, opt)                  # DynamicCache(config=...): its dummy layers untouched
    kw = dict(input_ids=ids[:2], attention_mask=mask[:2], max_new_tokens=7, num_beams=3, do_sample=False)
    with torch.no_grad():
        assert torch.equal(opt.generate(**kw), hf.generate(**kw))


def test_gemma4_without_per_layer_inputs_or_shared_kv_matches_hf():
    """The 31B's layout: no per-layer inputs, every layer its own K/V; its full layers' KV heads as the sliding ones'."""
    hf = tiny_model(FAMILY, hidden_size_per_layer_input=0, num_kv_shared_layers=0, attention_k_eq_v=False,
                    use_double_wide_mlp=False)
    opt = optimised_copy(hf, max_seq_len=64)
    layers = opt._dsinfer_engine.decoder.layers
    assert all(ly.gate is None and ly.attn.kv_source is None for ly in layers)
    assert opt._dsinfer_engine.decoder.per_layer is None
    assert_steps_match_hf(hf, opt)


def test_gemma4_bf16():
    truth = tiny_model(FAMILY)
    hf = copy.deepcopy(truth).to(torch.bfloat16)
    assert_bf16_within_hf_error(truth, hf, optimised_copy(hf, max_seq_len=64, dtype=torch.bfloat16))


def test_gemma4_int8_and_int4_match_fake_quantised_hf():
    """int8, and int4 in groups of 32 (every block linear's K a multiple: 64, the full layers' o 128, the MLPs' downs
    96 and 192); the per-layer inputs' small linears stay in the dtype."""
    hf = tiny_model(FAMILY)
    assert_fp32_matches_quantised(fake_quantised_int8(hf), optimised_copy(hf, max_seq_len=64, quantize="int8"))
    assert_fp32_matches_quantised(fake_quantised_int4(hf, 32), optimised_copy(hf, max_seq_len=64, quantize="int4",
                                                                               quantize_group_size=32))
    with pytest.raises(ValueError, match="not a multiple of 64"):      # the 96-wide downs: refused before any work
        optimised_copy(hf, max_seq_len=64, quantize="int4", quantize_group_size=64)


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
def test_gemma4_offload_matches_hf(tier, tmp_path):
    hf = tiny_model(FAMILY)
    opt = streamed_copy(hf, tier, tmp_path, dtype=torch.float32)
    # the per-layer table looked up row by row as the embedding is: host memory, or a file read in place
    assert type(opt._dsinfer_engine.decoder.per_layer.table).__name__ == {"cpu": "ResidentRows", "nvme": "FileRows"}[tier]
    ids, mask = padded_batch([12, 5, 9], seed=1)
    assert_matches_hf(hf, opt, ids, mask)
    with torch.no_grad():       # a plain forward (no cache) runs whole, not in chunks over a scratch K/V
        want = hf(input_ids=ids, attention_mask=mask).logits
    got = opt(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=2e-4, rtol=1e-4)


def test_gemma4_from_checkpoint_on_meta(tmp_path):
    hf = tiny_model(FAMILY)
    opt = optimised_from_checkpoint(hf, tmp_path)
    ids, mask = padded_batch([12, 5, 9], seed=1)
    assert_matches_hf(hf, opt, ids, mask)


TP_FAMILIES = {"memory": [FAMILY, "gemma4_moe", "vlm-gemma4_bidirectional", "gemma4_unified_text"],
               "nvme": [FAMILY, "gemma4_moe"], "expert-parallel": ["gemma4_moe"]}


def worker_runs(tmp, selected):
    """The TP=2 runs of test_gemma4_tensor_parallel, in the session's shared launch of two ranks (tests/conftest.py
    ``shared_runs``)."""
    extra = {"memory": [], "nvme": ["--offload", "nvme", "--offload-path", str(tmp / "nvme"), "--max-memory",
                                    "streaming"], "expert-parallel": ["--expert-parallel"]}
    return {2: {f"test_gemma4_tensor_parallel[{mode}]": ["tp_worker.py", "--tp", "2", "--families", *families,
                                                         *extra[mode]] for mode, families in TP_FAMILIES.items()}}


@pytest.mark.parametrize("mode", list(TP_FAMILIES))
def test_gemma4_tensor_parallel(mode, shared_runs):
    """TP=2 from memory and on the disk tier (most units streamed): the sliding layers' two KV heads split, the full
    layers' one replicated, the per-layer inputs whole on both ranks; 26B-A4B's experts sliced, and placed whole two
    per rank (expert parallelism); behind its wrapper with images (sliding-only bidirectional blocks); Gemma 4 unified's
    language model. Logits, greedy, beam search as HF's, sampling agrees across ranks."""
    outs = shared_runs.outputs(2, f"test_gemma4_tensor_parallel[{mode}]")
    assert all(out.count(" OK") == len(TP_FAMILIES[mode]) for out in outs), outs


def _moe_model(top_k=2):
    """26B-A4B's layout on the tiny model (helpers' "gemma4_moe"): 4 GeGLU experts of 32 beside every dense MLP, the
    router's scale and the per-expert scales away from 1."""
    return tiny_model("gemma4_moe", top_k_experts=top_k)


def test_gemma4_experts_beside_the_mlp_match_hf():
    """26B-A4B: the router on the residual stream (unit norm, its scale, hidden_size ** -0.5), softmax top-2
    renormalised times the per-expert scales, GeGLU experts on their own norm of the stream, both outputs normed and
    summed. fp32: prompt, greedy, each decode step against HF's own steps, beam search."""
    hf = _moe_model()
    opt = optimised_copy(hf, max_seq_len=64)
    layers = opt._dsinfer_engine.decoder.layers
    assert all(type(ly.beside.experts).__name__ == "MoEMLP" and type(ly.mlp).__name__ == "GatedMLP" for ly in layers)
    assert_steps_match_hf(hf, opt)
    ids, mask = padded_batch([6, 9], seed=2)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=7, num_beams=3, do_sample=False)
    with torch.no_grad():
        assert torch.equal(opt.generate(**kw), hf.generate(**kw))


def test_gemma4_experts_quantised_offloaded_and_from_a_checkpoint(tmp_path):
    """The experts through int8 / int4 (groups of 32), on both offload tiers (the disk tier reading the routed experts
    on demand) and from a checkpoint on meta; bf16 with every expert routed (no near tie to flip) within HF's own
    bf16 error (``helpers.assert_bf16_within_hf_error``)."""
    hf = _moe_model()
    assert_fp32_matches_quantised(fake_quantised_int8(hf), optimised_copy(hf, max_seq_len=64, quantize="int8"))
    assert_fp32_matches_quantised(fake_quantised_int4(hf, 32), optimised_copy(hf, max_seq_len=64, quantize="int4",
                                                                               quantize_group_size=32))
    ids, mask = padded_batch([12, 5, 9], seed=1)
    for tier in ("cpu", "nvme"):
        opt = streamed_copy(hf, tier, tmp_path / tier, dtype=torch.float32)
        if tier == "nvme":
            assert opt._dsinfer_engine.decoder.experts is not None      # (the routed experts read on demand)
        assert_matches_hf(hf, opt, ids, mask)
    assert_matches_hf(hf, optimised_from_checkpoint(hf, tmp_path / "ckpt"), ids, mask)
    truth = _moe_model(top_k=4)
    hf = copy.deepcopy(truth).to(torch.bfloat16)
    assert_bf16_within_hf_error(truth, hf, optimised_copy(hf, max_seq_len=64, dtype=torch.bfloat16))


def test_gemma4_unified_text_matches_hf(tmp_path):
    """Gemma 4 "unified" (``gemma4_unified_text``, Gemma 4 12B's language model): Gemma 4's blocks without per-layer
    inputs or experts (its config removes those attributes). fp32: prompt, greedy, each decode step against HF's own
    steps; a plain forward and HF's cache; beam search; int8 vs the fake-quantised HF; a checkpoint on meta; bf16 within
    HF's own bf16 error."""
    hf = tiny_model("gemma4_unified_text")
    opt = optimised_copy(hf, max_seq_len=64)
    layers = opt._dsinfer_engine.decoder.layers
    assert [ly.attn.kv_source for ly in layers] == [None, None, None, None, 3, 2]
    assert [(ly.attn.hkv, ly.attn.d) for ly in layers] == [(2, 16), (2, 16), (1, 32), (2, 16), (2, 16), (1, 32)]
    assert all(ly.gate is None and ly.scalar is not None for ly in layers)
    assert opt._dsinfer_engine.decoder.per_layer is None
    assert_steps_match_hf(hf, opt)
    ids, mask = padded_batch([12, 5, 9, 3], seed=2)
    assert_forward_and_generate(hf, opt, ids, mask, new=8)
    kw = dict(input_ids=ids[:2], attention_mask=mask[:2], max_new_tokens=7, num_beams=3, do_sample=False)
    with torch.no_grad():
        assert torch.equal(opt.generate(**kw), hf.generate(**kw))
    assert_fp32_matches_quantised(fake_quantised_int8(hf), optimised_copy(hf, max_seq_len=64, quantize="int8"))
    assert_matches_hf(hf, optimised_from_checkpoint(hf, tmp_path), ids[:3], mask[:3])
    truth = copy.deepcopy(hf)
    bf16 = copy.deepcopy(truth).to(torch.bfloat16)
    assert_bf16_within_hf_error(truth, bf16, optimised_copy(bf16, max_seq_len=64, dtype=torch.bfloat16))


def test_gemma4_unified_wrapper_text_prompts_match_hf():
    """Behind ``Gemma4UnifiedForConditionalGeneration`` (what AutoModelForCausalLM builds from its config), text
    prompts: the language model on the engine, fp32 logits and greedy tokens as the wrapper's. (Its images:
    tests/test_multimodal.py and the next test.)"""
    from transformers import AutoConfig, AutoModelForCausalLM

    from helpers import tiny_config

    cfg = AutoConfig.for_model("gemma4_unified", text_config=tiny_config("gemma4_unified_text").to_dict())
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    assert type(hf).__name__ == "Gemma4UnifiedForConditionalGeneration"
    opt = optimised_copy(hf, max_seq_len=64)
    ids, mask = padded_batch([9, 4, 6], seed=1)
    assert_matches_hf(hf, opt, ids, mask)


def test_gemma4_unified_image_blocks_past_the_window():
    """Gemma 4 unified's image blocks go through transformers' generic mask helper, which ORs them into the sliding
    layers' masks after the window: an image longer than the window (4 tokens, window 3) is seen whole there. fp32
    logits and greedy tokens as HF's with ``blocks_in="past_window"``; the same engine reading them within the window
    ("all") does not match (the premise: the case tells the two apart)."""
    from test_multimodal import image_batch, tiny_vlm

    import lightning_dsinfer as dsi

    hf, images = tiny_vlm("gemma4_unified", window=3)
    ids, mask, inputs = image_batch("gemma4_unified", images)
    opt = dsi.init_inference(copy.deepcopy(hf), dtype=torch.float32, max_seq_len=64)
    assert opt._dsinfer_engine.blocks_in == "past_window"
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, **inputs).logits
        tokens = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, **inputs)
    valid = mask.bool()
    got = opt(input_ids=ids, attention_mask=mask, **inputs).logits
    torch.testing.assert_close(got[valid], want[valid], atol=2e-4, rtol=1e-4)
    assert torch.equal(opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, **inputs),
                       tokens)
    opt._dsinfer_engine.blocks_in = "all"
    assert (opt(input_ids=ids, attention_mask=mask, **inputs).logits - want)[valid].abs().max() > 1e-3


def test_gemma4_refusals():
    opt = optimised_copy(tiny_model(FAMILY), max_seq_len=64)
    ids, mask = padded_batch([5, 3], seed=1)
    embeds = opt.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match="per-layer inputs up by token id"):
        opt(inputs_embeds=embeds, attention_mask=mask)


def test_gemma4_images_on_the_disk_tier(tmp_path):
    """Gemma 4 behind its wrapper, offloaded (its embedding streamed: the wrapper's pad-row read gets a stand-in, the
    per-layer ids looked up in the table's file), with sliding-only bidirectional image blocks: fp32 logits and greedy
    tokens as HF's. (One process, resident: tests/test_multimodal.py kinds "gemma4", "gemma4_bidirectional".)"""
    from test_multimodal import image_batch, tiny_vlm

    hf, images = tiny_vlm("gemma4_bidirectional")
    ids, mask, inputs = image_batch("gemma4_bidirectional", images)
    opt = streamed_copy(hf, "nvme", tmp_path, dtype=torch.float32)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, **inputs).logits
        tokens = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **inputs)
    got = opt(input_ids=ids, attention_mask=mask, **inputs).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=2e-4, rtol=1e-4)
    assert torch.equal(opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **inputs),
                       tokens)


def test_gemma4_wrapper_reads_placeholders_without_media_as_padding():
    """Gemma 4's wrapper looks its image / video / audio placeholder ids up as its pad id on every call (its main and
    per-layer embeddings), media or not: a prompt holding image placeholders without images, as HF's (premise: as
    plain tokens they would give other logits)."""
    from test_multimodal import image_batch, tiny_vlm

    hf, images = tiny_vlm("gemma4")
    ids, mask, _ = image_batch("gemma4", images)
    opt = optimised_copy(hf, max_seq_len=64)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        as_text = hf.lm_head(hf.model.language_model(input_ids=ids, attention_mask=mask).last_hidden_state)
        cap = hf.config.get_text_config().final_logit_softcapping     # (the raw ids through its language model)
        as_text = torch.tanh(as_text / cap) * cap
    valid = mask.bool()
    assert (as_text - want)[valid].abs().max() > 1e-2
    assert_matches_hf(hf, opt, ids, mask)
