"""Multi-head latent attention (DeepSeek-V2 / V3), in the absorbed form: the cache holds one latent row per token.

HF's module projects x to a latent c (``kv_lora_rank``, RMS-normed) and a rotary key k_pe shared by the heads,
caches both, and expands them every step into per-head keys [k_nope = W_UK c, k_pe] and values v = W_UV c
(``kv_b_proj``). Here the expansion is moved onto the query and the output instead (the products are the same):

    q_nope . (W_UK c) = (W_UK^T q_nope) . c          sum_j p_j (W_UV c_j) = W_UV (sum_j p_j c_j)

so attention is multi-query attention of the queries [W_UK^T q_nope, q_pe] over one cached "KV head" [c, k_pe]
(``kv_lora_rank + qk_rope_head_dim`` wide), whose values are its first ``kv_lora_rank`` columns; each head's
output latent then goes through W_UV and o_proj. The cache is 576 values per token and layer for DeepSeek-V3 where
expanded keys and values would be 128 heads x 320, and a decode step reads it once for all heads.

A prompt is cheaper the other way round (vLLM's choice too): with T queries over L keys, the absorbed form's
scores and values are 2 kv_lora_rank + rope wide per (query, key, head) and it moves each query and output through
W_UK / W_UV, where expanding the L cached latents into per-head keys and values (two GEMMs) leaves attention
nope + rope and v wide. Each call takes the form with fewer FLOPs (:meth:`LatentAttention.expands`): a whole prompt
(T = L) always expands, a decode step (T = 1) never does, a prompt chunk after a long cached prefix may not. The
cache holds the latent either way.

One GEMM reads the block's normed input: ``qkv`` holds q_a_proj's rows (or q_proj's, this rank's heads) and
kv_a_proj_with_mqa's, so the Triton path's norm prologue (``Linear.norm_forward``) applies to it as to a QKV
projection. With tensor parallelism the heads are split (q_b / q_proj rows, kv_b rows, o_proj columns) and every
rank computes the latent and caches it whole. Rotary dims stored interleaved are made rotate-half when read (the
rows producing them reordered: the scores do not change).
"""
from __future__ import annotations

import torch
from torch import nn

from lightning_dsinfer.kernels import ops, reference
from lightning_dsinfer.modules.linear import Linear


class LatentAttention(nn.Module):
    def __init__(self, layer_idx: int, heads: int, shape, scaling: float, eps: float, qkv: Linear, o: Linear,
                 kv_b: torch.Tensor, kv_a_norm: torch.Tensor, q_b: Linear | None = None,
                 q_a_norm: torch.Tensor | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.hq, self.hkv = heads, 1
        self.rank, self.rope, self.nope, self.vdim = (shape.kv_lora_rank, shape.qk_rope_head_dim,
                                                      shape.qk_nope_head_dim, shape.v_head_dim)
        self.d = self.rank + self.rope                    # the cached row: latent, then rotary key
        self.q_width = shape.q_lora_rank or heads * shape.qk_head_dim     # qkv's first rows: q_a (or q)
        self.scaling, self.eps = scaling, eps
        self.sliding, self.softcap, self.alibi, self.sinks = False, None, None, None
        self.qkv, self.o, self.q_b = qkv, o, q_b
        self.q_a_norm, self.kv_a_norm = q_a_norm, kv_a_norm
        self.kv_b_bytes = kv_b.numel() * kv_b.element_size()
        # kv_b's two halves as batches of their own (contiguous: a strided batch makes bmm copy it at every call)
        per_head = kv_b.view(heads, self.nope + self.vdim, self.rank)
        self.w_uk = per_head[:, :self.nope].contiguous()                  # [h, nope, rank]
        self.w_uv = per_head[:, self.nope:].contiguous()                  # [h, v, rank]
        self.form = "auto"        # or "absorbed" / "expanded" for every prompt (tests, benchmarks)

    def expands(self, t: int, length: int) -> bool:
        """Whether T > 1 queries over ``length`` keys take the expanded form: fewer multiply-adds per head, i.e.
        T L (2 rank + rope) + T rank (nope + v)  >  L rank (nope + v) + T L (nope + rope + v)."""
        if t == 1 or self.form != "auto":
            return t > 1 and self.form == "expanded"
        r, n, v = self.rank, self.nope, self.vdim
        return t * length * (2 * r - n - v) + t * r * (n + v) > length * r * (n + v)

    @property
    def nbytes(self) -> int:
        """Weight bytes a step reads: the projections and kv_b (W_UK and W_UV)."""
        n = self.qkv.nbytes + self.o.nbytes + (self.q_b.nbytes if self.q_b is not None else 0)
        return n + self.kv_b_bytes

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, step) -> torch.Tensor:
        return self.from_qkv(self.qkv(x), residual, step)

    def from_qkv(self, proj: torch.Tensor, residual: torch.Tensor | None, step) -> torch.Tensor:
        """Attention given the fused projection [B, T, q_width + kv_lora_rank + rope]; ``residual`` added by o_proj."""
        b, t, _ = proj.shape
        h, r = self.hq, self.rank
        q = proj[..., :self.q_width]
        if self.q_b is not None:
            q = self.q_b(ops.rms_norm(q.contiguous(), self.q_a_norm, self.eps))
        q = q.view(b, t, h, self.nope + self.rope)
        latent = ops.rms_norm(proj[..., self.q_width:self.q_width + r].contiguous(), self.kv_a_norm, self.eps)
        k_pe = reference.rotary_half(proj[..., self.q_width + r:].unsqueeze(2), step.cos, step.sin)   # [B, T, 1, R]
        q_pe = reference.rotary_half(q[..., self.nope:], step.cos, step.sin)                          # [B, T, h, R]
        row = torch.cat((latent, k_pe.squeeze(2)), dim=-1)                                           # [B, T, D]
        keys = self._keys(row, step)                                                                 # [B, 1, L, D]
        if self.expands(t, keys.shape[2]):
            out = self._expanded(q[..., :self.nope], q_pe, keys, step.mask)                          # [B, T, h v]
        else:
            out = self._absorbed(q[..., :self.nope], q_pe, keys, step.mask)
        return self.o(out, residual)

    def _absorbed(self, q_nope, q_pe, keys, mask) -> torch.Tensor:
        """Multi-query attention over the latent rows; [B, T, h v]."""
        b, t, h, _ = q_nope.shape
        r = self.rank
        # the queries in latent space: W_UK^T q_nope per head, then their rotary part
        q_lat = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(h, b * t, self.nope), self.w_uk)
        query = torch.cat((q_lat.view(h, b, t, r).transpose(0, 1), q_pe.transpose(1, 2)), dim=-1)   # [B, h, T, D]
        # values: the latent columns of the same rows (a view; the decode kernel loads each row once for both)
        out = ops.attention(query, keys, keys[..., :r], mask, self.scaling)                          # [B, h, T, rank]
        out = torch.bmm(out.transpose(0, 1).reshape(h, b * t, r), self.w_uv.transpose(1, 2))         # [h, B T, v]
        return out.view(h, b, t, self.vdim).permute(1, 2, 0, 3).reshape(b, t, h * self.vdim)

    def _expanded(self, q_nope, q_pe, keys, mask) -> torch.Tensor:
        """HF's form: the cached latents expanded into each head's keys [k_nope, k_pe] and values; [B, T, h v]."""
        b, t, h, _ = q_nope.shape
        length = keys.shape[2]
        latent = keys[:, 0, :, :self.rank].reshape(b * length, self.rank)     # (2-D: a strided 3-D input would
        k_pe = keys[:, 0, :, self.rank:]                                       # make F.linear copy the weight per row)
        k_nope = torch.nn.functional.linear(latent, self.w_uk.view(h * self.nope, self.rank))
        values = torch.nn.functional.linear(latent, self.w_uv.view(h * self.vdim, self.rank))
        key = torch.cat((k_nope.view(b, length, h, self.nope),
                         k_pe[:, :, None].expand(b, length, h, self.rope)), dim=-1).transpose(1, 2)  # [B, h, L, D]
        query = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)                                  # [B, h, T, D]
        out = ops.attention(query, key, values.view(b, length, h, self.vdim).transpose(1, 2), mask, self.scaling)
        return out.transpose(1, 2).reshape(b, t, h * self.vdim)

    def _keys(self, row: torch.Tensor, step) -> torch.Tensor:
        """Write this step's rows [B, T, D] where the step's K go and return every key row the queries see."""
        b, t, _ = row.shape
        cache = step.cache
        if cache is not None:
            k_rows, _, col = cache.slots(self.layer_idx, b, step.start)
            if isinstance(col, torch.Tensor):              # a CUDA-graph decode step: the column as a tensor
                k_rows.index_copy_(2, col, row.unsqueeze(1))
            else:
                k_rows[:, 0, col:col + t].copy_(row)
            return cache.read(self.layer_idx, b, step.start + t)[0]
        if step.hf_cache is not None:     # HF's cache holds the latent and the rotary key as its "keys" and "values"
            latent, k_pe = step.hf_cache.update(row[:, None, :, :self.rank].contiguous(),
                                                row[:, None, :, self.rank:].contiguous(), self.layer_idx)
            return torch.cat((latent, k_pe), dim=-1)
        return row.unsqueeze(1)
