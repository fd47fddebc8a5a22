"""Central DPO: the aggregate is the frozen reference, and preferences move the right way."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.common.adapter import load_adapter_file
from fedlora.common.config import parse_config
from fedlora.common.data import read_preferences
from fedlora.server.release.dpo import PreferenceSets, refine, score
from tests.server.adapters import write_noisy_adapter

pytestmark = pytest.mark.slow  # each test trains or loads several models


SMALL_DPO = {"dpo.steps": 6, "dpo.batch-size": 4, "dpo.learning-rate": 5e-3, "dpo.beta": 0.5}


def _refine(tmp_path_factory, tenants_dir, flat: dict, *, pairs: int = 12):
    """A few DPO steps from a non-trivial aggregate on a tiny preference set."""
    cfg = parse_config({**SMALL_DPO, **flat})
    work = tmp_path_factory.mktemp("dpo")
    aggregate = write_noisy_adapter(work / "aggregate", cfg, seed=3, scale=0.01)
    rows = read_preferences(tenants_dir / "preferences" / "train.jsonl")[:pairs]
    state, report = refine(aggregate, PreferenceSets(train=rows, holdout=rows), cfg, output_dir=work / "trainer")
    return load_adapter_file(aggregate), state, report


@pytest.fixture(scope="module")
def refined(tmp_path_factory, tenants_dir):
    return _refine(tmp_path_factory, tenants_dir, {})


def test_score_hand_computed():
    # Prepare: policy and reference log-probs of two pairs
    chosen, rejected = np.array([-1.0, -5.0]), np.array([-2.0, -3.0])
    ref_chosen, ref_rejected = np.array([-1.0, -4.0]), np.array([-1.0, -3.0])
    # Execute
    s = score(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)
    # Assert: rewards 0.5*((0 - -1), (-1 - 0)) = (0.5, -0.5)
    assert s.accuracy == 0.5            # -1 > -2 yes, -5 > -3 no
    assert s.logp_margin == -0.5        # mean(1, -2)
    assert s.reward_accuracy == 0.5
    assert s.reward_margin == 0.0
    assert s.n == 2


def test_before_is_the_reference(refined):
    _, _, report = refined
    assert report.before.reward_margin == 0.0
    assert report.before.reward_accuracy == 0.0


def test_reference_stays_frozen_and_equal_to_the_aggregate(refined):
    _, _, report = refined
    assert report.reference_drift == 0.0


def test_dpo_moves_preferences_the_right_way(refined):
    _, _, report = refined
    assert report.steps == 6
    assert report.after.reward_margin > 0.0
    assert report.after.logp_margin > report.before.logp_margin


def test_refined_state_moves_away_from_the_aggregate(refined):
    aggregate, state, _ = refined
    assert set(state) == set(aggregate)
    assert max(float(np.abs(state[k] - aggregate[k]).max()) for k in state) > 0.0


def test_both_factors_train_under_the_ab_rule(refined):
    # The counterpart of the ffa test below: without the rule, DPO does move A.
    aggregate, state, report = refined
    assert report.trained_factors == "A and B"
    assert any(not np.array_equal(state[k], aggregate[k]) for k in state if ".lora_A." in k)


def test_ffa_keeps_every_lora_a_byte_identical_and_trains_b(tmp_path_factory, tenants_dir):
    # Prepare / Execute: DPO on an aggregate of a run federating B only (FFA-LoRA)
    aggregate, state, report = _refine(tmp_path_factory, tenants_dir, {"federation.lora-rule": "ffa"}, pairs=8)
    a_names = [k for k in aggregate if ".lora_A." in k]
    b_names = [k for k in aggregate if ".lora_B." in k]
    # Assert: the refined adapter's A is the input's, to the byte; B moved; the reference did not
    assert a_names and set(state) == set(aggregate)
    assert all(state[k].dtype == aggregate[k].dtype and state[k].tobytes() == aggregate[k].tobytes()
               for k in a_names)
    assert any(not np.array_equal(state[k], aggregate[k]) for k in b_names)
    assert (report.trained_factors, report.reference_drift) == ("B", 0.0)


def test_a_reference_that_moved_is_refused_and_bf16_rounding_is_not():
    from fedlora.server.release.dpo import _check_reference

    # Prepare: an aggregate whose largest value is 0.5; bf16 rounding is at most 0.5 x 2^-8 ~ 0.00195
    aggregate = {"x.lora_A.weight": np.array([[0.5, -0.25]], np.float32)}
    # Execute / Assert
    _check_reference(0.0, aggregate)
    _check_reference(0.0019, aggregate)
    with pytest.raises(RuntimeError, match="reference adapter moved by up to 0.01"):
        _check_reference(0.01, aggregate)
