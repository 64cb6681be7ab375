"""``generate`` across pipeline stages: the paper's hybrid schedule (engine's own loop, ``pipeline_parallel_size`` > 1).

Every rank of a pipeline runs :func:`pipeline_decode_loop` with the same arguments. Stage s runs its blocks on the
same work items in the same order as every other stage: it receives an item's hidden states from stage s - 1 (stage
0 embeds tokens instead), runs its blocks and sends the result on to stage s + 1 without waiting for it to arrive, so
the stages work on different items at the same time.

- Prompt: many micro-batches. The batch's row groups (those of the tokens, below) are each cut into chunks of prompt
  tokens (:func:`prompt_chunks`), so even a single prompt fills the pipeline. A chunk writes its K/V at its own
  columns and attends to every column before it (``Step.rows``): the chunks in order equal the whole prompt.
- Tokens: ``min(batch, stages)`` row groups (:func:`row_groups`), taken in turn. The last stage turns group g's
  hidden states into its next tokens and sends them to stage 0, which embeds them for group g's next step. With
  P groups, stage 0 receives group g's tokens just as it finishes group g - 1: while one group crosses the stages
  the others keep every stage busy, and the pipeline does not drain between tokens.
- EOS: a group whose rows have all finished stops. The last stage says so with the group's tokens, stage 0 passes
  it down with a one-number header before the group's next item (headers are sent only when there is an EOS), and
  the group's later columns are padding, as HF pads finished rows.

The last stage holds the output tokens; at the end they are broadcast over the pipeline, so every rank returns them.
Sampling draws on the last stage only (its tensor-parallel ranks draw the same, ``engine.sync_rng``); draws come in
group order, so a seed gives other samples than without a pipeline.
"""
from __future__ import annotations

import math

import torch

from lightning_dsinfer.generation.decode import prompt_positions
from lightning_dsinfer.generation.sampling import next_tokens
from lightning_dsinfer.modules.masks import build_step

MIN_PROMPT_CHUNK = 64    # prompt tokens per micro-batch at least: on the CPU a 16-token chunk costs 3x per token, 64 1.2x
PROMPT_ITEMS_PER_STAGE = 4   # prompt micro-batches per stage aimed at: the fill / drain bubble is (P - 1) of ~4P


def row_groups(batch: int, stages: int) -> list[tuple[int, int]]:
    """Rows [start, stop) of each token micro-batch: ``min(batch, stages)`` groups, sizes differing by at most one."""
    n = min(batch, stages)
    base, extra = divmod(batch, n)
    bounds = [0]
    for g in range(n):
        bounds.append(bounds[-1] + base + (g < extra))
    return list(zip(bounds[:-1], bounds[1:]))


def prompt_chunks(t0: int, groups: int, stages: int) -> list[tuple[int, int]]:
    """Token ranges [a, e) each row group's prompt is cut into: about ``PROMPT_ITEMS_PER_STAGE * stages`` prompt
    micro-batches in all, none shorter than ``MIN_PROMPT_CHUNK`` tokens (a short prompt is one chunk)."""
    n = max(1, min(math.ceil(PROMPT_ITEMS_PER_STAGE * stages / groups), t0 // MIN_PROMPT_CHUNK))
    size = math.ceil(t0 / n)
    return [(a, min(a + size, t0)) for a in range(0, t0, size)]


@torch.inference_mode()
def pipeline_decode_loop(engine, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                         min_new_tokens: int, do_sample: bool, temperature, top_k, top_p, eos_ids: list[int],
                         pad_id: int | None) -> torch.Tensor:
    """Returns [B, T0 + n] token ids (prompt included) on every stage, as ``decode_loop`` does without a pipeline."""
    pipe, decoder, device = engine.pipe, engine.decoder, engine.device
    first, last, prev, nxt, final = pipe.is_first, pipe.is_last, pipe.rank - 1, pipe.rank + 1, pipe.size - 1
    input_ids = input_ids.to(device)
    b, t0 = input_ids.shape
    total = t0 + max_new_tokens
    engine.cache.ensure_batch(b)
    key_valid, positions = prompt_positions(attention_mask, b, t0, total, device)
    # Offloaded stages: one micro-batch for the tokens and the prompt. Streaming binds them, and each micro-batch
    # would stream the stage's blocks again (stages sharing a disk would then compete for it); the streamed decoder
    # cuts the prompt into chunks itself.
    streamed = engine.offload is not None
    groups = [(0, b)] if streamed else row_groups(b, pipe.size)
    caches = [engine.cache.rows(r0, r1) for r0, r1 in groups]
    hidden = (engine.hidden_size,)

    def valid(r0, r1):
        return None if key_valid is None else key_valid[r0:r1]

    eos = torch.tensor(eos_ids, device=device) if eos_ids else None
    headers = eos is not None                  # a group may stop early: every item is announced
    out = None
    if last:
        out = torch.empty(b, total, dtype=input_ids.dtype, device=device)
        out[:, :t0] = input_ids
    unfinished = torch.ones(b, dtype=torch.bool, device=device)
    produced = [0] * len(groups)               # tokens of each group so far (last stage)

    def emit(g: int, i: int, h: torch.Tensor) -> None:
        """Last stage: group g's token i from its hidden states; sent to stage 0 while it has a next step."""
        r0, r1 = groups[g]
        logits = decoder.logits(h[:, -1])
        if eos is not None and i < min_new_tokens:
            logits[:, eos] = float("-inf")
        tok = next_tokens(logits, do_sample, temperature, top_k, top_p)
        go = True
        if eos is not None:
            rows = unfinished[r0:r1]
            if pad_id is not None:
                tok = torch.where(rows, tok, pad_id)
            rows &= ~torch.isin(tok, eos)
            go = bool(rows.any())
        out[r0:r1, t0 + i] = tok
        produced[g] = i + 1
        if i < max_new_tokens - 1:
            pipe.send(torch.cat([tok.to(torch.int64), tok.new_tensor([int(go)], dtype=torch.int64)]), 0)

    # the prompt: row groups x token chunks
    chunks = [(0, t0)] if streamed else prompt_chunks(t0, len(groups), pipe.size)
    for g, (r0, r1) in enumerate(groups):
        step = build_step(engine.rotary, positions[r0:r1], valid(r0, r1), q_start=0, t=t0,
                          window=engine.sliding_window, chunk=engine.attention_chunk)
        step.cache, step.start = caches[g], 0
        caches[g].reset_linear(r1 - r0)      # (linear attention: the group's sequences start from zero states)
        for a, e in chunks:
            sub = step if len(chunks) == 1 else step.rows(a, e)
            if first:
                h = decoder.embed_tokens(input_ids[r0:r1, a:e])
            else:
                h = pipe.recv((r1 - r0, e - a, *hidden), engine.dtype, device, prev)
            h = decoder.hidden(h, sub)
            if not last:
                pipe.send(h, nxt)
        if last:
            emit(g, 0, h)

    # the tokens: each live group in turn, one step each
    live = [True] * len(groups)
    last_pos = positions[:, -1:]
    for i in range(1, max_new_tokens):
        col = t0 + i - 1                       # token i - 1 goes in at this column
        for g, (r0, r1) in enumerate(groups):
            if not live[g]:
                continue
            if first:
                msg = pipe.recv((r1 - r0 + 1,), torch.int64, device, final)
                go = bool(msg[-1])
                if headers:
                    pipe.send(msg[-1:].clone(), nxt)
                if not go:
                    live[g] = False
                    continue
                h = decoder.embed_tokens(msg[:-1, None].to(input_ids.dtype))
            else:
                if headers:
                    header = pipe.recv((1,), torch.int64, device, prev)
                    if not last:
                        pipe.send(header, nxt)
                    if not bool(header[0]):
                        live[g] = False
                        continue
                h = pipe.recv((r1 - r0, 1, *hidden), engine.dtype, device, prev)
            step = build_step(engine.rotary, last_pos[r0:r1] + i, valid(r0, r1), q_start=col, t=1,
                              window=engine.sliding_window, chunk=engine.attention_chunk)
            step.cache, step.start = caches[g], col
            step.valid = None   # (the new tokens are real: linear-state mixers need not zero any)
            h = decoder.hidden(h, step)
            if last:
                emit(g, i, h)
            else:
                pipe.send(h, nxt)
    pipe.flush()

    # every stage returns the last stage's tokens
    n = torch.tensor([max(produced)], dtype=torch.int64, device=device)
    n = int(pipe.broadcast_(n, final)[0])
    if last:
        result = out[:, :t0 + n]
        for g, (r0, r1) in enumerate(groups):     # a group that stopped early: its rows are padding from there
            result[r0:r1, t0 + produced[g]:] = pad_id if pad_id is not None else 0
    else:
        result = torch.empty(b, t0 + n, dtype=input_ids.dtype, device=device)
    return pipe.broadcast_(result.contiguous(), final)
