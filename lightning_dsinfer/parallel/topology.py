"""World = data-parallel x pipeline x tensor. Rank layout: tensor fastest, then pipeline, then data:

    rank = dp_rank * (pp * tp) + pp_rank * tp + tp_rank

so a tensor-parallel group is a block of consecutive ranks (on one node when tp <= devices per node).
Pure arithmetic: testable with any fake rank / world size.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self):
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tensor_parallel_size={self.tp} and pipeline_parallel_size={self.pp} must be >= 1.")
        if self.world_size % (self.tp * self.pp) != 0:
            raise ValueError(
                f"world size {self.world_size} is not divisible by tensor_parallel_size={self.tp} x "
                f"pipeline_parallel_size={self.pp}; use a world size that is a multiple of {self.tp * self.pp}.")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}.")

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return (self.rank // self.tp) % self.pp

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tp * self.pp)

    def tp_groups(self) -> list[list[int]]:
        """Every tensor-parallel group, in the order all ranks must create them."""
        return [list(range(start, start + self.tp)) for start in range(0, self.world_size, self.tp)]

    def dp_groups(self) -> list[list[int]]:
        """Every data-parallel group (ranks with the same tp and pp rank)."""
        block = self.tp * self.pp
        return [list(range(offset, self.world_size, block)) for offset in range(block)]

    def pp_groups(self) -> list[list[int]]:
        """Every pipeline group (ranks of one replica with the same tp rank, in stage order), in the order all
        ranks must create them."""
        block = self.tp * self.pp
        return [[d * block + s * self.tp + r for s in range(self.pp)] for d in range(self.dp) for r in range(self.tp)]

    @property
    def pp_group_ranks(self) -> list[int]:
        return self.pp_groups()[self.dp_rank * self.tp + self.tp_rank]

    @property
    def tp_group_ranks(self) -> list[int]:
        return self.tp_groups()[self.rank // self.tp]

    @property
    def is_output_rank(self) -> bool:
        """The rank that speaks for its data-parallel replica (writes predictions)."""
        return self.tp_rank == 0 and self.pp_rank == self.pp - 1
