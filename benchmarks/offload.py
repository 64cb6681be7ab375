"""NVMe offload: lightning-dsinfer's disk tier vs accelerate's disk offload, side by side in one process.

A from_config Llama (~1 GB in bf16) is saved once as a safetensors checkpoint. Both systems get the same
memory budget (``--budget``, a quarter of the model or less), the same prompts and batch sizes:

- ours: ``init_inference(model_on_meta, checkpoint=..., offload="nvme", offload_path=..., max_memory=budget)``
- accelerate: ``from_pretrained(..., device_map="auto", max_memory={"cpu": budget}, offload_folder=...)``
- also ours with raw (unpacked) unit files and ours with int8 weights (``quantize="int8"``: lossy, so not a
  like-for-like row against accelerate; shown for what the disk tier does with half the bytes)

Cold cache: the page cache is dropped for the checkpoint and both offload folders before every
measurement (``posix_fadvise(DONTNEED)``), and for accelerate again before every generated token (it
reads through the page cache, which would otherwise hold the whole model after the first token on a
machine with enough RAM; ours reads with O_DIRECT and never uses it).

Printed per run: new tokens/s (prompt included: N tokens = 1 prefill + N-1 decode passes), peak RSS growth
over the process's resident memory before the run (VmHWM, reset per run), achieved weight-read bandwidth
against the disk's O_DIRECT sequential read bandwidth over the same files right before and after the run (a
virtual disk's bandwidth moves from minute to minute; for accelerate, the checkpoint read the same way around
each of its runs), and the overlap
(time per decode pass over max(transfer time, compute time); transfer time is the bytes read from disk per pass
at the disk's measured bandwidth, compute time is the same passes with the weights in RAM), and the
fraction of each decode pass during which the disk had a read outstanding (1.0: the disk never waited
for compute, whatever its speed that minute; a virtual disk's bandwidth varies from run to run). The last
rows divide the ratio by the ratio of the two runs' disk bandwidths (tokens/s per GB/s of disk: both systems
are disk-bound here, and the disk moves by up to 2x between minutes).

    pip install -e ".[bench]"                          # accelerate, for its disk offload
    python benchmarks/offload.py                       # ~1 GB model, budget 1/4
    python benchmarks/offload.py --record benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from common import add_llama_args, llama_config, markdown_table, record  # noqa: E402

MiB = 2**20


def ensure_checkpoint(args) -> str:
    from transformers import AutoModelForCausalLM

    ckpt = os.path.join(args.dir, "ckpt")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        pid = os.fork()                     # the writer's memory must not count as this process's peak
        if pid == 0:
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(llama_config(args), dtype=torch.bfloat16).save_pretrained(ckpt)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status:
            raise SystemExit("writing the checkpoint failed")
    return ckpt


def files_under(*folders):
    for folder in folders:
        for root, _, names in os.walk(folder):
            for n in names:
                yield os.path.join(root, n)


def drop_cache(*folders) -> None:
    for path in files_under(*folders):
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


PATTERNS = ((16 * MiB, 1), (4 * MiB, 4))     # O_DIRECT reads: (request size, requests in flight)


def disk_pattern(paths, repeats: int = 3) -> tuple[tuple[int, int], float]:
    """The pattern of PATTERNS this disk reads fastest (median of ``repeats`` passes over ``paths`` each) and
    its bandwidth. Chosen once: taking the better of two single passes for every reference would pick the
    luckier of two noisy numbers each time and bias the disk's bandwidth upwards."""
    speeds = {p: sorted(_direct_read(paths, *p) for _ in range(repeats))[repeats // 2] for p in PATTERNS}
    best = max(speeds, key=speeds.get)
    return best, speeds[best]


def direct_read_bandwidth(paths, pattern) -> float:
    """O_DIRECT sequential read bandwidth over the files ``paths`` (each front to back), one pass."""
    return _direct_read(paths, *pattern)


def _direct_read(paths, chunk: int, threads: int) -> float:
    from lightning_dsinfer.offload import aligned_empty

    bufs = [memoryview(aligned_empty(chunk).numpy()) for _ in range(threads)]
    total = 0
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        for path in paths:
            size = os.path.getsize(path) // 4096 * 4096
            if size == 0:
                continue
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)

            def work(k):                  # whole chunks, and the file's last part (smaller than a chunk) as one read
                for off in range(k * chunk, size, threads * chunk):
                    os.preadv(fd, [bufs[k][:min(chunk, size - off)]], off)

            list(ex.map(work, range(threads)))
            os.close(fd)
            total += size
    return total / (time.perf_counter() - t)


def rss(field="VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def prompts(batch, length, vocab):
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    return ids, torch.ones_like(ids)


def run(model, batch, args, folders, new, per_token_drop=False, store=None):
    """(seconds, peak VmHWM, disk busy seconds) of one cold-cache generate of ``new`` tokens."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class DropCache(LogitsProcessor):
        def __call__(self, input_ids, scores):
            drop_cache(*folders)
            return scores

    ids, mask = prompts(batch, args.prompt, args.vocab)
    extra = {"logits_processor": LogitsProcessorList([DropCache()])} if per_token_drop else {}
    gc.collect()
    drop_cache(*folders)
    reset_peak()
    busy = store.busy_time() if store is not None else 0.0
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             min_new_tokens=new, **extra)
    dt = time.perf_counter() - t
    busy = store.busy_time() - busy if store is not None else 0.0
    assert out.shape == (batch, args.prompt + new), out.shape
    return dt, rss("VmHWM"), busy


def measure(model, batch, args, folders, per_token_drop=False, store=None):
    """Prompt pass seconds (1 new token), decode seconds per pass ((t_N - t_1) / (N - 1)), new tokens/s over
    the whole N-token generate, the peak resident memory of these runs and (ours) the time per decode pass
    during which the disk had a read outstanding."""
    run(model, batch, args, folders, 2, per_token_drop)                  # warm-up of the shapes
    t1, p1, b1 = run(model, batch, args, folders, 1, per_token_drop, store)
    tn, pn, bn = run(model, batch, args, folders, args.new, per_token_drop, store)
    return {"prompt_s": t1, "decode_s": (tn - t1) / (args.new - 1), "tok_s": batch * args.new / tn,
            "decode_tok_s": batch * (args.new - 1) / (tn - t1), "peak": max(p1, pn),
            "busy_s": (bn - b1) / (args.new - 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=os.path.expanduser("~/.cache/dsinfer-bench/offload"))
    add_llama_args(p, hidden=1536, intermediate=4096, layers=16, heads=12, kv_heads=4)
    p.add_argument("--budget-fraction", type=float, default=0.25, help="max_memory as a fraction of the weights")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-accelerate", action="store_true")
    p.add_argument("--skip-raw", action="store_true", help="skip ours with raw (unpacked) unit files")
    p.add_argument("--skip-int8", action="store_true", help="skip ours with int8 weights (quantize='int8', lossy)")
    p.add_argument("--record", default=None, help="append the table to this RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    import lightning_dsinfer as dsi

    os.makedirs(args.dir, exist_ok=True)
    ckpt = ensure_checkpoint(args)
    ours_dir, acc_dir = os.path.join(args.dir, "ours"), os.path.join(args.dir, "accelerate")
    weight_bytes = sum(os.path.getsize(f) for f in files_under(ckpt) if f.endswith(".safetensors"))
    budget = int(weight_bytes * args.budget_fraction)
    pattern, disk = disk_pattern([f for f in files_under(ckpt) if f.endswith(".safetensors")])
    print(f"model {weight_bytes / MiB:.0f} MiB bf16, budget {budget / MiB:.0f} MiB, disk O_DIRECT read "
          f"{disk / 1e9:.2f} GB/s (checkpoint, before the runs; {pattern[1]} x {pattern[0] // MiB} MiB reads in "
          f"flight)", flush=True)

    def ours(tier, batch, compress=True, quantize=None):
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(llama_config(args), dtype=torch.bfloat16)
        folder = ours_dir + ("-int8" if quantize else "" if compress else "-raw")
        return dsi.init_inference(meta, checkpoint=ckpt, offload=tier, offload_path=folder, dtype=torch.bfloat16,
                                  max_memory=budget if tier == "nvme" else 8 * weight_bytes, max_batch_size=batch,
                                  max_seq_len=args.prompt + args.new, offload_compress=compress, quantize=quantize)

    rows, results, notes = [], {}, []
    base = rss()
    runs = [(b, b, True, None) for b in args.batch] + [("auto", None, True, None)]
    if not args.skip_raw:
        runs += [(f"raw {b}", b, False, None) for b in args.batch]
    if not args.skip_int8:
        runs += [(f"int8 {b}", b, True, "int8") for b in args.batch]
    for label, batch, compress, quantize in runs:
        reset_peak()
        model = ours("nvme", batch, compress, quantize)
        load_peak = rss("VmHWM") - base
        engine = model._dsinfer_engine
        ws, streamer = engine.working_set, engine.decoder.streamer
        b = ws.batch_size if batch is None else batch
        streamed = sum(streamer.store.stored_bytes(u) for u in streamer.order)        # bytes read from disk
        raw_bytes = sum(streamer.layouts[u].nbytes for u in streamer.order)
        # The virtual disk's bandwidth moves from minute to minute (burst credit): the reference for this run is
        # the same unit files read with O_DIRECT right before and right after it.
        unit_files = [streamer.store.path(u) for u in streamer.order]
        before = direct_read_bandwidth(unit_files, pattern)
        r = measure(model, b, args, [ckpt, ours_dir], store=streamer.store)
        after = direct_read_bandwidth(unit_files, pattern)
        r.update(load_peak=load_peak, streamed=streamed, batch=b, slots=ws.n_slots, resident=len(streamer.resident),
                 disk=(before + after) / 2, packed=streamer.store.compress, quantize=quantize)
        results[label] = r
        packing = (f"{streamed / MiB:.0f} MiB read per pass ({raw_bytes / MiB:.0f} MiB of weights, packed)"
                   if streamer.store.compress else f"{streamed / MiB:.0f} MiB read per pass (raw units)")
        note = (f"ours{' int8' if quantize else '' if compress else ' raw'} batch {b}{' (its throughput batch)' if batch is None else ''}: "
                f"ring: {ws.ring}, {ws.staging_bytes / MiB:.0f} MiB of staging, "
                f"{len(streamer.resident)} units resident, {packing}")
        notes.append(note)
        print(note, f"-> {r['tok_s']:.2f} tok/s, decode {r['decode_tok_s']:.2f} tok/s", flush=True)
        del model, engine, streamer
        gc.collect()
    resident = {}                                     # the same passes, weights in RAM
    for label, r in results.items():
        q = r["quantize"]
        if q not in resident:
            resident[q] = ours("cpu", max(r["batch"] for r in results.values() if r["quantize"] == q), quantize=q)
        c = measure(resident[q], r["batch"], args, [])
        transfer = r["streamed"] / r["disk"]
        kind = ", int8 weights" if q else "" if r["packed"] else ", raw units"
        name = f"ours (nvme{kind}){' auto batch' if label == 'auto' else ''}"
        rows.append([name, r["batch"], r["tok_s"],
                     r["decode_tok_s"], (r["peak"] - base) / MiB, r["load_peak"] / MiB,
                     r["disk"] / 1e9, r["streamed"] / r["decode_s"] / 1e9, r["streamed"] / r["decode_s"] / r["disk"],
                     r["decode_s"] / max(transfer, c["decode_s"]), r["busy_s"] / r["decode_s"],
                     c["decode_s"] * 1e3, transfer * 1e3, r["busy_s"] * 1e3])
    del resident
    gc.collect()
    acc = {}
    if not args.skip_accelerate:
        base = rss()
        reset_peak()
        model = AutoModelForCausalLM.from_pretrained(ckpt, device_map="auto", max_memory={"cpu": budget},
                                                     offload_folder=acc_dir, dtype=torch.bfloat16).eval()
        load_peak = rss("VmHWM") - base
        model.generation_config.eos_token_id = None
        ckpt_files = [f for f in files_under(ckpt) if f.endswith(".safetensors")]
        for b in args.batch:
            before = direct_read_bandwidth(ckpt_files, pattern)   # the disk in the minute of this run, as for ours
            acc[b] = measure(model, b, args, [ckpt, acc_dir], per_token_drop=True)
            acc[b]["disk"] = disk_then = (before + direct_read_bandwidth(ckpt_files, pattern)) / 2
            print(f"accelerate batch {b}: {acc[b]['tok_s']:.2f} tok/s", flush=True)
            rows.append(["accelerate disk offload", b, acc[b]["tok_s"], acc[b]["decode_tok_s"],
                         (acc[b]["peak"] - base) / MiB, load_peak / MiB, disk_then / 1e9, "", "", "", "", "", "", ""])
        del model
    for b in args.batch:
        if b in acc:
            rows.append(["ratio ours / accelerate", b, results[b]["tok_s"] / acc[b]["tok_s"],
                         results[b]["decode_tok_s"] / acc[b]["decode_tok_s"], "", "", "", "", "", "", "", "", "", ""])
    for b in args.batch:          # both are disk-bound: each run's tokens/s per GB/s its disk gave that minute
        if b in acc:
            per_disk = results[b]["disk"] / acc[b]["disk"]
            rows.append(["ratio at the same disk speed", b, results[b]["tok_s"] / acc[b]["tok_s"] / per_disk,
                         results[b]["decode_tok_s"] / acc[b]["decode_tok_s"] / per_disk, "", "", "", "", "", "", "",
                         "", "", ""])
    table = markdown_table(["system", "batch", "new tok/s", "decode tok/s", "peak RSS growth MiB (run)",
                            "peak RSS growth MiB (load)", "disk GB/s (around the run)", "decode read GB/s", "of disk",
                            "overlap (step / max)",
                            "disk busy (of step)", "compute ms/step", "transfer ms/step", "disk busy ms/step"], rows)
    header = (f"model {weight_bytes / MiB:.0f} MiB bf16 ({args.layers} layers, hidden {args.hidden}), max_memory "
              f"{budget / MiB:.0f} MiB, prompt {args.prompt}, {args.new} new tokens, {args.threads} threads, disk "
              f"O_DIRECT {disk / 1e9:.2f} GB/s before the runs with its faster pattern ({pattern[1]} x "
              f"{pattern[0] // MiB} MiB in flight; each of ours is compared with one pass of it right before and one "
              f"right after the run); cold page cache for every run (and every token for accelerate); "
              f"RSS growth over the process before loading\n\n" + "\n".join(f"- {n}" for n in notes))
    print(header)
    print(table)
    if args.record:
        record(args.record, "offload.py: NVMe tier vs accelerate disk offload", header + "\n\n" + table)


if __name__ == "__main__":
    main()
