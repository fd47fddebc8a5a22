"""Crash safety through Flower's simulation engine: kill -9 of the launcher in round 2 leaves
no process behind and ``--resume`` ends with the uninterrupted run's adapter, byte for byte;
a federation in which every reply is dropped exits non-zero and publishes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import TINY, simulate_cmd

pytestmark = pytest.mark.slow

def _cmd(*args: str) -> list[str]:
    return simulate_cmd(*args)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _processes_of(run_dir: Path) -> list[str]:
    """Live processes started for this run: Flower and Ray carry FLWR_HOME=<run>/flower/flwr-home."""
    needle = f"FLWR_HOME={run_dir / 'flower' / 'flwr-home'}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            if needle in (entry / "environ").read_bytes().split(b"\0") and state != "Z":
                args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                found.append(f"{entry.name} (state {state}, parent {ppid}) {args[:120]}")
        except (OSError, IndexError):
            continue
    return found


@pytest.mark.timeout(2700)  # up to three tiny runs; 15 min on 2 busy cores
def test_kill_9_in_round_2_leaves_nothing_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_run):
    # Prepare: the uninterrupted reference run (shared, same TINY settings and seed)
    ref = tiny_run.run_dir
    run_dir = tmp_path / "crash"
    launcher = subprocess.Popen(_cmd("--run-dir", str(run_dir), *TINY), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    # Execute: kill -9 once round 1 is recorded and round 2 trains
    deadline = time.monotonic() + 600
    while not (run_dir / "metrics" / "round_001.json").is_file():
        assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before round 1 was recorded"
        time.sleep(0.2)
    time.sleep(3.0)  # into round 2's training
    assert not (run_dir / "metrics" / "round_002.json").is_file()
    assert _processes_of(run_dir), "nothing of the run was running in round 2"
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    killed = time.monotonic()
    left = _processes_of(run_dir)
    while left and time.monotonic() - killed < 5.0:
        time.sleep(0.2)
        left = _processes_of(run_dir)
    gone_after = time.monotonic() - killed
    # Assert: nothing of the run is left within 5 s
    assert left == [], left
    print(f"all processes of the run gone {gone_after:.2f} s after kill -9")
    # Execute: resume
    resumed = subprocess.run(_cmd("--resume", str(run_dir)), capture_output=True, text=True, timeout=900)
    # Assert: resumed after round 1, finished, the same adapter bytes as the uninterrupted run
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    summary = json.loads((run_dir / "federation.json").read_text())
    assert summary["resumed_after"] == 1 and summary["rounds"] == 3
    assert _sha256(run_dir / "adapter" / "adapter_model.safetensors") == \
        _sha256(ref / "adapter" / "adapter_model.safetensors")
    assert _processes_of(run_dir) == []


def test_a_federation_with_every_reply_dropped_exits_non_zero_and_publishes_nothing(tmp_path):
    # Prepare: every reply claims more examples than federation.max-examples allows -> all dropped
    run_dir = tmp_path / "run"
    cmd = _cmd("--run-dir", str(run_dir), "--set", "simulation.tenants=2", "--set", "federation.rounds=1",
               "--set", "federation.min-train-nodes=2", "--set", "federation.max-examples=1",
               "--set", "train.local-steps=2", "--set", "data.train-size=32", "--set", "data.holdout-size=8",
               "--set", "eval.probe-size=4", "--set", "dpo.enabled=true", "--set", "publish.enabled=true")
    # Execute
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    # Assert: exit 1 with the reason, FEDERATION_FAILED, no DPO, merge or registry; the report says why
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "the federation failed: only 0 of 1 round(s) aggregated an update" in proc.stderr
    assert (run_dir / "FEDERATION_FAILED").is_file() and not (run_dir / "FEDERATION_DONE").exists()
    for absent in ("dpo", "merged", "registry", "release.json"):
        assert not (run_dir / absent).exists(), absent
    assert "## Nothing published" in (run_dir / "report.md").read_text()
    # and merge of its adapter is refused, in one line
    merge = subprocess.run([sys.executable, "-m", "fedlora.simulations.cli", "merge", str(run_dir)], capture_output=True,
                           text=True, timeout=120)
    assert merge.returncode == 2 and "failed federation" in merge.stderr
    assert len(merge.stderr.strip().splitlines()) == 1
    assert os.listdir(run_dir / "adapter")  # the untrained adapter stays for inspection, marked as failed
