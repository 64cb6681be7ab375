"""The fused decoder: attention + MLP blocks built from a policy's weights, and the model around them.

A forward pass is described by a :class:`Step` (positions, rotary rows, mask, where K/V go), built
once per call by the caller (engine or generation loop) and shared by every layer. K/V go either to
the engine's :class:`StaticKVCache` (own decode loop), to a Hugging Face ``Cache`` object (HF's
``generate`` loop: beam search, custom processors), or nowhere (a plain forward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_dsinfer.kernels import ops
from lightning_dsinfer.modules.kv_cache import StaticKVCache
from lightning_dsinfer.modules.linear import Linear


@dataclass
class Step:
    cos: torch.Tensor                      # [B, T, 1, D]
    sin: torch.Tensor                      # [B, T, 1, D] signed sin
    mask: torch.Tensor | None              # bool [B, 1, T, L]; None = attend to every key (L == T or decode)
    window_mask: torch.Tensor | None = None  # bool [B, 1, T, L] for sliding-window layers (None = same as mask)
    cache: StaticKVCache | None = None     # engine-owned cache ...
    start: int = 0                         # ... and the column this step writes at
    hf_cache: Any = None                   # or a transformers Cache (``update(k, v, layer_idx)``)
    q_start: int = 0                       # KV column of the first query (columns of mask / window_mask)

    def rows(self, a: int, b: int) -> "Step":
        """The step for queries [a, b) of this one (chunked prefill): they write K/V at ``start + a`` and see
        the columns up to their own, so running the chunks in order equals running the whole step."""
        end = self.q_start + b

        def cut(m):
            return None if m is None else m[:, :, a:b, :end]

        return Step(cos=self.cos[:, a:b], sin=self.sin[:, a:b], mask=cut(self.mask), window_mask=cut(self.window_mask),
                    cache=self.cache, start=self.start + a, hf_cache=self.hf_cache, q_start=self.q_start + a)


@dataclass
class LayerSpec:
    """Numbers one decoder block needs (from the policy)."""
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    scaling: float
    sliding_window: int | None = None


class Attention(nn.Module):
    def __init__(self, spec: LayerSpec, layer_idx: int, qkv: Linear, o: Linear,
                 q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.hq, self.hkv, self.d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.scaling, self.eps = spec.scaling, spec.rms_norm_eps
        self.sliding = spec.sliding_window is not None
        self.qkv, self.o = qkv, o
        self.q_norm, self.k_norm = q_norm, k_norm

    def forward(self, x: torch.Tensor, residual: torch.Tensor, step: Step) -> torch.Tensor:
        b, t, _ = x.shape
        hq, hkv, d = self.hq, self.hkv, self.d
        qkv = self.qkv(x).view(b, t, hq + 2 * hkv, d)
        v = qkv[:, :, hq + hkv:]
        if self.q_norm is None:
            qk = ops.rotary_half(qkv[:, :, :hq + hkv], step.cos, step.sin)
            q, k = qk[:, :, :hq], qk[:, :, hq:]
        else:  # Qwen3: RMSNorm over head_dim of q and k before rotary
            q = ops.rotary_half(ops.rms_norm(qkv[:, :, :hq], self.q_norm, self.eps), step.cos, step.sin)
            k = ops.rotary_half(ops.rms_norm(qkv[:, :, hq:hq + hkv], self.k_norm, self.eps), step.cos, step.sin)
        if step.cache is not None:
            keys, values = step.cache.write(self.layer_idx, k, v, step.start)
        elif step.hf_cache is not None:
            keys, values = step.hf_cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
        else:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)
        mask = step.window_mask if (self.sliding and step.window_mask is not None) else step.mask
        out = ops.attention(q.transpose(1, 2), keys, values, mask, self.scaling)   # [B, Hq, T, D]
        out = out.transpose(1, 2).reshape(b, t, hq * d)
        return self.o(out, residual)  # o_proj with the residual add fused in


class GatedMLP(nn.Module):
    def __init__(self, gate_up: Linear, down: Linear):
        super().__init__()
        self.gate_up, self.down = gate_up, down

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.down(ops.silu_and_mul(self.gate_up(x)), residual)


class DecoderLayer(nn.Module):
    """Pre-norm block: h = h + attn(norm1(h)); h = h + mlp(norm2(h))."""

    def __init__(self, attn: Attention, mlp: GatedMLP, input_norm: torch.Tensor, post_norm: torch.Tensor, eps: float):
        super().__init__()
        self.attn, self.mlp = attn, mlp
        self.input_norm, self.post_norm, self.eps = input_norm, post_norm, eps

    def forward(self, h: torch.Tensor, step: Step) -> torch.Tensor:
        h = self.attn(ops.rms_norm(h, self.input_norm, self.eps), h, step)
        return self.mlp(ops.rms_norm(h, self.post_norm, self.eps), h)


class DecoderModel(nn.Module):
    """Embedding -> blocks -> final norm -> lm_head. Weights are plain attributes, not parameters.

    With tensor parallelism the embedding and lm_head hold vocab rows [vocab_start, vocab_start + rows):
    lookups outside the shard give zeros and are summed over the group (``comm.all_reduce``); logits are
    gathered over the group (``comm.all_gather_last``) and cut to ``vocab_size``.
    """

    def __init__(self, embed: torch.Tensor, layers: list[DecoderLayer], final_norm: torch.Tensor, eps: float,
                 lm_head: Linear, vocab_size: int, vocab_start: int = 0, comm=None):
        super().__init__()
        self.embed = embed
        self.layers = nn.ModuleList(layers)
        self.final_norm, self.eps = final_norm, eps
        self.lm_head = lm_head
        self.vocab_size, self.vocab_start = vocab_size, vocab_start
        self.comm = comm
        self.sharded_vocab = comm is not None and comm.size > 1

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of this rank's embedding shard."""
        return nn.functional.embedding(ids, self.embed)

    @property
    def embed_rows(self) -> int:
        return self.embed.shape[0]

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.sharded_vocab:
            return self.lookup(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.embed_rows)
        h = self.lookup(local.masked_fill(outside, 0))
        h.masked_fill_(outside.unsqueeze(-1), 0)
        return self.comm.all_reduce(h)

    def hidden(self, h: torch.Tensor, step: Step) -> torch.Tensor:
        """Run all blocks and the final norm on embeddings h [B, T, H]."""
        for layer in self.layers:
            h = layer(h, step)
        return ops.rms_norm(h, self.final_norm, self.eps)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if not self.sharded_vocab:
            return self.lm_head(h)
        return self.comm.all_gather_last(self.lm_head(h))[..., :self.vocab_size]

    @property
    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads (all linears + norms; one embedding row)."""
        n = self.lm_head.nbytes + self.final_norm.numel() * self.final_norm.element_size()
        for layer in self.layers:
            for lin in (layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down):
                n += lin.nbytes
            n += 2 * layer.input_norm.numel() * layer.input_norm.element_size()
        return n
