"""Policies: which fused engine a Hugging Face model gets, chosen by ``config.model_type``."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lightning_dsinfer.policies import (deepseek, falcon_h1, gemma4, gpt, gpt_oss, granite_hybrid, jamba, lfm2,
                                        llama, llama4, mamba, nemotron_h, olmo_hybrid, qwen3_next)
from lightning_dsinfer.policies.base import LayerWeights, ModelWeights, UnsupportedModelError
from lightning_dsinfer.policies.gpt import FAMILY as _GPT_FAMILY
from lightning_dsinfer.policies.gpt import read_gpt_family
from lightning_dsinfer.policies.llama import FAMILY as _LLAMA_FAMILY
from lightning_dsinfer.policies.llama import read_llama_family

POLICIES: dict[str, Callable[[nn.Module, int], ModelWeights]] = {name: read_llama_family for name in _LLAMA_FAMILY}
POLICIES.update({name: read_gpt_family for name in _GPT_FAMILY})
POLICIES.update({name: deepseek.read_deepseek for name in deepseek.FAMILY})
POLICIES.update({name: gpt_oss.read_gpt_oss for name in gpt_oss.FAMILY})
POLICIES.update({name: qwen3_next.read_qwen3_next for name in qwen3_next.FAMILY})
POLICIES.update({name: lfm2.read_lfm2 for name in lfm2.FAMILY})
POLICIES.update({name: granite_hybrid.read_granite_hybrid for name in granite_hybrid.FAMILY})
POLICIES.update({name: nemotron_h.read_nemotron_h for name in nemotron_h.FAMILY})
POLICIES.update({name: llama4.read_llama4 for name in llama4.FAMILY})
POLICIES.update({name: falcon_h1.read_falcon_h1 for name in falcon_h1.FAMILY})
POLICIES.update({name: mamba.read_mamba for name in mamba.FAMILY})
POLICIES.update({name: jamba.read_jamba for name in jamba.FAMILY})
POLICIES.update({name: gemma4.read_gemma4 for name in gemma4.FAMILY})
POLICIES.update({name: olmo_hybrid.read_olmo_hybrid for name in olmo_hybrid.FAMILY})


def has_experts(model_type: str | None) -> bool:
    """Whether ``model_type`` is a supported family with mixture-of-experts layers."""
    return any(family.has_experts(model_type) for family in (llama, gpt, deepseek, gpt_oss, qwen3_next, lfm2,
                                                                  granite_hybrid, nemotron_h, llama4, jamba, gemma4))


def supported_model_types() -> list[str]:
    return sorted(POLICIES)


def text_model_of(model: nn.Module) -> nn.Module:
    """``model``, or for a vision-language model without a policy of its own (Gemma 3, LLaVA, Llama 4, ...) its language
    model as a text causal LM (``multimodal.language_model``), when that has a policy."""
    from lightning_dsinfer.multimodal import language_model

    if getattr(getattr(model, "config", None), "model_type", None) in POLICIES:
        return model
    view = language_model(model)
    return view if view is not None and view.config.model_type in POLICIES else model


def find_policy(model: nn.Module) -> Callable[[nn.Module, int], ModelWeights]:
    model = text_model_of(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in POLICIES:
        raise UnsupportedModelError(
            f"dsinfer has no policy for model_type={model_type!r} ({type(model).__name__}). "
            f"Supported: {', '.join(supported_model_types())}. With tensor_parallel_size > 1, other transformers "
            f"causal LMs run unfused through the generic tensor-parallel path (their own nn.Linear layers split).")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={model_type!r}) is not a causal-LM head model; dsinfer optimises "
            f"*ForCausalLM models (e.g. AutoModelForCausalLM).")
    return POLICIES[model_type]


__all__ = ["LayerWeights", "ModelWeights", "UnsupportedModelError", "find_policy", "has_experts", "text_model_of",
           "supported_model_types", "POLICIES"]
