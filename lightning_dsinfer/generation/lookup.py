"""Prompt-lookup speculative decoding on the engine's own loop (``generate(..., prompt_lookup_num_tokens=k)``).

Each step drafts up to k tokens per row by finding the sequence's last n-gram (``max_matching_ngram_size`` down to 1)
earlier in the row (prompt and output so far) and copying what followed it, as transformers'
``PromptLookupCandidateGenerator`` does; then one forward feeds the last token and the drafts (k + 1 queries per row,
the static KV cache's next columns) and keeps the drafts that equal the model's greedy choice, plus the model's token
after them. Every kept token is the model's own greedy choice given the tokens before it, so the output is greedy
decoding's; what changes is how many tokens a forward yields. Where a step is memory-bound (a GPU, or a CPU with
bf16 / AMX instructions for a few rows) a forward of k + 1 queries costs little more than one; on a CPU without them
each extra query costs ~15% of a one-token step (the GEMMs turn compute-bound after a few rows). Either way text that
repeats what came before (editing, extraction, summaries quoting their source, code) keeps several tokens per
forward, and drafts that will not be kept are not free: each draft is cut to one token past what the last one kept
(2 more after a draft kept whole, up to k), and after a forward that kept nothing the loop takes plain one-token
steps (2, then 4, ... up to :data:`MAX_BACKOFF` after misses in a row) before it drafts again.

Columns of rejected drafts hold stale K/V until the next step overwrites them; no query sees them, since the causal
mask stops at each query's own column. A batch keeps, per step, the fewest drafts any unfinished row kept (each row's
kept drafts are its greedy tokens, so that is exact for every row). Greedy only, no logits processors (else
transformers' loop); models with linear-state mixers (their states cannot be rewound) are refused and pipeline stages
take transformers' loop (:func:`applies`). The verifying forward runs eagerly (CUDA graphs capture one-token steps
only)."""
from __future__ import annotations

import torch

from lightning_dsinfer.generation.decode import begin
from lightning_dsinfer.modules.masks import build_step


MAX_BACKOFF = 16     # plain steps at most between two drafting steps after drafts that were all rejected


def applies(engine) -> bool:
    """Whether the engine's own loop can verify drafts (its cache rewinds by column)."""
    return not engine.cache.linear and engine.pipe.size == 1


def draft(row: torch.Tensor, ngram: int, k: int) -> torch.Tensor:
    """Up to ``k`` tokens following the earliest earlier occurrence of ``row``'s last n-gram (n from ``ngram`` down to
    1; the first n with a match wins), or an empty tensor. ``row``: 1-D token ids."""
    length = row.shape[0]
    for n in range(min(ngram, length - 1), 0, -1):
        windows = row.unfold(0, n, 1)[:-1]                        # every n-gram but the last itself
        hits = (windows == row[length - n:]).all(-1).nonzero()
        for start in (hits[:, 0] + n).tolist():
            end = min(start + k, length)
            if start < end:
                return row[start:end]
    return row[:0]


@torch.inference_mode()
def lookup_decode_loop(engine, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                       min_new_tokens: int, eos_ids: list[int], pad_id: int | None, num_tokens: int, ngram: int,
                       streamer=None, **prompt) -> torch.Tensor:
    """Greedy decoding with prompt-lookup drafts of up to ``num_tokens`` tokens from n-grams of up to ``ngram`` tokens;
    returns [B, T0 + n] token ids as :func:`~lightning_dsinfer.generation.decode.decode_loop`. ``prompt``: the prompt
    arguments of :func:`~lightning_dsinfer.generation.decode.prefill`. ``engine.lookup_stats`` gets (forwards after
    the prompt, tokens produced, drafts kept)."""
    device = engine.device
    input_ids = input_ids.to(device)
    b, t0 = input_ids.shape
    logits, key_valid, out, eos, unfinished, pos = begin(engine, input_ids, max_new_tokens, attention_mask, eos_ids,
                                                         streamer, **prompt)
    n = forwards = kept = 0

    def emit(tok: torch.Tensor) -> bool:
        """Append one token per row (finished rows: padding); False once every row has finished."""
        nonlocal n
        if eos is not None:
            if pad_id is not None:
                tok = torch.where(unfinished, tok, pad_id)
            unfinished.logical_and_(~torch.isin(tok, eos))
        out[:, t0 + n] = tok
        n += 1
        if streamer is not None:
            streamer.put(tok.cpu())
        return eos is None or bool(unfinished.any())

    if eos is not None and min_new_tokens > 0:
        logits[:, eos] = float("-inf")
    going = emit(logits.argmax(-1))
    wait = backoff = 0           # plain steps before the next draft, and the length of the last wait
    limit = num_tokens           # the next draft's length: one past what the last one kept, or 2 more after a full one
    while going and n < max_new_tokens:
        k = min(limit, max_new_tokens - n - 1) if wait == 0 else 0
        wait = max(wait - 1, 0)
        drafts = [draft(out[r, :t0 + n], ngram, k) if k else out[r, :0] for r in range(b)]
        width = max(d.shape[0] for d in drafts)
        feed = torch.full((b, width + 1), 0, dtype=out.dtype, device=device)
        feed[:, 0] = out[:, t0 + n - 1]
        for r, d in enumerate(drafts):       # (a row without a draft of this width: filler, checked like any draft)
            feed[r, 1:1 + d.shape[0]] = d
        col = t0 + n - 1                      # the last token's column: the drafts follow it
        step = build_step(engine.rotary, pos + 1 + torch.arange(width + 1, device=device), key_valid, q_start=col,
                          t=width + 1, window=engine.sliding_window, chunk=engine.attention_chunk)
        step.cache, step.start, step.valid, step.ids = engine.cache, col, None, feed
        h = engine.decoder.hidden(engine.decoder.embed_tokens(feed), step)
        logits = engine.decoder.logits(h)                                   # [B, width + 1, V]
        forwards += 1
        if eos is not None and n < min_new_tokens:
            logits[:, :min_new_tokens - n, eos] = float("-inf")
        choice = logits.argmax(-1)
        same = (feed[:, 1:] == choice[:, :-1]).long().cumprod(-1).sum(-1)  # drafts kept per row
        if eos is not None:
            same = torch.where(unfinished, same, width)
        a = int(same.min())
        kept += a
        if width and a == 0:     # nothing kept: plain one-token steps (the one-call C step on the CPU) for a while,
            backoff = min(max(2 * backoff, 2), MAX_BACKOFF)      # longer after each miss in a row
            wait = backoff
        elif a:
            backoff = 0
        if width:
            limit = min(limit + 2, num_tokens) if a == width else a + 1
        for j in range(a + 1):
            going = emit(choice[:, j])
            if not going:
                break
        pos += a + 1
    engine.lookup_stats = (forwards, n, kept)
    if streamer is not None:
        streamer.end()
    return out[:, :t0 + n]
