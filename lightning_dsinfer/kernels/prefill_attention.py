"""Prompt (prefill) attention: causal flash attention with padding masks, GQA and an optional window.

The T queries are the last T of L >= T key columns (L > T: a later chunk of a prompt whose earlier keys
are already cached). Grid (query blocks, B * Hq); each program streams the keys its block can see (causal,
inside the row's valid range [kv_start[b], seq_lens[b]), inside the window) with an online softmax in fp32; K/V are
never repeated for GQA (query head h reads KV head h // (Hq / Hkv)). Values may be narrower or wider than the
keys (DeepSeek's expanded latent attention: keys nope + rope wide, values v_head_dim). Attention sinks (gpt-oss: a logit per query
head in each softmax's denominator, with no value) join each row's normaliser once, after the last key block. Query
rows that see no key (padding) are written as zeros.
Reference: :func:`lightning_dsinfer.kernels.reference.prefill_attention`.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lightning_dsinfer.kernels._common import dot, ieee_dot, interpreting, online_softmax_step


@triton.jit
def _prefill_attn_kernel(
    q_ptr, q_sb, q_st, q_sh,        # q [B, T, Hq, D]: batch / token / head strides (D contiguous)
    k_ptr, k_sb, k_st, k_sh,        # k [B, L, Hkv, D]
    v_ptr, v_sb, v_st, v_sh,        # v [B, L, Hkv, DV]
    o_ptr,                          # out [B, T, Hq, DV] contiguous
    start_ptr, lens_ptr,            # kv_start [B] (HAS_START), seq_lens [B] (HAS_LENS): valid key columns
    sinks_ptr,                      # sink logits [Hq], contiguous, any float dtype (HAS_SINKS)
    T, L, HQ, scale, window,        # queries, keys, query heads, score scale, window (HAS_WINDOW)
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,    # query heads per KV head, key / value head dims
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_START: tl.constexpr, HAS_LENS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr,
    IEEE_DOT: tl.constexpr,         # dot in fp32 (fp32 inputs; bf16 under the interpreter)
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    kvh = h // G
    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    md = d < D
    dv = tl.arange(0, BLOCK_DV)
    mdv = dv < DV
    q = tl.load(q_ptr + b.to(tl.int64) * q_sb + i[:, None].to(tl.int64) * q_st + h * q_sh + d[None, :],
                mask=(i[:, None] < T) & md[None, :], other=0.0)
    ci = i + (L - T)                                              # the queries' key columns
    lo = 0
    hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M + (L - T), L)
    if HAS_START:
        lo = tl.load(start_ptr + b).to(tl.int32)
    if HAS_LENS:
        hi = tl.minimum(hi, tl.load(lens_ptr + b).to(tl.int32))
    if HAS_WINDOW:
        lo = tl.maximum(lo, pid_m * BLOCK_M + (L - T) - window + 1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    kb = k_ptr + b.to(tl.int64) * k_sb + kvh * k_sh
    vb = v_ptr + b.to(tl.int64) * v_sb + kvh * v_sh
    for n0 in range(lo, hi, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        mj = j < hi
        k = tl.load(kb + j[:, None].to(tl.int64) * k_st + d[None, :], mask=mj[:, None] & md[None, :], other=0.0)
        s = dot(q, tl.trans(k), IEEE_DOT) * scale
        keep = mj[None, :] & (j[None, :] <= ci[:, None])         # j >= lo is implied by the loop
        if HAS_WINDOW:
            keep = keep & (j[None, :] > ci[:, None] - window)
        s = tl.where(keep, s, float("-inf"))
        v = tl.load(vb + j[:, None].to(tl.int64) * v_st + dv[None, :], mask=mj[:, None] & mdv[None, :], other=0.0)
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, IEEE_DOT)
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if HAS_SINKS:       # out * l / (l + e^(sink - m)), both terms taken relative to max(m, sink)
        sink = tl.load(sinks_ptr + h).to(tl.float32)
        top = tl.maximum(m_i, sink)
        top = tl.where(top == float("-inf"), 0.0, top)
        kept = l_i * tl.exp(m_i - top)
        out = out * (kept / (kept + tl.exp(sink - top)))[:, None]
    o_off = ((b.to(tl.int64) * T + i[:, None]) * HQ + h) * DV + dv[None, :]
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=(i[:, None] < T) & mdv[None, :])


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *,
                      kv_start: torch.Tensor | None = None, seq_lens: torch.Tensor | None = None,
                      window: int | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention over a prompt: q [B, T, Hq, D], k [B, L, Hkv, D], v [B, L, Hkv, DV] with L >= T (strided
    views allowed, D contiguous; DV: D, or another width); query i sits at key column L - T + i. Row b's valid key columns are
    [kv_start[b], seq_lens[b]) (left / right padding; defaults 0 and L). ``sinks`` [Hq] (gpt-oss): a logit per query
    head in each softmax's denominator (with no value). Returns a new [B, T, Hq, DV]
    tensor in q's dtype; query rows that see no key (padding) are zeros.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"q must be [B, T, Hq, D], k [B, L, Hkv, D] and v [B, L, Hkv, DV], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    if k.shape[0] != b or k.shape[1] < t or k.shape[3] != d:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} (B, D equal, L >= T)")
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}")
    dv = v.shape[3]
    if max(d, dv) > 256:
        raise ValueError(f"head dim {max(d, dv)} exceeds 256")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if min(q.stride(-1), k.stride(-1), v.stride(-1)) != 1 or max(q.stride(-1), k.stride(-1), v.stride(-1)) != 1:
        raise ValueError("q, k, v must have a contiguous head dim")
    for name, x in (("kv_start", kv_start), ("seq_lens", seq_lens)):
        if x is not None and x.shape != (b,):
            raise ValueError(f"{name} shape {tuple(x.shape)} must be ({b},)")
    if window is not None and window < 1:
        raise ValueError(f"window {window} must be >= 1")
    if sinks is not None and sinks.shape != (hq,):
        raise ValueError(f"sinks shape {tuple(sinks.shape)} must be ({hq},)")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty((b, t, hq, dv), dtype=q.dtype, device=q.device)
    if b * t == 0:
        return out
    block_m = block_n = 16 if interpreting() else (64 if max(d, dv) <= 128 else 32)
    dummy = out
    _prefill_attn_kernel[(triton.cdiv(t, block_m), b * hq)](
        q, q.stride(0), q.stride(1), q.stride(2), k, k.stride(0), k.stride(1), k.stride(2),
        v, v.stride(0), v.stride(1), v.stride(2), out,
        kv_start if kv_start is not None else dummy, seq_lens if seq_lens is not None else dummy,
        sinks.contiguous() if sinks is not None else dummy,
        t, k.shape[1], hq, scale, window or 1, G=hq // hkv, D=d, DV=dv,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        HAS_START=kv_start is not None, HAS_LENS=seq_lens is not None, HAS_WINDOW=window is not None,
        HAS_SINKS=sinks is not None, IEEE_DOT=ieee_dot(q.dtype), num_warps=4)
    return out
