"""Orchestration: policy -> fused modules -> KV cache -> patched ``forward`` / ``generate``.

``init_inference(hf_model, **options)`` is the whole public surface without Lightning (as
``deepspeed.init_inference``): it returns the same model object, whose ``forward`` and ``generate``
now run on the engine. The user's class is not touched; only the instance is patched.
"""
from __future__ import annotations

import os
import types

import torch
import torch.nn.functional as F
from torch import nn

from lightning_dsinfer.config import DEFAULT_MAX_SEQ_LEN, InferenceConfig
from lightning_dsinfer.modules.kv_cache import StaticKVCache
from lightning_dsinfer.modules.linear import Linear
from lightning_dsinfer.modules.masks import build_step
from lightning_dsinfer.modules.rotary import RotaryTable
from lightning_dsinfer.modules.transformer import Attention, DecoderLayer, DecoderModel, GatedMLP, LayerSpec
from lightning_dsinfer.parallel import TensorParallelComm, TensorShardPlan
from lightning_dsinfer.parallel.process_groups import tensor_parallel_comm
from lightning_dsinfer.policies import ModelWeights, find_policy
from lightning_dsinfer.policies.weights import ModuleSource, SafetensorsSource


def _bias_or_zeros(ref, rows, dtype, n):
    if ref is None:
        return torch.zeros(n, dtype=dtype)
    return ref.load(0, *rows).to(dtype)


def _fused_bias(parts, dtype):
    """cat of the (ref, rows) biases of a fused projection; None when none of the parts has a bias."""
    if all(ref is None for ref, _ in parts):
        return None
    return torch.cat([_bias_or_zeros(ref, rows, dtype, rows[1]) for ref, rows in parts])


def build_decoder(w: ModelWeights, dtype: torch.dtype, device: torch.device | str = "cpu",
                  comm: TensorParallelComm | None = None) -> DecoderModel:
    """Fused modules from a policy's weight refs, reading only this rank's shards.

    QKV and gate/up are fused into one GEMM each; o and down are row-parallel with the residual add
    fused in (tp rank 0 adds residual and bias; the all-reduce sums the partial products).
    """
    comm = comm or TensorParallelComm()
    plan = TensorShardPlan(comm.rank, comm.size, w.num_heads, w.num_kv_heads, w.head_dim, w.intermediate_size,
                           w.vocab_size)
    first = plan.adds_bias_once
    reduce = comm.all_reduce if comm.size > 1 else None

    def dev(t):
        return t.to(device=device, dtype=dtype).contiguous()

    def linear(weight, bias=None, **kw):
        return Linear(dev(weight), None if bias is None else dev(bias), **kw)

    layers = []
    q_rows, kv_rows, mlp_rows = plan.q_rows, plan.kv_rows, plan.mlp_rows
    for i, lw in enumerate(w.layers):
        spec = LayerSpec(hidden_size=w.hidden_size, num_heads=plan.local_heads, num_kv_heads=plan.local_kv_heads,
                         head_dim=w.head_dim, intermediate_size=mlp_rows[1], rms_norm_eps=w.rms_norm_eps,
                         scaling=w.scaling, sliding_window=lw.sliding_window)
        qkv = linear(torch.cat([lw.q.load(0, *q_rows).to(dtype), lw.k.load(0, *kv_rows).to(dtype),
                                lw.v.load(0, *kv_rows).to(dtype)]),
                     _fused_bias([(lw.q_bias, q_rows), (lw.k_bias, kv_rows), (lw.v_bias, kv_rows)], dtype))
        o = linear(lw.o.load(1, *q_rows), lw.o_bias.load() if (lw.o_bias is not None and first) else None,
                   reduce=reduce, owns_residual=first)
        gate_up = linear(torch.cat([lw.gate.load(0, *mlp_rows).to(dtype), lw.up.load(0, *mlp_rows).to(dtype)]),
                         _fused_bias([(lw.gate_bias, mlp_rows), (lw.up_bias, mlp_rows)], dtype))
        down = linear(lw.down.load(1, *mlp_rows), lw.down_bias.load() if (lw.down_bias is not None and first) else None,
                      reduce=reduce, owns_residual=first)
        q_norm = None if lw.q_norm is None else dev(lw.q_norm.load())
        k_norm = None if lw.k_norm is None else dev(lw.k_norm.load())
        attn = Attention(spec, i, qkv, o, q_norm=q_norm, k_norm=k_norm)
        layers.append(DecoderLayer(attn, GatedMLP(gate_up, down), dev(lw.input_norm.load()), dev(lw.post_norm.load()),
                                   w.rms_norm_eps))
    start, rows = plan.vocab_rows if comm.size > 1 else (0, w.vocab_size)
    embed = dev(w.embed.load(0, start, rows))
    head = w.lm_head.load(0, start, rows).to(dtype)
    head_bias = None if w.lm_head_bias is None else w.lm_head_bias.load(0, start, rows).to(dtype)
    if comm.size > 1 and rows < plan.vocab_shard:           # equal shards for the all-gather: pad with zero rows
        pad = plan.vocab_shard - rows
        head = torch.cat([head, head.new_zeros(pad, head.shape[1])])
        head_bias = None if head_bias is None else torch.cat([head_bias, head_bias.new_zeros(pad)])
    lm_head = linear(head, head_bias)
    return DecoderModel(embed, layers, dev(w.final_norm.load()), w.rms_norm_eps, lm_head, vocab_size=w.vocab_size,
                        vocab_start=start, comm=comm)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _engine_device(model: nn.Module, config: InferenceConfig) -> torch.device:
    if config.device is not None:
        return torch.device(config.device)
    device = _model_device(model)
    if device.type == "cpu" and all(p.device.type == "meta" for p in model.parameters()) and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


class InferenceEngine:
    """Holds the fused decoder, rotary table and KV cache for one Hugging Face causal LM."""

    def __init__(self, hf_model: nn.Module, config: InferenceConfig, comm: TensorParallelComm | None = None):
        policy = find_policy(hf_model)
        hf_config = hf_model.config
        self.config = config
        self.hf_config = hf_config
        self.device = _engine_device(hf_model, config)
        self.dtype = config.dtype or _model_dtype(hf_model)
        context = getattr(hf_config, "max_position_embeddings", None) or DEFAULT_MAX_SEQ_LEN
        self.max_seq_len = config.max_seq_len or min(context, DEFAULT_MAX_SEQ_LEN)
        self.comm = comm if comm is not None else tensor_parallel_comm(config.tensor_parallel_size, self.device,
                                                                      config.collective_timeout_s)
        source = ModuleSource(hf_model)
        if config.checkpoint is not None:
            source = SafetensorsSource(config.checkpoint, fallback=source)
        weights = policy(hf_model, self.max_seq_len, source)
        with torch.no_grad():
            self.decoder = build_decoder(weights, self.dtype, self.device, self.comm)
        self.decoder.eval()
        self.windows = sorted({lw.sliding_window for lw in weights.layers if lw.sliding_window is not None})
        if len(self.windows) > 1:
            raise ValueError(f"layers use different sliding windows {self.windows}; one window per model is supported.")
        self.sliding_window = self.windows[0] if self.windows else None
        self.rotary = RotaryTable(weights.inv_freq, weights.attention_scaling, self.max_seq_len, self.dtype, self.device)
        local_kv_heads = self.decoder.layers[0].attn.hkv
        self.cache = StaticKVCache(len(weights.layers), local_kv_heads, weights.head_dim, config.max_batch_size,
                                   self.max_seq_len, self.dtype, self.device)
        self.vocab_size = weights.vocab_size
        if config.release_hf_weights:
            _release_hf_weights(hf_model, self.decoder.embed if self.comm.size == 1 else None)

    def check_length(self, total: int, prompt: int | None = None, new: int | None = None) -> None:
        if total <= self.max_seq_len:
            return
        detail = f"prompt {prompt} + max_new_tokens {new} = {total}" if prompt is not None else f"sequence length {total}"
        raise ValueError(
            f"dsinfer: {detail} exceeds max_seq_len={self.max_seq_len}, the size of the pre-allocated KV cache and "
            f"rotary table. Pass max_seq_len={total} (or more) to init_inference / DSInferStrategy.")

    # ------------------------------------------------------------------ HF-compatible forward
    @torch.inference_mode()
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, hf_cache=None,
                logits_to_keep=0):
        """Logits [B, T', V] for ``input_ids`` [B, T]; K/V go to ``hf_cache`` if given."""
        h = self.decoder.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.to(self.dtype)
        b, t = h.shape[:2]
        past = hf_cache.get_seq_length() if hf_cache is not None else 0
        total = past + t
        self.check_length(total)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"dsinfer: attention_mask must be 2D [batch, length] (got {attention_mask.dim()}D).")
        key_valid = None
        if attention_mask is not None:
            if attention_mask.shape[-1] != total:
                raise ValueError(f"dsinfer: attention_mask covers {attention_mask.shape[-1]} tokens but past + "
                                 f"input is {total}.")
            key_valid = attention_mask.to(device=h.device, dtype=torch.bool)
            if bool(key_valid.all()):
                key_valid = None
        if position_ids is None:
            position_ids = torch.arange(past, total, device=h.device).expand(b, t)
        step = build_step(self.rotary, position_ids, key_valid, q_start=past, t=t, window=self.sliding_window)
        step.hf_cache = hf_cache
        h = self.decoder.hidden(h, step)
        if isinstance(logits_to_keep, int):
            if logits_to_keep > 0:
                h = h[:, -logits_to_keep:]
        else:
            h = h[:, logits_to_keep]
        return self.decoder.logits(h)


def _release_hf_weights(model: nn.Module, embed: torch.Tensor | None) -> None:
    """Point the HF embedding at the engine's copy (when it is whole) and turn every other weight the
    engine copied into meta."""
    base = model.model
    emb = base.embed_tokens
    keep_tied = model.lm_head.weight is emb.weight
    if embed is not None:
        emb.weight = nn.Parameter(embed, requires_grad=False)
        if keep_tied:
            model.lm_head.weight = emb.weight
    modules = [*base.layers, base.norm] + ([] if keep_tied and embed is not None else [model.lm_head])
    if embed is None:
        modules.append(emb)
    for module in modules:
        for sub in module.modules():
            for name, p in list(sub.named_parameters(recurse=False)):
                setattr(sub, name, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))


# ---------------------------------------------------------------------- patching
def _output_cache_field() -> str:
    from transformers.modeling_outputs import CausalLMOutputWithPast
    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _dsinfer_forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                     inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, cache_position=None,
                     return_dict=None, **kwargs):
    """Replacement ``forward`` of a model optimised by dsinfer (same signature and output as HF's)."""
    from transformers.cache_utils import DynamicCache
    from transformers.modeling_outputs import CausalLMOutputWithPast

    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.get(flag):
            raise NotImplementedError(f"dsinfer: {flag}=True is not supported by the fused engine; run the "
                                      f"unoptimised model for attention maps / hidden states.")
    engine: InferenceEngine = self._dsinfer_engine
    hf_cache = cache if cache is not None else past_key_values
    use_cache = self.config.use_cache if use_cache is None else use_cache
    if hf_cache is None and use_cache:
        hf_cache = DynamicCache()
    logits = engine.forward(input_ids, attention_mask, position_ids, inputs_embeds, hf_cache, logits_to_keep)
    loss = None
    if labels is not None:
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                               ignore_index=-100)
    out = {"loss": loss, "logits": logits, _output_cache_field(): hf_cache if use_cache else None}
    return CausalLMOutputWithPast(**out)


def init_inference(model: nn.Module, config: InferenceConfig | None = None, comm: TensorParallelComm | None = None,
                   **options) -> nn.Module:
    """Optimise a Hugging Face causal LM in place and return it.

    ``model(...)`` and ``model.generate(...)`` then run on the fused engine. Options are the fields of
    :class:`InferenceConfig` (dtype, max_seq_len, max_batch_size, ...).
    """
    from lightning_dsinfer.generation import dsinfer_generate

    if config is None:
        config = InferenceConfig.from_kwargs(**options)
    elif options:
        raise TypeError("pass either config= or keyword options, not both")
    if getattr(model, "_dsinfer_engine", None) is not None:
        return model
    engine = InferenceEngine(model, config, comm=comm)
    model.eval()
    model.__dict__["_dsinfer_engine"] = engine
    model.forward = types.MethodType(_dsinfer_forward, model)
    model.generate = types.MethodType(dsinfer_generate, model)
    return model


def is_optimised(model: nn.Module) -> bool:
    return getattr(model, "_dsinfer_engine", None) is not None
