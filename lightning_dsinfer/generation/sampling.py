"""Next-token choice for the engine's own loop: greedy, or sampling with HF's warpers in HF's order
(temperature -> top-k -> top-p), so a given GenerationConfig means the same thing here as in HF."""
from __future__ import annotations

import torch


def warp(scores: torch.Tensor, temperature: float | None, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """scores [B, V] fp32 -> warped scores (filtered entries are -inf). Modifies ``scores`` in place."""
    if temperature is not None and temperature != 1.0:
        scores.div_(temperature)
    if top_k is not None and 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores.masked_fill_(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1] = False                                    # keep at least one token
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        scores.masked_fill_(remove, float("-inf"))
    return scores


def next_tokens(logits: torch.Tensor, do_sample: bool, temperature=None, top_k=None, top_p=None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] (any float dtype) -> token ids [B]."""
    if not do_sample:   # fp32 as HF does (same ties); also 2x faster than a bf16 argmax on the CPU
        return logits.float().argmax(dim=-1)
    scores = warp(logits.float(), temperature, top_k, top_p)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
