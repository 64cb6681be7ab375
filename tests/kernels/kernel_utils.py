"""Shared parameter rows for the kernel tests (imported by the test modules; conftest runs first)."""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# tools/compile_check.py: every launch compiles for a CUDA target (fake driver) and returns without running
COMPILE_ONLY = os.environ.get("DSINFER_KERNEL_COMPILE_ONLY") == "1"
# CPU tensors go through the kernels (ops.force_triton) when they can run (interpreter) or only compile
FORCE_TRITON = INTERPRET or COMPILE_ONLY
# The interpreter runs on CPU tensors; a real launch needs CUDA. One process runs one mode because
# @triton.jit picks interpreter or compiler when the kernel is defined (see conftest).
DEVICES = ["cpu"] if FORCE_TRITON else (["cuda"] if torch.cuda.is_available() else [])

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def device_params():
    if not DEVICES:
        return [pytest.param("none", marks=pytest.mark.skip(reason="no CUDA and TRITON_INTERPRET unset"))]
    return DEVICES


def bf16_ok(device: str) -> bool:
    return device != "cuda" or torch.cuda.is_bf16_supported()


def assert_close(actual, expected, atol, rtol, msg=""):
    """Like torch.testing.assert_close, but NaN anywhere in ``actual`` (a poisoned, unwritten element) fails."""
    assert not torch.isnan(actual.float()).any(), f"NaN in kernel output (unwritten element?) {msg}"
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol)
