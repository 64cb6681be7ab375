"""Grouped expert GEMM over the routing tables of ``moe_routing``: no padding, no one-hot.

Grid (E, row tiles, N tiles): program (e, i, j) takes rows i * BLOCK_M.. of expert e's slice
``sorted_ids[offsets[e]:offsets[e + 1]]`` (tiles past the expert's count exit at once), gathers their
input rows (assignment a reads x[a // rows_per_input], so the first GEMM reads tokens directly and the
second reads its [A, I] input in assignment order), multiplies by weight[e].T and writes out[a]
(plus its expert's bias row, then optionally scaled by the routing weight of a: gpt-oss's down(...) + b2 per expert,
then the weight, as transformers computes it). The combine is then ``out.view(T, k, N).sum(1)``.
Weights are fp32 / fp16 / bf16, or int8 with one fp32 scale per expert row (``weight_scale`` [E, N]): the int8
tile is widened to the activations' dtype (exact) for the tile product and the scale applied to the fp32 sums; or
int4 group-wise, packed as ``small_gemm_int4`` takes it (uint8 [E, N, K / 2]: byte j holds input dims 2j in the low
nibble and 2j + 1 in the high one, value + 8; ``weight_scale`` [E, N, K / group] fp32): the nibbles are dequantised
in the tile load (times their group's scale in fp32, rounded to the activations' dtype, as the reference dequantises
them), so a K tile may span several groups (any even group size that divides K: 8, 16, ... as the CPU path takes).
Reference: :func:`lightning_dsinfer.kernels.reference.moe_gemm`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightning_dsinfer.kernels._common import dot, ieee_dot, interpreting


@triton.jit
def _moe_gemm_kernel(
    x_ptr, x_sm,                    # inputs [R, K]: row stride (K contiguous)
    w_ptr, w_se, w_sn,              # expert weights [E, N, K] (int4: packed [E, N, K / 2]): expert / row strides
                                    # (K contiguous)
    sorted_ptr, offsets_ptr,        # sorted_ids [A] int32, offsets [E + 1] int32
    scale_ptr,                      # row scale [A] fp32 by assignment (HAS_SCALE)
    b_ptr, b_se,                    # bias [E, N] (HAS_BIAS): expert stride (N contiguous)
    ws_ptr, ws_se, ws_sn,           # int8 weights: scale [E, N] fp32; int4: [E, N, K / GROUP]; expert / row strides
    out_ptr,                        # out [A, N] contiguous, rows by assignment
    N, K,                           # sizes (K counts logical input dims, also for int4)
    ROWS_PER_INPUT: tl.constexpr,   # assignment a reads input row a // ROWS_PER_INPUT
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,         # add the row's expert's bias in fp32, before the row scale
    WMODE: tl.constexpr,            # 0 float weights, 1 int8 per expert row, 2 int4 group-wise
    GROUP: tl.constexpr,            # int4: input dims per scale (even)
    IEEE_DOT: tl.constexpr,         # dot in fp32 (fp32 inputs; bf16 under the interpreter)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    ex = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(offsets_ptr + ex)
    count = tl.load(offsets_ptr + ex + 1) - start
    if pid_m * BLOCK_M < count:
        r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mr = r < count
        a = tl.load(sorted_ptr + start + r, mask=mr, other=0)
        rows = (a // ROWS_PER_INPUT).to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = rn < N
        w_rows = w_ptr + ex.to(tl.int64) * w_se + rn[:, None].to(tl.int64) * w_sn
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        x_rows = x_ptr + rows[:, None] * x_sm
        s_rows = ws_ptr + ex.to(tl.int64) * ws_se + rn[:, None].to(tl.int64) * ws_sn
        for k0 in range(0, K, BLOCK_K):
            if WMODE == 2:
                # Packed byte j of the row holds input dims 2j (low nibble) and 2j + 1 (high); GROUP is even, so
                # both dims of a byte share a scale.
                kk = k0 + 2 * tl.arange(0, BLOCK_K // 2)
                mk = kk < K
                xm = mr[:, None] & mk[None, :]
                wm = mn[:, None] & mk[None, :]
                xe = tl.load(x_rows + kk[None, :], mask=xm, other=0.0)
                xo = tl.load(x_rows + kk[None, :] + 1, mask=xm, other=0.0)
                pk = tl.load(w_rows + (kk // 2)[None, :], mask=wm, other=0).to(tl.int32)
                sc = tl.load(s_rows + (kk // GROUP)[None, :], mask=wm, other=0.0)
                lo = (((pk & 0xF) - 8).to(tl.float32) * sc).to(x_ptr.dtype.element_ty)
                hi = (((pk >> 4) - 8).to(tl.float32) * sc).to(x_ptr.dtype.element_ty)
                acc += dot(xe, tl.trans(lo), IEEE_DOT) + dot(xo, tl.trans(hi), IEEE_DOT)
            else:
                kk = k0 + tl.arange(0, BLOCK_K)
                mk = kk < K
                xt = tl.load(x_rows + kk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
                wt = tl.load(w_rows + kk[None, :], mask=mn[:, None] & mk[None, :], other=0)
                acc += dot(xt, tl.trans(wt), IEEE_DOT)      # int8 (|q| <= 127) is exact in the activations' dtype
        if WMODE == 1:
            acc *= tl.load(ws_ptr + ex.to(tl.int64) * ws_se + rn, mask=mn, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + ex.to(tl.int64) * b_se + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + a, mask=mr, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + a[:, None].to(tl.int64) * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mr[:, None] & mn[None, :])


def moe_gemm(x: torch.Tensor, weight: torch.Tensor, sorted_ids: torch.Tensor, offsets: torch.Tensor,
             rows_per_input: int, row_scale: torch.Tensor | None = None,
             weight_scale: torch.Tensor | None = None, out: torch.Tensor | None = None,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """out[a] = (x[a // rows_per_input] @ weight[e(a)].T + bias[e(a)]) (* row_scale[a]) for every assignment a.

    x [R, K]; weight [E, N, K] (fp32 / fp16 / bf16, or int8 with ``weight_scale`` [E, N] fp32: weight[e] ~=
    q[e] * scale[e][:, None]; or int4: packed uint8 [E, N, K / 2] with ``weight_scale`` [E, N, K / group] fp32, as
    ``reference.quantize_int4_groupwise`` makes each expert's); sorted_ids [A] and offsets [E + 1] from
    ``moe_routing.moe_route``; row_scale [A] (e.g. the routing weights flattened); bias [E, N] (any float dtype; added
    in fp32 before the row scale and the one rounding). Use rows_per_input = top_k when x holds tokens, 1 when x is
    already per assignment. Returns [A, N].
    Every assignment must belong to some expert (as moe_route guarantees), else its row is unwritten: ``out``
    (contiguous [A, N] in x's dtype, e.g. zeros) keeps what the call does not write (offsets of a segment of the
    experts: expert parallelism).
    """
    if x.dim() != 2 or weight.dim() != 3:
        raise ValueError(f"x must be [R, K] and weight [E, N, K], got {tuple(x.shape)}, {tuple(weight.shape)}")
    int4 = weight.dtype == torch.uint8
    e, n, k = weight.shape
    k = 2 * k if int4 else k                    # (int4: K counts the logical input dims, two per byte)
    if x.shape[1] != k:
        raise ValueError(f"x last dim {x.shape[1]} does not match the experts' K = {k}")
    if offsets.shape != (e + 1,):
        raise ValueError(f"offsets shape {tuple(offsets.shape)} must be ({e + 1},)")
    a = sorted_ids.numel()
    if rows_per_input < 1 or x.shape[0] * rows_per_input != a:
        raise ValueError(f"x rows {x.shape[0]} * rows_per_input {rows_per_input} must equal assignments {a}")
    if row_scale is not None and row_scale.numel() != a:
        raise ValueError(f"row_scale has {row_scale.numel()} elements, expected {a}")
    if (weight.dtype in (torch.int8, torch.uint8)) != (weight_scale is not None):
        raise ValueError(f"{'int4' if int4 else 'int8'} expert weights need weight_scale "
                         f"({'[E, N, K / group]' if int4 else '[E, N]'}), and only int8 / int4 weights take one")
    group = 0
    if int4:
        groups = weight_scale.shape[-1] if weight_scale.dim() == 3 else 0
        group = k // groups if groups else 0
        if weight_scale.shape[:2] != (e, n) or not groups or group * groups != k or group % 2:
            raise ValueError(f"int4 weight_scale shape {tuple(weight_scale.shape)} must be ({e}, {n}, K / group) "
                             f"with an even group size dividing K = {k}")
    elif weight_scale is not None and weight_scale.shape != (e, n):
        raise ValueError(f"weight_scale shape {tuple(weight_scale.shape)} must be ({e}, {n})")
    if bias is not None and bias.shape != (e, n):
        raise ValueError(f"bias shape {tuple(bias.shape)} must be ({e}, {n})")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if out is None:
        out = torch.empty((a, n), dtype=x.dtype, device=x.device)
    elif out.shape != (a, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous ({a}, {n}) {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    if a == 0 or n == 0:
        return out
    interp = interpreting()
    block_m = 16 if interp else (16 if a <= 64 else 64)
    block_n = 16 if interp else 64
    block_k = 32 if interp else 64
    scale = row_scale.reshape(-1).float().contiguous() if row_scale is not None else out
    wscale = weight_scale.float().contiguous() if weight_scale is not None else out
    b = bias.contiguous() if bias is not None else out
    grid = (e, triton.cdiv(a, block_m), triton.cdiv(n, block_n))
    _moe_gemm_kernel[grid](
        x, x.stride(0), weight, weight.stride(0), weight.stride(1), sorted_ids.contiguous(), offsets.contiguous(),
        scale, b, b.stride(0) if bias is not None else 0,
        wscale, wscale.stride(0) if weight_scale is not None else 0, wscale.stride(1) if int4 else 0, out, n, k,
        ROWS_PER_INPUT=rows_per_input, HAS_SCALE=row_scale is not None, HAS_BIAS=bias is not None,
        WMODE=2 if int4 else int(weight_scale is not None), GROUP=group, IEEE_DOT=ieee_dot(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out
