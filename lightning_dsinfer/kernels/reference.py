"""Pure-torch version of every op: the CPU execution path and the oracle for the Triton kernels.

Each function takes and returns plain tensors; shapes are in the docstrings. They are written for
speed on the CPU (few ops, in-place where safe, no Python loops over tokens) without changing what
they compute.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: ``x / sqrt(mean(x^2) + eps) * weight`` computed in fp32."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    # HF order: normalise in fp32, cast back, then scale in the input dtype.
    return F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype) * weight


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``residual += x`` in place, then ``rms_norm(residual)``; returns (normed, residual)."""
    residual.add_(x)
    return rms_norm(residual, weight, eps), residual


def rotary_half(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """NeoX ("rotate half") rotary embedding.

    x: [..., D]; cos: [..., D] (broadcastable) = cat(c, c); sin_signed = cat(-s, s). Equal to HF's
    ``x * cos + rotate_half(x) * sin`` (the sign of ``rotate_half`` lives in ``sin_signed``).
    """
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, swapped, sin_signed)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: gate_up [..., 2I] = cat(gate, up) -> silu(gate) * up [..., I]."""
    inter = gate_up.shape[-1] // 2
    gate = gate_up[..., :inter]
    out = F.silu(gate)
    return out.mul_(gate_up[..., inter:])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads.

    q: [B, Hq, T, D]; k, v: [B, Hkv, L, D]; mask: bool [B, 1, T, L] (True = attend) or None for
    no masking at all. Returns [B, Hq, T, D].
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    if t == 1 and group > 1:
        # Decode: fold the query heads of each KV group into the query-length axis, so each KV
        # head is read once and nothing is repeated. The mask is per key only ([B,1,1,L]).
        qg = q.reshape(b, hkv, group, d)
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
        return out.reshape(b, hq, 1, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=group > 1)
