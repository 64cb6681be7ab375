"""Mamba-1's selective scan (``mamba``, FalconMamba, Jamba: ``modules/gated_deltanet.Mamba1Mixer``) in one kernel, over
the tokens of a call in order: a prompt's, or a decode step's one.

Per row and block of channels: the state tile [BLOCK_I, N] (fp32) stays in registers over the tokens; each token's
dt = softplus(dt + dt_bias) (fp32), the tile decayed by exp(dt A) (A = -exp(A_log)) and fed dt B x; y = the tile
rounded to the rows' dtype times C, summed in fp32 and rounded (transformers' product); the output (y + D x) silu(z)
rounded. The state is read once and written once per call. Reference: the module's torch recurrence (one token at a
time, the same roundings).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightning_dsinfer.kernels.mamba2 import _softplus


@triton.jit
def _scan_kernel(
    x_ptr, dt_ptr,                  # [B, T, I] contiguous: the convolution's output, dt_proj's output
    z_ptr, z_row, z_tok,            # z [B, T, I] (row / token strides, channel stride 1)
    bc_ptr, bc_row, bc_tok,         # B | C [B, T, 2N] (row / token strides, stride 1)
    dt_bias_ptr, d_ptr,             # [I]
    a_log_ptr,                      # [I, N]
    s_ptr,                          # state [B, I, N] fp32 contiguous, in place
    out_ptr,                        # [B, T, I] in the rows' dtype
    T, I, N,
    BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    n = tl.arange(0, BLOCK_N)
    mi, mn = i < I, n < N
    m = mi[:, None] & mn[None, :]
    a = -tl.exp(tl.load(a_log_ptr + i[:, None] * N + n[None, :], mask=m, other=0.0).to(tl.float32))
    bias = tl.load(dt_bias_ptr + i, mask=mi, other=0.0).to(tl.float32)
    dskip = tl.load(d_ptr + i, mask=mi, other=0.0).to(tl.float32)
    tile = s_ptr + (b * I + i[:, None]) * N + n[None, :]
    s = tl.load(tile, mask=m, other=0.0)
    rounded = out_ptr.dtype.element_ty
    for t in range(T):
        at = (b * T + t) * I + i
        dt = _softplus(tl.load(dt_ptr + at, mask=mi, other=0.0).to(tl.float32) + bias)
        x = tl.load(x_ptr + at, mask=mi, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + b * z_row + t * z_tok + i, mask=mi, other=0.0).to(tl.float32)
        row = bc_ptr + b * bc_row + t * bc_tok
        bb = tl.load(row + n, mask=mn, other=0.0).to(tl.float32)
        cc = tl.load(row + N + n, mask=mn, other=0.0).to(tl.float32)
        s = tl.exp(dt[:, None] * a) * s + (dt[:, None] * bb[None, :]) * x[:, None]
        y = tl.sum(s.to(rounded).to(tl.float32) * cc[None, :], axis=1).to(rounded).to(tl.float32)
        out = (y + x * dskip) * (z * tl.sigmoid(z))
        tl.store(out_ptr + at, out.to(rounded), mask=mi)
    tl.store(tile, s, mask=m)


def scan(x: torch.Tensor, z: torch.Tensor, dt: torch.Tensor, bc: torch.Tensor, dt_bias: torch.Tensor,
         a_log: torch.Tensor, d: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """x, dt [B, T, I] contiguous, z [B, T, I] and bc [B, T, 2N] with channel stride 1, dt_bias / D [I], a_log [I, N],
    the state [B, I, N] fp32 contiguous (updated in place). Returns (y + D x) silu(z) [B, T, I] in x's dtype."""
    b, t, i = x.shape
    n = a_log.shape[-1]
    if (not x.is_contiguous() or not dt.is_contiguous() or dt.shape != x.shape or z.shape != x.shape
            or z.stride(-1) != 1 or bc.shape != (b, t, 2 * n) or bc.stride(-1) != 1 or a_log.shape != (i, n)
            or not a_log.is_contiguous() or state.shape != (b, i, n) or state.dtype != torch.float32
            or not state.is_contiguous()):
        raise ValueError(f"mamba1 scan: x {tuple(x.shape)}, z {tuple(z.shape)}, dt {tuple(dt.shape)}, bc "
                         f"{tuple(bc.shape)}, a_log {tuple(a_log.shape)}, state {tuple(state.shape)} do not fit")
    out = torch.empty_like(x)
    block_n = max(16, triton.next_power_of_2(n))
    block_i = max(16, min(64, 4096 // block_n))         # a [BLOCK_I, N] fp32 tile <= 16 KiB of registers
    _scan_kernel[(b, triton.cdiv(i, block_i))](
        x, dt, z, z.stride(0), z.stride(1), bc, bc.stride(0), bc.stride(1), dt_bias, d, a_log, state, out, t, i, n,
        BLOCK_I=block_i, BLOCK_N=block_n)
    return out
