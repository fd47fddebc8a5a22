"""Publish a signed, versioned model: ``<registry>/<name>/<version>/``.

A version holds

* ``adapter/``  - the final adapter in PEFT format (+ ``fedlora.json`` metadata); it names its
  base by portable name (hub id, ``embedded``, an imported base's name), never by a path,
  and records the base's SHA-256 fingerprint, so it loads on any machine that has the base,
* ``merged/``   - the merged fp32 Hugging Face model and its tokenizer (safetensors),
* ``README.md`` - the model card, ``card.json`` - the facts it is written from, and
  ``fedlora-config.json`` - the run configuration,
* ``manifest.json`` + ``manifest.sig`` - SHA-256 of every file, Ed25519-signed
  (:mod:`fedlora.server.release.manifest`).

Versions are immutable: publishing never overwrites one. A version is assembled in a
hidden temporary directory and renamed into place only once it is complete and signed.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from fedlora.common.adapter import METADATA_FILE
from fedlora.common.config import Config
from fedlora.common.files import atomic_dir, file_digest
from fedlora.common.records import RoundRecord, read_rounds, read_summary
from fedlora.server.release.artifacts import VERSION_CONFIG, Source, refuse_failed
from fedlora.server.release.merge import read_report as read_merge_report
from fedlora.server.release.manifest import sign_manifest, write_manifest
from fedlora.server.release.tables import dpo_table, merge_line, pct

CARD_FACTS = "card.json"
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class PublishError(ValueError):
    """A version cannot be published as asked (bad name, existing version, stale merge)."""


@dataclass(frozen=True)
class Published:
    path: Path
    name: str
    version: str
    files: int


def _check_label(kind: str, value: str) -> str:
    if not _LABEL.match(value):
        raise PublishError(f"{kind} {value!r} is not allowed: use letters, digits, '.', '_' or '-' "
                           "(at most 64, starting with a letter or digit)")
    return value


def next_version(registry: str | Path, name: str) -> str:
    """``v1`` for a new model, else one past the highest ``vN`` in the registry."""
    root = Path(registry) / name
    taken = [int(p.name[1:]) for p in root.glob("v*") if p.is_dir() and p.name[1:].isdigit()]
    return f"v{max(taken, default=0) + 1}"


def _round_epsilons(rounds: list[RoundRecord]) -> dict:
    """Epsilon after the last round: central DP (``privacy.epsilon``) and each tenant's
    local DP-SGD spend (``dp-epsilon`` in its train metrics)."""
    out: dict = {}
    for r in rounds:
        if "epsilon" in r.privacy:
            out["central"] = r.privacy["epsilon"]
        out.update({f"tenant {t}": m["dp-epsilon"] for t, m in r.train.items() if "dp-epsilon" in m})
    return out


def card_facts(source: Source, *, name: str, version: str) -> dict:
    """Everything the model card states, from the source's own files."""
    files = source.snapshot or source.root  # a verified version: the bytes that verified
    if source.kind == "version" and (files / CARD_FACTS).is_file():
        old = json.loads((files / CARD_FACTS).read_text())
        return {**old, "name": name, "version": version, "date": _now(), "republished_from": old.get("version")}
    cfg, flat = source.cfg, source.cfg.to_flat()
    fed = read_summary(source.root)
    merge = read_merge_report(source.merged_dir)
    final = source.final_adapter_dir
    if merge is None or merge.get("adapter_sha256") != file_digest(final / "adapter_model.safetensors")[0]:
        raise PublishError(f"{source.merged_dir} is missing or was merged from another adapter than {final}; "
                           f"run `fedlora merge {source.root}` first")
    return {
        "name": name, "version": version, "date": _now(),
        "base_model": portable_base(source), "base_sha256": source.metadata.get("base_sha256") or _fingerprint(cfg),
        "base_precision_in_training": cfg.model.precision,
        "adapter": {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("adapter.")},
        "rounds": fed.rounds if fed else source.metadata.get("round"),
        "tenants": len(fed.tenants) if fed else source.metadata.get("tenants"),
        "aggregation": {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("federation.")},
        "privacy": {k: v for k, v in flat.items() if k.startswith(("privacy.", "secagg."))},
        "epsilon": _round_epsilons(read_rounds(source.root)),
        "evaluation": source.read_json("comparison.json") or [],
        "dpo": source.read_json("dpo/dpo.json"),
        "merge": merge,
        "final_adapter": "dpo-refined" if final != source.aggregate_dir else "federated aggregate",
    }


def portable_base(source: Source) -> str:
    """The base's portable name: what the final adapter records, else derived from ``model.base``.

    An adapter written before fedlora recorded names may hold the training machine's path;
    the version gets a name instead, so loading it elsewhere depends on nothing of that machine.
    """
    from fedlora.common.model import base_name

    cfg_path = source.final_adapter_dir / "adapter_config.json"
    recorded = json.loads(cfg_path.read_text()).get("base_model_name_or_path") if cfg_path.is_file() else None
    if isinstance(recorded, str) and recorded and not Path(recorded).is_absolute() and not recorded.startswith("."):
        return recorded
    return base_name(source.cfg.model.base)


def _make_portable(adapter_dir: Path, base: str) -> None:
    """Name the base (not a path) in the published adapter's config and metadata."""
    cfg_path = adapter_dir / "adapter_config.json"
    peft_cfg = json.loads(cfg_path.read_text())
    peft_cfg["base_model_name_or_path"] = base
    cfg_path.write_text(json.dumps(peft_cfg, indent=2, sort_keys=True) + "\n")
    meta_path = adapter_dir / METADATA_FILE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        meta["base_model"] = base
        if isinstance(meta.get("config"), dict) and "model.base" in meta["config"]:
            meta["config"]["model.base"] = base
        meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))


def _fingerprint(cfg) -> str | None:
    from fedlora.common.model import ModelNotFoundError, base_fingerprint

    try:
        return base_fingerprint(cfg.model.base)
    except (ModelNotFoundError, OSError):
        return None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def model_card(f: dict, cfg: Config) -> str:
    """The README.md of a version: the facts ``f`` (``card.json``) and the run's config."""
    eps = ", ".join(f"{k} = {v:.3g}" + (" (reported by the tenant; the server cannot check it)"
                                        if k.startswith("tenant") else " (the server's accountant)")
                    for k, v in f["epsilon"].items()) or "none recorded"
    a, fed = cfg.adapter, cfg.federation
    lines = [f"# {f['name']} {f['version']}", "",
             "A LoRA-family adapter trained with federated learning (fedlora on Flower) and the same "
             f"adapter merged into its base. Published adapter: {f['final_adapter']}.", "",
             "| | |", "|---|---|",
             f"| base model | `{f['base_model']}` |", f"| base SHA-256 | `{f['base_sha256']}` |",
             f"| base precision in training | {f['base_precision_in_training']} (merged into fp32) |",
             f"| adapter | {a.method} r={a.r} alpha={a.alpha} on `{a.target_modules}` |",
             f"| federated rounds | {f['rounds']} |", f"| tenants | {f['tenants']} |",
             f"| aggregation | `{fed.aggregator}`, server optimizer `{fed.server_optimizer}` (lr {fed.server_lr}), "
             f"max weight {fed.max_weight} examples |",
             f"| differential privacy | {cfg.privacy.mode}; epsilon: {eps} |",
             f"| secure aggregation | {cfg.secagg.enabled} |",
             f"| published | {f['date']} |", ""]
    shown = {k: v for k, v in cfg.to_flat().items()
             if (k.startswith("privacy.") and cfg.privacy.mode != "none") or (k.startswith("secagg.")
                                                                            and cfg.secagg.enabled)}
    if shown:
        lines += ["Privacy settings: " + ", ".join(f"`{k}={v}`" for k, v in sorted(shown.items())), ""]
    if f["evaluation"]:
        tenants = list(f["evaluation"][0]["per_tenant"])
        lines += ["## Evaluation (exact match % on each tenant's holdout)", "",
                  "| model | " + " | ".join(f"tenant {t}" for t in tenants) + " | mean |",
                  "|" + "---|" * (len(tenants) + 2)]
        lines += [f"| {r['model']} | " + " | ".join(pct(r["per_tenant"][t]["exact_match"]) for t in tenants)
                  + f" | {pct(r['mean_exact_match'])} |" for r in f["evaluation"]]
        lines.append("")
    if f.get("dpo"):
        d = f["dpo"]
        lines += ["## DPO refinement", "",
                  f"{d['steps']} steps on {d['train_pairs']} preference pairs, beta {d['beta']}, "
                  f"learning rate {d['learning_rate']}; the reference is the federated aggregate "
                  f"(reference drift {d['reference_drift']:.1g}).", "", *dpo_table(d), ""]
    if f.get("merge"):
        lines += ["## Merge", "", merge_line(f["merge"]), ""]
    lines += ["## Use", "", "Verify first: `fedlora verify <this directory> --public-key <publisher's key>`.", "",
              "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained('merged')",
              "tokenizer = AutoTokenizer.from_pretrained('merged')",
              "# or the adapter on the base (a directory holding it, whose fingerprint is the one above):",
              "# PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_DIR), 'adapter')", "```", ""]
    return "\n".join(lines)


def _copy_files(src: Path, dst: Path, *, link: bool = False) -> None:
    """Regular files only (a symlink or pickle would be refused by the manifest anyway).

    ``link`` hard-links instead of copying where both lie on one filesystem: the merged
    model (538 MB for a 135M base, 28 GB for 7B) is then stored once per run, not once in
    ``merged/`` and again in the registry. Nothing rewrites those files in place (a new
    merge writes a new directory), so the published bytes, hashed in the manifest, stay."""
    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:  # another filesystem, or links not allowed there
            shutil.copy2(a, b)

    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns(".*"),
                    copy_function=link_or_copy if link else shutil.copy2)


def publish(source: Source, *, registry: str | Path, name: str, signing_key: str | Path,
            version: str = "") -> Published:
    """Assemble, hash, sign and atomically place ``<registry>/<name>/<version>/``."""
    refuse_failed(source.root, source.metadata)
    _check_label("name", name)
    version = _check_label("version", version or next_version(registry, name))
    final = Path(registry) / name / version
    if final.exists():
        raise PublishError(f"{final} already exists; versions are immutable, choose another version")
    if not (source.merged_dir / "config.json").is_file():
        raise PublishError(f"{source.merged_dir} has no merged model; run `fedlora merge {source.root}` first")
    facts = card_facts(source, name=name, version=version)
    try:
        with atomic_dir(final, overwrite=False) as tmp:
            _copy_files(source.final_adapter_dir, tmp / "adapter")
            _make_portable(tmp / "adapter", facts["base_model"])
            _copy_files(source.merged_dir, tmp / "merged", link=True)
            flat = {**source.cfg.to_flat(), "model.base": facts["base_model"]}
            (tmp / VERSION_CONFIG).write_text(json.dumps(flat, indent=2, sort_keys=True) + "\n")
            (tmp / CARD_FACTS).write_text(json.dumps(facts, indent=2, sort_keys=True, default=str) + "\n")
            (tmp / "README.md").write_text(model_card(facts, source.cfg))
            write_manifest(tmp, metadata={"name": name, "version": version, "date": facts["date"],
                                          "base_model": facts["base_model"], "base_sha256": facts["base_sha256"]})
            sign_manifest(tmp, signing_key)
    except FileExistsError:
        raise PublishError(f"{final} appeared while publishing; versions are immutable") from None
    files = len(json.loads((final / "manifest.json").read_text())["files"])
    return Published(path=final, name=name, version=version, files=files)
