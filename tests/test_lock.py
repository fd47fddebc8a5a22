"""What `make` installs is what was tested: the running environment is requirements-lock.txt,
the README's table is generated from it, and every install path pins the same torch."""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".ci"))
import tested_versions  # noqa: E402  (a script of the repo, not a package)

canonical = tested_versions.canonical


def _installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}


def _requirement_closure(root: str, installed: dict[str, str]) -> set[str]:
    """The installed distributions ``root`` pulls in, transitively (markers with extras skipped)."""
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name in seen or name not in installed:
            continue
        seen.add(name)
        for req in metadata.distribution(name).requires or []:
            if "extra ==" not in req:
                todo.append(canonical(re.match(r"[A-Za-z0-9._-]+", req).group(0)))
    return seen


def test_the_running_environment_is_the_lock():
    # Prepare: every pin of the lock, and every distribution this interpreter sees
    lock, installed = tested_versions.locked(), _installed()
    # Execute: what differs, beyond fedlora itself, pip, and torch with what only torch pulls in
    # (a CUDA torch brings its nvidia-* wheels; the lock leaves torch to the site)
    outside = _requirement_closure("torch", installed) - set(lock)
    extra = sorted(set(installed) - set(lock) - outside - {"fedlora", "pip"})
    missing = sorted(set(lock) - set(installed))
    other = {name: (lock[name], installed[name]) for name in lock if name in installed and lock[name] != installed[name]}
    # Assert: exactly the locked set at the locked versions (`make install` rebuilds the venv from it)
    assert (extra, missing, other) == ([], [], {}), "run `make install` (or `make lock` to move the pins)"


def test_torch_is_the_makefiles_pin_and_every_image_pins_the_same_torch_and_flower():
    # Prepare
    pin = tested_versions.torch_pin()
    ml_images = ("apps.Dockerfile", "supernode.Dockerfile")  # these install the lock; the SuperLink's is Flower only
    # Execute
    torch = {name: re.findall(r"^ARG TORCH=torch==(\S+)", (ROOT / "docker" / name).read_text(), re.M)
             for name in ml_images}
    flwr = re.findall(r"^ARG FLWR_VERSION=(\S+)", (ROOT / "docker" / "superlink.Dockerfile").read_text(), re.M)
    # Assert: a CUDA build of the same release (+cu128) is the same torch
    assert torch == {name: [pin] for name in ml_images}
    assert metadata.version("torch").split("+")[0] == pin
    assert flwr == [tested_versions.locked()["flwr"]]


def test_the_lock_pins_every_dependency_and_holds_hashes_for_each_pin():
    # Prepare
    text, lock = tested_versions.LOCK.read_text(), tested_versions.locked()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    # Execute
    unhashed = [b.split()[0] for b in blocks if b.strip() and "--hash=sha256:" not in b]
    unpinned = [d for d in tested_versions.direct_dependencies()
                if canonical(d.split("[")[0]) not in lock and not d.startswith("torch")]
    # Assert: `pip install --require-hashes` accepts it, and no dependency floats
    assert unhashed == [] and unpinned == []
    assert "torch" not in lock


def test_the_readme_table_is_generated_from_the_lock():
    # Prepare
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    # Execute
    regenerated = tested_versions.with_table(readme)
    # Assert: `make lock` rewrites it; nobody edits versions by hand
    assert regenerated == readme, "run `python .ci/tested_versions.py --write README.md`"
    assert f"| transformers | {tested_versions.locked()['transformers']} |" in readme
