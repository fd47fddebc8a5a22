"""Adapter state <-> Flower ArrayRecord <-> PEFT directory (safetensors), and nothing else.

PEFT's ``get/set_peft_model_state_dict`` is the boundary: the names that travel are
exactly the names PEFT saves, so a directory written here loads with plain
``PeftModel.from_pretrained``. Directories are written atomically: a crash never leaves
a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import numpy as np

from common.files import atomic_dir, write_json_atomic  # noqa: F401  (write_json_atomic: callers import it from here)

METADATA_FILE = "fedlora.json"


def get_state(model) -> "OrderedDict[str, np.ndarray]":
    """The trainable adapter tensors of ``model`` as float32 numpy arrays, in PEFT's names."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model)
    return OrderedDict((k, v.detach().to("cpu").float().numpy().copy()) for k, v in sd.items())


def set_state(model, state: Mapping[str, np.ndarray]) -> None:
    """Load adapter tensors into ``model``; every name must match, in both directions."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise KeyError(f"adapter tensors do not match the model: missing {missing[:3]}, "
                       f"unexpected {extra[:3]}")
    tensors = {}
    for k, ref in expected.items():
        arr = np.asarray(state[k])
        if tuple(arr.shape) != tuple(ref.shape):
            raise ValueError(f"adapter tensor {k}: shape {arr.shape} != expected {tuple(ref.shape)}")
        tensors[k] = torch.from_numpy(np.ascontiguousarray(arr)).to(ref.dtype)
    result = set_peft_model_state_dict(model, tensors)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise KeyError(f"PEFT did not accept adapter tensors: {unexpected[:3]}")


def to_arrayrecord(state: Mapping[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in state.items()))


def from_arrayrecord(record) -> "OrderedDict[str, np.ndarray]":
    return OrderedDict((k, v.numpy()) for k, v in record.items())


def subtract(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> "OrderedDict[str, np.ndarray]":
    return OrderedDict((k, (a[k] - b[k]).astype(np.float32)) for k in a)


def nbytes(state: Mapping[str, np.ndarray]) -> int:
    return int(sum(v.nbytes for v in state.values()))


def save_adapter(out_dir: str | Path, state: Mapping[str, np.ndarray], peft_cfg, *,
                 base_model: str, metadata: Mapping | None = None) -> Path:
    """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)
    plus ``fedlora.json`` metadata, atomically."""
    import copy

    from safetensors.numpy import save_file

    final = Path(out_dir)
    with atomic_dir(final) as tmp:
        cfg = copy.deepcopy(peft_cfg)
        cfg.base_model_name_or_path = base_model
        cfg.save_pretrained(str(tmp))
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
                  str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        if metadata is not None:
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
    return final


def load_adapter_file(adapter_dir: str | Path) -> "OrderedDict[str, np.ndarray]":
    """Adapter tensors from a PEFT directory (safetensors only; never a pickle)."""
    from safetensors.numpy import load_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; fedlora reads only safetensors adapters")
    return OrderedDict(sorted(load_file(str(path)).items()))
