"""Run a worker script as N ranks (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT), with a hard timeout.

If any rank fails or the time runs out, every rank still alive is killed and the outputs are returned
for the assertion message: a multi-process test never hangs the suite.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
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


def run_ranks(script: str, world_size: int, args: list[str], timeout: float = 240, extra_env: dict | None = None,
              kill_rank_after: tuple[int, float] | None = None):
    """Returns (returncodes, outputs, seconds). ``kill_rank_after=(rank, s)`` kills that rank after s seconds."""
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
    start = time.monotonic()
    killed = False
    while any(p.poll() is None for p in procs):
        elapsed = time.monotonic() - start
        if kill_rank_after and not killed and elapsed > kill_rank_after[1]:
            procs[kill_rank_after[0]].kill()
            killed = True
        failed = any(p.poll() not in (None, 0) for p in procs) and not kill_rank_after
        if elapsed > timeout or failed:
            time.sleep(0.5 if failed else 0)
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.05)
    outputs = [p.communicate()[0] for p in procs]
    return [p.returncode for p in procs], outputs, time.monotonic() - start
