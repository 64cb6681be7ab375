"""Mamba-2's decode step (Granite 4, Bamba, NemotronH: ``modules/gated_deltanet.Mamba2Mixer``) in three kernels.

``conv_step`` (``kernels/gated_delta.py``, with the convolution's bias): SiLU of the depthwise convolution over the
x | B | C channels, the history shifted in place.
``ssm_step``: per row, head and block of head columns: dt = softplus(dt + dt_bias) (each rounded to the rows' dtype,
as torch computes it) within the limits, the state tile [BLOCK_P, N] (fp32, in place) decayed by exp(dt A) and fed
dt x B (B, C: the head's group), read by C, plus D x: y [B, H P] rounded to the rows' dtype.
``gated_norm``: per row and group: (y silu(z)) in fp32, RMS-normed over the group's channels, rounded, times the
weight (rounded). Each state element is read and written once. Reference: the module's torch ops (:func:`~lightning_
dsinfer.modules.gated_deltanet.causal_conv`, :func:`~lightning_dsinfer.modules.gated_deltanet.ssd_scan`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _softplus(x):
    """softplus(x) in fp32 as torch's (x past its threshold 20 as is), log(1 + e) taken by its series where e = exp(x)
    is small (log(1 + e) in fp32 would lose e's digits: ~17% off at x = -15, 0 from x = -17)."""
    e = tl.exp(tl.minimum(x, 20.0))
    series = e * (1.0 - e * (0.5 - e * (1.0 / 3.0 - e * 0.25)))
    return tl.where(x > 20.0, x, tl.where(e < 0.05, series, tl.log(1.0 + e)))


@triton.jit
def _ssm_step_kernel(
    xbc_ptr,                        # conv_step's output [B, C]: x [H P] | B [G N] | C [G N]
    dt_ptr, dt_row,                 # dt [H] of each row (row stride dt_row)
    dt_bias_ptr, a_log_ptr, d_ptr,  # [H]
    s_ptr,                          # state [B, H, P, N] fp32 contiguous, in place
    y_ptr,                          # [B, H P] in the rows' dtype
    C, H, R, lo, hi,                # channels, heads, heads per group, dt's limits
    P: tl.constexpr, N: tl.constexpr, G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    mp, mn = p < P, n < N
    g = h // R
    row = xbc_ptr + b * C
    x = tl.load(row + h * P + p, mask=mp, other=0.0).to(tl.float32)
    bb = tl.load(row + H * P + g * N + n, mask=mn, other=0.0).to(tl.float32)
    cc = tl.load(row + H * P + G * N + g * N + n, mask=mn, other=0.0).to(tl.float32)
    rounded = y_ptr.dtype.element_ty
    sp = (tl.load(dt_ptr + b * dt_row + h).to(tl.float32) + tl.load(dt_bias_ptr + h).to(tl.float32))
    sp = sp.to(rounded).to(tl.float32)                                        # (dt + dt_bias, rounded)
    dt = _softplus(sp)
    dt = tl.minimum(tl.maximum(dt.to(rounded).to(tl.float32), lo), hi)
    decay = tl.exp(dt * -tl.exp(tl.load(a_log_ptr + h).to(tl.float32)))
    tile = s_ptr + ((b * H + h) * P + p[:, None]) * N + n[None, :]
    m = mp[:, None] & mn[None, :]
    s = tl.load(tile, mask=m, other=0.0) * decay + (dt * x)[:, None] * bb[None, :]
    tl.store(tile, s, mask=m)
    y = tl.sum(s * cc[None, :], axis=1) + x * tl.load(d_ptr + h).to(tl.float32)
    tl.store(y_ptr + b * H * P + h * P + p, y.to(rounded), mask=mp)


@triton.jit
def _gated_norm_kernel(
    y_ptr,                          # [B, I] (ssm_step's output)
    z_ptr, z_row,                   # z [I] of each row (row stride z_row)
    w_ptr,                          # norm weight [I]
    out_ptr,                        # [B, I]
    I, CG, eps,                     # channels, channels per group
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * CG + tl.arange(0, BLOCK)
    m = tl.arange(0, BLOCK) < CG
    y = tl.load(y_ptr + b * I + c, mask=m, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + b * z_row + c, mask=m, other=0.0).to(tl.float32)
    gated = y * (z * tl.sigmoid(z))
    normed = gated / tl.sqrt(tl.sum(gated * gated, axis=0) / CG + eps)
    rounded = out_ptr.dtype.element_ty
    w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * I + c, (w * normed.to(rounded).to(tl.float32)).to(rounded), mask=m)


def ssm_step(xbc: torch.Tensor, dt: torch.Tensor, dt_bias: torch.Tensor, a_log: torch.Tensor, d: torch.Tensor,
             state: torch.Tensor, groups: int, limit: tuple[float, float]) -> torch.Tensor:
    """One token of the selective scan per row: xbc [B, C] contiguous (conv_step's output: x [H P] | B [G N] | C),
    dt [B, H] (channel stride 1), dt_bias / a_log / D [H], state [B, H, P, N] fp32 contiguous (updated in place).
    Returns y + D x [B, H P] in xbc's dtype."""
    b, c = xbc.shape
    _, h, p, n = state.shape
    if (state.shape[0] != b or state.dtype != torch.float32 or not state.is_contiguous() or not xbc.is_contiguous()
            or h % groups or c != h * p + 2 * groups * n or dt.shape[-1] < h or dt.stride(-1) != 1):
        raise ValueError(f"ssm_step: xbc {tuple(xbc.shape)}, dt {tuple(dt.shape)}, state {tuple(state.shape)} "
                         f"({state.dtype}) do not fit {groups} groups")
    y = torch.empty(b, h * p, dtype=xbc.dtype, device=xbc.device)
    lo = float(torch.tensor(limit[0]).to(xbc.dtype))      # (torch clamps the rows' dtype to the limit in that dtype)
    block_n = max(16, triton.next_power_of_2(n))
    block_p = min(max(16, triton.next_power_of_2(p)), max(16, 8192 // block_n))   # a [BLOCK_P, N] fp32 tile <= 32 KiB
    _ssm_step_kernel[(b, h, triton.cdiv(p, block_p))](
        xbc, dt, dt.stride(0), dt_bias, a_log, d, state, y, c, h, h // groups, lo,
        min(float(limit[1]), 3.0e38), P=p, N=n, G=groups, BLOCK_P=block_p, BLOCK_N=block_n)
    return y


def gated_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """The gated group RMSNorm: y [B, I] contiguous, z [B, I] (channel stride 1), weight [I]. Returns [B, I]."""
    b, i = y.shape
    if i % groups or not y.is_contiguous() or z.shape[-1] < i or z.stride(-1) != 1 or weight.numel() != i:
        raise ValueError(f"gated_norm: y {tuple(y.shape)}, z {tuple(z.shape)}, weight {tuple(weight.shape)} do not "
                         f"fit {groups} groups")
    out = torch.empty_like(y)
    cg = i // groups
    _gated_norm_kernel[(b, groups)](y, z, z.stride(0), weight, out, i, cg, float(eps),
                                    BLOCK=max(16, triton.next_power_of_2(cg)))
    return out
