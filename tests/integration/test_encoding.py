"""End to end through Flower's simulation engine with a compressed delta: the round records'
uplink bytes shrink by what the encoding promises, against the bytes fp32 replies of the
same adapter count (``ArrayRecord.count_bytes``, as the transport counts them)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from tests.integration.conftest import simulate_cmd

pytestmark = pytest.mark.slow

# 2 tenants, 2 rounds of 2 steps on the embedded base; nothing after the rounds but the report
SMALL = ["--set", "simulation.tenants=2", "--set", "federation.rounds=2", "--set", "train.local-steps=2",
         "--set", "data.train-size=16", "--set", "data.holdout-size=4", "--set", "eval.probe-size=2",
         "--set", "eval.max-new-tokens=4", "--set", "run.baselines=false", "--set", "dpo.enabled=false",
         "--set", "federation.fraction-evaluate=0.0",  # no assertion reads a round's evaluation
         "--set", "publish.enabled=false"]


def _simulate(tmp_path, *settings: str):
    run_dir = tmp_path / "run"
    args = [a for s in settings for a in ("--set", s)]
    proc = subprocess.run(simulate_cmd("--run-dir", str(run_dir), *SMALL, *args), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rounds = [json.loads((run_dir / f"metrics/round_00{k}.json").read_text()) for k in (1, 2)]
    return run_dir, rounds


def _fp32_reply_bytes(run_dir) -> int:
    """What one tenant's fp32 reply of this run's adapter counts on the wire."""
    from safetensors.numpy import load_file

    from fedlora.common.adapter import to_arrayrecord

    state = load_file(str(run_dir / "checkpoints/round_002/adapter_model.safetensors"))
    return to_arrayrecord({k: np.zeros_like(v) for k, v in state.items()}).count_bytes()


def test_int8_replies_are_about_a_third_of_fp32(tmp_path):
    # Execute
    run_dir, rounds = _simulate(tmp_path, "federation.delta-encoding=int8")
    # Assert: both tenants aggregated each round; uplink ~ 1/4 of fp32 plus the row scales
    # (the embedded adapter's B factors have 8 columns: a 4-byte scale per 8 bytes of values)
    fp32 = _fp32_reply_bytes(run_dir)
    for r in rounds:
        assert sorted(r["finished"]) == ["0", "1"] and not r["dropped"] and r["aggregated"]
        assert 0.30 < r["bytes_up"] / (2 * fp32) < 0.34
    # each tenant kept its rounding error for the next round, beside its data
    assert all((run_dir / f"data/tenant_{t:03d}/.fedlora-state/error_feedback.safetensors").is_file() for t in (0, 1))


def test_bf16_under_secure_aggregation_sends_half_of_fp32(tmp_path):
    # Execute
    run_dir, rounds = _simulate(tmp_path, "federation.delta-encoding=bf16", "secagg.enabled=true")
    # Assert: secure rounds with 16-bit masked words: about half of fp32's bytes (key stages aside)
    fp32 = _fp32_reply_bytes(run_dir)
    for r in rounds:
        assert r["secagg"]["finished"] == 2 and r["secagg"]["failure"] is None
        assert r["secagg"]["quantizer"] == {"encoding": "bf16", "bits": 14, "modulus_bits": 16, "wire_dtype": "uint16"}
        assert 0.48 < r["bytes_up"] / (2 * fp32) < 0.53
