"""The kernels package itself: availability probe and import safety without Triton."""
import os
import subprocess
import sys
from pathlib import Path

from lightning_dsinfer.kernels import triton_available

REPO = Path(__file__).resolve().parents[2]


def test_triton_available_matches_mode():
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if interp:
        assert triton_available("cpu")
    else:
        import torch
        assert triton_available("cuda") == torch.cuda.is_available()
        assert not triton_available("cpu")


def test_package_imports_when_triton_is_broken():
    # sys.modules["triton"] = None makes every "import triton" raise ImportError.
    code = ("import sys; sys.modules['triton'] = None\n"
            "import lightning_dsinfer\n"
            "from lightning_dsinfer.kernels import triton_available\n"
            "assert not triton_available('cuda')\n"
            "assert not any(m.startswith('triton') and sys.modules[m] is not None for m in sys.modules)\n"
            "print('ok')")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
