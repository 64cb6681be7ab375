"""One rank of a bf16 tensor-parallel run: the one-call C decode step (modules/cpu_stack.py) against the per-op
path on the same rank, both all-reducing through shared memory. Prints OK per family when every decode step's
hidden states, the greedy tokens and the all-reduce counts agree."""
import argparse
import copy
import sys

import torch

import lightning_dsinfer as dsi
from helpers import padded_batch, tiny_model
from stack_checks import run_both_paths


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--families", nargs="+", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    for family in args.families:
        opt = dsi.init_inference(copy.deepcopy(tiny_model(family)).to(torch.bfloat16), tensor_parallel_size=2,
                                 dtype=torch.bfloat16, max_seq_len=64, collective_timeout_s=60)
        comm = opt._dsinfer_engine.comm
        ids, mask = padded_batch([12, 5, 9], seed=1)
        runs = run_both_paths(opt, ids, mask, new_tokens=10)
        (tok_s, hid_s, calls_s, n_s), (tok_o, hid_o, calls_o, _) = runs["stack"], runs["ops"]
        same = torch.equal(tok_s, tok_o) and len(hid_s) == len(hid_o) and all(
            torch.equal(a, b) for a, b in zip(hid_s, hid_o))
        ok = same and n_s == 9 and calls_s == calls_o and comm.shm is not None and comm.shm.seconds > 0
        print(f"{family}: stack steps={n_s} same={same} all_reduces={calls_s}/{calls_o} {'OK' if ok else 'FAIL'}",
              flush=True)
        if not ok:
            sys.exit(1)


if __name__ == "__main__":
    main()
