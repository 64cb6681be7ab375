"""``DSInferPrecision``: the dtype the engine builds its weights in, as a Lightning precision plugin."""
from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager

import torch
from lightning.pytorch.plugins.precision import Precision
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn
from typing_extensions import override

_MODES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.bfloat16,
          "int4": torch.bfloat16}


class DSInferPrecision(Precision):
    """Inference precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` weights and activations (true half, no autocast), or
    ``"int8"`` / ``"int4"``: the blocks' linears weight-only int8 (a scale per output row) / int4 (a scale per output
    row and group of inputs: ``DSInferStrategy(quantize_group_size=...)``, default 128), everything else in bf16 (what
    ``DSInferStrategy(quantize="int8" / "int4")`` with bf16 does)."""

    def __init__(self, mode: str = "bf16"):
        if mode not in _MODES:
            raise ValueError(f"DSInferPrecision({mode!r}): supported modes are {sorted(_MODES)}.")
        self.mode = mode
        self.dtype = _MODES[mode]
        self.quantize = mode if mode in ("int8", "int4") else None      # the engine's weight-only quantization
        self.precision = {"fp32": "32-true", "fp16": "16-true"}.get(mode, "bf16-true")

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        return module.to(dtype=self.dtype)

    @contextmanager
    def module_init_context(self) -> Generator[None, None, None]:
        default = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(default)

    @override
    def convert_input(self, data):
        # Token ids and masks are integers and stay as they are; float inputs follow the model dtype.
        return apply_to_collection(data, torch.Tensor, self._cast_float)

    def _cast_float(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if t.is_floating_point() else t
