"""Bad input is refused up front with a message that names the problem and the fix."""
import pytest
import torch

import lightning_dsinfer as dsi
from helpers import optimised_copy, padded_batch, tiny_model


def test_unsupported_architecture_names_model_type_and_supported_list():
    model = tiny_model("cohere_compass_text")   # (a family without a fused policy: the generic TP path runs it)
    with pytest.raises(dsi.UnsupportedModelError,
                       match=r"model_type='cohere_compass_text'.*Supported: .*gpt_neox.*llama") as e:
        dsi.init_inference(model)
    assert all(name in str(e.value) for name in ("bloom", "falcon", "gemma2", "gpt2", "mixtral", "opt", "qwen3"))


def test_prompt_plus_new_tokens_longer_than_cache():
    opt = optimised_copy(tiny_model("llama"), max_seq_len=16)
    ids, mask = padded_batch([10, 6])
    with pytest.raises(ValueError, match=r"prompt 10 \+ max_new_tokens 7 = 17 exceeds max_seq_len=16.*max_seq_len=17"):
        opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        opt(input_ids=torch.zeros(1, 17, dtype=torch.long))
    # the limit itself is fine
    assert opt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6).shape == (2, 16)


def test_unknown_option_and_bad_dtype():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="unknown option.*max_seq_length"):
        dsi.init_inference(model, max_seq_length=10)
    with pytest.raises(ValueError, match="dtype='bf17'"):
        dsi.init_inference(model, dtype="bf17")
    with pytest.raises(ValueError, match="supported modes"):
        dsi.DSInferPrecision("int3")


def test_default_limits():
    opt = optimised_copy(tiny_model("llama"))
    engine = opt._dsinfer_engine
    assert engine.max_seq_len == 256          # min(max_position_embeddings=256, 2048)
    assert engine.cache.max_batch_size == 8


def test_dynamic_rope_is_refused():
    from transformers import AutoModelForCausalLM

    from helpers import tiny_config

    cfg = tiny_config("llama")
    cfg.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(dsi.UnsupportedModelError, match="rope_type='dynamic'"):
        dsi.init_inference(model)

