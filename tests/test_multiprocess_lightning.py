"""Multi-process trainer.predict and failure handling (subprocesses with a hard timeout)."""
import json
import os
import subprocess
import sys

import pytest

from multiproc import clean_env, free_port, run_ranks

HERE = os.path.dirname(os.path.abspath(__file__))


def _run_script(args, env_extra=None, timeout=240):
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE]),
           **(env_extra or {})}
    return subprocess.Popen([sys.executable, os.path.join(HERE, "lightning_worker.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs, timeout):
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("multi-process predict did not finish in time:\n" + "\n".join(o or "" for o in outs))
    return [p.returncode for p in procs], outs


def _results(out_path):
    """Each rank's result file (the launcher's children share the parent's stdout, so lines interleave)."""
    return [json.loads(f.read_text()) for f in sorted(out_path.parent.glob(out_path.name + ".result*"))]


def test_tp2_via_lightning_launcher(tmp_path):
    out = tmp_path / "r.json"
    codes, outs = _finish([_run_script(["--devices", "2", "--out", str(out), "--family", "qwen3"])], 240)
    assert codes == [0], outs[0][-3000:]
    res = json.loads(out.read_text())
    assert (res["world"], res["tp"], res["dp"], res["rows"], res["match"]) == (2, 2, 1, 7, True)


def test_expert_parallel_via_lightning_launcher(tmp_path):
    """Trainer(devices=2, strategy=DSInferStrategy(expert_parallel=True)) on a Mixtral: each rank holds 2 of the 4
    experts whole (rank 1's first expert is 2 in every layer); predictions = HF's, in order."""
    out = tmp_path / "r.json"
    codes, outs = _finish([_run_script(["--devices", "2", "--out", str(out), "--family", "mixtral",
                                        "--expert-parallel"])], 240)
    assert codes == [0], outs[0][-3000:]
    results = _results(out)
    assert [r["first_experts"] for r in results] == [[0, 0], [2, 2]]
    assert all(r["tp"] == 2 and r["rows"] == 7 and r["match"] for r in results)


def test_dp2_x_tp2_seven_prompts_in_order_and_writers_write_once(tmp_path):
    out = tmp_path / "r.json"
    codes, outs = _finish([_run_script(["--devices", "4", "--tp", "2", "--out", str(out)])], 300)
    assert codes == [0], outs[0][-3000:]
    results = _results(out)
    assert len(results) == 4 and all(r["rows"] == 7 and r["match"] and r["dp"] == 2 for r in results)
    written = []
    for f in tmp_path.glob("r.json.rank*"):
        written += [int(x) for x in f.read_text().split()]
    assert sorted(written) == list(range(7))              # each sample written exactly once


def test_two_simulated_nodes(tmp_path):
    out = tmp_path / "r.json"
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [_run_script(["--devices", "2", "--num-nodes", "2", "--out", str(out)], {**env, "NODE_RANK": str(n)})
             for n in (0, 1)]
    codes, outs = _finish(procs, 300)
    assert codes == [0, 0], "\n".join(o[-2000:] for o in outs)
    results = _results(out)
    assert {r["rank"] for r in results} == {0, 1, 2, 3}
    assert all(r["tp"] == 2 and r["dp"] == 2 and r["rows"] == 7 and r["match"] for r in results)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])   # bf16: the decode step's all-reduces are called from C
def test_dead_rank_makes_peer_fail_fast(dtype):
    """The surviving rank gives up within seconds of its peer's death, not after the collective timeout (120 s here):
    the shared-memory all-reduce looks the waited-for rank's pid up every 50 ms; gloo sees the closed connection."""
    timeout_s, kill_after = 120, 3
    codes, outs, elapsed = run_ranks("fault_worker.py", 2, [str(timeout_s), dtype], timeout=100,
                                     kill_rank_after=(1, kill_after, "READY"))
    assert "READY" in outs[0], outs[0][-3000:]
    assert codes[0] not in (0, None) and codes[1] != 0
    assert elapsed < 10, f"peer took {elapsed:.0f}s to give up"
    assert "peer rank" in outs[0], outs[0][-3000:]
