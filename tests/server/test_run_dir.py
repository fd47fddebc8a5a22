"""Where a run goes when run.dir is empty: a bare ``flwr run`` writes under the fedlora home, by run id."""

from __future__ import annotations

import json
import re

from fedlora.common.config import parse_config
from fedlora.common.files import app_run_dir, fedlora_home


def test_fedlora_home_is_the_env_var_made_absolute_or_dot_fedlora_in_home(tmp_path, monkeypatch):
    # Execute / Assert: a relative FEDLORA_HOME is made absolute; without it ~/.fedlora
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDLORA_HOME", "rel/home")
    assert fedlora_home() == tmp_path / "rel" / "home"
    monkeypatch.delenv("FEDLORA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert fedlora_home() == tmp_path / "user" / ".fedlora"


def test_app_run_dir_is_absolute_under_runs_and_names_the_flower_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_HOME", str(tmp_path))
    path = app_run_dir(8_271_115_423)
    assert path.parent == tmp_path / "runs"
    assert re.fullmatch(r"\d{8}-\d{6}-8271115423", path.name)


def test_serverapp_without_run_dir_writes_to_the_fedlora_home_and_records_it(tmp_path, monkeypatch):
    from fedlora.server.run import prepare

    # Prepare: a working directory that must stay empty (the SuperLink's, under flwr run)
    monkeypatch.setenv("FEDLORA_HOME", str(tmp_path / "home"))
    cwd = tmp_path / "superlink-cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    # Execute
    run = prepare(parse_config({}), run_id=42)
    # Assert
    assert run.run_dir.parent == tmp_path / "home" / "runs" and run.run_dir.name.endswith("-42")
    assert json.loads((run.run_dir / "config.json").read_text())["run.dir"] == str(run.run_dir)
    assert run.cfg.run.dir == str(run.run_dir)
    assert (run.run_dir / "checkpoints" / "round_000" / "adapter_model.safetensors").is_file()
    assert list(cwd.iterdir()) == []
