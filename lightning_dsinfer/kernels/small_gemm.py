"""Small-batch GEMM / GEMV ("SBI-GeMM"): y = x @ W.T (+ bias) (+ residual) for M = 1..32 rows.

At decode the weights dominate the bytes moved, so the kernel streams W once: a program owns a
BLOCK_N slice of outputs and one split of K (split-K keeps every SM busy when N / BLOCK_N is small),
with all M rows in one BLOCK_M tile. Weights: fp32 / fp16 / bf16 [N, K] (torch Linear layout), int8
per output channel (scale [N]), or int4 group-wise (two nibbles per byte, scale [N, K / group]) with
the dequantisation fused into the tile load (integer tile -> activation dtype, scale applied per
tile / at the end). Split-K partials go to an fp32 workspace that a second kernel sums, adding bias
and residual. References: :func:`~lightning_dsinfer.kernels.reference.small_gemm` with
``reference.dequantize_int8`` / ``reference.dequantize_int4``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightning_dsinfer.kernels._common import dot, ieee_dot, interpreting

_FLOAT, _INT8, _INT4 = 0, 1, 2


@triton.jit
def _small_gemm_kernel(
    x_ptr, x_sm,                    # activations [M, K]: row stride (K contiguous)
    w_ptr, w_sn,                    # weight [N, K] (float / int8) or packed [N, K / 2] uint8: row stride
    s_ptr, s_sn,                    # scales: [N] (int8) or [N, K / GROUP] (int4): row stride
    b_ptr, r_ptr, r_sm,             # bias [N] (HAS_BIAS), residual [M, N] + row stride (HAS_RESIDUAL)
    out_ptr,                        # [M, N] contiguous (SPLIT_K == 1) or fp32 workspace [SPLIT_K, M, N]
    M, N, K,                        # sizes (K counts logical input dims, also for int4)
    k_per_split,                    # K range of one split (multiple of BLOCK_K)
    WMODE: tl.constexpr,            # 0 float weight, 1 int8 per-channel, 2 int4 group-wise
    GROUP: tl.constexpr,            # int4 group size (multiple of BLOCK_K)
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    IEEE_DOT: tl.constexpr,         # dot in fp32 (fp32 activations; bf16 under the interpreter)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = rm < M
    mn = rn < N
    x_rows = x_ptr + rm[:, None].to(tl.int64) * x_sm
    w_rows = w_ptr + rn[:, None].to(tl.int64) * w_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if WMODE == 2:
            # Packed byte j of the tile holds input dims k0 + 2j (low nibble) and k0 + 2j + 1 (high).
            j = tl.arange(0, BLOCK_K // 2)
            kk = k0 + 2 * j
            mk = kk < k_hi
            xe = tl.load(x_rows + kk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
            xo = tl.load(x_rows + kk[None, :] + 1, mask=mm[:, None] & mk[None, :], other=0.0)
            pk = tl.load(w_rows + (kk // 2)[None, :], mask=mn[:, None] & mk[None, :], other=0).to(tl.int32)
            lo = (pk & 0xF) - 8
            hi = (pk >> 4) - 8
            # |q| <= 8: exact in fp16 / bf16 (and in fp32 with IEEE_DOT)
            part = dot(xe, tl.trans(lo), IEEE_DOT) + dot(xo, tl.trans(hi), IEEE_DOT)
            sc = tl.load(s_ptr + rn.to(tl.int64) * s_sn + k0 // GROUP, mask=mn, other=0.0).to(tl.float32)
            acc += part * sc[None, :]
        else:
            kk = k0 + tl.arange(0, BLOCK_K)
            mk = kk < k_hi
            xt = tl.load(x_rows + kk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
            wt = tl.load(w_rows + kk[None, :], mask=mn[:, None] & mk[None, :], other=0)
            acc += dot(xt, tl.trans(wt), IEEE_DOT)   # int8 (|q| <= 127) is exact in fp16 / bf16
    if WMODE == 1:
        acc *= tl.load(s_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    om = mm[:, None] & mn[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        if HAS_RESIDUAL:
            acc += tl.load(r_ptr + rm[:, None].to(tl.int64) * r_sm + rn[None, :], mask=om, other=0.0).to(tl.float32)
        tl.store(out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=om)
    else:
        ws = out_ptr + (pid_k.to(tl.int64) * M + rm[:, None]) * N + rn[None, :]
        tl.store(ws, acc, mask=om)


@triton.jit
def _split_k_reduce_kernel(
    ws_ptr,                         # fp32 workspace [SPLIT_K, M, N]
    b_ptr, r_ptr, r_sm,             # bias [N] (HAS_BIAS), residual [M, N] + row stride (HAS_RESIDUAL)
    out_ptr,                        # [M, N] contiguous
    M, N,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < N
    acc = tl.zeros([BLOCK_N], tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(ws_ptr + (s * M + m) * N + rn, mask=mn, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        acc += tl.load(r_ptr + m * r_sm + rn, mask=mn, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * N + rn, acc.to(out_ptr.dtype.element_ty), mask=mn)


def _launch(x, w, scale, wmode, group, n, k, bias, residual, split_k, block_n, block_k):
    if x.shape[-1] != k:
        raise ValueError(f"x last dim {x.shape[-1]} does not match the weight's K = {k}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"activation dtype {x.dtype} not supported (fp32 / fp16 / bf16)")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias shape {tuple(bias.shape)} must be ({n},)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    r2 = None
    if residual is not None:
        if residual.shape != (*lead, n):
            raise ValueError(f"residual shape {tuple(residual.shape)} must be {(*lead, n)}")
        r2 = residual.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    out = torch.empty((*lead, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if residual is None and bias is None else out.copy_(
            (torch.zeros_like(out) if residual is None else residual) + (0 if bias is None else bias))
    interp = interpreting()
    block_m = 16 if m <= 16 else 32
    block_n = block_n or (16 if interp else 64)
    block_k = block_k or (32 if interp else 128)
    if wmode == _INT4:
        block_k = min(block_k, group)
        if group % block_k:
            raise ValueError(f"group_size {group} must be a multiple of the K tile {block_k}")
    n_tiles = triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    if split_k is None:
        target = 2 * torch.cuda.get_device_properties(x.device).multi_processor_count \
            if x.device.type == "cuda" else 4
        split_k = max(1, min(triton.cdiv(target, n_tiles * triton.cdiv(m, block_m)), k_tiles // 4 or 1, 16))
    split_k = max(1, min(split_k, k_tiles))
    k_per_split = triton.cdiv(k_tiles, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    dst = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    dummy = x2
    grid = (n_tiles, split_k, triton.cdiv(m, block_m))
    _small_gemm_kernel[grid](
        x2, x2.stride(0), w, w.stride(0), scale if scale is not None else dummy,
        scale.stride(0) if scale is not None else 0, bias if bias is not None else dummy,
        r2 if r2 is not None else dummy, r2.stride(0) if r2 is not None else 0, dst,
        m, n, k, k_per_split, WMODE=wmode, GROUP=group, SPLIT_K=split_k,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=r2 is not None, IEEE_DOT=ieee_dot(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    if split_k > 1:
        rb = min(triton.next_power_of_2(n), 1024)
        _split_k_reduce_kernel[(m, triton.cdiv(n, rb))](
            dst, bias if bias is not None else dummy, r2 if r2 is not None else dummy,
            r2.stride(0) if r2 is not None else 0, out, m, n,
            SPLIT_K=split_k, HAS_BIAS=bias is not None, HAS_RESIDUAL=r2 is not None, BLOCK_N=rb, num_warps=4)
    return out


def small_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               residual: torch.Tensor | None = None, *, split_k: int | None = None,
               block_n: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K].T (+ bias [N]) (+ residual [..., N]) in x's dtype, fp32 accumulation."""
    if weight.dim() != 2 or weight.stride(-1) != 1:
        raise ValueError(f"weight must be [N, K] with contiguous K, got shape {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"weight dtype {weight.dtype}: use small_gemm_int8 / small_gemm_int4 for integers")
    n, k = weight.shape
    return _launch(x, weight, None, _FLOAT, 1, n, k, bias, residual, split_k, block_n, block_k)


def small_gemm_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                    residual: torch.Tensor | None = None, *, split_k: int | None = None,
                    block_n: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """Weight-only int8: x @ (qweight [N, K] int8 * scale [N]).T (+ bias) (+ residual).

    Produce qweight / scale with ``reference.quantize_int8_per_channel``.
    """
    if qweight.dtype != torch.int8 or qweight.dim() != 2 or qweight.stride(-1) != 1:
        raise ValueError(f"qweight must be int8 [N, K] with contiguous K, got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape
    if scale.shape != (n,):
        raise ValueError(f"scale shape {tuple(scale.shape)} must be ({n},)")
    return _launch(x, qweight, scale.contiguous(), _INT8, 1, n, k, bias, residual, split_k, block_n, block_k)


def small_gemm_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int,
                    bias: torch.Tensor | None = None, residual: torch.Tensor | None = None, *,
                    split_k: int | None = None, block_n: int | None = None,
                    block_k: int | None = None) -> torch.Tensor:
    """Weight-only int4, group-wise: packed uint8 [N, K / 2] (low nibble = even input dim, value + 8),
    scale [N, K / group_size]. Produce them with ``reference.quantize_int4_groupwise``.

    group_size must be a power of two >= 32 (a K tile never straddles two groups).
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.stride(-1) != 1:
        raise ValueError(f"packed must be uint8 [N, K / 2] with contiguous rows, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    if group_size < 32 or group_size & (group_size - 1):
        raise ValueError(f"group_size {group_size} must be a power of two >= 32")
    n, k = packed.shape[0], 2 * packed.shape[1]
    if k % group_size:
        raise ValueError(f"K = {k} must be a multiple of group_size {group_size}")
    if scale.shape != (n, k // group_size):
        raise ValueError(f"scale shape {tuple(scale.shape)} must be ({n}, {k // group_size})")
    return _launch(x, packed, scale if scale.stride(-1) == 1 else scale.contiguous(), _INT4, group_size, n, k,
                   bias, residual, split_k, block_n, block_k)
