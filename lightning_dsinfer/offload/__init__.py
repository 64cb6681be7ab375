"""ZeRO-Inference: weights in host memory (``offload="cpu"``) or on disk (``offload="nvme"``), streamed
layer by layer through a prefetch ring while the current layer computes."""
from lightning_dsinfer.offload.budget import WorkingSet, available_memory, parse_bytes, plan_working_set
from lightning_dsinfer.offload.decoder import FileRows, ResidentRows, StreamedDecoderModel
from lightning_dsinfer.offload.layout import UnitLayout, aligned_empty
from lightning_dsinfer.offload.store import DiskStore, HostStore
from lightning_dsinfer.offload.streamer import UnitStreamer

__all__ = ["DiskStore", "FileRows", "HostStore", "ResidentRows", "StreamedDecoderModel", "UnitLayout",
           "UnitStreamer", "WorkingSet", "aligned_empty", "available_memory", "parse_bytes", "plan_working_set"]
