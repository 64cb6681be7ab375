"""Compile every Triton kernel the kernel tests launch for a CUDA target, on a machine with no GPU.

    python tools/compile_check.py [--arch 90] [pytest args...]

The interpreter (``TRITON_INTERPRET=1``, how the CPU suite runs the kernels) is permissive: it accepts code that the
real compiler rejects (``tl.dot`` below 16 rows, scalar/tensor type clashes in loops, unsupported casts). This
script runs ``pytest tests/kernels`` with a fake CUDA driver: each launch compiles the kernel for ``sm_<arch>``
through Triton's own pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with ptxas) and returns without running it.
Test outcomes are ignored (nothing runs, so outputs stay poisoned); what it reports is every distinct kernel
specialisation compiled and every compile error. Exit code 1 on any compile error.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ["TRITON_INTERPRET"] = "0"
os.environ["DSINFER_KERNEL_COMPILE_ONLY"] = "1"

compiled: dict[str, int] = {}
errors: list[tuple[str, str]] = []


class Plugin:
    """pytest plugin: installs the fake driver before the kernel modules import triton's JIT."""

    def __init__(self, arch: int):
        self.arch = arch

    def pytest_configure(self, config):
        import triton
        from triton.backends.compiler import GPUTarget
        import triton.runtime.jit as jit_mod
        from triton.runtime.jit import JITFunction

        arch = self.arch
        real = triton.backends.backends["nvidia"].driver

        class FakeCuda(real):   # the CUDA driver's type mapping, no device
            def __init__(self):
                pass

            def get_current_device(self):
                return 0

            def get_current_stream(self, device=None):
                return 0

            def get_current_target(self):
                return GPUTarget("cuda", arch, 32)

        jit_mod.driver.set_active(FakeCuda())
        run, do_compile = JITFunction.run, JITFunction._do_compile

        def compile_only_run(self, *args, grid, warmup, **kwargs):
            return run(self, *args, grid=grid, warmup=True, **kwargs)

        def recording_compile(self, key, signature, device, constexprs, options, attrs, warmup):
            name = f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}"
            label = f"{name} {signature} {constexprs}"
            try:
                kernel = do_compile(self, key, signature, device, constexprs, options, attrs, warmup)
            except Exception as exc:
                errors.append((label, f"{type(exc).__name__}: {str(exc)[-1500:]}"))
                raise
            compiled[name] = compiled.get(name, 0) + 1
            return kernel

        JITFunction.run = compile_only_run
        JITFunction._do_compile = recording_compile
        from lightning_dsinfer.kernels import ops
        ops._CPU_TRITON_OK = True   # ops.force_triton(): CPU tensors reach the kernels (which only compile)


def main() -> int:
    args = sys.argv[1:]
    arch = 90
    if args[:1] == ["--arch"]:
        arch, args = int(args[1]), args[2:]
    import pytest
    import torch

    sys.path.insert(0, str(REPO))
    t0 = time.time()
    rc = pytest.main(["-q", "--tb=no", "-p", "no:cacheprovider", "--no-header", "-rN", "-o", "addopts=",
                 *(args or [str(REPO / "tests" / "kernels")])], plugins=[Plugin(arch)])
    if rc not in (0, 1):   # 1: tests failed, expected (nothing ran); anything else: pytest itself broke
        errors.append(("pytest", f"exit code {rc}"))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check import cases   # the benchmark's shapes (Llama-3-8B-like), whose block sizes the tests don't reach
    from lightning_dsinfer.kernels import ops
    with ops.force_triton():
        for kernel, shape, fn, _, _ in cases("cpu"):
            try:
                fn()
            except Exception as exc:
                if not any(label.startswith(kernel) for label, _ in errors):
                    errors.append((f"gpu_check case {kernel} {shape}", f"{type(exc).__name__}: {str(exc)[-800:]}"))
    from tune_gemm import candidates   # every config benchmarks/tune_gemm.py may pick, on aligned sizes
    from lightning_dsinfer.kernels import reference as ref
    from lightning_dsinfer.kernels.small_gemm import small_gemm, small_gemm_int8
    w = torch.randn(64, 2048, dtype=torch.bfloat16)
    q8, s8 = ref.quantize_int8_per_channel(w)
    for m in (1, 2, 4, 8, 16, 32):
        x = torch.randn(m, 2048, dtype=torch.bfloat16)
        for cfg in candidates(m):
            for split_k in (1, 4):
                try:
                    small_gemm(x, w, **{**cfg, "split_k": split_k})
                    small_gemm_int8(x, q8, s8, **{**cfg, "split_k": split_k})
                except Exception as exc:
                    errors.append((f"tune candidate m{m} {cfg}", f"{type(exc).__name__}: {str(exc)[-800:]}"))
    print(f"\ncompile_check sm_{arch}: {sum(compiled.values())} specialisations of {len(compiled)} kernels compiled "
          f"in {time.time() - t0:.0f}s; {len(errors)} compile errors")
    for name, n in sorted(compiled.items()):
        print(f"  ok   {name}: {n}")
    seen = set()
    for label, err in errors:
        if (label, err) in seen:
            continue
        seen.add((label, err))
        print(f"  FAIL {label}\n       {err}")
    return 1 if errors or not compiled else 0


if __name__ == "__main__":
    sys.exit(main())
