"""Tensor-parallel sharding rules (Megatron layout), as pure functions of (tp_rank, tp).

- attention: heads split by KV heads; q/k/v column-parallel, o row-parallel. When tp > kv_heads each KV
  head is replicated on tp / kv_heads consecutive ranks.
- MLP: gate/up column-parallel, down row-parallel (intermediate split).
- embedding and lm_head: vocab-parallel, vocab padded up to a multiple of tp.
- row-parallel biases are added once (by tp rank 0), not once per rank.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorShardPlan:
    tp_rank: int
    tp: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    def __post_init__(self):
        tp, hq, hkv = self.tp, self.num_heads, self.num_kv_heads
        if hq % tp:
            raise ValueError(f"tensor_parallel_size={tp} does not divide {hq} attention heads; use a "
                             f"tensor_parallel_size that divides {hq}.")
        if tp <= hkv and hkv % tp:
            raise ValueError(f"tensor_parallel_size={tp} does not divide {hkv} key/value heads.")
        if tp > hkv and tp % hkv:
            raise ValueError(f"tensor_parallel_size={tp} is larger than {hkv} key/value heads and not a multiple of "
                             f"it, so KV heads cannot be replicated evenly.")
        if self.intermediate_size % tp:
            raise ValueError(f"tensor_parallel_size={tp} does not divide intermediate_size={self.intermediate_size}.")

    @property
    def local_heads(self) -> int:
        return self.num_heads // self.tp

    @property
    def local_kv_heads(self) -> int:
        return max(self.num_kv_heads // self.tp, 1)

    @property
    def q_rows(self) -> tuple[int, int]:
        """(start, length) of this rank's rows of q_proj (= columns of o_proj)."""
        return self.tp_rank * self.local_heads * self.head_dim, self.local_heads * self.head_dim

    @property
    def kv_rows(self) -> tuple[int, int]:
        if self.tp <= self.num_kv_heads:
            first = self.tp_rank * self.local_kv_heads
        else:
            first = self.tp_rank // (self.tp // self.num_kv_heads)
        return first * self.head_dim, self.local_kv_heads * self.head_dim

    @property
    def mlp_rows(self) -> tuple[int, int]:
        n = self.intermediate_size // self.tp
        return self.tp_rank * n, n

    @property
    def vocab_shard(self) -> int:
        return -(-self.vocab_size // self.tp)

    @property
    def vocab_rows(self) -> tuple[int, int]:
        """(start, length) of the real vocab rows this rank holds (the last shard may be short or empty)."""
        start = min(self.tp_rank * self.vocab_shard, self.vocab_size)
        return start, max(min(self.vocab_shard, self.vocab_size - start), 0)

    @property
    def adds_bias_once(self) -> bool:
        return self.tp_rank == 0
