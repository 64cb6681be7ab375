"""Collectives of one tensor-parallel group, as named methods (no-ops for a group of one)."""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist


class PeerFailureError(RuntimeError):
    """A collective failed: a peer rank died, or did not answer within the collective timeout."""


def _peer_failure(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except PeerFailureError:          # said already (shared-memory exchanges name the rank that exited)
            raise
        except RuntimeError as err:   # gloo / NCCL: connection closed, timeout, aborted communicator
            raise PeerFailureError(
                f"dsinfer: a peer rank of {self.kind} group {self.ranks} failed or did not answer in time "
                f"during {fn.__name__} (collective_timeout_s sets the bound); this rank stops too. Cause: {err}"
            ) from err
    return wrapper


class TensorParallelComm:
    kind = "tensor-parallel"

    def __init__(self, group=None, size: int = 1, rank: int = 0, src: int = 0):
        self.group, self.size, self.rank = group, size, rank
        self.ranks = list(range(src, src + size))
        self.shm = None                   # ShmAllReduce when every rank of the group is a CPU process on one host
        self.src = src                    # global rank of this group's tp rank 0
        self.all_reduce_calls = 0
        self.all_reduce_bytes = 0

    @_peer_failure
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group, in place."""
        if self.size > 1:
            self.count_all_reduces(1, x.numel() * x.element_size())
            if self.shm is not None and self.shm.fits(x):
                self.shm(x)
            else:
                dist.all_reduce(x, group=self.group)
        return x

    @_peer_failure
    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise max of ``x`` over the group, in place (set-up time: int8 scales of row-parallel shards)."""
        if self.size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def count_all_reduces(self, calls: int, nbytes: int) -> None:
        """Add to the all-reduce counters (benchmarks read them); the C decode step's all-reduces report here too."""
        self.all_reduce_calls += calls
        self.all_reduce_bytes += nbytes

    @_peer_failure
    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's ``x`` along the last dim (rank order)."""
        if self.size == 1:
            return x
        if self.shm is not None and self.shm.fits(x):
            return self.shm.all_gather_last(x.contiguous())
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    @_peer_failure
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
