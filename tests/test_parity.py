"""The fused engine against the unmodified Hugging Face model (fp32, tiny random configs).

Tolerance: fp32 logits within atol 2e-4 / rtol 1e-4 (the engine fuses QKV / gate-up and reorders
the rotary arithmetic, so results differ from HF by float rounding only).
"""
import pytest
import torch

from helpers import (FAMILIES, assert_cache_the_caller_builds, assert_matches_hf, optimised_copy, padded_batch,
                     tiny_model)

ATOL, RTOL = 2e-4, 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf_with_left_padding(family):
    hf = tiny_model(family)
    opt = optimised_copy(hf, max_seq_len=64)
    ids, mask = padded_batch([12, 5, 9])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    got = opt(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_identical_padded_batch(family):
    hf = tiny_model(family)
    opt = optimised_copy(hf, max_seq_len=64)
    ids, mask = padded_batch([3, 11, 6, 8], seed=1)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, do_sample=False)
    got = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, do_sample=False)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_batch_size_changes_between_calls(family):
    hf = tiny_model(family)
    opt = optimised_copy(hf, max_seq_len=64, max_batch_size=4)
    for lengths in ([7, 4], [5], [9, 9, 3, 6, 2, 8]):      # the last one is larger than max_batch_size
        ids, mask = padded_batch(lengths, seed=len(lengths))
        with torch.no_grad():
            ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        if len(lengths) > 4:
            with pytest.warns(UserWarning, match="max_batch_size=4"):
                got = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        else:
            got = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert torch.equal(got, ref)


def _generate_equals_hf(family, seed, **options):
    """Same left-padded prompts, same generate options: the optimised model returns HF's tokens exactly."""
    hf = tiny_model(family)
    opt = optimised_copy(hf, max_seq_len=64)
    ids, mask = padded_batch([6, 9], seed=seed)
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, **options)
    with torch.no_grad():
        ref = hf.generate(**kw)
    assert torch.equal(opt.generate(**kw), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_equals_hf(family):
    _generate_equals_hf(family, 2, max_new_tokens=7, num_beams=3)


def _own_loop_only(monkeypatch) -> None:
    """From here on, a generate request the engine's own loop does not serve fails the test (instead of quietly
    taking HF's loop, the slow path)."""
    import lightning_dsinfer.generation as gen

    def no_fallback(*a, **k):
        raise AssertionError("fell back to Hugging Face's generate loop")

    monkeypatch.setattr(gen, "_hf_generate", no_fallback)


def _sharpened(hf, factor: float = 30.0):
    """``hf`` with its lm_head scaled: a tiny random model's logits are near-flat, so fp32 rounding (1e-6) can move a
    top-k / top-p boundary and sampled tokens then differ from HF's for no fault of either; spread out, the same seed
    must give the same draws."""
    with torch.no_grad():
        hf.get_output_embeddings().weight.mul_(factor)
    return hf


def test_logits_processors_run_in_the_own_loop_and_match_hf(monkeypatch):
    """Repetition penalty, n-gram blocking, bad words, min-p and a user's ``logits_processor`` list run inside the own
    loop (HF's processor list, built by HF's code): greedy tokens as HF's, and sampled ones too from the same seed
    (the same processors, warpers and draws); a stopping criterion still takes HF's loop."""
    from transformers import LogitsProcessor, LogitsProcessorList, MaxLengthCriteria, StoppingCriteriaList

    class Ban(LogitsProcessor):              # a user's processor: never emit token 7 after step 2
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] > 11:
                scores[:, 7] = float("-inf")
            return scores

    hf = _sharpened(tiny_model("llama"))
    opt = optimised_copy(hf, max_seq_len=64)
    ids, mask = padded_batch([6, 9], seed=3)
    requests = [dict(do_sample=False, repetition_penalty=1.5, no_repeat_ngram_size=2),
                dict(do_sample=False, bad_words_ids=[[5], [9, 10]], logits_processor=LogitsProcessorList([Ban()])),
                dict(do_sample=True, repetition_penalty=1.3, min_p=0.05, temperature=0.9, top_k=30)]
    for options in requests:
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=9, **options)
        torch.manual_seed(5)
        with torch.no_grad():
            ref = hf.generate(**kw)
        _own_loop_only(monkeypatch)
        torch.manual_seed(5)
        got = opt.generate(**kw)
        monkeypatch.undo()
        assert torch.equal(got, ref), options
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=False, repetition_penalty=1.5,
              stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(max_length=13)]))
    with torch.no_grad():
        assert torch.equal(opt.generate(**kw), hf.generate(**kw))


def test_eos_stops_and_pads_like_hf():
    hf = tiny_model("mistral")
    opt = optimised_copy(hf, max_seq_len=64)
    ids, mask = padded_batch([5, 8, 4], seed=4)
    with torch.no_grad():
        free = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    eos = int(free[0, ids.shape[1] + 2])           # a token row 0 emits at its third step
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        ref = hf.generate(**kw)
    got = opt.generate(**kw)
    assert (ref[0, ids.shape[1]:] == eos).any()
    assert torch.equal(got, ref)


def test_partial_rotary_matches_hf():
    """Phi-3 with partial_rotary_factor 0.5 (as Phi-4-mini's 0.75): the first half of each head rotates, the rest
    passes through. fp32 logits and greedy tokens as HF; bf16 (the C rotary kernel declines partial rows, the
    reference runs) within the bf16 tolerance with the same greedy tokens."""
    partial = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}
    hf = tiny_model("phi3", **partial)
    assert hf.model.rotary_emb.inv_freq.numel() * 2 == hf.config.hidden_size // hf.config.num_attention_heads // 2
    assert_matches_hf(hf, optimised_copy(hf, max_seq_len=48), *padded_batch([9, 4], seed=2))
    hfb = tiny_model("phi3", **partial).bfloat16()
    ids, mask = padded_batch([9, 4], seed=2)
    optb = optimised_copy(hfb, max_seq_len=48, dtype=torch.bfloat16)
    with torch.no_grad():
        want = hfb(input_ids=ids, attention_mask=mask).logits.float()
        got = optb(input_ids=ids, attention_mask=mask).logits.float()
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=6e-2, rtol=0)


@pytest.mark.parametrize("check_every", [4, 5])
def test_eos_checked_every_few_steps_cuts_like_hf(check_every, monkeypatch):
    """The own loop asks whether every row finished only every few steps on a GPU (no host sync per token); the
    steps run after the last row finished are cut off, so the output equals HF's, which stops right there."""
    from lightning_dsinfer.generation import decode
    monkeypatch.setattr(decode, "CPU_CHECK_EVERY", check_every)
    hf = tiny_model("llama")
    opt = optimised_copy(hf, max_seq_len=64)
    for lengths, seed, at in (([6], 1, 2), ([5, 8, 4], 4, 2), ([7, 3], 2, 6)):
        ids, mask = padded_batch(lengths, seed=seed)
        with torch.no_grad():
            free = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, do_sample=False)
        eos = [int(t) for t in free[:, ids.shape[1] + at]]     # every row emits one of these by step at + 1
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=14, do_sample=False, eos_token_id=eos,
                  pad_token_id=0)
        with torch.no_grad():
            ref = hf.generate(**kw)
        assert ref.shape[1] <= ids.shape[1] + at + 1          # HF stopped early
        assert torch.equal(opt.generate(**kw), ref)


def test_min_new_tokens_and_max_length_like_hf():
    hf = tiny_model("qwen2")
    opt = optimised_copy(hf, max_seq_len=64)
    ids, mask = padded_batch([5, 8], seed=5)
    with torch.no_grad():
        free = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    eos = int(free[0, ids.shape[1]])
    for kw in (dict(max_length=15), dict(max_new_tokens=10, min_new_tokens=4, eos_token_id=eos, pad_token_id=0)):
        with torch.no_grad():
            ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
        assert torch.equal(opt.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw), ref)


def test_sampling_reproducible_with_seed():
    hf = tiny_model("llama")
    opt = optimised_copy(hf, max_seq_len=64)
    ids, mask = padded_batch([6, 9, 4], seed=6)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=True, temperature=1.3, top_k=20, top_p=0.9)
    runs = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        runs.append(opt.generate(**kw))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    # top_k=1 sampling is greedy, whatever the seed
    greedy = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    torch.manual_seed(3)
    assert torch.equal(opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=1), greedy)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, None, None), (1.0, 5, None), (1.0, None, 0.8), (1.5, 10, 0.6)])
def test_warpers_equal_hf_processors(temperature, top_k, top_p):
    from transformers import GenerationConfig

    from lightning_dsinfer.generation.sampling import warp

    hf = tiny_model("llama")
    gc = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0)
    processors = hf._get_logits_processor(generation_config=gc, input_ids_seq_length=4, encoder_input_ids=None,
                                          prefix_allowed_tokens_fn=None, logits_processor=None)
    scores = torch.randn(5, 97, generator=torch.Generator().manual_seed(0)) * 3
    ref = processors(torch.zeros(5, 4, dtype=torch.long), scores.clone())
    got = warp(scores.clone(), temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    torch.testing.assert_close(got[~torch.isinf(got)], ref[~torch.isinf(ref)])


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
])
def test_rope_scaling_variants(rope):
    from transformers import AutoModelForCausalLM

    from helpers import tiny_config

    cfg = tiny_config("llama")
    cfg.rope_parameters = {**rope, "rope_theta": 10000.0}
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    opt = optimised_copy(hf, max_seq_len=96)
    assert_matches_hf(hf, opt, *padded_batch([40, 70], seed=7), new_tokens=10, atol=ATOL, rtol=RTOL)


def test_forward_with_labels_inputs_embeds_and_logits_to_keep():
    hf = tiny_model("qwen3")
    ids, mask = padded_batch([10, 10], seed=8)
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=ids)
        emb = hf.get_input_embeddings()(ids)
        ref_emb = hf(inputs_embeds=emb).logits
    opt = optimised_copy(hf, max_seq_len=32)
    out = opt(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(opt(inputs_embeds=emb).logits, ref_emb, atol=ATOL, rtol=RTOL)
    last = opt(input_ids=ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last[:, 0], ref.logits[:, -1], atol=ATOL, rtol=RTOL)


def test_incremental_forward_with_hf_cache_matches_full_forward():
    """model(..., use_cache=True) returns a cache the next call continues from (HF's contract)."""
    hf = tiny_model("mistral")
    opt = optimised_copy(hf, max_seq_len=32)
    ids, _ = padded_batch([12, 12], seed=9)
    full = opt(input_ids=ids).logits
    first = opt(input_ids=ids[:, :8], use_cache=True)
    cache = first.cache if hasattr(first, "cache") and first.cache is not None else first.past_key_values
    second = opt(input_ids=ids[:, 8:], **{("cache" if hasattr(first, "cache") else "past_key_values"): cache})
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, atol=ATOL, rtol=RTOL)


def test_a_sliding_window_cache_the_caller_builds():
    """DynamicCache(config=model.config) for a sliding-window model: transformers' layers would keep the last window
    only; they are made whole-history layers while empty, and a prompt and steps past the window give HF's logits
    (before: a shape error at the first step)."""
    from transformers import DynamicCache

    hf = tiny_model("mistral")                  # (window 7)
    opt = optimised_copy(hf, max_seq_len=32)
    assert type(DynamicCache(config=opt.config).layers[0]).__name__ == "DynamicSlidingWindowLayer"
    assert_cache_the_caller_builds(hf, opt, lengths=(10, 6), calls=4)


def test_own_loop_serves_greedy_and_sampling(monkeypatch):
    """Greedy / sampling / eos requests must not fall back to HF's loop (that is the slow path)."""
    hf = tiny_model("qwen2")
    opt = optimised_copy(hf, max_seq_len=64)
    _own_loop_only(monkeypatch)
    ids, mask = padded_batch([4, 7], seed=10)
    opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5)
    opt.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_p=0.9, temperature=0.8)
    opt.generate(input_ids=ids, attention_mask=mask, max_length=12, min_new_tokens=2, eos_token_id=[2, 5])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fp16_engine_follows_hf_fp16(family):
    """fp16 weights and activations (DSInferPrecision("fp16") / dtype=torch.float16) against HF run in fp16
    on the same inputs. Tolerance: logits reach ~3 here, where one fp16 ulp is 2e-3; the two compute the same
    math in a different order, so a few ulps apart (measured 3.4e-3; atol 1e-2). Greedy tokens identical."""
    hf = tiny_model(family).half()
    opt = optimised_copy(hf, max_seq_len=64, dtype=torch.float16)
    ids, mask = padded_batch([11, 6, 8], seed=9)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        ref_tokens = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    got = opt(input_ids=ids, attention_mask=mask).logits
    assert got.dtype == torch.float16
    valid = mask.bool()
    assert (got[valid].float() - ref[valid].float()).abs().max() < 1e-2
    assert torch.equal(opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False), ref_tokens)


def test_granite_multipliers_match_hf(tmp_path):
    """Granite: the Llama table with its embedding multiplier (the embeddings' scale), residual multiplier (folded
    into o_proj's and down_proj's weights and biases when they are read), attention multiplier (the scores' scale)
    and logits scaling: fp32 logits / greedy as HF's, from memory and from a checkpoint on meta; int8 vs the
    fake-quantised HF."""
    from transformers import AutoModelForCausalLM

    from helpers import fake_quantised_int8

    hf = tiny_model("granite")
    ids, mask = padded_batch([12, 5, 9], seed=1)
    assert_matches_hf(hf, optimised_copy(hf, max_seq_len=64), ids, mask)
    hf.save_pretrained(tmp_path / "granite")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(hf.config)
    assert_matches_hf(hf, optimised_copy(meta, max_seq_len=64, checkpoint=str(tmp_path / "granite"),
                                         dtype=torch.float32), ids, mask)
    assert_matches_hf(fake_quantised_int8(hf), optimised_copy(hf, max_seq_len=64, quantize="int8"), ids, mask)


def test_scores_and_logits_output_in_the_own_loop(monkeypatch):
    """``return_dict_in_generate`` with ``output_scores`` / ``output_logits``: the own loop returns HF's output type,
    its processed scores and raw logits step by step (fp32, within rounding of HF's: the engine's forward is not
    HF's), cut where generation stopped (EOS); the sequences equal HF's."""
    hf = tiny_model("qwen3")
    opt = optimised_copy(hf, max_seq_len=64)
    ids, mask = padded_batch([5, 8], seed=4)
    with torch.no_grad():
        free = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    eos = int(free[1, ids.shape[1] + 3])          # row 1 stops at its fourth token (row 0 later or never)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0,
              min_new_tokens=2, repetition_penalty=1.2, return_dict_in_generate=True, output_scores=True,
              output_logits=True)
    with torch.no_grad():
        ref = hf.generate(**kw)
    _own_loop_only(monkeypatch)
    got = opt.generate(**kw)
    assert type(got) is type(ref) and torch.equal(got.sequences, ref.sequences)
    assert len(got.scores) == len(ref.scores) == len(got.logits) == len(ref.logits) == ref.sequences.shape[1] - 8
    for ours, theirs in zip(got.scores + got.logits, ref.scores + ref.logits):
        finite = torch.isfinite(theirs)
        assert torch.equal(finite, torch.isfinite(ours))
        torch.testing.assert_close(ours[finite], theirs[finite], atol=2e-4, rtol=1e-4)


def test_num_return_sequences_sampling_in_the_own_loop(monkeypatch):
    """Several sampled continuations per prompt: the prompts repeated in HF's order, the same draws from the same seed
    as HF's."""
    hf = _sharpened(tiny_model("mistral"))
    opt = optimised_copy(hf, max_seq_len=64, max_batch_size=6)
    ids, mask = padded_batch([5, 8], seed=2)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_p=0.9, num_return_sequences=3)
    torch.manual_seed(9)
    with torch.no_grad():
        ref = hf.generate(**kw)
    _own_loop_only(monkeypatch)
    torch.manual_seed(9)
    got = opt.generate(**kw)
    assert got.shape[0] == 6 and torch.equal(got, ref)
