"""Kernels: one op per file (Triton kernel + launcher); ``reference.py`` is the pure-torch twin of each.

Nothing here imports Triton eagerly: ``import lightning_dsinfer`` must work where Triton does not.
Import a kernel module (``from lightning_dsinfer.kernels import rms_norm``) only after
:func:`triton_available` says yes.
"""
from __future__ import annotations

import os

import torch


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def triton_available(device: torch.device | str | None = None) -> bool:
    """True when the Triton kernels can run on tensors living on ``device``.

    That is: Triton imports and either the device is CUDA (with a GPU present) or the Triton
    interpreter is on (``TRITON_INTERPRET=1``, any device; used by the CPU tests).
    """
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else
        return False
    if _interpreting():
        return True
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type != "cuda":
        return False
    return torch.cuda.is_available()


__all__ = ["triton_available"]
