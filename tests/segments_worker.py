"""Several worker runs in one launch of the ranks (``multiproc.run_segments``): starting a rank (torch, transformers and
Lightning imports) costs seconds of CPU, the tiny models' work a fraction of that, so tests whose runs share a world
size share one launch.

    segments_worker.py SCRIPT ARGS... [--then SCRIPT ARGS...]...

Each run is the worker script run as ``__main__`` in this process with its own ``sys.argv``, in order, under the one
process group its first ``init_inference`` creates (as a worker's own list of families already shares it). Its output
follows a line ``=== segment I``, and ``=== segment I ok`` ends it when it finished; a run that exits non-zero or
raises ends the launch there (``=== segment I exit CODE``): the ranks stay in step, the later runs are not started.
``--expect-error TEXT`` before a SCRIPT: that run must raise an exception whose message holds TEXT (a refusal before
any work); it prints ``refused: <type>: <message>``, then ``=== segment I refused``, and the next run starts.
Process-wide settings a run changes (a patched ``os.posix_fallocate``, warning filters) are put back before the
next. A run still going after $SEGMENT_TIMEOUT_S seconds (default 300) ends the launch, its threads' stacks printed;
so does an exit after the last run that takes as long (the non-daemon threads a run leaves are named after it)."""
import faulthandler
import os
import runpy
import sys
import threading
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))


def segments(argv):
    out, cur = [], []
    for a in argv:
        if a == "--then":
            out.append(cur)
            cur = []
        else:
            cur.append(a)
    out.append(cur)
    return out


def _left_running(before, grace_s=10.0):
    """The non-daemon threads started since ``before`` still running after ``grace_s`` seconds (a collection first:
    threads a run's objects stop when freed), but idle ``concurrent.futures`` workers (their exit hook stops them)."""
    import gc
    import time

    gc.collect()
    pools = getattr(sys.modules.get("concurrent.futures.thread"), "_threads_queues", {})
    end = time.monotonic() + grace_s
    left = [t for t in threading.enumerate() if t not in before and not t.daemon and t not in pools]
    for t in left:
        t.join(max(0.0, end - time.monotonic()))
    return [t for t in left if t.is_alive()]


def main():
    timeout_s = float(os.environ.get("SEGMENT_TIMEOUT_S", "300"))
    for i, seg in enumerate(segments(sys.argv[1:])):
        expect = None
        if seg[0] == "--expect-error":
            expect, seg = seg[1], seg[2:]
        print(f"=== segment {i}", flush=True)
        fallocate = getattr(os, "posix_fallocate", None)
        code, status = 0, "ok"
        faulthandler.dump_traceback_later(timeout_s, exit=True)
        threads = set(threading.enumerate())
        try:
            with warnings.catch_warnings():
                sys.argv = [os.path.join(HERE, seg[0]), *seg[1:]]
                runpy.run_path(sys.argv[0], run_name="__main__")
            if expect is not None:
                print(f"no error: expected one with {expect!r}", flush=True)
                code = 1
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception as exc:        # noqa: BLE001 - a refusal, or the run's failure (printed)
            if expect is not None and expect in str(exc):
                print(f"refused: {type(exc).__name__}: {exc}", flush=True)
                status = "refused"
            else:
                traceback.print_exc()
                code = 1
        finally:
            faulthandler.cancel_dump_traceback_later()
            if fallocate is not None:
                os.posix_fallocate = fallocate
        left = [] if code else _left_running(threads)
        if left:   # a worker process of its own would wait for them at its exit: this run failed
            print(f"non-daemon threads this run left running: {[t.name for t in left]}", flush=True)
            faulthandler.dump_traceback(all_threads=True)
            code = 1
        sys.stdout.flush()
        if code:
            print(f"=== segment {i} exit {code}", flush=True)
            sys.stderr.flush()
            os._exit(code)          # (not waiting for what the failed run left running)
        print(f"=== segment {i} {status}", flush=True)
    faulthandler.dump_traceback_later(timeout_s, exit=True)    # the exit too (threads it waits for): stacks, exit 1


if __name__ == "__main__":
    main()
