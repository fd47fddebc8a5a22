"""The Flower app that ``flwr run`` submits: a directory holding one ``pyproject.toml``.

Flower finds an app through its ``pyproject.toml`` (``[tool.flwr.app]``: publisher, the ServerApp
and ClientApp references, the default run config). An installed fedlora has no source tree, so
this module writes that file for the installed version: the components name the installed
packages (``fedlora.server.server_app:app``, ``fedlora.client.client_app:app``) and the run
config is :class:`~fedlora.common.config.Config`'s defaults. The bundle Flower builds from it
holds no code; every process imports the fedlora installed beside it, on the server and on each
tenant node alike. The source tree's own ``pyproject.toml`` names the same components and
defaults (a test compares them), so ``flwr run .`` in a clone submits the same app.

The directory is ``<fedlora home>/flower-app/<digest>/``: one per distinct file, written once,
renamed into place whole, so runs that start together share it.
"""

from __future__ import annotations

import hashlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

SERVERAPP = "fedlora.server.server_app:app"
CLIENTAPP = "fedlora.client.client_app:app"
PUBLISHER = "fedlora"


def fedlora_version() -> str:
    try:
        return version("fedlora")
    except PackageNotFoundError:  # imported from a tree that is not installed
        return "0.0.0"


def app_config(*, clientapp: str = CLIENTAPP) -> dict:
    """The app's ``pyproject.toml`` as a document (``clientapp``: another ClientApp, e.g. a test's)."""
    from fedlora.common.config import Config

    config: dict = {}  # nested tables, as Flower reads `model.base = ...` in a pyproject
    for key, value in Config().to_flat().items():
        section, _, name = key.partition(".")
        config.setdefault(section, {})[name] = value
    return {
        "project": {"name": "fedlora", "version": fedlora_version(),
                    "description": "fedlora's ServerApp and ClientApp (the installed fedlora package)",
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": PUBLISHER,
                                  "components": {"serverapp": SERVERAPP, "clientapp": clientapp},
                                  "config": config}}},
    }


def app_pyproject(*, clientapp: str = CLIENTAPP) -> str:
    import tomli_w

    header = ("# Written by fedlora for `flwr run` (fedlora.simulations.cli.flower_app): the installed fedlora's\n"
              "# apps and default run config. Override keys with `flwr run DIR CONNECTION --run-config ...`.\n")
    return header + tomli_w.dumps(app_config(clientapp=clientapp))


def app_dir(*, clientapp: str = CLIENTAPP, home: Path | None = None) -> Path:
    """A directory with the app's ``pyproject.toml`` (written on first use), for ``flwr run DIR``."""
    from fedlora.common.files import atomic_dir, fedlora_home

    text = app_pyproject(clientapp=clientapp)
    final = (home or fedlora_home()) / "flower-app" / hashlib.sha256(text.encode()).hexdigest()[:16]
    if (final / "pyproject.toml").is_file():
        return final
    try:
        with atomic_dir(final, overwrite=False) as tmp:
            (tmp / "pyproject.toml").write_text(text, encoding="utf-8")
    except OSError:  # another run put the same directory in place first
        if not (final / "pyproject.toml").is_file():
            raise
    return final
