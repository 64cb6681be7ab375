"""Shared pieces of the benchmark scripts: timing, streaming bandwidth, machine line, RESULTS.md recording."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
import time

import torch


def stream_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of a streaming read of a large tensor with the current thread count: the faster of torch's
    ``x.sum()`` and the CPU kernel library's prefetching read loop (``cpu_gemv.stream_read_seconds``; the sum
    reads ~15% slower on the 2-core machine, which would put a kernel at a utilisation above 1)."""
    from lightning_dsinfer.kernels import cpu_gemv

    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
        probe = cpu_gemv.stream_read_seconds(x)
        if probe is not None:
            best = min(best, probe)
    del x
    return nbytes / best


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    from lightning_dsinfer.kernels import cpu_gemv

    isas = cpu_gemv.supported_isas() if cpu_gemv.available() else []    # (bf16 / AMX instructions change the CPU
    return (f"{cpu}, {os.cpu_count()} cores ({isas[0] if isas else 'no C kernels'}), {gpu}; "  # numbers a lot)
            f"torch {torch.__version__}, threads {torch.get_num_threads()}")


def record(path: str, title: str, table: str) -> None:
    """Append a result section (title, date, machine, command, table) to RESULTS.md."""
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(path, "a") as f:
        f.write(f"\n## {title}\n\n- date: {date}\n- machine: {machine_line()}\n- command: `{cmd}`\n\n{table}\n")


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


LLAMA_200M = dict(hidden=1024, layers=12, heads=16, kv_heads=4, intermediate=2816, vocab=32000)


LLAMA_ARGS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")


def passthrough(args, *names: str) -> list[str]:
    """``--name=value`` of each of ``names`` and of the Llama shape (:func:`add_llama_args`), for a worker process."""
    return [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in (*names, *LLAMA_ARGS)]


def add_llama_args(parser, **defaults) -> None:
    """--hidden/--layers/--heads/--kv-heads/--intermediate/--vocab of a from_config Llama (default: ~200M)."""
    d = {**LLAMA_200M, **defaults}
    for name in LLAMA_ARGS:
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=d[name])


def llama_config(args):
    """The benchmark Llama: untied embeddings, no eos (every run generates exactly N tokens), pad id 0."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate, vocab_size=args.vocab,
                       max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=None, pad_token_id=0)
