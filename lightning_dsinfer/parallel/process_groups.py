"""Process groups from torch.distributed: the default group (initialised from the usual environment
variables when nobody did it yet) and one tensor-parallel group per block of ``tp`` ranks."""
from __future__ import annotations

import atexit
import datetime
import os

import torch
import torch.distributed as dist

from lightning_dsinfer.parallel.comm import TensorParallelComm
from lightning_dsinfer.parallel.shm import ShmAllReduce, same_host
from lightning_dsinfer.parallel.topology import Topology

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_default_group(device: torch.device, timeout_s: float) -> None:
    """Initialise the default process group from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT."""
    if dist.is_initialized():
        return
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"tensor parallelism needs one process per rank, but {', '.join(missing)} is not set and no process "
            f"group is initialised. Launch with `torchrun --nproc-per-node N script.py`, use "
            f"Trainer(strategy='dsinfer', devices=N), or set {', '.join(_ENV)}.")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    atexit.register(_destroy_default_group)      # we opened it, we close it (no abort at interpreter exit)


def _destroy_default_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def new_tensor_parallel_groups(topology: Topology, timeout_s: float = 300.0,
                               shared_memory: bool = True) -> TensorParallelComm:
    """Create every tensor-parallel group (all ranks, same order) and return this rank's.

    On CPU (gloo) with all ranks of the group on one host, small all-reduces go through shared memory.
    """
    mine = None
    for ranks in topology.tp_groups():
        group = dist.new_group(ranks)
        if topology.rank in ranks:
            mine = group
    comm = TensorParallelComm(mine, topology.tp, topology.tp_rank, src=topology.tp_group_ranks[0])
    if (shared_memory and topology.tp > 1 and dist.get_backend(mine) == "gloo" and os.path.isdir("/dev/shm")
            and same_host(mine)):
        comm.shm = ShmAllReduce(mine, topology.tp, topology.tp_rank, timeout_s)
    return comm


def tensor_parallel_comm(tp: int, device: torch.device, timeout_s: float) -> TensorParallelComm:
    if tp == 1:
        return TensorParallelComm()
    init_default_group(device, timeout_s)
    world = dist.get_world_size()
    topology = Topology(world_size=world, rank=dist.get_rank(), tp=tp)
    return new_tensor_parallel_groups(topology, timeout_s)
