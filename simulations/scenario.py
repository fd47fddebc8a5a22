"""Scenarios and run configs: a shipped scenario (``scenarios/*.toml``) or a ``.toml`` path,
``--set KEY=VALUE`` overrides, resolved into one validated :class:`~fedlora.common.config.Config`,
and the ``run_config.toml`` that ``flwr run --run-config`` reads back.

The CLI, the deployment launcher, the release commands and every benchmark use this one
module; nothing else reads a scenario file.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Mapping

from fedlora.common.config import Config, ConfigError, parse_config
from fedlora.common.files import default_run_dir

SCENARIOS = Path(__file__).resolve().parent / "scenarios"


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables -> Flower's flat ``section.key`` run-config."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def shipped_scenarios() -> list[str]:
    """The names of the scenarios installed with fedlora (package data beside this module)."""
    return sorted(p.stem for p in SCENARIOS.glob("*.toml"))


def scenario_path(name: str) -> Path:
    """A shipped scenario's file by name, or an existing ``.toml`` path."""
    path = Path(name)
    if path.suffix == ".toml" and path.is_file():
        return path
    cand = SCENARIOS / f"{name}.toml"
    if not cand.is_file():
        known = ", ".join(shipped_scenarios())
        raise FileNotFoundError(f"scenario {name!r} not found; shipped scenarios: {known} (or pass a .toml path)")
    return cand


def load_scenario(name: str) -> dict[str, Any]:
    """The scenario's flat run-config overrides (not yet validated)."""
    path = scenario_path(name)
    try:
        return flatten(tomllib.loads(path.read_text()))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"{err}"], source=str(path)) from None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values parsed as TOML scalars, bare words as strings."""
    out, problems = {}, []
    for pair in pairs:
        if "=" not in pair:
            problems.append(f"{pair!r}: expected key=value")
            continue
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw
    if problems:
        raise ConfigError(problems, source="--set")
    return out


def resolve(scenario: str, overrides: Mapping[str, Any], run_dir: str | None) -> Config:
    """Scenario + overrides + run directory -> one Config, parsed once.

    ``run_dir`` (made absolute: the ServerApp runs in another working directory) wins over
    a ``run.dir`` in the scenario or overrides; with neither, the run goes to
    ``./runs/<timestamp>``.
    """
    flat = {**load_scenario(scenario), **overrides}
    if run_dir:
        flat["run.dir"] = str(Path(run_dir).resolve())
    elif not flat.get("run.dir"):
        flat["run.dir"] = str(default_run_dir().resolve())
    if flat.get("simulation.tenant-policy"):  # the ClientApps run in another working directory
        flat["simulation.tenant-policy"] = ",".join(str(Path(f.strip()).resolve()) if f.strip() else ""
                                                    for f in str(flat["simulation.tenant-policy"]).split(","))
    if flat.get("simulation.ledger-dir"):
        flat["simulation.ledger-dir"] = str(Path(str(flat["simulation.ledger-dir"])).resolve())
    return parse_config(flat, source=f"scenario {scenario!r} with overrides")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def write_run_config(cfg: Config, path: Path) -> Path:
    """Every key of ``cfg`` as the TOML file ``flwr run --run-config`` reads."""
    path.write_text("".join(f'"{k}" = {_toml_value(v)}\n' for k, v in cfg.to_flat().items()))
    return path
