"""Orchestration: policy -> fused modules -> KV cache -> patched ``forward`` / ``generate``.

``init_inference(hf_model, **options)`` is the whole public surface without Lightning (as
``deepspeed.init_inference``): it returns the same model object, whose ``forward`` and ``generate``
now run on the engine. The user's class is not touched; only the instance is patched.
"""
from __future__ import annotations

import inspect
import math
import os
import types

import torch
import torch.nn.functional as F
from torch import nn

from lightning_dsinfer.builder import (build_decoder, build_streamed_decoder, cache_row_bytes, check_int4_groups,
                                      experts_per_rank, kv_layout, shard_plan)
from lightning_dsinfer.config import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_SEQ_LEN, InferenceConfig
from lightning_dsinfer.modules.gated_deltanet import state_shapes
from lightning_dsinfer.modules.kv_cache import StaticKVCache, hf_cache_name
from lightning_dsinfer.modules.masks import build_step
from lightning_dsinfer.multimodal import (merged_inputs, modality_inputs, place_other_weights, plain_positions,
                                          wrapper_logits)
from lightning_dsinfer.modules.rotary import RotaryTable
from lightning_dsinfer.offload import available_memory
from lightning_dsinfer.offload.budget import host_available_memory
from lightning_dsinfer.parallel import TensorParallelComm
from lightning_dsinfer.parallel.pipeline import PipelineComm, stage_layers
from lightning_dsinfer.parallel.process_groups import model_parallel_comms, tensor_parallel_comm
from lightning_dsinfer.policies import UnsupportedModelError, find_policy, has_experts, text_model_of
from lightning_dsinfer.policies.weights import ModuleSource, checkpoint_source, refs


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
    """Holds the fused decoder, rotary table and KV cache for one Hugging Face causal LM (a pipeline stage: for its
    blocks; ``pipe``)."""

    def __init__(self, hf_model: nn.Module, config: InferenceConfig, comm: TensorParallelComm | None = None,
                 pipe: PipelineComm | None = None):
        # a vision-language model: the engine runs its language model (multimodal.py), the wrapper keeps the rest
        text = text_model_of(hf_model)
        self.outer, hf_model = (hf_model if text is not hf_model else None), text
        policy = find_policy(hf_model)
        hf_config = hf_model.config
        self.config = config
        self.hf_config = hf_config
        self.device = _engine_device(hf_model, config)
        _check_moe_options(hf_config, config)
        _check_not_prequantised(hf_config)
        if {"linear_attention", "conv", "hybrid"} & set(getattr(hf_config, "layer_types", None) or []):
            _check_linear_attention_options(hf_config, config)
        self.dtype = config.dtype or _model_dtype(hf_model)
        context = getattr(hf_config, "max_position_embeddings", None) or DEFAULT_MAX_SEQ_LEN
        self.max_seq_len = config.max_seq_len or min(context, DEFAULT_MAX_SEQ_LEN)
        if comm is None and pipe is None:
            comm, pipe = model_parallel_comms(config.tensor_parallel_size, config.pipeline_parallel_size, self.device,
                                              config.collective_timeout_s)
        elif comm is None or (pipe is None and config.pipeline_parallel_size > 1):
            raise ValueError("dsinfer: pass both comm= and pipe= (the tensor-parallel and pipeline groups, e.g. from "
                             "process_groups.model_parallel_comms), or neither (init_inference then creates them).")
        self.comm, self.pipe = comm, pipe if pipe is not None else PipelineComm()
        self.lookup_stats = None     # (forwards, tokens, drafts kept) of the last prompt-lookup generate
        if self.pipe.size != config.pipeline_parallel_size:
            raise ValueError(f"pipeline_parallel_size={config.pipeline_parallel_size} but the pipeline group passed "
                             f"has {self.pipe.size} stages.")
        source = (ModuleSource(hf_model) if config.checkpoint is None
                  else checkpoint_source(config.checkpoint, hf_model, outer=self.outer))
        weights = _place_experts(policy(hf_model, self.max_seq_len, source), config)
        if self.outer is not None:          # (the logits the wrapper's forward gives: lm_head's, often without the text
            weights = wrapper_logits(self.outer, hf_model, weights)     # model's soft-cap or scale)
        self.windows = sorted({lw.sliding_window for lw in weights.layers if lw.sliding_window is not None})
        if len(self.windows) > 1:
            raise ValueError(f"layers use different sliding windows {self.windows}; one window per model is supported.")
        self.sliding_window = self.windows[0] if self.windows else None
        chunks = sorted({lw.attention_chunk for lw in weights.layers if lw.attention_chunk is not None})
        if len(chunks) > 1 or (chunks and self.windows):
            raise ValueError(f"layers use attention chunks {chunks} and sliding windows {self.windows}; one chunk size "
                             f"and no sliding window per model is supported.")
        self.attention_chunk = chunks[0] if chunks else None     # (Llama 4's chunked layers)
        self.blocks_in = weights.blocks_in          # (image blocks seen whole in every layer, or the sliding ones only)
        if config.quantize == "int4":       # every block linear's K (per rank) a multiple of the group, before any work
            check_int4_groups(weights, shard_plan(weights, self.comm), config.quantize_group_size)
        if self.pipe.size > 1 and (weights.per_layer is not None or any(lw.kv_source is not None
                                                                         for lw in weights.layers)):
            raise UnsupportedModelError(
                f"dsinfer: {weights.model_type}'s blocks read per-layer inputs looked up on the first stage and other "
                f"blocks' keys and values, which pipeline stages do not pass on; use tensor parallelism "
                f"(tensor_parallel_size) or offload instead of pipeline_parallel_size={self.pipe.size}.")
        self.layer_range = _stage_range(weights, self.pipe, self.dtype, config.quantize,
                                        config.quantize_group_size)   # this stage's blocks
        lo, hi = self.layer_range
        # the Hugging Face cache layer each of this stage's blocks writes (NemotronH: a block is a mixer layer and the
        # MLP layer after it, so blocks and HF's layers are numbered apart)
        self.hf_cache_layers = list(weights.cache_layers[lo:hi] if weights.cache_layers is not None else range(lo, hi))
        self.attends = any(lw.q is not None or lw.mla is not None for lw in weights.layers)   # (Mamba: no attention)
        self.blocks_are_layers = weights.cache_layers is None
        weights.layers = weights.layers[lo:hi]
        self.working_set = None             # offload: what is resident, and the batch size it leaves room for
        self.offload = self._choose_offload(hf_model, weights)       # config.offload, "auto" resolved
        with torch.no_grad():
            if self.offload is None:
                self.decoder = build_decoder(weights, self.dtype, self.device, self.comm, quantize=config.quantize,
                                             embed=self.pipe.is_first, head=self.pipe.is_last,
                                             group_size=config.quantize_group_size)
                batch = config.max_batch_size or DEFAULT_MAX_BATCH_SIZE
            else:
                self.decoder, self.working_set = self._build_offloaded(hf_model, weights, source)
                batch = self.working_set.batch_size
        self.decoder.eval()
        if self.outer is not None and self.decoder.per_layer is not None:   # (Gemma 4's wrapper: its placeholders
            ids = [getattr(self.outer.config, f"{kind}_token_id", None) for kind in ("image", "video", "audio")]
            ids = [i for i in ids if i is not None]                          # looked up as padding on every call)
            pad = getattr(hf_model.config, "pad_token_id", None)
            if ids and pad is not None:
                self.decoder.placeholders = (torch.tensor(ids, device=self.device), pad)
        self.rotary = RotaryTable(weights.inv_freq, weights.attention_scaling, self.max_seq_len, self.dtype, self.device,
                                  weights.sliding_inv_freq, weights.sliding_attention_scaling, weights.mrope_axes)
        plan = shard_plan(weights, self.comm)
        kv_heads, width, keys_only = weights.cache_layout(plan.local_kv_heads)
        linear = {i: shapes for i, lw in enumerate(weights.layers)
                  if (shapes := state_shapes(lw, self.comm.size)) is not None}
        own, no_kv = kv_layout(weights, plan)       # (Gemma 4: blocks of their own shape)
        self.cache = StaticKVCache(len(weights.layers), kv_heads, width, batch, self.max_seq_len, self.dtype,
                                   self.device, keys_only=keys_only, linear=linear,
                                   attention_too=[i for i in linear if weights.layers[i].q is not None],
                                   shapes=own, no_kv=no_kv)
        self.vocab_size = weights.vocab_size
        self.hidden_size = weights.hidden_size
        self.positions_from_mask = weights.positions_from_mask
        self.alibi = weights.alibi is not None
        if config.release_hf_weights or self.offload is not None or self.pipe.size > 1:
            resident_embed = self.offload is None and self.comm.size == 1 and self.pipe.size == 1
            _release_hf_weights(hf_model, self.decoder.embed if resident_embed else None)

    def _choose_offload(self, hf_model, weights) -> str | None:
        """``config.offload``, with "auto" resolved; a model on meta that needs offload and was not given it is
        refused here, before anything is loaded. Rank 0 decides for its tensor-parallel group."""
        config = self.config
        if config.offload in ("cpu", "nvme"):
            return config.offload
        on_meta = all(p.device.type == "meta" for p in hf_model.parameters())
        if config.offload is None and not on_meta:
            return None                       # the weights are in memory already: they fit
        weight_bytes = _weight_bytes(hf_model, self.dtype, config.quantize, config.quantize_group_size) // (
            self.comm.size * self.pipe.size)
        cache_bytes = (cache_row_bytes(weights, shard_plan(weights, self.comm), self.dtype, self.max_seq_len)
                       * (config.max_batch_size or DEFAULT_MAX_BATCH_SIZE))
        free = available_memory(self.device)
        if not on_meta and _model_device(hf_model) == self.device:
            free += weight_bytes              # the model's own weights are released as the engine takes them
        host = host_available_memory()
        if weight_bytes + cache_bytes <= 0.9 * free:
            choice = None
        elif self.device.type == "cuda" and weight_bytes <= 0.8 * host:
            choice = "cpu"
        else:
            choice = "nvme"
        if self.comm.size > 1:          # every rank of the group builds the same decoder, or fails the same way
            code = torch.tensor([[None, "cpu", "nvme"].index(choice)], device=self.device)
            choice = [None, "cpu", "nvme"][int(self.comm.broadcast_(code).item())]
        gib = 2**30
        ranks = self.comm.size * self.pipe.size
        share = f" (this rank's share, one of {ranks})" if ranks > 1 else ""
        numbers = (f"the weights need {weight_bytes / gib:.2f} GiB in {str(self.dtype).replace('torch.', '')}"
                   f"{f' (block linears {config.quantize})' if config.quantize else ''}{share} and the KV "
                   f"cache {cache_bytes / gib:.2f} GiB, but {self.device} has {free / gib:.2f} GiB free")
        if config.offload is None and choice is not None:
            raise ValueError(
                f"dsinfer: the model does not fit without offload: {numbers}. Pass offload='auto' (or "
                f"offload='{choice}'{', offload_path=<folder on a fast disk>' if choice == 'nvme' else ''}) to "
                f"stream the weights within max_memory, lower max_seq_len / max_batch_size, or use "
                f"tensor_parallel_size > 1{' or more pipeline stages' if self.pipe.size > 1 else ''}.")
        if choice == "nvme" and not config.offload_path:
            raise ValueError(f"dsinfer: offload='auto' chose the disk tier ({numbers}; host RAM "
                             f"{host / gib:.2f} GiB available) but no offload_path was given. Pass "
                             f"offload_path=<folder on a fast local disk> (or $DSINFER_OFFLOAD_PATH with the strategy).")
        return choice

    def _build_offloaded(self, hf_model, weights, source):
        config = self.config
        budget = config.max_memory if config.max_memory is not None else available_memory(self.device) // 2
        folder = fingerprint = None
        if self.offload == "nvme":
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            folder = os.path.join(config.offload_path, f"rank{rank}-tp{self.comm.rank}of{self.comm.size}")
            fingerprint = _checkpoint_fingerprint(hf_model, config, self.dtype, self.comm)
            if fingerprint is not None and self.pipe.size > 1:       # the folder holds this stage's blocks
                fingerprint["pp"] = [self.pipe.rank, self.pipe.size, *self.layer_range]
        return build_streamed_decoder(weights, self.dtype, self.device, self.comm, self.offload, folder, budget,
                                      self.max_seq_len, config.max_batch_size, fingerprint, source,
                                      compress=config.offload_compress, quantize=config.quantize,
                                      embed=self.pipe.is_first, head=self.pipe.is_last,
                                      group_size=config.quantize_group_size)

    def new_hf_cache(self):
        """A Hugging Face cache the engine's forward fills: a plain dynamic one, or (linear-state blocks: Qwen3-Next /
        3.5, LFM2, Mamba-2) the layers the config gives, whose linear-attention layers hold the states and reorder
        them with beams. A
        pipeline stage's: its blocks' layers, numbered from 0 as its blocks are, and one more that only counts the
        tokens (1-wide K/V rows: :meth:`forward` appends them), so HF's ``get_seq_length`` has an attention layer
        to read even on a stage of linear-attention blocks only (and in a model without attention: Mamba)."""
        from transformers.cache_utils import DynamicCache

        if not self.cache.conv:        # (its layers made as the blocks write them: numbered as the blocks)
            cache = DynamicCache()
            cache.dsinfer_blocks = True
            return cache
        cache = DynamicCache(config=self.hf_config)
        _whole_history(cache)
        cache.layers = [cache.layers[i] for i in self.hf_cache_layers]     # numbered as the blocks
        cache.dsinfer_blocks = True
        if self.pipe.size > 1 or not self.attends:
            _add_counter(cache)
        return cache

    def adopt_hf_cache(self, hf_cache) -> None:
        """A Hugging Face cache the caller built: its sliding-window / chunked layers made whole-history ones
        (:func:`_whole_history`) and, for a model whose blocks are not its layers (NemotronH: one per layer of the
        config), its layers put in block order, in place, once (:meth:`new_hf_cache`'s are already)."""
        _whole_history(hf_cache)
        self._block_order(hf_cache)
        if getattr(hf_cache, "layers", None) and not self.attends and not getattr(hf_cache, "dsinfer_counter", False):
            _add_counter(hf_cache)     # (no attention layer: HF's cache could not say how many tokens it holds)

    def _block_order(self, hf_cache) -> None:
        """A caller's cache for a model whose blocks are not its layers: its layers put in block order, once."""
        layers = getattr(hf_cache, "layers", None)
        if self.blocks_are_layers or layers is None or getattr(hf_cache, "dsinfer_blocks", False):
            return
        if not layers and not self.cache.conv:     # an empty dynamic cache: its layers come as the blocks write them
            hf_cache.dsinfer_blocks = True
            return
        if self.pipe.size > 1 or len(layers) != len(self.hf_config.layer_types):
            raise ValueError(f"dsinfer: the Hugging Face cache passed has {len(layers)} layers; "
                             f"{self.hf_config.model_type} wants DynamicCache(config=model.config) (one layer per "
                             f"layer of the config), or none (the engine makes its own).")
        hf_cache.layers = [layers[i] for i in self.hf_cache_layers]
        hf_cache.dsinfer_blocks = True

    def sync_rng(self) -> None:
        """Every rank of the replica (tensor-parallel group, then pipeline) takes one CPU RNG state, so sampling
        agrees."""
        self.comm.sync_rng()
        self.pipe.sync_rng()

    def check_mask(self, attention_mask: torch.Tensor | None, generate: bool = False) -> None:
        """ALiBi (BLOOM): HF numbers the keys by the mask (cumsum - 1), the engine by cache column; the two differ by a
        per-row shift, which softmax ignores, only while each row's ones are one run (for ``generate``: one run up to
        the prompt's end, i.e. left padding, since the new tokens follow it). Other masks are refused here, not
        answered with shifted biases."""
        if not self.alibi or attention_mask is None:
            return
        m = attention_mask.to(torch.bool)
        cols = torch.arange(m.shape[-1], device=m.device)
        first = torch.where(m, cols, m.shape[-1]).amin(-1, keepdim=True)
        last = torch.where(m, cols, -1).amax(-1, keepdim=True)
        run = (cols >= first) if generate else (cols >= first) & (cols <= last)
        if not bool((run == m).all()):
            raise ValueError(
                f"dsinfer: {self.hf_config.model_type}'s ALiBi positions follow the attention mask; the engine supports "
                f"masks whose ones are one run per row{' ending at the last prompt token (left padding)' if generate else ''}"
                f" (got zeros between ones{' or right padding' if generate else ''}). Pad on the left "
                f"(tokenizer.padding_side='left') and keep each sequence contiguous.")

    def check_length(self, total: int, prompt: int | None = None, new: int | None = None) -> None:
        if total <= self.max_seq_len:
            return
        detail = f"prompt {prompt} + max_new_tokens {new} = {total}" if prompt is not None else f"sequence length {total}"
        raise ValueError(
            f"dsinfer: {detail} exceeds max_seq_len={self.max_seq_len}, the size of the pre-allocated KV cache and "
            f"rotary table. Pass max_seq_len={total} (or more) to init_inference / DSInferStrategy.")

    def check_blocks(self, blocks: torch.Tensor | None) -> torch.Tensor | None:
        """``blocks`` on the engine's device, None when no token sees a later one; refused where a block cannot be
        seen whole."""
        if blocks is None or not bool((blocks >= 0).any()):
            return None
        if self.cache.linear or self.pipe.size > 1:
            raise UnsupportedModelError(
                "dsinfer: these inputs let tokens attend to later ones (image blocks), which linear-state mixers and "
                "pipeline stages (prompts in micro-batches) cannot give; run them on one process with a model that "
                "has attention only.")
        return blocks.to(self.device)

    def check_deepstack(self, deepstack):
        """Qwen3-VL's deepstack on the engine's device and dtype; refused on pipeline stages."""
        if deepstack is None:
            return None
        if self.pipe.size > 1:
            raise UnsupportedModelError("dsinfer: this model adds image features to the stream after its first blocks "
                                        "(deepstack), which pipeline stages do not take; use tensor parallelism.")
        mask, embeds = deepstack
        return mask.to(self.device), [e.to(device=self.device, dtype=self.dtype) for e in embeds]

    # ------------------------------------------------------------------ HF-compatible forward
    @torch.inference_mode()
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, hf_cache=None,
                logits_to_keep=0, blocks=None, deepstack=None):
        """Logits [B, T', V] for ``input_ids`` [B, T]; K/V go to ``hf_cache`` if given. A pipeline runs the stages
        one after the other (no micro-batches: HF's loop calls this once per token) and every stage returns the
        last stage's logits. ``blocks`` [B, T]: tokens of one block id >= 0 see each other (a vision-language model's
        images, multimodal.py); ``deepstack``: (mask [B, T], [n, H] per early block) added to the stream after those
        blocks (Qwen3-VL)."""
        b, t = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        pipe = self.pipe
        if not pipe.is_first:
            h = None
        elif inputs_embeds is None:
            h = self.decoder.embed_tokens(input_ids)
        else:
            h = self.decoder.given_embeddings(inputs_embeds.to(device=self.device, dtype=self.dtype))
        if hf_cache is not None:
            self.adopt_hf_cache(hf_cache)
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
            self.check_mask(attention_mask)
            key_valid = attention_mask.to(device=self.device, dtype=torch.bool)
            if bool(key_valid.all()):
                key_valid = None
        if position_ids is None and self.positions_from_mask and attention_mask is not None:   # OPT: HF's rule
            valid = attention_mask.to(device=self.device, dtype=torch.long)
            position_ids = (valid.cumsum(-1) * valid - 1)[:, past:]
        elif position_ids is None:
            position_ids = torch.arange(past, total, device=self.device).expand(b, t)
        step = build_step(self.rotary, position_ids.to(self.device), key_valid, q_start=past, t=t,
                          window=self.sliding_window, chunk=self.attention_chunk, blocks=self.check_blocks(blocks),
                          blocks_in=self.blocks_in)
        step.deepstack = self.check_deepstack(deepstack)
        step.ids = input_ids.to(self.device) if input_ids is not None else None
        step.last_only = isinstance(logits_to_keep, int) and logits_to_keep == 1    # (HF's generate: a prompt's last)
        if getattr(hf_cache, "dsinfer_counter", False):    # (a pipeline stage's or an attention-free model's token
            row = torch.zeros(b, 1, t, 1, dtype=self.dtype, device=self.device)   # count: after the checks, so a
            hf_cache.layers[-1].update(row, row)                                # refused call leaves it as it was)
        step.hf_cache = hf_cache
        if h is None:
            h = pipe.recv((b, t, self.hidden_size), self.dtype, self.device, pipe.rank - 1)
        h = self.decoder.hidden(h, step)
        if not pipe.is_last:
            pipe.send(h, pipe.rank + 1)
        keep = logits_to_keep
        if isinstance(keep, int):
            keep = slice(-keep, None) if keep > 0 else slice(None)
        if pipe.is_last:
            logits = self.decoder.logits(h[:, keep])
        else:   # the shape the last stage's logits will have (a 0-dim index tensor drops the token dim, as in HF)
            rows = torch.empty(b, t, device=keep.device if isinstance(keep, torch.Tensor) else "cpu")[:, keep].shape
            logits = torch.empty(*rows, self.vocab_size, dtype=self.dtype, device=self.device)
        if pipe.size > 1:
            logits = pipe.broadcast_(logits.contiguous(), pipe.size - 1)
            pipe.flush()
        return logits


def _add_counter(hf_cache) -> None:
    """A last layer that only counts the tokens (1-wide K/V rows: :meth:`InferenceEngine.forward` appends them), so
    HF's ``get_seq_length`` has an attention layer to read."""
    from transformers.cache_utils import DynamicLayer

    hf_cache.layers.append(DynamicLayer())
    hf_cache.dsinfer_counter = True


def _whole_history(hf_cache) -> None:
    """Turn a Hugging Face cache's sliding-window layers (transformers' for sliding and chunked attention, which keep
    only the last window's K/V) into whole-history layers, in place, while they are empty: the engine's masks index
    every column of the sequence. A layer that already dropped K/V cannot be restored: refused with the fix."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(hf_cache, "layers", None)
    if not layers or getattr(hf_cache, "dsinfer_whole", False):
        return
    for i, layer in enumerate(layers):
        # (exactly that type: transformers' linear-attention + sliding layers subclass it and hold states too; no
        # supported family builds one, and left as they are they fail loudly on the K/V they drop)
        if type(layer) is DynamicSlidingWindowLayer:
            if layer.get_seq_length() > 0:
                raise ValueError("dsinfer: the Hugging Face cache passed holds K/V from another model's forward in a "
                                 "sliding-window layer (which keeps the last window only); pass an empty cache, or "
                                 "none (the engine makes its own).")
            layers[i] = DynamicLayer()
    hf_cache.dsinfer_whole = True


_BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                  "gate_up_proj",      # (Phi-3 packs the last two), latent attention's (DeepSeek; not kv_b_proj):
                  "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",      # and the GPT families' names:
                  "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "fc1", "fc2", "fc_in", "fc_out",
                  "out_proj", "c_attn", "c_proj", "c_fc",     # and linear attention's (Qwen3-Next / 3.5):
                  "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "in_proj_qkvz", "in_proj_ba",
                  "in_proj", "w1", "w2", "w3",      # (LFM2's short convolution and feed-forward; Granite 4's
                  "input_linear", "output_linear")  # shared MLP)


def _stage_range(weights, pipe: PipelineComm, dtype: torch.dtype, quantize: str | None,
                 group_size: int = 128) -> tuple[int, int]:
    """The blocks of this pipeline stage, balanced by the bytes each stage reads per decode step: every block's
    weights (int8 / int4 with ``quantize``, scales counted; a MoE layer's experts all counted, as a prompt reads them),
    and the lm_head, in ``dtype``, on the last stage."""
    def numel(ref):
        return math.prod(ref.shape)

    block = {None: dtype.itemsize, "int8": 1, "int4": 0.5 + 4 / group_size}[quantize]
    costs = [int(sum(numel(r) for r in refs(lw)) * block) for lw in weights.layers]
    return stage_layers(costs, pipe.size, pipe.rank, head_cost=numel(weights.lm_head) * dtype.itemsize)


def _place_experts(weights, config: InferenceConfig):
    """``expert_parallel_size`` > 1: every sparse layer's experts are placed whole over the group (``MoEWeights``);
    the number of experts must divide (checked here, before any weight is read)."""
    if config.expert_parallel_size == 1:
        return weights
    import dataclasses

    layers, ep = [], config.expert_parallel_size
    for lw in weights.layers:
        if lw.moe is not None:
            experts_per_rank(lw.moe.gate_up.shape[0], ep, weights.model_type)     # raises when they do not divide
            lw = dataclasses.replace(lw, moe=dataclasses.replace(lw.moe, expert_parallel=True))
        layers.append(lw)
    return dataclasses.replace(weights, layers=layers)


def _check_not_prequantised(hf_config) -> None:
    """A model quantised by transformers (bitsandbytes, GPTQ, AWQ, fp8 checkpoints: ``config.quantization_config``)
    holds packed weights and scales the policies do not read; refused before any work, with the fix."""
    q = getattr(hf_config, "quantization_config", None)
    if q is None:
        return
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    method = getattr(method, "value", method)
    raise UnsupportedModelError(
        f"the model is quantised by transformers (quantization_config: quant_method={method!r}); dsinfer reads "
        f"float weights and quantises them itself. Load the unquantised model (e.g. torch_dtype=torch.bfloat16, no "
        f"quantization_config; a meta model whose checkpoint= files are float: delete config.quantization_config), "
        f"and pass quantize='int8' or quantize='int4' for smaller weights.")


def _check_linear_attention_options(hf_config, config: InferenceConfig) -> None:
    """Linear-state blocks under tensor parallelism: Qwen3-Next / 3.5's key heads, LFM2's channels, Mamba-2's heads
    (and groups, or a group shared by several ranks) are split over the ranks; a size that does not split them is
    refused here, before any weight is read."""
    tp = config.tensor_parallel_size
    if hf_config.model_type in ("mamba", "falcon_mamba", "jamba"):      # Mamba-1: channels split
        inner = (hf_config.mamba_expand * hf_config.hidden_size if hf_config.model_type == "jamba"
                 else hf_config.intermediate_size)
        if inner % tp:
            raise ValueError(f"dsinfer: tensor_parallel_size={tp} does not divide the {inner} Mamba channels of "
                             f"{hf_config.model_type}; use a tensor_parallel_size that divides them.")
        return
    if hf_config.model_type in ("granitemoehybrid", "bamba", "nemotron_h", "falcon_h1", "mamba2"):   # Mamba-2: heads
        if hf_config.model_type == "nemotron_h":           # split, groups whole or shared
            heads, groups = hf_config.mamba_num_heads, hf_config.n_groups
        elif hf_config.model_type == "mamba2":
            heads, groups = hf_config.num_heads, hf_config.n_groups
        else:
            heads, groups = hf_config.mamba_n_heads, hf_config.mamba_n_groups
        if heads % tp or not (groups % tp == 0 or (tp % groups == 0 and (heads // groups) % (tp // groups) == 0)):
            raise ValueError(f"dsinfer: tensor_parallel_size={tp} does not split {hf_config.model_type}'s {heads} "
                             f"Mamba-2 heads in {groups} groups evenly (it must divide the heads, and divide the groups "
                             f"or be a multiple of them); use a tensor_parallel_size that does.")
        return
    heads = getattr(hf_config, "linear_num_key_heads", None)
    if heads is not None and heads % tp:
        raise ValueError(f"dsinfer: tensor_parallel_size={tp} does not divide the {heads} linear-attention key heads "
                         f"of {hf_config.model_type}; use a tensor_parallel_size that divides {heads}.")
    if heads is None and hf_config.hidden_size % tp:     # (LFM2: the short convolutions' channels)
        raise ValueError(f"dsinfer: tensor_parallel_size={tp} does not divide the {hf_config.hidden_size} "
                         f"short-convolution channels of {hf_config.model_type}; use one that divides them.")


def _check_moe_options(hf_config, config: InferenceConfig) -> None:
    """Refuse, before any work, what MoE families do not take: expert parallelism on a dense model. (int8 / int4 with
    offload: the experts' units are written quantised, ``builder.quantize_linears``.)"""
    model_type = getattr(hf_config, "model_type", None)
    if not has_experts(model_type):
        if config.expert_parallel_size > 1:
            raise ValueError(f"expert_parallel_size={config.expert_parallel_size} places the experts of a "
                             f"mixture-of-experts model over the ranks; model_type={model_type!r} has no experts. "
                             f"Drop expert_parallel_size.")


def _weight_bytes(hf_model: nn.Module, dtype: torch.dtype, quantize: str | None, group_size: int = 128) -> int:
    """Bytes of the model's weights as the engine holds them: ``dtype``, or with ``quantize="int8"`` the blocks'
    linears (the policies' block-linear names) and the experts' 3D tensors in int8 with an fp32 scale per output row,
    with ``"int4"`` half a byte a weight and an fp32 scale per ``group_size`` weights."""
    total = 0
    for name, p in hf_model.named_parameters():
        linear = p.dim() == 2 and name.split(".")[-2] in _BLOCK_LINEARS
        experts = p.dim() == 3 and name.split(".")[-2] == "experts"   # [E, N, K] (gpt-oss's [E, K, N]: E K scales)
        if quantize and (linear or experts):
            rows = p.numel() // p.shape[-1] if experts else p.shape[0]
            total += p.numel() + 4 * rows if quantize == "int8" else p.numel() // 2 + 4 * p.numel() // group_size
        else:
            total += p.numel() * dtype.itemsize
    return total


def _checkpoint_fingerprint(hf_model, config: InferenceConfig, dtype, comm) -> dict | None:
    """What an offload folder was written from: the same checkpoint files (name, size, mtime), config, dtype
    and shard let a later run reuse the folder. None (always rewrite) for weights that live in memory."""
    if config.checkpoint is None:
        return None
    files = sorted(f for f in os.listdir(config.checkpoint) if f.endswith(".safetensors"))
    stats = [[f, st.st_size, st.st_mtime_ns] for f in files for st in [os.stat(os.path.join(config.checkpoint, f))]]
    return {"checkpoint": os.path.abspath(config.checkpoint), "files": stats, "dtype": str(dtype),
            "tp": [comm.rank, comm.size], "quantize": config.quantize,
            **({"quantize_group_size": config.quantize_group_size} if config.quantize == "int4" else {}),
            "config": hf_model.config.to_json_string(use_diff=False)}


def _release_hf_weights(model: nn.Module, embed: torch.Tensor | None) -> None:
    """Point the HF embedding at the engine's copy (when it is whole) and turn every other weight the
    engine copied into meta."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    keep_tied = head.weight is emb.weight
    if embed is not None:
        emb.weight = nn.Parameter(embed, requires_grad=False)
        if keep_tied:
            head.weight = emb.weight
    for sub in model.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if embed is not None and p is emb.weight:
                continue
            setattr(sub, name, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))


# ---------------------------------------------------------------------- patching
def _dsinfer_forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                     inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, cache_position=None,
                     return_dict=None, **kwargs):
    """Replacement ``forward`` of a model optimised by dsinfer (same signature and output as HF's)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.get(flag):
            raise NotImplementedError(f"dsinfer: {flag}=True is not supported by the fused engine; run the "
                                      f"unoptimised model for attention maps / hidden states.")
    engine: InferenceEngine = self._dsinfer_engine
    hf_cache = cache if cache is not None else past_key_values
    use_cache = getattr(engine.hf_config, "use_cache", True) if use_cache is None else use_cache
    if hf_cache is None and use_cache:
        hf_cache = engine.new_hf_cache()
    blocks = deepstack = None
    if engine.outer is not None:      # a vision-language model: images through HF's own code (multimodal.py)
        extra = modality_inputs(self, kwargs)
        mrope = engine.rotary.mrope is not None
        if position_ids is not None and position_ids.dim() == 3:
            position_ids = plain_positions(self, position_ids, mrope)
        # (M-RoPE without positions given: HF's wrapper places the tokens, from its rope_deltas after an image)
        if extra or (mrope and position_ids is None and input_ids is not None):
            if input_ids is None:
                raise ValueError(f"dsinfer: {sorted(extra)} with inputs_embeds: pass input_ids (the image tokens' "
                                 f"places) instead.")
            engine.check_length((hf_cache.get_seq_length() if hf_cache is not None else 0) + input_ids.shape[1])
            merged = merged_inputs(self, engine, input_ids, attention_mask, position_ids, extra, hf_cache)
            inputs_embeds, position_ids, blocks, deepstack = (merged.embeds, merged.positions, merged.blocks,
                                                              merged.deepstack)
            input_ids = merged.ids        # (Gemma 4's per-layer inputs' ids; None: the embeddings only)
    logits = engine.forward(input_ids, attention_mask, position_ids, inputs_embeds, hf_cache, logits_to_keep, blocks,
                            deepstack)
    if logits.is_inference() and not torch.is_inference_mode_enabled():
        logits = logits.clone()      # (a caller outside inference mode may write into them: HF's assisted decoding)
    loss = None
    if labels is not None:
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                               ignore_index=-100)
    out = {"loss": loss, "logits": logits, hf_cache_name(): hf_cache if use_cache else None}
    return CausalLMOutputWithPast(**out)


def _wrapper_forward(model: nn.Module):
    """``_dsinfer_forward`` for a vision-language model under its own signature (HF's generate checks the arguments
    it passes against it; positional arguments bind as the wrapper's forward binds them)."""
    signature = inspect.signature(type(model).forward.__get__(model))

    def forward(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        for name, p in signature.parameters.items():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                bound.update(bound.pop(name, {}))
        return _dsinfer_forward(model, **bound)

    forward.__signature__ = signature
    return forward


def init_inference(model: nn.Module, config: InferenceConfig | None = None, comm: TensorParallelComm | None = None,
                   pipe: PipelineComm | None = None, **options) -> nn.Module:
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
    if (config.tensor_parallel_size > 1 or config.pipeline_parallel_size > 1) and not _has_policy(model):
        return _init_generic_tensor_parallel(model, config, comm)        # generic TP (parallel/generic.py)
    engine = InferenceEngine(model, config, comm=comm, pipe=pipe)
    if engine.outer is not None:      # the vision tower and projector: on the engine's device (from the checkpoint if
        place_other_weights(model, text_model_of(model), config.checkpoint, engine.device)         # on meta)
    model.eval()
    model.__dict__["_dsinfer_engine"] = engine
    model.forward = types.MethodType(_dsinfer_forward, model) if engine.outer is None else _wrapper_forward(model)
    model.generate = types.MethodType(dsinfer_generate, model)
    return model


def is_optimised(model: nn.Module) -> bool:
    return getattr(model, "_dsinfer_engine", None) is not None


# ---------------------------------------------------------------------- generic tensor parallelism
# A model without a policy and tensor_parallel_size > 1: its own nn.Linear layers are split in place
# (lightning_dsinfer/parallel/generic.py) and it keeps Hugging Face's unfused forward and generate.
def _has_policy(model: nn.Module) -> bool:
    try:
        find_policy(model)
    except UnsupportedModelError:
        return False
    return True


def _init_generic_tensor_parallel(model: nn.Module, config: InferenceConfig, comm: TensorParallelComm | None):
    from lightning_dsinfer.parallel.generic import (GenericTensorParallel, apply_generic_tensor_parallel,
                                                    generic_generate, plan_generic_tensor_parallel)

    if getattr(config, "quantize", None) is not None:
        raise NotImplementedError(f"quantize={config.quantize!r} needs a fused policy; model_type="
                                  f"{getattr(model.config, 'model_type', None)!r} has none (the generic "
                                  f"tensor-parallel path keeps HF's own linears).")
    if getattr(config, "expert_parallel_size", 1) > 1:
        raise NotImplementedError(f"expert_parallel_size={config.expert_parallel_size} needs a fused MoE policy; "
                                  f"model_type={getattr(model.config, 'model_type', None)!r} has none (the generic "
                                  f"tensor-parallel path keeps HF's own modules).")
    if config.pipeline_parallel_size > 1:
        raise NotImplementedError(f"pipeline_parallel_size={config.pipeline_parallel_size} needs a fused policy; "
                                  f"model_type={getattr(model.config, 'model_type', None)!r} has none (the generic "
                                  f"path splits HF's own linears over tensor-parallel ranks only). Use "
                                  f"tensor_parallel_size instead.")
    if getattr(config, "offload", None) is not None:
        raise NotImplementedError(f"offload={config.offload!r} needs a fused policy; model_type="
                                  f"{getattr(model.config, 'model_type', None)!r} has none (the generic "
                                  f"tensor-parallel path keeps every weight resident).")
    device = _engine_device(model, config)
    comm = comm if comm is not None else tensor_parallel_comm(config.tensor_parallel_size, device,
                                                              config.collective_timeout_s)
    plan = plan_generic_tensor_parallel(model, comm.size, comm.rank)
    source = None if config.checkpoint is None else checkpoint_source(config.checkpoint, model)
    apply_generic_tensor_parallel(model, plan, comm, source, dtype=config.dtype, device=device)
    model.eval()
    model.__dict__["_dsinfer_engine"] = GenericTensorParallel(plan, comm)
    model.generate = types.MethodType(generic_generate, model)
    return model
