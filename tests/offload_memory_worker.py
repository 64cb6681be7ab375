"""Peak memory of the NVMe tier: a model built on meta, loaded from a safetensors checkpoint whose weights
are >= 4x max_memory, written to the offload folder and run. Prints the numbers; exits 1 when the peak
RSS growth over the baseline exceeds max_memory + OVERHEAD.

Baseline: RSS after importing torch / transformers / lightning_dsinfer and building the meta model.
OVERHEAD (fixed, not proportional to the model): Python and allocator slack, reader threads' stacks,
the rotary table, the final norm, the tokens and a few MiB of temporaries of the write path.
"""
import os
import sys

import torch

from memory_worker import rss_parts

MAX_MEMORY = 40 << 20
OVERHEAD = 32 << 20


def rss(field: str = "VmRSS") -> int:
    """VmRSS (now) or VmHWM (peak) of this process image, bytes (see memory_worker: not ru_maxrss)."""
    return int(rss_parts()[field] * 2**20)


def main():
    folder = sys.argv[1]
    quantize = sys.argv[2] if len(sys.argv) > 2 else None     # "int8": units quantised while they are written
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=14, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=4000, max_position_embeddings=256, initializer_range=0.05,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    ckpt = os.path.join(folder, "ckpt")
    if not os.path.exists(ckpt):                                  # written by a child: its memory is not ours
        pid = os.fork()
        if pid == 0:
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(cfg).save_pretrained(ckpt)
            os._exit(0)
        os.waitpid(pid, 0)
    import lightning_dsinfer as dsi

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    base = rss()
    model = dsi.init_inference(model, checkpoint=ckpt, offload="nvme", offload_path=os.path.join(folder, "off"),
                               max_memory=MAX_MEMORY, max_seq_len=64, max_batch_size=4, dtype=torch.float32,
                               quantize=quantize)
    engine = model._dsinfer_engine
    after_init = (rss() - base, rss("VmHWM") - base)
    ids = torch.randint(3, 4000, (4, 24))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    peak = rss("VmHWM")
    growth = peak - base
    ok = weight_bytes >= 4 * MAX_MEMORY and growth <= MAX_MEMORY + OVERHEAD and out.shape == (4, 32)
    print(f"weights {weight_bytes / 2**20:.0f} MiB, max_memory {MAX_MEMORY / 2**20:.0f} MiB, working set "
          f"{engine.working_set.total / 2**20:.0f} MiB (ring: {engine.working_set.ring}, "
          f"batch {engine.working_set.batch_size}), baseline RSS "
          f"{base / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, growth {growth / 2**20:.0f} MiB "
          f"(limit {(MAX_MEMORY + OVERHEAD) / 2**20:.0f} MiB; after loading: {after_init[0] / 2**20:.0f} MiB resident, peak {after_init[1] / 2**20:.0f} MiB) {'OK' if ok else 'FAIL'}", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
