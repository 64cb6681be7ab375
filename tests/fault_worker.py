"""A TP=2 (or PP=2: argv[3] == "pp") rank that generates forever; the test kills its peer and times how fast this
rank gives up."""
import copy
import sys
import time

import torch

import lightning_dsinfer as dsi
from helpers import padded_batch, tiny_model


def main():
    torch.set_num_threads(1)
    dtype = getattr(torch, sys.argv[2])
    sizes = dict(pipeline_parallel_size=2) if sys.argv[3:] == ["pp"] else dict(tensor_parallel_size=2)
    opt = dsi.init_inference(copy.deepcopy(tiny_model("llama")).to(dtype), max_seq_len=64, dtype=dtype,
                             collective_timeout_s=float(sys.argv[1]), **sizes)
    ids, mask = padded_batch([5, 7])
    print("READY", flush=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    print("survived a dead peer?!", flush=True)


if __name__ == "__main__":
    main()
