"""Rotary embedding of Q and K fused with the Q/K/V bias add and the KV-cache append (Deep-Fusion).

One program per (token, head): q heads are rotated into ``q_out``; k heads are rotated into ``k_out``
and, with a cache, written to ``k_cache[b, h, cache_start[b] + t]`` together with the (biased) V row.
NeoX ("rotate half") and GPT-J (interleaved) layouts, partial rotary (``rotary_dim < head_dim``:
the tail passes through), a position id per token (left-padded batches, packed positions).
Reference: :func:`lightning_dsinfer.kernels.reference.rotary_qkv_cache_write`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_head(src, dst, bias, i1, i2, mi, dd, tail, c, s, HAS_BIAS: tl.constexpr):
    """Rotate one head row: pairs (i1, i2) by (c, s), the tail (partial rotary) passes through; the bias row
    is added first. Stores to dst and returns the stored (rounded) pair halves and tail."""
    x1 = tl.load(src + i1, mask=mi, other=0.0).to(tl.float32)
    x2 = tl.load(src + i2, mask=mi, other=0.0).to(tl.float32)
    xt = tl.load(src + dd, mask=tail, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x1 += tl.load(bias + i1, mask=mi, other=0.0).to(tl.float32)
        x2 += tl.load(bias + i2, mask=mi, other=0.0).to(tl.float32)
        xt += tl.load(bias + dd, mask=tail, other=0.0).to(tl.float32)
    o1 = (x1 * c - x2 * s).to(dst.dtype.element_ty)
    o2 = (x2 * c + x1 * s).to(dst.dtype.element_ty)
    ot = xt.to(dst.dtype.element_ty)
    tl.store(dst + i1, o1, mask=mi)
    tl.store(dst + i2, o2, mask=mi)
    tl.store(dst + dd, ot, mask=tail)
    return o1, o2, ot


@triton.jit
def _rotary_qkv_kernel(
    q_ptr, q_sb, q_st, q_sh,        # q [B, T, Hq, D]: batch / token / head strides (D contiguous)
    k_ptr, k_sb, k_st, k_sh,        # k [B, T, Hkv, D]
    v_ptr, v_sb, v_st, v_sh,        # v [B, T, Hkv, D] (read only if WRITE_CACHE or HAS_V_BIAS)
    qo_ptr, ko_ptr, vo_ptr,         # outputs, contiguous [B, T, H, D] (vo written only if HAS_V_BIAS)
    qb_ptr, kb_ptr, vb_ptr,         # biases [Hq * D], [Hkv * D], [Hkv * D] (read only with HAS_*_BIAS)
    cos_ptr, sin_ptr, tab_stride,   # tables [P, R / 2] fp32; row stride
    pos_ptr,                        # positions [B, T] int (contiguous)
    kc_ptr, vc_ptr, c_sb, c_sh, c_ss,  # caches [B_max, Hkv, S, D]: batch / head / seq strides
    start_ptr, start_sb,            # cache_start [B] int: column of the row's first token; stride (0: one for all)
    T, HQ, HKV,                     # tokens per row, q heads, kv heads
    D: tl.constexpr,                # head dim
    HALF: tl.constexpr,             # rotary_dim // 2
    BLOCK_HALF: tl.constexpr,       # power of two >= HALF
    BLOCK_D: tl.constexpr,          # power of two >= D
    INTERLEAVED: tl.constexpr,      # GPT-J pairs (2i, 2i+1) instead of NeoX (i, i + HALF)
    HAS_Q_BIAS: tl.constexpr, HAS_K_BIAS: tl.constexpr, HAS_V_BIAS: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
):
    tok = tl.program_id(0)          # b * T + t
    head = tl.program_id(1)         # 0..HQ-1: q heads, HQ..HQ+HKV-1: k heads (and v)
    b = tok // T
    t = tok % T
    i = tl.arange(0, BLOCK_HALF)
    mi = i < HALF
    if INTERLEAVED:
        i1 = 2 * i
        i2 = 2 * i + 1
    else:
        i1 = i
        i2 = i + HALF
    dd = tl.arange(0, BLOCK_D)
    tail = (dd >= 2 * HALF) & (dd < D)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    c = tl.load(cos_ptr + pos * tab_stride + i, mask=mi, other=0.0)
    s = tl.load(sin_ptr + pos * tab_stride + i, mask=mi, other=0.0)
    if head < HQ:
        _rotate_head(q_ptr + b.to(tl.int64) * q_sb + t.to(tl.int64) * q_st + head * q_sh,
                     qo_ptr + (tok.to(tl.int64) * HQ + head) * D, qb_ptr + head * D,
                     i1, i2, mi, dd, tail, c, s, HAS_Q_BIAS)
    else:
        h = head - HQ
        o1, o2, ot = _rotate_head(k_ptr + b.to(tl.int64) * k_sb + t.to(tl.int64) * k_st + h * k_sh,
                                  ko_ptr + (tok.to(tl.int64) * HKV + h) * D, kb_ptr + h * D,
                                  i1, i2, mi, dd, tail, c, s, HAS_K_BIAS)
        md = dd < D
        if HAS_V_BIAS or WRITE_CACHE:
            vsrc = v_ptr + b.to(tl.int64) * v_sb + t.to(tl.int64) * v_st + h * v_sh
            vv = tl.load(vsrc + dd, mask=md, other=0.0).to(tl.float32)
            if HAS_V_BIAS:
                vv += tl.load(vb_ptr + h * D + dd, mask=md, other=0.0).to(tl.float32)
                tl.store(vo_ptr + (tok.to(tl.int64) * HKV + h) * D + dd, vv.to(vo_ptr.dtype.element_ty), mask=md)
        if WRITE_CACHE:
            col = tl.load(start_ptr + b * start_sb).to(tl.int64) + t
            coff = b.to(tl.int64) * c_sb + h * c_sh + col * c_ss
            # K goes to the cache exactly as stored in k_out (same rounding), V as v_out.
            tl.store(kc_ptr + coff + i1, o1.to(kc_ptr.dtype.element_ty), mask=mi)
            tl.store(kc_ptr + coff + i2, o2.to(kc_ptr.dtype.element_ty), mask=mi)
            tl.store(kc_ptr + coff + dd, ot.to(kc_ptr.dtype.element_ty), mask=tail)
            tl.store(vc_ptr + coff + dd, vv.to(vo_ptr.dtype.element_ty).to(vc_ptr.dtype.element_ty), mask=md)


def rotary_qkv(q: torch.Tensor, k: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
               positions: torch.Tensor, v: torch.Tensor | None = None, *, interleaved: bool = False,
               rotary_dim: int | None = None, q_bias: torch.Tensor | None = None, k_bias: torch.Tensor | None = None,
               v_bias: torch.Tensor | None = None, k_cache: torch.Tensor | None = None,
               v_cache: torch.Tensor | None = None, cache_start: torch.Tensor | None = None):
    """Rotate q [B, T, Hq, D] and k [B, T, Hkv, D] at ``positions`` [B, T]; optionally append K/V to a cache.

    cos_table, sin_table: fp32 [P, rotary_dim // 2] (``reference.rotary_tables``). q/k/v may be strided
    views (e.g. slices of a fused QKV output) as long as D is contiguous. With caches
    ([B_max, Hkv, S, D]) ``v`` and ``cache_start`` [B] (any stride: an expanded [1] is one column for every row)
    are required; the caches are written in place.
    Returns (q_rot, k_rot, v_out): new contiguous tensors (v_out is v itself unless ``v_bias`` is given).
    Positions must lie in [0, P); cache columns in [0, S) — not checked on the device.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, T, H, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    if k.shape[:2] != (b, t) or k.shape[3] != d:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}")
    r = d if rotary_dim is None else rotary_dim
    if r % 2 or not 0 < r <= d:
        raise ValueError(f"rotary_dim {r} must be even and in (0, head_dim={d}]")
    if cos_table.shape != sin_table.shape or cos_table.dim() != 2 or cos_table.shape[1] != r // 2:
        raise ValueError(f"cos/sin tables must both be [P, {r // 2}], got {tuple(cos_table.shape)} "
                         f"and {tuple(sin_table.shape)}")
    if positions.shape != (b, t):
        raise ValueError(f"positions shape {tuple(positions.shape)} must be (B, T) = {(b, t)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x is not None and x.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride {x.stride(-1)})")
    for name, bias, heads in (("q_bias", q_bias, hq), ("k_bias", k_bias, hkv), ("v_bias", v_bias, hkv)):
        if bias is not None and bias.numel() != heads * d:
            raise ValueError(f"{name} has {bias.numel()} elements, expected {heads} * {d} = {heads * d}")
    write_cache = k_cache is not None or v_cache is not None
    if (v_bias is not None or write_cache) and (v is None or v.shape != k.shape):
        raise ValueError(f"v must be given with k's shape {tuple(k.shape)} when writing the cache or adding v_bias")
    if write_cache:
        if k_cache is None or v_cache is None or cache_start is None:
            raise ValueError("k_cache, v_cache and cache_start must be given together")
        if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or k_cache.shape[1] != hkv or k_cache.shape[3] != d \
                or k_cache.shape[0] < b or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
            raise ValueError(f"caches must be [>= {b}, {hkv}, S, {d}] with equal strides, got "
                             f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
        if cache_start.shape != (b,):
            raise ValueError(f"cache_start shape {tuple(cache_start.shape)} must be ({b},)")
    cos_table, sin_table = cos_table.float().contiguous(), sin_table.float().contiguous()
    positions = positions.contiguous()
    q_out = torch.empty((b, t, hq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((b, t, hkv, d), dtype=k.dtype, device=k.device)
    v_out = torch.empty((b, t, hkv, d), dtype=v.dtype, device=v.device) if v_bias is not None else v
    vv = v if v is not None else k
    kc = k_cache if write_cache else k_out
    vc = v_cache if write_cache else k_out
    start = cache_start if write_cache else positions   # any stride (an expanded [1]): no copy
    if b * t:
        _rotary_qkv_kernel[(b * t, hq + hkv)](
            q, q.stride(0), q.stride(1), q.stride(2), k, k.stride(0), k.stride(1), k.stride(2),
            vv, vv.stride(0), vv.stride(1), vv.stride(2), q_out, k_out, v_out if v_out is not None else k_out,
            q_bias if q_bias is not None else q_out, k_bias if k_bias is not None else q_out,
            v_bias if v_bias is not None else q_out, cos_table, sin_table, cos_table.stride(0), positions,
            kc, vc, kc.stride(0), kc.stride(1), kc.stride(2), start, start.stride(0) if write_cache else 0, t, hq, hkv,
            D=d, HALF=r // 2, BLOCK_HALF=triton.next_power_of_2(r // 2), BLOCK_D=triton.next_power_of_2(d),
            INTERLEAVED=interleaved, HAS_Q_BIAS=q_bias is not None, HAS_K_BIAS=k_bias is not None,
            HAS_V_BIAS=v_bias is not None, WRITE_CACHE=write_cache, num_warps=1 if d <= 128 else 2)
    return q_out, k_out, v_out
