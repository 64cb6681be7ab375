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


def assert_quantised_decode_steps(ref, opt, ids, mask, want_tokens, kind: str, steps: int = 8) -> None:
    """bf16 decode-shaped steps of a quantised engine (3 rows: the int8 / int4 kernel, not the prompt's dequantised
    GEMM) over HF's greedy continuation ``want_tokens``, one token at a time through the returned cache: each step's
    logits within the bf16 tolerance of ``ref`` (HF over the same quantise-dequantised weights; the prompt's GEMM
    multiplies bf16-rounded weights as HF does, the kernels apply the fp32 scales after the sums instead: two
    roundings of the same weights, so greedy tokens may part at a near-tie, which the fp32 tests rule out). Then, with
    AVX512, the one-call C decode step runs the quantised blocks bit-identical to the per-op path."""
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], steps, dtype=mask.dtype)], 1)
    with torch.no_grad():
        want_all = ref(input_ids=want_tokens, attention_mask=full_mask).logits
    t0 = ids.shape[1]
    out = opt(input_ids=ids, attention_mask=mask, use_cache=True)
    for j in range(steps):
        key = "cache" if getattr(out, "cache", None) is not None else "past_key_values"
        out = opt(input_ids=want_tokens[:, t0 + j:t0 + j + 1], attention_mask=full_mask[:, :t0 + j + 1],
                  use_cache=True, **{key: getattr(out, key)})
        torch.testing.assert_close(out.logits[:, -1].float(), want_all[:, t0 + j].float(), atol=6e-2, rtol=2e-2)
    from lightning_dsinfer.kernels import cpu_gemv

    if cpu_gemv.has_wide_ops():                       # the decode steps through the one-call C step, quantised too
        assert CpuDecodeStack.build(opt._dsinfer_engine.decoder) is not None, kind
        runs = run_both_paths(opt, ids, mask, new_tokens=6)
        (tok_s, hid_s, _, n_s), (tok_o, hid_o, _, n_o) = runs["stack"], runs["ops"]
        assert n_s == 5 and n_o == 0 and torch.equal(tok_s, tok_o)
        assert all(torch.equal(a, b) for a, b in zip(hid_s, hid_o))
