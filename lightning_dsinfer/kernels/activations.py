"""Activations fused with the bias add and the gate (Deep-Fusion).

``bias_act``: act(x + bias) for GeLU (erf or tanh), SiLU, ReLU. ``gated_act``: act(gate + b_g) * (up + b_u)
from one [..., 2I] input: SwiGLU (silu) and GeGLU (gelu / gelu_tanh). ``clamped_swiglu``: gpt-oss's expert
activation, (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = min(gate, limit). fp32 math, one rounding.
References: :func:`~lightning_dsinfer.kernels.reference.bias_act`, :func:`~...reference.gated_act`,
:class:`~...reference.ClampedSwiGLU`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 0:        # silu
        y = x * tl.sigmoid(x)
    elif ACT == 1:      # gelu, erf form
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 2:      # gelu, tanh form; tanh(u) = 2 * sigmoid(2u) - 1
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = x * tl.sigmoid(2.0 * u)   # = 0.5 * x * (1 + tanh(u))
    else:               # relu
        y = tl.maximum(x, 0.0)
    return y


@triton.jit
def _bias_act_kernel(
    x_ptr, x_row_stride,            # input [M, N] (last dim contiguous)
    b_ptr,                          # bias [N] (read only if HAS_BIAS)
    out_ptr,                        # output [M, N] contiguous
    n_cols,                         # N
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,          # columns per program
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, _act(x, ACT).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_act_kernel(
    x_ptr, x_row_stride,            # input [M, 2I] = cat(gate, up) (last dim contiguous)
    b_ptr,                          # bias [2I] (read only if HAS_BIAS)
    out_ptr,                        # output [M, I] contiguous
    inter,                          # I
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,          # output columns per program
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < inter
    base = x_ptr + row * x_row_stride
    g = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(base + inter + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        g += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        u += tl.load(b_ptr + inter + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * inter + cols, (_act(g, ACT) * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _clamped_swiglu_kernel(
    x_ptr, x_row_stride,            # input [M, 2I] = cat(gate, up) (last dim contiguous)
    out_ptr,                        # output [M, I] contiguous
    inter,                          # I
    alpha, limit,                   # sigmoid's slope; the clamp (gate above, up both sides)
    BLOCK_N: tl.constexpr,          # output columns per program
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < inter
    base = x_ptr + row * x_row_stride
    g = tl.minimum(tl.load(base + cols, mask=mask, other=0.0).to(tl.float32), limit)
    u = tl.load(base + inter + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.minimum(tl.maximum(u, -limit), limit)
    y = (u + 1.0) * (g * tl.sigmoid(alpha * g))
    tl.store(out_ptr + row * inter + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor, n_out: int):
    """x [..., N] as rows [R, N] (unit stride along N), a new output [..., n_out] in x's dtype, and the launch: grid
    (None when there is nothing to compute) and its block / warps."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((*x.shape[:-1], n_out), dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(max(n_out, 1)), 1024)
    grid = (x2.shape[0], triton.cdiv(n_out, block)) if x2.shape[0] and n_out else None
    return x2, out, grid, dict(BLOCK_N=block, num_warps=max(1, min(block // 256, 4)))


def _half(gate_up: torch.Tensor) -> int:
    """I of gate_up [..., 2I] = cat(gate, up)."""
    n = gate_up.shape[-1]
    if n % 2:
        raise ValueError(f"gate_up last dim {n} must be even (cat of gate and up)")
    return n // 2


def _launch(kernel, x: torch.Tensor, bias: torch.Tensor | None, act: str, n_out: int) -> torch.Tensor:
    """Run ``kernel`` (either of the two above: same arguments) over the rows of x [..., N] -> [..., n_out]."""
    n = x.shape[-1]
    if act not in ACTS:
        raise ValueError(f"activation {act!r} not one of {sorted(ACTS)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias shape {tuple(bias.shape)} does not match last dim {n}")
    x2, out, grid, launch = _rows(x, n_out)
    if grid is not None:
        kernel[grid](x2, x2.stride(0), bias if bias is not None else x2, out, n_out, ACT=ACTS[act],
                     HAS_BIAS=bias is not None, **launch)
    return out


def bias_act(x: torch.Tensor, bias: torch.Tensor | None = None, act: str = "gelu_tanh") -> torch.Tensor:
    """act(x + bias) over x [..., N], bias [N]; returns a new tensor of x's shape and dtype."""
    return _launch(_bias_act_kernel, x, bias, act, x.shape[-1])


def gated_act(gate_up: torch.Tensor, bias: torch.Tensor | None = None, act: str = "silu") -> torch.Tensor:
    """act(gate) * up for gate_up [..., 2I] = cat(gate, up) (+ bias [2I]); returns [..., I].

    act="silu" is SwiGLU, "gelu" / "gelu_tanh" is GeGLU.
    """
    return _launch(_gated_act_kernel, gate_up, bias, act, _half(gate_up))


def clamped_swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU over gate_up [..., 2I] = cat(gate, up): (clamp(up, -limit, limit) + 1) *
    g * sigmoid(alpha * g), g = min(gate, limit), in fp32 with one rounding; returns [..., I]."""
    inter = _half(gate_up)
    x2, out, grid, launch = _rows(gate_up, inter)
    if grid is not None:
        _clamped_swiglu_kernel[grid](x2, x2.stride(0), out, inter, float(alpha), float(limit), **launch)
    return out
