"""Run a worker script as N ranks (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT), with a hard timeout.

If any rank fails or the time runs out, every rank still alive is killed and the outputs are returned
for the assertion message: a multi-process test never hangs the suite.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time


# Set by Lightning's launcher / cluster environment in the pytest process when an earlier test ran a
# Trainer; a child must not inherit them (it would join a stale world).
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
                  "MASTER_PORT", "PL_GLOBAL_SEED", "PL_TRAINER_GPUS")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collect(stream, lines: list[str]) -> None:
    for line in iter(stream.readline, ""):
        lines.append(line)
    stream.close()


def run_ranks(script: str, world_size: int, args: list[str], timeout: float = 240, extra_env: dict | None = None,
              kill_rank_after: tuple[int, float, str] | None = None):
    """Returns (returncodes, outputs, seconds). ``kill_rank_after=(rank, s, marker)`` kills that rank s seconds after
    ``marker`` appears in rank 0's output (so a slow start, a kernel build say, does not kill it early); the seconds
    returned then count from the kill."""
    port = free_port()
    procs = []
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    for rank in range(world_size):
        env = {**clean_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([root, here, os.environ.get("PYTHONPATH", "")]), **(extra_env or {})}
        procs.append(subprocess.Popen([sys.executable, os.path.join(here, script), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    lines: list[list[str]] = [[] for _ in procs]      # read as they come (a full pipe would block a rank)
    readers = [threading.Thread(target=_collect, args=(p.stdout, out), daemon=True) for p, out in zip(procs, lines)]
    for r in readers:
        r.start()
    start = time.monotonic()
    killed, marked = None, None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        elapsed = now - start
        if kill_rank_after and marked is None and kill_rank_after[2] in "".join(lines[0]):
            marked = now
        if kill_rank_after and killed is None and marked is not None and now - marked > kill_rank_after[1]:
            procs[kill_rank_after[0]].kill()
            killed = now
        failed = any(p.poll() not in (None, 0) for p in procs) and not kill_rank_after
        if elapsed > timeout or failed:
            time.sleep(0.5 if failed else 0)
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.05)
    for p, r in zip(procs, readers):
        p.wait()
        r.join(timeout=10)
    outputs = ["".join(out) for out in lines]
    return [p.returncode for p in procs], outputs, time.monotonic() - (killed if killed is not None else start)
