"""Attention masks and per-call step state, built once per forward and shared by all layers.

Index space: columns of the KV cache (prompts left-padded, so every row of a batch writes the same
column). Query ``i`` of a call sits at column ``q_start + i``. Key ``j`` is visible when it is not
padding, ``j <= q`` (causal) and, for sliding-window layers, ``q - j < window`` (HF's rule). Each query
also always sees itself, so a query that is padding gets a finite (ignored) output instead of NaN.
"""
from __future__ import annotations

import torch

from lightning_dsinfer.modules.rotary import RotaryTable
from lightning_dsinfer.modules.transformer import Step


def build_masks(key_valid: torch.Tensor | None, q_start: int, t: int, window: int | None, device):
    """Return (mask, window_mask), each bool [B|1, 1, T, L] or None (= every key visible)."""
    total = q_start + t
    need_window = window is not None and total > window
    if key_valid is None and t == 1 and not need_window:
        return None, None
    cols = torch.arange(total, device=device)
    rows = torch.arange(q_start, total, device=device)[:, None]                 # [T, 1]
    mask = (cols <= rows)[None, None]                                            # [1, 1, T, L]
    if key_valid is not None:
        mask = (mask & key_valid[:, None, None, :total]) | (cols == rows)[None, None]
    window_mask = None
    if need_window:
        window_mask = mask & (cols > rows - window)[None, None]
    return mask, window_mask


def build_step(rotary: RotaryTable, positions: torch.Tensor, key_valid: torch.Tensor | None, q_start: int, t: int,
               window: int | None) -> Step:
    cos, sin = rotary.gather(positions)
    mask, window_mask = build_masks(key_valid, q_start, t, window, positions.device)
    step = Step(cos=cos, sin=sin, mask=mask, window_mask=window_mask, q_start=q_start, positions=positions,
                valid=None if key_valid is None else key_valid[:, q_start:q_start + t], decoding=t == 1 and q_start > 0)
    if rotary.sliding is not None:
        step.sliding_cos, step.sliding_sin = rotary.sliding.gather(positions)
    return step
