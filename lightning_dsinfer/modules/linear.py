"""Inference linear layer: one weight, optional bias, optional residual add fused into the GEMM.

On the CPU with bf16 weights the weight is pre-packed once for oneDNN (``_reorder_linear_weight``)
and every call goes through ``_linear_pointwise``, which reads bf16 weights at close to streaming
bandwidth for the small M of decode (plain ``F.linear`` reaches about half of that on the same
machine; see benchmarks/RESULTS.md). Everything else uses ``F.linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The M the oneDNN weight layout is tuned for. Measured on a 2-core AVX512-BF16/AMX machine: 16 is
# within 5% of the best layout for M=1 decode and within 2% of the best for M=2048 prefill.
_PACK_BATCH_HINT = 16


def _can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Linear(nn.Module):
    """``y = x @ W^T + b (+ residual)``. ``weight`` is [out, in] and owned by this module.

    Row-parallel use: ``reduce`` (an all-reduce) sums the partial products of the tensor-parallel group;
    only the rank with ``owns_residual`` adds the residual (and only it holds the bias), so both are
    added once.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True,
                 reduce=None, owns_residual: bool = True):
        super().__init__()
        self.reduce, self.owns_residual = reduce, owns_residual
        self.out_features, self.in_features = weight.shape
        self.packed = pack and _can_pack(weight)
        if self.packed:
            weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PACK_BATCH_HINT)
        self.weight = weight if self.packed else weight.contiguous()
        self.bias = None if bias is None else bias.to(dtype=weight.dtype).contiguous()

    @property
    def nbytes(self) -> int:
        """Bytes read from memory by one call (weight + bias)."""
        n = self.out_features * self.in_features * self.weight.element_size()
        return n + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = self._matmul(x, residual if self.owns_residual else None)
        if self.reduce is not None:
            y = self.reduce(y)
        return y

    def _matmul(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if self.packed:
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            if residual is None:
                y = torch.ops.mkldnn._linear_pointwise(x2, self.weight, self.bias, "none", [], "")
            else:
                y = torch.ops.mkldnn._linear_pointwise.binary(
                    x2, residual.reshape(-1, self.out_features), self.weight, self.bias, "add")
            return y.view(*shape[:-1], self.out_features)
        y = F.linear(x, self.weight, self.bias)
        if residual is not None:
            y += residual
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, packed={self.packed}"
