"""lightning-dsinfer: DeepSpeed-Inference-class inference for PyTorch Lightning, without DeepSpeed."""
from lightning_dsinfer.config import InferenceConfig
from lightning_dsinfer.engine import InferenceEngine, init_inference, is_optimised
from lightning_dsinfer.policies import UnsupportedModelError, supported_model_types
from lightning_dsinfer.precision import DSInferPrecision
from lightning_dsinfer.strategies import DSInferStrategy, register as _register_strategies
from lightning_dsinfer.strategies.progress import TokensPerSecondProgressBar

_register_strategies()


def parallel_rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

__version__ = "0.1.0"

__all__ = ["DSInferPrecision", "DSInferStrategy", "InferenceConfig", "InferenceEngine", "init_inference",
           "is_optimised", "UnsupportedModelError", "supported_model_types", "TokensPerSecondProgressBar", "parallel_rank", "__version__"]
