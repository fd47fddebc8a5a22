"""Plots and the Markdown report of a run directory.

Everything is read back from files the run wrote (``metrics/round_*.json`` and
``federation.json`` through :mod:`fedlora.common.records`, ``comparison.json``) and from the run's one
parsed :class:`~fedlora.common.config.Config` (:func:`run_config` reads ``config.json``), so a report
can be rebuilt without re-running.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import matplotlib

from fedlora.common.config import Config, parse_config
from fedlora.common.records import FederationSummary, RoundRecord, read_rounds, read_summary
from fedlora.server.release.tables import md_text, pct

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedlora.simulations.audit_report import plot_norms  # noqa: E402
from fedlora.simulations.audit_report import section as audit_section  # noqa: E402


def run_config(run_dir: Path) -> Config:
    """The configuration the run wrote (``config.json``), parsed."""
    path = run_dir / "config.json"
    return parse_config(json.loads(path.read_text()), source=str(path))


def _per_tenant_series(rounds: list[RoundRecord], section: str, key: str) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = {}
    for r in rounds:
        for tenant, m in getattr(r, section).items():
            if key not in m:  # withheld by the tenant's policy
                continue
            xs, ys = series.setdefault(tenant, ([], []))
            xs.append(r.round)
            ys.append(m[key])
    return series


def plot(run_dir: Path, *, max_tenants_drawn: int = 12) -> list[Path]:
    """PNG plots: loss and exact match per tenant per round; bytes per round."""
    rounds = read_rounds(run_dir)
    out = []
    if not rounds:
        return out
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (section, key, title) in zip(axes, [("train", "train-loss", "training loss (end of local run)"),
                                              ("eval", "eval-loss", "holdout loss (global adapter)"),
                                              ("eval", "eval-exact-match", "holdout exact match (global adapter)")]):
        series = _per_tenant_series(rounds, section, key)
        for tenant in sorted(series, key=lambda t: (len(t), t))[:max_tenants_drawn]:
            xs, ys = series[tenant]
            ax.plot(xs, ys, marker="o", label=f"tenant {tenant}")
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[2].set_ylim(-0.02, 1.02)
    handles, labels = axes[2].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = run_dir / "plots" / "tenants_per_round.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(path)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [r.round for r in rounds]
    ax.bar([x - 0.2 for x in xs], [r.bytes_down / 1e6 for r in rounds], width=0.4, label="server -> tenants")
    ax.bar([x + 0.2 for x in xs], [r.bytes_up / 1e6 for r in rounds], width=0.4, label="tenants -> server")
    ax.set_xlabel("round")
    ax.set_ylabel("MB")
    ax.set_title("bytes on the wire per round (adapter tensors)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = run_dir / "plots" / "bytes_per_round.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(path)
    norms = plot_norms(run_dir, rounds, max_tenants_drawn=max_tenants_drawn)
    return out + ([norms] if norms else [])


def comparison_table(rows: list[dict]) -> str:
    tenants = list(rows[0]["per_tenant"])
    head = "| model | " + " | ".join(f"tenant {t} EM %" for t in tenants) + \
        " | mean EM % | mean JSON valid % | mean holdout loss | probe loss (forgetting) |"
    sep = "|" + "---|" * (len(tenants) + 5)
    lines = [head, sep]
    for r in rows:
        cells = [pct(r["per_tenant"][t]["exact_match"]) for t in tenants]
        lines.append(f"| {r['model']} | " + " | ".join(cells) +
                     f" | **{pct(r['mean_exact_match'])}** | {pct(r['mean_json_valid'])} | "
                     f"{r['mean_loss']:.3f} | {r['probe_loss']:.3f} |")
    return "\n".join(lines)


ON_OFF = {True: "on", False: "OFF"}


def _engine(cfg: Config, fed: FederationSummary) -> str:
    """Which Flower engine ran the apps, and with which transport security."""
    if cfg.deployment.engine != "deployment":
        return f"Flower simulation, {cfg.simulation.tenants} tenants"
    return (f"Flower Deployment Engine (SuperLink + SuperNodes), TLS {ON_OFF[cfg.deployment.tls]}, "
            f"SuperNode authentication {ON_OFF[cfg.deployment.node_auth]}, {len(fed.tenants)} tenants")


def write_report(run_dir: Path, cfg: Config, *, comparison: list[dict], extra_sections: list[str] = ()) -> Path:
    """``report.md`` with the comparison table, rounds, drops, bytes and plots."""
    fed = read_summary(run_dir)
    rounds = read_rounds(run_dir)
    lines = ["# fedlora run report", ""]
    lines += [f"- base model: `{cfg.model.base}` ({cfg.model.precision}), adapter: {cfg.adapter.method} "
              f"r={cfg.adapter.r} alpha={cfg.adapter.alpha} on `{cfg.adapter.target_modules}`",
              f"- engine: {_engine(cfg, fed)}, {fed.rounds} rounds, "
              f"{cfg.train.local_steps} local steps per round, aggregator `{cfg.federation.aggregator}`",
              f"- federated wall time: {fed.seconds:.1f} s; adapter size {fed.adapter_bytes / 1e6:.3f} MB",
              ""]
    if comparison:
        lines += ["## Every model on every tenant's holdout", "",
                  "Exact match (EM) by greedy decoding; JSON compared as objects. The probe loss is the "
                  "token loss on the base model's own kind of text (lower is better; a rise means forgetting).", "",
                  comparison_table(comparison), ""]
        by = {r["model"]: r for r in comparison}
        if "federated" in by and "pooled" in by:
            fed_em, pool_em = by["federated"]["mean_exact_match"], by["pooled"]["mean_exact_match"]
            locals_ = [r["mean_exact_match"] for r in comparison if r["model"].startswith("local-only")]
            ratio = fed_em / pool_em if pool_em else float("nan")
            lines += [f"Federated / pooled mean EM: **{ratio:.3f}**; best local-only mean EM: "
                      f"{pct(max(locals_)) if locals_ else 'n/a'} % vs federated {pct(fed_em)} %.", ""]
        local_budget = next((r["budget"] for r in comparison if r["model"].startswith("local-only")
                             and r.get("budget")), None)
        if local_budget and by["pooled"].get("budget"):
            lines += [f"Budgets: each local-only adapter {local_budget} (its tenant's share of the federation); "
                      f"pooled {by['pooled']['budget']}.", ""]
    lines += ["## Rounds", "",
              "| round | sampled | finished | dropped | mean holdout EM % | MB down | MB up | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        ems = r.eval_exact_match()
        em = pct(sum(ems) / len(ems)) if ems else "-"
        lines.append(f"| {r.round} | {len(r.sampled)} | {len(r.finished)} | {len(r.dropped)} | {em} | "
                     f"{r.bytes_down / 1e6:.3f} | {r.bytes_up / 1e6:.3f} | {r.seconds:.1f} |")
    lines.append("")
    if fed.dropped:
        lines += ["## Dropped replies", "", "| round | tenant | reason |", "|---|---|---|"]
        lines += [f"| {d.round} | {md_text(d.tenant)} | {md_text(d.reason)} |" for d in fed.dropped]
        lines.append("")
    lines += declines_section(fed.dropped)
    lines += privacy_section(run_dir, cfg, rounds, comparison)
    lines += secagg_section(cfg, rounds)
    lines += audit_section(cfg, rounds)
    lines += list(extra_sections)
    lines += ["## Plots", "", "![per tenant](plots/tenants_per_round.png)", "",
              "![bytes](plots/bytes_per_round.png)", ""]
    if (run_dir / "plots" / "update_norms.png").is_file():
        lines += ["![update norms](plots/update_norms.png)", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


_DECLINE = re.compile(r"policy: tenant (\d+): ")


def declines_section(dropped) -> list[str]:
    """Each tenant's declines under its own policy: how many messages, and for which reasons (codes)."""
    by: dict[str, Counter] = {}
    for d in dropped:
        m = _DECLINE.search(d.reason)
        if m:
            by.setdefault(m.group(1), Counter()).update(re.findall(r"\[([a-z0-9-]+)\]", d.reason[m.end():]))
            by[m.group(1)]["_messages"] += 1
    if not by:
        return []
    lines = ["## Declined by the tenants' own policies", "",
             "A tenant node with a policy (`fedlora deploy supernode --policy`) declines, before any work, every "
             "task whose run config or message breaks it; the reason codes are the tenant's.", "",
             "| tenant | messages declined | reasons (code: count) |", "|---|---|---|"]
    for tenant in sorted(by, key=int):
        counts = by[tenant]
        n = counts.pop("_messages")
        lines.append(f"| {tenant} | {n} | {', '.join(f'{c}: {k}' for c, k in sorted(counts.items()))} |")
    return [*lines, ""]


def privacy_section(run_dir: Path, cfg: Config, rounds: list[RoundRecord], comparison: list[dict]) -> list[str]:
    """Epsilon per tenant (local DP), central epsilon per round, delta, and quality with vs without DP."""
    p = cfg.privacy
    if p.mode == "none":
        return []
    lines = ["## Differential privacy", "", f"- mode: **{p.mode}**, delta = {p.delta:g}"]
    if p.mode == "local":
        last: dict[str, float] = {}
        for r in rounds:
            last.update({t: m["dp-epsilon"] for t, m in r.train.items() if "dp-epsilon" in m})
        declined = [(r.round, d.tenant) for r in rounds for d in r.dropped
                    if "privacy budget exhausted" in d.reason]
        noise = (f"target epsilon {p.target_epsilon:g} per run" if p.target_epsilon > 0
                 else f"noise multiplier {p.noise_multiplier:g}")
        lines += [f"- local DP-SGD (record level): {noise}, "
                  f"per-example clip {p.max_grad_norm:g}, lifetime budget "
                  f"{p.budget:g} per tenant, {p.sampling} sampling", "",
                  "| tenant | epsilon spent (ledger, all runs) |", "|---|---|"]
        lines += [f"| {t} | {eps:.3f} |" for t, eps in sorted(last.items(), key=lambda kv: (len(kv[0]), kv[0]))]
        lines += ["", f"Declined for budget: {', '.join(f'tenant {t} (round {n})' for n, t in declined) or 'none'}."]
    else:
        lines += [f"- central DP (tenant level): delta clip {p.central_clip:g} on every client, "
                  f"noise multiplier {p.central_noise_multiplier:g} on the sum, calibrated to "
                  "the updates received", "",
                  "| round | received | sampled | sampling rate | noise std on the mean | central epsilon |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r.round} | {c['received']} | {c['sampled']} | {c['sample_rate']:.3f} | "
                  f"{c['noise_std_mean']:.4g} | {c['epsilon']:.3f} |" for r in rounds if (c := r.privacy)]
    by = {r["model"]: r for r in comparison}
    ref_path = run_dir / "without_dp" / "comparison.json"
    if "federated" in by and ref_path.is_file():
        ref = {r["model"]: r for r in json.loads(ref_path.read_text())}["federated"]
        with_dp, without = by["federated"]["mean_exact_match"], ref["mean_exact_match"]
        ratio = with_dp / without if without else float("nan")
        lines += ["", "| federated adapter | mean EM % | mean holdout loss |", "|---|---|---|",
                  f"| with DP | {pct(with_dp)} | {by['federated']['mean_loss']:.3f} |",
                  f"| without DP (same data, same seeds) | {pct(without)} | {ref['mean_loss']:.3f} |", "",
                  f"With / without DP mean EM: **{ratio:.3f}**. Local-only and pooled baselines above train "
                  "without DP."]
    return lines + [""]


def secagg_section(cfg: Config, rounds: list[RoundRecord]) -> list[str]:
    """Whether secure aggregation was on; per round: attempts, finishers, drops per stage, failure."""
    sa = cfg.secagg
    if not sa.enabled:
        return ["## Secure aggregation", "", "Off: the server saw each tenant's individual delta.", ""]
    signed = any((r.secagg or {}).get("authenticated") for r in rounds)
    stages = ("setup", "key sharing", "masked upload", *(("consistency",) if signed else ()), "unmasking")
    lines = ["## Secure aggregation", "",
             f"On (SecAgg+): the server learned only the sum of the weighted deltas and the total weight. "
             f"Neighbours per tenant: {sa.neighbours or 'all'}; a secret needs more than "
             f"{sa.threshold:g} of its holders; values clipped to +-{sa.clip:g}, "
             f"{sa.quantization_bits} bits, mod 2^{sa.modulus_bits}. "
             + ("Authenticated: each tenant signed its keys and the survivor set with its node key and checked "
                "its neighbours' against its roster." if signed else
                "Not authenticated (no tenant signed its keys): this holds against a server that follows the "
                "protocol."), "",
             "| round | attempts | finished | " + " | ".join(f"dropped in {s}" for s in stages) + " | failure |",
             "|---|---|---|" + "---|" * len(stages) + "---|"]
    for r in rounds:
        s = r.secagg or {}
        per = s.get("dropped_per_stage", {})
        lines.append(f"| {r.round} | {s.get('attempts', '-')} | {s.get('finished', '-')} | "
                     + " | ".join(str(per.get(st, 0)) for st in stages) + f" | {md_text(s.get('failure') or '-')} |")
    return lines + [""]
