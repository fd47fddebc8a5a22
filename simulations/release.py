"""The final stages of ``fedlora simulate``: DPO -> fp32 merge -> signed publish -> verify,
and the report sections that show their results."""

from __future__ import annotations

from pathlib import Path

from common.adapter import write_json_atomic
from common.config import Config


def run_stages(cfg: Config, run_dir: Path) -> dict:
    """Run the enabled stages on a finished run directory; results also go to ``release.json``."""
    from server.artifacts import locate
    from server.finalize import run_dpo, run_merge, run_publish, signing_key_for

    source = locate(run_dir)
    out: dict = {}
    if cfg.dpo.enabled:
        print(f"fedlora: DPO on the central preferences ({cfg.dpo.steps} steps)", flush=True)
        out["dpo"] = run_dpo(source)
    if cfg.publish.enabled:
        print("fedlora: merging into the fp32 base and publishing", flush=True)
        out["merge"] = run_merge(source).as_dict()
        registry = Path(cfg.publish.registry) if cfg.publish.registry else run_dir / "registry"
        result = run_publish(source, registry=registry, name=cfg.publish.name,
                             signing_key=signing_key_for(cfg, run_dir), version=cfg.publish.version)
        out["publish"] = {"path": str(result.path), "version": result.version, "files": result.files,
                          "public_key": str(result.public_key) if result.public_key else None,
                          "verified": result.verified, "problems": list(result.problems)}
    write_json_atomic(run_dir / "release.json", out)
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def report_sections(results: dict) -> list[str]:
    """Markdown lines for ``report.md``."""
    lines: list[str] = []
    if "dpo" in results:
        d = results["dpo"]
        b, a = d["before"], d["after"]
        lines += ["## DPO refinement", "",
                  f"{d['steps']} DPO steps (TRL) on {d['train_pairs']} central preference pairs, beta {d['beta']}, "
                  f"learning rate {d['learning_rate']}, {d['seconds']:.1f} s. The reference is the federated "
                  f"aggregate, frozen (max drift {d['reference_drift']:.1g}). Held-out preference pairs: {b['n']}.", "",
                  "| | aggregate | after DPO |", "|---|---|---|",
                  f"| held-out preference accuracy % | {_pct(b['accuracy'])} | {_pct(a['accuracy'])} |",
                  f"| log p(chosen) - log p(rejected) | {b['logp_margin']:.3f} | {a['logp_margin']:.3f} |",
                  f"| reward margin (vs aggregate) | {b['reward_margin']:.3f} | {a['reward_margin']:.3f} |",
                  f"| reward accuracy % | {_pct(b['reward_accuracy'])} | {_pct(a['reward_accuracy'])} |"]
        for t, em in sorted(d["tenants"].items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else kv[0]):
            lines.append(f"| tenant {t} holdout EM % | {_pct(em['before'])} | {_pct(em['after'])} |")
        lines.append("")
    if "merge" in results:
        m = results["merge"]
        lines += ["## Merge", "", f"Final adapter merged into the fp32 base (trained on a {m['trained_precision']} "
                  f"base): max |logit difference| vs base + adapter on {m['prompts']} prompts "
                  f"**{m['max_abs_diff']:.2e}** (tolerance {m['tolerance']:g}).", ""]
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
