"""RMSNorm fused with the bias + residual add (Deep-Fusion): one read of x and residual, two writes.

h = x (+ bias) (+ residual); out = h * rsqrt(mean(h^2) + eps) * w with w = weight, or (1 + weight) for
Gemma (``unit_offset``). Reference: :func:`lightning_dsinfer.kernels.reference.add_bias_rms_norm`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightning_dsinfer.kernels._common import MAX_FEATURES, norm_launch, residual_in

__all__ = ["rms_norm", "MAX_FEATURES"]


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, x_row_stride,            # input rows [M, N]; row stride in elements (last dim contiguous)
    res_ptr, res_row_stride,        # residual rows [M, N] (read only if HAS_RESIDUAL)
    bias_ptr,                       # bias [N] added to x (read only if HAS_BIAS)
    w_ptr,                          # norm weight [N]
    out_ptr, out_row_stride,        # normalised output [M, N]
    h_ptr, h_row_stride,            # new residual h [M, N] (written only if STORE_H)
    n_cols,                         # N: features per row
    eps,                            # added to the mean square
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_H: tl.constexpr,
    UNIT_OFFSET: tl.constexpr,      # True: scale by (1 + w) (Gemma)
    BLOCK_N: tl.constexpr,          # power of two >= N
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    h = residual_in(x_ptr, x_row_stride, res_ptr, res_row_stride, bias_ptr, h_ptr, h_row_stride, row, cols, mask,
                    HAS_RESIDUAL, HAS_BIAS, STORE_H)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        w += 1.0
    tl.store(out_ptr + row * out_row_stride + cols, (h * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             bias: torch.Tensor | None = None, unit_offset: bool = False, out: torch.Tensor | None = None):
    """RMSNorm of ``h = x (+ bias) (+ residual)`` over the last dim.

    x, residual: [..., N] (same shape and dtype); weight, bias: [N]. Returns ``out`` if neither residual
    nor bias is given, else ``(out, h)`` with h the new residual (a new tensor; inputs are not modified).
    """
    n = x.shape[-1]
    x2, r2, out, out2, h, h2, store_h, block, num_warps = norm_launch(x, residual, bias, out, {"weight": weight})
    if x2.shape[0]:
        _rms_norm_fwd_kernel[(x2.shape[0],)](
            x2, x2.stride(0), r2, r2.stride(0), bias if bias is not None else weight, weight,
            out2, out2.stride(0), h2, h2.stride(0), n, eps,
            HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, STORE_H=store_h,
            UNIT_OFFSET=unit_offset, BLOCK_N=block, num_warps=num_warps)
    return (out, h) if store_h else out
