"""Attention masks and per-call step state, built once per forward and shared by all layers.

Index space: columns of the KV cache (prompts left-padded, so every row of a batch writes the same
column). Query ``i`` of a call sits at column ``q_start + i``. Key ``j`` is visible when it is not
padding, ``j <= q`` (causal) and, for sliding-window layers, ``q - j < window`` (HF's rule); for chunked layers
(Llama 4), when ``j`` is in ``q``'s chunk: chunks of ``chunk`` columns counted from the row's first real token (HF
subtracts each row's left padding). Each query also always sees itself, so a query that is padding gets a finite
(ignored) output instead of NaN. Chunked and sliding layers both read ``window_mask`` (a model has one or the other).
A vision-language prompt's ``blocks`` (multimodal.py: Gemma 3's images) also let the tokens of one
block (id >= 0) see each other, later ones too (HF's ``block_sequence_ids``: OR-ed into the causal rule, the window
applied after); in every layer, or (``blocks_in="sliding"``: Gemma 4) in the sliding-window layers only, the others
causal; ``blocks_in="past_window"`` (PaliGemma 2: HF's sliding-window mask ORs the blocks in after its window): a
block seen whole in the sliding layers too, however long.
"""
from __future__ import annotations

import torch

from lightning_dsinfer.modules.rotary import RotaryTable
from lightning_dsinfer.modules.transformer import Step


def chunk_start(first: torch.Tensor, cols: torch.Tensor, chunk: int) -> torch.Tensor:
    """The first column of the chunk holding column ``cols`` in a row whose first real token is at ``first`` (chunks of
    ``chunk`` columns from there, as HF counts them past the left padding)."""
    return first + torch.div(cols - first, chunk, rounding_mode="floor") * chunk


def build_masks(key_valid: torch.Tensor | None, q_start: int, t: int, window: int | None, device,
                chunk: int | None = None, blocks: torch.Tensor | None = None, blocks_in: str = "all"):
    """Return (mask, window_mask), each bool [B|1, 1, T, L] or None (= every key visible). ``blocks`` [B, T] or
    [B, q_start + T] (HF's, over the cached tokens too): the block id of each token (-1: none), seen whole in every
    layer within the window (``blocks_in`` "all"), in the sliding-window layers only ("sliding"), or in every layer
    past the window ("past_window")."""
    total = q_start + t
    need_window = window is not None and total > window
    need_chunks = chunk is not None and total > chunk
    if key_valid is None and t == 1 and not need_window and not need_chunks and blocks is None:
        return None, None
    cols = torch.arange(total, device=device)
    rows = torch.arange(q_start, total, device=device)[:, None]                 # [T, 1]
    own = (cols == rows)[None, None]
    def valid(m):         # (padding keys hidden; each query sees itself)
        return m if key_valid is None else (m & key_valid[:, None, None, :total]) | own

    causal = (cols <= rows)[None, None]                                          # [1, 1, T, L]
    inside = None
    if blocks is not None:
        keys = blocks if blocks.shape[-1] == total else torch.nn.functional.pad(blocks, (q_start, 0), value=-1)  # [B, L]
        queries = keys[:, q_start:]
        inside = (queries[:, None, :, None] == keys[:, None, None, :]) & (queries >= 0)[:, None, :, None]
    mask = valid(causal if inside is None else causal | inside)
    window_mask = None
    near = None if window is None else (cols > rows - window)[None, None]
    if inside is not None and blocks_in == "sliding":    # (Gemma 4: the blocks in the sliding layers, the rest causal)
        window_mask = mask if near is None else mask & near
        mask = valid(causal)
    elif inside is not None and blocks_in == "past_window" and near is not None:    # (PaliGemma 2)
        window_mask = valid((causal & near) | inside)
    elif need_window:
        window_mask = mask & near
    elif need_chunks:     # each (row, query)'s chunk
        first = (key_valid[:, :total].int().argmax(-1) if key_valid is not None
                 else torch.zeros(1, dtype=torch.long, device=device))[:, None, None]          # [B|1, 1, 1]
        start = chunk_start(first, rows[None], chunk)                                          # [B|1, T, 1]
        window_mask = (mask & (cols >= start)[:, None]) | own
    return mask, window_mask


def build_step(rotary: RotaryTable, positions: torch.Tensor, key_valid: torch.Tensor | None, q_start: int, t: int,
               window: int | None, chunk: int | None = None, blocks: torch.Tensor | None = None,
               blocks_in: str = "all") -> Step:
    cos, sin = rotary.gather(positions)       # (positions [3, B, T]: M-RoPE's rows, the first for the rest)
    positions = positions if positions.dim() == 2 else positions[0]
    mask, window_mask = build_masks(key_valid, q_start, t, window, positions.device, chunk, blocks, blocks_in)
    step = Step(cos=cos, sin=sin, mask=mask, window_mask=window_mask, q_start=q_start, positions=positions,
                valid=None if key_valid is None else key_valid[:, q_start:q_start + t], decoding=t == 1 and q_start > 0,
                lookahead=blocks is not None)
    if rotary.sliding is not None:
        step.sliding_cos, step.sliding_sin = rotary.sliding.gather(positions)
    return step
