"""Model loading: embedded base via from_pretrained, QLoRA (4-bit NF4) on CPU, DoRA and IA3."""

from __future__ import annotations

import pytest
import torch

from fedlora.client.train import train
from fedlora.common.adapter import get_state
from fedlora.common.config import parse_config
from fedlora.common.data import Example, tokenize_examples
from fedlora.common.model import ModelNotFoundError, count_parameters, load_model, resolve_base


def _batch(tok):
    ex = [Example.from_alpaca("Extract the visit as JSON.", f"Patient {n}, age {n + 20}.", f'{{"age": {n + 20}}}')
          for n in range(8)]
    return tokenize_examples(ex, tok, max_length=64)


def test_embedded_base_is_a_small_pretrained_llama():
    cfg = parse_config({})
    loaded = load_model(cfg.model, cfg.adapter, for_training=False)
    trainable, total = count_parameters(loaded.model)
    assert loaded.model.base_model.model.config.model_type == "llama"
    assert 1_000_000 <= total - trainable <= 5_000_000
    assert 0 < trainable < 0.1 * total


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        resolve_base("some-org/not-downloaded-model")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_base(str(tmp_path / "nope"))


def test_qlora_nf4_trains_on_cpu():
    import bitsandbytes as bnb

    # Prepare
    cfg = parse_config({"model.precision": "nf4", "train.local-steps": 3, "train.batch-size": 8})
    loaded = load_model(cfg.model, cfg.adapter)
    four_bit = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    before = get_state(loaded.model)
    # Execute
    metrics = train(loaded.model, _batch(loaded.tokenizer), cfg.train, pad_id=loaded.tokenizer.pad_token_id,
                    progress=False)
    after = get_state(loaded.model)
    # Assert: the base is 4-bit NF4 with double quantization; LoRA weights moved; loss finite
    assert four_bit, "no Linear4bit layers: the base was not quantized"
    qs = four_bit[0].weight.quant_state
    assert qs.quant_type == "nf4" and qs.nested
    assert four_bit[0].compute_dtype == torch.float32  # fp32 compute on CPU
    assert torch.isfinite(torch.tensor(metrics.loss))
    assert any((after[k] != before[k]).any() for k in before if "lora_B" in k)


@pytest.mark.parametrize("method, marker", [("dora", "lora_magnitude_vector"), ("ia3", "ia3_l")])
def test_dora_and_ia3_are_selectable(method, marker):
    cfg = parse_config({"adapter.method": method, "train.local-steps": 2, "train.batch-size": 8})
    loaded = load_model(cfg.model, cfg.adapter)
    names = list(get_state(loaded.model))
    assert any(marker in n for n in names)
    m = train(loaded.model, _batch(loaded.tokenizer), cfg.train, pad_id=loaded.tokenizer.pad_token_id,
              progress=False)
    assert m.steps == 2


def test_target_modules_by_name():
    cfg = parse_config({"adapter.target-modules": "q_proj,v_proj"})
    loaded = load_model(cfg.model, cfg.adapter, for_training=False)
    names = list(get_state(loaded.model))
    assert names and all(("q_proj" in n or "v_proj" in n) for n in names)
