"""After the federated rounds: DPO refinement -> fp32 merge -> signed publishing.

Each stage works on a :class:`server.artifacts.Source` (a run directory or a published
version) and writes its results beside the run's other artifacts:

* ``dpo/adapter/`` and ``dpo/dpo.json`` (held-out preferences and every tenant's holdout
  exact match, before vs after),
* ``merged/`` (HF model + tokenizer + ``fedlora-merge.json``),
* ``<registry>/<name>/<version>/`` (signed).

``fedlora simulate`` runs them in order; ``fedlora dpo|merge|publish`` run one each.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from common.config import Config
from common.data import Example, format_prompt, read_examples, read_preferences, tenant_paths
from server.artifacts import Source

# Prompts the merge check uses when the run has no preference holdout to draw from.
FALLBACK_PROMPTS = (
    format_prompt("Extract the visit as JSON.", "Maria Lopez, 54, was seen for asthma and given salbutamol."),
    format_prompt("Extract the transaction as JSON.", "Card ending 0463 - 12.50 EUR at Maple Cafe."),
    format_prompt("Say hello."),
)


def tenant_holdouts(cfg: Config) -> dict[str, list[Example]]:
    """Every simulated tenant's holdout under ``data.dir`` (empty when there is none)."""
    if not cfg.data.dir or not Path(cfg.data.dir).is_dir():
        return {}
    out = {}
    for t in range(cfg.simulation.tenants):
        holdout = tenant_paths(cfg.data.dir, t)[1]
        if holdout.is_file():
            out[str(t)] = read_examples(holdout, fmt=cfg.data.format)
    return out


def _holdout_em(cfg: Config, state, holdouts: dict[str, list[Example]]) -> dict[str, float]:
    from common.adapter import set_state
    from common.evaluate import evaluate
    from common.model import load_model

    loaded = load_model(cfg.model, cfg.adapter, seed=cfg.train.seed, for_training=False)
    set_state(loaded.model, state)
    return {t: evaluate(loaded.model, loaded.tokenizer, rows, cfg.eval, max_length=cfg.data.max_length,
                        device=loaded.device).exact_match for t, rows in holdouts.items()}


def _federated_em(source: Source) -> dict[str, float] | None:
    """The aggregate's holdout EM as the comparison already measured it (same function)."""
    for row in source.read_json("comparison.json") or []:
        if row["model"] == "federated":
            return {t: m["exact_match"] for t, m in row["per_tenant"].items()}
    return None


def run_dpo(source: Source, *, preferences_dir: str | Path | None = None,
            out_dir: str | Path | None = None) -> dict:
    """Refine the source's aggregate with DPO; writes ``<out>/adapter`` and ``<out>/dpo.json``."""
    from peft import PeftConfig

    from common.adapter import load_adapter_file, save_adapter
    from server.dpo import read_preference_sets, refine, write_report

    cfg = source.cfg
    prefs_dir = Path(preferences_dir) if preferences_dir else Path(cfg.data.dir) / "preferences"
    if not (prefs_dir / "train.jsonl").is_file():
        raise FileNotFoundError(f"no preference data at {prefs_dir}/train.jsonl; pass --preferences DIR "
                                "holding train.jsonl and holdout.jsonl (rows prompt/chosen/rejected)")
    out = Path(out_dir) if out_dir else source.root / "dpo"
    state, report = refine(source.aggregate_dir, read_preference_sets(prefs_dir), cfg, output_dir=out / "trainer")
    shutil.rmtree(out / "trainer", ignore_errors=True)  # TRL's working directory; nothing is saved there
    peft_cfg = PeftConfig.from_pretrained(str(source.aggregate_dir))
    save_adapter(out / "adapter", state, peft_cfg, base_model=peft_cfg.base_model_name_or_path,
                 metadata={**source.metadata, "dpo": {"beta": report.beta, "steps": report.steps,
                                                      "learning_rate": report.learning_rate}})
    holdouts = tenant_holdouts(cfg)
    tenants = {}
    if holdouts:
        before = _federated_em(source) or _holdout_em(cfg, load_adapter_file(source.aggregate_dir), holdouts)
        after = _holdout_em(cfg, state, holdouts)
        tenants = {t: {"before": before[t], "after": after[t]} for t in holdouts if t in before}
    write_report(out / "dpo.json", report, tenants=tenants, preferences=str(prefs_dir))
    return {**report.as_dict(), "tenants": tenants}


def merge_prompts(cfg: Config, n: int = 8) -> list[str]:
    """Sample prompts for the merge check: held-out preference prompts, else fixed ones."""
    path = Path(cfg.data.dir) / "preferences" / "holdout.jsonl" if cfg.data.dir else None
    if path is not None and path.is_file():
        return [p.prompt for p in read_preferences(path)[:n]]
    return list(FALLBACK_PROMPTS)


def run_merge(source: Source, *, out_dir: str | Path | None = None):
    """Merge the source's final adapter into the fp32 base; returns the MergeReport."""
    from server.merge import merge

    if out_dir is None and source.kind == "version":
        raise ValueError(f"{source.root} is a published version and must not change; pass --out DIR")
    out = Path(out_dir) if out_dir else source.merged_dir
    return merge(source.final_adapter_dir, out, source.cfg.model, prompts=merge_prompts(source.cfg))


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
    from common.credentials import write_signing_keypair

    if cfg.publish.signing_key:
        return Path(cfg.publish.signing_key).expanduser()
    key = run_dir / "keys" / "fedlora-signing.key"
    if not key.is_file():
        write_signing_keypair(run_dir / "keys")
    return key


def run_publish(source: Source, *, registry: str | Path, name: str, signing_key: str | Path,
                version: str = "") -> PublishResult:
    """Publish the source and verify the result with the key's ``.pub`` beside it, if any."""
    from server.publish import publish
    from server.publish_manifest import verify_version

    published = publish(source, registry=registry, name=name, signing_key=signing_key, version=version)
    public = Path(signing_key).with_suffix(".pub")
    if not public.is_file():
        return PublishResult(published.path, published.version, published.files, None, None, ())
    result = verify_version(published.path, public)
    return PublishResult(published.path, published.version, published.files, public, result.ok, result.problems)
