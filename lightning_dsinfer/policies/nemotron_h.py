"""NemotronH (``nemotron_h``: NVIDIA Nemotron-H, Nemotron Nano 2, Nemotron 3): one sub-layer per layer of the config,
by ``layers_block_type`` (the pattern "M-M*-E": "linear_attention" a Mamba-2 mixer, "full_attention" GQA attention
without positions (NoPE), "mlp" a plain ReLU² MLP (``up_proj`` / ``down_proj``), "moe" a sparse layer), each
``h + mixer(norm(h))``.

The engine's block is a mixer layer and the MLP layer after it (``norm`` of the first is the block's input norm, of
the second its post-attention norm); a mixer followed by another mixer is a block without an MLP. An MLP layer that
follows no mixer is refused with the reason. The Hugging Face cache has a layer per config layer:
``ModelWeights.cache_layers`` says which one each block's mixer writes.

Sparse layers: DeepSeek-V3's router (sigmoid scores, the choice on scores + ``e_score_correction_bias``, groups,
renormalised, scaled), top-k experts without a gate (``up_proj`` [E, I, H] -> ReLU² -> ``down_proj``:
``MoEWeights.gated`` False, ``reference.PlainAct``), a shared ReLU² expert with its biases; with ``moe_latent_size``
the experts read ``fc1_latent_proj(x)`` and their sum goes through ``fc2_latent_proj`` (the router and the shared
expert read x).

Module tree: ``model.model.embeddings``, ``model.model.layers[i].{norm, mixer}``, ``model.model.norm_f``,
``model.lm_head`` (checkpoints: ``backbone.*``, experts one by one). The Mamba-2 mixer is Granite 4's
(``modules/gated_deltanet.Mamba2Mixer``; dt limited below by ``time_step_min`` in prompts). RMSNorms scale in fp32 and
round once (``norm_fp32``). Refused with the reason: ``use_bias`` (the mixers' in_proj bias would reach the
convolution for padded tokens).
"""
from __future__ import annotations

import torch
from torch import nn

from lightning_dsinfer.kernels.reference import PlainAct
from lightning_dsinfer.policies.base import LayerWeights, ModelWeights, MoEWeights, UnsupportedModelError
from lightning_dsinfer.policies.deepseek import routing_of
from lightning_dsinfer.policies.granite_hybrid import mamba2_layer
from lightning_dsinfer.policies.llama import FamilyTraits, _experts
from lightning_dsinfer.policies.weights import ModuleSource, WeightSource, lookups, tied_embeddings

FAMILY = ("nemotron_h",)
_EXPERT_NAMES = FamilyTraits(moe="nemotron_h")     # checkpoint experts as experts.{e}.{up_proj, down_proj}
_MIXERS = ("linear_attention", "full_attention")
_MLPS = ("mlp", "moe")


def read_nemotron_h(model: nn.Module, max_seq_len: int, source: WeightSource | None = None) -> ModelWeights:
    """Name every weight by role (lazy refs into ``source``; default: the model's own tensors)."""
    config = model.config
    types = list(config.layers_block_type)
    if getattr(config, "use_bias", False):
        raise UnsupportedModelError("nemotron_h with use_bias=True is not supported (padded tokens' in_proj bias would "
                                    "reach the convolution); use_bias=False (the released models) is.")
    if set(types) - {*_MIXERS, *_MLPS}:
        raise UnsupportedModelError(f"nemotron_h: layer types {sorted(set(types) - {*_MIXERS, *_MLPS})}; the engine "
                                    f"runs {', '.join((*_MIXERS, *_MLPS))}.")
    act = getattr(config, "mlp_hidden_act", "relu2")
    if act != "relu2":
        raise UnsupportedModelError(f"nemotron_h with mlp_hidden_act={act!r} is not supported (relu2 is).")
    mamba_act = getattr(config, "mamba_hidden_act", "silu")
    if "linear_attention" in types and mamba_act not in ("silu", "swish"):
        raise UnsupportedModelError(f"nemotron_h with mamba_hidden_act={mamba_act!r} is not supported (the Mamba-2 "
                                    f"convolution's activation is SiLU: silu).")
    source = source or ModuleSource(model)
    files = source
    names = set(dict(model.named_parameters(remove_duplicate=False))) | set(dict(model.named_buffers()))
    ref, opt = lookups(source, names)
    base = model.model
    head_dim = config.head_dim
    blocks: list[dict] = []          # per block: the mixer layer's index, the MLP layer's (or None)
    for i, kind in enumerate(types):
        if kind in _MIXERS:
            blocks.append({"mixer": i, "mlp": None})
        elif not blocks or blocks[-1]["mlp"] is not None:
            raise UnsupportedModelError(
                f"nemotron_h: layer {i} ({kind}) follows no mixer layer (pattern {config.hybrid_override_pattern!r}); "
                f"the engine pairs each MLP layer with the mixer before it.")
        else:
            blocks[-1]["mlp"] = i
    layers = []
    for b in blocks:
        i, j = b["mixer"], b["mlp"]
        mix, block = f"model.layers.{i}.mixer", f"model.layers.{i}"
        mlp = {}
        if j is not None and types[j] == "moe":    # DeepSeek-V3's router; ReLU² experts and shared expert, no gates
            f, s = f"model.layers.{j}.mixer", f"model.layers.{j}.mixer.shared_experts"
            routing = routing_of(config)
            moe = MoEWeights(router=ref(f"{f}.gate.weight"), gate_up=_experts(files, config, _EXPERT_NAMES, f, "up_proj"),
                             down=_experts(files, config, _EXPERT_NAMES, f, "down_proj"),
                             top_k=config.num_experts_per_tok, renormalize=routing.renormalize, weights_in_dtype=False,
                             shared_up=ref(f"{s}.up_proj.weight"), shared_down=ref(f"{s}.down_proj.weight"),
                             shared_up_bias=opt(f"{s}.up_proj.bias"), shared_down_bias=opt(f"{s}.down_proj.bias"),
                             routing=routing, router_bias=ref(f"{f}.gate.e_score_correction_bias"), gated=False,
                             act=PlainAct("relu2"), latent_in=opt(f"{f}.fc1_latent_proj.weight"),
                             latent_in_bias=opt(f"{f}.fc1_latent_proj.bias"),
                             latent_out=opt(f"{f}.fc2_latent_proj.weight"),
                             latent_out_bias=opt(f"{f}.fc2_latent_proj.bias"))
            mlp = dict(moe=moe, post_norm=ref(f"model.layers.{j}.norm.weight"))
        elif j is not None:
            f = f"model.layers.{j}.mixer"
            mlp = dict(up=ref(f"{f}.up_proj.weight"), down=ref(f"{f}.down_proj.weight"), up_bias=opt(f"{f}.up_proj.bias"),
                       down_bias=opt(f"{f}.down_proj.bias"), post_norm=ref(f"model.layers.{j}.norm.weight"))
        common = {**dict(gate=None, up=None, down=None, post_norm=None), **mlp,
                  "input_norm": ref(f"{block}.norm.weight")}
        if types[i] == "linear_attention":
            layers.append(mamba2_layer(ref, opt, mix, base.layers[i].mixer, **common))
        else:
            layers.append(LayerWeights(
                q=ref(f"{mix}.q_proj.weight"), k=ref(f"{mix}.k_proj.weight"), v=ref(f"{mix}.v_proj.weight"),
                o=ref(f"{mix}.o_proj.weight"), rotary=False, **common))
    tied = tied_embeddings(model)
    return ModelWeights(
        model_type=config.model_type, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads, head_dim=head_dim, intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size, rms_norm_eps=config.layer_norm_epsilon, scaling=head_dim ** -0.5,
        inv_freq=torch.zeros(1), attention_scaling=1.0, rope_type="none", embed=ref("model.embeddings.weight"),
        final_norm=ref("model.norm_f.weight"),
        lm_head=ref("model.embeddings.weight" if tied else "lm_head.weight"), lm_head_bias=None,
        tied_embeddings=tied, layers=layers, rotary=False, norm_fp32=True, mlp_gated=False, mlp_act="relu2",
        cache_layers=[b["mixer"] for b in blocks])


def has_experts(model_type: str | None) -> bool:
    return model_type == "nemotron_h"
