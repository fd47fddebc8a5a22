"""After the federated rounds: DPO refinement -> fp32 merge -> signed publishing.

Each stage works on a :class:`fedlora.server.release.artifacts.Source` (a run directory or a
published version) and writes its results beside the run's other artifacts:

* ``dpo/adapter/`` and ``dpo/dpo.json`` (held-out preferences and every holdout's exact
  match, before vs after),
* ``merged/`` (HF model + tokenizer + ``fedlora-merge.json``),
* ``<registry>/<name>/<version>/`` (signed).

The stages are given their inputs (:class:`ReleaseInputs`: preference data, holdouts to
score, prompts for the merge check); where those came from is the caller's business.
:func:`run_stages` runs the enabled ones in order; ``fedlora dpo|merge|publish`` run one each.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from fedlora.common.files import write_json_atomic
from fedlora.common.config import Config
from fedlora.common.data import Example
from fedlora.server.release.artifacts import Source, require_verified


@dataclass(frozen=True)
class ReleaseInputs:
    """What the release stages read besides the run's own artifacts."""

    # Directory with train.jsonl and holdout.jsonl of preference rows (prompt/chosen/rejected).
    preferences_dir: Path | None = None
    # Holdouts scored before and after DPO, by name (e.g. tenant id); empty: none scored.
    holdouts: Mapping[str, list[Example]] = field(default_factory=dict)
    # Exact match of the aggregate on those holdouts, when the caller already measured it.
    before_em: Mapping[str, float] | None = None
    # Prompts on which the merged model must match base + adapter.
    merge_prompts: tuple[str, ...] = ()


def _holdout_em(cfg: Config, state, holdouts: Mapping[str, list[Example]]) -> dict[str, float]:
    from fedlora.common.adapter import set_state
    from fedlora.common.evaluate import evaluate
    from fedlora.common.model import load_model
    from fedlora.common.templates import make_format

    loaded = load_model(cfg.model, cfg.adapter, seed=cfg.train.seed, for_training=False)
    set_state(loaded.model, state)
    fmt = make_format(cfg.data, loaded.tokenizer)
    return {t: evaluate(loaded.model, loaded.tokenizer, rows, cfg.eval, max_length=cfg.data.max_length,
                        device=loaded.device, template=fmt).exact_match for t, rows in holdouts.items()}


def run_dpo(source: Source, inputs: ReleaseInputs, *, out_dir: str | Path | None = None) -> dict:
    """Refine the source's aggregate with DPO; writes ``<out>/adapter`` and ``<out>/dpo.json``."""
    from peft import PeftConfig

    from fedlora.common.adapter import load_adapter_file, save_adapter
    from fedlora.server.release.dpo import read_preference_sets, refine, write_report

    require_verified(source, stage="DPO")
    cfg = source.cfg
    prefs_dir = inputs.preferences_dir
    if prefs_dir is None or not (Path(prefs_dir) / "train.jsonl").is_file():
        raise FileNotFoundError(f"no preference data at {prefs_dir}/train.jsonl; pass --preferences DIR "
                                "holding train.jsonl and holdout.jsonl (rows prompt/chosen/rejected)")
    out = Path(out_dir) if out_dir else source.root / "dpo"
    state, report = refine(source.aggregate_dir, read_preference_sets(prefs_dir), cfg, output_dir=out / "trainer")
    shutil.rmtree(out / "trainer", ignore_errors=True)  # TRL's working directory; nothing is saved there
    peft_cfg = PeftConfig.from_pretrained(str(source.aggregate_dir))
    save_adapter(out / "adapter", state, peft_cfg, base_model=peft_cfg.base_model_name_or_path,
                 metadata={**source.metadata, "dpo": {"beta": report.beta, "steps": report.steps,
                                                      "learning_rate": report.learning_rate}})
    tenants = {}
    if inputs.holdouts:
        before = dict(inputs.before_em or {}) or _holdout_em(cfg, load_adapter_file(source.aggregate_dir),
                                                             inputs.holdouts)
        after = _holdout_em(cfg, state, inputs.holdouts)
        tenants = {t: {"before": before[t], "after": after[t]} for t in inputs.holdouts if t in before}
    write_report(out / "dpo.json", report, tenants=tenants, preferences=str(prefs_dir))
    return {**report.as_dict(), "tenants": tenants}


def run_merge(source: Source, inputs: ReleaseInputs, *, out_dir: str | Path | None = None):
    """Merge the source's final adapter into the fp32 base; returns the MergeReport."""
    from fedlora.server.release.merge import merge

    require_verified(source, stage="merge")
    if out_dir is None and source.kind == "version":
        raise ValueError(f"{source.root} is a published version and must not change; pass --out DIR")
    if not inputs.merge_prompts:
        raise ValueError("the merge check needs at least one prompt")
    out = Path(out_dir) if out_dir else source.merged_dir
    return merge(source.final_adapter_dir, out, source.cfg.model, prompts=list(inputs.merge_prompts))


@dataclass(frozen=True)
class PublishResult:
    path: Path
    version: str
    files: int
    public_key: Path | None
    verified: bool | None      # None when no public key was found to check with
    problems: tuple[str, ...]


def signing_key_for(cfg: Config, run_dir: Path) -> Path:
    """The configured signing key, or one made (once) in ``<run dir>/keys``."""
    from fedlora.common.credentials import write_signing_keypair

    if cfg.publish.signing_key:
        return Path(cfg.publish.signing_key).expanduser()
    key = run_dir / "keys" / "fedlora-signing.key"
    if not key.is_file():
        write_signing_keypair(run_dir / "keys")
    return key


def run_publish(source: Source, *, registry: str | Path, name: str, signing_key: str | Path,
                version: str = "") -> PublishResult:
    """Publish the source and verify the result with the key's ``.pub`` beside it, if any."""
    from fedlora.server.release.manifest import verify_version
    from fedlora.server.release.publish import publish

    published = publish(source, registry=registry, name=name, signing_key=signing_key, version=version)
    public = Path(signing_key).with_suffix(".pub")
    if not public.is_file():
        return PublishResult(published.path, published.version, published.files, None, None, ())
    result = verify_version(published.path, public)
    return PublishResult(published.path, published.version, published.files, public, result.ok, result.problems)


def run_stages(cfg: Config, run_dir: Path, inputs: ReleaseInputs) -> dict:
    """Run the enabled stages on a finished run directory; results also go to ``release.json``."""
    from fedlora.common.model import set_threads
    from fedlora.server.release.artifacts import locate

    set_threads(cfg.train.threads)
    source = locate(run_dir)
    out: dict = {}
    if cfg.dpo.enabled:
        print(f"fedlora: DPO on the central preferences ({cfg.dpo.steps} steps)", flush=True)
        out["dpo"] = run_dpo(source, inputs)
    if cfg.publish.enabled:
        print("fedlora: merging into the fp32 base and publishing", flush=True)
        out["merge"] = run_merge(source, inputs).as_dict()
        registry = Path(cfg.publish.registry) if cfg.publish.registry else run_dir / "registry"
        result = run_publish(source, registry=registry, name=cfg.publish.name,
                             signing_key=signing_key_for(cfg, run_dir), version=cfg.publish.version)
        out["publish"] = {"path": str(result.path), "version": result.version, "files": result.files,
                          "public_key": str(result.public_key) if result.public_key else None,
                          "verified": result.verified, "problems": list(result.problems)}
    write_json_atomic(run_dir / "release.json", out)
    return out
