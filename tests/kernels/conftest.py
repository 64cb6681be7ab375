"""Kernel tests: run the Triton kernels on CUDA when a GPU is present, else in the Triton interpreter.

TRITON_INTERPRET must be set before ``triton`` is first imported (``@triton.jit`` reads it when a kernel
is defined), so it is set here, at conftest import, before any test module imports a kernel file.
Every ``torch.empty`` / ``torch.empty_like`` made during a test is poisoned (NaN for floats, a sentinel
for integers) so an output element a kernel forgets to write fails the comparison.
"""
import os

import torch

if not torch.cuda.is_available() and os.environ.get("DSINFER_KERNEL_COMPILE_ONLY") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from lightning_dsinfer.kernels import interpreter  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    interpreter.install()       # a launch patches triton.language once, not once per helper call (see its docstring)

_empty, _empty_like = torch.empty, torch.empty_like
# ``with torch.device(...)`` recognises factory functions from a set torch builds (and caches) on its first use;
# built while the poisoned factories below are in place, it would hold them instead of torch.empty, and every
# later ``with torch.device("meta")`` in the session would build real tensors. Build it now, unpatched.
import torch.utils._device  # noqa: E402

torch.utils._device._device_constructors()


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(-1 if t.dtype not in (torch.uint8,) else 0xAB)


def _poisoned_empty(*args, **kwargs):
    return _poison(_empty(*args, **kwargs))


def _poisoned_empty_like(*args, **kwargs):
    return _poison(_empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(torch, "empty", _poisoned_empty)
    monkeypatch.setattr(torch, "empty_like", _poisoned_empty_like)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
