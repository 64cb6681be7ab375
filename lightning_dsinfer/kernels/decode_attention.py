"""Decode attention over the KV cache, split-K ("flash-decoding"), for one new token per sequence.

One kernel, grid (B, Hkv, splits); each program takes the G = Hq / Hkv query heads sharing one KV head
(GQA / MQA: each K/V row is read once per group) and one slice of the key range, runs an online
softmax over it, and writes a normalised partial output and its log-sum-exp; the split of a (b, kv head) that
finishes last (a semaphore per pair, left at zero) merges the group's splits into the output. Short contexts
take smaller key blocks, so that a batch of one still spreads over the SMs. Per-sequence lengths (padded batches:
keys [kv_start[b], seq_lens[b]); any stride, so an expanded [1] serves every row), ALiBi,
sliding window, logit soft-capping and attention sinks (gpt-oss: a logit per query head that joins the softmax's
denominator, with no value; added once, to the final normaliser) are per-launch switches. The split count depends
only on ``max_seq_len`` (a host int), never on device values, so a launch can be captured in a CUDA graph.
Values may be narrower than the keys (the first ``dv`` columns of their cache). Keys wider than 256 (multi-head
latent attention: DeepSeek-V3's 576 = 512 latent + 64 rotary columns, the values a view of the latent ones, 128
query heads on one kv head) are read as a power-of-two main block and a tail block, and their query heads are
tiled 16 to a program (grid (B, Hkv * tiles, splits)), so the fp32 accumulator stays [16, dv <= 512].
Reference: :func:`lightning_dsinfer.kernels.reference.decode_attention`.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lightning_dsinfer.kernels._common import dot, ieee_dot, interpreting, online_softmax_step, semaphores


@triton.jit
def _decode_attn_split_kernel(
    q_ptr, q_sb, q_sh,              # q [B, Hq, D]: batch / head strides (D contiguous)
    k_ptr, k_sb, k_sh, k_ss,        # key cache [B_max, Hkv, S, D]: batch / head / seq strides (D contiguous)
    v_ptr, v_sb, v_sh, v_ss,        # value cache [B_max, Hkv, S, >= DV] (first DV columns read): strides likewise
    lens_ptr, lens_sb,              # seq_lens [B] int (query at column len-1) and its stride (0: one for all)
    start_ptr, start_sb,            # kv_start [B] int (if HAS_START), stride
    slopes_ptr,                     # ALiBi slopes [Hq] fp32 (if HAS_ALIBI)
    sinks_ptr,                      # sink logits [Hq], contiguous, any float dtype (if HAS_SINKS)
    part_ptr, lse_ptr,              # partial out [B, Hq, SPLITS, DV] fp32, lse [B, Hq, SPLITS] fp32
    lock_ptr,                       # int32 semaphore per (b, kv head, head tile), zero between launches
    out_ptr, o_sb, o_sh,            # output [B, Hq, DV]: batch / head strides
    scale, softcap, window,         # score scale; cap (if HAS_SOFTCAP); window (if HAS_WINDOW)
    chunk,                          # keys per split (multiple of BLOCK_N)
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, SPLITS: tl.constexpr,
    TILES: tl.constexpr,            # head tiles per kv head: program_id(1) = kv head * TILES + tile
    BLOCK_G: tl.constexpr,          # query heads per tile (TILES * BLOCK_G >= G)
    BLOCK_D: tl.constexpr,          # key columns [0, BLOCK_D) in the main block (all of D when TAIL == 0)
    TAIL: tl.constexpr,             # key columns [BLOCK_D, BLOCK_D + TAIL) in a second block; 0: none
    BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    SHARED_KV: tl.constexpr,        # the values are the main key block's first DV columns (v = k, BLOCK_DV == BLOCK_D):
                                    # the key tile serves as the value tile, each cache row is loaded once
    HAS_START: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    IEEE_DOT: tl.constexpr,         # dot in fp32 (fp32 inputs; bf16 under the interpreter) instead of TF32 / bf16
):
    b = tl.program_id(0)
    kvh = tl.program_id(1) // TILES
    split = tl.program_id(2)
    g = (tl.program_id(1) % TILES) * BLOCK_G + tl.arange(0, BLOCK_G)
    mg = g < G
    d = tl.arange(0, BLOCK_D)
    md = d < D
    dv = tl.arange(0, BLOCK_DV)
    mdv = dv < DV
    heads = kvh * G + g                                            # query heads of this tile
    q_rows = q_ptr + b.to(tl.int64) * q_sb + heads[:, None] * q_sh
    q = tl.load(q_rows + d[None, :], mask=mg[:, None] & md[None, :], other=0.0)
    if TAIL > 0:
        dt = BLOCK_D + tl.arange(0, TAIL)
        mdt = dt < D
        q_tail = tl.load(q_rows + dt[None, :], mask=mg[:, None] & mdt[None, :], other=0.0)
    end = tl.load(lens_ptr + b * lens_sb).to(tl.int32)                       # keys [lo, end); query at end - 1
    lo_valid = 0
    if HAS_START:
        lo_valid = tl.load(start_ptr + b * start_sb).to(tl.int32)
    if HAS_WINDOW:
        lo_valid = tl.maximum(lo_valid, end - window)
    lo = tl.maximum(split * chunk, lo_valid)
    hi = tl.minimum(split * chunk + chunk, end)
    if HAS_ALIBI:
        slope = tl.load(slopes_ptr + heads, mask=mg, other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    k_base = b.to(tl.int64) * k_sb + kvh.to(tl.int64) * k_sh
    v_base = b.to(tl.int64) * v_sb + kvh.to(tl.int64) * v_sh
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mn = n < hi
        k_rows = k_ptr + k_base + n[:, None].to(tl.int64) * k_ss
        k = tl.load(k_rows + d[None, :], mask=mn[:, None] & md[None, :], other=0.0)
        s = dot(q, tl.trans(k), IEEE_DOT)
        if TAIL > 0:
            k_tail = tl.load(k_rows + dt[None, :], mask=mn[:, None] & mdt[None, :], other=0.0)
            s += dot(q_tail, tl.trans(k_tail), IEEE_DOT)
        s = s * scale
        if HAS_SOFTCAP:   # cap * tanh(s / cap), tanh(u) = 2 * sigmoid(2u) - 1
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
        if HAS_ALIBI:
            s += slope[:, None] * (n - (end - 1)).to(tl.float32)[None, :]
        s = tl.where(mn[None, :], s, float("-inf"))
        if SHARED_KV:   # (acc's columns DV.. then hold key columns' sums: never stored)
            v = k
        else:
            v = tl.load(v_ptr + v_base + n[:, None].to(tl.int64) * v_ss + dv[None, :],
                        mask=mn[:, None] & mdv[None, :], other=0.0)
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, IEEE_DOT)
    has = l_i > 0.0                                                # False for an empty split
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    om = mg[:, None] & mdv[None, :]
    o_ptrs = out_ptr + b.to(tl.int64) * o_sb + heads[:, None] * o_sh + dv[None, :]
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + heads, mask=mg, other=0.0).to(tl.float32)
    if SPLITS == 1:
        if HAS_SINKS:   # out * l / (l + e^(sink - m)), both terms taken relative to max(m, sink)
            top = tl.maximum(m_i, sink)
            top = tl.where(top == float("-inf"), 0.0, top)
            kept = l_i * tl.exp(m_i - top)
            out = out * (kept / (kept + tl.exp(sink - top)))[:, None]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=om)
    else:
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        hq = G * (tl.num_programs(1) // TILES)
        row = (b.to(tl.int64) * hq + heads) * SPLITS                  # split 0 of each head
        tl.store(part_ptr + (row + split)[:, None] * DV + dv[None, :], out, mask=om, cache_modifier=".cg")
        tl.store(lse_ptr + row + split, lse, mask=mg, cache_modifier=".cg")
        tl.debug_barrier()      # this program's stores issued before its arrival is counted
        # The split that arrives last merges the tile's splits (log-sum-exp weights) and resets the semaphore.
        sem = lock_ptr + b * tl.num_programs(1) + tl.program_id(1)
        if tl.atomic_add(sem, 1, sem="acq_rel") == SPLITS - 1:
            m = tl.full([BLOCK_G], float("-inf"), tl.float32)
            den = tl.zeros([BLOCK_G], tl.float32)
            acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
            for s in range(SPLITS):
                lse_s = tl.load(lse_ptr + row + s, mask=mg, other=float("-inf"), cache_modifier=".cg")
                m_new = tl.maximum(m, lse_s)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # no visible key so far
                alpha = tl.exp(m - m_safe)
                w = tl.exp(lse_s - m_safe)
                part = tl.load(part_ptr + (row + s)[:, None] * DV + dv[None, :], mask=om, other=0.0,
                               cache_modifier=".cg")
                acc = acc * alpha[:, None] + w[:, None] * part
                den = den * alpha + w
                m = m_new
            out = acc / tl.where(den > 0.0, den, 1.0)[:, None]
            if HAS_SINKS:   # once, over the merged splits: out * den / (den + e^(sink - m)), relative to max(m, sink)
                top = tl.maximum(m, sink)
                top = tl.where(top == float("-inf"), 0.0, top)
                kept = den * tl.exp(m - top)
                out = out * (kept / (kept + tl.exp(sink - top)))[:, None]
            tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=om)
            tl.atomic_xchg(sem, 0)


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # interpreter: few programs, it runs them one after another


MAX_GROUP = 128        # query heads per kv head
NARROW_HEAD_DIM = 256  # up to here: one key block, the whole group in one program
MAX_HEAD_DIM = 1024    # wider keys: a power-of-two main block (<= 512) and a tail block
MAX_VALUE_DIM = 512    # values of wide keys: one block, as wide as the fp32 accumulator of 16 heads allows (below)
WIDE_HEADS = 16        # query heads per program for wide keys (tl.dot's smallest M)


def _key_blocks(d: int) -> tuple[int, int]:
    """(main block, tail block) of a key row D wide: one power of two covering D up to NARROW_HEAD_DIM; wider, the
    largest power of two <= D (at most 512) and the next power of two above the rest (576 = 512 + 64, 320 = 256 + 64),
    0 when D is a power of two: no column is padded past the next multiple of the tail."""
    if d <= NARROW_HEAD_DIM:
        return max(16, triton.next_power_of_2(d)), 0
    main = min(512, 1 << (d.bit_length() - 1))
    return main, (max(16, triton.next_power_of_2(d - main)) if d > main else 0)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float | None = None, *, dv: int | None = None, kv_start: torch.Tensor | None = None,
                     alibi_slopes: torch.Tensor | None = None, window: int | None = None,
                     softcap: float | None = None, sinks: torch.Tensor | None = None,
                     max_seq_len: int | None = None, num_splits: int | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over the KV cache.

    q [B, Hq, D] (B <= 64 is the target; any B works); k_cache [B_max >= B, Hkv, S, D], Hq a multiple of Hkv
    (at most 128 per kv head), D <= 1024; v_cache [B_max, Hkv, S, >= dv] with the values in its first ``dv`` columns
    (default: all of them), dv <= D, and dv <= 512 when D > 256. ``v_cache`` may be a view of ``k_cache``'s first
    columns (multi-head latent attention: the values are the latent part of the key rows, ``k_cache[..., :dv]``):
    the kernel then loads each row once for both. seq_lens [B] int: row b's query sits at column seq_lens[b] - 1
    and sees keys [kv_start[b] (default 0), seq_lens[b]); ``window`` keeps only the last ``window`` of them.
    ``sinks`` [Hq] (gpt-oss): a logit per query head in each softmax's denominator (with no value: the keys'
    weights sum to less than 1). ``max_seq_len`` (host int, default S) bounds seq_lens and sizes the split; lengths
    are not checked on the device. Returns [B, Hq, dv] in q's dtype (a row with no visible key gives zeros).
    """
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(f"q must be [B, Hq, D] and caches [B_max, Hkv, S, D], got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    b, hq, d = q.shape
    bmax, hkv, s, dk = k_cache.shape
    dv = v_cache.shape[-1] if dv is None else dv
    if v_cache.shape[:3] != k_cache.shape[:3] or not 0 < dv <= min(v_cache.shape[-1], d):
        raise ValueError(f"v_cache {tuple(v_cache.shape)} must match k_cache {tuple(k_cache.shape)} but in its last "
                         f"dim, which holds the dv = {dv} values (0 < dv <= head dim {d})")
    if dk != d or bmax < b:
        raise ValueError(f"cache [B_max={bmax}, D={dk}] does not fit q [B={b}, D={d}]")
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and the caches must have a contiguous head dim")
    if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} must match the cache dtypes {k_cache.dtype}, {v_cache.dtype}")
    if seq_lens.shape != (b,) or (kv_start is not None and kv_start.shape != (b,)):
        raise ValueError(f"seq_lens / kv_start must be [{b}]")
    if alibi_slopes is not None and alibi_slopes.shape != (hq,):
        raise ValueError(f"alibi_slopes shape {tuple(alibi_slopes.shape)} must be ({hq},)")
    if sinks is not None and sinks.shape != (hq,):
        raise ValueError(f"sinks shape {tuple(sinks.shape)} must be ({hq},)")
    if window is not None and window < 1:
        raise ValueError(f"window {window} must be >= 1")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap {softcap} must be > 0")
    max_len = s if max_seq_len is None else max_seq_len
    if not 0 < max_len <= s:
        raise ValueError(f"max_seq_len {max_len} must be in [1, cache length {s}]")
    group = hq // hkv
    wide = d > NARROW_HEAD_DIM
    if group > MAX_GROUP or d > MAX_HEAD_DIM or (wide and dv > MAX_VALUE_DIM):
        raise ValueError(f"query heads per kv head {group} (max {MAX_GROUP}), head dim {d} (max {MAX_HEAD_DIM}) or "
                         f"value dim {dv} (max {MAX_VALUE_DIM} for head dims over {NARROW_HEAD_DIM}) too large")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    block_d, tail = _key_blocks(d)
    block_dv = max(16, triton.next_power_of_2(dv))
    if wide:
        # Wide keys (DeepSeek-V3's latent rows: D = 576 = 512 + 64, dv = 512, 128 heads on one kv head): 16 heads
        # per program, 8 warps (256 threads), 32 keys per block. Per thread, bf16: the fp32 accumulator [16, 512]
        # 32 KiB / 256 = 32 registers, q [16, 576] 18, a key tile [32, 576] 36, scores and p [16, 32] 2: ~90 of
        # the 255 a thread may hold. Shared memory: the key tile staged for the MMA, 36 KiB a pipeline stage, two
        # stages. ptxas for sm_90 (tools/compile_check.py's driver) agrees: bf16 95-100 registers, no spill, 37-56 KiB
        # shared; fp32 110-128 registers, 75-113 KiB; of the 227 KiB an H100 / H200 SM offers. A whole group of 128
        # heads would need a 256 KiB accumulator: the heads are tiled, each tile re-reading the rows (from L2).
        block_g, tiles = WIDE_HEADS, triton.cdiv(group, WIDE_HEADS)
        block_n, num_warps, num_stages = (16 if interpreting() else 32), 8, 2
    else:
        block_g, tiles = max(16, triton.next_power_of_2(group)), 1
        block_n, num_warps, num_stages = (16 if interpreting() else 64), 4, 3   # (3: Triton's default)
    shared_kv = (v_cache.data_ptr() == k_cache.data_ptr() and v_cache.stride() == k_cache.stride()
                 and block_dv == block_d)
    programs = _target_programs(q.device)
    want = triton.cdiv(programs, b * hkv * tiles) if num_splits is None else num_splits
    while block_n > 16 and triton.cdiv(max_len, block_n) < want:   # short contexts: smaller key blocks, more splits
        block_n //= 2
    n_blocks = triton.cdiv(max_len, block_n)
    if num_splits is None:
        num_splits = max(1, min(want, n_blocks, 64))
    num_splits = max(1, min(num_splits, n_blocks))
    chunk = triton.cdiv(n_blocks, num_splits) * block_n
    num_splits = triton.cdiv(max_len, chunk)
    out = torch.empty((b, hq, dv), dtype=q.dtype, device=q.device) if out is None else out
    if b == 0:
        return out
    if num_splits > 1:
        part = torch.empty((b, hq, num_splits, dv), dtype=torch.float32, device=q.device)
        lse = torch.empty((b, hq, num_splits), dtype=torch.float32, device=q.device)
        locks = semaphores(q.device, b * hkv * tiles)
    else:
        part = lse = locks = out
    _decode_attn_split_kernel[(b, hkv * tiles, num_splits)](
        q, q.stride(0), q.stride(1), k_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache, v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        seq_lens, seq_lens.stride(0), kv_start if kv_start is not None else seq_lens,
        kv_start.stride(0) if kv_start is not None else 0,
        alibi_slopes.float().contiguous() if alibi_slopes is not None else seq_lens,
        sinks.contiguous() if sinks is not None else seq_lens,
        part, lse, locks, out, out.stride(0), out.stride(1), scale, softcap or 1.0, window or 1, chunk,
        G=group, D=d, DV=dv, SPLITS=num_splits, TILES=tiles, BLOCK_G=block_g, BLOCK_D=block_d, TAIL=tail,
        BLOCK_DV=block_dv, BLOCK_N=block_n, SHARED_KV=shared_kv,
        HAS_START=kv_start is not None, HAS_ALIBI=alibi_slopes is not None, HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None, HAS_SINKS=sinks is not None, IEEE_DOT=ieee_dot(q.dtype),
        num_warps=num_warps, num_stages=num_stages)
    return out
