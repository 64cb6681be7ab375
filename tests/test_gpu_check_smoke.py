"""``benchmarks/gpu_check.py --cpu-smoke``: the one-command GPU check runs every part (kernel cases, CUDA-graph decode
emulated, the end-to-end decode comparison, the offload check) at tiny sizes on the CPU (the kernels in the Triton
interpreter), so a GPU session does not spend its minutes on a broken script."""
import importlib.util
import os
import subprocess
import sys

from multiproc import clean_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_cpu_smoke():
    env = clean_env(PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)                # the script sets it before triton is imported
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--cpu-smoke"],
                         env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "FAIL" not in out, out[-4000:]
    assert out.count("ok    graphs") == 3 and sum(line.startswith("ok    offload ") and " on cpu: " in line for line in out.splitlines()) == 6
    # ours: 2 tiers x 2 batches; accelerate: 2 batches, or one "not installed" row (the test extra has no accelerate)
    rows = 6 if importlib.util.find_spec("accelerate") is not None else 5
    assert f"ok    offload throughput: {rows} rows" in out
    # the decode comparison's six row kinds (bf16, unfused, heuristic configs, int8, HF eager, HF static cache)
    assert "ok    tune: 12 configs, 12 rows" in out and "ok    decode comparison with a tuned table: 6 rows" in out
