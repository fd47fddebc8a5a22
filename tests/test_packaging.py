"""One namespace: the distribution installs fedlora.* only, every import names it, and the source
tree's Flower app is the one the installed fedlora writes."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from fedlora.simulations.cli import flower_app

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
FOLDERS = ("server", "client", "common", "simulations")


def _python_files():
    for top in (*FOLDERS, "tests"):
        yield from sorted((ROOT / top).rglob("*.py"))


def test_every_package_folder_is_listed_and_mapped_under_fedlora():
    # Prepare: the folders Python would import (an __init__.py), and the data folders that ship
    found = {"fedlora." + ".".join(p.parent.relative_to(ROOT).parts)
             for top in FOLDERS for p in (ROOT / top).rglob("__init__.py")}
    data = {"fedlora.simulations.base_model", "fedlora.simulations.scenarios"}
    setuptools = PYPROJECT["tool"]["setuptools"]
    # Assert: listed exactly, each folder under its fedlora name, and tests/ nowhere
    assert set(setuptools["packages"]) == found | data
    assert setuptools["package-dir"] == {f"fedlora.{top}": top for top in FOLDERS}
    assert not any(name.split(".")[1] == "tests" for name in setuptools["packages"])


def _imports(path: Path) -> list[str]:
    """The absolute module names ``path`` imports, also inside functions."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
    return names


def test_no_module_imports_a_folder_by_its_bare_name():
    # Execute: every import of every module, tests included
    bare = [f"{path.relative_to(ROOT)}: {name}" for path in _python_files() for name in _imports(path)
            if name.split(".")[0] in FOLDERS]
    # Assert: once installed, `import server` finds another project's package, or none
    assert bare == [], "write fedlora.<folder>..."


# What each installed package may import of fedlora (DESIGN.md): common is the base; client and
# server never import each other; the simulation side is the outer layer.
ALLOWED = {"common": {"common"}, "client": {"common", "client"}, "server": {"common", "server"}}


@pytest.mark.parametrize("top", sorted(ALLOWED))
def test_dependencies_point_inwards(top):
    # Execute
    wrong = [f"{path.relative_to(ROOT)}: {name}" for path in sorted((ROOT / top).rglob("*.py"))
             for name in _imports(path) if name.startswith("fedlora.") and name.split(".")[1] not in ALLOWED[top]]
    # Assert
    assert wrong == []


def test_the_source_trees_flower_app_is_the_one_the_installed_fedlora_writes():
    # Prepare: what `flwr run .` in a clone submits, and what `flwr run APP` submits once installed
    ours = PYPROJECT["tool"]["flwr"]["app"]
    written = tomllib.loads(flower_app.app_pyproject())
    # Assert: same publisher, components and default run config
    assert written["tool"]["flwr"]["app"] == ours
    assert written["project"]["name"] == PYPROJECT["project"]["name"]
    assert ours["components"] == {"serverapp": "fedlora.server.server_app:app",
                                  "clientapp": "fedlora.client.client_app:app"}


def test_the_app_directory_is_written_once_and_holds_only_its_pyproject(tmp_path):
    # Execute
    first = flower_app.app_dir(home=tmp_path)
    mtime = (first / "pyproject.toml").stat().st_mtime_ns
    again = flower_app.app_dir(home=tmp_path)
    hostile = flower_app.app_dir(home=tmp_path, clientapp="fedlora.simulations.attacks.hostile_app:app")
    # Assert: one directory per distinct file, reused as it is; nothing else Flower would bundle
    assert again == first and (first / "pyproject.toml").stat().st_mtime_ns == mtime
    assert [p.name for p in first.iterdir()] == ["pyproject.toml"]
    assert hostile != first
    assert 'clientapp = "fedlora.simulations.attacks.hostile_app:app"' in (hostile / "pyproject.toml").read_text()
