"""Prompt-lookup speculative decoding on the engine's own loop (generation/lookup.py): ``generate(...,
prompt_lookup_num_tokens=k)`` gives Hugging Face's greedy tokens (fp32, left-padded batches, which HF's own prompt lookup
refuses, EOS and min_new_tokens), in fewer forwards than tokens where the drafts are kept; requests it does not take run
through HF's loop."""
import copy

import pytest
import torch

import lightning_dsinfer as dsi
from helpers import padded_batch, tiny_model
from lightning_dsinfer.generation import lookup
from lightning_dsinfer.generation.lookup import draft


def _engines(family, dtype=torch.float32, **overrides):
    hf = tiny_model(family, **overrides).to(dtype)
    return hf, dsi.init_inference(copy.deepcopy(hf), dtype=dtype, max_seq_len=96)


def test_draft_finds_the_earliest_longest_match():
    row = torch.tensor([5, 6, 7, 8, 1, 6, 7, 9, 4, 6, 7])
    assert draft(row, 2, 3).tolist() == [8, 1, 6]          # the bigram (6, 7) first seen at 1: what followed it
    assert draft(row, 2, 10).tolist() == [8, 1, 6, 7, 9, 4, 6, 7]     # up to the row's end
    assert draft(torch.tensor([5, 6, 3, 6]), 2, 2).tolist() == [3, 6]  # no bigram match: the unigram (6)
    assert draft(torch.tensor([1, 2, 3]), 2, 4).numel() == 0           # nothing repeats


# (family, config overrides): Llama; Mistral's sliding window of 7 (drafts verified across the window's edge);
# Gemma 4's shared-K/V layers (queries over earlier layers' columns) and per-layer inputs looked up by the fed ids
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma4_text"])
def test_lookup_gives_hf_greedy_tokens(family):
    hf, opt = _engines(family)
    ids, mask = padded_batch([12, 5, 9])
    for rows in (slice(0, 1), slice(0, 3)):                  # one unpadded row, then the left-padded batch
        kw = dict(input_ids=ids[rows], attention_mask=mask[rows], max_new_tokens=40, do_sample=False)
        with torch.no_grad():
            want = hf.generate(**kw)
        got = opt.generate(**kw, prompt_lookup_num_tokens=4)
        assert torch.equal(got, want)
        forwards, tokens, kept = opt._dsinfer_engine.lookup_stats
        assert tokens == want.shape[1] - ids.shape[1]
        assert forwards <= tokens - 1 <= forwards + kept    # a forward gives a token and its kept drafts (to EOS)
    if family == "llama":      # this model's greedy text falls into a loop (kept from EOS): drafts of it are kept
        kw = dict(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=80, min_new_tokens=80, do_sample=False)
        with torch.no_grad():
            want = hf.generate(**kw)
        assert torch.equal(opt.generate(**kw, prompt_lookup_num_tokens=4), want)
        forwards, tokens, kept = opt._dsinfer_engine.lookup_stats
        assert tokens == 80 and kept >= 20 and forwards <= 60, opt._dsinfer_engine.lookup_stats


def test_lookup_bf16_and_min_new_tokens_and_streamer():
    """bf16: each token the lookup gives is a greedy choice of HF's bf16 model over the tokens before it (its logit
    within bf16 rounding of the largest: a verifying forward of several queries rounds differently from a one-token
    step, so at a near tie the text may part from the plain loop's, as HF's own assisted decoding may); min_new_tokens
    keeps EOS out of the verified positions too; a streamer gets every token once."""
    hf, opt = _engines("llama", torch.bfloat16)
    ids, mask = padded_batch([12, 5, 9])
    for rows in (slice(0, 1), slice(0, 3)):
        got = opt.generate(input_ids=ids[rows], attention_mask=mask[rows], max_new_tokens=30, do_sample=False,
                           prompt_lookup_num_tokens=3)
        if rows.stop == 1:
            assert opt._dsinfer_engine.lookup_stats[2] > 0             # drafts were kept
        full = torch.cat([mask[rows], torch.ones(rows.stop, got.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
        with torch.no_grad():
            logits = hf(input_ids=got, attention_mask=full).logits[:, ids.shape[1] - 1:-1].float()
        chosen = logits.gather(-1, got[:, ids.shape[1]:, None])[..., 0]
        alive = torch.ones_like(chosen, dtype=torch.bool)  # (after a row's EOS: padding, not a choice)
        alive[:, 1:] = (got[:, ids.shape[1]:-1] != 2).cummin(-1).values
        gap = (logits.amax(-1) - chosen)[alive]
        assert float(gap.max()) <= 6e-2 + 2e-2 * float(logits.abs().amax()), gap.max()
    fp32_hf, opt32 = _engines("llama")
    kw = dict(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=40, do_sample=False)
    with torch.no_grad():
        free = fp32_hf.generate(**kw)
        want = fp32_hf.generate(**kw, min_new_tokens=36)
    assert free.shape[1] < ids.shape[1] + 36             # (the model stops early unless kept from EOS)
    assert torch.equal(opt32.generate(**kw, min_new_tokens=36, prompt_lookup_num_tokens=4), want)

    class Collect:
        def __init__(self):
            self.parts, self.ended = [], False

        def put(self, x):
            self.parts.append(x.reshape(-1))

        def end(self):
            self.ended = True

    streamer = Collect()
    got = opt32.generate(**kw, prompt_lookup_num_tokens=4, streamer=streamer)
    assert streamer.ended and torch.equal(torch.cat(streamer.parts), got[0])


def test_lookup_requests_it_does_not_take():
    """Sampling with lookups takes HF's loop over the engine's forward (one row: HF's assisted decoding takes no batch;
    the same tokens as HF for a seed), as does a draft model; a model whose linear-state mixers cannot rewind (LFM2's short convolutions) is
    refused with the reason, for a draft model too; a non-positive draft length is refused."""
    hf, opt = _engines("llama")
    assert lookup.applies(opt._dsinfer_engine)
    ids, mask = padded_batch([12, 5])
    kw = dict(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=12, do_sample=True, top_k=5,
              prompt_lookup_num_tokens=3)
    torch.manual_seed(7)
    with torch.no_grad():
        want = hf.generate(**kw)
    torch.manual_seed(7)
    assert torch.equal(opt.generate(**kw), want)
    assert opt._dsinfer_engine.lookup_stats is None                      # (not the own loop)
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens=0"):
        opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, prompt_lookup_num_tokens=0)
    # a draft model (HF's assisted decoding, its loop over the engine's forward): HF's greedy tokens, with the draft
    # as it is and optimised itself
    small = tiny_model("llama", num_hidden_layers=1)
    kw = dict(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=20, do_sample=False)
    with torch.no_grad():
        want = hf.generate(**kw)
    for assistant in (small, dsi.init_inference(copy.deepcopy(small), dtype=torch.float32, max_seq_len=96)):
        assert torch.equal(opt.generate(**kw, assistant_model=assistant), want)
    _, lfm2 = _engines("lfm2")
    assert not lookup.applies(lfm2._dsinfer_engine)
    for extra in (dict(prompt_lookup_num_tokens=3), dict(assistant_model=tiny_model("llama", num_hidden_layers=1))):
        with pytest.raises(dsi.UnsupportedModelError, match="linear-state mixers"):
            lfm2.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=4, **extra)
