"""Rotary-embedding tables: cos / signed-sin rows for every position up to ``max_seq_len``.

The inverse frequencies and the attention scaling come from the policy (which reads them off the
Hugging Face model, so every rope variant HF implements statically — default, linear, llama3, yarn,
longrope below its switch point — is reproduced exactly). Positions are gathered once per forward
and shared by all layers.
"""
from __future__ import annotations

import torch


def mrope_axes(freqs: int, section, interleaved: bool) -> torch.Tensor:
    """The position row (0 time, 1 height, 2 width) each of ``freqs`` rotary frequencies reads under M-RoPE, as HF lays
    them out: in contiguous sections of ``section``'s sizes (Qwen 2 / 2.5-VL), or ``interleaved`` (Qwen3-VL, Qwen 3.5:
    height every third frequency from 1 and width from 2, each up to 3 x its section; time the rest)."""
    if not interleaved:
        axes = torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in enumerate(section)])
        if axes.numel() != freqs:
            raise ValueError(f"mrope_section {list(section)} does not cover the {freqs} rotary frequencies")
        return axes
    axes = torch.zeros(freqs, dtype=torch.long)
    for axis, offset in ((1, 1), (2, 2)):
        axes[offset:section[axis] * 3:3] = axis
    return axes


class RotaryTable:
    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, max_seq_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", sliding_inv_freq: torch.Tensor | None = None,
                 sliding_attention_scaling: float = 1.0, mrope_axes: torch.Tensor | None = None):
        inv_freq = inv_freq.detach().to(device="cpu", dtype=torch.float32)
        pos = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]                          # [S, R/2], as HF: fp32 (R: rotated dims)
        cos = freqs.cos() * attention_scaling
        sin = freqs.sin() * attention_scaling
        self.cos = torch.cat((cos, cos), dim=-1).to(device=device, dtype=dtype)      # [S, R]
        self.sin = torch.cat((-sin, sin), dim=-1).to(device=device, dtype=dtype)     # [S, R], sign of rotate_half
        self.max_seq_len = max_seq_len
        # M-RoPE (Qwen-VL, Qwen 3.5): the position row each column reads ([R], both halves), or None (one row of positions)
        self.mrope = None if mrope_axes is None else torch.cat((mrope_axes, mrope_axes)).to(device)
        # Gemma 3: the sliding-window layers' own table (``Step.sliding_cos`` / ``sliding_sin``), or None
        self.sliding = None if sliding_inv_freq is None else RotaryTable(
            sliding_inv_freq, sliding_attention_scaling, max_seq_len, dtype, device)

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (long) -> cos, sin [B, T, 1, R] (broadcast over heads; R < D: partial rotary). M-RoPE:
        positions [3, B, T] (time, height, width), each column from its own row's position."""
        if positions.dim() == 2:
            return self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)
        if self.mrope is None:
            raise ValueError(f"positions of shape {tuple(positions.shape)}: this model's rope takes one row [B, T].")
        rows = self.mrope.expand(1, *positions.shape[1:], -1)                              # [1, B, T, R]
        return (self.cos[positions].gather(0, rows)[0].unsqueeze(2),
                self.sin[positions].gather(0, rows)[0].unsqueeze(2))
