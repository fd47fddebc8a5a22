"""fp32 merge: the merged model answers like base + adapter, whatever precision the adapter trained on."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedlora.common.config import parse_config
from fedlora.common.model import load_tokenizer
from fedlora.common.templates import make_format
from fedlora.server.release.merge import MERGE_FILE, max_abs_diff, merge, prompt_logits, read_report
from tests.server.adapters import write_noisy_adapter

_FORMAT = make_format(parse_config({}).data, load_tokenizer("embedded"))  # the run's format, upstream of merge
PROMPTS = [_FORMAT.prompt("Extract the visit as JSON.", "Anna Kim, 41, has asthma; given salbutamol."),
           _FORMAT.prompt("Say hello.")]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    cfg = parse_config({})
    return write_noisy_adapter(tmp_path_factory.mktemp("adapter") / "adapter", cfg, seed=1), cfg


def _base_plus_adapter_logits(adapter_dir, cfg):
    from peft import PeftModel

    from fedlora.common.model import load_base, load_tokenizer

    fp32 = dataclasses.replace(cfg.model, precision="fp32", device="cpu")
    model = PeftModel.from_pretrained(load_base(fp32, for_training=False), str(adapter_dir))
    return prompt_logits(model, load_tokenizer(cfg.model.base), PROMPTS)


@pytest.mark.parametrize("precision", ["fp32", "nf4"])
def test_merged_logits_match_base_plus_adapter(adapter, tmp_path, precision):
    # Prepare
    adapter_dir, cfg = adapter
    mcfg = dataclasses.replace(cfg.model, precision=precision)
    # Execute
    report = merge(adapter_dir, tmp_path / "merged", mcfg, prompts=PROMPTS)
    # Assert: an independent reload with plain transformers agrees with base + adapter in fp32
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    diff = max_abs_diff(prompt_logits(merged, tokenizer, PROMPTS), _base_plus_adapter_logits(adapter_dir, cfg))
    assert diff <= 1e-4
    assert report.max_abs_diff <= 1e-4
    assert report.trained_precision == precision
    assert all(p.dtype == torch.float32 for p in merged.parameters())


def test_merged_directory_is_safetensors_with_tokenizer_and_report(adapter, tmp_path):
    # Prepare
    adapter_dir, cfg = adapter
    # Execute
    report = merge(adapter_dir, tmp_path / "merged", cfg.model, prompts=PROMPTS)
    # Assert
    names = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MERGE_FILE} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert read_report(tmp_path / "merged") == report.as_dict()


def test_merge_changes_the_model(adapter, tmp_path):
    # Prepare: the merge must not be a no-op (the adapter's B matrices are non-zero)
    adapter_dir, cfg = adapter
    from fedlora.common.model import load_base, load_tokenizer

    base = prompt_logits(load_base(cfg.model, for_training=False), load_tokenizer(cfg.model.base), PROMPTS)
    # Execute
    merge(adapter_dir, tmp_path / "merged", cfg.model, prompts=PROMPTS)
    # Assert
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert max_abs_diff(prompt_logits(merged, load_tokenizer(cfg.model.base), PROMPTS), base) > 1e-2


def test_an_honestly_trained_strong_adapter_is_not_refused(tenants_dir, tmp_path):
    # Prepare: an adapter really trained (lr 2e-2, 40 steps), then its B matrices x4 (longer training)
    from fedlora.client.train import train
    from fedlora.common.adapter import get_state, save_adapter
    from fedlora.common.data import read_examples, tenant_paths, tokenize_examples
    from fedlora.common.model import base_fingerprint, base_name, load_model

    cfg = parse_config({"train.local-steps": 40, "train.batch-size": 8, "train.learning-rate": 0.02})
    loaded = load_model(cfg.model, cfg.adapter)
    data = tokenize_examples(read_examples(tenant_paths(tenants_dir, 0)[0]), loaded.tokenizer,
                             max_length=cfg.data.max_length)
    train(loaded.model, data, cfg.train, pad_id=loaded.tokenizer.pad_token_id, progress=False)
    state = {k: v * 4 if "lora_B" in k else v for k, v in get_state(loaded.model).items()}
    adapter_dir = save_adapter(tmp_path / "adapter", state, loaded.model.peft_config["default"],
                               base_model=base_name(cfg.model.base),
                               metadata={"base_sha256": base_fingerprint(cfg.model.base)})
    # Execute
    report = merge(adapter_dir, tmp_path / "merged", cfg.model, prompts=PROMPTS)
    # Assert: accepted, against a bound scaled to its logits
    assert report.logit_scale > 1.0 and report.tolerance == pytest.approx(report.rtol * report.logit_scale)
    assert report.max_abs_diff <= report.tolerance


def test_a_merge_off_by_one_percent_of_the_adapter_is_refused(adapter, tmp_path, monkeypatch):
    # Prepare: a merge bug — every LoRA B scaled by 1.01 before merging (a wrong scaling)
    from peft.tuners.lora import LoraModel

    from fedlora.server.release.merge import MergeMismatch

    original = LoraModel.merge_and_unload

    def off_by_one_percent(self, *args, **kwargs):
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "lora_B" in name:
                    p.mul_(1.01)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LoraModel, "merge_and_unload", off_by_one_percent)
    adapter_dir, cfg = adapter
    # Execute / Assert: refused, nothing saved
    with pytest.raises(MergeMismatch, match="the logits' scale"):
        merge(adapter_dir, tmp_path / "merged", cfg.model, prompts=PROMPTS)
    assert not (tmp_path / "merged").exists()
