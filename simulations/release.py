"""What the release stages get from a simulated run (holdouts, preference data, merge-check
prompts, from ``data.dir``), and the report sections that show their results."""

from __future__ import annotations

import json
from pathlib import Path

from fedlora.common.config import Config
from fedlora.common.data import Example, read_examples, read_preferences, tenant_paths
from fedlora.common.templates import PromptFormat, make_format
from fedlora.server.release.stages import ReleaseInputs
from fedlora.server.release.tables import dpo_table, merge_line

# Requests (instruction, input) the merge check uses when the run has no preference holdout.
FALLBACK_REQUESTS = (
    ("Extract the visit as JSON.", "Maria Lopez, 54, was seen for asthma and given salbutamol."),
    ("Extract the transaction as JSON.", "Card ending 0463 - 12.50 EUR at Maple Cafe."),
    ("Say hello.", ""),
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


def merge_prompts(cfg: Config, n: int = 8, *, template: PromptFormat | None = None) -> tuple[str, ...]:
    """Prompts for the merge check, formatted as the run formats them (``data.template``):
    held-out preference requests, else fixed ones."""
    if template is None:
        from fedlora.common.model import load_tokenizer

        template = make_format(cfg.data, load_tokenizer(cfg.model.base))
    path = Path(cfg.data.dir) / "preferences" / "holdout.jsonl" if cfg.data.dir else None
    if path is not None and path.is_file():
        return tuple(template.generation_prompt(p.request()) for p in read_preferences(path)[:n])
    return tuple(template.prompt(instruction, inp) for instruction, inp in FALLBACK_REQUESTS)


def federated_em(run_dir: Path) -> dict[str, float] | None:
    """The aggregate's holdout EM as the comparison already measured it (same function)."""
    path = Path(run_dir) / "comparison.json"
    for row in (json.loads(path.read_text()) if path.is_file() else []):
        if row["model"] == "federated":
            return {t: m["exact_match"] for t, m in row["per_tenant"].items()}
    return None


def release_inputs(cfg: Config, run_dir: Path | None = None, *, preferences_dir: str | Path | None = None
                   ) -> ReleaseInputs:
    """The release stages' inputs from a simulated run's data layout (``data.dir``)."""
    prefs = Path(preferences_dir) if preferences_dir else (Path(cfg.data.dir) / "preferences" if cfg.data.dir
                                                           else None)
    return ReleaseInputs(preferences_dir=prefs, holdouts=tenant_holdouts(cfg),
                         before_em=federated_em(run_dir) if run_dir else None, merge_prompts=merge_prompts(cfg))


def report_sections(results: dict) -> list[str]:
    """Markdown lines for ``report.md``."""
    lines: list[str] = []
    if "dpo" in results:
        d = results["dpo"]
        lines += ["## DPO refinement", "",
                  f"{d['steps']} DPO steps (TRL) on {d['train_pairs']} central preference pairs, beta {d['beta']}, "
                  f"learning rate {d['learning_rate']}, {d['seconds']:.1f} s. The reference is the federated "
                  f"aggregate, frozen (max drift {d['reference_drift']:.1g}). Held-out preference pairs: "
                  f"{d['before']['n']}.", "", *dpo_table(d), ""]
    if "merge" in results:
        lines += ["## Merge", "", merge_line(results["merge"]), ""]
    if "publish" in results:
        p = results["publish"]
        state = {True: "**verified**", False: "**FAILED**", None: "not checked (no public key beside the signing key)"}
        lines += ["## Published version", "", f"- path: `{p['path']}` ({p['files']} files, signed manifest)",
                  f"- verification: {state[p['verified']]}"]
        lines += [f"  - {problem}" for problem in p["problems"]]
        if p["public_key"]:
            lines.append(f"- check it yourself: `fedlora verify {p['path']} --public-key {p['public_key']}`")
        lines.append("")
    return lines
