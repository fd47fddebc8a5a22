"""Test helper: small non-trivial adapters on the embedded base, written as PEFT directories."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedlora.common.config import Config


def write_noisy_adapter(out: Path, cfg: Config, *, seed: int, scale: float = 0.05) -> Path:
    """A PEFT adapter whose LoRA B matrices are seeded noise (a fresh LoRA would equal the base)."""
    from fedlora.common.adapter import get_state, save_adapter
    from fedlora.common.model import base_fingerprint, load_model, resolve_base

    loaded = load_model(cfg.model, cfg.adapter, seed=seed, for_training=False)
    rng = np.random.default_rng(seed)
    state = {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32) if "lora_B" in k else v
             for k, v in get_state(loaded.model).items()}
    return save_adapter(out, state, loaded.model.peft_config["default"], base_model=resolve_base(cfg.model.base),
                        metadata={"fedlora": 1, "base_model": cfg.model.base, "round": 2, "tenants": 3,
                                  "base_sha256": base_fingerprint(cfg.model.base), "config": cfg.to_flat()})
