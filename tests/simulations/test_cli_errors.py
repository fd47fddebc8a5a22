"""How the CLI reports an error: the project's own errors, its own ValueErrors and missing files
as the user's to fix (exit 2, no traceback); a ValueError or OSError from inside a library with
where it was raised, since it may be a defect; anything else with its traceback."""

from __future__ import annotations

import pytest

from fedlora.simulations.cli import main as cli


def _run(monkeypatch, capsys, err: BaseException) -> tuple[int, str]:
    def dispatch(args):
        raise err

    monkeypatch.setattr(cli, "_dispatch", dispatch)
    rc = cli.main(["config"])
    return rc, capsys.readouterr().err


def test_a_missing_file_is_the_users_to_fix(monkeypatch, capsys):
    rc, err = _run(monkeypatch, capsys, FileNotFoundError("data/tenant_0/train.jsonl: no such file"))
    assert rc == 2 and err == "fedlora config: data/tenant_0/train.jsonl: no such file\n"


def test_a_value_error_from_a_library_says_where_it_was_raised(monkeypatch, capsys):
    # Prepare: numpy's own ValueError, as a defect would raise it
    import numpy as np

    def dispatch(args):
        np.zeros(3).reshape(2, 2)

    monkeypatch.setattr(cli, "_dispatch", dispatch)
    # Execute
    rc = cli.main(["config"])
    lines = capsys.readouterr().err.splitlines()
    # Assert
    assert rc == 2 and lines[0].startswith("fedlora config: cannot reshape array of size 3")
    assert lines[1].startswith("fedlora config: (ValueError at ") and "--debug" in lines[1]


def test_fedloras_own_value_error_is_the_message_alone(monkeypatch, capsys):
    from fedlora.server.screen import DirectionScreen

    def dispatch(args):
        DirectionScreen(action="maybe")

    monkeypatch.setattr(cli, "_dispatch", dispatch)
    rc = cli.main(["config"])
    assert rc == 2 and capsys.readouterr().err == "fedlora config: outlier action 'maybe': choose one of drop, flag\n"


def test_an_unknown_error_keeps_its_traceback(monkeypatch, capsys):
    with pytest.raises(KeyError):
        _run(monkeypatch, capsys, KeyError("x"))
