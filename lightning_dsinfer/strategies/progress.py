"""A predict progress bar that shows generated tokens per second."""
from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override


def _new_tokens(outputs: Any, batch: Any) -> int:
    """Generated tokens in one predict batch: rows x (output length - prompt length)."""
    if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2:
        return 0
    prompt = batch.get("input_ids") if isinstance(batch, dict) else None
    t0 = prompt.shape[1] if isinstance(prompt, torch.Tensor) else 0
    return outputs.shape[0] * max(outputs.shape[1] - t0, 0)


class TokensPerSecondProgressBar(TQDMProgressBar):
    """TQDM bar for ``trainer.predict`` whose postfix is the running generated-tokens/s."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tokens = 0
        self.elapsed = 0.0
        self._start = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0

    @override
    def on_predict_start(self, trainer, pl_module) -> None:
        super().on_predict_start(trainer, pl_module)
        self.tokens, self.elapsed = 0, 0.0

    @override
    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_predict_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        self._start = time.perf_counter()

    @override
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.elapsed += time.perf_counter() - self._start
        self.tokens += _new_tokens(outputs, batch)
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self.predict_progress_bar.set_postfix({"tok/s": f"{self.tokens_per_second:.1f}"}, refresh=False)
