"""Pre-allocated, static-shape KV cache: one K and one V tensor per layer, written in place.

Layout per layer: [max_batch, kv_heads, max_seq, head_dim]. Row ``b`` of a batch uses slot ``b``; all
rows share one write index (prompts are left-padded), so a decode step writes one column for the
whole batch with a single copy and attention reads the prefix ``[:, :, :end]`` as a view.

``keys_only`` (latent attention, DeepSeek): one tensor per layer, ``v`` the same tensors as ``k`` (attention reads
its values from the cached latent's columns), so the cache holds half the bytes.

``linear`` (Qwen3-Next / 3.5, LFM2, Mamba-2): the linear-state layers' per-row states instead of K/V
(``modules/gated_deltanet.py``): ``conv[layer]`` [B, C, K - 1] in the cache's dtype and ``state[layer]`` (Gated
DeltaNet [B, Hv, Dk, Dv], Mamba-2 [B, H, P, N], a short convolution's empty) in fp32; their K/V are empty, except
in the layers of ``attention_too`` (Falcon-H1: Mamba-2 beside attention), which hold both.

``shapes`` (Gemma 4): layers whose (KV heads, head dim) differ from the model's; ``no_kv``: layers that hold none (they
read another layer's K/V).
"""
from __future__ import annotations

import warnings

import torch


def hf_cache_name() -> str:
    """The name transformers gives a model's cache (forward's argument, the output's field): "cache" in newer versions, before
    that "past_key_values" (the installed version's ``CausalLMOutputWithPast`` says which)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class StaticKVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_batch_size: int, max_seq_len: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", keys_only: bool = False,
                 linear: dict[int, tuple[tuple, tuple]] | None = None, attention_too=(),
                 shapes: dict[int, tuple[int, int]] | None = None, no_kv=()):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.keys_only = keys_only
        self.linear = linear or {}      # layer -> (conv history shape, state shape) of one row
        self.attention_too = set(attention_too)     # linear-state layers with K/V too
        self.shapes = shapes or {}      # layer -> (KV heads, head dim) where not the model's
        self.no_kv = set(no_kv)
        self.conv: dict[int, torch.Tensor] = {}
        self.state: dict[int, torch.Tensor] = {}
        self.max_seq_len = max_seq_len
        self.dtype, self.device = dtype, torch.device(device)
        self.max_batch_size = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._allocate(max_batch_size)

    def _allocate(self, max_batch_size: int) -> None:
        def kv(i):
            empty = (i in self.linear and i not in self.attention_too) or i in self.no_kv
            heads, d = self.shapes.get(i, (self.kv_heads, self.head_dim))
            shape = (max_batch_size, heads, 0 if empty else self.max_seq_len, d)
            return torch.zeros(shape, dtype=self.dtype, device=self.device)

        self.k = [kv(i) for i in range(self.num_layers)]
        self.v = self.k if self.keys_only else [kv(i) for i in range(self.num_layers)]
        self.conv = {i: torch.zeros(max_batch_size, *conv, dtype=self.dtype, device=self.device)
                     for i, (conv, _) in self.linear.items()}
        self.state = {i: torch.zeros(max_batch_size, *state, dtype=torch.float32, device=self.device)
                      for i, (_, state) in self.linear.items()}
        self.max_batch_size = max_batch_size

    @property
    def nbytes(self) -> int:
        return ((1 if self.keys_only else 2) * sum(t.numel() * t.element_size() for t in self.k)
                + sum(t.numel() * t.element_size() for t in (*self.conv.values(), *self.state.values())))

    def ensure_batch(self, batch_size: int) -> None:
        """Grow the cache (once, with a warning) when a batch exceeds the allocated rows."""
        if batch_size <= self.max_batch_size:
            return
        old = self.max_batch_size
        self.k, self.v, self.conv, self.state = [], [], {}, {}
        self._allocate(batch_size)
        warnings.warn(
            f"dsinfer: batch size {batch_size} exceeds max_batch_size={old}; the KV cache was re-allocated "
            f"for {batch_size} rows ({self.nbytes / 2**20:.0f} MiB). Pass max_batch_size={batch_size} or more to "
            f"init_inference / DSInferStrategy to allocate it once up front.", stacklevel=3)

    def rows(self, start: int, stop: int) -> "StaticKVCache":
        """A cache over rows [start, stop) of this one (views, no copy): a pipeline's micro-batch of those rows
        writes and reads them as rows [0, stop - start)."""
        view = object.__new__(StaticKVCache)
        view.__dict__.update(self.__dict__)
        view.k, view.v = [k[start:stop] for k in self.k], [v[start:stop] for v in self.v]
        view.conv = {i: t[start:stop] for i, t in self.conv.items()}
        view.state = {i: t[start:stop] for i, t in self.state.items()}
        view.max_batch_size = stop - start
        return view

    def reset_linear(self, rows: int) -> None:
        """Zero rows [:rows] of the linear-attention states: the loops call it where a batch's sequences start (the
        layers then read zeros at column 0, and a decode step never asks where it is)."""
        for t in (*self.conv.values(), *self.state.values()):
            t[:rows].zero_()

    def linear_buffers(self, layer: int, b: int, conv: tuple, state: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [:b] of a linear-attention layer's convolution history and state (``conv`` / ``state``: their shapes
        per row, as allocated)."""
        return self.conv[layer][:b], self.state[layer][:b]

    # A step's K/V go through two calls, so the write can be fused into the rotary kernel
    # (``kernels.ops.rotary_write_kv``): ``slots`` says where to write, ``read`` gives what attention reads.
    def slots(self, layer: int, b: int, start: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(K rows, V rows [b, Hkv, S, D], first column) that a step of b rows writes to."""
        return self.k[layer][:b], self.v[layer][:b], start

    def read(self, layer: int, b: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V views [b, Hkv, end, D]: columns [0, end) of rows [:b]."""
        return self.k[layer][:b, :, :end], self.v[layer][:b, :, :end]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, T, Hkv, D] at columns [start, start+T); return the K, V views [B, Hkv, start+T, D]."""
        b, t = k.shape[0], k.shape[1]
        kc, vc, _ = self.slots(layer, b, start)
        kc[:, :, start:start + t].copy_(k.transpose(1, 2))
        vc[:, :, start:start + t].copy_(v.transpose(1, 2))
        return self.read(layer, b, start + t)
