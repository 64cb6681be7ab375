"""Tensor parallelism for models without a dsinfer policy: split the model's own ``nn.Linear`` layers in place.

The model keeps its own (unfused) forward and ``generate``; only its linear layers change:

- column-parallel layers keep this rank's rows of the weight (and bias): their output is this rank's share of
  the features, or, for the layers the plan marks as gathered, all-gathered back to the whole width;
- row-parallel layers keep this rank's columns; a forward hook all-reduces the partial products (one
  all-reduce per attention and per MLP), and only tp rank 0 keeps the bias, so it is added once;
- an attention module whose projections are split by heads computes with its local head counts: the
  head-count attributes it reads (``num_heads``, ``num_key_value_heads``, ``num_key_value_groups``, ...) and
  its own copy of the config are set to this rank's numbers;
- embeddings, norms and ``lm_head`` stay whole on every rank (simplest correct; the fused policies shard
  the vocabulary instead).

Which layer is split how comes from the model's own tensor-parallel plan (transformers'
``base_model_tp_plan`` / ``model.tp_plan``) where it has one, read with the meaning transformers gives each
style (``colwise``, ``rowwise``, ``colwise_gather_output``, ``rowwise_split_input``, ``packed_colwise``, ...).
Two improvements on its literal meaning: K/V projections are replicated when tp exceeds the KV heads (as
the fused engine does), and a *packed* producer whose plan gathers its output only because its parts have
different sizes (Phi-3's ``qkv_proj`` = q | k | v, ``gate_up_proj`` = gate | up) is split part by part, so
attention and MLP run on local heads / features with no gather. Without a plan, a generic rule: in every
block, the linear layers of one parent module that read the hidden state are column-parallel and the one
that writes back to the residual (``out_features == hidden_size``, an output-projection name) is
row-parallel; a group whose layout cannot be told from shapes alone (a fused QKV or gate/up, a norm between
the projections) stays whole on every rank, which is slower but correct.

Planning is a pure function of (model structure, tp_rank, tp) and works on a ``meta`` model; applying it reads
each rank's slices from a weight source (a safetensors folder for a meta model). This module reads only
attributes of the model (``config``, ``tp_plan``, module names); it does not import transformers.
"""
from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_dsinfer.parallel.comm import TensorParallelComm
from lightning_dsinfer.parallel.tensor import TensorShardPlan

# transformers' tensor-parallel styles (transformers/distributed/tensor_parallel.py), by what they mean here.
_COL_LOCAL = {"colwise", "packed_colwise"}                      # output stays split (the consumer is row-parallel)
_COL_GATHER = {"colwise_gather_output", "colwise_rep"}          # output all-gathered to the whole width
_ROW_LOCAL = {"rowwise"}                                        # input already split; output all-reduced
_ROW_SPLIT = {"rowwise_split_input", "rowwise_rep"}             # input whole: take this rank's part; all-reduce
_WHOLE = {"embedding_rowwise", "embedding_colwise", "sequence_parallel", "replicate",
          "replicated_with_grad_allreduce", "local_params"}     # inference: the module stays whole on every rank

_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "num_q_heads")
_KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head")
_WIDTH_ATTRS = ("hidden_size", "embed_dim", "all_head_size", "inner_dim")      # = heads x head_dim in attention
_HEAD_DIM_ATTRS = ("head_dim", "head_size", "attention_head_size")
_OUTPUT_NAMES = {"o_proj", "out_proj", "dense", "c_proj", "wo", "o", "fc2", "fc_out", "down_proj", "dense_4h_to_h",
                 "proj", "output_proj"}


class GenericTensorParallelError(ValueError):
    """The model cannot be split by the generic path; the message names the layer and the numbers."""


@dataclass(frozen=True)
class LinearSplit:
    """How one ``nn.Linear`` is split on this rank.

    kind "col" keeps rows ``ranges`` of the weight (output features), "row" keeps those columns (input
    features); ranges are (start, length) pairs, concatenated in order.
    """
    name: str
    kind: str
    ranges: tuple[tuple[int, int], ...]
    gather: bool = False           # col: all-gather the output to the whole width
    split_input: bool = False      # row: the input arrives whole; this rank takes `ranges` of its last dim

    @property
    def local(self) -> int:
        return sum(n for _, n in self.ranges)


@dataclass(frozen=True)
class HeadPatch:
    """Head counts an attention module computes with once its projections are split by heads."""
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    local_heads: int
    local_kv_heads: int


@dataclass
class GenericShardPlan:
    tp_rank: int
    tp: int
    origin: str                                         # "tp_plan" (the model's own) or "generic rule"
    linears: list[LinearSplit] = field(default_factory=list)
    heads: list[HeadPatch] = field(default_factory=list)
    whole: list[str] = field(default_factory=list)      # groups left whole on every rank, with the reason


# ---------------------------------------------------------------------------------------------- planning
def _text_config(model):
    config = model.config
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _first_int(obj, names) -> tuple[str, int] | None:
    for n in names:
        v = getattr(obj, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return n, v
    return None


def _hidden_size(config) -> int | None:
    found = _first_int(config, ("hidden_size", "n_embd", "d_model", "dim"))
    return None if found is None else found[1]


def _attention_shape(module: nn.Module, config) -> tuple[int, int, int] | None:
    """(heads, kv_heads, head_dim) of an attention module, from its own attributes, else the config."""
    looks_like = "attention" in type(module).__name__.lower() or "attn" in type(module).__name__.lower()
    own = _first_int(module, _HEAD_ATTRS)
    if not looks_like and own is None:
        return None
    heads = own[1] if own else (_first_int(config, ("num_attention_heads", "n_head", "num_heads")) or (None, None))[1]
    if not heads:
        return None
    kv = _first_int(module, _KV_HEAD_ATTRS) or _first_int(config, ("num_key_value_heads", "num_kv_heads"))
    kv_heads = kv[1] if kv and kv[1] else heads
    dim = _first_int(module, _HEAD_DIM_ATTRS) or _first_int(config, ("head_dim",))
    hidden = _hidden_size(config)
    head_dim = dim[1] if dim else (hidden // heads if hidden else None)
    if not head_dim:
        return None
    return heads, kv_heads, head_dim


def _contiguous(n: int, tp: int, rank: int, what: str) -> tuple[tuple[int, int], ...]:
    if n % tp:
        raise GenericTensorParallelError(f"tensor_parallel_size={tp} does not divide the {n} features of {what}.")
    k = n // tp
    return ((rank * k, k),)


def _model_plan(model) -> dict[str, str]:
    """The model's own TP plan with full module-name patterns ('model.layers.*.self_attn.q_proj': 'colwise')."""
    plan = getattr(model, "tp_plan", None)
    if isinstance(plan, dict) and plan:
        return dict(plan)
    base = getattr(_text_config(model), "base_model_tp_plan", None) or {}
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and hasattr(model, prefix):
        return {f"{prefix}.{k}": v for k, v in base.items()}
    return dict(base)


def _match_plan(model, plan: dict[str, str]) -> dict[str, str]:
    """Module name -> style, for the plan's patterns ('*' = a layer number)."""
    patterns = [(re.compile(re.escape(k).replace(r"\*", r"\d+")), v) for k, v in plan.items()]
    out = {}
    for name, _ in model.named_modules():
        for pattern, style in patterns:
            if name and pattern.fullmatch(name):
                out[name] = style
    return out


def _decoder_blocks(model) -> list[tuple[str, nn.Module]]:
    """The blocks of the largest ModuleList of same-class modules (the decoder layers)."""
    best, best_size = [], 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = [(f"{name}.{i}", m) for i, m in enumerate(module)], size
    return best


def _generic_rule(model) -> tuple[dict[str, str], list[str]]:
    """Styles from the block structure alone (no plan): (module name -> style, groups left whole)."""
    config = _text_config(model)
    hidden = _hidden_size(config)
    styles, whole = {}, []
    if hidden is None:
        return styles, ["the whole model: its config names no hidden size"]
    for block_name, block in _decoder_blocks(model):
        groups: dict[str, list[tuple[str, nn.Linear]]] = {}
        for sub, module in block.named_modules():
            if isinstance(module, nn.Linear):
                parent = sub.rpartition(".")[0]
                groups.setdefault(parent, []).append((sub, module))
        for parent, linears in groups.items():
            where = f"{block_name}.{parent}" if parent else block_name
            if len(linears) < 2:
                continue
            names = [n for n, _ in linears]
            out_candidates = [(n, m) for n, m in linears if m.out_features == hidden]
            named = [(n, m) for n, m in out_candidates if n.rpartition(".")[2] in _OUTPUT_NAMES]
            widening = [(n, m) for n, m in out_candidates if m.in_features != hidden]
            consumer = named[-1] if named else (widening[0] if len(widening) == 1 else None)
            if consumer is None:
                whole.append(f"{where} (no output projection among {names})")
                continue
            producers = [(n, m) for n, m in linears if n != consumer[0]]
            if any(m.in_features != hidden for _, m in producers):
                whole.append(f"{where} (a projection does not read the hidden state)")
                continue
            parent_module = block.get_submodule(parent) if parent else block
            shape = _attention_shape(parent_module, config) if parent else None
            if shape is not None:
                heads, kv_heads, head_dim = shape
                sizes_ok = consumer[1].in_features == heads * head_dim and all(
                    m.out_features in (heads * head_dim, kv_heads * head_dim) for _, m in producers)
                extra = [n for n, c in parent_module.named_children()
                         if not isinstance(c, nn.Linear) and any(True for _ in c.parameters())]
                if not sizes_ok:
                    whole.append(f"{where} (fused or unrecognised projection sizes {[m.out_features for _, m in producers]}"
                                 f" for {heads} heads x {head_dim})")
                    continue
                if extra:
                    whole.append(f"{where} (parameters between the projections: {extra})")
                    continue
            elif any(m.out_features != consumer[1].in_features for _, m in producers):
                whole.append(f"{where} (fused or unrecognised projection sizes)")
                continue
            for n, _ in producers:
                styles[f"{block_name}.{n}"] = "colwise"
            styles[f"{block_name}.{consumer[0]}"] = "rowwise"
    return styles, whole


def plan_generic_tensor_parallel(model: nn.Module, tp: int, tp_rank: int) -> GenericShardPlan:
    """Which ``nn.Linear`` of ``model`` this rank splits how (no weights are read: works on ``meta``)."""
    config = _text_config(model)
    model_type = getattr(config, "model_type", type(model).__name__)
    rules = _model_plan(model)
    if rules:
        styles, whole, origin = _match_plan(model, rules), [], "tp_plan"
    else:
        (styles, whole), origin = _generic_rule(model), "generic rule"
    plan = GenericShardPlan(tp_rank, tp, origin, whole=whole)
    modules = dict(model.named_modules())
    out_embed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    groups: dict[str, list[tuple[str, str]]] = {}
    for name, style in styles.items():
        module = modules[name]
        if style in _WHOLE or module is out_embed:
            continue
        if style not in _COL_LOCAL | _COL_GATHER | _ROW_LOCAL | _ROW_SPLIT:
            raise GenericTensorParallelError(
                f"{model_type}: tensor-parallel style {style!r} of {name} is not supported by the generic path "
                f"(supported: {', '.join(sorted(_COL_LOCAL | _COL_GATHER | _ROW_LOCAL | _ROW_SPLIT | _WHOLE))}).")
        if not isinstance(module, nn.Linear):
            raise GenericTensorParallelError(
                f"{model_type}: {name} is a {type(module).__name__}, not an nn.Linear; the generic path splits "
                f"nn.Linear layers only.")
        groups.setdefault(name.rpartition(".")[0], []).append((name, style))
    for parent, members in groups.items():
        _plan_group(plan, model_type, modules, parent, members, config)
    if not plan.linears:
        raise GenericTensorParallelError(
            f"{model_type} ({type(model).__name__}): the generic tensor-parallel path found no nn.Linear layer it can "
            f"split (from the {origin}" + (f"; left whole: {'; '.join(whole)}" if whole else "") + ").")
    return plan


def _head_rows(tp: int, rank: int, shape: tuple[int, int, int], of: str) -> TensorShardPlan:
    """This rank's q and k/v rows (KV heads replicated when tp exceeds them), after checking the head counts."""
    heads, kv_heads, head_dim = shape
    if heads % tp:
        raise GenericTensorParallelError(f"tensor_parallel_size={tp} does not divide {heads} attention heads {of}; "
                                         f"use a tensor_parallel_size that divides {heads}.")
    if (tp <= kv_heads and kv_heads % tp) or (tp > kv_heads and tp % kv_heads):
        raise GenericTensorParallelError(
            f"tensor_parallel_size={tp} does not divide {kv_heads} key/value heads {of}, nor is it a multiple of "
            f"them (KV heads are split, or replicated when tp is larger).")
    return TensorShardPlan(rank, tp, heads, kv_heads, head_dim, intermediate_size=0, vocab_size=0)  # head rows only


def _plan_group(plan: GenericShardPlan, model_type: str, modules: dict, parent: str,
                members: list[tuple[str, str]], config) -> None:
    """Splits of the linear layers of one parent module (an attention, an MLP, or a block holding its MLP)."""
    tp, rank = plan.tp, plan.tp_rank
    producers = [(n, s) for n, s in members if s in _COL_LOCAL | _COL_GATHER]
    consumers = [(n, s) for n, s in members if s in _ROW_LOCAL | _ROW_SPLIT]
    local_out = [n for n, s in producers if s in _COL_LOCAL]
    local_in = [n for n, s in consumers if s in _ROW_LOCAL]
    if (local_out and not consumers) or (local_in and not producers):
        raise GenericTensorParallelError(
            f"{model_type}: {parent} has {'column' if local_out else 'row'}-parallel {local_out or local_in} without a "
            f"{'row' if local_out else 'column'}-parallel partner in the same module; the generic path splits "
            f"producer/consumer pairs of one module only.")
    parent_module = modules[parent]
    consumer = modules[consumers[0][0]] if len(consumers) == 1 else None
    shape = _attention_shape(parent_module, config)
    if shape is not None and consumer is not None and consumer.in_features != shape[0] * shape[2]:
        shape = None                                    # not an attention we understand: plain contiguous splits
    of = f"of {model_type} ({parent})"

    # A gathered producer packed from parts of different widths, feeding a split-input consumer with nothing
    # else holding weights in between: split it part by part and keep everything local (no gather).
    upgrade, rows = None, None
    others = [c for c in parent_module.children()
              if not isinstance(c, nn.Linear) and any(True for _ in c.parameters())]
    if (len(producers) == 1 and producers[0][1] in _COL_GATHER and consumer is not None
            and consumers[0][1] in _ROW_SPLIT and not others):
        out = modules[producers[0][0]].out_features
        if shape is not None and out == (shape[0] + 2 * shape[1]) * shape[2]:
            rows = _head_rows(tp, rank, shape, of)
            q, kv = shape[0] * shape[2], shape[1] * shape[2]
            upgrade = (rows.q_rows, (q + rows.kv_rows[0], rows.kv_rows[1]), (q + kv + rows.kv_rows[0], rows.kv_rows[1]))
        elif shape is None and out == 2 * consumer.in_features:
            half = consumer.in_features
            ((start, n),) = _contiguous(half, tp, rank, f"{producers[0][0]} ({model_type}, packed halves)")
            upgrade = ((start, n), (half + start, n))
    if shape is not None and local_out:
        rows = _head_rows(tp, rank, shape, of)

    for name, style in producers:
        m = modules[name]
        what = f"{name} ({model_type})"
        if upgrade is not None:
            ranges, gather = upgrade, False
        elif style in _COL_GATHER:
            ranges, gather = _contiguous(m.out_features, tp, rank, what), True
        elif style == "packed_colwise":                 # gate | up halves, each split
            half = m.out_features // 2
            ((start, n),) = _contiguous(half, tp, rank, what)
            ranges, gather = ((start, n), (half + start, n)), False
        elif rows is not None:                          # attention, split by heads
            heads, kv_heads, head_dim = shape
            if m.out_features == heads * head_dim:
                ranges = (rows.q_rows,)
            elif m.out_features == kv_heads * head_dim:
                ranges = (rows.kv_rows,)
            elif kv_heads % tp:                         # q, k, v fused per head (GPT-NeoX): whole heads per rank
                raise GenericTensorParallelError(
                    f"tensor_parallel_size={tp} does not divide {kv_heads} key/value heads {of} ({name} fuses q, k "
                    f"and v per head).")
            else:
                ranges = _contiguous(m.out_features, tp, rank, what)
            gather = False
        else:
            ranges, gather = _contiguous(m.out_features, tp, rank, what), False
        plan.linears.append(LinearSplit(name, "col", ranges, gather=gather))
    for name, style in consumers:
        m = modules[name]
        if style in _ROW_SPLIT and upgrade is None:
            plan.linears.append(LinearSplit(name, "row", _contiguous(m.in_features, tp, rank, f"{name} ({model_type})"),
                                            split_input=True))
        elif rows is not None:
            plan.linears.append(LinearSplit(name, "row", (rows.q_rows,)))
        else:
            plan.linears.append(LinearSplit(name, "row", _contiguous(m.in_features, tp, rank, f"{name} ({model_type})")))
    if rows is not None:
        plan.heads.append(HeadPatch(parent, *shape, rows.local_heads, rows.local_kv_heads))


# ---------------------------------------------------------------------------------------------- applying
def _all_reduce_output(comm: TensorParallelComm, module, args, output):
    """Forward hook of a row-parallel layer: sum the ranks' partial products."""
    with torch.no_grad():
        return comm.all_reduce(output)


def _gather_output(comm: TensorParallelComm, module, args, output):
    """Forward hook of a gathered column-parallel layer: the whole output width on every rank."""
    with torch.no_grad():
        return comm.all_gather_last(output)


def _split_input(start: int, length: int, module, args):
    """Forward pre-hook of a split-input row-parallel layer: this rank's part of the (whole) input."""
    return (args[0].narrow(-1, start, length), *args[1:])


class _Reader:
    """Reads a parameter (or a slice of it) from the weight source, else from the module's own tensor."""

    def __init__(self, model: nn.Module, source=None):
        self.source = source
        self.own = dict(model.named_parameters(remove_duplicate=False))
        self.own.update(dict(model.named_buffers(remove_duplicate=False)))

    def read(self, name: str, dim: int | None = None, ranges=()) -> torch.Tensor:
        stored = getattr(self.source, "entries", None)
        if stored is not None and name not in stored and self.own[name].device.type == "meta":
            raise ValueError(f"weight {name} of the meta model is not in the checkpoint (names there look like "
                             f"{sorted(stored)[:3]}).")
        if self.source is not None:
            if dim is None:
                return self.source.read(name, None, 0, 0)
            return torch.cat([self.source.read(name, dim, s, n) for s, n in ranges], dim=dim)
        t = self.own[name].detach()
        if t.device.type == "meta":
            raise ValueError(f"weight {name} is on the meta device; pass checkpoint=<folder of safetensors> so "
                             f"dsinfer can load it.")
        if dim is None:
            return t
        return torch.cat([t.narrow(dim, s, n) for s, n in ranges], dim=dim)     # a copy: the full tensor can go


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """Every (module, attribute, full name) a parameter object is reachable from (tied weights share one)."""
    owners: dict[int, list] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((module, attr, f"{mod_name}.{attr}" if mod_name else attr))
    return owners


def _set_param(owners, tensor: torch.Tensor) -> None:
    p = nn.Parameter(tensor, requires_grad=False)
    for module, attr, _ in owners:
        setattr(module, attr, p)


def _rebuild_buffers(model: nn.Module, reader: _Reader) -> None:
    """Buffers still on ``meta`` (computed at construction, e.g. rotary frequencies): from the checkpoint
    if it has them, else from a fresh copy of their module built on the CPU from the config."""
    for mod_name, module in model.named_modules():
        metas = [b for b, t in module.named_buffers(recurse=False) if t.device.type == "meta"]
        if not metas:
            continue
        fresh = None
        for b in metas:
            full = f"{mod_name}.{b}" if mod_name else b
            source = reader.source
            if source is not None and full in getattr(source, "entries", {}):
                module._buffers[b] = source.read(full, None, 0, 0)
                continue
            if fresh is None:
                fresh = _fresh_module(model, module, full)
            module._buffers[b] = getattr(fresh, b).detach()


def _fresh_module(model: nn.Module, module: nn.Module, buffer: str) -> nn.Module:
    config = getattr(module, "config", None) or model.config
    errors = []
    for call in (functools.partial(type(module), config=config), functools.partial(type(module), config)):
        try:
            with torch.device("cpu"):
                return call()
        except Exception as err:                # noqa: BLE001  (any constructor failure: try the next form)
            errors.append(f"{type(err).__name__}: {err}")
    raise ValueError(f"buffer {buffer} is on the meta device, not in the checkpoint, and {type(module).__name__} "
                     f"could not be rebuilt from the config to compute it ({'; '.join(errors)}).")


def _patch_heads(module: nn.Module, h: HeadPatch) -> None:
    for attr in _HEAD_ATTRS:
        if getattr(module, attr, None) == h.heads and isinstance(getattr(module, attr), int):
            setattr(module, attr, h.local_heads)
    for attr in _KV_HEAD_ATTRS:
        if getattr(module, attr, None) == h.kv_heads and isinstance(getattr(module, attr), int):
            setattr(module, attr, h.local_kv_heads)
    if isinstance(getattr(module, "num_key_value_groups", None), int):
        module.num_key_value_groups = h.local_heads // h.local_kv_heads
    for attr in _WIDTH_ATTRS:
        if getattr(module, attr, None) == h.heads * h.head_dim:
            setattr(module, attr, h.local_heads * h.head_dim)
    config = getattr(module, "config", None)
    if config is not None:               # forward code that reads head counts from the config (Phi-3's q offset)
        local = copy.copy(config)
        for attr in ("num_attention_heads", "n_head", "num_heads"):
            if getattr(local, attr, None) == h.heads:
                setattr(local, attr, h.local_heads)
        for attr in ("num_key_value_heads", "num_kv_heads"):
            if getattr(local, attr, None) == h.kv_heads:
                setattr(local, attr, h.local_kv_heads)
        module.config = local


def apply_generic_tensor_parallel(model: nn.Module, plan: GenericShardPlan, comm: TensorParallelComm, source=None,
                                  dtype: torch.dtype | None = None, device: torch.device | str | None = None
                                  ) -> nn.Module:
    """Split ``model`` in place by ``plan``: read each rank's slices (from ``source``, a weight source with
    ``read(name, dim, start, length)``, else the model's own tensors), install the collectives as hooks,
    set local head counts. Every other parameter is read whole (a ``meta`` model needs ``source``)."""
    if comm.size != plan.tp or comm.rank != plan.tp_rank:
        raise ValueError(f"plan is for tp rank {plan.tp_rank} of {plan.tp}, the group is rank {comm.rank} of {comm.size}")
    modules = dict(model.named_modules())
    reader = _Reader(model, source)
    owners = _owners(model)
    done: set[int] = set()

    def cast(t):
        t = t.to(device=device) if device is not None else t
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    with torch.no_grad():
        for split in plan.linears:
            m = modules[split.name]
            for attr in ("weight", "bias"):
                p = getattr(m, attr)
                if p is None:
                    continue
                if len(owners[id(p)]) > 1:
                    raise GenericTensorParallelError(f"{split.name}.{attr} is shared with another module (tied); "
                                                     f"the generic path cannot split it.")
                full = f"{split.name}.{attr}"
                if split.kind == "col":
                    t = reader.read(full, 0, split.ranges)
                elif attr == "weight":
                    t = reader.read(full, 1, split.ranges)
                else:                                   # row-parallel bias: added once, by tp rank 0
                    t = reader.read(full) if comm.rank == 0 else None
                done.add(id(p))
                if t is None:
                    m.bias = None
                else:
                    _set_param(owners[id(p)], cast(t).contiguous())
            if split.kind == "col":
                m.out_features = split.local
            else:
                m.in_features = split.local
        for pid, where in owners.items():
            if pid in done:
                continue
            names = [full for _, _, full in where]        # tied weights: whichever name the checkpoint has
            stored = [n for n in names if n in getattr(source, "entries", {})]
            _set_param(where, cast(reader.read((stored or names)[0])))
        _rebuild_buffers(model, reader)
        if device is not None:
            model.to(device)
    for split in plan.linears:
        m = modules[split.name]
        if split.kind == "col" and split.gather:
            m.register_forward_hook(functools.partial(_gather_output, comm))
        if split.kind == "row":
            if split.split_input:
                ((start, n),) = split.ranges
                m.register_forward_pre_hook(functools.partial(_split_input, start, n))
            m.register_forward_hook(functools.partial(_all_reduce_output, comm))
    for h in plan.heads:
        _patch_heads(modules[h.name], h)
    return model


class GenericTensorParallel:
    """What a model split by the generic path carries as ``model._dsinfer_engine``."""

    kind = "generic"

    def __init__(self, plan: GenericShardPlan, comm: TensorParallelComm):
        self.plan, self.comm = plan, comm


def generic_generate(self, *args, **kwargs):
    """``generate`` of a model split by the generic path: the model's own, after every rank of the group took
    tp rank 0's RNG state (so sampling picks the same tokens everywhere)."""
    self._dsinfer_engine.comm.sync_rng()
    return type(self).generate(self, *args, **kwargs)
