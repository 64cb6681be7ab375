"""Process topology, collectives and sharding rules (torch + torch.distributed only)."""
from lightning_dsinfer.parallel.comm import TensorParallelComm
from lightning_dsinfer.parallel.tensor import TensorShardPlan
from lightning_dsinfer.parallel.topology import Topology

__all__ = ["TensorParallelComm", "TensorShardPlan", "Topology"]
