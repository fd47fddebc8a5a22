"""The report's defences section: the bounds that held, the audit table, who was flagged
and why; under secure aggregation, exactly what still bounds a tenant."""

from __future__ import annotations

from fedlora.common.config import parse_config
from fedlora.common.records import RoundRecord, TenantAudit
from fedlora.simulations.audit_report import plot_norms, section


def _audit(norm, cos, *, action="accepted", outlier=False, why="", share=0.25):
    return TenantAudit(norm=norm, cosine=cos, cosine_median=cos, weight_share=share, weight=256.0,
                       claimed_examples=256, action=action, bound=15.0, outlier=outlier, why=why)


def _round(n, attacker):
    audit = {str(t): _audit(5.0, 0.9, share=1 / 3) for t in range(3)}
    audit["3"] = attacker
    return RoundRecord(round=n, connected=4, sampled=["0", "1", "2", "3"], finished=["0", "1", "2", "3"],
                       dropped=[], aggregated=True, checkpoint=None, bytes_down=0, bytes_up=0, seconds=1.0,
                       train={}, eval={}, audit=audit)


def test_section_names_the_flagged_tenant_with_its_reason_and_the_bounds(tmp_path):
    # Prepare: tenant 3 dropped in round 1 (norm 500), flagged for its cosine in round 2
    rounds = [_round(1, _audit(500.0, -0.4, action="dropped", outlier=True, why="L2 norm 500 over the bound 15",
                               share=0.0)),
              _round(2, _audit(6.0, -0.5, outlier=True, why="cosine -0.50 to the round's median update is below 0"))]
    # Execute
    text = "\n".join(section(parse_config({}), rounds))
    # Assert
    assert "3 x the round's median norm" in text and "over it: drop" in text
    assert "| 3 | 2 / 2 | 1 | 0 | 0 | 0 |" in text          # flagged twice, dropped once
    assert "| 1 | 3 | L2 norm 500 over the bound 15 |" in text
    assert "| 0 | 0 / 2 |" in text                           # honest tenants not flagged
    assert plot_norms(tmp_path, rounds).is_file()


def test_under_secure_aggregation_the_section_says_no_norm_bound_holds():
    cfg = parse_config({"secagg.enabled": True})
    text = "\n".join(section(cfg, []))
    assert "no L2-norm bound holds" in text and "[-8, +8]" in text and "no per-tenant audit" in text


def test_without_bounds_the_section_says_the_norm_is_not_bounded():
    cfg = parse_config({"federation.norm-multiplier": 0.0})
    assert "**not bounded**" in "\n".join(section(cfg, []))
