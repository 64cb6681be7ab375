"""One rank of the sharded-loading memory test: build the model on ``meta``, load this rank's slices from a
safetensors folder with init_inference(tensor_parallel_size=N or pipeline_parallel_size=N, checkpoint=...), generate a few tokens, and
print peak resident memory next to the resident memory right after the imports (the baseline).

Peak is VmHWM (/proc/self/status), the high-water mark of this process's own address space.
``ru_maxrss`` is printed too but not used: Linux carries the parent's high-water mark into it across
fork + exec (measured: a child of a 613 MiB launcher reported 613 MiB before doing anything).

Prints one line ``MEM {json}`` (MiB): baseline, peak, and where the resident memory was at the end
(anonymous vs file-backed pages)."""
import argparse
import json
import resource


def rss_parts() -> dict:
    """Current VmRSS and its anonymous / file-backed / shared-memory parts (MiB)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) / 1024
    return out


def ru_maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=1)
    args = p.parse_args()

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    import lightning_dsinfer as dsi

    torch.set_num_threads(1)
    baseline = rss_parts()["VmRSS"]
    cfg = AutoConfig.from_pretrained(args.checkpoint)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    after_meta = rss_parts()["VmRSS"]
    model = dsi.init_inference(model, tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, checkpoint=args.checkpoint, dtype=torch.float32,
                               max_seq_len=32, max_batch_size=2, collective_timeout_s=60)
    after_load = rss_parts()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    end = rss_parts()
    print("MEM " + json.dumps({
        "rank": dsi.parallel_rank(), "transformers": transformers.__version__, "baseline": baseline,
        "after_meta": after_meta, "after_load": after_load["VmRSS"], "peak": end["VmHWM"],
        "ru_maxrss": ru_maxrss_mib(), "end": end, "tokens": tokens[0].tolist(),
    }), flush=True)


if __name__ == "__main__":
    main()
