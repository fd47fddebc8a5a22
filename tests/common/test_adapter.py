"""Adapter round trip: what fedlora writes loads with plain PEFT in a fresh process, same logits."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.adapter import get_state, load_adapter_file, save_adapter, set_state
from common.model import embedded_base_dir, load_model

FRESH = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
ids = torch.tensor(json.loads(sys.argv[3]))
with torch.no_grad():
    print(json.dumps(model(ids).logits.tolist()))
"""


@pytest.mark.slow
def test_written_adapter_loads_with_plain_peft_in_fresh_process(tmp_path, small_cfg):
    # Prepare: an adapter with non-trivial weights (B is zero at init, so perturb everything)
    loaded = load_model(small_cfg.model, small_cfg.adapter, for_training=False)
    rng = np.random.default_rng(0)
    state = {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in get_state(loaded.model).items()}
    set_state(loaded.model, state)
    out = save_adapter(tmp_path / "adapter", state, loaded.model.peft_config["default"],
                       base_model=str(embedded_base_dir()), metadata={"round": 3})
    ids = [[1, 20, 30, 40, 50, 60, 70, 80]]
    with torch.no_grad():
        ours = loaded.model(torch.tensor(ids)).logits.numpy()
    # Execute: plain PEFT in a fresh interpreter
    proc = subprocess.run([sys.executable, "-c", FRESH, str(embedded_base_dir()), str(out), json.dumps(ids)],
                          capture_output=True, text=True, check=True, env={**__import__("os").environ,
                                                                            "HF_HUB_OFFLINE": "1"})
    theirs = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
    # Assert
    assert np.abs(ours - theirs).max() <= 1e-5
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "fedlora.json"]
    assert json.loads((out / "fedlora.json").read_text())["round"] == 3


def test_adapter_file_round_trip_is_exact(tmp_path, small_cfg):
    loaded = load_model(small_cfg.model, small_cfg.adapter, for_training=False)
    state = get_state(loaded.model)
    save_adapter(tmp_path / "a", state, loaded.model.peft_config["default"], base_model="embedded")
    back = load_adapter_file(tmp_path / "a")
    assert list(sorted(state)) == list(back)
    for k in state:
        np.testing.assert_array_equal(state[k], back[k])


def test_atomic_write_leaves_no_partial_directory(tmp_path, small_cfg, monkeypatch):
    # Prepare: a save that crashes half way (after the config, before the weights)
    loaded = load_model(small_cfg.model, small_cfg.adapter, for_training=False)
    import safetensors.numpy

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    # Execute
    try:
        save_adapter(tmp_path / "round_001", get_state(loaded.model), loaded.model.peft_config["default"],
                     base_model="embedded")
    except OSError:
        pass
    # Assert: neither the final name nor a temporary directory is left
    assert list(tmp_path.iterdir()) == []
