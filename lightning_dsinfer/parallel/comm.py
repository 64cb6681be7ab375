"""Collectives of one tensor-parallel group, as named methods (no-ops for a group of one)."""
from __future__ import annotations

import torch
import torch.distributed as dist


class TensorParallelComm:
    def __init__(self, group=None, size: int = 1, rank: int = 0, src: int = 0):
        self.group, self.size, self.rank = group, size, rank
        self.src = src                    # global rank of this group's tp rank 0
        self.all_reduce_calls = 0
        self.all_reduce_bytes = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group, in place."""
        if self.size > 1:
            self.all_reduce_calls += 1
            self.all_reduce_bytes += x.numel() * x.element_size()
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's ``x`` along the last dim (rank order)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast_(self, x: torch.Tensor) -> torch.Tensor:
        """Overwrite ``x`` with tp rank 0's copy."""
        if self.size > 1:
            dist.broadcast(x, src=self.src, group=self.group)
        return x

    def sync_rng(self) -> None:
        """Give every rank of the group tp rank 0's CPU RNG state, so sampling agrees."""
        if self.size > 1:
            state = torch.get_rng_state()
            self.broadcast_(state)
            torch.set_rng_state(state)
