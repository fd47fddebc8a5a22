"""Adapter round trip: what fedlora writes loads with plain PEFT in a fresh process, same logits."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch

from fedlora.common.adapter import get_state, load_adapter_file, save_adapter, set_state
from fedlora.common.model import embedded_base_dir, load_model

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


def _through_flower(record):
    """An ArrayRecord deflated into Flower's wire objects and inflated back, as messages travel."""
    from flwr.app import ArrayRecord
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    objects = get_all_nested_objects(record)
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    back = inflate_object_from_contents(record.object_id, contents, keep_object_contents=False)
    assert isinstance(back, ArrayRecord)
    return back


STATES = {
    "float32 LoRA pair": OrderedDict([("m.lora_A.weight", np.arange(24, dtype=np.float32).reshape(4, 6) / 7),
                                      ("m.lora_B.weight", -np.arange(12, dtype=np.float32).reshape(6, 2))]),
    "float16 and float64": OrderedDict([("h", np.array([[1.5, -2.0, 65504.0]], np.float16)),
                                        ("d", np.array([np.pi, -0.0, 1e300]))]),
    "edge shapes": OrderedDict([("scalar", np.array(3.25, np.float32)), ("empty", np.zeros((0, 5), np.float32)),
                                ("fortran", np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))),
                                ("big-endian", np.arange(3, dtype=">f4")), ("ints", np.arange(5, dtype=np.int64))]),
}


@pytest.mark.parametrize("name", list(STATES))
def test_arrayrecord_bytes_are_flowers_own_and_round_trip_exactly(name):
    from flwr.app import Array

    from fedlora.common.adapter import from_arrayrecord, to_arrayrecord

    state = STATES[name]
    # Execute: our record, through Flower's wire form and back
    record = to_arrayrecord(state)
    back = from_arrayrecord(_through_flower(record))
    # Assert: each Array holds exactly what Flower's Array(ndarray) holds (np.save bytes),
    # and what comes back has the same names, order, dtype, shape and bytes as what went in
    assert list(back) == list(state)
    for k, v in state.items():
        flower = Array(np.asarray(v, order="C"))
        assert (record[k].dtype, record[k].shape, record[k].stype, record[k].data) == \
            (flower.dtype, flower.shape, flower.stype, flower.data), k
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert back[k].tobytes() == np.ascontiguousarray(v).tobytes(), k
        np.testing.assert_array_equal(back[k], flower.numpy())


def test_arrays_from_a_record_are_read_only_views_of_its_bytes():
    from fedlora.common.adapter import from_arrayrecord, to_arrayrecord

    record = to_arrayrecord(STATES["float32 LoRA pair"])
    back = from_arrayrecord(record)
    a = back["m.lora_A.weight"]
    assert not a.flags.writeable and np.shares_memory(a, np.frombuffer(record["m.lora_A.weight"].data, np.uint8))
    with pytest.raises(ValueError, match="read-only"):
        a[0, 0] = 1.0


def test_payloads_that_are_not_plain_npy_take_flowers_own_path():
    # Prepare: a Fortran-order .npy payload, a truncated one, and an unknown serialisation
    import io

    from flwr.app import Array, ArrayRecord

    from fedlora.common.adapter import from_arrayrecord

    f = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    buf = io.BytesIO()
    np.save(buf, f, allow_pickle=False)
    good = Array(np.arange(4, dtype=np.float32))
    # Execute / Assert: Fortran order decoded as np.load decodes it
    back = from_arrayrecord(ArrayRecord({"f": Array("float32", (2, 3), "numpy.ndarray", buf.getvalue())}))
    np.testing.assert_array_equal(back["f"], f)
    # a truncated payload fails as Array.numpy() fails
    with pytest.raises(ValueError):
        from_arrayrecord(ArrayRecord({"t": Array("float32", (4,), "numpy.ndarray", good.data[:-4])}))
    with pytest.raises(TypeError, match="Unsupported serialization type"):
        from_arrayrecord(ArrayRecord({"x": Array("float32", (4,), "other", good.data)}))
