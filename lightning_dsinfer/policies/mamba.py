"""Attention-free Mamba models: Mamba (``mamba``: state-spaces' Mamba-1), FalconMamba (``falcon_mamba``: the same
blocks with weightless RMSNorms of dt, B and C) and Mamba-2 (``mamba2``: state-spaces' Mamba-2, Codestral Mamba). Every
block is h = h + mixer(norm(h)) with a Mamba-1 mixer (``modules/gated_deltanet.Mamba1Mixer``) or a Mamba-2 one
(``Mamba2Mixer``, Granite 4's, with its gated group norm) and no MLP (``DecoderLayer`` with ``post_norm`` / ``mlp``
None; offloaded, an empty MLP half).

Module tree: ``model.backbone.{embeddings, layers[i].{norm, mixer.{in_proj, conv1d, x_proj, dt_proj, A_log, D,
out_proj}}, norm_f}``, ``model.lm_head`` (tied to the embeddings by default). Refused with the reason: ``use_bias``
(transformers zeroes padded tokens before in_proj, whose bias would then reach the convolution), an activation other
than SiLU. Partial: transformers keeps the residual stream in fp32 (``residual_in_fp32``); the engine keeps it in the
model's dtype (the same in fp32; bf16 within its tolerance).
"""
from __future__ import annotations

import torch
from torch import nn

from lightning_dsinfer.policies.base import LayerWeights, Mamba1Weights, ModelWeights, UnsupportedModelError
from lightning_dsinfer.policies.weights import ModuleSource, WeightSource, lookups, tied_embeddings

FAMILY = ("mamba", "falcon_mamba", "mamba2")


def has_experts(model_type: str | None) -> bool:
    return False


def mamba1_weights(ref, opt, prefix: str, mixer: nn.Module, norms: str | None = None,
                   eps: float = 1e-6) -> Mamba1Weights:
    """A transformers Mamba-1 mixer's weights under ``prefix`` (Mamba's, FalconMamba's, Jamba's), its numbers read off
    the HF ``mixer`` module; ``norms`` "weights": its ``{dt,b,c}_layernorm`` weights (Jamba)."""
    conv = ref(f"{prefix}.conv1d.weight")
    weights = {f"{n}_norm": ref(f"{prefix}.{n}_layernorm.weight") for n in ("dt", "b", "c")} if norms == "weights" \
        else {}
    return Mamba1Weights(
        in_proj=ref(f"{prefix}.in_proj.weight"), conv=conv, conv_bias=opt(f"{prefix}.conv1d.bias"),
        x_proj=ref(f"{prefix}.x_proj.weight"), dt_proj=ref(f"{prefix}.dt_proj.weight"),
        dt_bias=ref(f"{prefix}.dt_proj.bias"), a_log=ref(f"{prefix}.A_log"), d=ref(f"{prefix}.D"),
        inner=mixer.intermediate_size, state_size=mixer.ssm_state_size, rank=mixer.time_step_rank,
        kernel=conv.shape[-1], norms=norms, norm_eps=eps, **weights)


def check_mamba1(config) -> None:
    """Refuse what the Mamba-1 mixer does not reproduce, naming it."""
    if getattr(config, "use_bias", False) or getattr(config, "mamba_proj_bias", False):
        raise UnsupportedModelError(f"{config.model_type} with in_proj / out_proj biases is not supported (padded "
                                    f"tokens' in_proj bias would reach the convolution); the released models have "
                                    f"none.")
    act = getattr(config, "hidden_act", "silu")       # (Jamba: its mixers' and its MLPs' and experts' too)
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"{config.model_type} with hidden_act={act!r} is not supported (the mixer's "
                                    f"convolution and gate use SiLU: silu).")


def read_mamba(model: nn.Module, max_seq_len: int, source: WeightSource | None = None) -> ModelWeights:
    """Name every weight by role (lazy refs into ``source``; default: the model's own tensors)."""
    config = model.config
    check_mamba1(config)
    source = source or ModuleSource(model)
    entries = getattr(source, "entries", None)       # (older checkpoints: backbone.embedding, renamed by HF's hook)
    if entries is not None and "backbone.embeddings.weight" not in entries and "backbone.embedding.weight" in entries:
        entries["backbone.embeddings.weight"] = entries["backbone.embedding.weight"]
    names = set(dict(model.named_parameters(remove_duplicate=False)))
    ref, opt = lookups(source, names)
    falcon = config.model_type == "falcon_mamba"
    layers = []
    for i, block in enumerate(model.backbone.layers):
        prefix = f"backbone.layers.{i}"
        common = dict(gate=None, up=None, down=None, input_norm=ref(f"{prefix}.norm.weight"), post_norm=None)
        if config.model_type == "mamba2":
            from lightning_dsinfer.policies.granite_hybrid import mamba2_layer

            layers.append(mamba2_layer(ref, opt, f"{prefix}.mixer", block.mixer, **common))
            continue
        mixer = mamba1_weights(ref, opt, f"{prefix}.mixer", block.mixer, "weightless" if falcon else None,
                               getattr(config, "mixer_rms_eps", 1e-6))
        layers.append(LayerWeights(q=None, k=None, v=None, o=ref(f"{prefix}.mixer.out_proj.weight"), mamba1=mixer,
                                   **common))
    tied = tied_embeddings(model)
    inner = config.num_heads if config.model_type == "mamba2" else config.intermediate_size   # (Mamba-2: its heads)
    return ModelWeights(
        # (no attention: the channels stand in for the heads, so the shard plan's checks are the channels')
        model_type=config.model_type, hidden_size=config.hidden_size, num_heads=inner, num_kv_heads=inner, head_dim=1,
        intermediate_size=inner, vocab_size=config.vocab_size, rms_norm_eps=config.layer_norm_epsilon,
        scaling=1.0, inv_freq=torch.zeros(1), attention_scaling=1.0, rope_type="none",
        embed=ref("backbone.embeddings.weight"), final_norm=ref("backbone.norm_f.weight"),
        lm_head=ref("backbone.embeddings.weight" if tied else "lm_head.weight"), lm_head_bias=None,
        tied_embeddings=tied, layers=layers, rotary=False)
