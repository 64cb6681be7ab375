"""Pipeline parallelism: the model's blocks cut into contiguous stages over the ranks of a pipeline group, and the
point-to-point messages between the stages (``torch.distributed`` send / recv: gloo on the CPU, NCCL on GPUs).

Stage s of P holds blocks :func:`stage_layers` (s, P); stage 0 also holds the embedding, stage P - 1 the final norm
and the lm_head. A stage may itself be split over a tensor-parallel group: tp rank r of stage s exchanges the
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


def stage_layers(num_layers: int, stages: int, stage: int) -> tuple[int, int]:
    """Blocks [start, stop) of ``stage`` of ``stages``: contiguous, sizes differing by at most one, the larger
    stages first (the last stage also runs the lm_head)."""
    if stages > num_layers:
        raise ValueError(f"pipeline_parallel_size={stages} is larger than the model's {num_layers} layers; every "
                         f"stage needs at least one layer. Use pipeline_parallel_size <= {num_layers}.")
    base, extra = divmod(num_layers, stages)
    start = stage * base + min(stage, extra)
    return start, start + base + (stage < extra)


class PipelineComm:
    """This rank's place in its pipeline: ``rank`` (stage) of ``size``, the global ranks of every stage, and the
    point-to-point messages to the neighbours. A pipeline of one stage sends nothing."""

    kind = "pipeline"

    def __init__(self, group=None, size: int = 1, rank: int = 0, ranks: list[int] | None = None):
        self.group, self.size, self.rank = group, size, rank
        self.ranks = ranks if ranks is not None else [0]      # global rank of each stage (same tp rank)
        self._pending: deque = deque()                        # (work, tensor) of sends not waited for yet
        self.sent_bytes = 0

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    @_peer_failure
    def send(self, x: torch.Tensor, stage: int) -> None:
        """Send ``x`` to ``stage`` without waiting for it to arrive (the tensor is kept until it has)."""
        x = x.contiguous()
        self._pending.append((dist.isend(x, dst=self.ranks[stage]), x))
        self.sent_bytes += x.numel() * x.element_size()
        while len(self._pending) > MAX_PENDING_SENDS:
            self._pending.popleft()[0].wait()

    @_peer_failure
    def recv(self, shape, dtype: torch.dtype, device, stage: int) -> torch.Tensor:
        """The next tensor ``stage`` sent to this rank (shape and dtype known to both sides)."""
        out = torch.empty(shape, dtype=dtype, device=device)
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
