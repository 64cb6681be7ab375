"""Run a worker script as N ranks (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT), with a hard timeout.

If any rank fails or the time runs out, every rank still alive is killed and the outputs are returned
for the assertion message: a multi-process test never hangs the suite.

Several worker runs can share one launch of the ranks (:func:`run_segments`, ``segments_worker.py``); the test
modules' runs do, one launch per world size for the session (:class:`WorkerLaunches`, tests/conftest.py
``shared_runs``), since a rank's start-up costs more than a run of the tiny models.
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
              kill_rank_after: tuple[int, float, str] | None = None, stall: tuple[str, float] | None = None):
    """Returns (returncodes, outputs, seconds). ``kill_rank_after=(rank, s, marker)`` kills that rank s seconds after
    ``marker`` appears in rank 0's output (so a slow start, a kernel build say, does not kill it early); the seconds
    returned then count from the kill. ``stall=(prefix, s)``: every rank is killed when a rank still running has
    printed no line starting with ``prefix`` for s seconds (from the start, or its last such line)."""
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
    seen, last_mark = [0] * world_size, [start] * world_size     # (stall) lines looked at, last marker line's time
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        elapsed = now - start
        stalled = False
        if stall:
            for r, p in enumerate(procs):
                n = len(lines[r])
                if any(line.startswith(stall[0]) for line in lines[r][seen[r]:n]):
                    last_mark[r] = now
                seen[r] = n
                stalled |= p.poll() is None and now - last_mark[r] > stall[1]
        if kill_rank_after and marked is None and kill_rank_after[2] in "".join(lines[0]):
            marked = now
        if kill_rank_after and killed is None and marked is not None and now - marked > kill_rank_after[1]:
            procs[kill_rank_after[0]].kill()
            killed = now
        failed = any(p.poll() not in (None, 0) for p in procs) and not kill_rank_after
        if elapsed > timeout or failed or stalled:
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


def run_segments(world_size: int, segments: list[list[str]], timeout_per_run: float = 300,
                 extra_env: dict | None = None):
    """Several worker runs one after the other in one launch of ``world_size`` ranks (``segments_worker.py``): the
    ranks' start-up (imports: seconds of CPU each) is paid once. ``segments``: command lines ``[script, *args]``, or
    ``["--expect-error", text, script, *args]`` for a run that must be refused. A rank still in one run (or, after
    its last, still not exited) ``timeout_per_run`` seconds after that run started ends the launch: the ranks time
    themselves out (faulthandler, stacks printed) and this process kills them 30 s later if they did not. Returns
    (returncodes, per rank a list of (status, output) per segment: status "ok" or "refused" when the run ended so,
    "exit N" when it failed, "started" when the launch ended inside it, None when the launch did not get there, and
    the ranks' whole outputs)."""
    args: list[str] = []
    for i, seg in enumerate(segments):
        args += (["--then"] if i else []) + list(seg)
    env = {"SEGMENT_TIMEOUT_S": str(timeout_per_run), **(extra_env or {})}
    codes, outs, _ = run_ranks("segments_worker.py", world_size, args, timeout=timeout_per_run * len(segments) + 60,
                               extra_env=env, stall=("=== segment ", timeout_per_run + 30))
    per_rank = []
    for out in outs:
        parts: list[list] = [[None, ""] for _ in segments]
        cur = None
        for line in out.splitlines(keepends=True):
            words = line.split()
            if len(words) >= 3 and words[:2] == ["===", "segment"] and words[2].isdigit():
                cur = int(words[2])
                parts[cur][0] = " ".join(words[3:]) or "started"
                continue
            if cur is not None:
                parts[cur][1] += line
        per_rank.append([tuple(p) for p in parts])
    return codes, per_rank, outs


class SharedLaunch:
    """Worker runs of several tests in one launch of ``world_size`` ranks (:func:`run_segments`), in the order of
    ``runs`` ({key: command line}); the launch starts when a test first asks for a run's output.

    Each run's result is its own: the runs every rank finished are recorded as they ended; the first run that some
    rank did not finish (it failed, timed out, or a rank died in it) owns the end of the launch and fails its test,
    with the ranks' output of that run; the runs after it are not recorded, and a test asking for one of them starts
    a new launch of the runs not yet recorded. A launch that ends between two runs (a rank died or hung after its
    run's end: exiting, threads left behind) fails the run before; the last run also owns the launch's exit codes,
    as a run of its own would: every rank must exit 0."""

    DONE = ("ok", "refused")

    def __init__(self, world_size: int, runs: dict, timeout_per_run: float = 300, extra_env: dict | None = None):
        self.world_size, self.runs, self.timeout, self.extra_env = world_size, dict(runs), timeout_per_run, extra_env
        self.results: dict = {}        # key: (per rank (status, output), a note on the failure or None)

    def _launch(self, key: str) -> None:
        pending = [k for k in self.runs if k not in self.results]
        codes, per_rank, outs = run_segments(self.world_size, [self.runs[k] for k in pending], self.timeout,
                                             self.extra_env)

        def note(k, what):
            before = pending[:pending.index(k)] if k in pending else pending
            return (f"{what}; launch exit codes {codes}; the runs before it in this launch of {self.world_size} "
                    f"ranks: {before or 'none'}\n--- the ranks' last output:\n"
                    + "\n".join(f"[rank {r}] {out[-2000:]}" for r, out in enumerate(outs)))

        for i, k in enumerate(pending):
            ranks = [rank[i] for rank in per_rank]
            if all(status in self.DONE for status, _ in ranks):
                self.results[k] = (ranks, None)
                continue
            if any(status is not None for status, _ in ranks):
                self.results[k] = (ranks, note(k, "this run did not end in every rank"))
            elif i:                     # every rank ended the run before, and the launch ended before this one
                prev = pending[i - 1]
                self.results[prev] = (self.results[prev][0], note(prev, "the launch ended after this run"))
            else:                       # the launch failed before its first run
                self.results[key] = ([(None, "")] * self.world_size, note(key, "the launch ended before any run"))
            return
        if any(code != 0 for code in codes):   # every run ended, the ranks' exit did not
            last = pending[-1]
            self.results[last] = (self.results[last][0], note(last, "the ranks did not exit 0 after this last run"))

    def outputs(self, key: str) -> list[str]:
        """Each rank's output of run ``key``; fails the calling test unless that run ended as it should in every
        rank ("ok", or "refused" for an ``--expect-error`` run)."""
        import pytest

        while key not in self.results:
            self._launch(key)
        ranks, failure = self.results[key]
        want = "refused" if self.runs[key][0] == "--expect-error" else "ok"
        if failure or any(status != want for status, _ in ranks):
            pytest.fail(f"run {key!r}: " + (failure.split(";")[0] + "; " if failure else "")
                        + f"the ranks' ends of it: {[status for status, _ in ranks]}, each should be {want!r}\n"
                        + "\n".join(f"--- rank {r}'s output of this run:\n{out[-3000:]}"
                                    for r, (_, out) in enumerate(ranks))
                        + ("\n--- " + failure if failure else ""), pytrace=False)
        return [out for _, out in ranks]


class WorkerLaunches:
    """The session's multi-process worker runs, one :class:`SharedLaunch` per world size: every test module that
    defines ``worker_runs(tmp, selected)`` -> {world size: {key: command line}} (a key: a test's name, parameters
    included, or ``name/part``; ``tmp``: a folder of the module's own; ``selected``: the names of its tests this
    session runs, for what a run needs prepared) adds the runs of its selected tests, modules in collection order. A
    rank's start-up (torch, transformers, Lightning imports) costs more than a run of the tiny models, so the runs
    share the ranks' start-up instead of paying it per test."""

    def __init__(self, session, tmp_path_factory):
        self.session, self.tmp_path_factory = session, tmp_path_factory
        self.launches: dict[int, SharedLaunch] | None = None
        self.tmp: dict = {}
        self.errors: dict = {}          # module: its worker_runs' traceback (its tests fail with it, no one else's)

    def _collect(self):
        import traceback

        runs, modules, selected = {}, [], {}
        for item in self.session.items:
            module = getattr(item, "module", None)
            if module is None or not hasattr(module, "worker_runs") or _skipped(item):
                continue
            if module not in selected:
                modules.append(module)
                selected[module] = set()
            selected[module].add(item.name)
        for module in modules:
            tmp = self.tmp[module] = self.tmp_path_factory.mktemp(module.__name__.rsplit(".", 1)[-1] + "_runs")
            try:
                module_runs = {world: {key: argv for key, argv in by_key.items()
                                       if key.split("/")[0] in selected[module]}
                               for world, by_key in module.worker_runs(tmp, selected[module]).items()}
            except Exception:           # noqa: BLE001 - a module's preparation (a checkpoint to save, say) failed
                self.errors[module] = traceback.format_exc()
                continue
            for world, by_key in module_runs.items():
                for key, argv in by_key.items():
                    runs.setdefault(world, {})[f"{module.__name__}::{key}"] = argv
        self.launches = {world: SharedLaunch(world, r) for world, r in runs.items()}

    def view(self, module) -> "ModuleRuns":
        if self.launches is None:
            self._collect()
        return ModuleRuns(self, module)


def _skipped(item) -> bool:
    """A test its skip / skipif marks will skip (its runs are not started)."""
    try:
        from _pytest.skipping import evaluate_skip_marks
    except ImportError:        # (pytest's own helper; without it every selected test counts)
        return False
    return evaluate_skip_marks(item) is not None


class ModuleRuns:
    """One test module's view of :class:`WorkerLaunches`: ``outputs(world, key)``, ``argv(world, key)``, ``tmp``."""

    def __init__(self, launches: WorkerLaunches, module):
        self._launches, self._module, self._name = launches, module, module.__name__
        self.tmp = launches.tmp.get(module)

    def _launch(self, world: int, key: str) -> SharedLaunch:
        import pytest

        if self._module in self._launches.errors:
            pytest.fail(f"{self._name}.worker_runs failed:\n{self._launches.errors[self._module]}", pytrace=False)
        launch = self._launches.launches.get(world)
        if launch is None or f"{self._name}::{key}" not in launch.runs:
            pytest.fail(f"{self._name}.worker_runs lists no run {key!r} of {world} ranks for the selected tests",
                        pytrace=False)
        return launch

    def argv(self, world: int, key: str) -> list[str]:
        return self._launch(world, key).runs[f"{self._name}::{key}"]

    def outputs(self, world: int, key: str) -> list[str]:
        return self._launch(world, key).outputs(f"{self._name}::{key}")
