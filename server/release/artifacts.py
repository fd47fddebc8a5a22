"""Where the after-the-rounds stages find their inputs: a run directory or a published version.

A *run directory* (written by the ServerApp) holds ``config.json``, the
aggregated ``adapter/`` and, after the later stages, ``dpo/adapter/`` and ``merged/``.
A *published version* (``<registry>/<name>/<version>/``) holds ``adapter/``, ``merged/``
and ``manifest.json``; its configuration travels inside ``adapter/fedlora.json``.
Either way the stages get the same :class:`Source`, so DPO, merge and publish never need
the original run's memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.adapter import METADATA_FILE
from common.config import Config, parse_config


VERSION_CONFIG = "fedlora-config.json"  # a published version's copy of the run configuration


class SourceError(FileNotFoundError):
    """A path is neither a run directory nor a published version."""


@dataclass(frozen=True)
class Source:
    """The artifacts of a run directory or a published version."""

    kind: str          # "run" or "version"
    root: Path
    cfg: Config        # the configuration the adapter was trained with
    metadata: dict     # the final adapter's fedlora.json (base hash, rounds, ...)

    @property
    def aggregate_dir(self) -> Path:
        """The federated aggregate (a version has only its published adapter)."""
        return self.root / "adapter"

    @property
    def final_adapter_dir(self) -> Path:
        """The adapter to merge and publish: the DPO-refined one when DPO ran."""
        refined = self.root / "dpo" / "adapter"
        if self.kind == "run" and (refined / "adapter_model.safetensors").is_file():
            return refined
        return self.root / "adapter"

    @property
    def merged_dir(self) -> Path:
        return self.root / "merged"

    def read_json(self, rel: str) -> dict | list | None:
        """A JSON file of the run (``federation.json``, ...), or None when absent."""
        path = self.root / rel
        return json.loads(path.read_text()) if path.is_file() else None


def locate(path: str | Path) -> Source:
    """Open ``path`` as a run directory or a published version, or say what is missing."""
    root = Path(path).expanduser().resolve()
    meta_path = root / "adapter" / METADATA_FILE
    if not (root / "adapter" / "adapter_model.safetensors").is_file():
        raise SourceError(f"{root} has no adapter/adapter_model.safetensors; give a run directory whose "
                          "federation finished, or a published version <registry>/<name>/<version>")
    metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if (root / "config.json").is_file():
        flat, kind = json.loads((root / "config.json").read_text()), "run"
    elif (root / VERSION_CONFIG).is_file():
        flat, kind = json.loads((root / VERSION_CONFIG).read_text()), "version"
    elif "config" in metadata:
        flat, kind = metadata["config"], "version"
    else:
        raise SourceError(f"{root}: no config.json and no configuration in adapter/{METADATA_FILE}; "
                          "it was not written by fedlora")
    if (root / "manifest.json").is_file():
        kind = "version"
    known = {k: v for k, v in flat.items() if k in Config().to_flat()}
    return Source(kind=kind, root=root, cfg=parse_config(known, source=str(root)), metadata=metadata)
