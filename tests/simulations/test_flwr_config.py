"""``fedlora flwr-config`` and ``write_cli_config``: fedlora's connections merged into Flower's config.toml."""

from __future__ import annotations

import tomllib

import pytest

from fedlora.simulations.cli.deployment import write_cli_config
from fedlora.simulations.cli.flwr_config import merge_connections
from fedlora.simulations.cli.main import main

USERS = """\
# my own settings
[superlink]
default = "mine"

[superlink.mine]
address = "10.1.2.3:9093"
insecure = true
federation = "@me/lab"
"""


def _read(home):
    return tomllib.loads((home / "config.toml").read_text())["superlink"]


def test_merge_keeps_the_users_connections_and_default_and_writes_absolute_paths(tmp_path, monkeypatch):
    # Prepare: a user's config, and a CA given by a relative path
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(USERS)
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.crt").write_text("CA")
    monkeypatch.chdir(tmp_path)
    # Execute
    code = main(["flwr-config", "--flwr-home", str(home), "--superlink", "link.example.org:9093",
                 "--ca", "certs/ca.crt"])
    # Assert: the user's connection and default are unchanged; ours are added; the old file is kept
    links = _read(home)
    assert code == 0
    assert links["default"] == "mine"
    assert links["mine"] == {"address": "10.1.2.3:9093", "insecure": True, "federation": "@me/lab"}
    assert links["fedlora-sim"] == {"address": ":local:", "options": {
        "num-supernodes": 4, "backend": {"client-resources": {"num-cpus": 1}}}}
    assert links["fedlora"] == {"address": "link.example.org:9093",
                                "root-certificates": str(tmp_path / "certs" / "ca.crt")}
    assert (home / "config.toml.bak").read_text() == USERS


def test_fresh_home_makes_the_simulation_the_default_and_default_flag_switches_it(tmp_path):
    # Prepare
    home = tmp_path / "new-home"
    ca = tmp_path / "ca.crt"
    ca.write_text("CA")
    # Execute: a first call on no file, then one that names the default
    first = main(["flwr-config", "--flwr-home", str(home), "--num-supernodes", "2", "--cpus-per-tenant", "2"])
    default_after_first = _read(home)["default"]
    second = main(["flwr-config", "--flwr-home", str(home), "--num-supernodes", "2", "--cpus-per-tenant", "2",
                   "--superlink", "127.0.0.1:9093", "--ca", str(ca), "--default", "fedlora"])
    # Assert
    links = _read(home)
    assert (first, second) == (0, 0)
    assert default_after_first == "fedlora-sim"
    assert links["default"] == "fedlora"
    assert links["fedlora-sim"]["options"] == {"num-supernodes": 2, "backend": {"client-resources": {"num-cpus": 2}}}


def test_flowers_own_reader_sees_the_connections(tmp_path, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    # Prepare
    ca = tmp_path / "ca.crt"
    ca.write_text("CA")
    main(["flwr-config", "--flwr-home", str(tmp_path), "--superlink", "127.0.0.1:9093", "--ca", str(ca)])
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    # Execute
    sim, link, default = (read_superlink_connection(n) for n in ("fedlora-sim", "fedlora", None))
    # Assert
    assert (sim.address, sim.options.num_supernodes, sim.options.backend.client_resources.num_cpus) == (":local:", 4, 1)
    assert (link.address, link.root_certificates) == ("127.0.0.1:9093", str(ca))
    assert default.name == "fedlora-sim"


def test_env_file_holds_flowers_offline_switches_and_the_home(tmp_path):
    # Execute
    main(["flwr-config", "--flwr-home", str(tmp_path)])
    # Assert
    lines = set((tmp_path / "fedlora.env").read_text().splitlines())
    assert {f"export FLWR_HOME={tmp_path}", "export FLWR_TELEMETRY_ENABLED=0", "export FLWR_DISABLE_UPDATE_CHECK=1",
            "export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1"} <= lines


def test_write_cli_config_adds_fedlora_beside_other_connections(tmp_path):
    # Prepare: an operator home that already has a connection of its own
    (tmp_path / "config.toml").write_text(USERS)
    ca = tmp_path / "ca.crt"
    ca.write_text("CA")
    # Execute: twice, the second time on another port
    write_cli_config(tmp_path, superlink="127.0.0.1:9100", ca_cert=ca)
    path = write_cli_config(tmp_path, superlink="127.0.0.1:9200", ca_cert=ca)
    # Assert
    links = _read(tmp_path)
    assert path == tmp_path / "config.toml"
    assert links["default"] == "mine" and links["mine"]["address"] == "10.1.2.3:9093"
    assert links["fedlora"] == {"address": "127.0.0.1:9200", "root-certificates": str(ca)}


@pytest.mark.parametrize("args, message", [
    (["--superlink", "127.0.0.1:9093"], "--superlink and --ca go together"),
    (["--superlink", "no-port", "--ca", "CA"], "--superlink 'no-port': expected HOST:PORT"),
    (["--superlink", "h:9093", "--ca", "missing.crt"], "--ca missing.crt: no such file"),
    (["--num-supernodes", "0"], "--num-supernodes = 0: expected an integer >= 1"),
    (["--default", "nope"], "--default 'nope': no such connection"),
])
def test_bad_input_is_refused_with_what_to_do_and_writes_nothing(tmp_path, capsys, args, message):
    # Prepare
    (tmp_path / "CA").write_text("CA")
    # Execute
    code = main(["flwr-config", "--flwr-home", str(tmp_path / "home"), *args])
    # Assert
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "home" / "config.toml").exists()


def test_a_config_that_is_not_toml_is_named_and_left_alone(tmp_path, capsys):
    # Prepare
    (tmp_path / "config.toml").write_text("[superlink\n")
    # Execute
    code = main(["flwr-config", "--flwr-home", str(tmp_path)])
    # Assert
    assert code == 2
    assert f"{tmp_path / 'config.toml'} is not valid TOML" in capsys.readouterr().err
    assert (tmp_path / "config.toml").read_text() == "[superlink\n"


def test_merge_replaces_only_the_named_connection(tmp_path):
    # Prepare
    (tmp_path / "config.toml").write_text(USERS)
    # Execute
    merge_connections(tmp_path, {"mine": {"address": "10.9.9.9:1"}})
    # Assert: the connection named is replaced whole; the default stays
    assert _read(tmp_path) == {"default": "mine", "mine": {"address": "10.9.9.9:1"}}
