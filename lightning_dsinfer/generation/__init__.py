"""``model.generate`` for an optimised model: the engine's own loop when it covers the request,
else Hugging Face's loop running over the engine's forward (beam search, stop strings, stopping criteria, scores
output, ...), which is slower but exactly as featureful as HF.

Logits processors (repetition penalty, n-gram blocking, bad words, min-p / typical / eta sampling, a user's
``logits_processor`` list, ...) stay on the own loop: it builds HF's own processor list for the request (HF's
``_get_logits_processor``, so the same processors in the same order) and applies it to each step's fp32 logits with
the tokens so far, as HF's sampling loop does; then argmax, or softmax + multinomial.

Greedy ``prompt_lookup_num_tokens=k`` runs on the own loop too (generation/lookup.py: drafts from the text so far,
verified k + 1 at a time; batches too, which HF's assisted decoding refuses); sampling with it and ``assistant_model``
take HF's loop."""
from __future__ import annotations

import copy
import warnings

import torch

from lightning_dsinfer.generation import lookup
from lightning_dsinfer.generation.decode import decode_loop
from lightning_dsinfer.generation.pipeline import pipeline_decode_loop
from lightning_dsinfer.modules.kv_cache import hf_cache_name
from lightning_dsinfer.multimodal import merged_inputs, modality_inputs
from lightning_dsinfer.policies import UnsupportedModelError

# GenerationConfig fields the engine's own loop implements. A config that differs from the default
# anywhere else goes to Hugging Face's loop.
_OWN_LOOP_FIELDS = frozenset({
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
    "eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id", "use_cache", "num_beams",
    "num_return_sequences", "transformers_version", "_from_model_config", "cache_implementation",
    "return_dict_in_generate", "output_scores", "output_logits",
})
# Fields whose value here means "off" (a processor HF would not add). None and False are "off" for every field.
_INACTIVE = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": 0.0,
    "diversity_penalty": 0.0, "num_beam_groups": 1, "guidance_scale": 1.0,
}
# Fields that only matter to beam search (the own loop never runs for num_beams > 1).
_BEAM_ONLY = frozenset({"length_penalty", "early_stopping"})
# Fields HF implements as logits processors over (tokens so far, scores): the own loop runs them through HF's list.
_PROCESSOR_FIELDS = frozenset({
    "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "min_p", "typical_p", "epsilon_cutoff",
    "eta_cutoff", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
    "sequence_bias", "renormalize_logits", "remove_invalid_values", "exponential_decay_length_penalty",
})
# generate() keyword arguments the own loop accepts besides GenerationConfig fields.
_OWN_LOOP_KWARGS = frozenset({"input_ids", "attention_mask", "streamer", "logits_processor"})


def _as_list(x) -> list[int]:
    if x is None:
        return []
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.flatten().tolist()]
    return [int(v) for v in x] if isinstance(x, (list, tuple)) else [int(x)]


def _resolve(model, generation_config, kwargs):
    gc = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    unused = gc.update(**kwargs)
    return gc, unused


def _own_loop_handles(gc, unused: dict) -> str | None:
    """None when HF's loop must run the request; "plain" when the own loop's greedy / warped sampling covers it;
    "processors" when it needs HF's logits processors (run inside the own loop); "lookup" for greedy prompt-lookup
    decoding (generation/lookup.py)."""
    if set(unused) - _OWN_LOOP_KWARGS:
        return None
    if (gc.num_beams or 1) != 1 or ((gc.num_return_sequences or 1) != 1 and not gc.do_sample):
        return None     # (several samples per prompt: the own loop runs the prompts repeated, as HF does)
    kind = "processors" if unused.get("logits_processor") or gc.output_scores or gc.output_logits else "plain"
    if gc.prompt_lookup_num_tokens is not None:     # (greedy, nothing processed, nothing traced: else HF's loop)
        if kind != "plain" or gc.do_sample or gc.return_dict_in_generate:
            return None
        kind = "lookup"
    for key, value in gc.to_diff_dict().items():
        if key in _OWN_LOOP_FIELDS or key in _BEAM_ONLY or value is None or value is False:
            continue
        if key in ("prompt_lookup_num_tokens", "max_matching_ngram_size") and kind == "lookup":
            continue
        if key in _INACTIVE and value == _INACTIVE[key]:
            continue
        if key in _PROCESSOR_FIELDS:
            kind = "processors"
            continue
        return None
    return kind


def _hf_processors(model, gc, input_ids: torch.Tensor, attention_mask, logits_processor):
    """HF's logits processor list for this request (processors, then the sampling warpers when sampling), built by
    HF's own code as its ``generate`` builds it; None if this transformers version builds it differently (the request
    then takes HF's loop)."""
    from transformers.generation.logits_process import LogitsProcessorList

    gc = copy.deepcopy(gc)
    try:
        model._prepare_special_tokens(gc, attention_mask is not None, device=input_ids.device,
                                      batch_size=input_ids.shape[0])
        return model._get_logits_processor(
            generation_config=gc, input_ids_seq_length=input_ids.shape[1], encoder_input_ids=input_ids,
            logits_processor=logits_processor if logits_processor is not None else LogitsProcessorList(),
            device=input_ids.device, model_kwargs={"attention_mask": attention_mask})
    except (AttributeError, TypeError):
        return None


def _hf_generate(model, inputs, generation_config, kwargs):
    """Hugging Face's generate over the engine's forward, with a dynamic cache the engine fills."""
    if not any(k in kwargs for k in ("cache", "past_key_values")):
        kwargs = {**kwargs, hf_cache_name(): model._dsinfer_engine.new_hf_cache()}
    # (a config with use_cache=False, MPT's, would make HF's loop send the whole sequence each step with the cache
    # the engine fills: the loop uses the cache unless the caller says otherwise)
    kwargs.setdefault("use_cache", True)
    return type(model).generate(model, inputs, generation_config=generation_config, **kwargs)


def dsinfer_generate(self, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
    """Replacement ``generate`` of an optimised model (same arguments and results as HF's)."""
    engine = self._dsinfer_engine
    engine.sync_rng()                # the ranks of a replica (tensor-parallel, pipeline) must sample the same tokens
    if engine.cache.linear and (kwargs.get("assistant_model") is not None
                                or kwargs.get("prompt_lookup_num_tokens") is not None
                                or getattr(generation_config, "prompt_lookup_num_tokens", None) is not None):
        raise UnsupportedModelError(
            "dsinfer: speculative decoding (prompt_lookup_num_tokens / assistant_model) rewinds the cache past rejected "
            "drafts, which this model's linear-state mixers (recurrent states, short convolutions) cannot do on the "
            "engine; generate without it.")
    input_ids = inputs if inputs is not None else kwargs.get("input_ids")
    if input_ids is None or input_ids.dim() != 2:
        # inputs_embeds-only and other exotic inputs: HF's loop (it calls our forward).
        return _hf_generate(self, inputs, generation_config, kwargs)
    gc, unused = _resolve(self, generation_config, {k: v for k, v in kwargs.items() if k != "input_ids"})
    extra = {}
    if engine.outer is not None:    # a vision-language model's images: merged into the prompt's embeddings below
        extra = {k: v for k, v in modality_inputs(self, unused).items() if k not in _OWN_LOOP_KWARGS}
        unused = {k: v for k, v in unused.items() if k not in extra}
    t0 = input_ids.shape[1]
    if gc.max_new_tokens is not None:
        max_new = gc.max_new_tokens
    else:
        max_new = max((gc.max_length or 20) - t0, 0)
    engine.check_length(t0 + max_new, prompt=t0, new=max_new)
    pipelined = engine.pipe.size > 1
    kind = _own_loop_handles(gc, unused)
    if max_new == 0 or kind is None or (pipelined and (unused.get("streamer") is not None or kind == "processors")) \
            or (kind == "lookup" and not lookup.applies(engine)):
        return _hf_generate(self, inputs, generation_config, kwargs)    # (a pipeline streams through HF's loop)
    if kind == "lookup" and (gc.prompt_lookup_num_tokens < 1 or (gc.max_matching_ngram_size or 2) < 1):
        raise ValueError(f"dsinfer: prompt_lookup_num_tokens={gc.prompt_lookup_num_tokens} and "
                         f"max_matching_ngram_size={gc.max_matching_ngram_size} must be positive.")

    eos_ids = _as_list(gc.eos_token_id)
    pad_id = gc.pad_token_id
    if pad_id is None and eos_ids:
        pad_id = eos_ids[0]
    attention_mask = unused.get("attention_mask")
    if attention_mask is None and gc.pad_token_id is not None and gc.pad_token_id not in eos_ids \
            and bool((input_ids == gc.pad_token_id).any()):
        attention_mask = input_ids.ne(gc.pad_token_id).long()   # HF infers the mask the same way
    if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
        warnings.warn("dsinfer: a right-padded batch was detected; decoder-only models need left padding "
                      "(tokenizer.padding_side='left') for correct generation.", stacklevel=2)
    engine.check_mask(attention_mask, generate=True)
    prompt_embeds = positions = blocks = deepstack = prompt_ids = None
    if extra:
        if pipelined:
            raise ValueError(f"dsinfer: {sorted(extra)} with pipeline_parallel_size > 1: a vision-language model's "
                             f"images run on one pipeline stage only; use tensor parallelism.")
        merged = merged_inputs(self, engine, input_ids, attention_mask, None, extra)
        prompt_embeds, positions, prompt_ids = merged.embeds, merged.positions, merged.ids
        blocks, deepstack = engine.check_blocks(merged.blocks), engine.check_deepstack(merged.deepstack)
    if (gc.num_return_sequences or 1) > 1:     # sampling several continuations: each prompt repeated, HF's order
        input_ids = input_ids.repeat_interleave(gc.num_return_sequences, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(gc.num_return_sequences, dim=0)
        if prompt_embeds is not None:
            prompt_embeds = prompt_embeds.repeat_interleave(gc.num_return_sequences, dim=0)
        if prompt_ids is not None:
            prompt_ids = prompt_ids.repeat_interleave(gc.num_return_sequences, dim=0)
        if blocks is not None:
            blocks = blocks.repeat_interleave(gc.num_return_sequences, dim=0)
        if positions is not None:
            positions = positions.repeat_interleave(gc.num_return_sequences, dim=-2)
        if deepstack is not None:      # (the image rows of each prompt, repeated with it)
            mask, embeds = deepstack
            counts = mask.sum(-1).tolist()
            rows = [e.split(counts) for e in embeds]
            deepstack = (mask.repeat_interleave(gc.num_return_sequences, dim=0),
                         [torch.cat([part for part in r for _ in range(gc.num_return_sequences)]) for r in rows])
    processors = None
    if kind == "processors":
        processors = _hf_processors(self, gc, input_ids, attention_mask, unused.get("logits_processor"))
        if processors is None:
            return _hf_generate(self, inputs, generation_config, kwargs)
    min_new = max(gc.min_new_tokens or 0, (gc.min_length or 0) - t0, 0)
    top_k = gc.top_k if gc.do_sample else None
    if pipelined:
        return pipeline_decode_loop(engine, input_ids, attention_mask, max_new, min_new, bool(gc.do_sample),
                                    gc.temperature, top_k, gc.top_p, eos_ids, pad_id)
    prompt = dict(prompt_embeds=prompt_embeds, blocks=blocks, given_positions=positions, deepstack=deepstack,
                  prompt_ids=prompt_ids)
    if kind == "lookup":
        return lookup.lookup_decode_loop(engine, input_ids, attention_mask, max_new, min_new, eos_ids, pad_id,
                                         gc.prompt_lookup_num_tokens, gc.max_matching_ngram_size or 2,
                                         streamer=unused.get("streamer"), **prompt)
    trace = {"scores": [], "logits": []} if gc.return_dict_in_generate else None
    sequences = decode_loop(engine, input_ids, attention_mask, max_new, min_new, bool(gc.do_sample),
                            gc.temperature, top_k, gc.top_p, eos_ids, pad_id, streamer=unused.get("streamer"),
                            processors=processors, trace=trace, **prompt)
    if trace is None:
        return sequences
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    steps = sequences.shape[1] - t0         # (steps the loop ran past the last row's EOS are not part of the output)
    return GenerateDecoderOnlyOutput(sequences=sequences,
                                     scores=tuple(trace["scores"][:steps]) if gc.output_scores else None,
                                     logits=tuple(trace["logits"][:steps]) if gc.output_logits else None)


__all__ = ["dsinfer_generate"]
