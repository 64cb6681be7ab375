"""Gated DeltaNet's decode step (Qwen3-Next / Qwen3.5 linear attention, ``modules/gated_deltanet.py``) in two kernels.

``conv_step``: per row and channel the depthwise convolution of the history (K - 1 inputs, shifted in place) and the
new input (and a bias: Mamba-2's, ``kernels/mamba2.py``), fp32 multiply-adds rounded to the rows' dtype, then SiLU
(rounded): the q | k | v channels.
``short_conv_step``: LFM2's gated short convolution, B * x through the convolution (no activation) times C: the same
kernel, gated.
``delta_step``: per row, value head and block of value columns: q and k of its key head L2-normed in fp32 (q scaled by
Dk^-1/2), beta = sigmoid(b) (rounded), g = -exp(a_log) softplus(a + dt_bias), and the state tile [Dk, BLOCK_V] (fp32,
in place) decayed by exp(g), corrected by beta k (v - S^T k)^T and read by q. Each state element is read and written
once. References: the module's torch ops (:func:`~lightning_dsinfer.modules.gated_deltanet.causal_conv`,
:func:`~lightning_dsinfer.modules.gated_deltanet.delta_rule`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightning_dsinfer.kernels.mamba2 import _softplus      # (one softplus for both decode steps)


@triton.jit
def _conv_step_kernel(
    x_ptr, x_row,                   # new inputs [B, C] (row stride x_row; channel stride 1); GATED: in_proj rows of
                                    # B | C | x, C channels each (LFM2's short convolution)
    hist_ptr,                       # history [B, C, K - 1] contiguous, shifted in place
    w_ptr,                          # weights [C, K] contiguous
    bias_ptr,                       # [C] (HAS_BIAS: Mamba-2's convolution)
    y_ptr,                          # output [B, C] contiguous: SiLU(conv); GATED: C * conv(B * x)
    C,
    K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    j = tl.arange(0, BLOCK_K)
    mc = c < C
    rounded = y_ptr.dtype.element_ty
    row = x_ptr + b * x_row
    if GATED:                       # the convolution's input is B * x, rounded
        new = (tl.load(row + c, mask=mc, other=0.0).to(tl.float32)
               * tl.load(row + 2 * C + c, mask=mc, other=0.0).to(tl.float32)).to(rounded)
    else:
        new = tl.load(row + c, mask=mc, other=0.0)
    hist = hist_ptr + b * C * (K - 1) + c[:, None] * (K - 1)
    # the window: columns [0, K - 1) the history, column K - 1 the new input
    old = tl.load(hist + j[None, :], mask=mc[:, None] & (j[None, :] < K - 1), other=0.0)
    window = tl.where(j[None, :] == K - 1, new[:, None], old)
    w = tl.load(w_ptr + c[:, None] * K + j[None, :], mask=mc[:, None] & (j[None, :] < K), other=0.0)
    acc = tl.sum(window.to(tl.float32) * w.to(tl.float32), axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=mc, other=0.0).to(tl.float32)
    acc = acc.to(rounded).to(tl.float32)          # the convolution's output, rounded
    if GATED:                       # times C
        out = tl.load(row + C + c, mask=mc, other=0.0).to(tl.float32) * acc
    else:
        out = acc * tl.sigmoid(acc)
    tl.store(y_ptr + b * C + c, out.to(rounded), mask=mc)
    # the history drops its oldest input: window column j goes to history column j - 1
    tl.store(hist + (j[None, :] - 1), window, mask=mc[:, None] & (j[None, :] >= 1) & (j[None, :] < K))


@triton.jit
def _delta_step_kernel(
    y_ptr,                          # q | k | v [B, C] (conv_step's output)
    ba_ptr, ba_row,                 # b [Hv] then a [Hv] of each row (row stride ba_row)
    a_log_ptr, dt_bias_ptr,         # [Hv]
    s_ptr,                          # state [B, Hv, DK, DV] fp32 contiguous, in place
    out_ptr,                        # [B, Hv, DV] in y's dtype
    C, HV, R,                       # channels, value heads, value heads per key head
    beta_scale,                     # beta = sigmoid(b) (rounded) x this (OLMo Hybrid's allow_neg_eigval: 2)
    HK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    hv = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    hk = hv // R
    i = tl.arange(0, BLOCK_K)
    mi, mv = i < DK, cols < DV
    row = y_ptr + b * C
    q = tl.load(row + hk * DK + i, mask=mi, other=0.0).to(tl.float32)
    k = tl.load(row + HK * DK + hk * DK + i, mask=mi, other=0.0).to(tl.float32)
    v = tl.load(row + 2 * HK * DK + hv * DV + cols, mask=mv, other=0.0).to(tl.float32)
    q = q / tl.sqrt(tl.sum(q * q, axis=0) + 1e-6) * (1.0 / tl.sqrt(DK * 1.0))
    k = k / tl.sqrt(tl.sum(k * k, axis=0) + 1e-6)
    b_in = tl.load(ba_ptr + b * ba_row + hv).to(tl.float32)
    beta = tl.sigmoid(b_in).to(out_ptr.dtype.element_ty).to(tl.float32) * beta_scale   # (rounded, as torch.sigmoid
    #                                                                                      stores it)
    sp = tl.load(ba_ptr + b * ba_row + HV + hv).to(tl.float32) + tl.load(dt_bias_ptr + hv).to(tl.float32)
    softplus = _softplus(sp)
    decay = tl.exp(-tl.exp(tl.load(a_log_ptr + hv).to(tl.float32)) * softplus)
    tile = s_ptr + ((b * HV + hv) * DK + i[:, None]) * DV + cols[None, :]
    m = mi[:, None] & mv[None, :]
    s = tl.load(tile, mask=m, other=0.0) * decay
    delta = (v - tl.sum(s * k[:, None], axis=0)) * beta
    s += k[:, None] * delta[None, :]
    tl.store(tile, s, mask=m)
    o = tl.sum(s * q[:, None], axis=0)
    tl.store(out_ptr + (b * HV + hv) * DV + cols, o.to(out_ptr.dtype.element_ty), mask=mv)


def conv_step(x: torch.Tensor, history: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(depthwise conv (+ bias)) of one new input per row: x [B, C] (channel stride 1), history [B, C, K - 1]
    contiguous (shifted in place: the new input joins it), weight [C, K], bias [C] or None (Mamba-2's has one).
    Returns [B, C] in x's dtype."""
    b, c = x.shape
    kern = weight.shape[-1]
    if history.shape != (b, c, kern - 1) or not history.is_contiguous() or not weight.is_contiguous() \
            or x.stride(-1) != 1:
        raise ValueError(f"conv_step: x {tuple(x.shape)}, history {tuple(history.shape)} (contiguous), weight "
                         f"{tuple(weight.shape)} (contiguous) do not fit")
    y = torch.empty(b, c, dtype=x.dtype, device=x.device)
    block_c = 128
    _conv_step_kernel[(b, triton.cdiv(c, block_c))](x, x.stride(0), history, weight, weight if bias is None else bias,
                                                    y, c, K=kern, BLOCK_C=block_c,
                                                    BLOCK_K=triton.next_power_of_2(kern), HAS_BIAS=bias is not None,
                                                    GATED=False)
    return y


def short_conv_step(proj: torch.Tensor, history: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """LFM2's gated short convolution for one new token per row: proj [B, 3C] (in_proj's B | C | x; channel stride
    1), history [B, C, K - 1] contiguous (of B * x; shifted in place), weight [C, K]. Returns C * conv(B * x) [B, C]
    in proj's dtype (each product and the convolution rounded to it, as the torch ops)."""
    b = proj.shape[0]
    c, kern = weight.shape
    if history.shape != (b, c, kern - 1) or not history.is_contiguous() or not weight.is_contiguous() \
            or proj.stride(-1) != 1 or proj.shape[-1] < 3 * c:
        raise ValueError(f"short_conv_step: proj {tuple(proj.shape)}, history {tuple(history.shape)} (contiguous), "
                         f"weight {tuple(weight.shape)} (contiguous) do not fit")
    y = torch.empty(b, c, dtype=proj.dtype, device=proj.device)
    block_c = 128
    _conv_step_kernel[(b, triton.cdiv(c, block_c))](proj, proj.stride(0), history, weight, weight, y, c, K=kern,
                                                    BLOCK_C=block_c, BLOCK_K=triton.next_power_of_2(kern),
                                                    HAS_BIAS=False, GATED=True)
    return y


def delta_step(qkv: torch.Tensor, ba: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor,
               state: torch.Tensor, key_heads: int, key_dim: int, beta_scale: float = 1.0) -> torch.Tensor:
    """One token of the gated delta rule per row: qkv [B, C] contiguous (conv_step's output: q [Hk Dk] | k | v
    [Hv Dv]), ba [B, 2 Hv] (b then a; channel stride 1), a_log / dt_bias [Hv], state [B, Hv, Dk, Dv] fp32 contiguous
    (updated in place); beta = sigmoid(b) x ``beta_scale``. Returns the read-out [B, Hv, Dv] in qkv's dtype."""
    b, c = qkv.shape
    _, hv, dk, dv = state.shape
    if (dk != key_dim or state.shape[0] != b or state.dtype != torch.float32 or not state.is_contiguous()
            or not qkv.is_contiguous() or hv % key_heads or c != 2 * key_heads * dk + hv * dv
            or ba.shape[-1] < 2 * hv or ba.stride(-1) != 1):
        raise ValueError(f"delta_step: qkv {tuple(qkv.shape)}, ba {tuple(ba.shape)}, state {tuple(state.shape)} "
                         f"({state.dtype}) do not fit {key_heads} key heads of {key_dim}")
    out = torch.empty(b, hv, dv, dtype=qkv.dtype, device=qkv.device)
    block_k = max(16, triton.next_power_of_2(dk))
    block_v = min(64, max(16, triton.next_power_of_2(dv)))     # a [Dk, 64] fp32 tile: 32 KiB at Dk 128
    _delta_step_kernel[(b, hv, triton.cdiv(dv, block_v))](
        qkv, ba, ba.stride(0), a_log, dt_bias, state, out, c, hv, hv // key_heads, float(beta_scale), HK=key_heads,
        DK=dk, DV=dv,
        BLOCK_K=block_k, BLOCK_V=block_v)
    return out
