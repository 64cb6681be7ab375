from lightning_dsinfer.precision.dsinfer import DSInferPrecision

__all__ = ["DSInferPrecision"]
