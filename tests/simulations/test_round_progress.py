"""``fedlora simulate``'s round lines: each round's line once its record is complete."""

from __future__ import annotations

import json

from fedlora.common.records import RoundRecord, round_path
from fedlora.simulations.cli.simulate import RoundProgress


def _record(run_dir, number: int, em: float | None) -> None:
    evaluation = {} if em is None else {"0": {"eval-exact-match": em}}
    record = RoundRecord(round=number, connected=1, sampled=["0"], finished=["0"], dropped=[], aggregated=True,
                         checkpoint=None, bytes_down=0, bytes_up=0, seconds=1.0, train={}, eval=evaluation)
    path = round_path(run_dir, number)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record.to_json()))


def _lines(capsys) -> list[str]:
    out = capsys.readouterr()
    return [line for line in (out.out + out.err).replace("\r", "\n").splitlines() if line.startswith("round ")]


def test_a_round_evaluated_with_the_next_training_is_printed_a_round_later_with_its_evaluation(tmp_path, capsys):
    # Prepare: round 1 recorded, its evaluation still to come with round 2's training
    progress = RoundProgress(3, tmp_path, lag=1)
    _record(tmp_path, 1, None)
    # Execute: round 2 starts; then round 1's record gets its evaluation and round 3 starts
    progress("[ROUND 2/3]")
    first = _lines(capsys)
    _record(tmp_path, 1, 0.5)
    _record(tmp_path, 2, None)
    progress("[ROUND 3/3]")
    second = _lines(capsys)
    _record(tmp_path, 2, 0.75)
    _record(tmp_path, 3, 1.0)
    progress.close(3)
    # Assert: nothing at round 2's start; round 1 with its 50 % at round 3's; rounds 2 and 3 at the end
    assert first == []
    assert second == ["round 1: 1/1 tenants finished, mean holdout EM 50.0 %"]
    assert _lines(capsys) == ["round 2: 1/1 tenants finished, mean holdout EM 75.0 %",
                              "round 3: 1/1 tenants finished, mean holdout EM 100.0 %"]


def test_with_a_separate_evaluation_a_round_is_printed_as_the_next_one_starts(tmp_path, capsys):
    # Prepare
    progress = RoundProgress(2, tmp_path)
    _record(tmp_path, 1, 0.25)
    # Execute
    progress("[ROUND 2/2]")
    # Assert
    assert _lines(capsys) == ["round 1: 1/1 tenants finished, mean holdout EM 25.0 %"]
    progress.close(2)
