"""Vision-language models: the language model on the engine, the vision encoder in Hugging Face's own modules.

A Gemma 3 (4B and up), LLaVA, Mistral 3, InternVL, SmolVLM, Llama 4 or Qwen 3.5 checkpoint loads as a
``*ForConditionalGeneration`` whose language model is one of the supported families (``config.text_config``). The
language model is nearly all of the work of a generation (the image is encoded once per prompt; every token runs the
language model), so :func:`language_model` presents it as the plain text causal LM the policies read (``model.*`` +
``lm_head``, the wrapper's own modules, nothing copied) and the engine is built on that.

Images go through HF's own code: :func:`merged_inputs` calls the wrapper's forward with the language model's forward
replaced by a catch (and its embedding lookup by the engine's, whose table may be sharded or streamed), so the vision
tower, the projector and the placement of the image features among the token embeddings are exactly HF's, for any
wrapper. What the engine then needs to run the prompt is what HF hands its language model: the merged embeddings,
the positions, and which tokens see each other.

Masks: most wrappers keep the causal mask; Gemma 3 lets each image's tokens see each other, which HF expresses as
``block_sequence_ids`` (tokens of one block >= 0 see the whole block). The catch
records them from HF's own mask construction, and the engine ORs them into the prompt's mask (``masks.build_masks``).
Positions: Qwen 3.5's M-RoPE gives text tokens three equal position rows, which collapse to the ordinary ones, and an
image's tokens three that differ (time, height, width), which the engine's rotary table takes as they are
(``RotaryTable.gather``); decoding goes on from the prompt's largest position, as HF's ``rope_deltas``. A mask rule of
HF's that the engine does not model is refused before any work.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from lightning_dsinfer.modules.kv_cache import hf_cache_name
from lightning_dsinfer.policies.base import UnsupportedModelError

_TEXT_MODULES = ("language_model", "text_model")
# forward() arguments of a text causal LM; anything else a caller passes to a wrapper is a modality input
TEXT_ARGUMENTS = frozenset({"input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "inputs_embeds",
                            "labels", "use_cache", "logits_to_keep", "cache_position", "return_dict",
                            "output_attentions", "output_hidden_states"})


@dataclass
class Merged:
    """What a wrapper hands its language model for a prompt with images: the merged embeddings [B, T, H], positions
    ([B, T], M-RoPE's [3, B, T], or None: the engine's own), image blocks [B, T] (or None), and Qwen3-VL's deepstack
    (the image tokens' mask [B, T] and one [n, H] tensor per early layer, added to the stream after it; or None), and
    Gemma 4's token ids [B, T] its per-layer inputs are looked up by (image tokens as padding; or None)."""
    embeds: torch.Tensor
    positions: torch.Tensor | None = None
    blocks: torch.Tensor | None = None
    deepstack: tuple | None = None
    ids: torch.Tensor | None = None


class _Caught(Exception):
    """Raised by the language model's stand-in forward: HF's wrapper has built what the language model gets."""


class TextCausalLM(nn.Module):
    """A text causal LM (``model`` + ``lm_head``, as the policies read one) over a wrapper's language model and head,
    for a text config transformers has no ``*ForCausalLM`` class of (Qwen 2 / 2.5-VL's)."""

    def __init__(self, config, model: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.config, self.model, self.lm_head = config, model, lm_head

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def language_model(model: nn.Module) -> nn.Module | None:
    """The text causal LM of a vision-language ``model`` (``model.config.text_config``), as a ``*ForCausalLM`` over the
    wrapper's own modules, or None when ``model`` is not such a wrapper. Built once per model (kept outside its
    submodules, so the wrapper's ``state_dict`` and ``named_parameters`` are unchanged)."""
    view = model.__dict__.get("_dsinfer_text_view")
    if view is not None:
        return view
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None)
    if text_config is None or text_config is config:
        return None
    from transformers import PreTrainedModel

    for name in _TEXT_MODULES:       # Llama 4: the wrapper holds a whole Llama4ForCausalLM
        sub = getattr(model, name, None)
        if isinstance(sub, PreTrainedModel) and sub.get_output_embeddings() is not None:
            view = sub
            break
    else:
        base = getattr(model, "model", None)
        text = next((t for n in _TEXT_MODULES if isinstance(t := getattr(base, n, None), PreTrainedModel)), None)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if text is None or head is None:
            return None
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(text.config), None)
        if cls is None:               # (Qwen 2 / 2.5-VL: no text *ForCausalLM in transformers)
            view = TextCausalLM(text.config, text, head)
        else:
            with torch.device("meta"):    # the text model's class around the wrapper's own modules: nothing allocated
                view = cls(text.config)
            view.model, view.lm_head = text, head
    view.eval()
    view.__dict__["_dsinfer_language_model"] = True     # (weights.tied_embeddings: the wrapper tied, or did not)
    model.__dict__["_dsinfer_text_view"] = view
    return view


def wrapper_logits(model: nn.Module, view: nn.Module, weights):
    """``weights`` with the logit post-processing of the text model (Gemma's final soft-cap, Granite's and Cohere's
    logit scales) dropped where the wrapper ``model``'s forward, which applies ``lm_head`` itself, does not apply it
    (HF's Gemma 3, LLaVA, Aya Vision wrappers: their logits are ``lm_head``'s); kept where the wrapper calls the text
    causal LM whole (Llama 4)."""
    import dataclasses
    import inspect

    if view is getattr(model, "language_model", None):
        return weights
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        source = ""
    changes = {}
    if weights.final_softcap is not None and "final_logit_softcapping" not in source:
        changes["final_softcap"] = None
    if weights.logit_scale is not None and not any(name in source for name in ("logits_scaling", "logit_scale")):
        changes["logit_scale"] = None
    return dataclasses.replace(weights, **changes) if changes else weights


def view_names(model: nn.Module, view: nn.Module) -> dict[str, str]:
    """The wrapper's parameter name of each language-model tensor -> the view's (``model.language_model.layers.0...``
    -> ``model.layers.0...``): how a checkpoint the wrapper saved names the view's tensors."""
    inner = {id(m): name for name, m in view.named_modules(remove_duplicate=False)}    # (by module: a tied weight
    names = {}                                                                            # is two modules' tensor)
    for outer_name, m in model.named_modules(remove_duplicate=False):
        if id(m) in inner:
            for attr in (*m._parameters, *m._buffers):
                a, b = f"{outer_name}.{attr}".lstrip("."), f"{inner[id(m)]}.{attr}".lstrip(".")
                if a != b:
                    names[a] = b
    return names


def place_other_weights(model: nn.Module, view: nn.Module, folder: str | None, device: torch.device) -> None:
    """The wrapper's tensors outside the language model (vision tower, projector) on the engine's ``device``; a wrapper
    built on meta gets them from the checkpoint ``folder`` (the engine reads the language model itself): each part
    that is a model of its own (the vision tower) first initialised by HF's own ``init_weights`` (buffers that no
    checkpoint stores, as position ids, get their values), then every tensor the checkpoint has read from it."""
    from transformers import PreTrainedModel

    own = _tensor_ids(view)

    def outside(module):
        return not any(id(t) in own for t in (*module.parameters(), *module.buffers()))

    def on_meta(module):
        return any(t.device.type == "meta" for t in (*module.parameters(), *module.buffers()))

    if folder is not None and on_meta(model):
        done: list[nn.Module] = []
        for sub in model.modules():
            if (isinstance(sub, PreTrainedModel) and sub is not model and outside(sub) and on_meta(sub)
                    and not any(any(m is sub for m in d.modules()) for d in done)):
                sub.to_empty(device=device)
                sub.init_weights()
                done.append(sub)
        from lightning_dsinfer.policies.weights import checkpoint_source

        source = checkpoint_source(folder, model)
        fresh = set().union(*map(_tensor_ids, done))
        for name, t in (*model.named_parameters(), *model.named_buffers()):
            if id(t) in own or not (t.device.type == "meta" or id(t) in fresh):
                continue
            if name in source.entries:
                _set(model, name, source.read(name, None, 0, 0).to(device=device, dtype=t.dtype))
            elif t.device.type == "meta" and isinstance(t, nn.Parameter):
                raise ValueError(f"dsinfer: {type(model).__name__}'s {name} is on the meta device and not in the "
                                 f"checkpoint {folder}; pass the folder the model was saved to.")
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if id(t) not in own and t.device.type != "meta" and t.device != device:
            _set(model, name, t.detach().to(device))


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def modality_inputs(model: nn.Module, kwargs: dict) -> dict:
    """The arguments among ``kwargs`` that the wrapper ``model``'s forward takes and a text model's does not
    (pixel_values, image_sizes, token_type_ids, ...), those set (not None, not an empty ``mm_encoder_outputs``)."""
    import inspect

    params = {name for name, p in inspect.signature(type(model).forward).parameters.items()
              if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return {k: v for k, v in kwargs.items() if k in params and k not in TEXT_ARGUMENTS and not _unset(v)}


def _unset(value) -> bool:
    return value is None or (isinstance(value, dict) and all(_unset(v) for v in value.values()))


def merged_inputs(model: nn.Module, engine, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None, extra: dict, hf_cache=None):
    """What HF's wrapper hands its language model for a prompt with images (:class:`Merged`), caught there (see the
    module docstring)."""
    view = language_model(model)
    text = view.model if view is not getattr(model, "language_model", None) else view
    embed = view.get_input_embeddings()
    caught: dict = {}
    blocks: list = []
    rules: list = []
    masking = sys.modules.get(type(getattr(model, "model", model)).__module__)
    originals = {name: getattr(masking, name) for name in ("create_causal_mask", "create_sliding_window_causal_mask",
                                                           "create_masks_for_vision_model", "create_masks_for_generate")
                 if hasattr(masking, name)}

    def catch(*args, **kwargs):
        caught.update(kwargs)
        raise _Caught

    def mask_rule(*args, **kwargs):       # HF's mask construction: its block ids and any rule of its own
        if kwargs.get("block_sequence_ids") is not None:
            blocks.append(kwargs["block_sequence_ids"])
        elif kwargs.get("or_mask_function") is not None:
            rules.append(kwargs["or_mask_function"])
        return originals["create_causal_mask"](*args, **kwargs)

    def window_rule(*args, **kwargs):     # (PaliGemma 2: the blocks OR-ed in after the sliding window)
        if kwargs.get("block_sequence_ids") is not None:
            engine.blocks_in = "past_window"      # (how this wrapper's masks read its blocks: the same every call)
        return originals["create_sliding_window_causal_mask"](*args, **kwargs)

    def vision_masks(*args, **kwargs):    # (Gemma 4: its image blocks through a mask helper of its own)
        if kwargs.get("block_sequence_ids") is not None:
            blocks.append(kwargs["block_sequence_ids"])
        return originals["create_masks_for_vision_model"](*args, **kwargs)

    def generic_masks(*args, **kwargs):   # (Gemma 4 unified: its image blocks through transformers' helper, which
        if kwargs.get("block_sequence_ids") is not None:    # ORs them into every layer's mask, after the sliding
            blocks.append(kwargs["block_sequence_ids"])     # window: policies/gemma4.py reads that as "past_window")
        elif kwargs.get("or_mask_function") is not None:
            rules.append(kwargs["or_mask_function"])
        return originals["create_masks_for_generate"](*args, **kwargs)

    stand_ins = {"create_causal_mask": mask_rule, "create_sliding_window_causal_mask": window_rule,
                 "create_masks_for_vision_model": vision_masks, "create_masks_for_generate": generic_masks}

    def per_layer_ids(input_ids, inputs_embeds=None):   # (Gemma 4: the ids its per-layer inputs are looked up by,
        if input_ids is None:                            # handed on as they are: the engine looks them up)
            raise UnsupportedModelError(f"dsinfer: {type(model).__name__} looks its per-layer inputs up by token "
                                        f"id; pass input_ids.")
        return _PerLayerIds(input_ids)

    check_vision_weights(model, view)
    input_ids = input_ids.to(engine.device)        # (the vision part sits on the engine's device: place_other_weights)
    attention_mask = None if attention_mask is None else attention_mask.to(engine.device)
    extra = {k: v.to(engine.device) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
    saved = [(m, m.__dict__.get("forward")) for m in (text, embed)]     # (a forward installed on the instance:
    per_layer = hasattr(text, "get_per_layer_inputs")                     # put back after, whatever was installed)
    table = embed._parameters.get("weight")
    swapped = per_layer and table is not None and table.device.type == "meta"
    try:
        text.forward = catch
        embed.forward = lambda ids: engine.decoder.module_embeddings(ids.to(engine.device))
        if per_layer:
            text.get_per_layer_inputs = per_layer_ids
        if swapped:    # (the wrapper reads the pad row of a table the engine sharded or streamed, for per_layer_ids
            embed._parameters["weight"] = torch.zeros(1, table.shape[1], dtype=engine.dtype,   # above, which does not
                                                      device=engine.device).expand(table.shape)   # use it)
        for name in originals:            # (the wrapper module's own names of HF's mask functions)
            setattr(masking, name, stand_ins[name])
        with torch.inference_mode():
            type(model).forward(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                **({} if hf_cache is None else {hf_cache_name(): hf_cache}), **extra)
    except _Caught:
        pass
    finally:
        for module, forward in saved:
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward
        for name, original in originals.items():
            setattr(masking, name, original)
        text.__dict__.pop("get_per_layer_inputs", None)
        if swapped:
            embed._parameters["weight"] = table
    if "inputs_embeds" not in caught:
        raise UnsupportedModelError(f"dsinfer: {type(model).__name__}'s forward did not reach its language model with "
                                    f"these inputs ({sorted(extra)}); run the unoptimised model for them.")
    if rules and not blocks:
        raise UnsupportedModelError(
            f"dsinfer: {type(model).__name__} applies an attention rule of its own to these inputs ({sorted(extra)}) "
            f"that the engine does not model; run the unoptimised model for them.")
    ids = caught.get("per_layer_inputs")
    if ids is not None and not isinstance(ids, _PerLayerIds):
        raise UnsupportedModelError(f"dsinfer: {type(model).__name__} feeds its language model per_layer_inputs of its "
                                    f"own, which the engine's blocks do not take; run the unoptimised model with images.")
    deepstack = None
    if caught.get("deepstack_visual_embeds") is not None:     # (Qwen3-VL: added to the stream after the first layers)
        deepstack = (caught["visual_pos_masks"], list(caught["deepstack_visual_embeds"]))
    return Merged(caught["inputs_embeds"], plain_positions(model, caught.get("position_ids"),
                                                           engine.rotary.mrope is not None),
                  blocks[0] if blocks else None, deepstack, None if ids is None else ids.ids)


class _PerLayerIds:
    """Gemma 4's wrapper hands its language model per-layer inputs it looks up by id (image tokens as padding): caught
    as those ids (``Merged.ids``), which the engine looks up itself."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids


def _tensor_ids(module: nn.Module) -> set[int]:
    """The ids of ``module``'s parameters and buffers (the language model's, to tell the wrapper's other tensors)."""
    return {id(t) for t in (*module.parameters(), *module.buffers())}


def check_vision_weights(model: nn.Module, view: nn.Module) -> None:
    own = _tensor_ids(view)
    meta = [name for name, t in (*model.named_parameters(), *model.named_buffers())
            if id(t) not in own and t.device.type == "meta"]
    if meta:
        raise ValueError(f"dsinfer: {type(model).__name__}'s {meta[0]} (and {len(meta) - 1} more tensors of its vision "
                         f"part) are on the meta device: pass checkpoint= (weights are read from it; buffers are not "
                         f"stored there: build the vision part off meta) or load the model with from_pretrained.")


def plain_positions(model: nn.Module, positions: torch.Tensor | None, mrope: bool) -> torch.Tensor | None:
    """The positions the engine takes from what a wrapper hands its language model: [B, T] as they are; M-RoPE's
    [3, B, T] (Qwen 3.5: [4, B, T], its text positions first) as one row where its rows agree (text tokens), else as
    they are for a rope of three rows (``mrope``: the engine's rotary table has them)."""
    if positions is None or positions.dim() == 2:
        return positions
    rows = positions[1:] if positions.shape[0] == 4 else positions
    if bool((rows == rows[:1]).all()):
        return rows[0]
    if not mrope:
        raise UnsupportedModelError(
            f"dsinfer: {type(model).__name__} places these image tokens at multi-axis (M-RoPE) positions, which this "
            f"model's rotary table does not take; run the unoptimised model with images.")
    return rows


__all__ = ["language_model", "merged_inputs", "modality_inputs", "place_other_weights", "plain_positions",
           "view_names"]
