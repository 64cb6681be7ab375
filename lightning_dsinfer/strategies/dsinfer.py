"""``DSInferStrategy``: ``Trainer(strategy="dsinfer")`` optimises every Hugging Face causal LM inside
the LightningModule with the engine, then lets Lightning's predict / validate / test loops run the
user's unchanged steps on it."""
from __future__ import annotations

import datetime
import os
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.utils.data import DataLoader, Sampler
from typing_extensions import override

from lightning_dsinfer.config import InferenceConfig, resolve_dtype
from lightning_dsinfer.engine import init_inference, is_optimised
from lightning_dsinfer.parallel import TensorParallelComm, Topology
from lightning_dsinfer.parallel.pipeline import PipelineComm
from lightning_dsinfer.parallel.process_groups import new_pipeline_groups, new_tensor_parallel_groups
from lightning_dsinfer.policies import UnsupportedModelError, find_policy, has_experts, text_model_of


def find_hf_models(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Outermost ``transformers.PreTrainedModel`` submodules of ``module`` (name, model)."""
    from transformers import PreTrainedModel

    found: list[tuple[str, nn.Module]] = []
    for name, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel) and not any(name.startswith(f"{n}.") for n, _ in found if n):
            found.append((name, sub))
    return found


def _skip_write(*args: Any, **kwargs: Any) -> None:
    """Prediction writers on ranks that do not speak for their replica write nothing."""


def _to_cpu(x):
    from lightning_utilities.core.apply_func import apply_to_collection

    return apply_to_collection(x, torch.Tensor, torch.Tensor.cpu)


class ContiguousShardSampler(Sampler):
    """Rank ``r`` of ``n`` takes the r-th contiguous chunk of ``indices`` (sizes differ by at most one), so
    concatenating the ranks' predictions in rank order restores dataset order."""

    def __init__(self, indices: list[int], num_replicas: int, rank: int):
        base, extra = divmod(len(indices), num_replicas)
        start = rank * base + min(rank, extra)
        self.indices = indices[start:start + base + (rank < extra)]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def _sampler_order(sampler) -> list[int]:
    """Dataset indices in the order the user's sampler yields them (unwrapping Lightning's wrapper)."""
    inner = getattr(sampler, "dataset", None)
    if inner is not None and hasattr(inner, "reset") and hasattr(inner, "__getitem__"):
        inner.reset()
        return [inner[i] for i in range(len(inner))]
    return list(sampler)


class DSInferStrategy(DDPStrategy):
    """Inference strategy: world = data-parallel x pipeline x tensor-parallel.

    Every rank of a replica (its tensor-parallel and pipeline groups) sees the same batches; data-parallel groups take
    contiguous chunks of the dataset; ``trainer.predict`` returns every sample's prediction exactly once, in dataset
    order, on every rank. Default: tensor parallel over the devices of a node (divided by
    ``pipeline_parallel_size``), data parallel across nodes.
    """

    strategy_name = "dsinfer"

    def __init__(self, tensor_parallel_size: int | None = None, max_seq_len: int | None = None,
                 max_batch_size: int | None = None, dtype: torch.dtype | str | None = None,
                 checkpoint: str | None = None, collective_timeout_s: float = 300.0, offload: str | None = None,
                 offload_path: str | None = None, max_memory: int | str | None = None, cuda_graphs: bool = True,
                 offload_compress: bool = True, quantize: str | None = None, expert_parallel: bool = False,
                 pipeline_parallel_size: int = 1, quantize_group_size: int = 128, **kwargs: Any):
        kwargs.setdefault("timeout", datetime.timedelta(seconds=collective_timeout_s))
        super().__init__(**kwargs)
        self.tensor_parallel_size = tensor_parallel_size
        self.expert_parallel = expert_parallel      # MoE: whole experts over the tensor-parallel group (not sliced)
        if offload in ("nvme", "auto") and offload_path is None:
            offload_path = os.environ.get("DSINFER_OFFLOAD_PATH")
        self.inference_config = InferenceConfig(dtype=resolve_dtype(dtype), max_seq_len=max_seq_len,
                                                max_batch_size=max_batch_size, checkpoint=checkpoint,
                                                collective_timeout_s=collective_timeout_s, offload=offload,
                                                offload_path=offload_path, max_memory=max_memory,
                                                cuda_graphs=cuda_graphs, offload_compress=offload_compress,
                                                quantize=quantize, pipeline_parallel_size=pipeline_parallel_size,
                                                quantize_group_size=quantize_group_size)
        self._topology: Topology | None = None
        self._comm: TensorParallelComm | None = None
        self._pipe: PipelineComm | None = None

    @property
    def topology(self) -> Topology:
        if self._topology is None:
            raise RuntimeError("DSInferStrategy.topology is only known after the trainer set up the processes.")
        return self._topology

    @override
    def setup_environment(self) -> None:
        world = self.num_nodes * self.num_processes
        pp = self.inference_config.pipeline_parallel_size
        if self.tensor_parallel_size is None and self.num_processes % pp:
            raise ValueError(f"pipeline_parallel_size={pp} does not divide the {self.num_processes} devices per node; "
                             f"use a pipeline_parallel_size that divides them (or set tensor_parallel_size).")
        tp = self.tensor_parallel_size or self.num_processes // pp
        if world % (tp * pp):
            raise ValueError(f"tensor_parallel_size={tp} x pipeline_parallel_size={pp} does not divide the world size "
                             f"{world} (num_nodes={self.num_nodes} x devices={self.num_processes}).")
        if world == 1:
            self.set_world_ranks()
            self.accelerator.setup_device(self.root_device)
            self._topology, self._comm, self._pipe = Topology(1, 0), TensorParallelComm(), PipelineComm()
            return
        super().setup_environment()          # launcher env -> default process group (with the collective timeout)
        self._topology = Topology(world_size=world, rank=self.global_rank, tp=tp, pp=pp)
        self._comm = (new_tensor_parallel_groups(self._topology, self.inference_config.collective_timeout_s)
                      if tp > 1 else TensorParallelComm())
        self._pipe = new_pipeline_groups(self._topology, self.inference_config.collective_timeout_s)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.topology.dp, "rank": self.topology.dp_rank}

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """Data-parallel groups take contiguous chunks (so gathered predictions are in dataset order).

        Lightning has already put its strided sampler inside the (index-recording) batch sampler; that
        sampler is swapped in place, so batch indices seen by prediction writers stay right.
        """
        if self._topology is None or self._topology.dp == 1 or not isinstance(dataloader, DataLoader):
            return dataloader
        batch_sampler = dataloader.batch_sampler
        inner = getattr(batch_sampler, "_batch_sampler", batch_sampler)
        if inner is None or not hasattr(inner, "sampler"):
            raise ValueError(f"strategy='dsinfer' with {self._topology.dp} data-parallel groups needs a DataLoader with "
                             f"a batch_size (got batch_sampler={type(batch_sampler).__name__}).")
        order = _sampler_order(inner.sampler)
        inner.sampler = ContiguousShardSampler(order, self.topology.dp, self.topology.dp_rank)
        return dataloader

    @override
    def setup(self, trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            raise RuntimeError("strategy='dsinfer' is for inference (trainer.predict / validate / test), not fit.")
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        super().model_to_device()
        self._optimise_hf_models()
        self.setup_precision_plugin()
        if not self.topology.is_output_rank:      # one rank per data-parallel replica writes predictions
            for cb in trainer.callbacks:
                if isinstance(cb, BasePredictionWriter):
                    cb.write_on_batch_end = _skip_write
                    cb.write_on_epoch_end = _skip_write

    def _engine_config(self) -> InferenceConfig:
        """The strategy's options, with the precision plugin's dtype and quantization where the strategy set none
        (``DSInferPrecision("int8")`` / ``("int4")``: bf16 with int8 / int4 block linears)."""
        cfg = self.inference_config
        if cfg.dtype is None:
            dtype = getattr(self.precision_plugin, "dtype", None)
            if isinstance(dtype, torch.dtype):
                cfg = replace(cfg, dtype=dtype)
        quantize = getattr(self.precision_plugin, "quantize", None)
        if quantize is not None and cfg.quantize not in (None, quantize):
            raise ValueError(f"DSInferPrecision({self.precision_plugin.mode!r}) and DSInferStrategy(quantize="
                             f"{cfg.quantize!r}) disagree; set the quantization in one place.")
        return cfg if quantize is None else replace(cfg, quantize=quantize)

    def _optimise_hf_models(self) -> None:
        models = find_hf_models(self.lightning_module)
        if not models:
            raise UnsupportedModelError(
                f"strategy='dsinfer' found no Hugging Face PreTrainedModel inside {type(self.lightning_module).__name__}; "
                f"keep the transformers model as an attribute of the LightningModule (e.g. self.model = model).")
        tp = self.topology.tp
        config = replace(self._engine_config(), tensor_parallel_size=tp)
        if tp == 1 or config.pipeline_parallel_size > 1:   # with TP > 1 a model without a policy takes the generic TP path
            for _, model in models:
                find_policy(model)   # raise for an unsupported model before any work starts
        for _, model in models:
            if not is_optimised(model):     # expert parallelism for the models that have experts
                model_type = getattr(text_model_of(model).config, "model_type", None)   # (a vision-language model's LM)
                ep = tp if self.expert_parallel and has_experts(model_type) else 1
                init_inference(model, config=replace(config, expert_parallel_size=ep), comm=self._comm, pipe=self._pipe)

    @override
    def on_predict_end(self) -> None:
        """Gather the data-parallel replicas' predictions so every rank returns all of them, in order."""
        topo = self._topology
        loop = self.lightning_module.trainer.predict_loop
        if topo is None or topo.dp == 1 or not loop.return_predictions:
            return
        local = [[_to_cpu(p) for p in preds] for preds in loop._predictions]
        everyone: list = [None] * topo.world_size
        dist.all_gather_object(everyone, local)
        block = topo.tp * topo.pp
        speakers = [everyone[d * block + (topo.pp - 1) * topo.tp] for d in range(topo.dp)]
        for i, preds in enumerate(loop._predictions):
            preds[:] = [p for replica in speakers for p in replica[i]]

    @override
    def model_to_device(self) -> None:
        # After setup the HF weights the engine copied are meta tensors; the engine already lives on root_device.
        if self.model is not None and not any(is_optimised(m) for _, m in find_hf_models(self.model)):
            super().model_to_device()

    @override
    def teardown(self) -> None:
        # Strategy.teardown moves the LightningModule to the CPU; the optimised HF models hold meta tensors
        # where the engine took their weights, so only the rest of the module moves.
        if self.lightning_module is not None and self.root_device.type != "cpu":
            for name, child in self.lightning_module.named_children():
                if not any(is_optimised(m) for _, m in find_hf_models(child)):
                    child.cpu()
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register("dsinfer", cls, description="lightning-dsinfer fused inference engine")
        strategy_registry.register("dsinfer_offload", cls, offload="cpu",
                                   description="lightning-dsinfer with weights in host memory, streamed per layer")
        strategy_registry.register("dsinfer_offload_nvme", cls, offload="nvme",
                                   description="lightning-dsinfer with weights on disk under $DSINFER_OFFLOAD_PATH, "
                                               "streamed per layer")
