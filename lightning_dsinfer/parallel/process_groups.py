"""Process groups from torch.distributed: the default group (initialised from the usual environment
variables when nobody did it yet), one tensor-parallel group per block of ``tp`` ranks and one pipeline group per
(replica, tp rank)."""
from __future__ import annotations

import atexit
import datetime
import os

import torch
import torch.distributed as dist

from lightning_dsinfer.parallel.comm import TensorParallelComm
from lightning_dsinfer.parallel.pipeline import PipelineComm
from lightning_dsinfer.parallel.shm import (X86, SharedMemoryUnavailable, ShmAllReduce, ShmChannels, same_host,
                                            warn_unavailable)
from lightning_dsinfer.parallel.topology import Topology

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_default_group(device: torch.device, timeout_s: float) -> None:
    """Initialise the default process group from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT."""
    if dist.is_initialized():
        return
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"tensor / pipeline parallelism needs one process per rank, but {', '.join(missing)} is not set and no process "
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
        from lightning_dsinfer.kernels import cpu_gemv

        # (the torch exchange relies on x86's store order; the C one uses atomics)
        if X86 or cpu_gemv.shm_exchange() is not None:
            try:
                comm.shm = ShmAllReduce(mine, topology.tp, topology.tp_rank, timeout_s)
            except SharedMemoryUnavailable as err:
                warn_unavailable(err, "tensor-parallel all-reduces")
    return comm


def new_pipeline_groups(topology: Topology, timeout_s: float = 300.0, shared_memory: bool = True) -> PipelineComm:
    """Create every pipeline group (all ranks, same order) and return this rank's.

    On CPU (gloo) with every stage on one host, the messages between stages go through shared memory."""
    if topology.pp == 1:
        return PipelineComm()
    mine = None
    for ranks in topology.pp_groups():
        group = dist.new_group(ranks)
        if topology.rank in ranks:
            mine = group
    pipe = PipelineComm(mine, topology.pp, topology.pp_rank, topology.pp_group_ranks)
    shared_memory = shared_memory and os.environ.get("DSINFER_PIPELINE_SHM", "1") != "0" and X86
    if shared_memory and dist.get_backend(mine) == "gloo" and os.path.isdir("/dev/shm") and same_host(mine):
        edges = [(s, s + 1) for s in range(topology.pp - 1)] + [(topology.pp - 1, 0)]     # activations; tokens
        try:
            pipe.shm = ShmChannels(mine, topology.pp_rank, topology.pp_group_ranks, edges, timeout_s)
        except SharedMemoryUnavailable as err:
            warn_unavailable(err, "messages between pipeline stages")
    return pipe


def model_parallel_comms(tp: int, pp: int, device: torch.device, timeout_s: float
                         ) -> tuple[TensorParallelComm, PipelineComm]:
    """This rank's tensor-parallel and pipeline groups (world = data x pipeline x tensor, :class:`Topology`)."""
    if tp == 1 and pp == 1:
        return TensorParallelComm(), PipelineComm()
    init_default_group(device, timeout_s)
    topology = Topology(world_size=dist.get_world_size(), rank=dist.get_rank(), tp=tp, pp=pp)
    comm = new_tensor_parallel_groups(topology, timeout_s) if tp > 1 else TensorParallelComm()
    return comm, new_pipeline_groups(topology, timeout_s)


def tensor_parallel_comm(tp: int, device: torch.device, timeout_s: float) -> TensorParallelComm:
    return model_parallel_comms(tp, 1, device, timeout_s)[0]
