"""Inference configuration: one dataclass shared by ``init_inference`` and ``DSInferStrategy``."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}

DEFAULT_MAX_SEQ_LEN = 2048
DEFAULT_MAX_BATCH_SIZE = 8


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)} (or a torch.dtype).")
    return _DTYPES[dtype]


@dataclass
class InferenceConfig:
    """What the engine builds.

    dtype: weights and activations (None = the model's own dtype).
    max_seq_len: prompt + generated tokens one sequence may hold (None = min(model context, 2048)).
    max_batch_size: rows of the pre-allocated KV cache (grown with a warning if a batch is larger).
    release_hf_weights: replace the Hugging Face module weights the engine copied with meta tensors, so the
      model is not held twice in memory.
    tensor_parallel_size: ranks each layer is split over (Megatron layout); the world must be a multiple.
    pipeline_parallel_size: stages the blocks are cut into, one after the other (stage 0 also embeds, the last one
      also computes the logits); world = data x pipeline x tensor. ``generate`` runs the paper's hybrid schedule:
      the prompt in many micro-batches (row groups x prompt chunks), the tokens in min(batch, stages) micro-batches
      that keep every stage busy (``generation/pipeline.py``).
    checkpoint: folder of safetensors to read weights from (needed for a model built on ``meta``); each
      rank reads only its shards.
    collective_timeout_s: how long a collective may wait for a peer before this rank fails (a dead peer
      then ends the run instead of hanging it).
    device: where the engine lives (None: the model's device; cuda:LOCAL_RANK for a meta model on a GPU
      machine; else cpu).
    offload: None (weights resident), "cpu" (weights in host memory, streamed to the GPU layer by layer) or
      "nvme" (weights in per-layer files under ``offload_path``, streamed with O_DIRECT reads and prefetch).
      "auto": resident when the weights (this rank's shard) and the KV cache fit in 90% of the device's free
      memory, else "cpu" on a GPU when the weights fit in 80% of the available host RAM, else "nvme" (needs
      ``offload_path``); tensor-parallel ranks follow rank 0's choice. A model on meta that does not fit
      without offload is refused before loading, with the numbers and these options.
    offload_path: folder for the "nvme" tier (on a fast local disk; created if missing).
    offload_compress: "nvme" tier: store bf16 / fp32 weights packed losslessly (12 bits per bf16 weight
      instead of 16; bit-identical after the decode, which the reader threads do): ~25% fewer bytes read
      per token. False writes the units raw.
    max_memory: working-set budget of an offloaded engine on the compute device (bytes or "512MiB"): prefetch
      ring + KV cache + activations. None = half of what is free.
    max_batch_size: None = 8, or with offload the largest batch that fits in ``max_memory``.
    cuda_graphs: on CUDA, capture one decode step per batch-size bucket and replay it (TP=1, no offload).
    expert_parallel_size: MoE models with tensor parallelism: 1 splits every expert's intermediate over the
      ``tensor_parallel_size`` ranks (expert slicing); ``tensor_parallel_size`` places E / N whole experts on each
      rank instead (expert parallelism: every rank has every token already, so each runs its own experts on the
      tokens routed to them and the layer's all-reduce sums the ranks; no all-to-all). The experts must divide.
    quantize: None, or "int8": the blocks' linear weights stored int8 with one scale per output row (weight-only,
      symmetric; activations, norms, attention and the lm_head stay in ``dtype``): half the bytes a decode step
      reads. Outputs change by the quantisation error (not lossless). With offload the tiers hold the int8
      weights (half the bytes streamed). With tensor parallelism each rank holds its shard of the same int8
      weights as one process (offloaded too).
      "int4": the same four linears int4, group-wise (symmetric, one fp32 scale per output row and group of
      ``quantize_group_size`` inputs, ``reference.quantize_int4_groupwise``): a quarter of bf16's bytes plus the scales.
      Every weight's K (per rank: the row-parallel o and down shards' under tensor parallelism) must be a multiple of
      the group size (refused up front otherwise, naming the weight and a group size that fits); the groups of a
      row-parallel shard are the whole rows' groups, so the ranks hold the int4 weights of one process. Not for
      mixture-of-experts models yet.
    quantize_group_size: inputs per scale of ``quantize="int4"``: 8, 16, 32, 64 or a multiple of 128 (the CPU
      kernel's chunks; the Triton GEMM takes powers of two >= 32, others dequantise on CUDA).
    """
    dtype: torch.dtype | None = None
    max_seq_len: int | None = None
    max_batch_size: int | None = None
    release_hf_weights: bool = True
    tensor_parallel_size: int = 1
    checkpoint: str | None = None
    collective_timeout_s: float = 300.0
    device: str | None = None
    offload: str | None = None
    offload_path: str | None = None
    offload_compress: bool = True
    max_memory: int | str | None = None
    cuda_graphs: bool = True
    quantize: str | None = None
    quantize_group_size: int = 128
    expert_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    def __post_init__(self):
        self.dtype = resolve_dtype(self.dtype)
        if self.offload not in (None, "cpu", "nvme", "auto"):
            raise ValueError(f"offload={self.offload!r} is not one of None, 'cpu', 'nvme', 'auto'.")
        if self.quantize not in (None, "int8", "int4"):
            raise ValueError(f"quantize={self.quantize!r} is not one of None, 'int8', 'int4'.")
        g = self.quantize_group_size
        if not isinstance(g, int) or not (g in (8, 16, 32, 64) or (g > 0 and g % 128 == 0)):
            raise ValueError(f"quantize_group_size={g!r} must be 8, 16, 32, 64 or a multiple of 128 (128 is the usual "
                             f"choice; smaller groups for weights whose K it does not divide).")
        if self.offload == "nvme" and not self.offload_path:
            raise ValueError("offload='nvme' needs offload_path=<folder on a fast local disk> for the weight files "
                             "(or the DSINFER_OFFLOAD_PATH environment variable with strategy='dsinfer_offload_nvme').")
        if self.max_memory is not None:
            from lightning_dsinfer.offload.budget import parse_bytes
            self.max_memory = parse_bytes(self.max_memory)
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ValueError(f"max_seq_len={self.max_seq_len} must be >= 1.")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} must be >= 1.")
        if self.pipeline_parallel_size < 1:
            raise ValueError(f"pipeline_parallel_size={self.pipeline_parallel_size} must be >= 1.")
        if self.expert_parallel_size not in (1, self.tensor_parallel_size):
            raise ValueError(f"expert_parallel_size={self.expert_parallel_size} must be 1 (expert slicing) or "
                             f"tensor_parallel_size={self.tensor_parallel_size} (each rank holds 1/N of the experts).")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"max_batch_size={self.max_batch_size} must be >= 1.")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "InferenceConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"init_inference got unknown option(s) {unknown}; known options: {sorted(known)}.")
        return cls(**kwargs)
