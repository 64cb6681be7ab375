from lightning.pytorch.strategies import StrategyRegistry

from lightning_dsinfer.strategies.dsinfer import DSInferStrategy


def register() -> None:
    if "dsinfer_offload_nvme" not in StrategyRegistry:
        DSInferStrategy.register_strategies(StrategyRegistry)


__all__ = ["DSInferStrategy", "register"]
