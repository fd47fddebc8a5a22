"""Markdown the model card (:mod:`fedlora.server.release.publish`) and the run report share: the DPO
before/after table and the merge check, from the reports the stages wrote."""

from __future__ import annotations


_MD = str.maketrans({"\\": "\\\\", "|": "\\|", "`": "\\`", "*": "\\*", "_": "\\_", "[": "\\[", "]": "\\]",
                     "#": "\\#", "<": "&lt;", ">": "&gt;", "&": "&amp;", "\n": " ", "\r": " "})


def md_text(text: object) -> str:
    """Text from outside (a tenant's error reason, a failure message) as literal Markdown in one
    line or table cell: no markup, no HTML, no line breaks, no cell boundaries survive."""
    return str(text).translate(_MD)


def pct(x: float) -> str:
    """A fraction as a percentage with one decimal (0.9375 -> "93.8")."""
    return f"{100 * x:.1f}"


def _tenant_order(tenant: str):
    return (0, int(tenant), "") if tenant.isdigit() else (1, 0, tenant)


def dpo_table(d: dict) -> list[str]:
    """Held-out preference metrics of the aggregate vs after DPO, and each holdout's exact
    match, from ``dpo/dpo.json`` (:func:`fedlora.server.release.dpo.write_report`)."""
    b, a = d["before"], d["after"]
    lines = ["| held-out preferences | aggregate | after DPO |", "|---|---|---|",
             f"| preference accuracy % | {pct(b['accuracy'])} | {pct(a['accuracy'])} |",
             f"| log p(chosen) - log p(rejected) | {b['logp_margin']:.3f} | {a['logp_margin']:.3f} |",
             f"| reward margin (vs aggregate) | {b['reward_margin']:.3f} | {a['reward_margin']:.3f} |",
             f"| reward accuracy % | {pct(b['reward_accuracy'])} | {pct(a['reward_accuracy'])} |"]
    for t, em in sorted((d.get("tenants") or {}).items(), key=lambda kv: _tenant_order(kv[0])):
        lines.append(f"| tenant {t} holdout EM % | {pct(em['before'])} | {pct(em['after'])} |")
    return lines


def merge_line(m: dict) -> str:
    """The merge check in one sentence, from ``merged/fedlora-merge.json``."""
    return (f"Final adapter merged into the fp32 base (trained on a {m['trained_precision']} base): "
            f"max |logit difference| vs base + adapter on {m['prompts']} prompts **{m['max_abs_diff']:.2e}** "
            f"(tolerance {m['tolerance']:.2e}" + (f" = {m['rtol']:g} x the logits' scale {m['logit_scale']:.3g}"
                                                  if "rtol" in m else "") + ").")
