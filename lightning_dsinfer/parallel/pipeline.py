"""Pipeline parallelism: the model's blocks cut into contiguous stages over the ranks of a pipeline group, and the
point-to-point messages between the stages (``torch.distributed`` send / recv: gloo on the CPU, NCCL on GPUs).

Stage s of P holds the blocks :func:`stage_layers` gives it (contiguous, balanced by weight bytes); stage 0 also
holds the embedding, stage P - 1 the final norm and the lm_head. A stage may itself be split over a tensor-parallel group: tp rank r of stage s exchanges the
(whole, replicated) activations with tp rank r of stages s - 1 and s + 1, so the ranks of a replica form
``tp`` pipelines side by side (:meth:`Topology.pp_groups`). Which messages go when is the schedule's business
(``generation/pipeline.py``); this module only moves them, with a clear error when a peer dies.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from lightning_dsinfer.parallel.comm import _peer_failure

MAX_PENDING_SENDS = 16     # sends in flight before the oldest is waited for (its buffer must live until then)


def stage_layers(layer_costs: list[int], stages: int, stage: int, head_cost: int = 0) -> tuple[int, int]:
    """Blocks [start, stop) of ``stage`` of ``stages``: contiguous, at least one per stage, cut so that the costliest
    stage costs least (the last stage also pays ``head_cost``: the lm_head, which for a small model weighs several
    blocks); ties go to the partition that puts more blocks in the earlier stages and keeps the rest even.

    Costs are what a stage streams per decode step: weight bytes (or parameter counts) per block."""
    n = len(layer_costs)
    if stages > n:
        raise ValueError(f"pipeline_parallel_size={stages} is larger than the model's {n} layers; every "
                         f"stage needs at least one layer. Use pipeline_parallel_size <= {n}.")
    prefix = [0]
    for c in layer_costs:
        prefix.append(prefix[-1] + c)

    def seg(a: int, b: int) -> int:
        return prefix[b] - prefix[a]

    # best[k][i]: the least max stage cost of blocks [i, n) over k stages (the last one with the head)
    best = [[float("inf")] * (n + 1) for _ in range(stages + 1)]
    for i in range(n):
        best[1][i] = seg(i, n) + head_cost
    for k in range(2, stages + 1):
        for i in range(n - k + 1):
            best[k][i] = min(max(seg(i, j), best[k - 1][j]) for j in range(i + 1, n - k + 2))
    start = 0
    for s in range(stages):
        k = stages - s
        stop = n if k == 1 else max(j for j in range(start + 1, n - k + 2)
                                    if max(seg(start, j), best[k - 1][j]) <= best[k][start])
        if s == stage:
            return start, stop
        start = stop
    raise ValueError(f"stage {stage} is outside a pipeline of {stages} stages.")


class PipelineComm:
    """This rank's place in its pipeline: ``rank`` (stage) of ``size``, the global ranks of every stage, and the
    point-to-point messages to the neighbours. A pipeline of one stage sends nothing."""

    kind = "pipeline"

    def __init__(self, group=None, size: int = 1, rank: int = 0, ranks: list[int] | None = None):
        self.group, self.size, self.rank = group, size, rank
        self.ranks = ranks if ranks is not None else [0]      # global rank of each stage (same tp rank)
        self._pending: deque = deque()                        # (work, tensor) of sends not waited for yet
        self.sent_bytes = 0
        self.shm = None             # ShmChannels when every stage is a CPU process on this host (else torch p2p)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    @_peer_failure
    def send(self, x: torch.Tensor, stage: int) -> None:
        """Send ``x`` to ``stage`` without waiting for it to arrive (torch p2p: the tensor is kept until it has;
        shared memory: copied into the channel's ring, waiting only while the ring is full)."""
        self.sent_bytes += x.numel() * x.element_size()
        if self.shm is not None:
            return self.shm.send(x, self.rank, stage)
        x = x.contiguous()
        self._pending.append((dist.isend(x, dst=self.ranks[stage]), x))
        while len(self._pending) > MAX_PENDING_SENDS:
            self._pending.popleft()[0].wait()

    @_peer_failure
    def recv(self, shape, dtype: torch.dtype, device, stage: int) -> torch.Tensor:
        """The next tensor ``stage`` sent to this rank (shape and dtype known to both sides)."""
        out = torch.empty(shape, dtype=dtype, device=device)
        if self.shm is not None:
            return self.shm.recv_into(out, stage, self.rank)
        dist.recv(out, src=self.ranks[stage])
        return out

    @_peer_failure
    def flush(self) -> None:
        """Wait until every send has arrived."""
        while self._pending:
            self._pending.popleft()[0].wait()

    @_peer_failure
    def broadcast_(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Overwrite ``x`` on every stage with ``stage``'s copy."""
        if self.size > 1:
            dist.broadcast(x, src=self.ranks[stage], group=self.group)
        return x

    def sync_rng(self) -> None:
        """Give every stage stage 0's CPU RNG state (after the tensor-parallel sync, so the whole replica agrees)."""
        if self.size > 1:
            state = torch.get_rng_state()
            self.broadcast_(state, 0)
            torch.set_rng_state(state)
