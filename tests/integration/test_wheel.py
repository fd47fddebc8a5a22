"""The built distribution, installed away from the source tree, is a working fedlora: the wheel
holds fedlora/ only, and a fresh venv with nothing of the tree on its path runs a federation
(the embedded base and the scenarios come from package data, the Flower app from the installed
fedlora). The sdist is built first and the wheel from it, so the sdist is complete too.

No network: the fresh venv takes the tested, locked dependencies through a .pth line to this
environment's site-packages (their .pth files, the editable fedlora's included, are not read
from there), Flower's console scripts are written for the fresh interpreter, and fedlora is
installed from the wheel alone with ``pip install --no-deps --no-index``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def fresh_venv(dist, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "tested-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    for ep in metadata.distribution("flwr").entry_points.select(group="console_scripts"):
        module, func = ep.value.split(":")
        script = venv / "bin" / ep.name
        script.write_text(f"#!{python}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
        script.chmod(0o755)
    wheel = next(dist.glob("fedlora-*.whl"))
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, text=True)
    return venv


def _clean_env(venv: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '')}", FEDLORA_HOME=str(home))
    return env


def test_the_wheel_and_the_sdist_hold_fedlora_only(dist):
    # Prepare
    version = metadata.version("fedlora")
    # Execute
    names = set(zipfile.ZipFile(next(dist.glob("fedlora-*.whl"))).namelist())
    sdist = next(dist.glob("fedlora-*.tar.gz"))
    # Assert: one import namespace (no server/, client/, common/, tests/), its data, its metadata
    assert {name.split("/")[0] for name in names} == {"fedlora", f"fedlora-{version}.dist-info"}
    assert {"fedlora/simulations/base_model/model.safetensors", "fedlora/simulations/scenarios/default.toml",
            "fedlora/server/server_app.py", "fedlora/client/client_app.py"} <= names
    assert "fedlora/__init__.py" not in names  # a namespace: fedlora.* of other distributions may join it
    assert sdist.stat().st_size > 0


def test_pip_show_lists_only_fedlora_files(fresh_venv, tmp_path):
    # Execute
    out = subprocess.run([str(fresh_venv / "bin" / "python"), "-m", "pip", "show", "-f", "fedlora"],
                         capture_output=True, text=True, check=True, cwd=tmp_path, env=_clean_env(fresh_venv, tmp_path)).stdout
    files = out.split("Files:\n", 1)[1].split()
    location = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("Location: "))
    # Assert: from the fresh venv, and nothing but fedlora/, its dist-info and its console script
    assert Path(location).is_relative_to(fresh_venv)
    assert files and all(f.startswith(("fedlora/", "fedlora-", "../../../bin/fedlora")) for f in files), files


def test_the_installed_wheel_runs_a_federation_from_an_unrelated_directory(fresh_venv, tmp_path):
    # Prepare: a working directory with nothing of fedlora's in it
    home, cwd = tmp_path / "home", tmp_path / "elsewhere"
    cwd.mkdir()
    env = _clean_env(fresh_venv, home)
    where = subprocess.run([str(fresh_venv / "bin" / "python"), "-c", "import fedlora.server, fedlora.simulations as s;"
                            "print(fedlora.server.__path__[0]); print(s.__path__[0])"],
                           capture_output=True, text=True, check=True, cwd=cwd, env=env).stdout.split()
    # Execute: the console script, the default scenario (package data), 2 tenants for 1 short round
    proc = subprocess.run([str(fresh_venv / "bin" / "fedlora"), "simulate", "--run-dir", str(tmp_path / "run"),
                           "--set", "simulation.tenants=2", "--set", "federation.rounds=1",
                           "--set", "train.local-steps=2", "--set", "data.train-size=16",
                           "--set", "data.holdout-size=4", "--set", "eval.probe-size=2",
                           "--set", "run.baselines=false", "--set", "dpo.enabled=false",
                           "--set", "publish.enabled=false"],
                          capture_output=True, text=True, timeout=600, cwd=cwd, env=env)
    # Assert: fedlora came from the fresh venv, and the run went through Flower to a final adapter
    assert all(Path(p).is_relative_to(fresh_venv) for p in where), where
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    federation = json.loads((tmp_path / "run" / "federation.json").read_text())
    assert (federation["aggregated_rounds"], federation["tenants"], federation["dropped"]) == (1, ["0", "1"], [])
    app = next((home / "flower-app").glob("*/pyproject.toml"))
    assert "fedlora.server.server_app:app" in app.read_text()
    assert list(cwd.iterdir()) == []
