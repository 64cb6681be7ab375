"""The engine's own generation loop over the static KV cache.

One prefill of the (left-padded) prompt batch, then one step per token: write K/V at the next cache
column, attend over the prefix view, pick the next token. No per-token allocation besides the
step's activations; no Hugging Face code on the hot path.
"""
from __future__ import annotations

import torch

from lightning_dsinfer.generation.cuda_graphs import decode_graphs
from lightning_dsinfer.generation.sampling import next_tokens
from lightning_dsinfer.modules.masks import build_step

CHECK_EVERY = 4      # decode steps between two host checks of "every row finished" with CUDA graphs ...
CPU_CHECK_EVERY = 1  # ... and on the CPU, where the ops run synchronously anyway (tests set it to check the cut)


def prompt_positions(attention_mask: torch.Tensor | None, b: int, t0: int, total: int, device):
    """(key_valid [B, total] bool or None when nothing is padding, positions [B, t0]) of a left-padded prompt batch:
    padding keys are invisible, and each row counts its positions from its first real token."""
    if attention_mask is None or bool(attention_mask.all()):
        return None, torch.arange(t0, device=device).expand(b, t0)
    key_valid = torch.ones(b, total, dtype=torch.bool, device=device)
    key_valid[:, :t0] = attention_mask.to(device=device, dtype=torch.bool)
    positions = (attention_mask.to(device).long().cumsum(-1) - 1).masked_fill_(key_valid[:, :t0].logical_not(), 0)
    return key_valid, positions


def prefill(engine, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, total: int,
            prompt_embeds: torch.Tensor | None = None, blocks: torch.Tensor | None = None,
            given_positions: torch.Tensor | None = None, deepstack: tuple | None = None,
            prompt_ids: torch.Tensor | None = None):
    """The prompt batch through the blocks into the engine's cache (``input_ids`` on the engine's device; the other
    arguments as :func:`decode_loop`'s): (the logits of each row's last prompt token [B, V], key_valid [B, total] or
    None, the prompt's positions [B, T0] or M-RoPE's [3, B, T0])."""
    device = input_ids.device
    b, t0 = input_ids.shape
    cache = engine.cache
    cache.ensure_batch(b)
    cache.reset_linear(b)            # (linear attention: the sequences start from zero states)
    key_valid, positions = prompt_positions(attention_mask, b, t0, total, device)
    if given_positions is not None:
        positions = given_positions.to(device)
    step = build_step(engine.rotary, positions, key_valid, q_start=0, t=t0, window=engine.sliding_window,
                      chunk=engine.attention_chunk, blocks=blocks, blocks_in=engine.blocks_in)
    step.cache, step.start, step.deepstack = cache, 0, deepstack
    step.ids = input_ids if prompt_embeds is None else prompt_ids
    step.last_only = True            # (the prompt's last logits only: Gemma 4's shared-K/V blocks run on that token)
    if prompt_embeds is None:
        h = engine.decoder.embed_tokens(input_ids)
    else:
        h = engine.decoder.given_embeddings(prompt_embeds.to(device=device, dtype=engine.dtype))
    h = engine.decoder.hidden(h, step)
    return engine.decoder.logits(h[:, -1]), key_valid, positions


def begin(engine, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None, eos_ids: list[int],
          streamer=None, **prompt):
    """:func:`prefill`, and the loop's state after it: (the last prompt token's logits [B, V], key_valid, the output
    buffer [B, T0 + max_new_tokens] with the prompt in place, the EOS ids on the device or None, ``unfinished`` [B]
    bool, each row's last position [B, 1]). The streamer gets the prompt."""
    device = input_ids.device
    b, t0 = input_ids.shape
    logits, key_valid, positions = prefill(engine, input_ids, attention_mask, t0 + max_new_tokens, **prompt)
    eos = torch.tensor(eos_ids, device=device) if eos_ids else None
    unfinished = torch.ones(b, dtype=torch.bool, device=device)
    out = torch.empty(b, t0 + max_new_tokens, dtype=input_ids.dtype, device=device)
    out[:, :t0] = input_ids
    if streamer is not None:
        streamer.put(input_ids.cpu())
    pos = (positions if positions.dim() == 2 else positions.amax(0)).amax(-1, keepdim=True)   # (M-RoPE: of 3 rows)
    return logits, key_valid, out, eos, unfinished, pos


@torch.inference_mode()
def decode_loop(engine, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                min_new_tokens: int, do_sample: bool, temperature, top_k, top_p, eos_ids: list[int],
                pad_id: int | None, streamer=None, processors=None, trace: dict | None = None,
                prompt_embeds: torch.Tensor | None = None, blocks: torch.Tensor | None = None,
                given_positions: torch.Tensor | None = None, deepstack: tuple | None = None,
                prompt_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Returns [B, T0 + n] token ids (prompt included), n <= max_new_tokens (stops when every row hit EOS).
    ``processors``: HF's logits processor list (warpers included): each step's fp32 logits go through it with the
    tokens so far, then argmax or softmax + multinomial, as in HF's loop (the own warpers are then not applied).
    ``trace``: {"scores": [], "logits": []} gets each step's processed scores and raw fp32 logits (``output_scores`` /
    ``output_logits``; HF's ``scores`` are the processed ones). ``prompt_embeds`` [B, T0, H]: the prompt's embeddings
    (a vision-language model's, images merged in: multimodal.py) instead of ``input_ids``'s; ``blocks`` [B, T0]: its
    tokens that see each other (:func:`~lightning_dsinfer.modules.masks.build_masks`); ``given_positions`` [B, T0] or
    M-RoPE's [3, B, T0]: the prompt's positions as the model gave them (decoding goes on from each row's largest);
    ``deepstack``: Qwen3-VL's image features added after the first blocks (:attr:`Step.deepstack`); ``prompt_ids``
    [B, T0]: with ``prompt_embeds``, the ids Gemma 4's per-layer inputs are looked up by (:attr:`Step.ids`)."""
    device = engine.device
    input_ids = input_ids.to(device)
    b, t0 = input_ids.shape
    cache = engine.cache
    window = engine.sliding_window
    logits, key_valid, out, eos, unfinished, pos = begin(
        engine, input_ids, max_new_tokens, attention_mask, eos_ids, streamer, prompt_embeds=prompt_embeds,
        blocks=blocks, given_positions=given_positions, deepstack=deepstack, prompt_ids=prompt_ids)
    graphs = decode_graphs(engine, b, key_valid, t0)    # None on the CPU: the eager step below
    # Whether every row has finished is a host sync. With CUDA graphs and greedy decoding it is asked every
    # CHECK_EVERY steps, so the host queues the next replays while the GPU runs (rows that finished get pad tokens
    # meanwhile); the steps after the one where the last row finished are cut off the output, as if the loop had
    # stopped there. Sampling (the extra steps would draw from the generator), a streamer, and eager GPU steps
    # (offload, TP: a wasted step costs more than the sync) ask every step.
    check_every = 1
    if streamer is None and not do_sample:
        check_every = CPU_CHECK_EVERY if device.type == "cpu" else CHECK_EVERY if graphs is not None else 1
    alive = torch.ones(max_new_tokens, dtype=torch.bool, device=device) if eos is not None else None
    n = 0
    for i in range(max_new_tokens):
        if trace is not None:                # the raw logits (HF's ``logits``), before any processing
            trace["logits"].append(logits.float().clone())
        if eos is not None and i < min_new_tokens:
            logits[:, eos] = float("-inf")
        if processors is not None:
            scores = processors(out[:, :t0 + i], logits.float().clone() if trace is not None else logits.float())
            if trace is not None:
                trace["scores"].append(scores)
            tok = scores.argmax(dim=-1) if not do_sample else \
                torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)
        else:
            tok = next_tokens(logits, do_sample, temperature, top_k, top_p)
        if eos is not None:
            if pad_id is not None:
                tok = torch.where(unfinished, tok, pad_id)
            unfinished &= ~torch.isin(tok, eos)
            torch.any(unfinished, out=alive[i])
        out[:, t0 + i] = tok
        n = i + 1
        if streamer is not None:
            streamer.put(tok.cpu())
        if i == max_new_tokens - 1:
            break
        if eos is not None and (i + 1) % check_every == 0 and not bool(alive[i]):
            break
        col = t0 + i
        pos += 1
        if graphs is not None:
            logits = graphs.step(tok, pos, col)
            continue
        step = build_step(engine.rotary, pos, key_valid, q_start=col, t=1, window=window, chunk=engine.attention_chunk)
        step.cache, step.start = cache, col
        step.valid = None       # (the new tokens are real: linear-state mixers need not zero any)
        step.ids = tok[:, None]
        h = engine.decoder.hidden(engine.decoder.embed_tokens(tok[:, None]), step)
        logits = engine.decoder.logits(h[:, -1])
    if eos is not None and not bool(alive[n - 1]):
        n = int(alive[:n].logical_not().nonzero()[0]) + 1      # the step where the last row finished
    if streamer is not None:
        streamer.end()
    return out[:, :t0 + n]
