"""A plain ``python lightning_worker.py`` user script: Trainer(strategy="dsinfer", devices=N).predict.

Lightning's subprocess launcher starts the other local ranks. Rank 0 of node 0 writes what it got to
--out (JSON); every rank that speaks for a replica writes its prediction-writer rows to --out.rank<R>."""
import argparse
import copy
import json
import os

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

import lightning_dsinfer as dsi
from lightning_dsinfer.strategies.dsinfer import ContiguousShardSampler
from helpers import collate_left_padded as collate
from helpers import generating_module, random_prompts, tiny_model


class RowWriter(BasePredictionWriter):
    def __init__(self, path):
        super().__init__(write_interval="batch")
        self.path = path

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            for i in batch_indices:
                f.write(f"{i}\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--tp", type=int, default=None)
    p.add_argument("--samples", type=int, default=7)
    p.add_argument("--family", default="llama")
    p.add_argument("--out", required=True)
    p.add_argument("--expert-parallel", action="store_true")
    p.add_argument("--pp", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(1)
    hf = tiny_model(args.family)
    data = random_prompts(args.samples)
    strategy = dsi.DSInferStrategy(tensor_parallel_size=args.tp, max_seq_len=32, collective_timeout_s=60,
                                   expert_parallel=args.expert_parallel, pipeline_parallel_size=args.pp)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, num_nodes=args.num_nodes, strategy=strategy,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[RowWriter(args.out)])
    module = generating_module(copy.deepcopy(hf))
    preds = trainer.predict(module, DataLoader(data, batch_size=2, collate_fn=collate))
    rows = [r for batch in preds for r in batch]
    # Reference: the unmodified HF model on the same batches (each data-parallel replica batches its own
    # contiguous chunk of the dataset), in dataset order.
    refs = []
    dp = strategy.topology.dp
    for d in range(dp):
        chunk = ContiguousShardSampler(list(range(len(data))), dp, d).indices
        for k in range(0, len(chunk), 2):
            with torch.no_grad():
                refs += list(hf.generate(**collate([data[i] for i in chunk[k:k + 2]]), max_new_tokens=8,
                                         do_sample=False))
    ok = len(rows) == len(data) == len(refs) and all(torch.equal(a, b) for a, b in zip(rows, refs))
    # and each row continues its own prompt (dataset order)
    ok = ok and all(torch.equal(row[len(row) - 8 - len(pr):len(row) - 8], pr) for pr, row in zip(data, rows))
    result = {"rank": trainer.global_rank, "world": trainer.world_size, "rows": len(rows), "batches": len(preds),
              "match": bool(ok), "tp": strategy.topology.tp, "dp": strategy.topology.dp,
              "pp": strategy.topology.pp, "stage_layers": list(getattr(getattr(module.model, "_dsinfer_engine", None),
                                                                       "layer_range", ())),
              "first_experts": [layer.mlp.first_expert for layer in getattr(getattr(getattr(
                  module.model, "_dsinfer_engine", None), "decoder", None), "layers", [])
                  if type(layer.mlp).__name__ == "MoEMLP"]}
    print(json.dumps(result), flush=True)
    with open(f"{args.out}.result{trainer.global_rank}", "w") as f:   # own file: ranks share one stdout pipe
        json.dump(result, f)
    if trainer.global_rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
