"""Pieces several kernel files share: the dot-precision switch, row views, and the fused norms' residual-in
step (its @triton.jit part and its launcher checks). Imported by kernel files only (it imports Triton)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightning_dsinfer.kernels import _interpreting as interpreting

MAX_FEATURES = 65536  # a fused norm's row must fit one program's block


def ieee_dot(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` should run in exact fp32 for operands of ``dtype``.

    fp32: exact, not TF32. bf16 under the interpreter: its tl.dot reads bf16 operands as raw integers
    (triton 3.9), so they are upcast to fp32 there; on a GPU bf16 / fp16 use the tensor cores.
    """
    return dtype == torch.float32 or (interpreting() and dtype == torch.bfloat16)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` accumulated in fp32, ``b`` cast to a's dtype (int8 / int4 weights, p to v's dtype);
    IEEE: both operands in fp32, exact (see :func:`ieee_dot`)."""
    if IEEE:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b.to(a.dtype))
    return out


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, IEEE: tl.constexpr):
    """One key block of flash attention: scores s [M, N] (fp32, -inf where masked), values v [N, D];
    running max m_i [M], sum l_i [M] and unnormalised output acc [M, D]. Rows that have seen no key yet
    (all -inf so far) stay at l_i = 0, acc = 0. Returns the new (m_i, l_i, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
    return m_new, l_i, acc


_LOCKS: dict[tuple, torch.Tensor] = {}   # (device type, index) -> int32 semaphores, zero between launches
_RETIRED: list[torch.Tensor] = []         # sets replaced by a larger one: kept, captured graphs may point at them


def semaphores(device: torch.device, count: int) -> torch.Tensor:
    """``count`` int32 semaphores for split-K launches (small GEMM tiles, decode-attention heads: the split that
    arrives last reduces). Every launch leaves them at zero (that split resets its own), so they are zeroed once,
    when made. One set per device: launches of these kernels on one device must not run concurrently on two streams
    (the engine runs them on one stream at a time; a CUDA graph replays them in order). Made outside CUDA-graph
    capture (inside, the zero fill would only be recorded): the engine's graph runner runs the step eagerly first."""
    key = (device.type, device.index if device.index is not None or device.type != "cuda"
           else torch.cuda.current_device())
    locks = _LOCKS.get(key)
    if locks is None or locks.numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split-K semaphores are made on a kernel's first split-K launch on a device, which "
                               "must not be inside CUDA-graph capture: run the captured call once eagerly first.")
        if locks is not None:
            _RETIRED.append(locks)
        locks = _LOCKS[key] = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
    return locks


def rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """t [..., n] as a [M, n] view with a contiguous last dim (a copy only when it must be)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


@triton.jit
def residual_in(x_ptr, x_row_stride, res_ptr, res_row_stride, bias_ptr, h_ptr, h_row_stride, row, cols, mask,
                HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_H: tl.constexpr):
    """h = x (+ bias) (+ residual) for one row, in fp32. With STORE_H, h is stored rounded to h's dtype and
    the rounded value is returned: the norm then sees what an unfused model would have stored."""
    h = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(res_ptr + row * res_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if STORE_H:
        h_lp = h.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * h_row_stride + cols, h_lp, mask=mask)
        h = h_lp.to(tl.float32)
    return h


def norm_launch(x: torch.Tensor, residual: torch.Tensor | None, bias: torch.Tensor | None,
                out: torch.Tensor | None, vectors: dict):
    """Checks and buffers of a fused norm's launcher. ``vectors``: the per-feature tensors by name (weight,
    norm bias, ...; None = absent), each checked to be [N].

    Returns (x2, r2, out, out2, h, h2, store_h, block, num_warps): [M, N] views of x and the residual
    (x2 stands in when there is none), the output and the new residual h (``out`` itself when h is not
    stored) with their [M, N] views, and the launch shape.
    """
    n = x.shape[-1]
    for name, t in {**vectors, "bias": bias}.items():
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match feature dim {n}")
    if n > MAX_FEATURES:
        raise ValueError(f"feature dim {n} exceeds {MAX_FEATURES}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} must be contiguous and match x "
                         f"{tuple(x.shape)} {x.dtype}")
    x2 = rows(x, n)
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    store_h = residual is not None or bias is not None
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if store_h else out
    r2 = rows(residual, n) if residual is not None else x2
    block = triton.next_power_of_2(n)
    return x2, r2, out, out.view(-1, n), h, h.view(-1, n), store_h, block, min(max(block // 256, 1), 16)
