"""Serve several published adapters on one base, switching between them without reloading.

The base is loaded once; each adapter is attached under its own name through PEFT's
multi-adapter API (``PeftModel.from_pretrained`` for the first, ``load_adapter`` for the
rest) and ``set_adapter`` selects the one that answers. Each version's answers equal its
merged model's answers (tests check greedy outputs and logits).

An adapter inside a published version (``<version>/adapter`` beside a ``manifest.json``) is
loaded only after the version's signature verified against ``public_key``; an adapter from
a failed federation is refused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

import torch

from fedlora.common.config import EvalConfig, ModelConfig


def check_adapter(adapter_dir: Path, *, public_key: str | Path | None) -> Path:
    """The directory to load ``adapter_dir`` from. With ``public_key`` it must be the adapter of a
    signed published version (``<version>/adapter``), whatever files are present: the version is
    verified and the adapter read from a private copy of the bytes that verified. Without one, a
    published version's adapter is refused (it must be verified), a plain adapter is loaded as it
    is. A failed federation's adapter is refused either way."""
    import json

    from fedlora.common.adapter import METADATA_FILE
    from fedlora.server.release.artifacts import SourceError, check_safetensors, refuse_failed
    from fedlora.server.release.manifest import MANIFEST_NAME

    version = adapter_dir.parent
    if public_key is not None:
        from fedlora.server.release.snapshot import SnapshotError, verified_snapshot

        try:
            adapter_dir = verified_snapshot(version, public_key) / "adapter"
        except (SnapshotError, NotADirectoryError) as why:
            raise SourceError(f"{why} (a public key was given: {adapter_dir} must be a signed version's "
                              "adapter)") from None
    elif (version / MANIFEST_NAME).is_file():
        raise SourceError(f"{adapter_dir} belongs to the published version {version}; hot-swap loads it only "
                          "after verifying its signature: pass public_key")
    meta = adapter_dir / METADATA_FILE
    refuse_failed(version, json.loads(meta.read_text()) if meta.is_file() else {})
    check_safetensors(adapter_dir / "adapter_model.safetensors")
    return adapter_dir


def _recorded_base(adapter_dir: Path) -> str | None:
    """The base fingerprint an adapter's fedlora.json records (None for a plain PEFT adapter)."""
    import json

    from fedlora.common.adapter import METADATA_FILE

    meta = adapter_dir / METADATA_FILE
    return json.loads(meta.read_text()).get("base_sha256") if meta.is_file() else None


class HotSwap:
    """One base model with named adapters; ``use(name)`` switches the active one."""

    def __init__(self, mcfg: ModelConfig, adapters: Mapping[str, str | Path], *, fp32: bool = True,
                 public_key: str | Path | None = None, base: str | Path | None = None) -> None:
        """``base``: where the base is on this machine (else ``mcfg.base``); every adapter's recorded
        base fingerprint must match it."""
        from peft import PeftModel

        from fedlora.common.model import load_base, load_tokenizer, pick_device, require_base

        if not adapters:
            raise ValueError("HotSwap needs at least one adapter directory")
        adapters = {name: check_adapter(Path(path), public_key=public_key) for name, path in adapters.items()}
        for recorded, path in {_recorded_base(Path(p)): p for p in adapters.values()}.items():
            resolved = require_base(mcfg.base, recorded, override=base, what=str(path))
        if base is not None:
            mcfg = dataclasses.replace(mcfg, base=resolved)
        if fp32:
            mcfg = dataclasses.replace(mcfg, precision="fp32")
        self.tokenizer = load_tokenizer(mcfg.base)
        self.device = pick_device(mcfg)
        names = list(adapters)
        first = names[0]
        self.model = PeftModel.from_pretrained(load_base(mcfg, for_training=False), str(adapters[first]),
                                               adapter_name=first)
        for name in names[1:]:
            self.model.load_adapter(str(adapters[name]), adapter_name=name)
        self.model.eval()
        self.names = tuple(names)
        self.active = first

    def use(self, name: str) -> "HotSwap":
        """Make ``name`` the adapter that answers."""
        if name not in self.names:
            raise KeyError(f"no adapter named {name!r}; loaded: {', '.join(self.names)}")
        self.model.set_adapter(name)
        self.active = name
        return self

    def generate(self, prompts: list[str], *, max_new_tokens: int = EvalConfig.max_new_tokens,
                 batch_size: int = EvalConfig.batch_size) -> list[str]:
        """Greedy answers of the active adapter (the same decoding as evaluation)."""
        from fedlora.common.evaluate import generate

        return generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, device=self.device)

    @torch.no_grad()
    def logits(self, prompts: list[str]) -> list[torch.Tensor]:
        """Per-prompt logits of the active adapter (BOS + prompt, unpadded)."""
        from fedlora.server.release.merge import prompt_logits

        return prompt_logits(self.model, self.tokenizer, prompts)
