"""Shared by tests/test_cpu_stack.py and its TP worker: one generate through the C decode step, one through the
per-op path, recording what the decoder returned at every call."""
import torch

from lightning_dsinfer.modules.cpu_stack import CpuDecodeStack


def run_both_paths(opt, ids, mask, new_tokens: int):
    """{"stack": ..., "ops": ...} of (tokens, hidden states of every decoder call, all-reduce calls, decode steps the
    C loop ran). "ops" switches the stack off (``decoder._stack = None``)."""
    dec = opt._dsinfer_engine.decoder
    comm = opt._dsinfer_engine.comm
    runs = {}
    for path in ("stack", "ops"):
        dec._stack = False if path == "stack" else None
        hidden, ran = [], [0]
        real_hidden, real_call = type(dec).hidden, CpuDecodeStack.__call__

        def record(h, step):
            out = real_hidden(dec, h, step)
            hidden.append(out)
            return out

        def counted(self, h, step):
            ran[0] += 1
            return real_call(self, h, step)

        dec.hidden = record
        CpuDecodeStack.__call__ = counted
        try:
            calls = comm.all_reduce_calls
            tokens = opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
            runs[path] = (tokens, hidden, comm.all_reduce_calls - calls, ran[0])
        finally:
            CpuDecodeStack.__call__ = real_call
            del dec.hidden
    dec._stack = False
    return runs
