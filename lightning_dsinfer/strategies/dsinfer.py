"""``DSInferStrategy``: ``Trainer(strategy="dsinfer")`` optimises every Hugging Face causal LM inside
the LightningModule with the engine, then lets Lightning's predict / validate / test loops run the
user's unchanged steps on it."""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from typing_extensions import override

from lightning_dsinfer.config import InferenceConfig, resolve_dtype
from lightning_dsinfer.engine import init_inference, is_optimised
from lightning_dsinfer.policies import UnsupportedModelError, find_policy


def find_hf_models(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Outermost ``transformers.PreTrainedModel`` submodules of ``module`` (name, model)."""
    from transformers import PreTrainedModel

    found: list[tuple[str, nn.Module]] = []
    for name, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel) and not any(name.startswith(f"{n}.") for n, _ in found if n):
            found.append((name, sub))
    return found


class DSInferStrategy(DDPStrategy):
    """Inference strategy. Single process today; the process topology (tensor / pipeline / expert
    parallel groups) is built in ``setup_environment`` when the world has more than one rank."""

    strategy_name = "dsinfer"

    def __init__(self, max_seq_len: int | None = None, max_batch_size: int = 8, dtype: torch.dtype | str | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.inference_config = InferenceConfig(dtype=resolve_dtype(dtype), max_seq_len=max_seq_len,
                                                max_batch_size=max_batch_size)

    @property
    def world_size(self) -> int:  # type: ignore[override]
        return self.num_nodes * self.num_processes if self.parallel_devices is not None else 1

    @override
    def setup_environment(self) -> None:
        if self.num_nodes * self.num_processes > 1:
            raise NotImplementedError(
                f"DSInferStrategy got {self.num_nodes * self.num_processes} processes "
                f"(num_nodes={self.num_nodes} x devices={self.num_processes}); multi-process inference is not "
                f"implemented yet. Use devices=1.")
        self.set_world_ranks()
        self.accelerator.setup_device(self.root_device)

    @override
    def setup(self, trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            raise RuntimeError("strategy='dsinfer' is for inference (trainer.predict / validate / test), not fit.")
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        super().model_to_device()
        self._optimise_hf_models()
        self.setup_precision_plugin()

    def _engine_config(self) -> InferenceConfig:
        cfg = self.inference_config
        if cfg.dtype is None:
            dtype = getattr(self.precision_plugin, "dtype", None)
            if isinstance(dtype, torch.dtype):
                return InferenceConfig(dtype=dtype, max_seq_len=cfg.max_seq_len, max_batch_size=cfg.max_batch_size)
        return cfg

    def _optimise_hf_models(self) -> None:
        models = find_hf_models(self.lightning_module)
        if not models:
            raise UnsupportedModelError(
                f"strategy='dsinfer' found no Hugging Face PreTrainedModel inside {type(self.lightning_module).__name__}; "
                f"keep the transformers model as an attribute of the LightningModule (e.g. self.model = model).")
        for _, model in models:
            find_policy(model)   # raise for an unsupported model before any work starts
        config = self._engine_config()
        for _, model in models:
            if not is_optimised(model):
                init_inference(model, config=config)

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
