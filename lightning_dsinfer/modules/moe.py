"""Sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): router, top-k experts, optional shared expert.

The experts stay in transformers' 3D layout (gate|up [E, 2I, H], down [E, H, I]); routing and the expert GEMMs
are :func:`kernels.ops.moe_mlp` (mapping tables and grouped GEMMs on the Triton path, a loop over the experts that
got tokens on the CPU).
"""
from __future__ import annotations

import torch
from torch import nn

from lightning_dsinfer.kernels import ops
from lightning_dsinfer.modules.linear import Linear


class MoEMLP(nn.Module):
    def __init__(self, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int,
                 renormalize: bool, weights_in_dtype: bool, shared=None, shared_gate: Linear | None = None):
        super().__init__()
        self.router, self.experts_gate_up, self.experts_down = router, gate_up, down
        self.top_k, self.renormalize, self.weights_in_dtype = top_k, renormalize, weights_in_dtype
        self.shared, self.shared_gate = shared, shared_gate      # GatedMLP, Linear [1, H] (Qwen2-MoE)

    @property
    def nbytes_per_token(self) -> int:
        """Weight bytes one token reads: the router, its top-k experts and the shared expert."""
        per_expert = (self.experts_gate_up[0].numel() + self.experts_down[0].numel()) * self.experts_down.element_size()
        n = self.router.numel() * self.router.element_size() + self.top_k * per_expert
        if self.shared is not None:
            n += self.shared.gate_up.nbytes + self.shared.down.nbytes + self.shared_gate.nbytes
        return n

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = ops.moe_mlp(x2, self.router, self.experts_gate_up, self.experts_down, self.top_k, self.renormalize,
                        self.weights_in_dtype)
        if self.shared is not None:
            s = self.shared(x2)
            y = y + torch.sigmoid(self.shared_gate(x2)) * s
        y = y.view(*lead, -1)
        return y if residual is None else y + residual
