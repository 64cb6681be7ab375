"""What a policy hands the engine: the model's numbers and, per layer, each weight by role.

Policies are the only code that knows transformers' module names and weight layouts. The engine
asks a policy for a :class:`ModelWeights`, built lazily so each weight is read (and later sliced
or streamed) once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


class UnsupportedModelError(ValueError):
    """The model (or one of its settings) has no policy; the message names it and what is supported."""


@dataclass
class LayerWeights:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    sliding_window: int | None = None


@dataclass
class ModelWeights:
    model_type: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    scaling: float
    inv_freq: torch.Tensor
    attention_scaling: float
    rope_type: str
    embed: torch.Tensor
    final_norm: torch.Tensor
    lm_head: torch.Tensor
    lm_head_bias: torch.Tensor | None
    tied_embeddings: bool
    layers: list[LayerWeights] = field(default_factory=list)
