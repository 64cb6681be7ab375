"""Trainer(strategy="dsinfer").predict on the user's unchanged LightningModule."""
import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import lightning_dsinfer as dsi
from helpers import padded_batch, tiny_model


class Gen(L.LightningModule):                 # the user's module, unchanged
    def __init__(self, model):
        super().__init__()
        self.model = model

    def predict_step(self, batch, batch_idx):
        return self.model.generate(**batch, max_new_tokens=8, do_sample=False)


def _collate(rows):
    """Left-pad a list of 1-D prompts into a batch (what a tokenizer with padding_side='left' does)."""
    n = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = r
        mask[i, n - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _prompts(n=7):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 97, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g) for _ in range(n)]


def _trainer(**kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def test_predict_matches_hf_one_prediction_per_sample_in_order():
    hf = tiny_model("llama")
    prompts = _prompts()
    loader = DataLoader(prompts, batch_size=2, collate_fn=_collate)
    preds = _trainer(strategy="dsinfer").predict(Gen(copy.deepcopy(hf)), loader)
    assert len(preds) == 4
    rows = [r for p in preds for r in p]
    assert len(rows) == len(prompts)
    for batch, pred in zip(loader, preds):
        with torch.no_grad():
            ref = hf.generate(**batch, max_new_tokens=8, do_sample=False)
        assert torch.equal(pred, ref)
    for prompt, row in zip(prompts, rows):        # each row continues its own prompt, in dataset order
        assert torch.equal(row[row.shape[0] - 8 - len(prompt): row.shape[0] - 8], prompt)


def test_strategy_instance_and_precision_plugin():
    hf = tiny_model("qwen3")
    module = Gen(copy.deepcopy(hf))
    strategy = dsi.DSInferStrategy(max_seq_len=40, max_batch_size=2)
    preds = _trainer(strategy=strategy, plugins=[dsi.DSInferPrecision("bf16")]).predict(
        module, DataLoader(_prompts(3), batch_size=3, collate_fn=_collate))
    engine = module.model._dsinfer_engine
    assert engine.dtype == torch.bfloat16 and engine.max_seq_len == 40
    assert preds[0].shape[0] == 3
    # bf16 logits follow the fp32 HF model closely (a check that can fail, unlike "it ran")
    ids, mask = padded_batch([9, 5], seed=3)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    got = module.model(input_ids=ids, attention_mask=mask).logits.float()
    valid = mask.bool()
    cos = torch.nn.functional.cosine_similarity(got[valid], ref[valid], dim=-1)
    assert cos.min() > 0.99


def test_fit_is_refused():
    class Train(Gen):
        def training_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return None

    with pytest.raises(RuntimeError, match="for inference"):
        _trainer(strategy="dsinfer", max_steps=1).fit(Train(tiny_model("llama")),
                                                       DataLoader(_prompts(2), batch_size=1, collate_fn=_collate))


def test_module_without_hf_model_is_refused():
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def predict_step(self, batch, batch_idx):
            return self.layer(batch)

    with pytest.raises(dsi.UnsupportedModelError, match="no Hugging Face PreTrainedModel"):
        _trainer(strategy="dsinfer").predict(Plain(), DataLoader(torch.zeros(2, 2), batch_size=1))


def test_registered_name():
    from lightning.pytorch.strategies import StrategyRegistry

    assert "dsinfer" in StrategyRegistry
