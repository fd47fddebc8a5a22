"""Where the after-the-rounds stages find their inputs: a run directory or a published version.

A *run directory* (written by the ServerApp) holds ``config.json``, the
aggregated ``adapter/`` and, after the later stages, ``dpo/adapter/`` and ``merged/``.
A *published version* (``<registry>/<name>/<version>/``) holds ``adapter/``, ``merged/``
and ``manifest.json``; its configuration travels inside ``adapter/fedlora.json``.
Either way the stages get the same :class:`Source`, so DPO, merge and publish never need
the original run's memory.

Two refusals live here, so that every stage gets them: an adapter whose metadata carries a
``failure`` (a federation that aggregated too little, ``federation.min-successful-rounds``)
is never refined, merged or published; and a published version is used only after its
signed manifest verified against the publisher's public key (:func:`require_verified`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedlora.common.adapter import METADATA_FILE
from fedlora.common.config import Config, parse_config


VERSION_CONFIG = "fedlora-config.json"  # a published version's copy of the run configuration


class SourceError(FileNotFoundError):
    """A path is neither a run directory nor a published version, or must not be used."""


def check_safetensors(path: Path) -> None:
    """Refuse a weights file whose safetensors header does not parse (truncated, not safetensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            fh.keys()
    except Exception as err:  # safetensors raises SafetensorError, OSError...
        raise SourceError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]})") from None


def refuse_failed(root: Path, metadata: dict) -> None:
    """A failed federation's adapter (``failure`` in its fedlora.json, or FEDERATION_FAILED) is not released."""
    failure = metadata.get("failure")
    if not failure and (root / "FEDERATION_FAILED").is_file():
        failure = json.loads((root / "FEDERATION_FAILED").read_text() or "{}").get("failure") or "FEDERATION_FAILED"
    if failure:
        raise SourceError(f"{root / 'adapter'} comes from a failed federation ({failure}); fedlora does not refine, "
                          "merge or publish it")


@dataclass(frozen=True)
class Source:
    """The artifacts of a run directory or a published version."""

    kind: str          # "run" or "version"
    root: Path
    cfg: Config        # the configuration the adapter was trained with
    metadata: dict     # the final adapter's fedlora.json (base hash, rounds, ...)
    verified: bool = False  # a version whose signed manifest verified against a public key
    snapshot: Path | None = None  # a verified version: the private copy of the bytes that verified

    @property
    def aggregate_dir(self) -> Path:
        """The federated aggregate (a version has only its published adapter)."""
        return (self.snapshot or self.root) / "adapter"

    @property
    def final_adapter_dir(self) -> Path:
        """The adapter to merge and publish: the DPO-refined one when DPO ran."""
        refined = self.root / "dpo" / "adapter"
        if self.kind == "run" and (refined / "adapter_model.safetensors").is_file():
            return refined
        return (self.snapshot or self.root) / "adapter"

    @property
    def merged_dir(self) -> Path:
        return self.root / "merged"

    def read_json(self, rel: str) -> dict | list | None:
        """A JSON file of the run (``federation.json``, ...), or None when absent."""
        path = (self.snapshot or self.root) / rel
        return json.loads(path.read_text()) if path.is_file() else None


def locate(path: str | Path, *, public_key: str | Path | None = None) -> Source:
    """Open ``path`` as a run directory or a published version, or say what is missing.

    A failed federation's adapter is refused. With ``public_key`` the caller says ``path`` is a
    published version: it must verify, whatever files it holds (a directory without a signed
    manifest is refused, never read as a run), and the stages read a private copy of the bytes
    that verified (:func:`fedlora.server.release.snapshot.verified_snapshot`). Without one, a
    directory with a manifest is an unverified version, which the stages that use its weights
    refuse (:func:`require_verified`).
    """
    root = Path(path).expanduser().resolve()
    snapshot = None
    if public_key is not None:
        from fedlora.server.release.snapshot import SnapshotError, verified_snapshot

        try:
            snapshot = verified_snapshot(root, public_key)
        except (SnapshotError, NotADirectoryError) as why:
            raise SourceError(f"{why} (a public key was given: {root} must be a signed published version)") from None
    files = snapshot or root
    meta_path = files / "adapter" / METADATA_FILE
    if not (files / "adapter" / "adapter_model.safetensors").is_file():
        raise SourceError(f"{root} has no adapter/adapter_model.safetensors; give a run directory whose "
                          "federation finished, or a published version <registry>/<name>/<version>")
    try:
        metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except ValueError as err:
        raise SourceError(f"{meta_path}: not valid JSON ({err})") from None
    refuse_failed(root, metadata)
    if snapshot is None and (root / "config.json").is_file():
        flat, kind = json.loads((root / "config.json").read_text()), "run"
    elif (files / VERSION_CONFIG).is_file():
        flat, kind = json.loads((files / VERSION_CONFIG).read_text()), "version"
    elif "config" in metadata:
        flat, kind = metadata["config"], "version"
    else:
        raise SourceError(f"{root}: no config.json and no configuration in adapter/{METADATA_FILE}; "
                          "it was not written by fedlora")
    if snapshot is not None or (root / "manifest.json").is_file():
        kind = "version"
    known = {k: v for k, v in flat.items() if k in Config().to_flat()}
    source = Source(kind=kind, root=root, cfg=parse_config(known, source=str(root)), metadata=metadata,
                    verified=snapshot is not None, snapshot=snapshot)
    for weights in {source.aggregate_dir, source.final_adapter_dir}:
        check_safetensors(weights / "adapter_model.safetensors")
    return source


def with_base(source: Source, base: str | Path | None = None) -> Source:
    """The source with its base located on this machine (``base``: ``--base PATH``) and checked.

    An artifact records its base by portable name and fingerprint, not by where it was on
    the training machine; the base found here (``base``, else the recorded ``model.base``)
    must have the recorded fingerprint, or merge/DPO would silently use another model.
    """
    import dataclasses

    from fedlora.common.model import require_base

    resolved = require_base(source.cfg.model.base, source.metadata.get("base_sha256"), override=base,
                            what=f"{source.aggregate_dir}")
    if base is None:
        return source
    return dataclasses.replace(source, cfg=source.cfg.replace(**{"model.base": resolved}))


def require_verified(source: Source, *, stage: str) -> None:
    """A published version's files are used only after its signature verified."""
    if source.kind == "version" and not source.verified:
        raise SourceError(f"{source.root} is a published version; {stage} uses it only after verifying its "
                          "signature: pass --public-key with the publisher's Ed25519 public key")
