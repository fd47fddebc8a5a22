"""Preflight: problems a user can fix are reported before any Flower process exists, one
line each, exit code 2, within seconds; resume refuses what it cannot continue."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest



def _tenants(root, rows_per_tenant):
    for t, rows in enumerate(rows_per_tenant):
        d = root / f"tenant_{t:03d}"
        d.mkdir(parents=True)
        for name in ("train.jsonl", "holdout.jsonl"):
            (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_preflight_reports_bad_line_missing_model_and_unwritable_dir_before_flower(tmp_path):
    # Prepare: tenant 1's line 2 lacks 'output'; the model does not exist; the run dir's parent is a file
    good = {"instruction": "Say hi.", "output": "hi"}
    _tenants(tmp_path / "data", [[good, good], [good, {"instruction": "Say hi."}]])
    (tmp_path / "a-file").write_text("")
    run_dir = tmp_path / "a-file" / "run"
    cmd = [sys.executable, "-m", "fedlora.simulations.cli", "simulate", "--run-dir", str(run_dir),
           "--set", "simulation.tenants=2", "--set", f"data.dir={json.dumps(str(tmp_path / 'data'))}",
           "--set", f"model.base={json.dumps(str(tmp_path / 'no-model'))}", "--port", "1"]
    # Execute
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    # Assert: exit 2, one line per problem, no traceback, no Flower started (the next test
    # proves no Flower process is even attempted)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines == [
        f"fedlora simulate: tenant 1: {tmp_path / 'data' / 'tenant_001' / 'train.jsonl'}, line 2, field 'output': missing",
        f"fedlora simulate: tenant 1: {tmp_path / 'data' / 'tenant_001' / 'holdout.jsonl'}, line 2, field 'output': missing",
        f"fedlora simulate: run directory {run_dir}: cannot be created, {tmp_path / 'a-file'} is not a directory",
        f"fedlora simulate: model.base {str(tmp_path / 'no-model')!r}: directory {tmp_path / 'no-model'} does not exist",
    ]
    assert "Traceback" not in proc.stderr and "superlink" not in proc.stdout.lower()


def test_preflight_runs_before_any_flower_process_is_started(tmp_path, monkeypatch, capsys):
    import fedlora.simulations.cli.launcher as launcher
    from fedlora.simulations.cli.main import main

    # Prepare: a missing data.dir; any start of Flower would be recorded
    started = []
    monkeypatch.setattr(launcher, "run_simulation", lambda *a, **k: started.append(a))
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda *a, **k: started.append(a))
    # Execute
    code = main(["simulate", "--run-dir", str(tmp_path / "run"), "--set", f"data.dir={json.dumps(str(tmp_path / 'x'))}"])
    # Assert
    assert code == 2 and started == []
    assert "data.dir" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_supernode_preflight_names_data_key_and_certificate(tmp_path, capsys):
    from fedlora.simulations.cli.main import main

    # Prepare: bad JSON on line 1, a key that is not a key, no CA
    (tmp_path / "train.jsonl").write_text("{not json\n")
    (tmp_path / "node").write_text("nonsense\n")
    # Execute
    code = main(["deploy", "supernode", "--superlink", "127.0.0.1:1", "--ca", str(tmp_path / "ca.crt"),
                 "--key", str(tmp_path / "node"), "--data", str(tmp_path / "train.jsonl"), "--tenant-id", "7"])
    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[0] == f"fedlora deploy supernode: CA certificate {tmp_path / 'ca.crt'}: file not found"
    assert "not an unencrypted OpenSSH private key" in err[1]
    assert err[2].startswith(f"fedlora deploy supernode: tenant 7: {tmp_path / 'train.jsonl'}, line 1: not valid JSON")
    assert len(err) == 3


def test_resume_refuses_a_directory_without_config_and_a_finished_run(tmp_path, capsys):
    from fedlora.simulations.cli.main import main

    # Prepare: an empty directory, and a finished run
    (tmp_path / "empty").mkdir()
    done = tmp_path / "done"
    done.mkdir()
    (done / "config.json").write_text("{}")
    (done / "FEDERATION_DONE").write_text("{}")
    # Execute
    empty_code = main(["simulate", "--resume", str(tmp_path / "empty")])
    empty_err = capsys.readouterr().err
    done_code = main(["simulate", "--resume", str(done)])
    done_err = capsys.readouterr().err
    # Assert
    assert (empty_code, done_code) == (2, 2)
    assert "has no config.json" in empty_err
    assert "is complete (FEDERATION_DONE exists)" in done_err


def test_resume_takes_the_runs_own_config(tmp_path):
    from fedlora.common.config import parse_config
    from fedlora.common.records import round_path
    from fedlora.simulations.cli.resume import resume_config

    # Prepare: a run interrupted after round 1, its config written by the ServerApp
    cfg = parse_config({"federation.rounds": 3, "data.dir": str(tmp_path / "data"), "run.dir": "/elsewhere"})
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_flat()))
    round_path(tmp_path, 1).parent.mkdir(parents=True)
    round_path(tmp_path, 1).write_text("{}")
    # Execute
    resumed = resume_config(tmp_path)
    # Assert: same settings, this directory, resume on; data not regenerated (data.dir kept)
    assert resumed.run.resume is True and resumed.run.dir == str(tmp_path.resolve())
    assert resumed.federation.rounds == 3 and resumed.data.dir == str(tmp_path / "data")


@pytest.mark.parametrize("flag", [[], ["--debug"]])
def test_debug_flag_parses_for_every_command(flag):
    from fedlora.simulations.cli.main import build_parser

    args = build_parser().parse_args([*flag, "config"])
    assert args.debug is bool(flag)


def test_chat_template_asked_of_a_base_without_one_is_a_preflight_problem(tmp_path):
    # Prepare: the embedded base's tokenizer has no chat template
    from fedlora.common.config import parse_config
    from fedlora.simulations.cli.preflight import PreflightError, check_simulation

    cfg = parse_config({"data.template": "chat", "run.dir": str(tmp_path / "run")})
    # Execute
    with pytest.raises(PreflightError) as err:
        check_simulation(cfg)
    # Assert: one problem, naming the key and what to do
    assert len(err.value.problems) == 1
    assert "data.template is chat but its tokenizer has no chat template" in err.value.problems[0]
    assert "use data.template=auto or alpaca" in err.value.problems[0]
