"""The report's section on the server's defences: which bounds held, the per-tenant audit
(norms, cosines, weight shares, what was done to whom and why), and a plot of every
tenant's update norm per round against the bound."""

from __future__ import annotations

import statistics
from pathlib import Path

from fedlora.common.config import Config
from fedlora.common.records import RoundRecord

OUTLIER_RULE = ("a tenant is flagged in a round when a bound acted on its update (dropped or clipped for its "
                "L2 norm, weight capped), when the aggregator left it out (Krum), or when the cosine similarity "
                "of its update to the round's coordinate-wise median update is below federation.outlier-cosine, "
                "or below federation.outlier-cosine-ratio x the round's median of those cosines")


def guarantees(cfg: Config) -> list[str]:
    """What bounds a malicious tenant under this configuration, stated exactly."""
    fed, lines = cfg.federation, []
    if cfg.secagg.enabled:
        lines.append("- Secure aggregation: the server sees no individual update, so **no L2-norm bound holds** and "
                     "no robust aggregator can run. What still holds: each element of a tenant's weighted delta "
                     f"(w / {fed.max_weight}) x delta decodes into [-{cfg.secagg.clip:g}, +{cfg.secagg.clip:g}] "
                     "(the quantization range; its L2 norm may reach that times the square root of the adapter "
                     f"size), and its weight into [1, {fed.max_weight}].")
        if cfg.privacy.mode == "central":
            lines.append(f"- Central DP: the sensitivity bound (clip {cfg.privacy.central_clip:g}) rests on every "
                         "tenant clipping its own delta (privacy.trust-clients = true); the epsilon below holds "
                         "only if they do.")
        return lines
    lines.append(f"- Validation: tensor names, shapes, dtypes and finiteness; example claims in [1, {fed.max_examples}].")
    lines.append(f"- Weights: {fed.weighting}, capped at {fed.max_weight}"
                 + (f" and at {fed.weight_multiplier:g} x the round's median weight" if fed.weight_multiplier else ""))
    norm = []
    if fed.max_update_norm:
        norm.append(f"{fed.max_update_norm:g} (absolute)")
    if fed.norm_multiplier:
        norm.append(f"{fed.norm_multiplier:g} x the round's median norm (adaptive: holds while fewer than half "
                    "of a round's tenants collude)")
    lines.append(f"- L2 norm of each update: {' and '.join(norm)}; over it: {fed.bound_policy}" if norm
                 else "- L2 norm of each update: **not bounded** (federation.max-update-norm and "
                      "federation.norm-multiplier are 0)")
    lines.append(f"- Aggregator: {fed.aggregator}")
    if cfg.privacy.mode == "central":
        lines.append(f"- Central DP: the server clips every update to L2 norm {cfg.privacy.central_clip:g} before "
                     "the sum, so the noise's sensitivity holds whatever a tenant sends.")
    return lines


def section(cfg: Config, rounds: list[RoundRecord]) -> list[str]:
    lines = ["## The server's defences and the per-tenant audit", "", *guarantees(cfg), ""]
    audited = [r for r in rounds if r.audit]
    if not audited:
        return lines + ["No individual updates were seen (secure aggregation), so there is no per-tenant audit.", ""]
    tenants = sorted({t for r in audited for t in r.audit}, key=lambda t: (len(t), t))
    lines += [f"Outlier rule: {OUTLIER_RULE}.", "",
              "| tenant | rounds flagged | dropped | clipped | weight capped | left out | median norm | "
              "lowest cosine to median | mean weight share |", "|---|---|---|---|---|---|---|---|---|"]
    for t in tenants:
        a = [r.audit[t] for r in audited if t in r.audit]
        count = {k: sum(x.action == k for x in a) for k in ("dropped", "clipped", "capped", "excluded")}
        lines.append(f"| {t} | {sum(x.outlier for x in a)} / {len(a)} | {count['dropped']} | {count['clipped']} | "
                     f"{count['capped']} | {count['excluded']} | {statistics.median(x.norm for x in a):.3g} | "
                     f"{min(x.cosine_median for x in a):.2f} | {statistics.mean(x.weight_share for x in a):.2f} |")
    flags = [(r.round, t, r.audit[t].why) for r in audited for t in tenants if t in r.audit and r.audit[t].outlier]
    lines.append("")
    if flags:
        lines += ["| round | tenant flagged | why |", "|---|---|---|", *[f"| {n} | {t} | {w} |" for n, t, w in flags], ""]
    else:
        lines += ["No tenant was flagged.", ""]
    return lines


def plot_norms(run_dir: Path, rounds: list[RoundRecord], *, max_tenants_drawn: int = 12) -> Path | None:
    """``plots/update_norms.png``: each tenant's update norm per round, and the bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    audited = [r for r in rounds if r.audit]
    if not audited:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    tenants = sorted({t for r in audited for t in r.audit}, key=lambda t: (len(t), t))[:max_tenants_drawn]
    for t in tenants:
        pts = [(r.round, r.audit[t].norm, r.audit[t].outlier) for r in audited if t in r.audit]
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"tenant {t}")
        flagged = [p for p in pts if p[2]]
        if flagged:
            ax.scatter([p[0] for p in flagged], [p[1] for p in flagged], s=110, facecolors="none",
                       edgecolors="red", linewidths=1.5, zorder=3)
    bounds = [(r.round, r.audit[next(iter(r.audit))].bound) for r in audited]
    if any(b for _, b in bounds):
        ax.plot([b[0] for b in bounds], [b[1] for b in bounds], "k--", label="norm bound")
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("L2 norm of the update (as received)")
    ax.set_title("update norms per tenant (red circle: flagged)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path = run_dir / "plots" / "update_norms.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
