"""The pooled baseline sees the federation's examples under either budget choice."""

from __future__ import annotations

import pytest

from fedlora.common.config import parse_config
from fedlora.simulations.baselines import pooled_budget


@pytest.mark.parametrize("choice", ["rounds", "examples"])
def test_pooled_budget_sees_the_federations_examples(choice):
    cfg = parse_config({"train.local-steps": 12, "train.batch-size": 16, "run.pooled-budget": choice})
    # 10 rounds of 4 tenants, one tenant lost in one round: 39 tenant-rounds
    budget = pooled_budget(cfg, rounds_done=10, total_tenant_rounds=39)
    federation_examples = 39 * 12 * 16
    seen = budget.steps * budget.accumulate * 16
    if choice == "rounds":
        # the global adapter's 120 steps, one micro-batch per tenant of a round (39/10 -> 4)
        assert (budget.steps, budget.accumulate) == (120, 4)
        assert abs(seen - federation_examples) <= 12 * 16  # rounding of tenants per round
    else:
        assert (budget.steps, budget.accumulate) == (39 * 12, 1)
        assert seen == federation_examples
    assert "examples" in budget.describe(16)


def test_pooled_budget_choice_is_validated():
    from fedlora.common.config import ConfigError

    with pytest.raises(ConfigError, match="run.pooled-budget"):
        parse_config({"run.pooled-budget": "epochs"})
